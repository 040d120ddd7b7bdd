"""Support code of the benchmark scripts: provenance, NVML, device info, timing, rates, records, FLOPs."""
