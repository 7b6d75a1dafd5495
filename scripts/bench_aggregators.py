"""Time dptrain's robust aggregators and NNM against ByzFL's and Flower's on the same inputs.

    python scripts/bench_aggregators.py [--quick] [--rules ...] [--threads 1] [--timeout 300]

For n in {10, 50, 100} and d in {1e5, 1e6} (``--quick``: n in {10, 50}, d in {1e4, 1e5}) and
f = floor((n - 3) / 4), the most Bulyan allows, every rule runs on the same seeded float32
(n, d) updates in each implementation that has it and is importable (``pip install
dptrain[compare]``). Each case runs in its own subprocess, so its peak RSS (ru_maxrss) is its own
and a timeout bounds the slow references; a case that exceeds the address-space limit reports
"oom". Each library gets its native input (Flower: a list of per-client NumPy arrays with example
counts of 1), converted outside the timed call. Times are the best of at least ``--repeats``
calls (and at least a second of them) after a first one, or that first call alone when it took
over 10 s. The speed-up is the faster reference's time over dptrain's; targets from the issue:
3x for Krum, Multi-Krum, Bulyan and NNM, 1.5x for median and trimmed mean.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

RULES = (
    "mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "bulyan", "centered_clipping", "nnm"
)
IMPLEMENTATIONS = ("dptrain", "byzfl", "flower")
SUPPORTED = {
    "dptrain": RULES,
    "byzfl": tuple(rule for rule in RULES if rule != "bulyan"),
    "flower": ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"),
}
TARGETS = {"krum": 3.0, "multi_krum": 3.0, "bulyan": 3.0, "nnm": 3.0, "median": 1.5, "trimmed_mean": 1.5}
# Centered clipping's radius in every implementation (it only changes which updates are clipped).
TAU = 10.0


@dataclass(frozen=True)
class TimedOut:
    """A case still running after ``--timeout`` seconds: its time is at least ``seconds``."""

    seconds: float

    def __str__(self) -> str:
        return f">{self.seconds:.0f}s"


# One case's outcome: run_case's numbers, a timeout, or why there is no number ("oom", "error: ...").
Result = dict[str, Any] | TimedOut | str


def _dptrain(rule: str, n: int, f: int) -> Callable[[Any], Any]:
    from dptrain import robust

    return {
        "mean": robust.mean,
        "median": robust.median,
        "trimmed_mean": lambda x: robust.trimmed_mean(x, f),
        "krum": lambda x: robust.krum(x, f),
        "multi_krum": lambda x: robust.multi_krum(x, f),
        "geometric_median": robust.geometric_median,
        "bulyan": lambda x: robust.bulyan(x, f),
        "centered_clipping": lambda x: robust.centered_clipping(x, torch.zeros_like(x[0]), TAU),
        "nnm": lambda x: robust.nnm(x, f),
    }[rule]


def _byzfl(rule: str, n: int, f: int) -> Callable[[Any], Any]:
    import byzfl

    # Fresh instances per call: ByzFL's CenteredClipping keeps its centre between calls.
    makers = {
        "mean": byzfl.Average,
        "median": byzfl.Median,
        "trimmed_mean": lambda: byzfl.TrMean(f),
        "krum": lambda: byzfl.Krum(f),
        "multi_krum": lambda: byzfl.MultiKrum(f),
        "geometric_median": byzfl.GeometricMedian,
        "centered_clipping": lambda: byzfl.CenteredClipping(tau=TAU),
        "nnm": lambda: byzfl.NNM(f),
    }
    return lambda x: makers[rule]()(x)


def _flower(rule: str, n: int, f: int) -> Callable[[Any], Any]:
    from flwr.server.strategy import aggregate as fl

    calls = {
        "mean": fl.aggregate,
        "median": fl.aggregate_median,
        "trimmed_mean": lambda results: fl.aggregate_trimmed_avg(results, f / n),
        "krum": lambda results: fl.aggregate_krum(results, f, 0),
        "multi_krum": lambda results: fl.aggregate_krum(results, f, n - f),
        # aggregate_bulyan pops from the list it is given.
        "bulyan": lambda results: fl.aggregate_bulyan(list(results), f, fl.aggregate_krum, to_keep=0),
    }
    return calls[rule]


def _inputs(implementation: str, updates):
    if implementation == "flower":
        return [([row.numpy()], 1) for row in updates]
    return updates


def run_case(
    implementation: str, rule: str, n: int, d: int, f: int, repeats: int, threads: int | None
) -> dict[str, Any]:
    """Child side: time one case and report seconds and memory as JSON."""
    if threads is not None:
        torch.set_num_threads(threads)

    aggregate = {"dptrain": _dptrain, "byzfl": _byzfl, "flower": _flower}[implementation](rule, n, f)
    updates = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    inputs = _inputs(implementation, updates)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    aggregate(inputs)
    seconds = time.perf_counter() - start
    if seconds < 10:
        # The minimum over at least a second of calls: small cases are at the mercy of the
        # scheduler on a shared 2-core machine.
        times: list[float] = []
        while len(times) < repeats or (sum(times) < 1.0 and len(times) < 100):
            start = time.perf_counter()
            aggregate(inputs)
            times.append(time.perf_counter() - start)
        seconds = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_gib": peak / 2**20, "input_gib": before / 2**20}


def _available(implementation: str) -> bool:
    module = {"dptrain": "dptrain.robust", "byzfl": "byzfl", "flower": "flwr.server.strategy.aggregate"}[implementation]
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def _last_line(text: str, fallback: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else fallback


def spawn(implementation: str, rule: str, n: int, d: int, f: int, args: argparse.Namespace) -> Result:
    """Parent side: run one case in a fresh interpreter."""
    command = [sys.executable, __file__, "--case", implementation, rule, str(n), str(d), str(f)]
    command += ["--repeats", str(args.repeats), "--memory-limit-gib", str(args.memory_limit_gib)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return TimedOut(args.timeout)
    if done.returncode != 0:
        if "can't allocate memory" in done.stderr or "MemoryError" in done.stderr:
            return "oom"
        return f"error: {_last_line(done.stderr, f'exit {done.returncode}')}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _seconds(result: Result | None) -> str:
    if result is None:
        return "-"
    return f"{result['seconds']:.3f}" if isinstance(result, dict) else str(result)


def _speedup(ours: Result | None, references: list[Result | None]) -> tuple[str, float | None]:
    """Faster reference over ours; references that timed out give a lower bound. None without our time."""
    if not isinstance(ours, dict):
        return "-", None
    measured = [r["seconds"] for r in references if isinstance(r, dict)]
    if measured:
        ratio = min(measured) / ours["seconds"]
        return f"{ratio:.1f}x", ratio
    timeouts = [r.seconds for r in references if isinstance(r, TimedOut)]
    if timeouts:
        ratio = min(timeouts) / ours["seconds"]
        return f">{ratio:.0f}x", ratio
    return "-", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n in {10, 50}, d in {1e4, 1e5}")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case before giving up on it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit-gib", type=float, default=16.0, help="address-space limit per case")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per case (default: torch's)")
    parser.add_argument("--case", nargs=5, metavar=("IMPL", "RULE", "N", "D", "F"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        implementation, rule, n, d, f = args.case
        print(json.dumps(run_case(implementation, rule, int(n), int(d), int(f), args.repeats, args.threads)))
        return

    counts, dims = ((10, 50), (10**4, 10**5)) if args.quick else ((10, 50, 100), (10**5, 10**6))
    sizes = [(n, d) for n in counts for d in dims]
    available = [impl for impl in IMPLEMENTATIONS if _available(impl)]
    threads = args.threads or torch.get_num_threads()
    print(
        f"implementations: {', '.join(available)}; torch {torch.__version__}; {threads} threads; "
        f"{os.cpu_count()} CPUs"
    )
    columns = ["rule", "n", "d", "f", "dptrain s", "ByzFL s", "Flower s", "speed-up", "target"]
    print("| " + " | ".join(columns + ["dptrain peak RSS GiB (before call)"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for rule in args.rules:
        for n, d in sizes:
            f = (n - 3) // 4
            results = {
                impl: spawn(impl, rule, n, d, f, args) if impl in available and rule in SUPPORTED[impl] else None
                for impl in IMPLEMENTATIONS
            }
            speedup, ratio = _speedup(results["dptrain"], [results["byzfl"], results["flower"]])
            target = TARGETS.get(rule)
            verdict = "-" if target is None or ratio is None else f"{target}x {'met' if ratio >= target else 'MISSED'}"
            ours = results["dptrain"]
            peak = f"{ours['peak_gib']:.2f} ({ours['input_gib']:.2f})" if isinstance(ours, dict) else "-"
            times = [_seconds(results[impl]) for impl in IMPLEMENTATIONS]
            row = [rule, n, f"{d:.0e}", f, *times, speedup, verdict, peak]
            print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


if __name__ == "__main__":
    main()
