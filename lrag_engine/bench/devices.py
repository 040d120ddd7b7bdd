"""What the benchmark runs on: a file-name-safe device name and a device record."""
from __future__ import annotations

import os
import platform
import re

import torch

from .nvml import nvml_snapshot


def device_slug(device: torch.device | str) -> str:
    """A file-name-safe device name: "nvidia-h100-80gb-hbm3", "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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
