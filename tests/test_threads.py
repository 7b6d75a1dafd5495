"""train.threads: a given count is honoured, auto races thread counts on timed steps (timings injected
here through a fake clock, not read from this machine's load), ranks and pools split the cores.
metrics.json's record of the choice is checked with its schema (test_training.py)."""

from __future__ import annotations

import pytest
import torch

from dptrain.audit.reference import reference_threads
from dptrain.errors import UserError
from dptrain.training import recipe, threads
from dptrain.training.threads import ThreadCalibration, candidates, choose_threads, core_share
from dptrain.validation import validate


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def racer(clock: FakeClock, seconds: dict[int, list[float]], ran: list[int] | None = None):
    """A ``race`` whose step at n threads advances ``clock`` by the next of ``seconds[n]`` (the last
    repeats); the untimed warm-up step costs nothing. ``ran`` collects each step's thread count."""
    taken = {count: 0 for count in seconds}

    def race(calibration: ThreadCalibration) -> None:
        batches = [(torch.zeros(4, 2), torch.zeros(4))] * 20
        for _ in calibration.paced(batches):
            count = torch.get_num_threads()
            if ran is not None:
                ran.append(count)
            if calibration.warmed:  # else the warm-up step, untimed
                steps = seconds[count]
                clock.now += steps[min(taken[count], len(steps) - 1)]
                taken[count] += 1

    return race


LONG = 10**6  # planned steps of a training long enough to race


def test_auto_picks_one_thread_when_one_is_faster_and_drops_two_after_one_step():
    clock = FakeClock()
    choice = choose_threads("auto", racer(clock, {1: [0.010], 2: [0.080]}), LONG, share=2, clock=clock)
    assert choice.threads == 1 and torch.get_num_threads() == 1
    # Two threads lost by more than MARGIN on its first step, so it ran no second one.
    assert choice.step_seconds == {"1": [0.010], "2": [0.080]}
    assert choice.record() == {"seconds": pytest.approx(0.090), "step_seconds": choice.step_seconds}


def test_auto_picks_more_threads_when_they_are_faster_after_every_round():
    clock = FakeClock()
    choice = choose_threads("auto", racer(clock, {1: [0.080], 2: [0.030]}), LONG, share=2, clock=clock)
    assert choice.threads == 2 and torch.get_num_threads() == 2
    assert choice.step_seconds == {
        "1": pytest.approx([0.080] * threads.ROUNDS), "2": pytest.approx([0.030] * threads.ROUNDS)
    }


def test_one_stalled_step_at_one_thread_does_not_send_the_run_to_more_threads():
    # What the loaded 2-core machine did: one step at one thread stalled (14 ms against 1.4 ms), one at
    # two happened to run fast, and the run then trained 19x slower at two threads.
    clock = FakeClock()
    seconds = {1: [0.014, 0.0014, 0.0014], 2: [0.0013, 0.35, 0.35]}
    assert choose_threads("auto", racer(clock, seconds), LONG, share=2, clock=clock).threads == 1


def test_a_short_training_never_runs_a_step_at_more_threads():
    clock, ran = FakeClock(), []
    # 1000 steps of 2 ms: 2 s at one thread, under WORTH_RACING_SECONDS.
    choice = choose_threads("auto", racer(clock, {1: [0.002], 2: [0.001]}, ran), 1000, share=2, clock=clock)
    assert choice.threads == 1 and ran == [1, 1]
    assert choice.step_seconds == {"1": [0.002], "2": []}


def test_a_given_count_is_set_without_a_race():
    def race(calibration):
        raise AssertionError("a given count raced")

    choice = choose_threads("3", race, LONG, share=2)
    assert choice.threads == 3 and torch.get_num_threads() == 3 and choice.record() is None


def test_one_core_is_not_raced():
    choice = choose_threads("auto", lambda calibration: pytest.fail("raced on one core"), LONG, share=1)
    assert choice.threads == 1 and choice.record() is None


def test_candidates_are_one_the_share_and_from_four_cores_their_geometric_middle():
    assert [candidates(1), candidates(2), candidates(3), candidates(16)] == [[1], [1, 2], [1, 3], [1, 4, 16]]


def test_ranks_and_pool_workers_split_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert core_share() == 8 and core_share(3) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert core_share() == 4 and core_share(2) == 2 and core_share(16) == 1
    # Reference models: the target's count, capped by each pool worker's share.
    assert reference_threads(1, workers=2) == 1 and reference_threads(4, workers=2) == 2
    assert reference_threads(3, workers=1) == 3 and reference_threads(None, workers=1) == 4


@pytest.mark.parametrize("setting", ["0", "two", "1.5"])
def test_a_bad_thread_count_is_refused_in_one_line(tiny_config, setting):
    with pytest.raises(UserError) as caught:
        validate(tiny_config(f"train.threads={setting}"))
    message = str(caught.value)
    assert f"train.threads={setting} must be auto or a whole number" in message and "\n" not in message


def _threads_in_training(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = recipe.train_epoch

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_epoch", recording)
    return seen


# A few non-private steps: 100 members at batch 50, two epochs, no accounting.
SMALL = ("dataset.max_members=100", "train.batch_size=50", "privacy.target_epsilon=inf")


def test_a_given_count_is_what_training_runs_at(tiny_config, monkeypatch):
    from dptrain.data import load, make_split, prepare

    # One core: auto would mean one thread, so two can only come from the setting.
    monkeypatch.setattr(threads, "usable_cores", lambda: 1)
    cfg = tiny_config("train.threads=2", *SMALL)
    validate(cfg)
    raw = load(cfg.dataset)
    data = prepare(raw, make_split(raw, cfg.dataset))
    seen = _threads_in_training(monkeypatch)
    trained = recipe.train_model(cfg, data.members, input_shape=data.input_shape, num_classes=data.num_classes)
    assert seen == [2, 2] and trained.threads.threads == 2 and trained.threads.record() is None
