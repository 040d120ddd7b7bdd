"""Load test of the stream scheduler: N concurrent streams, batched against one at a time.

Each run drives one :class:`lrag_engine.serving.Scheduler` directly from one thread, as a
server's engine loop does: before each ``step()`` the streams whose arrival is due are
submitted, and after it every block is handed to its consumer, which may then cancel its
stream or switch its prompt before the next step. Arrivals, cancellations and switches
are placed by scheduler step and by blocks received (not by wall time), drawn from a
seeded plan, so that both modes run exactly the same work and a run is reproducible:

- stream i joins ``stagger`` steps or fewer after stream i-1 (drawn);
- each has its own seed, prompt and length (``--min-blocks`` to ``--max-blocks``
  blocks), or no length (an endless stream, always cancelled);
- some switch prompt on a timeline given with the request (``prompt_timeline``), some
  by a ``switch_prompt`` call once they received k blocks (the switch applies before
  block k);
- some are cancelled once they received k blocks (k = 0: right after submission).

Modes, run in turn within one process on one engine (``--reps`` times each after
``--warmup`` discarded runs, the order alternating): "batched" (``max_batch = N``: streams
with equal context signatures share each forward) and "one_at_a_time" (``max_batch = 1``:
every stream's block runs its own forwards). ``max_streams = N`` in both. At N = 1 the
two are the same configuration, so their ratio there measures the noise of the machine.

Reported per N and mode: aggregate blocks/s and video FPS (4 x latent frames/s, DiT only,
no VAE decode) over the wall time from the first submission to the last block (median of
the reps, min, max, and the median of the per-rep batched/one-at-a-time ratios, also over
process CPU time as a control on a shared machine); the
per-stream block latency (time between consecutive blocks of one stream as its consumer
sees them) p50/p99 pooled over the reps, and the worst stream's p99; the time to first
block (submission to first block) p50/p99; the mean batch of the blocks; the page pool
before, at its peak and after the last stream ended (``engine.memory_usage()``); and the
accounting: every (request id, block) received against what each request must produce
given its plan (its length, or the block count at which it was cancelled): lost,
duplicated, unexpected and out-of-order blocks, wrong ``final`` flags, missing or wrong
``StreamEnd`` records and failed streams; all of them must be 0.

Workloads: "tiny" (default; the tiny preset on the CPU, float32, one torch thread, the
MemoryConfig() defaults with a history cap of 48 frames per stream, streams of 16 to 32
blocks, a random text encoder for the prompts; timings on a shared CPU are code-path
checks, not performance) and "reference" (PERF.md: the Wan2.1-1.3B shapes with random
weights, bf16 on CUDA with CUDA graphs, blocks of 3 frames, window 12, K 6, R 5, a
history cap of 120 frames, streams of 40 to 60 blocks; for a GPU). Endless streams need
the cap: the Scheduler refuses an endless stream whose history has no bound.

    python benchmarks/serving.py [--workload tiny|reference] [--streams 1,2,4,8,16] [--reps 7]
                                 [--warmup 1] [--seed 0] [--min-blocks B] [--max-blocks B]
                                 [--stagger S] [--out PATH] [--plot PATH]

Writes JSON (default ``benchmarks/results/serving-<device>-<date>.json``) starting with the
environment record of ``lrag_engine.bench.records``, and with ``--plot`` a PNG of
throughput and p99 block latency against N.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lrag_engine.bench.devices import device_slug
from lrag_engine.bench.provenance import now
from lrag_engine.bench.records import environment, write_json
from lrag_engine.bench.timing import percentile, synchronize, torch_threads
from lrag_engine.config import MemoryConfig, RuntimeConfig
from lrag_engine.engine import Engine

REPO = Path(__file__).resolve().parents[1]
MODES = {"batched": None, "one_at_a_time": 1}   # Scheduler max_batch: None = N
VIDEO_FRAMES_PER_LATENT = 4                     # the Wan VAE expands time by 4
PROMPTS = ("a red fox running through fresh snow", "waves breaking on black volcanic rocks",
           "a night market lit by paper lanterns", "a hot air balloon over green hills",
           "rain on a window, city lights behind it", "a paper boat drifting down a gutter")
# Fractions of the streams that get each event (independent draws per stream).
P_ENDLESS, P_CANCEL, P_TIMELINE_SWITCH, P_LIVE_SWITCH = 0.15, 0.25, 0.3, 0.3
ENDLESS_SPAN = 1.5   # an endless stream is cancelled after up to 1.5 x --max-blocks blocks
# Endless streams need a bounded history (the Scheduler refuses them otherwise); the caps
# sit below the longest streams' history, so the longest ones also run past the cap.
HISTORY_CAP = {"tiny": 48, "reference": 120}


@dataclass(frozen=True)
class Workload:
    preset: str
    memory: MemoryConfig
    runtime: RuntimeConfig
    streams: tuple[int, ...]
    min_blocks: int
    max_blocks: int
    stagger: int
    reps: int
    note: str


WORKLOADS = {
    "tiny": Workload("tiny", MemoryConfig(max_history_frames=HISTORY_CAP["tiny"]),
                     RuntimeConfig(device="cpu", dtype="float32"), (1, 2, 4, 8, 16),
                     min_blocks=16, max_blocks=32, stagger=2, reps=7,
                     note="CPU, tiny preset: a check of the serving code path; the times of a shared CPU "
                          "are not GPU performance"),
    "reference": Workload("wan2.1-t2v-1.3b", MemoryConfig(max_history_frames=HISTORY_CAP["reference"]),
                          RuntimeConfig(device="cuda", dtype="bfloat16", cuda_graphs=True), (1, 2, 4, 8),
                          min_blocks=40, max_blocks=60, stagger=2, reps=3,
                          note="PERF.md reference shapes (random weights), DiT only, VAE decode excluded"),
}


# ---------------------------------------------------------------------- the plan
@dataclass
class StreamPlan:
    """What one stream does. Counts are blocks the consumer received."""
    index: int
    join_step: int                      # submitted just before this scheduler step
    seed: int
    prompt: str
    blocks: int | None                  # None: endless
    prompt_timeline: dict[int, str] = field(default_factory=dict)
    recache_sink: bool = False
    live_switches: dict[int, str] = field(default_factory=dict)   # {blocks received: prompt}
    cancel_after: int | None = None     # cancel once this many blocks were received

    @property
    def expected_blocks(self) -> int:
        return self.cancel_after if self.cancel_after is not None else self.blocks

    @property
    def expected_status(self) -> str:
        return "cancelled" if self.cancel_after is not None else "finished"


def make_plan(n: int, seed: int, min_blocks: int, max_blocks: int, stagger: int) -> list[StreamPlan]:
    """The seeded plan of ``n`` streams; the same arguments give the same plan."""
    if n < 1 or min_blocks < 1 or max_blocks < min_blocks or stagger < 0:
        raise ValueError(f"make_plan: need n >= 1, 1 <= min_blocks <= max_blocks and stagger >= 0, got n={n}, "
                         f"min_blocks={min_blocks}, max_blocks={max_blocks}, stagger={stagger}")
    rng = random.Random(f"serving-{seed}-{n}")
    plans, join = [], 0
    for i in range(n):
        if i:
            join += rng.randint(0, stagger)
        endless = rng.random() < P_ENDLESS
        blocks = None if endless else rng.randint(min_blocks, max_blocks)
        plan = StreamPlan(index=i, join_step=join, seed=rng.randrange(2 ** 31), prompt=rng.choice(PROMPTS),
                          blocks=blocks, recache_sink=rng.random() < 0.5)
        if endless:
            plan.cancel_after = rng.randint(1, max(1, int(ENDLESS_SPAN * max_blocks)))
        elif rng.random() < P_CANCEL:
            plan.cancel_after = rng.randint(0, blocks - 1)
        last = plan.expected_blocks   # blocks the stream will produce
        if last >= 2 and rng.random() < P_TIMELINE_SWITCH:
            plan.prompt_timeline = {rng.randint(1, last - 1): rng.choice(PROMPTS)}
        if last >= 2 and rng.random() < P_LIVE_SWITCH:
            plan.live_switches = {rng.randint(1, last - 1): rng.choice(PROMPTS)}
        plans.append(plan)
    return plans


def plan_summary(plans: list[StreamPlan]) -> dict:
    return {"streams": len(plans), "endless": sum(p.blocks is None for p in plans),
            "cancelled": sum(p.cancel_after is not None for p in plans),
            "cancelled_before_first_block": sum(p.cancel_after == 0 for p in plans),
            "timeline_switches": sum(len(p.prompt_timeline) for p in plans),
            "live_switches": sum(len(p.live_switches) for p in plans),
            "expected_blocks": sum(p.expected_blocks for p in plans),
            "last_join_step": plans[-1].join_step}


# ---------------------------------------------------------------------- the accounting
class Ledger:
    """Every block and end record received, checked against the plans."""

    def __init__(self, frames_per_block: int) -> None:
        self.frames_per_block = frames_per_block
        self.plans: dict[str, StreamPlan] = {}
        self.received: dict[str, list[int]] = {}
        self.finals: dict[str, list[int]] = {}
        self.bad_frames = 0
        self.ends: dict[str, list] = {}
        self.unknown_ids: Counter = Counter()

    def expect(self, request_id: str, plan: StreamPlan) -> None:
        self.plans[request_id] = plan
        self.received[request_id], self.finals[request_id], self.ends[request_id] = [], [], []

    def block(self, request_id: str, block: int, frames: tuple[int, int], final: bool) -> int:
        """Records a block; returns how many blocks that stream has received."""
        if request_id not in self.plans:
            self.unknown_ids[request_id] += 1
            return 0
        f = self.frames_per_block
        if tuple(frames) != (block * f, (block + 1) * f):
            self.bad_frames += 1
        self.received[request_id].append(block)
        if final:
            self.finals[request_id].append(block)
        return len(self.received[request_id])

    def end(self, request_id: str, status: str, blocks: int, error: str | None) -> None:
        if request_id not in self.plans:
            self.unknown_ids[request_id] += 1
            return
        self.ends[request_id].append((status, blocks, error))

    def report(self) -> dict:
        lost = duplicated = unexpected = out_of_order = wrong_final = missing_end = extra_end = 0
        wrong_end = failed = 0
        errors = []
        for rid, plan in self.plans.items():
            got = self.received[rid]
            counts = Counter(got)
            want = set(range(plan.expected_blocks))
            lost += len(want - counts.keys())
            unexpected += sum(c for b, c in counts.items() if b not in want)
            duplicated += sum(c - 1 for b, c in counts.items() if b in want and c > 1)
            out_of_order += sum(1 for a, b in zip(got, got[1:]) if b <= a)
            finals = self.finals[rid]
            if plan.expected_status == "finished":
                wrong_final += (finals != [plan.expected_blocks - 1])
            else:
                wrong_final += bool(finals)
            ends = self.ends[rid]
            missing_end += not ends
            extra_end += max(0, len(ends) - 1)
            for status, blocks, error in ends:
                if status == "failed":
                    failed += 1
                    errors.append(f"stream {plan.index}: {error}")
                if (status, blocks) != (plan.expected_status, plan.expected_blocks):
                    wrong_end += 1
        out = {"requests": len(self.plans), "blocks_expected": sum(p.expected_blocks for p in self.plans.values()),
               "blocks_received": sum(len(v) for v in self.received.values()),
               "lost": lost, "duplicated": duplicated, "unexpected": unexpected, "out_of_order": out_of_order,
               "wrong_frames": self.bad_frames, "wrong_final_flags": wrong_final, "missing_end": missing_end,
               "extra_end": extra_end, "wrong_end": wrong_end, "failed": failed,
               "unknown_request_ids": sum(self.unknown_ids.values()), "errors": errors[:5]}
        out["ok"] = all(out[k] == 0 for k in ("lost", "duplicated", "unexpected", "out_of_order", "wrong_frames",
                                               "wrong_final_flags", "missing_end", "extra_end", "wrong_end",
                                               "failed", "unknown_request_ids"))
        return out


# ---------------------------------------------------------------------- one run
def _pool(engine: Engine) -> dict:
    usage = engine.memory_usage()
    return {"pages_used": usage.get("pages_used", 0), "sessions": usage.get("sessions", 0),
            "streams": usage.get("streams", 0),
            "bytes_used": usage.get("gpu_bytes_used", 0) + usage.get("host_bytes_used", 0),
            "bytes_reserved": usage.get("gpu_bytes_reserved", 0) + usage.get("host_bytes_reserved", 0)}


def run_once(engine: Engine, plans: list[StreamPlan], max_batch: int) -> dict:
    """Runs the plan on a fresh Scheduler (max_streams = len(plans)); returns the timings,
    the accounting and the pool before/peak/after."""
    from lrag_engine.serving import Scheduler, StreamBlock, StreamEnd, StreamRequest

    n = len(plans)
    f = engine.memory.frames_per_block
    ledger = Ledger(f)
    by_id: dict[str, StreamPlan] = {}
    submitted: dict[str, float] = {}
    arrivals: dict[str, list[float]] = {}
    batches: list[int] = []
    before = _pool(engine)
    peak = dict(before)
    pending = sorted(plans, key=lambda p: (p.join_step, p.index))
    scheduler = Scheduler(engine, max_streams=n, max_batch=max_batch, max_waiting=n)
    step = steps = 0
    synchronize(engine.device)
    t_first = time.perf_counter()
    t_last = t_first
    cpu_first = time.process_time()
    try:
        while pending or scheduler.has_work():
            if pending and not scheduler.has_work():
                step = max(step, pending[0].join_step)   # nothing runs until the next arrival
            while pending and pending[0].join_step <= step:
                plan = pending.pop(0)
                request = StreamRequest(prompt=plan.prompt, seed=plan.seed,
                                        num_frames=None if plan.blocks is None else plan.blocks * f,
                                        prompt_timeline=dict(plan.prompt_timeline) or None,
                                        recache_sink=plan.recache_sink, request_id=f"s{plan.index:03d}")
                rid = scheduler.submit(request)
                submitted[rid] = time.perf_counter()
                by_id[rid], arrivals[rid] = plan, []
                ledger.expect(rid, plan)
                if plan.cancel_after == 0:
                    scheduler.cancel(rid)
            outputs = scheduler.step()
            synchronize(engine.device)
            t = time.perf_counter()
            steps += 1
            step += 1
            for item in outputs:
                if isinstance(item, StreamBlock):
                    count = ledger.block(item.request_id, item.block, item.frames, item.final)
                    if item.request_id not in by_id:
                        continue
                    arrivals[item.request_id].append(t)
                    batches.append(item.batch)
                    t_last = t
                    plan = by_id[item.request_id]
                    if count in plan.live_switches and not item.final and count != plan.cancel_after:
                        scheduler.switch_prompt(item.request_id, plan.live_switches[count],
                                                recache_sink=plan.recache_sink)
                    if count == plan.cancel_after:
                        scheduler.cancel(item.request_id)
                elif isinstance(item, StreamEnd):
                    ledger.end(item.request_id, item.status, item.blocks, item.error)
            usage = _pool(engine)
            if usage["pages_used"] > peak["pages_used"]:
                peak = usage
        cpu = time.process_time() - cpu_first
        after = _pool(engine)   # every stream has ended; the scheduler is still open
    finally:
        scheduler.close()
    after_close = _pool(engine)
    wall = t_last - t_first
    blocks = sum(len(v) for v in arrivals.values())
    gaps = {rid: [b - a for a, b in zip(ts, ts[1:])] for rid, ts in arrivals.items()}
    ttfb = [ts[0] - submitted[rid] for rid, ts in arrivals.items() if ts]
    return {"blocks": blocks, "frames": blocks * f, "steps": steps, "wall_s": wall, "cpu_s": cpu,
            "blocks_per_s": blocks / wall if wall > 0 else None,
            "blocks_per_cpu_s": blocks / cpu if cpu > 0 else None,
            "video_fps": VIDEO_FRAMES_PER_LATENT * blocks * f / wall if wall > 0 else None,
            "gaps_s": [g for v in gaps.values() for g in v],
            "stream_p99_s": [percentile(v, 99) for v in gaps.values() if v],
            "ttfb_s": ttfb, "mean_batch": statistics.fmean(batches) if batches else None,
            "max_batch_seen": max(batches, default=None),
            "accounting": ledger.report(),
            "memory": {"before": before, "peak": peak, "after_last_stream": after, "after_close": after_close,
                       "back_to_baseline": (after["pages_used"], after["sessions"], after["streams"]) ==
                                           (before["pages_used"], before["sessions"], before["streams"])}}


# ---------------------------------------------------------------------- the sweep
def _ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else 1e3 * value


def summarize(n: int, mode: str, runs: list[dict]) -> dict:
    rates = [r["blocks_per_s"] for r in runs if r["blocks_per_s"] is not None]
    gaps = [g for r in runs for g in r["gaps_s"]]
    ttfb = [t for r in runs for t in r["ttfb_s"]]
    worst = [p for r in runs for p in r["stream_p99_s"]]
    acc = [r["accounting"] for r in runs]
    return {
        "streams": n, "mode": mode, "reps": len(runs),
        "blocks_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                         "per_rep": rates} if rates else None,
        "video_fps_median": statistics.median([r["video_fps"] for r in runs if r["video_fps"] is not None])
        if rates else None,
        "blocks_per_cpu_s_median": statistics.median([r["blocks_per_cpu_s"] for r in runs
                                                      if r["blocks_per_cpu_s"] is not None] or [0.0]),
        "block_latency_ms": {"p50": _ms(gaps, 50), "p99": _ms(gaps, 99), "samples": len(gaps),
                             "worst_stream_p99": None if not worst else 1e3 * max(worst)},
        "time_to_first_block_ms": {"p50": _ms(ttfb, 50), "p99": _ms(ttfb, 99), "samples": len(ttfb)},
        "mean_batch": statistics.fmean(r["mean_batch"] for r in runs if r["mean_batch"] is not None)
        if any(r["mean_batch"] is not None for r in runs) else None,
        "max_batch_seen": max((r["max_batch_seen"] or 0) for r in runs),
        "blocks_per_run": runs[0]["blocks"], "steps_per_run": runs[0]["steps"],
        "accounting": {key: sum(a[key] for a in acc) for key in
                       ("blocks_expected", "blocks_received", "lost", "duplicated", "unexpected", "out_of_order",
                        "wrong_frames", "wrong_final_flags", "missing_end", "extra_end", "wrong_end", "failed",
                        "unknown_request_ids")} | {"ok": all(a["ok"] for a in acc),
                                                   "errors": [e for a in acc for e in a["errors"]][:5]},
        "memory": {"before": runs[0]["memory"]["before"],
                   "peak_pages_used": max(r["memory"]["peak"]["pages_used"] for r in runs),
                   "peak_bytes_used": max(r["memory"]["peak"]["bytes_used"] for r in runs),
                   "after_last_stream": runs[-1]["memory"]["after_last_stream"],
                   "back_to_baseline": all(r["memory"]["back_to_baseline"] for r in runs)},
    }


def build_engine(workload: Workload) -> Engine:
    engine = Engine(workload.preset, memory=workload.memory, runtime=workload.runtime, seed=0)
    engine.attach_random_pipeline(seed=0)   # prompts for the streams and their switches
    return engine


def sweep(engine: Engine, streams: tuple[int, ...], reps: int, warmup: int, seed: int, min_blocks: int,
          max_blocks: int, stagger: int, log=print) -> dict:
    """Runs both modes ``warmup + reps`` times at each N (in turn, the order alternating);
    returns {"results": [summary per N and mode], "paired": [...], "plans": {...}}."""
    results, paired, plans_out, per_run = [], [], {}, []
    for n in streams:
        plans = make_plan(n, seed, min_blocks, max_blocks, stagger)
        plans_out[str(n)] = {"summary": plan_summary(plans), "streams": [asdict(p) for p in plans]}
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for rep in range(warmup + reps):
            order = list(MODES) if rep % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                run = run_once(engine, plans, MODES[mode] or n)
                if rep >= warmup:
                    runs[mode].append(run)
                    per_run.append({"streams": n, "mode": mode, "rep": rep - warmup, "order": order.index(mode),
                                    "blocks_per_s": run["blocks_per_s"], "wall_s": run["wall_s"],
                                    "cpu_s": run["cpu_s"],
                                    "steps": run["steps"], "mean_batch": run["mean_batch"],
                                    "accounting_ok": run["accounting"]["ok"],
                                    "back_to_baseline": run["memory"]["back_to_baseline"]})
        for mode in MODES:
            results.append(summarize(n, mode, runs[mode]))
        ratios = [b["blocks_per_s"] / s["blocks_per_s"] for b, s in zip(runs["batched"], runs["one_at_a_time"])]
        cpu_ratios = [b["blocks_per_cpu_s"] / s["blocks_per_cpu_s"]
                      for b, s in zip(runs["batched"], runs["one_at_a_time"])]
        paired.append({"streams": n, "batched_over_one_at_a_time": statistics.median(ratios),
                       "per_rep": ratios, "batched_over_one_at_a_time_cpu_time": statistics.median(cpu_ratios),
                       "per_rep_cpu_time": cpu_ratios})
        b, s, pair = results[-2], results[-1], paired[-1]
        log(f"  N={n:>2}: batched {b['blocks_per_s']['median']:7.1f} blocks/s (mean batch {b['mean_batch']:.2f}), "
            f"one at a time {s['blocks_per_s']['median']:7.1f} blocks/s; paired ratio "
            f"{pair['batched_over_one_at_a_time']:.2f} (CPU time {pair['batched_over_one_at_a_time_cpu_time']:.2f}); "
            f"p99 {b['block_latency_ms']['p99']:.1f} / {s['block_latency_ms']['p99']:.1f} ms; "
            f"accounting {'ok' if b['accounting']['ok'] and s['accounting']['ok'] else 'FAILED'}")
    return {"results": results, "paired": paired, "plans": plans_out, "per_run": per_run}


def checks(results: list[dict], paired: list[dict], min_n: int = 4) -> dict:
    wins = {str(p["streams"]): p["batched_over_one_at_a_time"] > 1 for p in paired if p["streams"] >= min_n}
    cpu_wins = {str(p["streams"]): p["batched_over_one_at_a_time_cpu_time"] > 1
                for p in paired if p["streams"] >= min_n}
    return {"batched_above_one_at_a_time_at_n_ge_4": all(wins.values()) if wins else None,
            "batched_above_one_at_a_time_by_n": wins,
            "batched_above_one_at_a_time_at_n_ge_4_cpu_time": all(cpu_wins.values()) if cpu_wins else None,
            "zero_lost_or_duplicated_blocks": all(r["accounting"]["lost"] == 0 and r["accounting"]["duplicated"] == 0
                                                  for r in results),
            "accounting_ok": all(r["accounting"]["ok"] for r in results),
            "memory_back_to_baseline": all(r["memory"]["back_to_baseline"] for r in results)}


# ---------------------------------------------------------------------- output
def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, marker, color in (("batched", "o", "C0"), ("one_at_a_time", "s", "C1")):
        rows = [r for r in report["results"] if r["mode"] == mode and r["blocks_per_s"]]
        ns = [r["streams"] for r in rows]
        med = [r["blocks_per_s"]["median"] for r in rows]
        err = [[m - r["blocks_per_s"]["min"] for m, r in zip(med, rows)],
               [r["blocks_per_s"]["max"] - m for m, r in zip(med, rows)]]
        label = mode.replace("_", " ")
        left.errorbar(ns, med, yerr=err, marker=marker, color=color, capsize=3, label=label)
        right.plot(ns, [r["block_latency_ms"]["p99"] for r in rows], marker=marker, color=color, label=f"{label} p99")
        right.plot(ns, [r["block_latency_ms"]["p50"] for r in rows], marker=marker, color=color, linestyle=":",
                   label=f"{label} p50")
    for pair in report["paired"]:
        row = next(r for r in report["results"] if r["streams"] == pair["streams"] and r["mode"] == "batched")
        if row["blocks_per_s"]:
            left.annotate(f"x{pair['batched_over_one_at_a_time']:.2f}", (pair["streams"], row["blocks_per_s"]["max"]),
                          textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    left.margins(y=0.15)
    fig.text(0.01, 0.01, "xR: paired batched / one-at-a-time throughput ratio (median over reps); at N = 1 both "
             "modes are the same configuration (noise control)", fontsize=7)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(report["config"]["streams"]))
        ax.set_xticklabels([str(n) for n in report["config"]["streams"]])
        ax.set_xlabel("concurrent streams N")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("aggregate blocks/s (median, min-max)")
    right.set_ylabel("per-stream block latency (ms)")
    cfg = report["config"]
    fig.suptitle(f"serving load test, {cfg['workload']} workload ({cfg['preset']}, {cfg['device']} {cfg['dtype']}, "
                 f"{cfg['frames_per_block']} frames/block)" + (": code-path check" if cfg["device"] == "cpu" else ""))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny", choices=sorted(WORKLOADS),
                        help="tiny (CPU, default) or reference (PERF.md shapes, CUDA)")
    parser.add_argument("--streams", default=None,
                        help="comma-separated N (default: 1,2,4,8,16 tiny; 1,2,4,8 reference)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed runs per N and mode (default 7 tiny, 3 reference)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs per N and mode first (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan (default 0)")
    parser.add_argument("--min-blocks", type=int, default=None, help="shortest finite stream, in blocks")
    parser.add_argument("--max-blocks", type=int, default=None, help="longest finite stream, in blocks")
    parser.add_argument("--stagger", type=int, default=None, help="most scheduler steps between two arrivals")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/serving-<device>-<date>.json)")
    parser.add_argument("--plot", type=Path, default=None, help="also write a PNG of throughput and p99 latency vs N")
    return parser.parse_args(argv)


def _streams(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--streams must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--streams values must be >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = WORKLOADS[args.workload]
    try:
        streams = _streams(args.streams, workload.streams)
        reps = workload.reps if args.reps is None else args.reps
        min_blocks = workload.min_blocks if args.min_blocks is None else args.min_blocks
        max_blocks = max(workload.max_blocks, min_blocks) if args.max_blocks is None else args.max_blocks
        stagger = workload.stagger if args.stagger is None else args.stagger
        if reps < 1 or args.warmup < 0:
            raise ValueError(f"--reps must be >= 1 and --warmup >= 0, got {reps} and {args.warmup}")
        make_plan(1, args.seed, min_blocks, max_blocks, stagger)   # argument check
    except ValueError as exc:
        print(f"serving: {exc}", file=sys.stderr)
        return 2
    device = torch.device(workload.runtime.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"serving: the {args.workload} workload needs CUDA", file=sys.stderr)
        return 2
    with torch_threads(1 if device.type == "cpu" else None):
        engine = build_engine(workload)
        env = environment(device)
        print(f"serving load test: {args.workload} workload, {workload.preset} on {device} {workload.runtime.dtype}, "
              f"{reps} reps + {args.warmup} warm-up per N and mode")
        out = sweep(engine, streams, reps, args.warmup, args.seed, min_blocks, max_blocks, stagger)
        describe = engine.describe()
    report = {
        "benchmark": "serving",
        "environment": env,
        "config": {"workload": args.workload, "preset": workload.preset, "device": device.type,
                   "dtype": workload.runtime.dtype, "cuda_graphs": workload.runtime.cuda_graphs,
                   "frames_per_block": workload.memory.frames_per_block, "memory": asdict(workload.memory),
                   "streams": list(streams), "reps": reps, "warmup": args.warmup, "seed": args.seed,
                   "min_blocks": min_blocks, "max_blocks": max_blocks, "stagger": stagger,
                   "torch_threads": 1 if device.type == "cpu" else torch.get_num_threads(),
                   "modes": {"batched": "Scheduler(max_batch=N)", "one_at_a_time": "Scheduler(max_batch=1)"},
                   "driver": "one thread stepping the Scheduler; arrivals, switches and cancellations by step and "
                             "blocks received (closed loop: both modes run the same work)"},
        "note": workload.note,
        "noise_control": "at N = 1 both modes are the same configuration (max_batch = 1): their paired ratio "
                         "(paired[0]) shows how far the machine's load alone moves the ratio",
        "engine": describe,
        "checks": checks(out["results"], out["paired"]),
        "results": out["results"],
        "paired": out["paired"],
        "per_run": out["per_run"],
        "plans": out["plans"],
        "definitions": {
            "blocks_per_s": "blocks received / wall time from the first submission to the last block received",
            "video_fps": f"{VIDEO_FRAMES_PER_LATENT} x latent frames per second, DiT only (no VAE decode)",
            "block_latency": "time between consecutive blocks of one stream as its consumer receives them "
                             "(pooled over streams and reps)",
            "worst_stream_p99": "the largest per-stream p99 block latency over the streams of all reps",
            "time_to_first_block": "submission to the first block received",
            "batched_over_one_at_a_time": "median over reps of the paired ratio of blocks/s (the two modes of "
                                          "a rep run back to back)",
            "blocks_per_cpu_s": "blocks / process CPU time of the run (time.process_time): on a shared CPU it "
                                "leaves out the time the process waited for a core; a control for the wall-time "
                                "figures, not a replacement",
            "accounting": "each (request id, block) received against the blocks its plan must produce (its "
                          "length, or the count at which the consumer cancelled it); all counts must be 0",
            "back_to_baseline": "page-pool pages used, sessions and streams after the last stream ended equal "
                                "those before the first submission (reserved chunks stay, by design)",
        },
    }
    date = now().strftime("%Y-%m-%d")
    path = args.out or REPO / "benchmarks" / "results" / f"serving-{device_slug(device)}-{date}.json"
    write_json(path, report)
    written = [str(path)]
    if args.plot is not None:
        written.append(str(plot(report, args.plot)))
    c = report["checks"]
    print(f"  checks: batched above one at a time at N >= 4: {c['batched_above_one_at_a_time_at_n_ge_4']} "
          f"(CPU time: {c['batched_above_one_at_a_time_at_n_ge_4_cpu_time']}); "
          f"zero lost/duplicated blocks: {c['zero_lost_or_duplicated_blocks']}; accounting ok: "
          f"{c['accounting_ok']}; memory back to baseline: {c['memory_back_to_baseline']}")
    print(f"wrote {' and '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
