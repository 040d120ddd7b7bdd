"""benchmarks/latency.py: end-to-end run on the CPU, skipped modes, and its FLOP model
against the FLOPs of the operations the engine really runs."""
import json
import shutil
import subprocess
import time
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import latency
from lrag_engine.bench.nvml import NvmlSampler
from lrag_engine.config import MemoryConfig, ModelConfig
from lrag_engine.engine import Engine


def test_runs_end_to_end_and_records_skipped_modes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(latency.MODES, "bogus", latency.Mode("an option the engine lacks",
                                                             memory=dict(top_k=6, no_such_option=1)))
    out = tmp_path / "lat.json"
    code = latency.main(["--device", "cpu", "--preset", "tiny", "--frames", "6",
                         "--modes", "native,retrieval-graphs,bogus", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("environment", "matmul", "copy", "config", "modes", "summary", "derived", "skipped",
                "steady_start_block", "flops_per_block_full_context", "notes"):
        assert key in report, key
    env = report["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["device"]["type"] == "cpu"
    assert "commit" in env["git"] and env["date"]
    assert report["matmul"]["flops_per_s"] > 0 and report["copy"]["d2d_bytes_per_s"] > 0
    assert report["config"]["preset"] == "tiny" and report["config"]["frames"] == 6

    modes = {m["mode"]: m for m in report["modes"]}
    assert modes["native"]["status"] == "ok"
    assert len(modes["native"]["block_seconds"]) == 2 and all(t > 0 for t in modes["native"]["block_seconds"])
    assert modes["native"]["retrieved_frames"] == [0, 0]
    for name in ("retrieval-graphs", "bogus"):
        assert modes[name]["status"] == "skipped" and report["skipped"][name] == modes[name]["reason"]
    assert "CUDA" in report["skipped"]["retrieval-graphs"]
    assert "no_such_option" in report["skipped"]["bogus"]
    # 6 frames never fill the window: no steady-state numbers, and the summary says why.
    assert report["summary"]["native"]["steady_blocks"] == 0 and report["summary"]["native"]["reason"]
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "NOT the PERF.md reference workload" in printed and "skipped" in printed


def test_warm_up_repeats_and_spread(tmp_path, capsys):
    """Each mode: a warm-up run, then timed runs whose steady blocks are pooled into a
    median and IQR that match an independent computation; one torch thread on the CPU;
    the output labelled a code-path check, no targets column off the GPU."""
    out = tmp_path / "lat.json"
    code = latency.main(["--device", "cpu", "--preset", "tiny", "--frames", "36", "--repeats", "2",
                         "--warmup-frames", "3", "--warmup-blocks", "1", "--modes", "native,retrieval",
                         "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["config"]["torch_threads"] == 1 and report["config"]["repeats"] == 2
    assert report["kind"].startswith("code-path check") and not report["reference_workload"]
    start = report["steady_start_block"]
    for mode in report["modes"]:
        assert mode["status"] == "ok" and mode["warmup_frames"] == 3 and mode["warmup_seconds"] > 0
        assert len(mode["runs"]) == 2 and all(len(run["block_seconds"]) == 12 for run in mode["runs"])
        pooled = np.array([t for run in mode["runs"] for t in run["block_seconds"][start:]]) * 1e3
        s = report["summary"][mode["mode"]]
        assert s["repeats"] == 2 and s["steady_blocks"] == 12 - start > 0
        assert s["block_ms_median"] == pytest.approx(np.median(pooled))
        assert s["block_ms_iqr"] == pytest.approx(np.percentile(pooled, 75) - np.percentile(pooled, 25))
        assert s["repeat_medians_ms"] == pytest.approx([np.median(np.array(run["block_seconds"][start:]) * 1e3)
                                                        for run in mode["runs"]])
        assert s["noisy"] == (s["iqr_pct_of_median"] > 10 or s["repeat_spread_pct_of_median"] > 10)
    assert len(report["warnings"]) == sum(s["noisy"] for s in report["summary"].values())
    assert not out.with_suffix(".partial.json").exists()
    printed = capsys.readouterr().out
    assert "CODE-PATH CHECK" in printed and "target" not in printed


def test_spread_warns_on_noisy_runs():
    steady = {"runs": [{"block_seconds": [1.0, 1.0, 1.0, 1.0]}, {"block_seconds": [1.0, 1.0, 1.3, 1.3]}]}
    s = latency.spread(steady, start=1)
    assert s["block_ms_median_pooled"] == pytest.approx(1000) and s["repeat_medians_ms"] == pytest.approx([1000, 1300])
    assert s["noisy"] and s["repeat_spread_pct_of_median"] == pytest.approx(30)
    calm = {"runs": [{"block_seconds": [1.0, 1.01, 0.99]}, {"block_seconds": [1.0, 1.0, 1.02]}]}
    assert not latency.spread(calm, start=0)["noisy"]


def test_long_preset_reads_block_time_at_its_points(tmp_path, monkeypatch):
    """--long: the host tier under a byte cap that drops the oldest frames, and block
    times read near each point (here frames 12 and 30 of a 36-frame run)."""
    monkeypatch.setattr(latency, "LONG_POINTS", (12, 30))
    out = tmp_path / "long.json"
    code = latency.main(["--device", "cpu", "--preset", "tiny", "--long", "--frames", "36",
                         "--host-budget-gb", "0.0008", "--warmup-frames", "0", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["long"]) == {"native", "retrieval-host"} and report["config"]["repeats"] == 1
    host = next(m for m in report["modes"] if m["mode"] == "retrieval-host")
    assert host["history_host_budget_bytes"] <= 800_000 and host["engine"]["memory"]["overflow_policy"] == "drop_oldest"
    for mode, lp in report["long"].items():
        run = next(m for m in report["modes"] if m["mode"] == mode)["runs"][0]["block_seconds"]
        # Block i ends at frame 3 (i + 1); within 3 blocks of frame 12: blocks 0..6, of 30: blocks 6..11.
        assert lp["points"]["12"]["block_ms_median"] == pytest.approx(1e3 * np.median(run[0:7]))
        assert lp["points"]["30"]["block_ms_median"] == pytest.approx(1e3 * np.median(run[6:12]))
        assert lp["growth_pct"] == pytest.approx(
            100 * (lp["points"]["30"]["block_ms_median"] / lp["points"]["12"]["block_ms_median"] - 1))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_default_output_is_ignored_by_git():
    path = latency.DEFAULT_OUT_DIR / "latency-cpu-2026-01-01.json"
    done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=latency.REPO, capture_output=True)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, f"{path} would be tracked by git"


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert latency.main(["--device", "cpu", "--frames", "7", "--out", str(tmp_path / "x.json")]) == 2
    assert "multiple of 3" in capsys.readouterr().err
    assert latency.main(["--device", "cpu", "--modes", "native,nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "nope" in capsys.readouterr().err
    assert latency.main(["--device", "cpu", "--repeats", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
    assert latency.main(["--device", "cpu", "--warmup-frames", "4", "--out", str(tmp_path / "x.json")]) == 2
    assert "--warmup-frames must be 0 or a positive multiple of 3, got 4" in capsys.readouterr().err
    assert latency.main(["--device", "cpu", "--host-budget-gb", "-1", "--out", str(tmp_path / "x.json")]) == 2
    assert "--host-budget-gb must be > 0" in capsys.readouterr().err


class _FlopCounter(TorchDispatchMode):
    """FLOPs of matmul-like ops as they are dispatched (nested ops are not re-entered)."""

    def __init__(self):
        super().__init__()
        self.linear = self.attention = 0
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "linear":
            x, w = args[0], args[1]
            self.linear += 2 * x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]
        elif name == "scaled_dot_product_attention":
            q, k = args[0], args[1]            # [B, H, Lq, D], [B, H, Lk, D]
            self.attention += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        elif name in ("mm", "addmm", "bmm", "matmul", "baddbmm", "convolution", "einsum"):
            self.unknown.add(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("top_k,widen", [pytest.param(6, False, id="K6"), pytest.param(0, False, id="native"),
                                         pytest.param(4, True, id="K4-widen")])
def test_flop_model_matches_the_engine_operations(top_k, widen):
    model = ModelConfig.preset("tiny")
    memory = MemoryConfig(top_k=top_k, widen_local_until_memory=widen)
    engine = Engine(model, memory, seed=1)
    forwards = len(engine.schedule) + 1
    # Block 0 also encodes the text (once per prompt, not per block). Counted: the window
    # filling (1, 2), retrieval starting (6, 7) and the steady state (8, 9).
    counted = {1, 2, 6, 7, 8, 9}
    blocks = engine.stream(num_frames=30)
    for block in range(10):
        if block not in counted:
            next(blocks)
            continue
        with _FlopCounter() as counter:
            out = next(blocks)
        assert not counter.unknown, f"uncounted matmul ops {counter.unknown}"
        retrieved = len(out.log.selected[0])
        want = latency.block_flops(model, memory, forwards, 1, block, retrieved)
        assert counter.linear + counter.attention == want, (block, retrieved)
    assert retrieved == top_k  # the run reached full retrieval


def test_flop_model_at_the_reference_shapes_matches_perf_md():
    # PERF.md: ~11.7 TFLOP linear + ~16.1 TFLOP self-attention per forward, ~141 TFLOP per block.
    cfg = ModelConfig.preset("wan2.1-t2v-1.3b")
    memory = MemoryConfig()
    per_forward = latency.forward_flops(cfg, 1, memory.frames_per_block, memory.window)
    assert per_forward["linear"] == pytest.approx(11.7e12, rel=0.01)
    assert per_forward["self_attention"] == pytest.approx(16.1e12, rel=0.01)
    steady_block = 20
    assert latency.context_frames(memory, steady_block, memory.top_k) == memory.window
    assert latency.block_flops(cfg, memory, 5, 1, steady_block, memory.top_k) == pytest.approx(141e12, rel=0.01)


def test_nvml_sampler_summary_from_samples():
    """The GPU-only sampling path, fed by a stand-in for pynvml (no driver here)."""
    power = iter(range(100_000, 10_000_000, 50_000))   # mW, rising
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=0, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetPowerUsage=lambda h: next(power),
        nvmlDeviceGetClockInfo=lambda h, clock: 1980 if clock == 0 else 2619,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=90),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30),
        nvmlDeviceGetTemperature=lambda h, sensor: 61)
    sampler = NvmlSampler("cpu", interval=0.01)
    assert sampler.summary() is None
    sampler._nvml, sampler._handle = fake, object()
    with sampler:
        time.sleep(0.1)
    s = sampler.summary()
    n = s["samples"]
    assert n >= 2
    watts = [100 + 50 * i for i in range(n)]
    assert s["power_w_max"] == pytest.approx(watts[-1]) and s["power_w_mean"] == pytest.approx(sum(watts) / n)
    assert s["sm_clock_mhz_median"] == 1980 and s["mem_clock_mhz_median"] == 2619
    assert s["memory_used_bytes_max"] == 3 << 30 and s["gpu_util_pct_mean"] == 90
