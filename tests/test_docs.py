"""The documentation: the site builds with ``mkdocs build --strict``, and every command that README.md and
docs/ show in a code block still works as written (composed and validated, never trained)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import make_config
from dptrain.cli import main
from dptrain.config import register_configs
from dptrain.validation import validate
from dptrain.report.progress import sweep_points

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Commands whose config is composed (a renamed key or a removed option still fails) but not validated,
# because validation reads data or a run directory that only the reader has.
COMPOSE_ONLY = {
    "dataset=csv dataset.path=adult.csv": "reads adult.csv, the reader's own file",
    "train.resume=outputs/": "continues a run directory of the author's machine",
    "dataset=cifar10 dataset.root=/shared/data": "reads CIFAR-10 from a cluster's shared file system",
    "experiment=cifar10_": "reads CIFAR-10 from a cluster's shared file system (tests/test_cifar_recipes.py validates)",
}
# Hydra's joblib and submitit launchers (the `sweep` extra) decide where jobs run, not what they run.
LAUNCHER = ("hydra/launcher=", "hydra.launcher.")

COMMAND = re.compile(r"^(?:.*&&\s*)?(?:torchrun\s.*?-m\s+|python3?\s+-m\s+)?dptrain(?:\s|$)")
README_LINK = re.compile(r"\]\((?!https?:)([^)#\s]+)(?:#([^)\s]+))?\)")
SCRIPT = re.compile(r"^(?:time\s+)?python3?\s+(scripts/\S+\.py)")


@dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]  # from the program on, shell-quoting removed as the shell would

    def __str__(self) -> str:
        return " ".join(self.argv)


def shell_lines(page: Path):
    """(line number, line) of every shell line in the page's fenced code blocks, continuations joined."""
    fenced = False
    pending, start = "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, (pending + line).strip().removeprefix("$ ")
        pending = ""


def documented_commands() -> list[Command]:
    """Every ``dptrain ...`` and ``python scripts/...`` command in a code block of README.md or docs/."""
    commands = []
    for page in PAGES:
        for number, line in shell_lines(page):
            if not (COMMAND.match(line) or SCRIPT.match(line)):
                continue
            # Quotes removed and $HOME expanded, as the shell does before dptrain sees the arguments.
            tokens = [os.path.expandvars(token) for token in shlex.split(line, comments=True)]
            where = f"{page.relative_to(ROOT)}:{number}"
            segment: list[str] = []
            for token in [*tokens, "&&"]:
                if token != "&&":
                    segment.append(token)
                    continue
                if "dptrain" in segment and segment[0] in ("dptrain", "torchrun", "python", "python3"):
                    commands.append(Command(where, tuple(segment[segment.index("dptrain") :])))
                elif SCRIPT.match(" ".join(segment)):
                    script = next(i for i, token in enumerate(segment) if token.startswith("scripts/"))
                    commands.append(Command(where, tuple(segment[script:])))
                segment = []
    return commands


COMMANDS = documented_commands()


