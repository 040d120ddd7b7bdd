"""End-to-end block latency of the engine, several runtime modes side by side.

On CUDA the default is the reference workload of PERF.md: Wan2.1-T2V-1.3B shapes with
random weights, bf16, batch 1, window 12, sink 1, K = 6, R = 5, 3 latent frames per block,
4 denoising steps + recache, 512 text tokens, 120 latent frames. On a CPU the default is
a smaller workload (tiny preset, float32, 48 frames) that exercises the same code.

Modes (each a fresh engine, same seed): native (K = 0), native-graphs, retrieval (K = 6),
retrieval-graphs, retrieval-host (history in the pinned host tier), baseline-refetch
(retrieved K/V fetched from host memory for every layer and forward, as the public
reference does). A mode whose options the engine rejects is recorded as skipped, with
the reason.

Per mode: one engine; a warm-up run first (JIT compiles, graph capture, pool growth),
then ``--repeats`` timed runs. Block latency over the steady state pooled over the
repeats (median, IQR, p90) with each repeat's median, and a warning when the spread is
large; FPS (video frames/s = 4 x latent frames/s, DiT only, VAE excluded), MFU against a
measured matmul rate, peak GPU memory, NVML power and clocks, host CPU time against
device time. Writes JSON and a PNG of block latency over video length for every mode.

On a CPU the figures check code paths and overheads (one torch thread unless
``--threads`` says otherwise); they say nothing about GPU performance, and the issue
targets are printed only next to GPU numbers at the reference workload.

``--long``: block time at latent frames 100 and 1000 (the growth target) in one run of
1011 frames per mode, with the history in the pinned host tier under a byte budget
(``--host-budget-gb``, oldest frames dropped past it): the 1.3B history of 1000 frames
(~290 GB) fits no GPU.

    python benchmarks/latency.py [--preset P] [--frames N] [--dtype D] [--device D]
                                 [--modes native,retrieval,...] [--warmup-blocks N]
                                 [--warmup-frames N] [--repeats N] [--long] [--host-budget-gb G]
                                 [--threads N] [--out PATH] [--plot PATH]

Default output: benchmarks/out/ (ignored by git); committed results go to
benchmarks/results/ by ``--out``.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrag_engine.bench.devices import device_slug
from lrag_engine.bench.flops import block_flops, context_frames, forward_flops  # noqa: F401
from lrag_engine.bench.nvml import NvmlSampler
from lrag_engine.bench.provenance import now
from lrag_engine.bench.rates import copy_bandwidth, matmul_rate
from lrag_engine.bench.records import environment, write_json
from lrag_engine.bench.timing import percentile, synchronize
from lrag_engine.config import MODEL_PRESETS, MemoryConfig, ModelConfig, RuntimeConfig, resolve_dtype
from lrag_engine.engine import Engine
from lrag_engine.memory.budget import HistoryBudget

REPO = Path(__file__).resolve().parents[1]

VAE_TIME_STRIDE = 4  # Wan VAE: one latent frame decodes to 4 video frames
# Blocks averaged at each end of the steady state for the "cost vs video length" growth.
GROWTH_BLOCKS = 5

REFERENCE = dict(preset="wan2.1-t2v-1.3b", dtype="bfloat16", frames=120)
CPU_DEFAULT = dict(preset="tiny", dtype="float32", frames=48)
# --long: the frames at which block time is read, the run length covering them, and the
# blocks on each side of a point whose times are pooled there.
LONG_POINTS = (100, 1000)
LONG_FRAMES = 1011
LONG_MODES = "native,retrieval-host"
LONG_POINT_BLOCKS = 3
LONG_HOST_BUDGET_GB = 32.0
# A spread above this (IQR of the pooled steady blocks, or max - min of the repeats'
# medians, over the median) makes comparisons between modes unreliable: say so.
NOISY_SPREAD = 0.10
DEFAULT_OUT_DIR = REPO / "benchmarks" / "out"


@dataclass(frozen=True)
class Mode:
    """Engine options of one benchmark mode, on top of the workload's configs."""

    description: str
    memory: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    cuda_only: str | None = None     # why the mode means nothing off CUDA


