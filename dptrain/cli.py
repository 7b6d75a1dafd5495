"""The ``dptrain`` command: subcommand dispatch and the Hydra entry points (no training logic here)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dptrain import __version__
from dptrain.config import Config, register_configs
from dptrain.errors import UserError
from dptrain.errors import config_error_line, first_line
from dptrain.errors import fail as _fail
from dptrain.tracking.artifacts import AUDIT
from dptrain.tracking.run_dir import RunLock, restrict_umask, resume_hint

USAGE = f"""usage: dptrain [COMMAND] [HYDRA ARGS...]

dptrain {__version__}: privacy-preserving training for PyTorch.

commands:
  train    train with DP-SGD from the Hydra config, then audit the model (the default command)
           e.g. dptrain train dataset=digits model=cnn privacy.target_epsilon=3
                dptrain train -m privacy.target_epsilon=1,3,inf
                dptrain train --cfg job        (print the composed config)
                dptrain train --help           (config groups and Hydra options)
                dptrain train train.resume=outputs/<date>/<time>
           dptrain train launcher.nproc_per_node=2   (two worker processes, DP data parallelism)
  audit    audit a finished run again from its saved model and split
           e.g. dptrain audit run_dir=outputs/<date>/<time> audit=thorough
  report   table (CSV, Markdown) and figures of the runs below a directory, e.g. a sweep
           e.g. dptrain report multirun/<date>/<time>
                dptrain report multirun/<date>/<time> --select test_accuracy --out reports/eps
  verify   check a run directory against the SHA-256 digests in its manifest.json, or test a suspect
           model for a watermarked run's watermark
           e.g. dptrain verify run_dir=outputs/<date>/<time>
                dptrain verify run_dir=outputs/<date>/<time> model=suspect.pt

`dptrain` with no arguments runs the default job (digits, DP-SGD at epsilon 3).
Exit status: 0 done, 1 the run failed (a worker died), 2 bad input (nothing ran), 130 interrupted.
"""

VERIFY_USAGE = """usage: dptrain verify run_dir=<dir> [model=<suspect.pt> [verify.alpha=<p>]]

Without model=: recompute the SHA-256 of every file of a finished run and of the data files it read, and
compare them with its manifest.json. Exit status 0 when all match, 1 naming each file that differs, is
missing or is new, 2 on bad input. A match proves the files are the ones the manifest lists, not who wrote
them: publish the manifest's own SHA-256 (printed) somewhere the run directory's writers cannot change.

With model=: load the suspect state dict (weights_only) into the owner run's model and test its agreement
with the secret labels of the run's watermark keys (train.watermark.enabled=true) against chance, a
one-sided binomial test. Exit status 0 when the watermark is found (p-value < verify.alpha), 1 when not.

  run_dir=<dir>         the run's directory, e.g. outputs/<date>/<time>
  model=<suspect.pt>    a state dict, e.g. another run's model.pt
  verify.alpha=<p>      the p-value below which the watermark counts as found (default {alpha:g})
"""

AUDIT_USAGE = """usage: dptrain audit run_dir=<dir> [audit=<level>] [audit.<key>=<value> ...]

Audit a finished run again from its saved model.pt and recorded split.json, and write audit.json,
TensorBoard panels and HParams into its directory. The run's training config is kept; only the audit
changes. Canaries are the ones inserted at training time.

  run_dir=<dir>         the run's directory, e.g. outputs/<date>/<time>
  audit=<level>         standard, fast, thorough or none (conf/audit/)
  audit.<key>=<value>   any audit key, e.g. audit.mia.reference_models=8 audit.mia.attacks=[loss,lira]
