"""Time one training step, non-private and under each grad-sample mode, interleaved, side by side.

    python scripts/bench_dp_step.py [--steps 20] [--threads 1] [--device cpu]

For dptrain's logistic regression on digits-shaped inputs (8x8, batch 128, the default job's) and the
MLP and CNN on MNIST-shaped ones (28x28, batch 256), on random data (only the shapes matter), prints
the median milliseconds per step of the non-private step and of each mode (hooks, functorch, ghost,
bk = book-keeping clipping, auto = the mode ``privacy.grad_sample_mode=auto`` picks, with its race's
one-off cost), and each one's ratio to the non-private step. Every repetition steps every mode once,
in an order rotated from one repetition to the next, so a change of load cannot favour one mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.utils.data import TensorDataset

from dptrain.config import ModelConfig, PrivacyConfig
from dptrain.models import build_model
from dptrain.privacy import PrivacyPlan, make_private
from dptrain.privacy.mode_race import MIN_STEPS_TO_RACE

# name -> (model, input shape, batch size)
MODELS = {
    "logreg": (ModelConfig(name="logreg"), (1, 8, 8), 128),
    "mlp": (ModelConfig(name="mlp", hidden=[512, 256], activation="tanh"), (1, 28, 28), 256),
    "cnn": (ModelConfig(name="cnn", channels=[16, 32], activation="tanh"), (1, 28, 28), 256),
}
MODES = ("non-private", "hooks", "functorch", "ghost", "bk", "auto")
CLASSES, WARMUP = 10, 3


def _plan(private: bool) -> PrivacyPlan:
    # Planned long enough that auto races, as it does for a run of that many steps.
    return PrivacyPlan(
        private=private,
        accountant="prv",
        delta=1e-5,
        target_epsilon=None,
        noise_multiplier=1.0 if private else 0.0,
        max_grad_norm=1.0 if private else None,
        sample_rate=1.0,
        steps_per_epoch=1,
        steps=MIN_STEPS_TO_RACE,
        planned_epsilon=None,
    )


def stepper(model_cfg: ModelConfig, shape: tuple, batch: int, mode: str, device: torch.device):
    """(one optimizer step on a fixed random batch, returning its seconds; the mode that runs; the
    seconds ``make_private`` took, the auto race included)."""
    torch.manual_seed(0)
    inputs = torch.randn(batch, *shape)
    labels = torch.randint(0, CLASSES, (batch,))
    model = build_model(model_cfg, shape, CLASSES).to(device)
    started = time.perf_counter()
    training = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=TensorDataset(inputs, labels),
        plan=_plan(mode != "non-private"),
        cfg=PrivacyConfig(grad_sample_mode="auto" if mode == "non-private" else mode),
        batch_size=batch,
        max_physical_batch_size=None,
        sampling_generator=torch.Generator(),
        noise_generator=torch.Generator(device=device),
    )
    setup = time.perf_counter() - started
    inputs, labels = inputs.to(device), labels.to(device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        training.optimizer.zero_grad(set_to_none=True)
        training.loss_fn(training.model(inputs), labels).backward()
        training.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    picked = mode if training.grad_sample is None else training.grad_sample.mode
    return step, picked, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions (after 3 warm-up ones)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} steps={args.steps}")
    print(f"{'model':6} {'batch':>5} {'mode':18} {'ms/step':>9} {'x non-private':>14}")
    for name in args.models:
        model_cfg, shape, batch = MODELS[name]
        steppers = {mode: stepper(model_cfg, shape, batch, mode, device) for mode in MODES}
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="Using a non-full backward hook")
            for repetition in range(WARMUP + args.steps):
                shift = repetition % len(MODES)
                for mode in MODES[shift:] + MODES[:shift]:
                    elapsed = steppers[mode][0]()
                    if repetition >= WARMUP:
                        seconds[mode].append(elapsed)
        medians = {mode: statistics.median(times) for mode, times in seconds.items()}
        for mode in MODES:
            label = f"auto ({steppers[mode][1]}, race {steppers[mode][2]:.2f} s)" if mode == "auto" else mode
            ratio = medians[mode] / medians["non-private"]
            print(f"{name:6} {batch:5d} {label:18} {medians[mode] * 1e3:9.2f} {ratio:14.2f}")


if __name__ == "__main__":
    main()
