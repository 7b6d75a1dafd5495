"""TensorBoard as a person meets it, read back with TensorBoard's own code: the training curves in a
custom-scalars layout, no one-point charts among them, the score histograms overlaid per attack, and an
HParams table whose columns are what a sweep varied and whose metrics are the latest audit's."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from dptrain import pipeline
from dptrain.tracking.figures import score_histograms, score_histograms_image
from dptrain.tracking.tensorboard import training_layout

TARGETS = ("1", "inf")


def _overrides(target: str) -> list[str]:
    return [f"privacy.target_epsilon={target}", "train.epochs=2", "train.progress=false", "audit=fast"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two runs as ``dptrain train -m privacy.target_epsilon=1,inf ...`` makes them: each knows only its
    own overrides, recorded in ``.hydra/overrides.yaml`` as Hydra does."""
    from conftest import make_config

    root = tmp_path_factory.mktemp("sweep")
    metrics = {}
    for job, target in enumerate(TARGETS):
        run_dir = root / str(job)
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(_overrides(target)), run_dir / ".hydra" / "overrides.yaml")
        metrics[str(job)] = pipeline.train(make_config(*_overrides(target)), run_dir)[0].to_dict()
    return root, metrics


def hparams_dashboard(logdir) -> tuple:
    """What the HParams dashboard shows for ``logdir``, from the plugin's own request handlers:
    the experiment (columns) and the session groups (rows with their metric values)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider))
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(request_context, backend, "", api_pb2.GetExperimentRequest()).run()
    columns = [api_pb2.ColParams(hparam=h.name) for h in experiment.hparam_infos]
    columns += [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos]
    request = api_pb2.ListSessionGroupsRequest(
        col_params=columns, start_index=0, slice_size=100, allowed_statuses=api_pb2.Status.values()
    )
    groups = list_session_groups.Handler(request_context, backend, "", request).run().session_groups
    rows = {g.name: {m.name.tag: (m.value, m.training_step) for m in g.metric_values} for g in groups}
    return experiment, rows


def _events(path) -> EventAccumulator:
    events = EventAccumulator(str(path), size_guidance={"tensors": 0})
    events.Reload()
    return events


def test_training_curves_open_the_custom_scalars_tab_and_every_chart_has_its_curves(sweep):
    events = _events(sweep[0] / "0" / "tb")
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    assert [category.title for category in layout.category] == ["training", "privacy"]
    scalars = events.Tags()["scalars"]
    for category in layout.category:
        for chart in category.chart:
            # Custom scalars match each regex from the start of the tag, as re.match does.
            assert all(any(re.match(r, tag) for tag in scalars) for r in chart.multiline.tag), chart.title
    accuracy = layout.category[0].chart[0]
    assert [t for t in scalars if any(re.match(r, t) for r in accuracy.multiline.tag)] == ["train/accuracy", "test/accuracy"]
    # The baseline spends no epsilon: it gets no empty "epsilon spent" chart.
    (config,) = _events(sweep[0] / "1" / "tb").Tensors("custom_scalars__config__")
    privacy = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0]).category[1]
    assert [chart.title for chart in privacy.chart] == ["noise multiplier"]


def test_a_federated_run_gets_the_federation_curves_first():
    titles = list(training_layout(federated=True))
    assert titles == ["federation", "privacy"]
    charts = training_layout(federated=True)["federation"].values()
    assert any(r == "fed/update_norm/byzantine$" for _, regexes in charts for r in regexes)


def test_a_run_has_no_one_point_charts_and_its_final_numbers_are_in_its_hparams_run(sweep):
    root, metrics = sweep
    training = _events(root / "0" / "tb")
    for tag in training.Tags()["scalars"]:
        # One point per epoch (two epochs): a single number would be a one-point chart.
        assert len(training.Scalars(tag)) == 2, tag
    final = _events(root / "0" / "tb" / "hparams")
    assert all(tag.startswith("trial/") for tag in final.Tags()["scalars"])
    assert final.Scalars("trial/accuracy/test")[0].value == pytest.approx(metrics["0"]["test_accuracy"])


def test_hparams_table_opens_on_what_the_sweep_varied_with_the_final_metrics(sweep):
    root, metrics = sweep
    experiment, rows = hparams_dashboard(root)
    # The dashboard shows the first five columns: the varied key first, then the other overrides and the
    # few always-useful keys; train.progress (not part of the training recipe) is left out.
    names = [(h.name, h.differs) for h in experiment.hparam_infos]
    assert names[0] == ("privacy.target_epsilon", True)
    assert sorted(names[1:]) == [
        ("audit", False), ("dataset.name", False), ("model.name", False), ("train.epochs", False)
    ]
    # Metric columns are the final numbers only, not the training curves' last points.
    assert {m.name.tag for m in experiment.metric_infos} == {
        "trial/accuracy/test", "trial/accuracy/train", "trial/epsilon",
        "trial/mia/loss/auc", "trial/mia/loss/tpr@1%", "trial/mia/loss/eps_lb",
    }
    assert set(rows) == {"0/tb/hparams", "1/tb/hparams"}
    private, baseline = rows["0/tb/hparams"], rows["1/tb/hparams"]
    assert private["trial/epsilon"][0] == pytest.approx(metrics["0"]["epsilon"])
    # The baseline has no epsilon: its cell stays empty rather than holding an infinity JSON cannot carry.
    assert "trial/epsilon" not in baseline
    assert baseline["trial/accuracy/test"][0] == pytest.approx(metrics["1"]["test_accuracy"])


def test_a_reaudit_brings_the_hparams_metrics_to_the_latest_audit(sweep, tmp_path):
    from conftest import make_config

    root, _ = sweep
    run_dir = shutil.copytree(root / "0", tmp_path / "0")
    cfg = make_config(*_overrides(TARGETS[0]))
    report = pipeline.audit(cfg, run_dir, make_config("audit=standard", "audit.mia.reference_models=1").audit)
    experiment, rows = hparams_dashboard(tmp_path)
    assert "trial/mia/rmia/auc" in {m.name.tag for m in experiment.metric_infos}
    row = rows["0/tb/hparams"]
    # The second audit's numbers, at step 2.
    assert row["trial/mia/rmia/auc"] == (pytest.approx(report.mia["rmia"].auc), 2)
    assert row["trial/mia/loss/auc"] == (pytest.approx(report.mia["loss"].auc), 2)
    events = _events(run_dir / "tb")
    assert [image.step for image in events.Images("audit/scores")] == [1, 2]
    # A third audit without RMIA: its RMIA cells say "not measured", not the second audit's numbers.
    pipeline.audit(cfg, run_dir, make_config("audit=fast").audit)
    row = hparams_dashboard(tmp_path)[1]["0/tb/hparams"]
    assert np.isnan(row["trial/mia/rmia/auc"][0]) and row["trial/mia/rmia/auc"][1] == 3


def test_score_histograms_share_their_bins_and_count_every_record_outliers_included():
    rng = np.random.default_rng(0)
    members, non_members = np.r_[rng.normal(1, 1, 99), 1e6], np.r_[rng.normal(0, 1, 79), -1e6]
    edges, member_counts, nonmember_counts = score_histograms(members, non_members, bins=40)
    assert len(edges) == 41 and np.all(np.diff(edges) > 0)
    # The bins span the central 98% of the pooled scores, not the two outliers.
    assert edges[0] == pytest.approx(np.quantile(np.r_[members, non_members], 0.01))
    assert member_counts.sum() == 100 and nonmember_counts.sum() == 80
    assert member_counts[-1] >= 1 and nonmember_counts[0] >= 1
    np.testing.assert_array_equal(member_counts, np.histogram(np.clip(members, edges[0], edges[-1]), edges)[0])


def test_score_histogram_image_has_one_panel_per_attack_one_under_the_other():
    from dptrain.tracking.figures import MEMBERS, NON_MEMBER_FILL, PANEL

    rng = np.random.default_rng(1)
    scores = {name: (rng.normal(1, 1, 100), rng.normal(0, 1, 100)) for name in ("loss", "rmia", "lira_online")}
    pixels = np.asarray(score_histograms_image(scores, bins=40))
    assert pixels.shape == (3 * PANEL[1], PANEL[0], 3)
    for row in range(3):
        panel = pixels[row * PANEL[1]:(row + 1) * PANEL[1]]
        for colour in (MEMBERS, NON_MEMBER_FILL):
            assert (panel == colour).all(axis=-1).any()


def test_roc_image_draws_each_curve_as_steps_holding_its_tpr_until_the_next_fpr():
    from dptrain.tracking.figures import CYCLE, ROC_INSETS, ROC_SIZE, roc_image

    pixels = np.asarray(roc_image({"loss": ([0.0, 0.01, 1.0], [0.0, 0.5, 1.0])}, floor=1e-3))
    assert pixels.shape == (ROC_SIZE, ROC_SIZE, 3)
    left, top, right, bottom = ROC_INSETS[0], ROC_INSETS[1], ROC_SIZE - ROC_INSETS[2], ROC_SIZE - ROC_INSETS[3]

    def pixel(fpr, tpr):
        # Three decades from 1e-3 to 1 on both log axes.
        x = round(left + (right - left) * (1 + np.log10(fpr) / 3))
        y = round(bottom - (bottom - top) * (1 + np.log10(tpr) / 3))
        return tuple(pixels[y, x])

    loss = CYCLE[0]
    # TPR 1/2 holds from FPR 0.01 to 1 (no interpolation towards (1, 1)); the rise to it is at FPR 0.01.
    assert pixel(0.1, 0.5) == loss and pixel(0.5, 0.5) == loss and pixel(0.01, 0.05) == loss
    assert pixel(0.1, 0.7) != loss and pixel(0.003, 0.05) != loss


def test_the_membership_panels_are_drawn_without_importing_matplotlib():
    # matplotlib's import costs about half a second, more than a fast audit of the default job.
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from dptrain.tracking.figures import roc_image, score_histograms_image\n"
        "roc_image({'loss': (np.array([0, 0.5, 1]), np.array([0, 0.8, 1]))}, floor=1e-3)\n"
        "score_histograms_image({'loss': (np.arange(10.0), np.arange(10.0) - 2)}, bins=5)\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_histogram_ticks_are_evenly_spaced_round_numbers_covering_the_range_in_at_most_four_steps():
    from dptrain.tracking.figures import _ticks

    assert np.allclose(_ticks(-2.3, 3.1), [-4, -2, 0, 2, 4]) and np.allclose(_ticks(0.01, 0.79), [0, 0.2, 0.4, 0.6, 0.8])
    rng = np.random.default_rng(2)
    for low, high in (sorted(rng.normal(0, 10 ** rng.uniform(-3, 3), 2)) for _ in range(500)):
        ticks = _ticks(low, high)
        steps = np.diff(ticks)
        mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]) + 1e-9)
        assert ticks[0] <= low and ticks[-1] >= high and len(ticks) <= 5
        assert np.allclose(steps, steps[0]) and np.isclose(mantissa, [1, 2, 2.5, 5]).any()
