"""The mean of a range of order statistics per coordinate, ``(1 / (hi - lo)) sum_{lo <= r < hi} x_(r)``,
by a comparator network compiled on first use: the coordinate-wise median and trimmed mean on CPU.

Why a compiled network: NumPy's SIMD sort of each coordinate's n values is the fastest sort torch and
NumPy offer on CPU, and it is what ByzFL's trimmed mean runs; a comparator network instead treats 128
coordinates at once, each comparator being a vector minimum and maximum, with no data-dependent branch.
Comparator by comparator in torch, every one is a call and a pass over memory (0.6 s for the median of
(50, 1e6) float32), so the network runs as a small C loop, built with the system's C compiler (``$CC``,
else ``cc``) into ``$XDG_CACHE_HOME/dptrain`` (else ``~/.cache/dptrain``) and loaded with ctypes. Where
no compiler works, ``mean_of_ranks`` returns None and callers sort instead: the same values, slower.

The network is Batcher's odd-even merge sort (Knuth, TAOCP vol. 3, 5.3.4, Algorithm M) for the next
power of two, cut to n wires: runs of 16 wires sorted in registers, then the merges of those runs, pruned
from the end for the reduction (``rank_mean_network``). On (50, 1e6) float32 at one thread it measured
0.05 s of CPU time, the ``torch.sum`` floor 0.024 s and NumPy's sort 0.14 s (docs/benchmarks.md). Every
comparator output is one of its inputs, so the selected values are exactly the order statistics; they
are summed in float64 and the mean rounded once to the input dtype. Inputs must be finite.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_LOG = logging.getLogger(__name__)

# Columns go through an (n, LANE_BYTES) buffer: 128 float32 or 64 float64 coordinates, so a comparator is
# two to eight vector instructions, and 50 rows padded to 64 (32 KB) stay in L1. Measured on (50, 1e6)
# float32 at one thread, interleaved (CPU seconds): 64-byte blocks 0.128 s, 256-byte 0.067 s, 512-byte
# 0.053 s, 1024-byte 0.052 s.
_HEADER = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One clone per instruction set, chosen when the library loads: the cached library runs on any x86-64. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
/* Two independent selects, which compile to vector min and max; one shared "swap" flag made gcc 12
   branch on every comparator (1.16x slower on (50, 1e6) float32). A (-0, +0) pair may leave one of its
   zeros on both wires: equal values, so no sum or mean changes. */
#define EXCHANGE(T, x, y) { T u_ = (x), v_ = (y); (x) = v_ < u_ ? v_ : u_; (y) = u_ < v_ ? v_ : u_; }
"""
# One function per dtype. Each lane block: rows padded with +inf to a multiple of GROUP, every GROUP
# consecutive wires sorted in registers (Batcher's first log2(GROUP) merge stages, which never leave an
# aligned group: one load and one store per wire instead of per comparator), then the remaining
# comparators one by one through the buffer.
_TEMPLATE = r"""
static inline __attribute__((always_inline)) void {name}_exchange({T} *restrict p, {T} *restrict q) {{
  enum {{ LANES = LANE_BYTES / sizeof({T}) }};
  _Pragma("GCC ivdep") for (int l = 0; l < LANES; l++) EXCHANGE({T}, p[l], q[l])
}}

static inline __attribute__((always_inline)) void {name}_sort_group({T} *restrict w) {{
  enum {{ LANES = LANE_BYTES / sizeof({T}) }};
  _Pragma("GCC ivdep") for (int l = 0; l < LANES; l++) {{
{load}
{sort}
{store}
  }}
}}

/* Columns [c0, c1) of the row-major (n, d) array x: each column's n values are sorted in groups of
   {group} wires, then go through the comparators (a[k], b[k]), k < m, wire a[k] < b[k] receiving the
   smaller value; out[c] is then the mean of wires [lo, hi). Returns 0, or -1 when the buffer cannot be
   allocated. */
CLONES int {name}(const {T} *x, int64_t n, int64_t d, int64_t c0, int64_t c1, int64_t lo, int64_t hi,
                  const int32_t *a, const int32_t *b, int64_t m, {T} *out) {{
  enum {{ LANES = LANE_BYTES / sizeof({T}) }};
  int64_t padded = (n + {group} - 1) / {group} * {group};
  {T} *buffer = malloc((size_t)padded * LANE_BYTES);
  if (buffer == NULL) return -1;
  for (int64_t c = c0; c < c1; c += LANES) {{
    int64_t width = c1 - c < LANES ? c1 - c : LANES;
    for (int64_t r = 0; r < n; r++) {{
      memcpy(buffer + r * LANES, x + r * d + c, (size_t)width * sizeof({T}));
      for (int64_t l = width; l < LANES; l++) buffer[r * LANES + l] = 0;
    }}
    for (int64_t r = n; r < padded; r++)
      for (int l = 0; l < LANES; l++) buffer[r * LANES + l] = INFINITY;
    for (int64_t g = 0; g < padded; g += {group}) {name}_sort_group(buffer + g * LANES);
    for (int64_t k = 0; k < m; k++)
      {name}_exchange(buffer + (int64_t)a[k] * LANES, buffer + (int64_t)b[k] * LANES);
    double total[LANES];
    for (int l = 0; l < LANES; l++) total[l] = 0.0;
    for (int64_t r = lo; r < hi; r++)
      for (int l = 0; l < LANES; l++) total[l] += buffer[r * LANES + l];
    for (int64_t l = 0; l < width; l++) out[c + l] = ({T})(total[l] / (double)(hi - lo));
  }}
  free(buffer);
  return 0;
}}
"""
_LANE_BYTES = 512
# Wires sorted in registers at once: 16 live vectors and their temporaries fit AVX-512's 32 registers.
_GROUP = 16
# Each dtype's function in the library and its C type.
_FUNCTIONS = {torch.float32: ("rank_mean_float32", "float"), torch.float64: ("rank_mean_float64", "double")}
# Each thread gets at least this many columns, about a millisecond of work at n = 50, against tens of
# microseconds to start a thread.
_MIN_COLUMNS_PER_THREAD = 2**14