MODES: dict[str, Mode] = {
    "native": Mode("plain sliding window (K = 0)", memory=dict(top_k=0)),
    "native-graphs": Mode("plain sliding window (K = 0), CUDA graphs", memory=dict(top_k=0),
                          runtime=dict(cuda_graphs=True),
                          cuda_only="CUDA graphs need a CUDA device (the engine runs eager elsewhere)"),
    "retrieval": Mode("retrieval K = 6, history on the device, eager", memory=dict(top_k=6)),
    "retrieval-graphs": Mode("retrieval K = 6, CUDA graphs", memory=dict(top_k=6),
                             runtime=dict(cuda_graphs=True),
                             cuda_only="CUDA graphs need a CUDA device (the engine runs eager elsewhere)"),
    "retrieval-host": Mode("retrieval K = 6, history in the pinned host tier, eager",
                           memory=dict(top_k=6, history_tier="host")),
    # The public reference keeps the memory on the host and gathers the retrieved K/V
    # again for every layer of every forward.
    "baseline-refetch": Mode("retrieval K = 6, history on the host, retrieved K/V fetched again "
                             "for every layer and every forward (public reference)",
                             memory=dict(top_k=6, history_tier="host"),
                             runtime=dict(retrieval_fetch="per_forward")),
}


# ---------------------------------------------------------------------- one mode
def _retrieved(log) -> int:
    if callable(log):
        log = log()
    selected = getattr(log, "selected", None) or [[]]
    return len(selected[0])


def _build(mode: Mode, model: ModelConfig, device: torch.device, dtype: str, seed: int, frames: int,
           host_budget_bytes: int | None = None):
    options = dict(mode.memory)
    if options.get("history_tier") == "host":
        # A host-tier budget with room for every frame of the run (batch 1); frame bytes
        # do not depend on the memory rules. Under a smaller cap the oldest frames go.
        budget = HistoryBudget.plan(MemoryConfig(), model.num_layers, 1, model.tokens_per_frame,
                                    model.num_heads, model.head_dim, resolve_dtype(dtype))
        options["host_budget_bytes"] = frames * budget.frame_bytes
        if host_budget_bytes is not None and host_budget_bytes < options["host_budget_bytes"]:
            options["host_budget_bytes"] = max(host_budget_bytes, budget.frame_bytes)
            options["overflow_policy"] = "drop_oldest"
    memory = MemoryConfig(**options)
    runtime = RuntimeConfig(device=str(device), dtype=dtype, **mode.runtime)
    return Engine(model=model, memory=memory, runtime=runtime, seed=seed)


def _effective(engine: Engine, at_last_block: dict | None = None) -> dict:
    """What the engine's last run really used, from its public API: static (on CUDA:
    captured) forwards, the page-table backend, and the history page pool's chunks and
    bytes. Reserved chunks stay with the pool after the run's session closed;
    ``at_last_block`` is ``engine.memory_usage()`` read while the session was still open
    (pages in use at the end of the run)."""
    graphs = getattr(engine, "graphs", None)
    info: dict = {"static_forwards": None if graphs is None else len(graphs),
                  "page_table": engine.describe()["page_table"]}
    usage = engine.memory_usage()
    if usage:
        info.update(history_chunk_pages=usage["chunk_pages"], history_page_bytes=usage["page_bytes"],
                    history_gpu_chunks=usage["gpu_chunks"], history_host_chunks=usage["host_chunks"],
                    history_gpu_pages_budget=usage["gpu_pages_budget"],
                    history_gpu_bytes_reserved=usage["gpu_bytes_reserved"],
                    history_host_bytes_reserved=usage["host_bytes_reserved"])
    if at_last_block:
        info.update(history_gpu_bytes_used_at_end=at_last_block["gpu_bytes_used"],
                    history_host_bytes_used_at_end=at_last_block["host_bytes_used"])
    return info


def _not_applied(mode: Mode, effective: dict, device: torch.device) -> str | None:
    """Why a mode's numbers would be mislabelled (its option had no effect), when the
    engine exposes enough to tell; None otherwise."""
    if device.type != "cuda":
        return None
    if mode.runtime.get("cuda_graphs") and effective["static_forwards"] == 0:
        return "cuda_graphs=True but the engine built no static forward"
    if mode.memory.get("history_tier") == "host" and "history_host_chunks" in effective \
            and not effective["history_host_chunks"]:
        # The device tier is only a staging area: unbounded, or holding more pages than its
        # budget, means the host tier was not used (a short run may fit the staging).
        budget = effective["history_gpu_pages_budget"]
        used = effective.get("history_gpu_bytes_used_at_end", 0) // effective["history_page_bytes"]
        if budget is None or used > budget:
            return "history_tier='host' but the engine kept every history page on the device"
    return None


