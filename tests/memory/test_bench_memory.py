"""Smoke run of benchmarks/bench_memory.py at tiny sizes: it runs, reports only measured
CPU figures here (the CUDA part says why it was skipped) and writes its JSON."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lrag_engine.memory import _ext

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_memory.py"


def test_bench_memory_quick_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--out", str(tmp_path)])
    files = list(tmp_path.glob("memory-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == result
    cpu = result["cpu_tables"]
    for key in ("alloc_free_pages_per_s", "append_with_spill_pages_per_s", "prefetch_plan_us"):
        assert cpu[key] > 0
    drops = result["cpu_drop_oldest"]
    assert all(drops[f"{kind}_append_drop_us_at_{n}_frames"] > 0 for kind in ("torch", "paged") for n in (4, 16))
    if not torch.cuda.is_available():
        assert result["cuda"] == {"skipped": "no CUDA device visible to torch"}
    else:
        assert result["cuda"]["prefetch_GBps"] > 0
