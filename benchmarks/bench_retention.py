"""A capped history over long runs: memory stays flat, block time stays flat, and what
each retention policy does to retrieval quality.

Two parts, one process, one thread (``torch.set_num_threads(1)``):

1. Long run: the CPU tiny preset (SPEC defaults: window 12, sink 1, top_k 6, recency
   guard 5, 3 frames per block) generates ``--frames`` latent frames (default 10 002,
   the multiple of 3 past 10 000) with ``max_history_frames=--cap`` under each policy.
   Sampled along the run: resident set size (``/proc/self/status`` VmRSS), the page
   pool's used and reserved bytes, the history frames held; per block, its wall time
   and this process's CPU time (the CPU time is what to compare along a run on a
   shared machine: other processes' load changes the wall time, not this). Block time
   at frames 100 / 1 000 / 10 000 is the median of the blocks whose last frame lies
   within ``--window`` frames before each mark.
2. Retrieval quality on the synthetic recurring-scene corpus of ``lrag-engine
   eval-retrieval`` (``lrag_engine.encoder.corpus``), made long: each frame is appended
   to a history store of spatial-mean descriptors (the engine's default descriptor)
   and then queries it for the top ``--k`` frames (recency guard: the segment length,
   so only earlier visits of a scene count, as ``lrag_engine.encoder.evaluate`` does);
   retrieved frames count as hits for "least_retrieved". precision@K = the share of
   retrieved frames showing the query's scene, over the queries that the uncapped
   history could answer (at least K candidates, one of the query's scene).

Writes a JSON report and a PNG plot. ``--quick`` shrinks everything (the smoke test).

    python -m benchmarks.bench_retention --out benchmarks/results/retention-cpu-2026-12-02.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lrag_engine import Engine, MemoryConfig
from lrag_engine.bench.timing import torch_threads
from lrag_engine.config import RETENTION_POLICIES
from lrag_engine.encoder.corpus import SyntheticCorpusConfig, generate_synthetic_corpus
from lrag_engine.memory.history import HistoryStore, PagePool
from lrag_engine.memory.retrieval import MeanDescriptor, retrieve


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def long_run(retention: str, frames: int, cap: int | None, sample_every: int, marks: tuple[int, ...],
             window: int) -> dict:
    """One long generation on the tiny preset; samples memory, times every block."""
    memory = MemoryConfig(max_history_frames=cap, retention=retention)
    engine = Engine("tiny", memory=memory, seed=0)
    f = memory.frames_per_block
    frames -= frames % f
    block_seconds, block_cpu, samples = [], [], []
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, out in enumerate(engine.stream(num_frames=frames)):
        block_seconds.append(time.perf_counter() - start)
        block_cpu.append(time.process_time() - cpu_start)
        end_frame = (i + 1) * f
        if i % max(1, sample_every // f) == 0 or end_frame == frames:
            usage = engine.memory_usage()
            samples.append(dict(frame=end_frame, rss_bytes=rss_bytes(),
                                pool_used_bytes=usage.get("gpu_bytes_used", 0) + usage.get("host_bytes_used", 0),
                                pool_reserved_bytes=usage.get("gpu_bytes_reserved", 0)
                                + usage.get("host_bytes_reserved", 0),
                                history_frames=engine.cache.history.num_frames,
                                kept=out.log.kept, eligible=out.log.eligible))
        del out
        start, cpu_start = time.perf_counter(), time.process_time()
    times, cpu_times = {}, {}
    for mark in marks:
        if mark > frames:
            continue
        for series, into in ((block_seconds, times), (block_cpu, cpu_times)):
            around = [t for i, t in enumerate(series) if mark - window < (i + 1) * f <= mark]
            into[str(mark)] = statistics.median(around) if around else None
    after_cap = [s for s in samples if cap is not None and s["frame"] > cap + memory.window + 2 * f]
    return dict(retention=retention, frames=frames, cap=cap, block_seconds_at=times, block_cpu_seconds_at=cpu_times,
                total_seconds=sum(block_seconds), samples=samples,
                peak_rss_bytes=max(s["rss_bytes"] for s in samples),
                peak_pool_used_bytes=max(s["pool_used_bytes"] for s in samples),
                peak_pool_reserved_bytes=max(s["pool_reserved_bytes"] for s in samples),
                pool_used_flat_after_cap=(len({s["pool_used_bytes"] for s in after_cap}) == 1) if after_cap else None,
                rss_after_cap_bytes=[min(s["rss_bytes"] for s in after_cap),
                                     max(s["rss_bytes"] for s in after_cap)] if after_cap else None,
                max_history_frames_held=max(s["history_frames"] for s in samples))


def retrieval_quality(corpus: SyntheticCorpusConfig, cap: int | None, k: int, recency: int,
                      policies: tuple[str, ...]) -> dict:
    """precision@k of same-scene retrieval per policy (and uncapped: key "uncapped")."""
    latents, scenes = generate_synthetic_corpus(corpus)
    describe = MeanDescriptor(corpus.channels)
    runs = [("uncapped", None, "drop_oldest")] + [(p, cap, p) for p in policies]
    # the queries the uncapped history can answer, per video
    answerable = []
    for v in range(latents.shape[0]):
        ids = scenes[v]
        answerable.append([t for t in range(latents.shape[1]) if t - recency >= k
                           and bool((ids[:t - recency] == ids[t]).any())])
    results = {}
    for name, run_cap, retention in runs:
        total, queries = 0.0, 0
        for v in range(latents.shape[0]):
            desc = describe(latents[v]).float()                          # [T, C]
            pool = PagePool(1, 1, 1, 2, torch.float32, "cpu", chunk_pages=64)
            store = HistoryStore(pool, 1, desc.shape[1], max_frames=run_cap, retention=retention,
                                 recency_guard=recency)
            zeros = torch.zeros(1, 1, 1, 1, 1, 2)
            want = set(answerable[v])
            for t in range(desc.shape[0]):
                if t in want:
                    result = retrieve(desc[t:t + 1], store.descriptors(), store.descriptor_norms(), k, recency)
                    if result.count:
                        store.record_hits(result.index)
                        got = store.frame_ids().gather(1, result.index)[0]
                        total += float((scenes[v][got] == scenes[v][t]).sum()) / k
                    queries += 1
                store.append(zeros, zeros, desc[t].view(1, 1, -1))
            store.close()
        results[name] = {f"p@{k}": total / max(1, queries), "queries": queries, "cap": run_cap}
    return results


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in report["long_runs"]:
        frames = [s["frame"] for s in run["samples"]]
        axes[0].plot(frames, [s["rss_bytes"] / 2 ** 20 for s in run["samples"]], label=run["retention"])
        axes[1].plot(frames, [s["pool_used_bytes"] / 2 ** 20 for s in run["samples"]], label=run["retention"])
        marks = sorted(run["block_seconds_at"], key=int)
        axes[2].plot([int(m) for m in marks], [1e3 * (run["block_cpu_seconds_at"][m] or 0) for m in marks], "o-",
                     label=run["retention"])
    axes[0].set(title="resident set size", xlabel="frame", ylabel="MiB")
    axes[1].set(title=f"history pool in use (cap {report['cap']} frames)", xlabel="frame", ylabel="MiB")
    axes[2].set(title="block CPU time (median of the blocks before the mark)", xlabel="frame", ylabel="ms",
                xscale="log")
    quality = report["retrieval_quality"]
    k = report["corpus"]["k"]
    text = "  ".join(f"{name}: p@{k}={row[f'p@{k}']:.3f}" for name, row in quality.items())
    fig.suptitle(f"CPU tiny preset, {report['frames']} frames; retrieval quality: {text}", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    with torch_threads(None):   # _main sets one thread; the caller's count comes back
        return _main(argv)


def _main(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_002)
    parser.add_argument("--cap", type=int, default=256)
    parser.add_argument("--policies", default=",".join(RETENTION_POLICIES))
    parser.add_argument("--sample-every", type=int, default=99, help="frames between memory samples")
    parser.add_argument("--window", type=int, default=60, help="frames before each mark whose blocks are timed")
    parser.add_argument("--corpus-frames", type=int, default=2048, help="frames per synthetic video")
    parser.add_argument("--corpus-videos", type=int, default=2)
    parser.add_argument("--corpus-scenes", type=int, default=16)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (the PNG goes next to it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    policies = tuple(p for p in args.policies.split(",") if p)
    for p in policies:
        if p not in RETENTION_POLICIES:
            raise SystemExit(f"--policies: unknown policy {p!r}; choose from {RETENTION_POLICIES}")
    if args.quick:
        args.frames, args.cap, args.sample_every, args.window = 60, 12, 6, 6
        args.corpus_frames, args.corpus_videos, args.corpus_scenes = 96, 1, 4
    marks = (100, 1_000, 10_000) if not args.quick else (15, 30, 60)
    corpus = SyntheticCorpusConfig(num_videos=args.corpus_videos, frames_per_video=args.corpus_frames,
                                   num_scenes=args.corpus_scenes, seed=1)
    report = dict(benchmark="bench_retention", machine=platform.machine(), threads=torch.get_num_threads(),
                  frames=args.frames, cap=args.cap, marks=list(marks),
                  memory=dataclasses.asdict(MemoryConfig(max_history_frames=args.cap)),
                  corpus={**dataclasses.asdict(corpus), "k": args.k, "recency": corpus.segment_len},
                  long_runs=[])
    for policy in policies:
        run = long_run(policy, args.frames, args.cap, args.sample_every, marks, args.window)
        report["long_runs"].append(run)
        print(f"{policy:>16}: {run['total_seconds']:.1f} s, peak RSS {run['peak_rss_bytes'] / 2 ** 20:.0f} MiB, "
              f"pool {run['peak_pool_used_bytes'] / 2 ** 20:.1f} MiB (flat after cap: "
              f"{run['pool_used_flat_after_cap']}), block ms (wall / CPU) at marks "
              + ", ".join(f"{m}: {1e3 * v:.1f} / {1e3 * run['block_cpu_seconds_at'][m]:.1f}"
                          for m, v in run["block_seconds_at"].items() if v is not None),
              flush=True)
    report["retrieval_quality"] = retrieval_quality(corpus, args.cap, args.k, corpus.segment_len, policies)
    for name, row in report["retrieval_quality"].items():
        print(f"{name:>16}: p@{args.k} = {row[f'p@{args.k}']:.3f} over {row['queries']} queries", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        plot(report, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
