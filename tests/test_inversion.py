"""The model inversion audit: MI-Face's gradient step against a hand computation on a linear model, the
total variation, the scoring against hand-placed records, audit.json, the summary and the report,
the TensorBoard grid, one tiny run end to end, and the refused settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dptrain.audit.inversion import invert, inversion_scores, total_variation
from dptrain.audit.results import AuditReport, InversionAudit
from dptrain.data.dataset import InputUnits
from dptrain.errors import UserError
from dptrain.validation import validate

# Three classes over four pixels (one 1 x 2 x 2 image): w_0 - mean(w) = (2/3, -1/3, -1/3, 1/3).
WEIGHTS = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -1]])


def _linear(scale: float, low: float) -> tuple[nn.Module, InputUnits]:
    """A softmax regression whose logits are all 0 at the grey image (pixels 0.5) in features
    ``low + scale * pixels``, so that its probabilities there are uniform."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    grey = torch.full((4,), low + scale * 0.5)
    with torch.no_grad():
        model[1].weight.copy_(WEIGHTS)
        model[1].bias.copy_(-WEIGHTS @ grey)
    shape = (1, 2, 2)
    units = InputUnits(scale=torch.full(shape, scale), low=torch.full(shape, low), high=torch.full(shape, low + scale))
    return model, units