"""

COMMANDS = ("train", "audit", "report", "verify")
RESUME = "train.resume="

register_configs()


def _hydra_app(app) -> None:
    """Run a Hydra app with dptrain's error convention for Hydra's and OmegaConf's errors too: bad input
    is one ``dptrain: error:`` line and exit status 2, as argparse does, not Hydra's report and status 1.

    HYDRA_FULL_ERROR=1 makes Hydra raise instead of printing its report; a user who sets it
    gets Hydra's traceback for Hydra's errors, as Hydra documents.
    """
    setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except (HydraException, OmegaConfBaseException) as error:
        if setting == "1":
            raise
        _fail(config_error_line(error))
    finally:
        if setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = setting


def _resumed_config(cfg: DictConfig, resume_dir: Path) -> DictConfig:
    """The config ``resume_dir`` was started with; a resumed run takes no other overrides."""
    extra = [o for o in HydraConfig.get().overrides.task if not o.startswith(RESUME)]
    if extra:
        raise UserError(
            f"train.resume continues {resume_dir} with the config it was started with: drop {' '.join(extra)}"
        )
    resumed = _saved_config(resume_dir, "train.resume")
    resumed.train.resume = str(resume_dir)
    return resumed


@hydra.main(version_base="1.3", config_path="pkg://dptrain.conf", config_name="config")
def train_app(cfg: DictConfig) -> float:
    """Hydra task for ``dptrain train``; returns test accuracy so Hydra sweepers can optimise it."""
    from dptrain import pipeline
    from dptrain.preflight import discard_refused_run
    from dptrain.views.summary import format_summary

    from dptrain.training import launch, ranks
    from dptrain.validation import validate

    # The directory is claimed and locked by the Preflight callback before Hydra wrote into it.
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.train.resume is not None:
            run_dir = Path(cfg.train.resume)
            cfg = _resumed_config(cfg, run_dir)
        if ranks.launched_by_torchrun():
            with launch.process_group(cfg.launcher.backend):
                # Every rank shares rank 0's run directory (the others ran Hydra in a scratch one).
                run_dir = Path(ranks.broadcast_object(str(run_dir)))
                metrics, report = pipeline.train(cfg, run_dir)
                if not ranks.is_main():
                    return metrics.test_accuracy
        elif cfg.launcher.nproc_per_node > 1:
            validate(cfg)
            metrics, report = launch.launch(cfg, run_dir, pipeline.train)
        else:
            metrics, report = pipeline.train(cfg, run_dir)
    except UserError as error:
        discard_refused_run(run_dir)
        _fail(str(error))
    except launch.WorkerFailed as error:
        _fail(f"{error}; {resume_hint(run_dir)}", 1)
    except KeyboardInterrupt:
        _fail(f"interrupted; {resume_hint(run_dir)}", 130)
    print(format_summary(metrics, report, run_dir))
    return metrics.test_accuracy


def _saved_config(run_dir: Path, key: str) -> DictConfig:
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{key}={run_dir} has no .hydra/config.yaml: give the directory of a dptrain run")
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved))
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:
        # OmegaConf's errors say which key does not fit the schema (a run of an older dptrain may hold a
        # key since renamed, such as audit.mia.lira_fixed_variance).
        raise UserError(
            f"{saved} is not a readable dptrain config ({first_line(str(error))}): rename or remove that key "
            "there, or restore the file from a copy of the run"
        ) from None


def audit_command(args: list[str]) -> None:
    """``dptrain audit run_dir=<dir> [audit=<level>] [audit.<key>=<value> ...]``."""
    from hydra import compose, initialize_config_module

    from dptrain import pipeline
    from dptrain.views.summary import format_audit

    if any(a in ("-h", "--help") for a in args):
        print(AUDIT_USAGE)
        return
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    overrides = [a for a in args if not a.startswith("run_dir=")]
    try:
        if len(run_dirs) != 1:
            raise UserError("dptrain audit needs run_dir=<directory of a finished run>")
        wrong = [o for o in overrides if not (o.startswith("audit=") or o.startswith("audit."))]
        if wrong:
            raise UserError(f"dptrain audit takes only audit=... and audit.<key>=... overrides, not {' '.join(wrong)}")
        run_dir = Path(run_dirs[0])
        cfg = _saved_config(run_dir, "run_dir")
        try:
            with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
                requested = compose(config_name="config", overrides=overrides).audit
        except (HydraException, OmegaConfBaseException) as error:
            raise UserError(config_error_line(error)) from None
        restrict_umask()
        with RunLock(run_dir):
            report = pipeline.audit(cfg, run_dir, requested)
    except UserError as error:
        _fail(str(error))
    print(format_audit(report))
    print(f"{'artifacts':<15}{run_dir / AUDIT} (kept as {report.history_file}), {run_dir / 'tb'}")


class _ReportArguments(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        _fail(f"{self.prog}: {message}")


def report_command(args: list[str]) -> None:
    """``dptrain report <dir> [--select METRIC[:max|:min]] [--out DIR]``."""
    from dptrain.report.build import build_report, console_summary

    parser = _ReportArguments(
        prog="dptrain report",
        description="Report the runs below a directory (a multirun/<date>/<time> sweep or any directory of runs): "
        "report.csv, report.md and figures.",
    )
    parser.add_argument("dir", type=Path, help="a multirun directory or any directory holding run directories")
    parser.add_argument(
        "--select",
        metavar="METRIC[:max|:min]",
        help="name the best private run by a report column (e.g. test_accuracy) and the privacy cost of choosing it",
    )
    parser.add_argument("--out", type=Path, help="where to write the report (default: DIR)")
    options = parser.parse_args(args)
    try:
        report = build_report(options.dir, options.out, options.select)
    except UserError as error:
        _fail(str(error))
    print(console_summary(report))


def verify_command(args: list[str]) -> None:
    """``dptrain verify run_dir=<dir> [model=<suspect.pt> [verify.alpha=<p>]]``: exit 0 when the run matches
    its manifest (or the suspect carries the run's watermark), 1 when it does not."""
    from dptrain.tracking.verify import check_run_record
    from dptrain.views.verification import format_record_check, format_watermark_check
    from dptrain.watermark import DEFAULT_ALPHA
    from dptrain.watermark.suspect import check_suspect

    if any(a in ("-h", "--help") for a in args):
        print(VERIFY_USAGE.format(alpha=DEFAULT_ALPHA))
        return
    names = [a.split("=", 1)[0] if "=" in a else a for a in args]
    given = dict(a.split("=", 1) for a in args if "=" in a)
    try:
        wrong = [a for a, name in zip(args, names) if name not in ("run_dir", "model", "verify.alpha")]
        if wrong:
            raise UserError(f"dptrain verify takes run_dir=, model= and verify.alpha=, not {' '.join(wrong)}")
        if len(set(names)) != len(names):
            raise UserError("dptrain verify takes each of run_dir=, model= and verify.alpha= once")
        if "run_dir" not in given:
            raise UserError("dptrain verify needs run_dir=<directory of a finished run>")
        run_dir = Path(given["run_dir"])
        if "model" not in given:
            if "verify.alpha" in given:
                raise UserError("verify.alpha is the watermark test's threshold: give model=<suspect.pt> with it")
            record = check_run_record(run_dir)
            print(format_record_check(record, run_dir))
            passed = record.matches
        else:
            try:
                alpha = float(given.get("verify.alpha", DEFAULT_ALPHA))
            except ValueError:
                raise UserError(f"verify.alpha={given['verify.alpha']} is not a number; e.g. 1e-6") from None
            if not run_dir.is_dir():
                raise UserError(f"run_dir={run_dir} is not a directory: give the directory of the owner's run")
            cfg = _saved_config(run_dir, "run_dir")
            mark = check_suspect(run_dir, cfg.model, Path(given["model"]), alpha)
            print(format_watermark_check(mark, Path(given["model"])))
            passed = mark.found
    except UserError as error:
        _fail(str(error))
    if not passed:
        sys.exit(1)


def _train_argv(args: list[str]) -> list[str]:
    """Hydra's argv for ``dptrain train ARGS``: a resumed run writes into its own directory, and
    under an outside torchrun only rank 0 makes a run directory (the others use a scratch one)."""
    resume = [a[len(RESUME) :] for a in args if a.startswith(RESUME)]
    if resume and not any(a.startswith("hydra.run.dir=") for a in args):
        if "-m" in args or "--multirun" in args:
            _fail("train.resume continues one run: drop -m/--multirun")
        # Keep the run's own .hydra/ record; Hydra's log appends to its train.log.
        args = [*args, f"hydra.run.dir={resume[0]}", "hydra.output_subdir=null"]
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        scratch = Path(tempfile.gettempdir()) / f"dptrain-rank{rank}-{os.getpid()}"
        args = [*args, f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dptrain`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args and args[0] == "--version":
        print(__version__)
        return
    if args and args[0] in COMMANDS:
        command, args = args[0], args[1:]
    elif not args or "=" in args[0] or args[0][0] in "-~+":
        command = "train"
    else:
        _fail(f"unknown command '{args[0]}': choose one of {', '.join(COMMANDS)} (dptrain --help)")
    if command == "train":
        sys.argv = [f"dptrain {command}", *_train_argv(args)]
        _hydra_app(train_app)
    elif command == "report":
        report_command(args)
    elif command == "verify":
        verify_command(args)
    else:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        audit_command(args)


if __name__ == "__main__":
    main()
