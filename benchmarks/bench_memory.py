"""Paged history memory benchmarks: page tables, page pool and history store.

CPU (always), for both page-table backends ("cpp" when the extension is built, "python"):

- tables: pages per second through a place + drop_oldest cycle of the page table, and
  through placements that spill to the host tier once the GPU tier is full.
- drop_oldest: steady-state append of one block (3 frames) into a full
  ``overflow_policy="drop_oldest"`` history, and the page ids of 6 retrieved frames,
  at tiny-preset shapes for several history lengths: per-block cost must not grow with
  the history (a drop moves nothing, a lookup is a gather).
- chunk growth: the append that makes the pool allocate one more chunk (the pool never
  copies existing chunks; there is no full-copy doubling any more) against a steady
  append, and the bytes that chunk reserves, for a few chunk sizes.

CUDA (when a device is usable): bandwidth of appends into device-tier pages and into
pinned host-tier pages against plain copies of the same bytes.

    python benchmarks/bench_memory.py [--out benchmarks/results] [--quick]
    pytest benchmarks/bench_memory.py          # pytest-benchmark view of the CPU figures

Host figures run with one torch thread (restored afterwards). Writes
``<out>/memory-<device>-<date>.json`` starting with the environment record of
``lrag_engine.bench.records`` (date, commit, versions, device).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from lrag_engine.bench.devices import device_slug
from lrag_engine.bench.records import environment, write_json
from lrag_engine.bench.timing import median_seconds
from lrag_engine.config import MemoryConfig, ModelConfig
from lrag_engine.memory import _ext
from lrag_engine.memory.budget import HistoryBudget
from lrag_engine.memory.history import HistoryStore, PagePool
from lrag_engine.memory.page_table import make_page_table

BACKENDS = ("cpp", "python")
WAN_PAGE = (1560, 12, 128)  # tokens per latent frame, heads, head dim at Wan 1.3B / 480x832
TINY = ModelConfig.preset("tiny")
MEMORY = MemoryConfig()     # frames_per_block 3, top_k 6


def backend_status(backends=BACKENDS) -> dict[str, str | None]:
    """Per page-table backend: None when it can be built here, else why not."""
    status = {}
    for kind in backends:
        try:
            make_page_table(kind, 1, 0, 0)
            status[kind] = None
        except ImportError as exc:
            status[kind] = str(exc)
    return status


def _usable(backends) -> list[str]:
    return [kind for kind, reason in backend_status(backends).items() if reason is None]


# ---- page tables ------------------------------------------------------------------------

def place_drop_cycle(table, streams: list[int], frames: int) -> None:
    """Places ``frames`` frames on every stream, then drops them (oldest first)."""
    table.place(streams, frames)
    table.drop_oldest(streams, frames)


def make_table(kind: str, layers: int, batch: int, gpu_frames: int, host_frames: int):
    table = make_page_table(kind, layers, gpu_frames * batch * layers, host_frames * batch * layers)
    return table, [table.create_stream() for _ in range(batch)]


def table_figures(layers: int = 30, batch: int = 1, frames: int = 3, reps: int = 200,
                  backends=BACKENDS) -> dict:
    """Pages per second through place + drop_oldest (GPU tier only), and through
    placements that spill to the host tier (GPU tier full); medians over ``reps`` calls."""
    out = {}
    for kind in _usable(backends):
        table, streams = make_table(kind, layers, batch, gpu_frames=4 * frames, host_frames=0)
        seconds = median_seconds(lambda: place_drop_cycle(table, streams, frames), "cpu", warmup=3, reps=reps)
        out[f"{kind}_place_drop_pages_per_s"] = 2 * frames * batch * layers / seconds   # placed + dropped
        out[f"{kind}_place_drop_cycle_us"] = 1e6 * seconds
        # A GPU tier of `frames` frames, full: every placement goes to the host tier.
        # No warm-up: the host tier is sized for exactly `reps` placements.
        table, streams = make_table(kind, layers, batch, gpu_frames=frames, host_frames=frames * (reps + 1))
        table.place(streams, frames)
        seconds = median_seconds(lambda: table.place(streams, frames), "cpu", warmup=0, reps=reps)
        assert table.usage()["host_used"] == reps * frames * batch * layers
        out[f"{kind}_place_spill_pages_per_s"] = frames * batch * layers / seconds
        table.check_invariants()
    out["shape"] = dict(layers=layers, batch=batch, frames_per_call=frames, reps=reps)
    return out


# ---- history store ----------------------------------------------------------------------

def _tiny_block(fe: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V [L, 1, fe, N, H, D] and descriptors [1, fe, Dd] at tiny-preset shapes."""
    g = torch.Generator().manual_seed(seed)
    shape = (TINY.num_layers, 1, fe, TINY.tokens_per_frame, TINY.num_heads, TINY.head_dim)
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.randn(1, fe, TINY.in_channels, generator=g))


