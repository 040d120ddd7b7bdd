"""Long run on the CPU: block time, process RSS and history memory over many blocks of one session.

The tiny preset with the default MemoryConfig and RuntimeConfig (CPU, float32), one
torch thread, one session (``engine.session(seed=0)``) stepped ``--blocks`` times. Per
block: the wall time of ``session.step()``, the process RSS, the page pool's reserved
and used bytes (``engine.memory_usage()``) and the history's usage
(``session.history.usage()``), each read after the timed step.

Reported: the median block time over blocks 50-99 ("start", after the warm-up) against
the last 50 blocks ("end"), their ratio and IQRs; RSS, pool-reserved bytes and the
history's own bytes (K/V + index) after block 100 and at the end; and two checks,
computed as measured: the end median within 5 % of the start median, and the RSS growth
from block 100 to the end at most the history's growth plus one pool chunk. Shorter
runs scale the windows down (start: blocks n/4 to n/2, end: the last n/2 at most 50).

On a shared machine the load drifts over a run, and the start and the end are measured
seconds apart. So a control follows (``--control-rounds``, default 30): a second engine's
fresh session steps to the start window, then it and the long session step in turn,
both timed under the same load: blocks 71-100 against blocks 1001-1030 of a full run.

    python benchmarks/long_run.py [--blocks 1000] [--page-table auto|cpp|python]
                                  [--control-rounds 30] [--out PATH] [--plot PATH]
    python -m benchmarks.long_run ...

Writes JSON (default ``benchmarks/results/long-run-cpu-<backend>-<date>.json``) starting
with the environment record of ``lrag_engine.bench.records``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lrag_engine.bench.devices import device_slug
from lrag_engine.bench.provenance import now
from lrag_engine.bench.records import environment, write_json
from lrag_engine.bench.timing import percentile
from lrag_engine.config import MemoryConfig, RuntimeConfig
from lrag_engine.engine import Engine
from lrag_engine.memory.page_table import PAGE_TABLE_KINDS

REPO = Path(__file__).resolve().parents[1]
START_WINDOW = (50, 100)   # blocks [50, 100): the start, after the warm-up
END_BLOCKS = 50            # the last blocks: the end
TIME_TOLERANCE = 0.05      # end median within 5 % of the start median
MIN_BLOCKS = 4
CONTROL_ROUNDS = 30        # interleaved control: blocks of each session


# ---------------------------------------------------------------------- readings
def _proc_rss() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024   # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_reader():
    """(callable returning the process RSS in bytes, its source): /proc/self/status when
    readable, else psutil when installed, else None."""
    if _proc_rss() is not None:
        return _proc_rss, "/proc/self/status VmRSS"
    try:
        import psutil
    except ImportError:
        return (lambda: None), None
    process = psutil.Process()
    return (lambda: process.memory_info().rss), "psutil"


def windows(blocks: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Block index ranges [lo, hi) of the start and the end. 1000 blocks: [50, 100) and
    [950, 1000); fewer blocks scale down so that the two never overlap."""
    hi = min(START_WINDOW[1], blocks // 2)
    lo = min(START_WINDOW[0], hi // 2)
    end = min(END_BLOCKS, blocks - hi)
    return (lo, hi), (blocks - end, blocks)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "iqr": percentile(values, 75) - percentile(values, 25),
            "min": min(values), "max": max(values), "n": len(values)}


# ---------------------------------------------------------------------- run
def _timed_step(session, wall: list, cpu: list) -> None:
    c0, t0 = time.process_time(), time.perf_counter()
    session.step()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)


