"""benchmarks/gpu_session.sh: the dry run on the CPU, failures reported in its exit
status and summary, and the summary built from a (partial) output folder."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lrag_engine.bench.session_summary import read_stages, render, summarize

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
DRY_STAGES = ["env", "cuda-tests", "fused-tests", "oracle-cuda", "latency", "kernels"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OUT": str(tmp_path / "out"), **env}
    full_env.pop("GPU_SESSION_LONG", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == DRY_STAGES
    assert all(s["status"] == "ok" for s in summary["stages"]) and summary["ok"]
    latency = json.loads((out / "latency.json").read_text())
    assert latency["kind"].startswith("code-path check") and not latency["reference_workload"]
    assert {m["mode"]: m["status"] for m in latency["modes"]} == {
        "native": "ok", "native-graphs": "skipped", "retrieval": "ok", "retrieval-graphs": "skipped"}
    assert latency["summary"]["retrieval"]["steady_blocks"] > 0 and latency["summary"]["retrieval"]["repeats"] == 2
    kernels = json.loads((out / "kernels.json").read_text())
    assert {c["op"] for c in kernels["cases"]} == {"rope_store", "search_topk", "splice"}
    assert not any("error" in c for c in kernels["cases"])
    assert all(c.get("matches_reference", c.get("v_bit_exact")) for c in kernels["cases"])
    assert not list(out.glob("*.partial.json"))
    assert "gpu session: OK" in done.stdout and "DRY RUN" in done.stdout


def test_a_failing_stage_fails_the_session(tmp_path):
    """Every stage's Python fails (the summary's excepted): each is recorded as failed, the
    summary says so and the script exits non-zero."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m lrag_engine.bench.session_summary" ]; then '
                       f'exec {shutil.which("python3") or "python3"} "$@"; fi\nexit 3\n')
    wrapper.chmod(0o755)
    done = _run(tmp_path, "--dry-run", PYTHON=str(wrapper))
    assert done.returncode != 0
    stages = read_stages(tmp_path / "out")
    assert [s["name"] for s in stages] == DRY_STAGES
    assert all(s["status"] == "failed" and s["rc"] == 3 for s in stages)
    assert "gpu session: FAILED" in done.stdout


def test_a_spent_budget_leaves_the_session_incomplete(tmp_path):
    """Stages that would start past the budget are skipped, and the session says it is
    incomplete (exit status 1) instead of passing."""
    done = _run(tmp_path, "--dry-run", GPU_SESSION_BUDGET_S="10")
    assert done.returncode == 1
    stages = read_stages(tmp_path / "out")
    assert [s["name"] for s in stages] == DRY_STAGES
    assert all(s["status"] == "skipped" for s in stages)
    assert "gpu session: INCOMPLETE" in done.stdout and "skipped (session budget spent)" in done.stdout


def test_unknown_argument_exits_2(tmp_path):
    done = _run(tmp_path, "--fast")
    assert done.returncode == 2 and "--fast" in done.stderr


def test_summary_of_a_partial_session(tmp_path):
    (tmp_path / "stages.tsv").write_text("env\tok\t0\t3\t30\ncuda-tests\tok\t1\t40\t90\n"
                                         "latency\ttimeout\t124\t150\t150\nkernels\tskipped\t0\t0\t60\n")
    (tmp_path / "cuda-tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.ops.test_x" name="test_a"><failure message="boom"/></testcase>'
        '<testcase classname="tests.ops.test_x" name="test_b"/></testsuite></testsuites>')
    (tmp_path / "latency.partial.json").write_text(json.dumps({
        "kind": "GPU measurement", "partial": True, "reference_workload": True,
        "modes": [{"mode": "native", "status": "ok"}, {"mode": "retrieval", "status": "failed", "reason": "OOM"}]}))
    summary = summarize(tmp_path)
    assert not summary["ok"] and summary["failed_stages"] == ["latency"] and summary["skipped_stages"] == ["kernels"]
    assert summary["seconds"] == 193
    assert summary["tests"]["cuda-tests"] == {"passed": 3, "failed": 1, "skipped": 1,
                                              "failed_tests": ["tests.ops.test_x::test_a"]}
    assert summary["latency"]["partial"] and summary["latency"]["modes"]["retrieval"]["reason"] == "OOM"
    assert summary["kernels"] is None
    text = render(summary)
    assert "FAILED" in text and "PARTIAL" in text and "kernels skipped" in text and "test_a" in text
    assert len(text.splitlines()) <= 40


def test_malformed_stage_line_is_named(tmp_path):
    (tmp_path / "stages.tsv").write_text("env\tfine\t0\t3\t30\n")
    with pytest.raises(ValueError, match=r"stages.tsv:1.*'env\\tfine"):
        read_stages(tmp_path)
