"""One-screen summary of a ``benchmarks/gpu_session.sh`` run, from what its stages left
in the output folder (so it works on partial results too):

- ``stages.tsv``: one line per stage, ``name status rc seconds limit`` (status ok,
  failed, timeout or skipped);
- ``*-tests.xml``: pytest JUnit reports (passed / failed / skipped counts);
- ``latency.json`` (or ``latency.partial.json`` when the stage was cut short): block
  times per mode and the retrieval-vs-native, graphs-vs-eager comparisons;
- ``kernels.json`` (or ``kernels.partial.json``): kernel times, GB/s and fraction of
  the measured copy bandwidth.

    python -m lrag_engine.bench.session_summary OUT_DIR     # prints, writes OUT_DIR/summary.json

Exit status 1 when a stage failed, timed out or was skipped for lack of time (the
session is then incomplete), or a test failed; else 0.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .records import write_json

STAGE_STATUSES = ("ok", "failed", "timeout", "skipped")


def read_stages(folder: Path) -> list[dict]:
    """Stages in run order from ``stages.tsv``; a malformed line raises naming it."""
    path = folder / "stages.tsv"
    if not path.exists():
        return []
    stages = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 5 or fields[1] not in STAGE_STATUSES:
            raise ValueError(f"{path}:{number}: expected 'name<TAB>status<TAB>rc<TAB>seconds<TAB>limit' with "
                             f"status in {STAGE_STATUSES}, got {line!r}")
        name, status, rc, seconds, limit = fields
        stages.append({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds),
                       "limit_s": int(limit)})
    return stages


def read_junit(path: Path) -> dict:
    """Counts of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"], "skipped": total["skipped"], "failed_tests": failed[:10]}


def _load(folder: Path, stem: str) -> tuple[dict | None, bool]:
    """(the JSON of ``stem``, whether it is partial)."""
    for name, partial in ((f"{stem}.json", False), (f"{stem}.partial.json", True)):
        path = folder / name
        if path.exists():
            return json.loads(path.read_text()), partial
    return None, False


def latency_summary(report: dict) -> dict:
    modes = {}
    for r in report.get("modes", []):
        s = (report.get("summary") or {}).get(r["mode"]) or {}
        modes[r["mode"]] = {"status": r["status"], "reason": r.get("reason"),
                            "block_ms_median": s.get("block_ms_median"), "block_ms_iqr": s.get("block_ms_iqr"),
                            "fps_video": s.get("fps_video"), "mfu": s.get("mfu"), "noisy": s.get("noisy")}
    derived = report.get("derived") or {}
    keys = ("retrieval_vs_native_overhead_pct", "retrieval_graphs_vs_native_graphs_overhead_pct",
            "graphs_speedup_x", "best_engine_mode", "best_engine_mode_fps_video")
    return {"kind": report.get("kind"), "reference_workload": report.get("reference_workload"),
            "modes": modes, **{k: derived.get(k) for k in keys}, "warnings": report.get("warnings", [])}


def kernels_summary(report: dict) -> list[dict]:
    rows = []
    for case in report.get("cases", []):
        if "error" in case:
            rows.append({"op": case["op"], "shape": case.get("shape"), "error": case["error"]})
            continue
        rows.append({"op": case["op"], "shape": case["shape"], "ms": case["ms"].get("triton"),
                     "gbps": case["gbps"].get("triton"), "fraction_of_copy": case["fraction_of_copy"].get("triton"),
                     "speedup_vs_torch": case.get("speedup_vs_torch"),
                     "matches_reference": case.get("matches_reference", case.get("v_bit_exact"))})
    return rows