def interleaved_control(long_session, blocks: int, rounds: int, page_table: str) -> dict:
    """A fresh session (on a second engine, same weights) steps to the start window, then
    it and ``long_session`` (past ``blocks`` blocks) step in turn ``rounds`` times each:
    early and late blocks timed under the same machine load."""
    (lo, hi), _ = windows(blocks)
    rounds = max(1, min(rounds, hi - lo))
    engine = Engine("tiny", memory=MemoryConfig(), runtime=RuntimeConfig(device="cpu", dtype="float32",
                                                                         page_table=page_table))
    fresh = engine.session(seed=0)
    try:
        while fresh.block < hi - rounds:
            fresh.step()
        first_fresh, first_long = fresh.block + 1, long_session.block + 1
        times = {"fresh": ([], []), "long": ([], [])}
        for _ in range(rounds):
            _timed_step(fresh, *times["fresh"])
            _timed_step(long_session, *times["long"])
        frames = {"fresh": fresh.history.num_frames, "long": long_session.history.num_frames}
    finally:
        fresh.close()
    out: dict = {"rounds": rounds, "fresh_blocks": [first_fresh, first_fresh + rounds - 1],
                 "long_blocks": [first_long, first_long + rounds - 1],
                 "fresh_history_frames_at_end": frames["fresh"], "long_history_frames_at_end": frames["long"]}
    for name, (wall, cpu) in times.items():
        out[f"{name}_block_ms"] = {k: (1e3 * v if k != "n" else v) for k, v in _stats(wall).items()}
        out[f"{name}_block_cpu_ms"] = {k: (1e3 * v if k != "n" else v) for k, v in _stats(cpu).items()}
    out["long_over_fresh"] = out["long_block_ms"]["median"] / out["fresh_block_ms"]["median"]
    out["long_over_fresh_cpu"] = out["long_block_cpu_ms"]["median"] / out["fresh_block_cpu_ms"]["median"]
    out["per_round_ms"] = {name: [1e3 * t for t in wall] for name, (wall, _) in times.items()}
    return out


def run(blocks: int, page_table: str, control_rounds: int = CONTROL_ROUNDS) -> dict:
    torch.set_num_threads(1)
    engine = Engine("tiny", memory=MemoryConfig(), runtime=RuntimeConfig(device="cpu", dtype="float32",
                                                                         page_table=page_table))
    read_rss, rss_source = rss_reader()
    rows = {key: [] for key in ("block_seconds", "block_cpu_seconds", "rss_bytes", "pool_reserved_bytes",
                                "pool_used_bytes", "history_frames", "history_kv_bytes", "history_index_bytes")}
    session = engine.session(seed=0)
    pool: dict = {}
    control = None
    try:
        for _ in range(blocks):
            c0, t0 = time.process_time(), time.perf_counter()
            session.step()
            rows["block_seconds"].append(time.perf_counter() - t0)
            rows["block_cpu_seconds"].append(time.process_time() - c0)
            rows["rss_bytes"].append(read_rss())
            pool = engine.memory_usage()
            rows["pool_reserved_bytes"].append(pool.get("gpu_bytes_reserved", 0) + pool.get("host_bytes_reserved", 0))
            rows["pool_used_bytes"].append(pool.get("gpu_bytes_used", 0) + pool.get("host_bytes_used", 0))
            history = session.history.usage()
            rows["history_frames"].append(history["num_frames"])
            rows["history_kv_bytes"].append(history["bytes_used"])
            rows["history_index_bytes"].append(history["index_bytes"])
        history_end = session.history.usage()
        if control_rounds:
            control = interleaved_control(session, blocks, control_rounds, page_table)
    finally:
        session.close()
    history_end.pop("streams", None)
    describe = engine.describe()
    return {"rows": rows, "pool_at_end": pool, "history_at_end": history_end, "describe": describe,
            "rss_source": rss_source, "control": control}


