"""scripts/robustness_table.py: its cells read back from the CLI (a refusal from exit code 2, any other
failure an error) and its Markdown tables."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "robustness_table.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("robustness_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _completed(returncode: int, stderr: str):
    return lambda argv, **_: subprocess.CompletedProcess(argv, returncode, stdout="", stderr=stderr)


def test_a_cell_is_refused_on_exit_code_2_with_the_cli_message_and_fails_loudly_otherwise(script, monkeypatch):
    monkeypatch.setattr(script.subprocess, "run", _completed(2, "log line\ndptrain: error: needs a non-private run\n"))
    assert script.run_cell(["privacy.target_epsilon=3"]) == script.Cell(refused="dptrain: error: needs a non-private run")
    monkeypatch.setattr(script.subprocess, "run", _completed(1, "Traceback ...\nRuntimeError: boom\n"))
    with pytest.raises(RuntimeError, match="boom"):
        script.run_cell([])


def test_the_table_has_a_row_per_defence_and_privacy_and_marks_refused_cells(script):
    setting = script.Setting("digits", [], [0.03, 0.1], 1.0)
    ran = [
        script.Cell(0.9, (0.5, 0.1, 0.0), 0.8, ("evasion pgd_linf: rises",)),
        script.Cell(0.8, (0.3, 0.0, 0.0), 0.6),
    ]
    refusal = script.Cell(refused="dptrain: error: defense.sanitize needs a non-private run")
    cells = {
        (defence, privacy): [refusal] * 2 if (defence == "activation clustering" and privacy != "no DP") else ran
        for defence in script.DEFENCES
        for privacy in script.PRIVACY
    }
    lines = script.table(setting, cells).splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert header == "| defence | privacy | clean acc. | PGD L∞ 0.03 | PGD L∞ 0.1 | backdoor ASR |"
    assert len(body) == 9 and all(row.count("|") == header.count("|") for row in body)
    # Two seeds: mean ± sample standard deviation, by hand (0.9, 0.8) -> 0.85 ± 0.0707; the unbounded
    # budget's column (third robust accuracy) is not shown.
    assert body[0] == "| no defence | no DP | 0.850 ± 0.071 | 0.400 ± 0.141 | 0.050 ± 0.071 | 0.700 ± 0.141 |"
    assert body[7] == "| activation clustering | ε = 3 | refused¹ | refused¹ | refused¹ | refused¹ |"
    assert body[6].startswith("| activation clustering | no DP | 0.850")
    assert "¹ refused by the CLI (exit 2): `dptrain: error: defense.sanitize needs a non-private run`" in lines
    # One warning per run that had one: 7 ran cells with the first seed's warning each.
    assert sum(line.startswith("- warning:") for line in lines) == 7


@pytest.mark.slow
def test_quick_table_on_breast_cancer_runs_the_grid_through_the_cli(tmp_path):
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--datasets", "breast_cancer", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 10
    refused = [row for row in rows if "refused¹" in row]
    assert [row.split(" | ")[:2] for row in refused] == [["| activation clustering", "ε = 3"], ["| activation clustering", "ε = 1"]]
    assert "needs a non-private run" in out.read_text()
    for row in rows[1:]:
        if row not in refused:
            numbers = [float(part.strip(" |")) for part in row.split(" | ")[2:]]
            assert len(numbers) == 5 and all(0 <= number <= 1 for number in numbers)