@pytest.mark.parametrize(
    ("cost", "scale", "factor"),
    [
        ("log_softmax", 1.0, 1.0),  # -d log p_0 / dx = -(w_0 - sum_k p_k w_k), p uniform
        ("mi_face", 1.0, 1 / 3),  # -d p_0 / dx = -p_0 (w_0 - sum_k p_k w_k), p_0 = 1/3
        ("log_softmax", 2.0, 2.0),  # features = low + 2 * pixels: the pixel gradient doubles
    ],
)
def test_one_step_moves_the_grey_image_along_w_c_minus_the_mean_weight(cost, scale, factor):
    model, units = _linear(scale, low=-1.0)
    prior = torch.full((1, 2, 2), 0.5)
    step = invert(model, [0], prior, units, steps=1, lr=0.1, tv_weight=0.0, l2_weight=0.0, cost=cost)
    by_hand = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3])
    assert torch.allclose(step.flatten(), 0.5 + 0.1 * factor * by_hand, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_a_large_step_is_clamped_to_valid_pixels_and_each_class_moves_along_its_own_weights():
    model, units = _linear(1.0, low=0.0)
    prior = torch.full((1, 2, 2), 0.5)
    steps = invert(model, [0, 2], prior, units, steps=1, lr=100.0, tv_weight=0.0, l2_weight=0.0, cost="log_softmax")
    # Class 2: w_2 - mean(w) = (-1/3, -1/3, 2/3, -2/3).
    assert steps.flatten(1).tolist() == [[1, 0, 0, 1], [0, 0, 1, 0]]


def test_total_variation_and_the_l2_prior_enter_the_steps_with_their_weights():
    image = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert total_variation(image).tolist() == [2.0]  # |1 - 0| down the left column + |1 - 0| along the top row
    model, units = _linear(1.0, low=0.0)
    with torch.no_grad():
        model[1].weight.zero_()  # no class signal: only the regularizers move the image
    args = dict(units=units, lr=0.1, cost="log_softmax")
    once = invert(model, [0], image[0], steps=1, tv_weight=1.0, l2_weight=1.0, **args)
    # d TV / d pixel at the start: top-left -2, top-right and bottom-left +1, bottom-right 0 (sign(0) = 0);
    # the L2 term's gradient 2 (x - prior) is 0 there.
    assert torch.allclose(once.flatten(), torch.tensor([0.2, 0.9, 0.9, 1.0]))
    # Second step: d TV = (-2, 0, 0, 2), d L2 = 2 (x - prior) = (0.4, -0.2, -0.2, 0).
    twice = invert(model, [0], image[0], steps=2, tv_weight=1.0, l2_weight=1.0, **args)
    assert torch.allclose(twice.flatten(), torch.tensor([0.36, 0.92, 0.92, 0.8]))
    without_l2 = invert(model, [0], image[0], steps=2, tv_weight=1.0, l2_weight=0.0, **args)
    assert torch.allclose(without_l2.flatten(), torch.tensor([0.4, 0.9, 0.9, 0.8]))


# Hand-placed records (2 pixels each). Class 0: members (0, 0) and (4, 0), mean (2, 0); non-member (0, 3).
# Class 1: member (10, 10); non-member (11, 10).
MEMBERS = torch.tensor([[0.0, 0.0], [4.0, 0.0], [10.0, 10.0]])
MEMBER_LABELS = torch.tensor([0, 0, 1])
NON_MEMBERS = torch.tensor([[0.0, 3.0], [11.0, 10.0]])
NONMEMBER_LABELS = torch.tensor([0, 1])


def test_a_reconstruction_equal_to_a_member_leaks_and_one_equal_to_the_class_mean_does_not():
    # Rows: a copy of member (4, 0); the class-0 mean (2, 0); a copy of class 1's non-member.
    reconstructions = torch.tensor([[4.0, 0.0], [2.0, 0.0], [11.0, 10.0]])
    audit, means, nearest = inversion_scores(
        reconstructions, [0, 0, 1], MEMBERS, MEMBER_LABELS, NON_MEMBERS, NONMEMBER_LABELS, "mean"
    )
    assert audit.member_distance == [0.0, 2.0, 1.0]
    assert audit.nonmember_distance == pytest.approx([5.0, math.sqrt(13), 0.0])
    assert audit.mean_distance == [2.0, 0.0, 1.0]
    # Only the copy of a member is a leak; the class mean is nearer a member than the non-member but is the mean.
    assert audit.leak_rate == pytest.approx(1 / 3) and audit.nearest_member_rate == pytest.approx(2 / 3)
    assert audit.chance == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert (audit.members, audit.non_members) == (3, 2)
    assert means.tolist() == [[2.0, 0.0], [2.0, 0.0], [10.0, 10.0]]
    assert nearest.tolist() == [[4.0, 0.0], [0.0, 0.0], [10.0, 10.0]]


def test_scoring_refuses_a_class_without_non_members():
    with pytest.raises(ValueError, match="class 1 has 1 members and 0 non-members"):
        inversion_scores(torch.zeros(1, 2), [1], MEMBERS, MEMBER_LABELS, NON_MEMBERS[:1], NONMEMBER_LABELS[:1], "mean")


SECTION = InversionAudit(
    classes=[0, 1], member_distance=[1.0, 2.0], nonmember_distance=[3.0, 1.0], mean_distance=[2.0, 4.0],
    leak_rate=0.5, nearest_member_rate=0.5, chance=0.5, prior="mean", members=10, non_members=10,
)  # fmt: skip


def test_audit_json_carries_the_inversion_audit_and_reads_it_back():
    from conftest import make_audit_report

    written = make_audit_report(inversion=SECTION).to_dict()
    assert written["inversion"]["member_distance"] == [1.0, 2.0] and written["inversion"]["leak_rate"] == 0.5
    assert AuditReport.from_dict(written).inversion == SECTION
    off = make_audit_report().to_dict()
    del off["inversion"]  # an audit.json written before the inversion audit existed
    assert AuditReport.from_dict(off).inversion is None


def test_the_summary_the_headline_metrics_and_the_report_carry_the_leak_rate():
    from conftest import make_audit_report

    from dptrain.report.table import threat_columns
    from dptrain.views.panels import headline_metrics
    from dptrain.views.summary import format_audit

    report = make_audit_report(inversion=SECTION)
    text = format_audit(report)
    assert "inversion    leak rate 0.50 of 2 classes, nearest record a member 0.50 (chance 0.50)" in text
    assert "to nearest member 1.50, non-member 2.00, class mean 3.00" in text
    assert headline_metrics(report)["inversion/leak_rate"] == 0.5
    assert threat_columns(report) == {"inversion.leak_rate": 0.5, "inversion.nearest_member_rate": 0.5}
    assert "inversion" not in format_audit(make_audit_report()) and threat_columns(make_audit_report()) == {}


def test_the_grid_puts_each_image_in_its_cell():
    from dptrain.tracking.figures import (
        INVERSION_CELL,
        INVERSION_GAP,
        INVERSION_HEADER,
        INVERSION_LABELS,
        inversion_grid_image,
    )

    white, black = np.ones((1, 8, 8)), np.zeros((1, 8, 8))
    image = inversion_grid_image({"class 0": (white, black, white), "class 1": (black, white, black)})
    step = INVERSION_CELL + INVERSION_GAP
    assert image.size == (INVERSION_LABELS + 3 * step, INVERSION_HEADER + 2 * step)
    half = INVERSION_CELL // 2
    centre = [
        (INVERSION_LABELS + step * column + half, INVERSION_HEADER + step * row + half)
        for row in range(2)
        for column in range(3)
    ]
    assert [image.getpixel(p) for p in centre] == [(255,) * 3, (0,) * 3, (255,) * 3, (0,) * 3, (255,) * 3, (0,) * 3]


def test_draw_audit_logs_the_grid_beside_the_text(tmp_path):
    from conftest import make_audit_report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dptrain.audit.inversion import InversionImages
    from dptrain.tracking.tensorboard import TensorBoardLog
    from dptrain.views.panels import draw_audit

    images = InversionImages(*(torch.rand(2, 1, 8, 8) for _ in range(3)))
    tb = TensorBoardLog(tmp_path)
    draw_audit(tb, make_audit_report(inversion=SECTION), {}, step=1, inversion_images=images)
    tb.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    (grid,) = events.Images("audit/inversion")
    assert (grid.step, grid.height) == (1, 22 + 2 * (88 + 4))  # a header and one row per class


@pytest.mark.slow
def test_a_tiny_run_writes_the_inversion_audit_and_its_grid(tmp_path, tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dptrain import pipeline

    cfg = tiny_config(
        "audit=fast", "audit.mia.attacks=[]", "audit.aia.enabled=false", "audit.inversion.enabled=true",
        "audit.inversion.steps=3", "audit.inversion.classes=[1,7]", "audit.inversion.prior=noise",
    )  # fmt: skip
    _, report = pipeline.train(cfg, tmp_path)
    section = report.inversion
    assert section.classes == [1, 7] and section.prior == "noise"
    assert section.members == report.members and section.non_members == report.non_members
    assert all(d >= 0 for d in (*section.member_distance, *section.nonmember_distance, *section.mean_distance))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "audit/inversion" in events.Tags()["images"]


def test_the_inversion_audit_is_off_at_every_level():
    from conftest import make_config

    for level in ("fast", "standard", "thorough"):
        assert not make_config(f"audit={level}").audit.inversion.enabled


def test_inversion_refuses_tables_unknown_options_and_classes_the_data_lacks_with_one_line():
    from conftest import make_config

    for overrides, message in [
        (("dataset=breast_cancer",), "dataset=breast_cancer is a table: .* use audit.aia.enabled=true"),
        (("audit.inversion.classes=[3,10]",), r"classes=\[3, 10\]: list distinct classes .* \(0 to 9\)"),
        (("audit.inversion.classes=[3,3]",), "list distinct classes"),
        (("audit.inversion.classes=[-1]",), "each entry must be at least 0"),
        (("audit.inversion.prior=blur",), "audit.inversion.prior=blur is unknown: choose one of mean, zeros, noise"),
        (("audit.inversion.cost=hinge",), "audit.inversion.cost=hinge is unknown"),
        (("audit.inversion.steps=0",), "audit.inversion.steps=0 must be at least 1"),
        (("audit.inversion.lr=0",), "audit.inversion.lr=0"),
        (("audit.inversion.tv_weight=-1",), "audit.inversion.tv_weight=-1"),
    ]:
        with pytest.raises(UserError, match=message) as refused:
            validate(make_config("audit.inversion.enabled=true", *overrides))
        assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_classes_without_an_audited_member_or_non_member_are_left_out_with_a_warning(tmp_path, tiny_config):
    from dptrain import pipeline

    cfg = tiny_config(
        "audit=fast", "audit.mia.attacks=[]", "audit.aia.enabled=false", "audit.inversion.enabled=true",
        "audit.inversion.steps=3", "dataset.max_members=4", "train.batch_size=2", "privacy.target_epsilon=inf",
    )  # fmt: skip
    _, report = pipeline.train(cfg, tmp_path)
    # 4 members and 4 non-members of 10 classes: here no class has both, so nothing is scored.
    assert report.inversion is None
    assert report.warnings == [
        "inversion: classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] have no audited member or non-member to score against; "
        "left out"
    ]