def summarize(rows: dict, pool: dict) -> tuple[dict, dict]:
    n = len(rows["block_seconds"])
    (s_lo, s_hi), (e_lo, e_hi) = windows(n)
    start = _stats(rows["block_seconds"][s_lo:s_hi])
    end = _stats(rows["block_seconds"][e_lo:e_hi])
    start_cpu = _stats(rows["block_cpu_seconds"][s_lo:s_hi])
    end_cpu = _stats(rows["block_cpu_seconds"][e_lo:e_hi])
    ref, last = s_hi - 1, n - 1   # after block s_hi (100 in a full run), after the last block

    def at(key: str, i: int):
        return rows[key][i]

    history = [a + b for a, b in zip(rows["history_kv_bytes"], rows["history_index_bytes"])]
    chunk_bytes = pool.get("page_bytes", 0) * pool.get("chunk_pages", 0)
    rss_ref, rss_end = at("rss_bytes", ref), at("rss_bytes", last)
    rss_growth = None if rss_ref is None or rss_end is None else rss_end - rss_ref
    history_growth = history[last] - history[ref]
    summary = {
        "blocks": n,
        "start_blocks": [s_lo + 1, s_hi], "end_blocks": [e_lo + 1, e_hi],   # 1-based, inclusive
        "reference_block": ref + 1,
        "start_block_ms": {k: (1e3 * v if k != "n" else v) for k, v in start.items()},
        "end_block_ms": {k: (1e3 * v if k != "n" else v) for k, v in end.items()},
        "end_over_start": end["median"] / start["median"],
        "start_block_cpu_ms": {k: (1e3 * v if k != "n" else v) for k, v in start_cpu.items()},
        "end_block_cpu_ms": {k: (1e3 * v if k != "n" else v) for k, v in end_cpu.items()},
        "end_over_start_cpu": end_cpu["median"] / start_cpu["median"],
        "rss_bytes_at_reference": rss_ref, "rss_bytes_at_end": rss_end, "rss_growth_bytes": rss_growth,
        "pool_reserved_bytes_at_reference": at("pool_reserved_bytes", ref),
        "pool_reserved_bytes_at_end": at("pool_reserved_bytes", last),
        "pool_used_bytes_at_reference": at("pool_used_bytes", ref),
        "pool_used_bytes_at_end": at("pool_used_bytes", last),
        "history_frames_at_reference": at("history_frames", ref), "history_frames_at_end": at("history_frames", last),
        "history_kv_bytes_at_reference": at("history_kv_bytes", ref),
        "history_kv_bytes_at_end": at("history_kv_bytes", last),
        "history_index_bytes_at_reference": at("history_index_bytes", ref),
        "history_index_bytes_at_end": at("history_index_bytes", last),
        "history_bytes_at_reference": history[ref], "history_bytes_at_end": history[last],
        "history_growth_bytes": history_growth,
        "page_bytes": pool.get("page_bytes"), "chunk_pages": pool.get("chunk_pages"), "chunk_bytes": chunk_bytes,
    }
    allowance = history_growth + chunk_bytes
    checks = {
        "end_time_within_5pct_of_start": summary["end_over_start"] <= 1 + TIME_TOLERANCE,
        "rss_growth_within_history_growth_plus_one_chunk": None if rss_growth is None else rss_growth <= allowance,
        "rss_growth_allowance_bytes": allowance,
        "time_tolerance": TIME_TOLERANCE,
    }
    return summary, checks


# ---------------------------------------------------------------------- output
def _mib(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.1f} MiB"