def _timed_run(engine: Engine, device: torch.device, frames: int, seed: int) -> dict:
    """One generation of ``frames`` latent frames; per-block device, wall and host CPU times.

    Block n's device time is the span between CUDA events recorded after blocks n-1 and n
    on the compute stream, so work the engine overlaps on side streams and any idle gap
    of a host-bound loop are both counted, and no sync is added inside the loop.
    """
    cuda = device.type == "cuda"
    n_blocks = frames // engine.memory.frames_per_block
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n_blocks + 1)] if cuda else []
    wall, cpu, outputs = [time.perf_counter()], [time.process_time()], []
    at_last_block: dict | None = None
    if cuda:
        events[0].record()
    for i, out in enumerate(engine.stream(num_frames=frames, seed=seed)):
        if cuda:
            events[i + 1].record()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        outputs.append(out)   # the log is read after the loop: reading it syncs
        if i + 1 == n_blocks:
            at_last_block = engine.memory_usage()   # the run's session is still open here
    synchronize(device)
    wall_s = [b - a for a, b in zip(wall, wall[1:])]
    return {
        "block_seconds": [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])] if cuda else wall_s,
        "block_wall_seconds": wall_s,
        "block_host_cpu_seconds": [b - a for a, b in zip(cpu, cpu[1:])],
        "retrieved_frames": [_retrieved(out.log) for out in outputs],
        "at_last_block": at_last_block,
    }


