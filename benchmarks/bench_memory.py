"""Paged history memory benchmarks.

CPU (always): page allocate/free throughput of the C++ tables, with and without spills,
the plan cost of a prefetch, and the cost of an append into a full drop_oldest history
for growing budgets (flat: a drop moves nothing). CUDA (when a device is usable): host-to-device prefetch
bandwidth of PagedHistoryStore against a measured pinned torch copy of the same bytes.

    python benchmarks/bench_memory.py [--out benchmarks/results] [--quick]
    pytest benchmarks/bench_memory.py          # pytest-benchmark view of the CPU figures

Writes ``<out>/memory-<device>-<date>.json`` starting with the environment record of
``benchmarks/common.py`` (date, commit, versions, device).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from lrag_engine.memory import _ext  # noqa: E402

WAN_PAGE = (1560, 12, 128)  # tokens per latent frame, heads, head dim at Wan 1.3B / 480x832


def alloc_free_cycle(mem, streams: list[int], frames: int) -> None:
    """Allocates ``frames`` frames on every stream, then frees them (oldest first)."""
    mem.append(streams, frames)
    mem.drop_oldest(streams, frames)


def make_tables(layers: int, batch: int, gpu_frames: int, host_frames: int):
    mem = _ext.load().PagedMemory(layers, gpu_frames * batch * layers, host_frames * batch * layers)
    return mem, [mem.create_stream() for _ in range(batch)]


def cpu_figures(layers: int = 30, batch: int = 1, frames: int = 3, reps: int = 200) -> dict:
    """Pages per second through append+drop (no spill) and append with spills to the host
    tier, and prefetch plans per second; medians over ``reps`` timed calls."""
    def median(fn) -> float:
        # no warm-up call: the spill case sizes its host tier for exactly `reps` appends
        return common.median_seconds(fn, "cpu", warmup=0, reps=reps)

    out = {}
    mem, streams = make_tables(layers, batch, gpu_frames=4 * frames, host_frames=0)
    seconds = median(functools.partial(alloc_free_cycle, mem, streams, frames))
    pages = 2 * frames * batch * layers  # allocated + freed
    out["alloc_free_pages_per_s"] = pages / seconds
    out["alloc_free_cycle_us"] = 1e6 * seconds

    # GPU tier of `frames` frames: every append spills the previous frames to the host.
    mem, streams = make_tables(layers, batch, gpu_frames=frames, host_frames=frames * (reps + 2))
    mem.append(streams, frames)
    seconds = median(functools.partial(mem.append, streams, frames))
    out["append_with_spill_pages_per_s"] = frames * batch * layers / seconds

    # Prefetch of K=frames host frames into a full GPU tier (each evicts as many).
    n = mem.num_frames(streams[0])
    picks = iter([[(3 * i + j) % (n - frames) for j in range(frames)] for i in range(reps)])
    out["prefetch_plan_us"] = 1e6 * median(lambda: mem.prefetch([streams[0]] * frames, next(picks)))
    out["shape"] = dict(layers=layers, batch=batch, frames_per_call=frames, reps=reps)
    return out


def drop_figures(budgets: tuple[int, ...] = (10, 100, 1000), reps: int = 200) -> dict:
    """Steady-state append of one block (3 frames) into a full history under
    ``overflow_policy="drop_oldest"``, at tiny-preset page shapes on the CPU, for each
    budget in frames: the cost must not grow with the budget (a drop moves nothing).
    Median microseconds per append, both stores."""
    import warnings

    from lrag_engine.memory.history import HistoryStore
    from lrag_engine.memory.paged import PagedHistoryStore

    layers, batch, page, desc_dim, fe = 2, 1, (24, 2, 32), 16, 3
    frame_bytes = 2 * layers * batch * page[0] * page[1] * page[2] * 4
    g = torch.Generator().manual_seed(0)
    k = torch.randn(layers, batch, fe, *page, generator=g)
    block = (k, torch.randn(k.shape, generator=g), torch.randn(batch, fe, desc_dim, generator=g))
    stores = {"torch": lambda frames: HistoryStore(layers, batch, *page, desc_dim, torch.float32,
                                                   gpu_budget_bytes=frames * frame_bytes,
                                                   overflow_policy="drop_oldest"),
              "paged": lambda frames: PagedHistoryStore(layers, batch, *page, desc_dim, torch.float32,
                                                        gpu_budget_bytes=frames * frame_bytes,
                                                        overflow_policy="drop_oldest")}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in stores.items():
            for frames in budgets:
                store = make(frames)
                for _ in range(frames // fe + 1):    # fill the budget
                    store.append(*block)
                seconds = common.median_seconds(lambda: store.append(*block), "cpu", warmup=3, reps=reps)
                assert store.dropped_frames > 0
                out[f"{name}_append_drop_us_at_{frames}_frames"] = 1e6 * seconds
    out["shape"] = dict(layers=layers, batch=batch, page=list(page), frames_per_append=fe, reps=reps,
                        threads=torch.get_num_threads())
    return out


def cuda_figures(page_shape=WAN_PAGE, layers: int = 30, frames: int = 2, reps: int = 10) -> dict:
    """Host-to-device prefetch bandwidth (K and V pages of ``frames`` frames x ``layers``)
    against one pinned copy of the same bytes, both timed with CUDA events (median)."""
    from lrag_engine.memory.paged import PagedHistoryStore
    dtype, dev = torch.bfloat16, torch.device("cuda")
    slot_bytes = 2 * page_shape[0] * page_shape[1] * page_shape[2] * dtype.itemsize
    frame_bytes = layers * slot_bytes
    store = PagedHistoryStore(layers, 1, *page_shape, descriptor_dim=16, dtype=dtype, device=dev,
                              gpu_budget_bytes=frames * frame_bytes, host_budget_bytes=6 * frames * frame_bytes)
    # The oldest frames end on the host tier, which keeps free slots so that evictions
    # go straight to it (no swap staging).
    for _ in range(5 * frames):
        kv = torch.randn(layers, 1, 1, *page_shape, device=dev, dtype=dtype)
        store.append(kv, kv, torch.randn(1, 1, 16, device=dev))
    torch.cuda.synchronize()

    def timed(fn) -> float:
        # each call from an idle device: a prefetch is issued when its frames are needed
        return common.median_seconds(fn, dev, warmup=1, reps=reps, sync_each=True)

    # Alternate two disjoint frame sets so that every call loads `frames` frames from the host.
    sets = [torch.arange(frames).view(1, -1), torch.arange(frames, 2 * frames).view(1, -1)]
    state = {"i": 0}

    def prefetch():
        store.prefetch(sets[state["i"] % 2])
        state["i"] += 1

    moved = 2 * frames * frame_bytes  # loads + evictions of equal size
    t_prefetch = timed(prefetch)
    host = torch.empty(frames * frame_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(host, device=dev)
    t_h2d = timed(lambda: dst.copy_(host, non_blocking=True))
    back = torch.empty_like(host)
    t_d2h = timed(lambda: back.copy_(dst, non_blocking=True))
    pinned_ref = 2 * frames * frame_bytes / (t_h2d + t_d2h)  # same bytes, one copy each way
    pages = frames * layers
    raw = {}
    if store._raw_copies:
        # Load-only path: the extension's batched cudaMemcpyAsync, host slots -> GPU slots.
        ext, stream = _ext.load(), torch.cuda.current_stream().cuda_stream
        src = list(range(0, 2 * pages, 2))  # every other host slot: no run merging
        dst = list(range(pages))
        t_raw = timed(lambda: ext.copy_pages(store.pool_k.data_ptr(), dst, store.host_k.data_ptr(), src,
                                             store.page_bytes, stream, torch.cuda.current_device()))
        raw = {"raw_h2d_pages_GBps": pages * store.page_bytes / t_raw / 1e9,
               "raw_h2d_fraction_of_pinned": (pages * store.page_bytes / t_raw) / (frames * frame_bytes / t_h2d)}
    return {**raw,
        "device": torch.cuda.get_device_name(),
        "raw_cuda_copies": store._raw_copies,
        "page_shape": list(page_shape), "layers": layers, "frames_per_prefetch": frames,
        "prefetch_bytes_moved": moved,
        "prefetch_s": t_prefetch, "prefetch_GBps": moved / t_prefetch / 1e9,
        "pinned_h2d_GBps": frames * frame_bytes / t_h2d / 1e9,
        "pinned_d2h_GBps": frames * frame_bytes / t_d2h / 1e9,
        "pinned_h2d_plus_d2h_GBps": pinned_ref / 1e9,
        "prefetch_fraction_of_pinned": (moved / t_prefetch) / pinned_ref,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for the JSON result")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args(argv)
    ext = _ext.load()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    result = {"environment": common.environment(device), "extension_with_cuda": ext.with_cuda}
    result["cpu_tables"] = cpu_figures(layers=4, frames=2, reps=20) if args.quick else cpu_figures()
    result["cpu_drop_oldest"] = drop_figures(budgets=(4, 16), reps=10) if args.quick else drop_figures()
    if cuda:
        result["cuda"] = cuda_figures(page_shape=(16, 2, 64), layers=2, reps=3) if args.quick else cuda_figures()
    else:
        result["cuda"] = {"skipped": "no CUDA device visible to torch"}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        date = result["environment"]["date"][:10]
        path = common.write_json(args.out / f"memory-{common.device_slug(device)}-{date}.json", result)
        print(f"wrote {path}")
    return result


# ---- pytest-benchmark views (pytest benchmarks/bench_memory.py) ------------------------

def test_bench_alloc_free(benchmark):
    mem, streams = make_tables(layers=30, batch=1, gpu_frames=12, host_frames=0)
    benchmark(alloc_free_cycle, mem, streams, 3)
    mem.check_invariants()


def test_bench_append_with_spill(benchmark):
    mem, streams = make_tables(layers=30, batch=1, gpu_frames=3, host_frames=3)

    def cycle():
        mem.append(streams, 3)       # spills the previous 3 frames
        mem.drop_oldest(streams, 3)  # frees them from the host tier

    mem.append(streams, 3)
    benchmark(cycle)
    mem.check_invariants()


if __name__ == "__main__":
    main()
