"""Timing of a callable on CUDA or the CPU, and percentiles of the times.

    seconds = median_seconds(fn, device)       # median of CUDA events / perf_counter
    ms = do_bench_ms(fn)                       # CUDA: triton do_bench median, L2 cleared
    with torch_threads(1): ...                 # one thread inside, the caller's count after
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the body with ``count`` torch threads (None: leave it), restoring the
    caller's count afterwards, also on errors."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device | str, warmup: int = 3,
                   reps: int = 10, sync_each: bool = False) -> float:
    """Median time of ``fn()`` over ``reps`` calls after ``warmup`` calls: CUDA events
    around each call on CUDA, perf_counter on the CPU.

    sync_each (CUDA): wait for the device before each call, so that every sample starts
    on an idle device and includes the host work of issuing the call (the latency of one
    call made when needed) instead of overlapping it with the previous call's copies."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda" and sync_each:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    elif device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in pairs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def do_bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn()`` on CUDA by ``triton.testing.do_bench``, which clears
    the L2 cache before every call: a kernel then reads its inputs from DRAM, as in the
    engine where other layers' work evicts them between calls."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