def _plan(memory: MemoryConfig, dtype: torch.dtype = torch.float32) -> HistoryBudget:
    return HistoryBudget.plan(memory, TINY.num_layers, 1, TINY.tokens_per_frame, TINY.num_heads, TINY.head_dim,
                              dtype)


def tiny_store(memory: MemoryConfig, backend: str, chunk_pages: int | None = None) -> HistoryStore:
    """A one-stream history store at tiny-preset shapes (float32, CPU) over a pool sized
    by ``memory``'s budgets, as the engine builds it."""
    budget = _plan(memory)
    gpu_pages, host_pages = budget.pool_pages()
    pool = PagePool(TINY.num_layers, TINY.tokens_per_frame, TINY.num_heads, TINY.head_dim, torch.float32, "cpu",
                    gpu_pages=gpu_pages, host_pages=host_pages, chunk_pages=chunk_pages or budget.chunk_pages,
                    table=backend)
    return HistoryStore(pool, 1, TINY.in_channels, overflow_policy=memory.overflow_policy)


def drop_figures(budgets: tuple[int, ...] = (10, 100, 1000), reps: int = 200, backends=BACKENDS) -> dict:
    """Steady-state append of one block (3 frames) into a full history under
    ``overflow_policy="drop_oldest"``, and ``page_ids`` of 6 retrieved frames, at
    tiny-preset page shapes on the CPU, for each history length (budget in frames) and
    backend: neither may grow with the history. Median microseconds per call, and the
    ratio of the longest history's time to the shortest's."""
    fe, top_k = MEMORY.frames_per_block, MEMORY.top_k
    frame_bytes = _plan(MEMORY).frame_bytes
    block = _tiny_block(fe)
    out = {}
    for backend in _usable(backends):
        for frames in budgets:
            memory = MemoryConfig(gpu_budget_bytes=frames * frame_bytes, overflow_policy="drop_oldest")
            store = tiny_store(memory, backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the one "dropping starts" warning
                for _ in range(frames // fe + 1):    # fill the budget
                    store.append(*block)
                seconds = median_seconds(lambda: store.append(*block), "cpu", warmup=3, reps=reps)
            assert store.dropped_frames > 0 and store.num_frames <= frames
            ids = torch.randint(store.num_frames, (1, top_k), generator=torch.Generator().manual_seed(frames))
            lookup = median_seconds(lambda: store.page_ids(ids), "cpu", warmup=3, reps=reps)
            out[f"{backend}_append_drop_us_at_{frames}_frames"] = 1e6 * seconds
            out[f"{backend}_page_ids_us_at_{frames}_frames"] = 1e6 * lookup
            store.close()
        lo, hi = min(budgets), max(budgets)
        for what in ("append_drop", "page_ids"):
            out[f"{backend}_{what}_ratio_{hi}_vs_{lo}_frames"] = \
                out[f"{backend}_{what}_us_at_{hi}_frames"] / out[f"{backend}_{what}_us_at_{lo}_frames"]
    out["shape"] = dict(layers=TINY.num_layers, batch=1,
                        page=[TINY.tokens_per_frame, TINY.num_heads, TINY.head_dim], frame_bytes=frame_bytes,
                        frames_per_append=fe, retrieved_frames=top_k, reps=reps, threads=torch.get_num_threads())
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def chunk_growth_figures(chunk_bytes: tuple[int, ...] = (1 << 20, 16 << 20, MEMORY.page_chunk_bytes),
                         reps: int = 5, backends=BACKENDS) -> dict:
    """Growing the pool by one chunk: a store on an unbounded pool is filled until its
    first chunk has no room for another block; the next append allocates the second
    chunk (the first is neither copied nor moved) and the one after it does not. Per
    backend and chunk size: median microseconds of both appends, their difference, and
    the bytes the new chunk reserved (``memory_usage``-style ``gpu_bytes_reserved``)."""
    fe = MEMORY.frames_per_block
    page_bytes = _plan(MEMORY).page_bytes
    block = _tiny_block(fe)
    out: dict = {}
    for backend in _usable(backends):
        for size in chunk_bytes:
            chunk_pages = max(1, size // page_bytes)
            fill = (chunk_pages // TINY.num_layers) - fe + 1   # frames leaving < one block of room
            if fill < 1:
                raise ValueError(f"chunk of {size} bytes holds fewer than {fe} frames: too small to measure")
            fill_block = tuple(t[:, :, :1].expand(*t.shape[:2], fill, *t.shape[3:]) for t in block[:2]) + \
                (block[2][:, :1].expand(1, fill, -1),)
            grow, steady, reserved = [], [], []
            for _ in range(reps):
                store = tiny_store(MEMORY, backend, chunk_pages=chunk_pages)
                store.append(*fill_block)
                before = store.pool.usage()
                assert before["gpu_chunks"] == 1, before
                grow.append(_timed(lambda: store.append(*block)))
                after = store.pool.usage()
                steady.append(_timed(lambda: store.append(*block)))
                assert after["gpu_chunks"] == 2 and store.pool.usage()["gpu_chunks"] == 2
                reserved.append(after["gpu_bytes_reserved"] - before["gpu_bytes_reserved"])
                store.close()
            grow_us, steady_us = 1e6 * statistics.median(grow), 1e6 * statistics.median(steady)
            out[f"{backend}_chunk_{chunk_pages * page_bytes}_bytes"] = dict(
                chunk_pages=chunk_pages, chunk_bytes=chunk_pages * page_bytes,
                history_frames_before=fill, grow_append_us=grow_us, steady_append_us=steady_us,
                growth_us=grow_us - steady_us, reserved_bytes_added=statistics.median(reserved),
                grow_append_us_all=[1e6 * t for t in grow])
    out["note"] = ("a pool grows by allocating one chunk per tier (torch.empty: pages are touched only "
                   "when written); existing chunks are never copied, so there is no full-copy doubling to "
                   "compare with")
    out["shape"] = dict(page_bytes=page_bytes, frames_per_append=fe, reps=reps, threads=torch.get_num_threads())
    return out


# ---- device ------------------------------------------------------------------------------

def tier_write_figures(device: torch.device | str, page_shape=WAN_PAGE, layers: int = 30, frames: int = 3,
                       reps: int = 10, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Appends of ``frames`` frames (K and V of ``layers`` layers, from the device) into
    device-tier pages and into host-tier pages (pinned on CUDA), against one plain copy
    of the same bytes (device to device, device to pinned host); medians, each call from
    an idle device. Runs on the CPU as well (both tiers are host memory there)."""
    device = torch.device(device)
    page_bytes = 2 * page_shape[0] * page_shape[1] * page_shape[2] * dtype.itemsize
    moved = frames * layers * page_bytes
    g = torch.Generator().manual_seed(0)
    shape = (layers, 1, frames, *page_shape)
    k = torch.randn(shape, generator=g).to(device, dtype)
    v = torch.randn(shape, generator=g).to(device, dtype)
    desc = torch.randn(1, frames, 16, generator=g).to(device)
    held = 4 * frames * layers   # pages: a full drop_oldest history after a few appends
    out: dict = {"page_shape": list(page_shape), "layers": layers, "frames_per_append": frames,
                 "bytes_per_append": moved, "dtype": str(dtype).replace("torch.", "")}
    for tier, (gpu_pages, host_pages) in (("device", (held, 0)), ("host", (0, held))):
        pool = PagePool(layers, *page_shape, dtype, device, gpu_pages=gpu_pages, host_pages=host_pages,
                        chunk_pages=held)
        store = HistoryStore(pool, 1, 16, overflow_policy="drop_oldest")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds = median_seconds(lambda: store.append(k, v, desc), device, warmup=5, reps=reps,
                                     sync_each=True)
        usage = pool.usage()
        assert usage[f"{'gpu' if tier == 'device' else 'host'}_pages_used"] > 0, usage
        out[f"{tier}_append_s"] = seconds
        out[f"{tier}_append_GBps"] = moved / seconds / 1e9
        store.close()
    src = torch.empty(moved, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    pinned = torch.empty(moved, dtype=torch.uint8, pin_memory=device.type == "cuda")
    d2d = median_seconds(lambda: dst.copy_(src), device, warmup=2, reps=reps, sync_each=True)
    d2h = median_seconds(lambda: pinned.copy_(src, non_blocking=True), device, warmup=2, reps=reps, sync_each=True)
    out.update(copy_d2d_GBps=moved / d2d / 1e9, copy_d2h_pinned_GBps=moved / d2h / 1e9,
               device_append_fraction_of_copy=d2d / out["device_append_s"],
               host_append_fraction_of_copy=d2h / out["host_append_s"])
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(device)
    return out


# ---- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for the JSON result")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {"environment": environment(device),
                  "extension_with_cuda": _ext.load().with_cuda if _ext.extension_available() else None,
                  "backends": backend_status()}
        if args.quick:
            result["cpu_tables"] = table_figures(layers=4, frames=2, reps=20)
            result["cpu_drop_oldest"] = drop_figures(budgets=(4, 16), reps=10)
            result["cpu_chunk_growth"] = chunk_growth_figures(chunk_bytes=(256 << 10, 1 << 20), reps=2)
        else:
            result["cpu_tables"] = table_figures()
            result["cpu_drop_oldest"] = drop_figures()
            result["cpu_chunk_growth"] = chunk_growth_figures()
    finally:
        torch.set_num_threads(threads)
    if cuda:
        result["cuda"] = (tier_write_figures(device, page_shape=(16, 2, 64), layers=2, reps=3) if args.quick
                          else tier_write_figures(device))
    else:
        result["cuda"] = {"skipped": "no CUDA device visible to torch"}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        date = result["environment"]["date"][:10]
        path = write_json(args.out / f"memory-{device_slug(device)}-{date}.json", result)
        print(f"wrote {path}")
    return result


# ---- pytest-benchmark views (pytest benchmarks/bench_memory.py) ------------------------

def _backend_params():
    import pytest
    return [pytest.param(kind, id=kind, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
            for kind, reason in backend_status().items()]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backend_params())


def test_bench_place_drop(benchmark, backend):
    table, streams = make_table(backend, layers=30, batch=1, gpu_frames=12, host_frames=0)
    benchmark(place_drop_cycle, table, streams, 3)
    table.check_invariants()


def test_bench_place_with_spill(benchmark, backend):
    table, streams = make_table(backend, layers=30, batch=1, gpu_frames=3, host_frames=3)

    def cycle():
        table.place(streams, 3)        # to whichever tier the last drop freed (GPU, host in turn)
        table.drop_oldest(streams, 3)  # frees the oldest frames

    table.place(streams, 3)
    benchmark(cycle)
    table.check_invariants()


if __name__ == "__main__":
    main()
