"""Samples per second of DP-SGD data parallelism (Opacus DPDDP) on 1 and on several processes, side by side.

    python scripts/bench_distributed.py [--records 4096] [--batch-per-process 256] [--epochs 2] [--model convnet]

Every setting trains the same model on the same generated CIFAR-shaped data
(3 x 32 x 32, 10 classes) with DP-SGD at epsilon 3, ``batch-per-process``
records per process in each step (weak scaling: the global batch grows with
the processes, as it does when GPUs are added). It runs 1 and 2 CPU processes
(gloo) with the same share of the cores each (half of them: one rank per core
on a 2-core machine, as one rank per GPU), and where CUDA is available 1 GPU
and every GPU (nccl). Throughput is records seen per second of the training loop
(``train_seconds``: the epochs, without data generation or process start-up); scaling efficiency is
throughput(p) / (p * throughput(1)).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module
from torch.utils.data import TensorDataset

from dptrain.config import register_configs
from dptrain.training import launch
from dptrain.training.recipe import train_model

SHAPE, CLASSES = (3, 32, 32), 10


def _config(args, processes: int, device: str):
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"model={args.model}",
                f"train.batch_size={args.batch_per_process * processes}",
                f"train.epochs={args.epochs}",
                f"train.device={device}",
                f"launcher.nproc_per_node={processes}",
                "train.progress=false",
                "train.checkpoint=false",
                "audit=none",
            ],
        )


def _dataset(records: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(records, *SHAPE, generator=generator)
    return TensorDataset(inputs, torch.randint(0, CLASSES, (records,), generator=generator))


def _rank(rank: int, processes: int, port: int, args, device: str, threads: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(processes), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(threads)
    cfg = _config(args, processes, device)
    with launch.process_group(cfg.launcher.backend):
        trained = train_model(cfg, _dataset(args.records), input_shape=SHAPE, num_classes=CLASSES, data_parallel=True)
    if rank == 0:
        torch.save(trained.train_seconds, out)


def samples_per_second(args, processes: int, device: str) -> float:
    """Records per second of the training loop on ``processes`` ranks."""
    port = launch.free_port()
    threads = max(1, (os.cpu_count() or 1) // 2) if device == "cpu" else 1
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as directory:
        out = os.path.join(directory, "epochs.pt")
        mp.spawn(_rank, args=(processes, port, args, device, threads, out), nprocs=processes, join=True)
        return args.records * args.epochs / torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--batch-per-process", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed")
    parser.add_argument("--model", default="convnet")
    args = parser.parse_args()
    settings = [("cpu", 1), ("cpu", 2)]
    gpus = torch.cuda.device_count()
    if gpus:
        settings += [("cuda", 1)] + ([("cuda", gpus)] if gpus > 1 else [])
    else:
        print("no CUDA device: GPU settings not measured")
    print(f"{args.model}, {args.records} records of {SHAPE}, {args.batch_per_process} per process per step, DP-SGD eps 3")
    print(f"{'device':<8}{'processes':>10}{'samples/s':>12}{'speed-up':>10}{'efficiency':>12}")
    base: dict[str, float] = {}
    for device, processes in settings:
        rate = samples_per_second(args, processes, device)
        base.setdefault(device, rate)
        speedup = rate / base[device]
        print(f"{device:<8}{processes:>10}{rate:>12.1f}{speedup:>10.2f}{speedup / processes:>12.2f}")


if __name__ == "__main__":
    main()
