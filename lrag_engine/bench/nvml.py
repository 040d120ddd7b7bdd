"""NVML readings of a CUDA device: one snapshot, or samples taken while a block of code runs.

pynvml (package nvidia-ml-py) is imported only when a CUDA device is read; without it,
without a driver, or on the CPU every reading is None.

    nvml_snapshot(device)                      # driver, limits, current power / clocks
    with NvmlSampler(device) as power: ...     # sampled on a thread; power.summary()
"""
from __future__ import annotations

import statistics
import threading

import torch

NVML_INTERVAL_S = 0.2


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


def _read(fn, handle, *args, scale=1.0):
    """``fn(handle, *args) * scale``, or None when the board does not report it."""
    try:
        return fn(handle, *args) * scale
    except Exception:
        return None


def _nvml_read(nvml, handle) -> dict:
    """One sample; a field the board does not report is None."""
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
        "power_w": _read(nvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
        "sm_clock_mhz": _read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": _read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "gpu_util_pct": util,
        "memory_used_bytes": None if mem is None else mem.used,
        "temperature_c": _read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
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
    info = _nvml_read(nvml, handle)
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        driver = None
    info.update(
        driver=driver,
        power_limit_w=_read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
        max_sm_clock_mhz=_read(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        max_mem_clock_mhz=_read(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
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

        def stat(key, fn):
            got = [s[key] for s in self.samples if s[key] is not None]
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