def test_the_site_builds_strictly_with_an_api_reference_from_the_docstrings(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
        + ["--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    # --strict turns a broken link or anchor, a page missing from the nav or a nav entry without a page into an error.
    assert built.returncode == 0, built.stderr[-4000:]
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        html = (site / "reference" / page.stem / "index.html").read_text()
        # Rendered objects, not the `::: dptrain.<package>` line left as text.
        assert html.count('class="doc doc-heading"') >= 3 and ":::" not in html, page.name
    # The README is not part of the site: its relative links are checked against the built pages.
    for target, anchor in README_LINK.findall((ROOT / "README.md").read_text()):
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"
        if anchor:
            built_page = site / Path(target).relative_to("docs").with_suffix("") / "index.html"
            assert f'id="{anchor}"' in built_page.read_text(), f"README links to {target}#{anchor}: no such anchor"


def test_the_readme_and_the_docs_show_the_commands_this_file_checks():
    where = [command.where.split(":")[0] for command in COMMANDS]
    programs = {command.argv[1] for command in COMMANDS if command.argv[0] == "dptrain" and len(command.argv) > 1}
    # The README's two quick-start commands and its tour, and the user guide's many more.
    assert where.count("README.md") >= 8 and len(COMMANDS) >= 40
    assert {"train", "audit", "report"} <= programs
    used = {pattern for pattern in COMPOSE_ONLY if any(pattern in str(command) for command in COMMANDS)}
    assert used == set(COMPOSE_ONLY), "an allow-list entry matches no documented command: remove it"


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Each job's overrides, as ``dptrain train`` splits a sweep (a named experiment's sweep included)."""
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        hydra = compose(config_name="config", overrides=fixed, return_hydra_config=True).hydra
    if not multirun and hydra.mode != RunMode.MULTIRUN:
        return [overrides]
    task = [o for o in overrides if not o.startswith("hydra")]
    sweep = OmegaConf.create({"hydra": {"sweeper": OmegaConf.to_container(hydra.sweeper), "overrides": {"task": task}}})
    points = sweep_points(sweep)
    assert points is not None, f"{overrides}: not a sweep the basic sweeper expands"
    return points


# A sweep's jobs cost a Hydra compose each: a job documented twice (the README and a guide page) is checked once.
VALIDATED_JOBS: set[tuple[str, ...]] = set()


def check_train(command: Command, arguments: list[str]) -> None:
    multirun = any(a in ("-m", "--multirun") for a in arguments)
    overrides = [a for a in arguments if a not in ("-m", "--multirun")]
    assert not [a for a in overrides if a.startswith("-")], "an option this test does not know"
    overrides = [o for o in overrides if not o.startswith(LAUNCHER)]
    if any(o.startswith("launcher.nproc_per_node=") for o in overrides):
        # How many processes fit depends on the reader's machine (its cores or GPUs), not on the command.
        overrides += ["launcher.backend=gloo", "launcher.oversubscribe=true"]
    compose_only = any(pattern in str(command) for pattern in COMPOSE_ONLY)
    for point in job_overrides(overrides, multirun):
        if tuple(point) in VALIDATED_JOBS:
            continue  # the same job, documented on another page, already composed and validated
        VALIDATED_JOBS.add(tuple(point))
        config = make_config(*point)
        if config.dataset.name in ("mnist", "fashion_mnist", "cifar10"):
            pytest.importorskip("torchvision")
        if config.federation.engine == "flower":
            pytest.importorskip("flwr")
        if not compose_only:
            validate(config)


def check_audit(arguments: list[str]) -> None:
    # `dptrain audit` takes run_dir=<dir> and audit overrides on top of the run's own config.
    overrides = [a for a in arguments if not a.startswith("run_dir=")]
    assert len(arguments) - len(overrides) == 1
    assert all(o.startswith(("audit=", "audit.")) for o in overrides)
    validate(make_config(*overrides))


def check_report(arguments: list[str], tmp_path: Path, capsys) -> None:
    # The flags parse when the command gets as far as looking for runs in the (here empty) directory.
    with pytest.raises(SystemExit) as stopped:
        main(["report", str(tmp_path), *arguments[1:]])
    assert stopped.value.code == 2
    assert "holds no dptrain runs" in capsys.readouterr().err


def check_verify(arguments: list[str], tmp_path: Path, capsys) -> None:
    # The arguments parse when the command gets as far as reading the (here empty) run directory.
    with pytest.raises(SystemExit) as stopped:
        main(["verify", *(a if not a.startswith("run_dir=") else f"run_dir={tmp_path}" for a in arguments)])
    assert stopped.value.code == 2
    assert f"run_dir={tmp_path} has no" in capsys.readouterr().err


def check_script(arguments: list[str]) -> None:
    source = (ROOT / arguments[0]).read_text()
    for flag in (a for a in arguments[1:] if a.startswith("--")):
        assert f'"{flag}"' in source, f"{arguments[0]} has no option {flag}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: f"{command.where} {command}"[:120])
def test_a_documented_command_works_as_written(command, tmp_path, capsys):
    program, *arguments = command.argv
    if program != "dptrain":
        check_script([program, *arguments])
    elif arguments[:1] == ["audit"]:
        check_audit(arguments[1:])
    elif arguments[:1] == ["report"]:
        check_report(arguments[1:], tmp_path, capsys)
    elif arguments[:1] == ["verify"]:
        check_verify(arguments[1:], tmp_path, capsys)
    else:
        check_train(command, arguments[1:] if arguments[:1] == ["train"] else arguments)
