"""Smoke run of benchmarks/bench_retention.py at tiny sizes (--quick): every policy's long
run keeps the history at the cap and the pool flat once it is reached, and the report,
JSON and plot, is written."""
import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_retention.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_retention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_retention_quick(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "retention.json"
    report = load().main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads      # restored
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    assert [run["retention"] for run in report["long_runs"]] == ["drop_oldest", "least_retrieved", "diverse"]
    for run in report["long_runs"]:
        assert run["max_history_frames_held"] == run["cap"]
        assert run["pool_used_flat_after_cap"] is True
        assert all(s["history_frames"] <= run["cap"] for s in run["samples"])
        assert all(v is not None and v > 0 for v in run["block_seconds_at"].values())
        assert run["block_cpu_seconds_at"].keys() == run["block_seconds_at"].keys()
    quality = report["retrieval_quality"]
    assert set(quality) == {"uncapped", "drop_oldest", "least_retrieved", "diverse"}
    assert len({row["queries"] for row in quality.values()}) == 1      # the same queries for all
    assert all(0.0 <= row["p@6"] <= 1.0 for row in quality.values())