def run_mode(name: str, mode: Mode, model: ModelConfig, device: torch.device, dtype: str,
             frames: int, seed: int, repeats: int = 1, warmup_frames: int = 0,
             host_budget_bytes: int | None = None) -> dict:
    """One engine: a warm-up run of ``warmup_frames`` latent frames (not timed), then
    ``repeats`` timed runs of ``frames`` frames, each a fresh session with the same seed.

    ``block_seconds`` (and the wall / host CPU lists) are per-block medians over the
    repeats; ``runs`` keeps every repeat's own times."""
    result: dict = {"mode": name, "description": mode.description,
                    "options": {"memory": mode.memory, "runtime": mode.runtime}}
    if mode.cuda_only and device.type != "cuda":
        return {**result, "status": "skipped", "reason": mode.cuda_only}
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        engine = _build(mode, model, device, dtype, seed, frames, host_budget_bytes)
    except (TypeError, ValueError) as exc:
        return {**result, "status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
    describe = {k: v for k, v in engine.describe().items() if k != "model"}

    runs = []
    warmup_s = None
    try:
        if warmup_frames:
            t0 = time.perf_counter()
            _timed_run(engine, device, warmup_frames, seed)
            warmup_s = time.perf_counter() - t0
        with NvmlSampler(device) as sampler:
            for _ in range(repeats):
                runs.append(_timed_run(engine, device, frames, seed))
    except Exception as exc:  # a crash of one mode must not lose the others' numbers
        traceback.print_exc()
        return {**result, "status": "failed", "reason": f"{type(exc).__name__}: {exc}", "engine": describe}

    effective = _effective(engine, runs[-1]["at_last_block"])
    mismatch = _not_applied(mode, effective, device)
    if mismatch is not None:
        return {**result, "status": "skipped", "reason": mismatch, "engine": describe, "effective": effective}

    def per_block_median(key):
        return [statistics.median(values) for values in zip(*(run[key] for run in runs))]

    retrieved = runs[0]["retrieved_frames"]
    forwards = len(engine.schedule) + 1
    batch = 1
    result.update(
        status="ok", engine=describe, forwards_per_block=forwards, repeats=repeats,
        warmup_frames=warmup_frames, warmup_seconds=warmup_s,
        block_seconds=per_block_median("block_seconds"), block_wall_seconds=per_block_median("block_wall_seconds"),
        block_host_cpu_seconds=per_block_median("block_host_cpu_seconds"),
        runs=[{k: v for k, v in run.items() if k != "at_last_block"} for run in runs],
        block_first_frame=[i * engine.memory.frames_per_block for i in range(len(retrieved))],
        retrieved_frames=retrieved, effective=effective,
        context_frames=[context_frames(engine.memory, i, r) for i, r in enumerate(retrieved)],
        block_flops=[block_flops(model, engine.memory, forwards, batch, i, r) for i, r in enumerate(retrieved)],
        window=engine.memory.window, frames_per_block=engine.memory.frames_per_block,
        history_host_budget_bytes=engine.memory.host_budget_bytes,
        peak_memory_allocated_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        peak_memory_reserved_bytes=torch.cuda.max_memory_reserved(device) if cuda else None,
        nvml=sampler.summary(),
    )
    del engine
    return result


# ---------------------------------------------------------------------- statistics
def steady_start(results: list[dict], warmup_blocks: int) -> int:
    """First steady-state block, the same for every mode: ``warmup_blocks`` after the
    first block whose context is full (window frames) in every mode that ran; graph
    capture and allocator growth happen when the shapes settle, so warm-up counts from there."""
    firsts = []
    for r in results:
        full = [i for i, c in enumerate(r["context_frames"]) if c == r["window"]]
        firsts.append(full[0] if full else len(r["context_frames"]))
    return (max(firsts) if firsts else 0) + warmup_blocks


def quartiles(values: list[float]) -> tuple[float, float]:
    """(25th, 75th) percentiles, linear interpolation; a single value is both."""
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def spread(r: dict, start: int) -> dict:
    """Noise of a mode's steady-state block times over its repeats: pooled median and IQR,
    each repeat's median, and whether either spread exceeds ``NOISY_SPREAD``."""
    pooled = [t for run in r["runs"] for t in run["block_seconds"][start:]]
    median = statistics.median(pooled)
    q1, q3 = quartiles(pooled)
    medians = [statistics.median(run["block_seconds"][start:]) for run in r["runs"]]
    iqr_rel = (q3 - q1) / median
    repeat_rel = (max(medians) - min(medians)) / median
    return {"block_ms_median_pooled": 1e3 * median, "block_ms_q1": 1e3 * q1, "block_ms_q3": 1e3 * q3,
            "block_ms_iqr": 1e3 * (q3 - q1), "iqr_pct_of_median": 100 * iqr_rel,
            "repeat_medians_ms": [1e3 * m for m in medians], "repeat_spread_pct_of_median": 100 * repeat_rel,
            "noisy": iqr_rel > NOISY_SPREAD or repeat_rel > NOISY_SPREAD}


def long_points(r: dict, points: tuple[int, ...] | None = None) -> dict:
    """Block time near each latent frame of ``points``: the median over the blocks of every
    repeat whose end frame lies within ``LONG_POINT_BLOCKS`` blocks of the point."""
    points = LONG_POINTS if points is None else points
    f = r["frames_per_block"]
    ends = [first + f for first in r["block_first_frame"]]
    out = {}
    for point in points:
        near = [i for i, e in enumerate(ends) if abs(e - point) <= LONG_POINT_BLOCKS * f]
        times = [run["block_seconds"][i] for run in r["runs"] for i in near]
        out[str(point)] = None if not times else {
            "block_ms_median": 1e3 * statistics.median(times), "blocks": len(times),
            "latent_frames": [ends[near[0]] - f, ends[near[-1]]]}
    first, last = (out.get(str(p)) for p in (points[0], points[-1]))
    growth = 100 * (last["block_ms_median"] / first["block_ms_median"] - 1) if first and last else None
    return {"points": out, "growth_pct": growth}


def summarize(r: dict, start: int, rate: float) -> dict:
    times = r["block_seconds"][start:]
    if not times:
        return {"steady_blocks": 0, "reason": f"no steady-state block: the run has {len(r['block_seconds'])} "
                                              f"blocks and the steady state starts at block {start}"}
    noise = spread(r, start)
    # Pooled over the repeats: the figure the modes are compared by.
    median = noise["block_ms_median_pooled"] / 1e3
    flops = statistics.median(r["block_flops"][start:])
    g = max(1, min(GROWTH_BLOCKS, len(times) // 3))
    early, late = statistics.median(times[:g]), statistics.median(times[-g:])
    f = r["frames_per_block"]
    cpu_per_block = statistics.median(r["block_host_cpu_seconds"][start:])
    on_cuda = r["peak_memory_allocated_bytes"] is not None
    return {
        "steady_blocks": len(times), "first_steady_block": start,
        "block_ms_median": 1e3 * median, "block_ms_p90": 1e3 * percentile(times, 90),
        "block_ms_mean": 1e3 * statistics.fmean(times), "block_ms_min": 1e3 * min(times),
        "block_ms_max": 1e3 * max(times),
        "latent_frames_per_s": f / median, "fps_video": VAE_TIME_STRIDE * f / median,
        "flops_per_block": flops, "flops_per_s": flops / median, "mfu": flops / median / rate,
        "growth": {"early_ms": 1e3 * early, "late_ms": 1e3 * late, "pct": 100 * (late / early - 1),
                   "early_latent_frames": [r["block_first_frame"][start], r["block_first_frame"][start + g - 1] + f],
                   "late_latent_frames": [r["block_first_frame"][-g], r["block_first_frame"][-1] + f]},
        "host_cpu_ms_per_block": 1e3 * cpu_per_block,
        "host_cpu_ms_per_forward": 1e3 * cpu_per_block / r["forwards_per_block"],
        # On the CPU the host is the device; the ratio says nothing there.
        "host_cpu_fraction_of_device": cpu_per_block / median if on_cuda else None,
        "repeats": len(r["runs"]), **noise,
    }


def _ratio(summaries: dict, a: str, b: str) -> float | None:
    sa, sb = summaries.get(a), summaries.get(b)
    if not sa or not sb or not sa.get("steady_blocks") or not sb.get("steady_blocks"):
        return None
    return sa["block_ms_median"] / sb["block_ms_median"]


def derived(summaries: dict) -> dict:
    """Comparisons between modes (block-time medians) and per-mode growth / host share."""
    def pct(x):
        return None if x is None else 100 * (x - 1)
    graphs = _ratio(summaries, "retrieval", "retrieval-graphs")
    engine_modes = [m for m in ("retrieval", "retrieval-graphs", "retrieval-host")
                    if summaries.get(m, {}).get("steady_blocks")]
    best = min(engine_modes, key=lambda m: summaries[m]["block_ms_median"]) if engine_modes else None
    return {
        "retrieval_vs_native_overhead_pct": pct(_ratio(summaries, "retrieval", "native")),
        "retrieval_graphs_vs_native_graphs_overhead_pct": pct(_ratio(summaries, "retrieval-graphs", "native-graphs")),
        "graphs_speedup_x": graphs,
        "host_tier_vs_device_pct": pct(_ratio(summaries, "retrieval-host", "retrieval")),
        "baseline_refetch_vs_retrieval_x": _ratio(summaries, "baseline-refetch", "retrieval"),
        "baseline_refetch_vs_best_engine_mode_x": _ratio(summaries, "baseline-refetch", best) if best else None,
        "best_engine_mode": best,
        "best_engine_mode_fps_video": summaries[best]["fps_video"] if best else None,
        "best_engine_mode_mfu": summaries[best]["mfu"] if best else None,
        "growth_pct": {m: s["growth"]["pct"] for m, s in summaries.items() if s.get("steady_blocks")},
        "host_cpu_fraction_of_device": {m: s["host_cpu_fraction_of_device"] for m, s in summaries.items()
                                        if s.get("steady_blocks")},
    }


# ---------------------------------------------------------------------- output
def _fmt(value, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        width = spec.split(".")[0].lstrip("+")
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(value * scale, spec) + unit


def print_tables(report: dict) -> None:
    rate = report["matmul"]
    unit = "TFLOP/s" if rate["dtype"] == "bfloat16" else "GFLOP/s"
    scale = 1e-12 if unit == "TFLOP/s" else 1e-9
    print(f"\nmatmul {rate['dtype']} {rate['n']}^3: {rate['flops_per_s'] * scale:.1f} {unit}; copy "
          f"{report['copy']['d2d_bytes_per_s'] * 1e-9:.1f} GB/s (read+write)"
          + (f"; pinned H2D {report['copy']['h2d_pinned_bytes_per_s'] * 1e-9:.1f} GB/s"
             if report["copy"]["h2d_pinned_bytes_per_s"] else ""))
    if report["config"]["device"] == "cpu":
        print("CODE-PATH CHECK on the CPU, not a GPU measurement: the figures compare code paths and "
              "overheads only; the host tier and the device are the same memory here")
    print(f"steady state from block {report['steady_start_block']} "
          f"(latent frame {report['steady_start_block'] * report['config']['frames_per_block']}); "
          "FPS = video frames/s (4 x latent), DiT only, VAE excluded")
    head = (f"{'mode':<18} {'status':<8} {'median ms':>10} {'IQR ms':>8} {'runs':>4} {'p90 ms':>9} {'FPS':>8} "
            f"{'MFU':>7} {'peak GB':>8} {'power W':>8} {'SM MHz':>7} {'host/dev':>9}")
    print(head)
    print("-" * len(head))
    for r in report["modes"]:
        s = report["summary"].get(r["mode"]) or {}
        if r["status"] != "ok":
            print(f"{r['mode']:<18} {r['status']:<8} {r['reason']}")
            continue
        nv = r.get("nvml") or {}
        print(f"{r['mode']:<18} {'ok':<8} {_fmt(s.get('block_ms_median'), '10.2f')} "
              f"{_fmt(s.get('block_ms_iqr'), '8.2f')} {r['repeats']:>4} {_fmt(s.get('block_ms_p90'), '9.2f')} "
              f"{_fmt(s.get('fps_video'), '8.2f')} "
              f"{_fmt(s.get('mfu'), '.1f', 100, '%'):>7} {_fmt(r['peak_memory_allocated_bytes'], '8.2f', 1e-9)} "
              f"{_fmt(nv.get('power_w_mean'), '8.0f')} {_fmt(nv.get('sm_clock_mhz_median'), '7.0f')} "
              f"{_fmt(s.get('host_cpu_fraction_of_device'), '.1f', 100, '%'):>9}")
    d = report["derived"]
    # Targets are GPU figures at the reference workload; next to anything else they mislead.
    targets = report["reference_workload"]
    print(f"\n{'comparison':<52} {'value':>10}" + ("   issue-5 target (reference workload, H100)" if targets else ""))
    rows = [
        ("retrieval vs native, block time", _fmt(d["retrieval_vs_native_overhead_pct"], "+.1f", unit=" %"), "<= +2 %"),
        ("retrieval vs native, both with graphs",
         _fmt(d["retrieval_graphs_vs_native_graphs_overhead_pct"], "+.1f", unit=" %"), "<= +2 %"),
        (f"FPS of the best retrieval mode ({d['best_engine_mode'] or '-'})",
         _fmt(d["best_engine_mode_fps_video"], ".1f"), ">= 40 (MFU ~60 %)"),
        ("MFU of the best retrieval mode", _fmt(d["best_engine_mode_mfu"], ".1f", 100, " %"), ""),
        ("graphs vs eager speed-up", _fmt(d["graphs_speedup_x"], ".2f", unit=" x"), ""),
        ("host tier vs device history", _fmt(d["host_tier_vs_device_pct"], "+.1f", unit=" %"), ""),
        ("baseline-refetch vs retrieval", _fmt(d["baseline_refetch_vs_retrieval_x"], ".2f", unit=" x"), ""),
        (f"baseline-refetch vs best ({d['best_engine_mode'] or '-'})",
         _fmt(d["baseline_refetch_vs_best_engine_mode_x"], ".2f", unit=" x"), ""),
    ]
    for mode, g in d["growth_pct"].items():
        s = report["summary"][mode]["growth"]
        rows.append((f"growth {mode}, frames {s['early_latent_frames'][0]}-{s['early_latent_frames'][1]} -> "
                     f"{s['late_latent_frames'][0]}-{s['late_latent_frames'][1]}", _fmt(g, "+.1f", unit=" %"),
                     "<= +3 % (frame 100 -> 1000)"))
    for mode, h in d["host_cpu_fraction_of_device"].items():
        if h is not None:
            rows.append((f"host CPU / device time, {mode}", _fmt(h, ".1f", 100, " %"),
                         "<= 5 % with graphs" if mode == "retrieval-graphs" else ""))
    for r in report["modes"]:
        if r["status"] == "ok" and r["options"]["runtime"].get("cuda_graphs"):
            rows.append((f"static forwards built, {r['mode']}", str(r["effective"]["static_forwards"]), "> 0"))
    for name, value, target in rows:
        print(f"{name:<52} {value:>10}" + (f"   {target}" if targets else ""))
    for mode, lp in report.get("long", {}).items():
        for point, at in lp["points"].items():
            print(f"{'block ms at latent frame ' + point + ', ' + mode:<52} "
                  f"{_fmt(at and at['block_ms_median'], '10.2f')}")
        print(f"{'growth frame ' + ' -> '.join(lp['points']) + ', ' + mode:<52} "
              f"{_fmt(lp['growth_pct'], '+10.1f', unit=' %')}" + ("   <= +3 %" if targets else ""))
    for warning in report.get("warnings", []):
        print(f"WARNING: {warning}")


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in report["modes"]:
        if r["status"] != "ok":
            continue
        x = [f + r["frames_per_block"] for f in r["block_first_frame"]]
        ax.plot(x, [1e3 * t for t in r["block_seconds"]], marker=".", label=r["mode"])
    start = report["steady_start_block"] * report["config"]["frames_per_block"]
    ax.axvline(start, color="grey", linestyle="--", linewidth=1, label="steady state from here")
    ax.set_xlabel("latent frames generated (end of block)")
    ax.set_ylabel("block latency (ms)")
    cfg = report["config"]
    ax.set_title(f"{report['environment']['device']['name']}: {cfg['preset']} {cfg['dtype']}, "
                 f"window {cfg['window']}, K {cfg['top_k']}, {cfg['steps']}+1 forwards/block")
    # Log scale keeps a capture or allocation spike from flattening every other block;
    # plain tick labels keep it readable.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS),
                        help=f"model shapes (default {REFERENCE['preset']} on CUDA, {CPU_DEFAULT['preset']} on CPU)")
    parser.add_argument("--frames", type=int, default=None,
                        help=f"latent frames per timed run (default {REFERENCE['frames']} on CUDA, "
                             f"{CPU_DEFAULT['frames']} on CPU, {LONG_FRAMES} with --long)")
    parser.add_argument("--dtype", default=None,
                        help=f"default {REFERENCE['dtype']} on CUDA, {CPU_DEFAULT['dtype']} on CPU")
    parser.add_argument("--modes", default=None,
                        help=f"comma list of {', '.join(MODES)} (default all; {LONG_MODES} with --long)")
    parser.add_argument("--warmup-blocks", type=int, default=2,
                        help="blocks left out after the context first fills (default 2)")
    parser.add_argument("--warmup-frames", type=int, default=None,
                        help="latent frames of the untimed warm-up run of each mode's engine (default: the "
                             "window plus two blocks; 0: none)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per mode (default 3; 1 with --long)")
    parser.add_argument("--long", action="store_true",
                        help=f"block time at latent frames {' and '.join(map(str, LONG_POINTS))}, history in the "
                             "host tier under --host-budget-gb")
    parser.add_argument("--host-budget-gb", type=float, default=None,
                        help=f"cap of the host-tier history in GB, oldest frames dropped past it (default "
                             f"{LONG_HOST_BUDGET_GB:g} with --long, none otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default 1 on the CPU, where more threads on a shared "
                             "machine swamp the differences between modes; torch's choice on CUDA)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON path (default {DEFAULT_OUT_DIR.relative_to(REPO)}/latency-<device>-<date>.json, "
                             "ignored by git)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default next to the JSON)")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"latency: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        return _fail(f"--device {args.device!r} is not a torch device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but CUDA is not available")
    defaults = REFERENCE if device.type == "cuda" else CPU_DEFAULT
    preset = args.preset or defaults["preset"]
    dtype = args.dtype or defaults["dtype"]
    frames = (LONG_FRAMES if args.long else defaults["frames"]) if args.frames is None else args.frames
    modes = [m.strip() for m in (args.modes or (LONG_MODES if args.long else ",".join(MODES))).split(",")
             if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    memory = MemoryConfig()
    repeats = (1 if args.long else 3) if args.repeats is None else args.repeats
    warmup_frames = memory.window + 2 * memory.frames_per_block if args.warmup_frames is None else args.warmup_frames
    host_gb = LONG_HOST_BUDGET_GB if args.long and args.host_budget_gb is None else args.host_budget_gb
    if unknown or not modes:
        return _fail(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if frames <= 0 or frames % memory.frames_per_block:
        return _fail(f"--frames must be a positive multiple of {memory.frames_per_block}, got {frames}")
    if warmup_frames < 0 or warmup_frames % memory.frames_per_block:
        return _fail(f"--warmup-frames must be 0 or a positive multiple of {memory.frames_per_block}, "
                     f"got {warmup_frames}")
    if repeats < 1:
        return _fail(f"--repeats must be >= 1, got {repeats}")
    if host_gb is not None and not host_gb > 0:
        return _fail(f"--host-budget-gb must be > 0, got {host_gb}")
    if args.long and frames < LONG_POINTS[-1]:
        print(f"latency: --long with {frames} frames reaches no block near frame {LONG_POINTS[-1]}; the points "
              "past the run are reported as missing")
    threads = (1 if device.type == "cpu" else None) if args.threads is None else args.threads
    if threads is not None and threads < 1:
        return _fail(f"--threads must be >= 1, got {threads}")
    if args.warmup_blocks < 0:
        return _fail(f"--warmup-blocks must be >= 0, got {args.warmup_blocks}")
    try:
        RuntimeConfig(device=str(device), dtype=dtype)
    except ValueError as exc:
        return _fail(str(exc))
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)   # events and streams below use the current device
    model = ModelConfig.preset(preset)
    reference = (device.type == "cuda" and preset == REFERENCE["preset"] and frames >= REFERENCE["frames"]
                 and resolve_dtype(dtype) == resolve_dtype(REFERENCE["dtype"]))
    what = ("the PERF.md reference workload" if reference else
            "a smaller workload, NOT the PERF.md reference workload")
    kind = "GPU measurement" if device.type == "cuda" else "code-path check on the CPU (not a GPU measurement)"
    print(f"latency: {kind}; {what}: preset {preset}, {dtype}, {frames} latent frames x {repeats} timed runs "
          f"after a {warmup_frames}-frame warm-up, batch 1, window {memory.window}, "
          f"sink {memory.sink}, K {memory.top_k}, R {memory.recency_guard}, {memory.frames_per_block} frames/block, "
          f"{len(RuntimeConfig().denoising_steps)} steps + recache, text {model.text_len} tokens, "
          f"random weights, on {device}, {torch.get_num_threads()} torch threads")

    env = environment(device)
    rate = matmul_rate(device)
    copy = copy_bandwidth(device)
    host_budget_bytes = None if host_gb is None else int(host_gb * 1e9)
    date = now().strftime("%Y-%m-%d")
    out = args.out or DEFAULT_OUT_DIR / f"latency-{'long-' if args.long else ''}{device_slug(device)}-{date}.json"
    # Rewritten after every mode, so that a run cut short keeps the modes it finished.
    partial = out.with_suffix(".partial.json")
    results = []
    for name in modes:
        print(f"  running {name} ...", flush=True)
        results.append(run_mode(name, MODES[name], model, device, dtype, frames, args.seed, repeats=repeats,
                                warmup_frames=warmup_frames, host_budget_bytes=host_budget_bytes))
        r = results[-1]
        if r["status"] != "ok":
            print(f"  {name}: {r['status']}: {r['reason']}")
        write_json(partial, {"benchmark": "latency", "kind": kind, "partial": True, "reference_workload": reference,
                             "environment": env, "modes": results})
    ran = [r for r in results if r["status"] == "ok"]
    start = steady_start(ran, args.warmup_blocks)
    summaries = {r["mode"]: summarize(r, start, rate["flops_per_s"]) for r in ran}
    steady_flops = forward_flops(model, 1, memory.frames_per_block, memory.window)
    warnings = [f"{m}: block times spread widely (IQR {s['iqr_pct_of_median']:.0f} % of the median, repeats' "
                f"medians {s['repeat_spread_pct_of_median']:.0f} % apart): comparisons with it are unreliable"
                + (" (a busy CPU? rerun on an idle machine)" if device.type == "cpu" else "")
                for m, s in summaries.items() if s.get("noisy")]
    report = {
        "benchmark": "latency",
        "kind": kind,
        "reference_workload": reference,
        "environment": env,
        "matmul": rate,
        "copy": copy,
        "config": {"preset": preset, "model": model.to_dict(), "dtype": dtype, "device": str(device),
                   "frames": frames, "batch": 1, "window": memory.window, "sink": memory.sink,
                   "top_k": memory.top_k, "recency_guard": memory.recency_guard,
                   "frames_per_block": memory.frames_per_block, "steps": len(RuntimeConfig().denoising_steps),
                   "text_tokens": model.text_len, "seed": args.seed, "warmup_blocks": args.warmup_blocks,
                   "warmup_frames": warmup_frames, "repeats": repeats, "long": args.long,
                   "host_budget_bytes_cap": host_budget_bytes,
                   "torch_threads": torch.get_num_threads(),
                   "weights": "random"},
        "flops_per_forward_full_context": steady_flops,
        "flops_per_block_full_context": (len(RuntimeConfig().denoising_steps) + 1) * steady_flops["total"],
        "steady_start_block": start,
        "notes": [
            "FPS = video frames per second = 4 x latent frames per second, steady state, DiT only, VAE excluded",
            "block time on CUDA: CUDA events recorded on the compute stream after each block; on CPU: perf_counter",
            "each mode: one engine, an untimed warm-up run, then the timed runs (fresh sessions, same seed); "
            "medians and IQR pool the steady-state blocks of every timed run",
            "MFU = FLOPs per block (linear + self-attention at the real context + cross-attention, "
            "x (steps + 1)) / block time / measured matmul rate",
            "host CPU time is time.process_time of the whole process: an upper bound that includes any "
            "time the host spins in a device sync",
        ],
        "modes": results,
        "summary": summaries,
        "warnings": warnings,
        "skipped": {r["mode"]: r["reason"] for r in results if r["status"] == "skipped"},
        "failed": {r["mode"]: r["reason"] for r in results if r["status"] == "failed"},
    }
    if args.long:
        report["long"] = {r["mode"]: long_points(r) for r in ran}
    report["derived"] = derived(summaries)

    write_json(out, report)
    partial.unlink(missing_ok=True)
    png = plot(report, args.plot or out.with_suffix(".png"))
    print_tables(report)
    print(f"\nwrote {out} and {png}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
