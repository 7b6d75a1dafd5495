"""Sweeps and ``dptrain report`` as a user meets them: sweep progress, the table and figures of a sweep,
incomplete runs, bad directories, the privacy cost of selecting a run, HParams overrides, the named
experiments, parallel launching, and the worked notebook run on a real report."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from conftest import TINY, make_audit_report
from conftest import run_dptrain as dptrain

from dptrain.config import register_configs
from dptrain.report.collect import RunRecord, read_run
from dptrain.report.progress import BASIC_SWEEPER, sweep_jobs
from dptrain.report.table import differing_overrides
from dptrain.report.tuning import (
    Mechanism,
    composition_epsilon,
    delta_from_rdp,
    epsilon_from_rdp,
    negative_binomial_gamma,
    random_stopping_bounds,
    rdp_curve,
    truncated_negative_binomial_bound,
)
from dptrain.validation import validate

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("1", "4", "inf")
SWEEP = ["-m", f"privacy.target_epsilon={','.join(TARGETS)}", "train.epochs=2", "train.progress=false", "audit=fast"]
FIGURES = ("accuracy_vs_epsilon.png", "leakage_vs_epsilon.png", "lower_bound_vs_epsilon.png", "frontier.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 3-point epsilon sweep of the tiny job, and what the sweep printed."""
    root = tmp_path_factory.mktemp("sweep")
    result = dptrain("train", *SWEEP, f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "sweep", result.stdout + result.stderr


@pytest.fixture(scope="module")
def report(sweep):
    """``dptrain report <sweep> --select test_accuracy`` into the sweep directory."""
    directory, _ = sweep
    result = dptrain("report", str(directory), "--select", "test_accuracy", cwd=directory.parent)
    assert result.returncode == 0, result.stderr
    return directory, result.stdout


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def one_error_line(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("dptrain: error: ")
    return line


def test_sweep_logs_its_progress_as_job_k_of_n(sweep):
    _, output = sweep
    for k in (1, 2, 3):
        assert f"sweep job {k} of 3: privacy.target_epsilon={TARGETS[k - 1]}" in output
        assert f"sweep job {k} of 3 finished in" in output
    assert "dptrain report" in output


def test_report_has_one_row_per_run_with_epsilon_increasing_with_the_target(report):
    directory, _ = report
    rows = read_csv(directory / "report.csv")
    assert len(rows) == 3 and {row["status"] for row in rows} == {"complete"}
    by_target = sorted(rows, key=lambda row: float(row["privacy.target_epsilon"]))
    epsilons = [float(row["epsilon"]) for row in by_target]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[1] < epsilons[2] == math.inf
    assert all(0 < float(row["test_accuracy"]) <= 1 for row in rows)
    for column in ("delta", "noise_multiplier", "mia.loss.auc", "mia.loss.tpr@1%fpr", "mia.loss.eps_lb",
                   "aia.advantage", "train_seconds", "audit_seconds"):
        assert column in rows[0]
    assert all(row["audit_level"] == "fast" and row["audit_file"].startswith("audits/") for row in rows)


def test_report_figures_are_pngs_matplotlib_reads_back(report):
    import matplotlib.image

    directory, _ = report
    for name in FIGURES:
        path = directory / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100


def test_report_markdown_has_the_command_the_table_and_the_figures(report):
    directory, stdout = report
    markdown = (directory / "report.md").read_text()
    assert "dptrain train -m privacy.target_epsilon=1,4,inf" in markdown
    assert "| run | status | privacy.target_epsilon | test_accuracy | epsilon |" in markdown
    for name in FIGURES:
        assert f"({name})" in markdown
    assert "3 complete, 0 incomplete, of 3 jobs in the sweep" in stdout


def test_select_names_the_best_private_run_and_charges_at_least_its_own_epsilon(report):
    directory, stdout = report
    rows = read_csv(directory / "report.csv")
    private = [row for row in rows if math.isfinite(float(row["epsilon"]))]
    best = max(private, key=lambda row: float(row["test_accuracy"]))
    selection = json.loads((directory / "selection.json").read_text())
    assert selection["best"] == best["run"] and selection["candidates"] == [row["run"] for row in private]
    assert selection["single_epsilon"] == pytest.approx(float(best["epsilon"]))
    assert selection["tuning_epsilon"] >= selection["single_epsilon"]
    assert selection["composition_epsilon"] >= selection["single_epsilon"]
    assert f"selected       `{best['run']}`" in stdout
    markdown = (directory / "report.md").read_text()
    assert "Papernot & Steinke" in markdown and "truncated negative binomial" in markdown and "Poisson" in markdown
    assert "fixed grid" in markdown


def test_a_report_without_select_removes_the_selection_an_earlier_report_left(report, tmp_path):
    from dptrain.report.build import build_report

    directory, _ = report
    copy = tmp_path / "sweep"
    shutil.copytree(directory, copy)
    assert (copy / "selection.json").exists()
    build_report(copy)
    assert not (copy / "selection.json").exists()
    assert all((copy / name).exists() for name in FIGURES)


def test_run_interrupted_midway_is_listed_as_incomplete_and_the_others_are_reported(sweep, tmp_path):
    directory, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(directory, copy)
    for name in ("metrics.json", "audit.json", "manifest.json"):
        (copy / "1" / name).unlink()
    out = tmp_path / "report"
    result = dptrain("report", str(copy), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["run"]: row for row in read_csv(out / "report.csv")}
    assert len(rows) == 3
    assert rows["1"]["status"] == "incomplete" and rows["1"]["test_accuracy"] == ""
    assert rows["1"]["missing"] == "metrics.json, audit.json, manifest.json"
    for run in ("0", "2"):
        assert rows[run]["status"] == "complete" and float(rows[run]["test_accuracy"]) > 0
    assert "`1`: no metrics.json, audit.json, manifest.json" in (out / "report.md").read_text()
    assert "2 complete, 1 incomplete" in result.stdout
    assert all((out / name).read_bytes()[:8] == PNG_SIGNATURE for name in FIGURES)


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "no runs"])
def test_empty_or_wrong_directory_fails_with_one_line(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("not a directory")
    elif kind == "no runs":
        (target / "outputs").mkdir(parents=True)
        (target / "outputs" / "notes.txt").write_text("no run here")
    result = dptrain("report", str(target), cwd=tmp_path)
    assert str(target) in one_error_line(result)
    assert not (tmp_path / "target" / "report.csv").exists()


def test_select_of_an_unknown_metric_fails_with_one_line_before_writing(report, tmp_path):
    directory, _ = report
    result = dptrain("report", str(directory), "--select", "accuracy", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "test_accuracy" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_hparams_record_carries_the_runs_overrides(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    directory, _ = sweep
    events = EventAccumulator(str(directory / "0" / "tb" / "hparams"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    # Its overrides (privacy.target_epsilon=1 train.epochs=2 train.progress=false audit=fast) but those that
    # leave the training recipe as it is, each a column, and the keys every record carries.
    assert set(hparams) == {"privacy.target_epsilon", "train.epochs", "audit", "model.name", "dataset.name"}
    assert hparams["privacy.target_epsilon"].number_value == 1.0 and hparams["train.epochs"].number_value == 2
    assert hparams["audit"].string_value == "fast" and hparams["model.name"].string_value == "logreg"
    assert "trial/accuracy/test" in events.Tags()["scalars"]


def compose_with_hydra(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_experiment_recipes_are_sweeps_of_the_documented_size():
    epsilon = compose_with_hydra("experiment=epsilon_sweep")
    assert str(epsilon.hydra.mode) == "RunMode.MULTIRUN" and sweep_jobs(epsilon) == 6
    matrix = compose_with_hydra("experiment=robustness_matrix")
    assert matrix.federation.name == "fedavg" and matrix.attack.byzantine == 4 and sweep_jobs(matrix) == 96
    # Every attack of the sweep, private or not, is a run dptrain accepts (attack=none with Byzantine
    # clients is refused, so the no-attack reference is its own sweep).
    for attack in str(matrix.hydra.sweeper.params.attack).split(","):
        for epsilon in str(matrix.hydra.sweeper.params["privacy.target_epsilon"]).split(","):
            validate(compose_with_hydra("experiment=robustness_matrix", f"attack={attack}", f"privacy.target_epsilon={epsilon}"))
    validate(compose_with_hydra("experiment=robustness_matrix", "attack=none", "attack.byzantine=0"))


def test_sweep_size_counts_params_and_command_line_as_the_basic_sweeper_does():
    def config(params, task):
        sweeper = {"_target_": BASIC_SWEEPER, "params": params}
        return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})

    params = {"privacy.target_epsilon": "0.5,1,2,4,8,inf"}
    assert sweep_jobs(config(params, ["model=logreg,mlp", "train.epochs=2"])) == 12
    assert sweep_jobs(config(params, ["privacy.target_epsilon=1,2"])) == 2
    assert sweep_jobs(config({}, ["train.lr=interval(0.1,1)"])) is None
    # glob() needs the config groups to expand: unknown here, and never a traceback.
    assert sweep_jobs(config({}, ["model=glob(logreg)", "train.lr=1,2"])) is None


def test_a_run_trained_without_audit_but_audited_later_reports_its_audit(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("audit:\n  name: none\n")
    for name in ("metrics.json", "manifest.json"):
        (tmp_path / name).write_text("{}")
    assert read_run(tmp_path, "run").complete and read_run(tmp_path, "run").audit is None
    audit = make_audit_report(history_file="audits/20250101T000000.000Z-fast.json")
    (tmp_path / "audit.json").write_text(json.dumps(audit.to_dict()))
    assert read_run(tmp_path, "run").audit == audit
    (tmp_path / "metrics.json").write_text("{trunc")
    assert read_run(tmp_path, "run").missing == ["metrics.json (unreadable)"]


def test_overrides_differ_when_values_differ_or_a_run_leaves_the_default():
    runs = [
        RunRecord(Path(str(i)), str(i), overrides, None, None)
        for i, overrides in enumerate(
            [["privacy.target_epsilon=1", "audit=fast"], ["privacy.target_epsilon=2", "audit=fast", "model=mlp"]]
        )
    ]
    assert differing_overrides(runs) == ["privacy.target_epsilon", "model"]


@pytest.mark.parametrize("eta", [0, 0.5, 1])
def test_truncated_negative_binomial_has_the_requested_mean_and_miss_probability(eta):
    from scipy.special import gammaln

    m = 5
    gamma = negative_binomial_gamma(eta, m)
    k = np.arange(1, 20000)
    if eta == 0:
        pmf = (1 - gamma) ** k / (k * math.log(1 / gamma))
    else:
        pmf = np.exp(k * math.log(1 - gamma) + gammaln(k + eta) - gammaln(eta) - gammaln(k + 1)) / (gamma**-eta - 1)
    curves = np.stack([rdp_curve(Mechanism(1.0, 0.1, 100))] * m)
    bound = truncated_negative_binomial_bound(curves, 1e-5, eta=eta, expected_trials=m)
    assert pmf.sum() == pytest.approx(1.0) and (k * pmf).sum() == pytest.approx(m)
    assert bound.miss_probability == pytest.approx((pmf * (1 - 1 / m) ** k).sum())


def test_composition_of_identical_runs_is_one_run_of_their_total_steps():
    one = rdp_curve(Mechanism(1.1, 0.2, 30))
    assert composition_epsilon(np.stack([one] * 4), 1e-5) == pytest.approx(
        epsilon_from_rdp(rdp_curve(Mechanism(1.1, 0.2, 120)), 1e-5)
    )


def test_tuning_bounds_of_the_default_job_are_the_ones_the_readme_shows():
    # The default job: sigma 2.646, 75 steps at q = 0.2; five candidates at delta 1e-5.
    curve = rdp_curve(Mechanism(2.646484375, 0.2, 75))
    curves = np.stack([curve] * 5)
    assert delta_from_rdp(curve, epsilon_from_rdp(curve, 1e-5)) == pytest.approx(1e-5, rel=1e-9)
    assert composition_epsilon(curves, 1e-5) == pytest.approx(7.90, abs=0.005)
    bounds = {bound.distribution.split("(")[-1].rstrip(")"): bound for bound in random_stopping_bounds(curves, 1e-5)}
    assert bounds["geometric"].epsilon == pytest.approx(5.54, abs=0.005)
    assert bounds["logarithmic"].epsilon == pytest.approx(4.90, abs=0.005)
    assert bounds["Poisson"].epsilon == pytest.approx(5.22, abs=0.005)
    # K ~ Poisson(m) never draws one given candidate with probability E[(1 - 1/m)^K] = exp(-1).
    assert bounds["Poisson"].miss_probability == pytest.approx(math.exp(-1))


def test_a_federated_runs_rdp_curve_is_the_maximum_over_its_honest_clients():
    from dptrain.report.selection import run_rdp_curve

    few_steps, many_steps = Mechanism(1.0, 0.1, 50), Mechanism(1.5, 0.1, 400)
    reported = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 50}
    metrics = {**reported, "client_mechanisms": [reported, None, {"noise_multiplier": 1.5, "sample_rate": 0.1, "steps": 400}]}
    curves = np.stack([rdp_curve(few_steps), rdp_curve(many_steps)])
    # Neither client's curve lies above the other's at every order.
    assert (curves[0] > curves[1]).any() and (curves[1] > curves[0]).any()
    assert np.array_equal(run_rdp_curve(metrics), curves.max(axis=0))
    assert np.array_equal(run_rdp_curve(reported), curves[0])


def test_tuning_costs_more_than_the_best_single_run_and_less_than_composing_many():
    curves = np.stack([rdp_curve(Mechanism(1.0, 0.1, 100))] * 50)
    single = epsilon_from_rdp(curves[0], 1e-5)
    composed = composition_epsilon(curves, 1e-5)
    for bound in random_stopping_bounds(curves, 1e-5):
        assert single < bound.epsilon < composed, bound


@pytest.mark.slow
def test_joblib_launcher_runs_the_sweep_in_parallel_with_progress(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    result = dptrain(
        "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "privacy.target_epsilon=1,inf", *TINY,
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert all((sweep / run / "manifest.json").is_file() for run in ("0", "1"))
    assert "sweep job 2 of 2" in result.stdout + result.stderr


def test_notebook_executes_on_the_report(report, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    directory, _ = report
    monkeypatch.setenv("DPTRAIN_REPORT", str(directory / "report.csv"))
    notebook = nbformat.read(ROOT / "notebooks" / "privacy_sweep.ipynb", as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2
    assert "3 complete runs" in "".join(output.get("text", "") for output in outputs)
