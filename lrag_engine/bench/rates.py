"""Measured peak rates of a device, the denominators of MFU and bandwidth figures.

    rate = matmul_rate(device)                 # FLOP/s (bf16 on CUDA, float32 on CPU)
    copy = copy_bandwidth(device)              # device copy (and pinned H2D) bytes/s
"""
from __future__ import annotations

import torch

from .timing import median_seconds

# Matmul sizes: large enough to reach the tensor-core peak on an H100 (8192^3 bf16 is
# ~1.1 TFLOP per call, ~1.4 ms), small enough on a CPU to finish in well under a second.
CUDA_MATMUL_N = 8192
CPU_MATMUL_N = 1024
# Copies of >= 1 GiB measure DRAM and not the 50 MB L2; a CPU copy of 64 MiB already
# leaves the last-level cache.
CUDA_COPY_BYTES = 1 << 30
CUDA_H2D_BYTES = 256 << 20
CPU_COPY_BYTES = 64 << 20


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
