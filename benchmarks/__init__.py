"""Benchmark scripts: run them as files (``python benchmarks/latency.py``) or as modules
(``python -m benchmarks.latency``); their support code is ``lrag_engine.bench``."""
