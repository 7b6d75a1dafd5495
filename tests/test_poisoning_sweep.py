"""DP against poisoning: the group-privacy bound against hand numbers, and the report of a poisoning sweep
(columns, the figure's means, min-max intervals and dashed bound) from run directories written here."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import pytest
from hydra import compose, initialize_config_module

from dptrain.config import register_configs
from dptrain.report.progress import sweep_jobs

from dptrain.report.build import build_report
from dptrain.report.figures import report_figures
from dptrain.report.poisoning import group_ceiling, group_floor
from dptrain.validation import validate


@pytest.mark.parametrize(
    "clean, epsilon, delta, poisoned, expected",
    [
        # k = 1 is 2 add/remove steps: e^(2 * 0.5) * 0.01 + 2 e^0.5 1e-5 = 0.0271828183 + 0.0000329744.
        (0.01, 0.5, 1e-5, 1, 0.0272157927),
        # Without a baseline rate only delta's share is left: 2 e^1 1e-5.
        (0.0, 1.0, 1e-5, 1, 5.43656366e-5),
        # k = 3, epsilon = 0.1: m = 6, e^0.6 * 0.05 + 6 e^0.5 1e-5 = 0.0911059400 + 0.0000989233.
        (0.05, 0.1, 1e-5, 3, 0.0912048633),
        # 29 records at epsilon 3: e^174 -- vacuous, clipped at 1.
        (0.01, 3.0, 1e-5, 29, 1.0),
        # No poison: the clean rate itself; no guarantee: 1.
        (0.3, 1.0, 1e-5, 0, 0.3),
        (0.01, math.inf, 1e-5, 1, 1.0),
    ],
)
def test_group_ceiling_matches_hand_numbers(clean, epsilon, delta, poisoned, expected):
    assert group_ceiling(clean, epsilon, delta, poisoned) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize(
    "clean, epsilon, delta, poisoned, expected",
    [
        # e^-0.2 (0.9 - 2 e^0.1 1e-5) = 0.8187307531 * 0.8999778966.
        (0.9, 0.1, 1e-5, 1, 0.7368395810),
        (0.9, 3.0, 1e-5, 29, 0.0),
        (0.9, math.inf, 1e-5, 1, 0.0),
        (0.9, 1.0, 1e-5, 0, 0.9),
    ],
)
def test_group_floor_matches_hand_numbers(clean, epsilon, delta, poisoned, expected):
    assert group_floor(clean, epsilon, delta, poisoned) == pytest.approx(expected, rel=1e-8, abs=1e-12)


# (target epsilon, accountant's epsilon, k, seed, backdoor success rate): two budgets and no DP, three seeds.
RUNS = [
    (0.1, 0.1, 0, 0, 0.010), (0.1, 0.1, 0, 1, 0.020), (0.1, 0.1, 0, 2, 0.030),
    (0.1, 0.1, 2, 0, 0.015), (0.1, 0.1, 2, 1, 0.035), (0.1, 0.1, 2, 2, 0.025),
    (3, 3.0, 0, 0, 0.010), (3, 3.0, 0, 1, 0.020), (3, 3.0, 0, 2, 0.030),
    (3, 3.0, 2, 0, 0.100), (3, 3.0, 2, 1, 0.200), (3, 3.0, 2, 2, 0.150),
    ("inf", None, 0, 0, 0.000), ("inf", None, 0, 1, 0.010), ("inf", None, 0, 2, 0.020),
    ("inf", None, 2, 0, 0.500), ("inf", None, 2, 1, 0.600), ("inf", None, 2, 2, 0.700),
]  # fmt: skip


def write_sweep(root):
    """A finished poisoning sweep as ``dptrain report`` reads it: overrides, config, metrics, manifest."""
    for job, (target, epsilon, count, seed, rate) in enumerate(RUNS):
        run = root / str(job)
        (run / ".hydra").mkdir(parents=True)
        overrides = [f"privacy.target_epsilon={target}", f"attack.poison_count={count}", f"train.seed={seed}"]
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run / ".hydra" / "config.yaml").write_text("audit:\n  name: none\n")
        metrics = {
            "private": epsilon is not None, "test_accuracy": 0.9, "epsilon": epsilon, "delta": 1e-5,
            "noise_multiplier": 1.0 if epsilon else 0.0, "train_seconds": 1.0, "poisoned": count,
            "backdoor_success_rate": rate,
        }  # fmt: skip
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "manifest.json").write_text("{}")


def test_report_of_a_poisoning_sweep_has_the_columns_and_the_figure_with_seeds_and_bound(tmp_path):
    write_sweep(tmp_path)
    report = build_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [int(row["poisoned"]) for row in rows] == [count for _, _, count, _, _ in RUNS]
    assert [float(row["backdoor_success_rate"]) for row in rows] == [rate for *_, rate in RUNS]
    assert matplotlib.image.imread(tmp_path / "poisoning_vs_epsilon.png").ndim == 3
    assert "poisoning_vs_epsilon.png" in (tmp_path / "report.md").read_text()

    (axis,) = report_figures(report.table)["poisoning_vs_epsilon.png"].axes
    lines = {line.get_label(): line for line in axis.get_lines()}
    # Means over the three seeds at epsilon 0.1 and 3 (the baseline is its own marker at the right edge).
    assert list(lines["k=0"].get_xdata()) == [0.1, 3.0]
    assert list(lines["k=0"].get_ydata()) == pytest.approx([0.02, 0.02])
    assert list(lines["k=2"].get_ydata()) == pytest.approx([0.025, 0.15])
    # The ceiling from k = 0's mean (0.02), k = 2 being 4 add/remove steps:
    # epsilon 0.1: e^0.4 0.02 + 4 e^0.3 1e-5 = 0.0298364940 + 0.0000539944; epsilon 3: e^12 0.02 > 1, clipped.
    bound = lines["k=2: DP ceiling"]
    assert list(bound.get_xdata()) == [0.1, 3.0]
    assert list(bound.get_ydata()) == pytest.approx([0.0298904884, 1.0], rel=1e-8)
    # Min-max bars over the seeds, the non-private baseline's included.
    spans = [tuple(sorted(segment[:, 1])) for bars in axis.collections for segment in bars.get_segments()]
    for span in [(0.01, 0.03), (0.015, 0.035), (0.1, 0.2), (0.5, 0.7), (0.0, 0.02)]:
        assert any(got == pytest.approx(span) for got in spans), span
    assert "3 seeds" in axis.get_ylabel()


def test_poisoning_sweep_recipe_is_48_backdoor_runs_dptrain_accepts():
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        sweep = compose(config_name="config", overrides=["experiment=poisoning_sweep"], return_hydra_config=True)
        assert sweep.attack.name == "backdoor" and sweep.audit.name == "none" and sweep_jobs(sweep) == 48
        params = sweep.hydra.sweeper.params
        assert str(params["attack.poison_count"]) == "0,1,8,29" and str(params["train.seed"]) == "0,1,2"
        for count in (0, 29):
            for epsilon in ("1", "inf"):
                overrides = [f"attack.poison_count={count}", f"privacy.target_epsilon={epsilon}"]
                validate(compose(config_name="config", overrides=["experiment=poisoning_sweep", *overrides]))