def summarize(folder: str | Path) -> dict:
    folder = Path(folder)
    stages = read_stages(folder)
    tests = {p.stem: read_junit(p) for p in sorted(folder.glob("*-tests.xml"))}
    latency, latency_partial = _load(folder, "latency")
    kernels, kernels_partial = _load(folder, "kernels")
    failed_stages = [s["name"] for s in stages if s["status"] in ("failed", "timeout")]
    failed_tests = sum(t["failed"] for t in tests.values())
    skipped_stages = [s["name"] for s in stages if s["status"] == "skipped"]
    return {
        "stages": stages,
        "seconds": sum(s["seconds"] for s in stages),
        "tests": tests,
        "latency": None if latency is None else {**latency_summary(latency), "partial": latency_partial},
        "kernels": None if kernels is None else {"cases": kernels_summary(kernels), "partial": kernels_partial,
                                                 "copy_gbps": (kernels.get("copy_bandwidth") or {}).get(
                                                     "d2d_bytes_per_s", 0) / 1e9 or None},
        "ok": not failed_stages and not failed_tests and not skipped_stages,
        "failed_stages": failed_stages,
        "skipped_stages": skipped_stages,
    }


def _f(value, spec: str) -> str:
    if value is None:
        width = spec.split(".")[0].lstrip("+")
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(value, spec)


def render(summary: dict) -> str:
    verdict = "OK" if summary["ok"] else "INCOMPLETE" if not summary["failed_stages"] and not any(
        t["failed"] for t in summary["tests"].values()) else "FAILED"
    lines = [f"gpu session: {verdict} in {summary['seconds']} s"]
    lines.append("stages: " + ", ".join(f"{s['name']} {s['status']} {s['seconds']}/{s['limit_s']}s"
                                        for s in summary["stages"]))
    for name, t in summary["tests"].items():
        lines.append(f"{name}: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                     + (f"  first failures: {', '.join(t['failed_tests'][:3])}" if t["failed_tests"] else ""))
    lat = summary["latency"]
    if lat:
        lines.append(f"latency ({lat['kind']}{', PARTIAL' if lat['partial'] else ''}"
                     f"{', reference workload' if lat['reference_workload'] else ''}):")
        lines.append(f"  {'mode':<18} {'median ms':>10} {'IQR ms':>8} {'FPS':>8} {'MFU':>6}")
        for mode, m in lat["modes"].items():
            if m["status"] != "ok":
                lines.append(f"  {mode:<18} {m['status']}: {(m['reason'] or '')[:60]}")
                continue
            mfu = None if m["mfu"] is None else 100 * m["mfu"]
            lines.append(f"  {mode:<18} {_f(m['block_ms_median'], '10.2f')} {_f(m['block_ms_iqr'], '8.2f')} "
                         f"{_f(m['fps_video'], '8.2f')} {_f(mfu, '5.1f')}%" + ("  NOISY" if m["noisy"] else ""))
        lines.append(f"  retrieval vs native {_f(lat['retrieval_vs_native_overhead_pct'], '+.1f')} %, with graphs "
                     f"{_f(lat['retrieval_graphs_vs_native_graphs_overhead_pct'], '+.1f')} %; graphs speed-up "
                     f"{_f(lat['graphs_speedup_x'], '.2f')} x")
    ker = summary["kernels"]
    if ker:
        lines.append(f"kernels{' (PARTIAL)' if ker['partial'] else ''}, copy {_f(ker['copy_gbps'], '.0f')} GB/s:")
        for c in ker["cases"]:
            shape = ",".join(f"{k}={v}" for k, v in (c.get("shape") or {}).items())
            if "error" in c:
                lines.append(f"  {c['op']:<12} {shape:<34} ERROR {c['error'][:60]}")
                continue
            frac = None if c["fraction_of_copy"] is None else 100 * c["fraction_of_copy"]
            lines.append(f"  {c['op']:<12} {shape:<34} {_f(c['ms'], '9.4f')} ms {_f(c['gbps'], '7.0f')} GB/s "
                         f"{_f(frac, '5.1f')}% of copy, {_f(c['speedup_vs_torch'], '.2f')}x torch"
                         + ("" if c["matches_reference"] in (True, None) else "  MISMATCH"))
    if summary["failed_stages"]:
        lines.append("failed or timed out: " + ", ".join(summary["failed_stages"]))
    if summary["skipped_stages"]:
        lines.append("skipped (session budget spent): " + ", ".join(summary["skipped_stages"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m lrag_engine.bench.session_summary OUT_DIR (a gpu_session.sh output folder)",
              file=sys.stderr)
        return 2
    summary = summarize(argv[0])
    write_json(Path(argv[0]) / "summary.json", summary)
    print(render(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
