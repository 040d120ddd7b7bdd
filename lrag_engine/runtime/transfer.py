"""Host-to-device index transfers that never stall the host.

A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory, which
blocks the host until the device queue reaches the copy. Staging through pinned
memory from torch's caching host allocator makes the copy asynchronous, and the
allocator keeps the staging block alive until the copy has run.
"""
from __future__ import annotations

import torch


def index_tensor(values, device: torch.device) -> torch.Tensor:
    """int64 tensor of ``values`` (a sequence or array of ints) on ``device``, copied
    asynchronously on CUDA."""
    host = torch.as_tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