def odd_even_merge_sort(n: int, sorted_runs: int = 1) -> list[tuple[int, int]]:
    """Comparators (a, b), a < b, of Batcher's odd-even merge sort on n wires, in order: the network for
    the next power of two N without the comparators that touch a wire >= n. Those wires stand for +inf
    padding, which every comparator leaves in place (min(x, inf) stays on the lower wire), so the rest
    sorts any n values. Knuth, TAOCP vol. 3, 5.3.4, Algorithm M.

    With ``sorted_runs`` (a power of two) > 1, the wires come as sorted runs of that many, aligned, the
    last padded with +inf: the first log2(sorted_runs) merge stages, which never leave a run, are left out."""
    size = 1 << max(n - 1, 0).bit_length()
    comparators = []
    p = sorted_runs
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return comparators


@functools.lru_cache(maxsize=64)
def rank_mean_network(n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorting network on n wires as two int32 arrays (first wires, second wires), pruned for the
    mean of ranks [lo, hi): walking back from the end, a comparator whose two wires reach the outputs
    untouched by any kept comparator, both inside [lo, hi) or both outside, only reorders values within
    one side and is dropped. The network starts from sorted runs of ``_GROUP`` wires, which the compiled
    code sorts in registers first: for n = 50, f = 11, 144 comparators of the 403 are left."""
    inside: list[bool | None] = [lo <= wire < hi for wire in range(n)]
    kept = []
    for a, b in reversed(odd_even_merge_sort(n, _GROUP)):
        if inside[a] is not None and inside[a] == inside[b]:
            continue
        kept.append((a, b))
        inside[a] = inside[b] = None
    kept.reverse()
    wires = np.array(kept, dtype=np.int32).reshape(-1, 2)
    return np.ascontiguousarray(wires[:, 0]), np.ascontiguousarray(wires[:, 1])


def _source() -> str:
    """The C source: ``_HEADER``, then ``_TEMPLATE`` for each dtype with the ``_GROUP``-wire sort written
    out comparator by comparator on local variables, which the compiler keeps in vector registers."""
    functions = []
    for name, ctype in _FUNCTIONS.values():
        load = "\n".join(f"    {ctype} w{i} = w[{i} * LANES + l];" for i in range(_GROUP))
        sort = "\n".join(f"    EXCHANGE({ctype}, w{a}, w{b})" for a, b in odd_even_merge_sort(_GROUP))
        store = "\n".join(f"    w[{i} * LANES + l] = w{i};" for i in range(_GROUP))
        functions.append(_TEMPLATE.format(name=name, T=ctype, group=_GROUP, load=load, sort=sort, store=store))
    return f"#define LANE_BYTES {_LANE_BYTES}\n" + _HEADER + "".join(functions)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dptrain"


def _compile(source: str, compiler: list[str], target: Path) -> None:
    """Compile ``source`` into ``target`` atomically: concurrent processes each build their own file and
    the last rename wins, so no process loads a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        path = Path(scratch) / "sorting_network.c"
        path.write_text(source)
        built = Path(scratch) / target.name
        command = compiler + ["-O3", "-std=c11", "-shared", "-fPIC", "-o", str(built), str(path)]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.replace(built, target)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled network, built on first use; None (logged once) where it cannot be built or loaded."""
    compiler = shlex.split(os.environ.get("CC") or "cc")
    source = _source()
    key = "\0".join([source, *compiler, platform.machine(), platform.system()])
    target = _cache_dir() / f"sorting_network-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(source, compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        _LOG.warning("median and trimmed mean fall back to sorting (slower): cannot build %s: %s", target, detail)
        return None
    for name, _ in _FUNCTIONS.values():
        getattr(library, name).restype = ctypes.c_int
    return library


def _spans(d: int, parts: int, lanes: int) -> list[tuple[int, int]]:
    """[0, d) cut into at most ``parts`` column ranges, each a whole number of lane blocks but the last."""
    parts = max(1, min(parts, d // _MIN_COLUMNS_PER_THREAD))
    step = -(-d // parts // lanes) * lanes
    return [(start, min(start + step, d)) for start in range(0, d, step)]


def mean_of_ranks(updates: Tensor, lo: int, hi: int) -> Tensor | None:
    """Per column of the (n, d) CPU tensor ``updates``, the mean of its order statistics of ranks
    [lo, hi) (0-based, ascending), in the input dtype; None where the network cannot run (not a CPU
    tensor, or no C compiler), for the caller to sort instead. Precondition 0 <= lo < hi <= n, finite
    values. Column ranges run in ``torch.get_num_threads()`` threads (ctypes releases the GIL)."""
    library = _library() if updates.device.type == "cpu" else None
    if library is None:
        return None
    n, d = updates.shape
    values = updates.detach().contiguous()
    out = torch.empty(d, dtype=values.dtype)
    if d == 0:
        return out
    first, second = rank_mean_network(n, lo, hi)
    kernel = getattr(library, _FUNCTIONS[values.dtype][0])
    pointer = ctypes.c_void_p
    status: list[int] = []

    def run(span: tuple[int, int]) -> None:
        arguments = [ctypes.c_int64(v) for v in (n, d, *span, lo, hi)]
        status.append(kernel(
            pointer(values.data_ptr()), *arguments, pointer(first.ctypes.data), pointer(second.ctypes.data),
            ctypes.c_int64(first.size), pointer(out.data_ptr()),
        ))

    spans = _spans(d, torch.get_num_threads(), _LANE_BYTES // values.element_size())
    workers = [threading.Thread(target=run, args=(span,)) for span in spans[1:]]
    for worker in workers:
        worker.start()
    run(spans[0])
    for worker in workers:
        worker.join()
    if any(status):
        raise MemoryError(f"no memory for the sorting network's {n} x {_LANE_BYTES} byte buffer")
    return out
