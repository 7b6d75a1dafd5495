"""Time dptrain's robust aggregators and NNM against ByzFL's and Flower's, each beside its memory floor.

    python scripts/bench_aggregators.py [--quick] [--rules ...] [--n ...] [--d ...] [--threads 1] [--timeout 600]

For n in {10, 50, 100} and d in {1e5, 1e6} (``--quick``: n in {10, 50}, d in {1e4, 1e5}; ``--n`` and
``--d`` override) and f = floor((n - 3) / 4), the most Bulyan allows, every rule runs on the same
seeded float32 (n, d) updates in each implementation that has it and is importable (``pip install
dptrain[compare]``). Each library gets its native fast input, converted outside the timed call:
dptrain a torch tensor, ByzFL a NumPy array (its NumPy path; given a tensor it takes its slower torch
path), Flower a list of per-client NumPy arrays with example counts of 1.

Each (rule, n, d) runs in its own subprocess (a ``--memory-limit-gib`` address-space limit; a library
that exceeds it reports "oom"), which times every implementation and the rule's floor interleaved,
round by round in a rotating order, so a change in machine load cannot favour one of them; times
are medians of ``--repeats`` rounds after an untimed first call (that first call alone for a library
whose first call took over 10 s). The floor is the least work any implementation of the rule must
do on the (n, d) stack: one read of it (``torch.sum`` over dim 0) for the coordinate-wise rules and
centered clipping, the Gram matrix ``X @ X.T`` for the distance-based ones (Krum, Multi-Krum,
geometric median, Bulyan, NNM). Printed: each time, dptrain's over the floor, and the faster peer's
over dptrain's, with the targets of issue 16 (median and trimmed mean >= 2x the peers and within 5x
the floor; Krum within 1.5x the floor) and of the issue before it (3x for Krum, Multi-Krum, Bulyan and
NNM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
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
# The faster peer's time over dptrain's, and dptrain's over the floor.
TARGETS = {"krum": 3.0, "multi_krum": 3.0, "bulyan": 3.0, "nnm": 3.0, "median": 2.0, "trimmed_mean": 2.0}
FLOOR_TARGETS = {"median": 5.0, "trimmed_mean": 5.0, "krum": 1.5}
GRAM_FLOOR = ("krum", "multi_krum", "geometric_median", "bulyan", "nnm")
# Centered clipping's radius in every implementation (it only changes which updates are clipped).
TAU = 10.0
# A library whose first call takes longer is timed by that call alone.
SLOW_SECONDS = 10.0


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


def _inputs(implementation: str, updates: torch.Tensor) -> Any:
    """Each library's native input, each its own copy (no library can alter another's)."""
    if implementation == "dptrain":
        return updates.clone()
    values = updates.numpy().copy()
    if implementation == "flower":
        return [([row], 1) for row in values]
    return values


def _floor(rule: str, updates: torch.Tensor) -> Callable[[], Any]:
    if rule in GRAM_FLOOR:
        return lambda: updates @ updates.T
    return lambda: updates.sum(dim=0)


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error) or "not enough memory" in str(error)


def run_case(rule: str, n: int, d: int, f: int, available: list[str], repeats: int, threads: int | None) -> dict[str, Any]:
    """Child side: time the floor and every available implementation of one case, interleaved; report
    each median in seconds (or "oom") as JSON."""
    if threads is not None:
        torch.set_num_threads(threads)
    updates = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    makers = {"dptrain": _dptrain, "byzfl": _byzfl, "flower": _flower}
    calls: dict[str, Callable[[], Any]] = {"floor": _floor(rule, updates)}
    for implementation in available:
        aggregate, inputs = makers[implementation](rule, n, f), _inputs(implementation, updates)
        calls[implementation] = lambda aggregate=aggregate, inputs=inputs: aggregate(inputs)
    times: dict[str, list[float]] = {}
    results: dict[str, Any] = {}
    for name, call in calls.items():
        start = time.perf_counter()
        try:
            call()
        except (MemoryError, RuntimeError) as error:
            if not _out_of_memory(error):
                raise
            results[name] = "oom"
            continue
        first = time.perf_counter() - start
        if first > SLOW_SECONDS:
            results[name] = first
        else:
            times[name] = []
    names = list(times)
    for round_ in range(repeats if names else 0):
        # A rotating order: no implementation always runs first or last in a round.
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    results.update({name: statistics.median(values) for name, values in times.items()})
    return results


def _available(implementation: str) -> bool:
    module = {"dptrain": "dptrain.robust", "byzfl": "byzfl", "flower": "flwr.server.strategy.aggregate"}[implementation]
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def _last_line(text: str, fallback: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else fallback


def spawn(rule: str, n: int, d: int, f: int, available: list[str], args: argparse.Namespace) -> dict[str, Any] | str:
    """Parent side: run one case in a fresh interpreter; its results, or why there are none."""
    command = [sys.executable, __file__, "--case", rule, str(n), str(d), str(f), ",".join(available)]
    command += ["--repeats", str(args.repeats), "--memory-limit-gib", str(args.memory_limit_gib)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f">{args.timeout:.0f}s"
    if done.returncode != 0:
        return f"error: {_last_line(done.stderr, f'exit {done.returncode}')}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _seconds(result: Any) -> str:
    if result is None:
        return "-"
    return f"{result:.3f}" if isinstance(result, float) else str(result)


def _verdict(ratio: float | None, target: float | None, at_least: bool) -> str:
    if ratio is None or target is None:
        return "-"
    met = ratio >= target if at_least else ratio <= target
    return f"{'>=' if at_least else '<='}{target}x {'met' if met else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n in {10, 50}, d in {1e4, 1e5}")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--n", nargs="+", type=int, help="numbers of updates (overrides the default and --quick)")
    parser.add_argument("--d", nargs="+", type=float, help="dimensions (overrides the default and --quick)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case before giving up on it")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per case")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0, help="address-space limit per case")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per case (default: torch's)")
    parser.add_argument("--case", nargs=5, metavar=("RULE", "N", "D", "F", "IMPLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        rule, n, d, f, implementations = args.case
        results = run_case(rule, int(n), int(d), int(f), implementations.split(","), args.repeats, args.threads)
        print(json.dumps(results))
        return

    counts, dims = ((10, 50), (10**4, 10**5)) if args.quick else ((10, 50, 100), (10**5, 10**6))
    counts = args.n or counts
    dims = [int(d) for d in args.d] if args.d else dims
    available = [impl for impl in IMPLEMENTATIONS if _available(impl)]
    missing = [impl for impl in IMPLEMENTATIONS if impl not in available]
    threads = args.threads or torch.get_num_threads()
    print(
        f"implementations: {', '.join(available)}"
        + (f" ({', '.join(missing)} not importable: skipped)" if missing else "")
        + f"; torch {torch.__version__}; {threads} threads; {os.cpu_count()} CPUs; medians of {args.repeats} rounds"
    )
    columns = ["rule", "n", "d", "f", "floor", "floor s", "dptrain s", "dptrain / floor", "target"]
    columns += ["ByzFL s", "Flower s", "peer / dptrain", "target"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for rule in args.rules:
        for n in counts:
            for d in dims:
                f = (n - 3) // 4
                case = [impl for impl in available if rule in SUPPORTED[impl]]
                results = spawn(rule, n, d, f, case, args)
                if isinstance(results, str):
                    print(f"| {rule} | {n} | {d:.0e} | {f} | {results} |", flush=True)
                    continue
                ours, floor = results.get("dptrain"), results["floor"]
                over_floor = ours / floor if isinstance(ours, float) else None
                peers = [results[impl] for impl in ("byzfl", "flower") if isinstance(results.get(impl), float)]
                speedup = min(peers) / ours if peers and isinstance(ours, float) else None
                row = [
                    rule, n, f"{d:.0e}", f, "gram" if rule in GRAM_FLOOR else "sum", _seconds(floor), _seconds(ours),
                    "-" if over_floor is None else f"{over_floor:.1f}x",
                    _verdict(over_floor, FLOOR_TARGETS.get(rule), at_least=False),
                    _seconds(results.get("byzfl")), _seconds(results.get("flower")),
                    "-" if speedup is None else f"{speedup:.1f}x", _verdict(speedup, TARGETS.get(rule), at_least=True),
                ]
                print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


if __name__ == "__main__":
    main()
