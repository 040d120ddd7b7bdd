"""Smoke run of benchmarks/bench_memory.py at tiny sizes: it runs over every page-table
backend built here, reports only measured CPU figures (the CUDA part says why it was
skipped) and writes its JSON."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lrag_engine.memory import _ext

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_memory_quick_writes_json(bench, tmp_path):
    threads = torch.get_num_threads()
    result = bench.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads   # restored
    files = list(tmp_path.glob("memory-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == result
    backends = [kind for kind, reason in result["backends"].items() if reason is None]
    assert "python" in backends
    assert ("cpp" in backends) == _ext.extension_available()

    tables = result["cpu_tables"]
    drops = result["cpu_drop_oldest"]
    growth = result["cpu_chunk_growth"]
    for kind in backends:
        for key in ("place_drop_pages_per_s", "place_drop_cycle_us", "place_spill_pages_per_s"):
            assert tables[f"{kind}_{key}"] > 0
        for n in (4, 16):
            assert drops[f"{kind}_append_drop_us_at_{n}_frames"] > 0
            assert drops[f"{kind}_page_ids_us_at_{n}_frames"] > 0
        assert drops[f"{kind}_append_drop_ratio_16_vs_4_frames"] > 0
        chunks = [v for k, v in growth.items() if k.startswith(f"{kind}_chunk_")]
        assert len(chunks) == 2
        for figure in chunks:
            assert figure["reserved_bytes_added"] == figure["chunk_bytes"] > 0
            assert figure["grow_append_us"] > 0 and figure["steady_append_us"] > 0
    assert not any(key.startswith("torch_") or key.startswith("paged_") for key in drops)
    if not torch.cuda.is_available():
        assert result["cuda"] == {"skipped": "no CUDA device visible to torch"}
    else:
        assert result["cuda"]["host_append_GBps"] > 0 and result["cuda"]["device_append_GBps"] > 0


def test_tier_write_figures_run_on_the_cpu(bench):
    """The CUDA figures' code path, at small shapes on the CPU (both tiers are host memory)."""
    out = bench.tier_write_figures("cpu", page_shape=(4, 2, 8), layers=2, frames=2, reps=2, dtype=torch.float32)
    assert out["bytes_per_append"] == 2 * 2 * (2 * 4 * 2 * 8 * 4)
    for key in ("device_append_GBps", "host_append_GBps", "copy_d2d_GBps", "copy_d2h_pinned_GBps"):
        assert out[key] > 0


def test_drop_figures_cover_both_backends_and_lengths(bench):
    out = bench.drop_figures(budgets=(6, 12), reps=2, backends=("python",))
    assert set(k for k in out if k != "shape") == {
        "python_append_drop_us_at_6_frames", "python_append_drop_us_at_12_frames",
        "python_page_ids_us_at_6_frames", "python_page_ids_us_at_12_frames",
        "python_append_drop_ratio_12_vs_6_frames", "python_page_ids_ratio_12_vs_6_frames"}
    assert out["shape"]["frames_per_append"] == 3 and out["shape"]["retrieved_frames"] == 6
