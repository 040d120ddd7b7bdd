"""Benchmark scripts (run them as files: ``python benchmarks/latency.py``)."""
