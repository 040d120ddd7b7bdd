"""Shared helpers of the benchmark scripts: environment record, measured peak rates,
NVML sampling, timing and JSON output.

Everything works without a GPU and without NVML: GPU-only fields become ``None``.

    env = environment(device)                  # date, commit, versions, device info
    rate = matmul_rate(device)                 # measured FLOP/s (bf16 on CUDA, float32 on CPU)
    copy = copy_bandwidth(device)              # measured device copy (and pinned H2D) bytes/s
    seconds = median_seconds(fn, device)       # median of CUDA events / perf_counter
    ms = do_bench_ms(fn)                       # CUDA: triton do_bench median, L2 cleared
    with NvmlSampler(device) as power: ...     # power / clocks sampled while the block runs
    write_json(path, result)
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]

# Matmul sizes: large enough to reach the tensor-core peak on an H100 (8192^3 bf16 is
# ~1.1 TFLOP per call, ~1.4 ms), small enough on a CPU to finish in well under a second.
CUDA_MATMUL_N = 8192
CPU_MATMUL_N = 1024
# Copies of >= 1 GiB measure DRAM and not the 50 MB L2; a CPU copy of 64 MiB already
# leaves the last-level cache.
CUDA_COPY_BYTES = 1 << 30
CUDA_H2D_BYTES = 256 << 20
CPU_COPY_BYTES = 64 << 20
NVML_INTERVAL_S = 0.2


# ---------------------------------------------------------------------- provenance
def git_commit(repo: Path = REPO) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the checkout holding the benchmarks."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def device_slug(device: torch.device | str) -> str:
    """A file-name-safe device name: "nvidia-h100-80gb-hbm3", "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------------- NVML
def _nvml():
    """The pynvml module (package nvidia-ml-py) initialised, or None when absent or no driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, or NVMLError when no driver / no GPU is present
        return None


def _nvml_handle(nvml, device: torch.device):
    """NVML handle of the CUDA device, by PCI bus id so that CUDA_VISIBLE_DEVICES cannot
    mismatch the two numberings; by index when the bus id is not exposed."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08X}:{bus:02X}:{getattr(props, 'pci_device_id', 0):02X}.0"
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(pci)
        except Exception:
            pass
    try:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # NVML sees other devices than CUDA (containers, MIG): no samples then
        return None


def _nvml_read(nvml, handle) -> dict:
    """One sample; a field the board does not report is None."""
    def read(fn, *args, scale=1.0):
        try:
            return fn(handle, *args) * scale
        except Exception:
            return None
    mem = None
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:
        pass
    util = None
    try:
        util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except Exception:
        pass
    return {
        "power_w": read(nvml.nvmlDeviceGetPowerUsage, scale=1e-3),
        "sm_clock_mhz": read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM),
        "gpu_util_pct": util,
        "memory_used_bytes": None if mem is None else mem.used,
        "temperature_c": read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
    }