def print_summary(report: dict) -> None:
    s, c = report["summary"], report["checks"]
    print(f"long run: tiny preset, cpu float32, 1 thread, page table {report['page_table']}, {s['blocks']} blocks")
    print(f"  block time start (blocks {s['start_blocks'][0]}-{s['start_blocks'][1]}): median "
          f"{s['start_block_ms']['median']:.2f} ms, IQR {s['start_block_ms']['iqr']:.2f} ms")
    print(f"  block time end   (blocks {s['end_blocks'][0]}-{s['end_blocks'][1]}): median "
          f"{s['end_block_ms']['median']:.2f} ms, IQR {s['end_block_ms']['iqr']:.2f} ms")
    print(f"  end / start: {s['end_over_start']:.3f} (CPU time: {s['end_over_start_cpu']:.3f})")
    ctl = report["control"]
    if ctl is not None:
        print(f"  interleaved control, blocks {ctl['fresh_blocks'][0]}-{ctl['fresh_blocks'][1]} vs "
              f"{ctl['long_blocks'][0]}-{ctl['long_blocks'][1]} in turn: median {ctl['fresh_block_ms']['median']:.2f} "
              f"vs {ctl['long_block_ms']['median']:.2f} ms, ratio {ctl['long_over_fresh']:.3f}")
    print(f"  {'':<26}{'after block ' + str(s['reference_block']):>18}{'at the end':>18}")
    for name, key in (("RSS", "rss_bytes"), ("pool reserved", "pool_reserved_bytes"),
                      ("pool used", "pool_used_bytes"), ("history K/V", "history_kv_bytes"),
                      ("history index", "history_index_bytes"), ("history total", "history_bytes")):
        print(f"  {name:<26}{_mib(s[key + '_at_reference']):>18}{_mib(s[key + '_at_end']):>18}")
    print(f"  {'history frames':<26}{s['history_frames_at_reference']:>18}{s['history_frames_at_end']:>18}")
    print(f"  RSS growth {_mib(s['rss_growth_bytes'])}; allowed: history growth {_mib(s['history_growth_bytes'])} "
          f"+ one chunk {_mib(s['chunk_bytes'])}")
    print(f"  check end time within {100 * c['time_tolerance']:.0f} % of start: "
          f"{c['end_time_within_5pct_of_start']}")
    print(f"  check RSS growth <= history growth + one chunk: {c['rss_growth_within_history_growth_plus_one_chunk']}")
    print(f"  check interleaved control within {100 * c['time_tolerance']:.0f} %: "
          f"{c['interleaved_control_within_5pct']}")


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["per_block"]
    x = list(range(1, len(rows["block_seconds"]) + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(x, [1e3 * t for t in rows["block_seconds"]], linewidth=0.7, label="block time")
    s = report["summary"]
    for name, (lo, hi) in (("start", s["start_blocks"]), ("end", s["end_blocks"])):
        median = s[f"{name}_block_ms"]["median"]
        top.hlines(median, lo, hi, colors="red", linewidth=2, label=f"{name} median {median:.2f} ms")
    top.set_ylabel("block time (ms)")
    # A few scheduler stalls on a shared machine must not flatten every other block.
    ms = [1e3 * t for t in rows["block_seconds"]]
    top.set_ylim(0, min(max(ms), 3 * statistics.median(ms)) * 1.05)
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    mib = 2 ** 20
    if rows["rss_bytes"][0] is not None:
        bottom.plot(x, [r / mib for r in rows["rss_bytes"]], label="process RSS")
    bottom.plot(x, [r / mib for r in rows["pool_reserved_bytes"]], label="pool reserved")
    bottom.plot(x, [(a + b) / mib for a, b in zip(rows["history_kv_bytes"], rows["history_index_bytes"])],
                label="history K/V + index")
    bottom.set_xlabel("block")
    bottom.set_ylabel("MiB")
    bottom.legend(fontsize=8)
    bottom.grid(True, alpha=0.3)
    fig.suptitle(f"long run, tiny preset, cpu float32, page table {report['page_table']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=1000, help="blocks to generate (default 1000)")
    parser.add_argument("--page-table", default="auto", choices=PAGE_TABLE_KINDS,
                        help="page-table backend of the history (default auto)")
    parser.add_argument("--control-rounds", type=int, default=CONTROL_ROUNDS,
                        help=f"blocks of each session in the interleaved control after the run (default "
                             f"{CONTROL_ROUNDS}; 0: none)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/long-run-cpu-<backend>-<date>.json)")
    parser.add_argument("--plot", type=Path, default=None, help="also write a PNG of block time and RSS vs block")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.blocks < MIN_BLOCKS:
        print(f"long_run: --blocks must be >= {MIN_BLOCKS}, got {args.blocks}", file=sys.stderr)
        return 2
    if args.control_rounds < 0:
        print(f"long_run: --control-rounds must be >= 0, got {args.control_rounds}", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    threads_before = torch.get_num_threads()
    try:
        result = run(args.blocks, args.page_table, args.control_rounds)
        env = environment(device)   # after set_num_threads(1): records the threads the run used
    except ImportError as exc:      # --page-table cpp without the extension
        print(f"long_run: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    summary, checks = summarize(result["rows"], result["pool_at_end"])
    control = result["control"]
    checks["interleaved_control_within_5pct"] = \
        None if control is None else control["long_over_fresh"] <= 1 + TIME_TOLERANCE
    describe = result["describe"]
    report = {
        "benchmark": "long_run",
        "environment": env,
        "page_table": describe["page_table"],
        "config": {"preset": "tiny", "device": "cpu", "dtype": "float32", "blocks": args.blocks, "seed": 0,
                   "torch_threads": 1, "memory": "MemoryConfig() defaults", "runtime": "RuntimeConfig() defaults",
                   "page_table_requested": args.page_table, "control_rounds": args.control_rounds},
        "engine": describe,
        "rss_source": result["rss_source"],
        "summary": summary,
        "checks": checks,
        "control": control,
        "pool_at_end": result["pool_at_end"],
        "history_at_end": result["history_at_end"],
        "notes": [
            "block time: wall time of session.step() (perf_counter); on the CPU the step is synchronous",
            "RSS, pool and history usage are read after each timed step, outside the timing",
            "history bytes = K/V bytes of the frames held (history.usage()['bytes_used']) + index bytes "
            "(descriptors, norms, page addresses)",
            "pool reserved = bytes of the chunks allocated (torch.empty: RSS grows only as pages are written)",
            "block_cpu_seconds: time.process_time of the step (excludes time the process waited for a core)",
            "control: after the per-block record, a fresh session on a second engine (same weights) and the "
            "long session step in turn; the long session's control blocks come after --blocks and are not in "
            "per_block",
        ],
        "per_block": result["rows"],
    }
    date = now().strftime("%Y-%m-%d")
    out = args.out or REPO / "benchmarks" / "results" / \
        f"long-run-{device_slug(device)}-{report['page_table']}-{date}.json"
    write_json(out, report)
    print_summary(report)
    written = [str(out)]
    if args.plot is not None:
        written.append(str(plot(report, args.plot)))
    print(f"wrote {' and '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
