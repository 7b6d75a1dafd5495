"""Time one training step, non-private and under each Opacus grad-sample mode, side by side.

    python scripts/bench_dp_step.py [--batch 256] [--steps 20] [--device cpu]

For the MLP and the CNN of dptrain's model zoo on MNIST-shaped inputs (random
data: only the shapes matter), prints the median milliseconds per step and its
ratio to the non-private step measured in the same run.
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

MODELS = {
    "mlp": ModelConfig(name="mlp", hidden=[512, 256], activation="tanh"),
    "cnn": ModelConfig(name="cnn", channels=[16, 32], activation="tanh"),
}
MODES = ("hooks", "functorch", "ghost")
INPUT_SHAPE, CLASSES = (1, 28, 28), 10


def _plan(batch: int, private: bool) -> PrivacyPlan:
    return PrivacyPlan(
        private=private,
        accountant="prv",
        delta=1e-5,
        target_epsilon=None,
        noise_multiplier=1.0 if private else 0.0,
        max_grad_norm=1.0 if private else None,
        sample_rate=1.0,
        steps_per_epoch=1,
        steps=1,
        planned_epsilon=None,
    )


def time_step(model_cfg: ModelConfig, mode: str | None, batch: int, steps: int, device: torch.device) -> float:
    """Median seconds of one optimizer step on a fixed batch (``mode=None``: non-private)."""
    torch.manual_seed(0)
    inputs = torch.randn(batch, *INPUT_SHAPE)
    labels = torch.randint(0, CLASSES, (batch,))
    model = build_model(model_cfg, INPUT_SHAPE, CLASSES).to(device)
    training = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=TensorDataset(inputs, labels),
        plan=_plan(batch, mode is not None),
        cfg=PrivacyConfig(grad_sample_mode=mode or "hooks", poisson_sampling=False),
        batch_size=batch,
        max_physical_batch_size=None,
        sampling_generator=torch.Generator(),
        noise_generator=torch.Generator(device=device),
    )
    inputs, labels = inputs.to(device), labels.to(device)
    durations = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for step in range(steps + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            training.optimizer.zero_grad(set_to_none=True)
            training.loss_fn(training.model(inputs), labels).backward()
            training.optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 3:  # the first steps warm up allocators and kernels
                durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} batch={args.batch} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'model':6} {'mode':11} {'ms/step':>9} {'x non-private':>14}")
    for name, model_cfg in MODELS.items():
        baseline = time_step(model_cfg, None, args.batch, args.steps, device)
        print(f"{name:6} {'non-private':11} {baseline * 1e3:9.2f} {1.0:14.2f}")
        for mode in MODES:
            seconds = time_step(model_cfg, mode, args.batch, args.steps, device)
            print(f"{name:6} {mode:11} {seconds * 1e3:9.2f} {seconds / baseline:14.2f}")


if __name__ == "__main__":
    main()