def nvml_snapshot(device: torch.device | str) -> dict | None:
    """Static and current NVML data of a CUDA device, or None (CPU, no NVML)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    handle = _nvml_handle(nvml, device)
    if handle is None:
        return None

    def read(fn, *args, scale=1.0):
        try:
            return fn(handle, *args) * scale
        except Exception:
            return None
    info = _nvml_read(nvml, handle)
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        driver = None
    info.update(
        driver=driver,
        power_limit_w=read(nvml.nvmlDeviceGetEnforcedPowerLimit, scale=1e-3),
        max_sm_clock_mhz=read(nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_SM),
        max_mem_clock_mhz=read(nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_MEM),
    )
    return info


class NvmlSampler:
    """Samples power, clocks, utilisation and memory every ``interval`` seconds on a
    background thread while the ``with`` body runs; ``summary()`` afterwards.
    A no-op (summary None) on the CPU or without NVML."""

    def __init__(self, device: torch.device | str, interval: float = NVML_INTERVAL_S) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = _nvml() if self.device.type == "cuda" else None
        self._handle = _nvml_handle(self._nvml, self.device) if self._nvml is not None else None

    def __enter__(self) -> "NvmlSampler":
        if self._handle is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(_nvml_read(self._nvml, self._handle))
            self._stop.wait(self.interval)

    def summary(self) -> dict | None:
        if not self.samples:
            return None

        def values(key):
            return [s[key] for s in self.samples if s[key] is not None]

        def stat(key, fn):
            got = values(key)
            return fn(got) if got else None
        return {
            "samples": len(self.samples),
            "power_w_mean": stat("power_w", statistics.fmean),
            "power_w_max": stat("power_w", max),
            "sm_clock_mhz_median": stat("sm_clock_mhz", statistics.median),
            "sm_clock_mhz_min": stat("sm_clock_mhz", min),
            "mem_clock_mhz_median": stat("mem_clock_mhz", statistics.median),
            "gpu_util_pct_mean": stat("gpu_util_pct", statistics.fmean),
            "memory_used_bytes_max": stat("memory_used_bytes", max),
            "temperature_c_max": stat("temperature_c", max),
        }


# ---------------------------------------------------------------------- device info
def device_info(device: torch.device | str) -> dict:
    """Name, memory and (CUDA) NVML state of the device the benchmark runs on."""
    device = torch.device(device)
    info: dict = {"type": device.type, "slug": device_slug(device), "host": platform.node(),
                  "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, total_memory_bytes=props.total_memory,
                    nvml=nvml_snapshot(device))
    else:
        info.update(name=info["cpu"], nvml=None)
    return info


# ---------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device | str, warmup: int = 3,
                   reps: int = 10, sync_each: bool = False) -> float:
    """Median time of ``fn()`` over ``reps`` calls after ``warmup`` calls: CUDA events
    around each call on CUDA, perf_counter on the CPU.

    sync_each (CUDA): wait for the device before each call, so that every sample starts
    on an idle device and includes the host work of issuing the call (the latency of one
    call made when needed) instead of overlapping it with the previous call's copies."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda" and sync_each:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    elif device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in pairs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def do_bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn()`` on CUDA by ``triton.testing.do_bench``, which clears
    the L2 cache before every call: a kernel then reads its inputs from DRAM, as in the
    engine where other layers' work evicts them between calls."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def matmul_rate(device: torch.device | str, n: int | None = None) -> dict:
    """Measured dense matmul rate: bf16 ``n^3`` on CUDA, float32 on the CPU (what the
    engine computes in on each). Returns flops_per_s, dtype, n, seconds (median)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (CUDA_MATMUL_N if cuda else CPU_MATMUL_N)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), device, warmup=3, reps=20 if cuda else 5)
    return {"flops_per_s": 2 * n ** 3 / seconds, "dtype": str(dtype).replace("torch.", ""), "n": n,
            "seconds": seconds}


def copy_bandwidth(device: torch.device | str) -> dict:
    """Measured copy bandwidth in bytes/s, bytes counted read + write: device-to-device
    (``d2d``) and, on CUDA, pinned host-to-device (``h2d_pinned``, bytes counted once)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, warmup=2, reps=10 if cuda else 5)
    result = {"d2d_bytes_per_s": 2 * size / seconds, "d2d_bytes": size}
    del src, dst
    if cuda:
        host = torch.ones(CUDA_H2D_BYTES, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(CUDA_H2D_BYTES, dtype=torch.uint8, device=device)
        seconds = median_seconds(lambda: dev.copy_(host, non_blocking=True), device, warmup=2, reps=10)
        result.update(h2d_pinned_bytes_per_s=CUDA_H2D_BYTES / seconds, h2d_bytes=CUDA_H2D_BYTES)
    else:
        result.update(h2d_pinned_bytes_per_s=None, h2d_bytes=None)
    return result


# ---------------------------------------------------------------------- records
def environment(device: torch.device | str) -> dict:
    """The provenance block every result file starts with."""
    return {"date": now().isoformat(timespec="seconds"), "git": git_commit(), "versions": versions(),
            "device": device_info(device), "argv": sys.argv}


def _finite(obj):
    """JSON has no NaN/inf: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: dict) -> Path:
    """Writes ``obj`` as indented JSON (parents created, NaN/inf as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(obj), indent=2, default=str) + "\n")
    return path


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
