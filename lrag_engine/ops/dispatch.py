"""Choice between a Triton kernel and its PyTorch reference.

Triton is optional: the package imports without it and every op falls back to its
``*_ref``. Modes:

- ``"auto"``: the kernel on CUDA tensors (when Triton is importable), the reference
  everywhere else (CPU tensors included, even under ``TRITON_INTERPRET=1``).
- ``"triton"``: the kernel; on CPU tensors it needs ``TRITON_INTERPRET=1`` set before
  the kernel module is imported (Triton decides at decoration time). Without Triton
  installed it warns once and falls back to the reference.
- ``"reference"``: always the reference.
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAS_TRITON = False

MODES = ("auto", "triton", "reference")

_warned_missing_triton = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(tensor: torch.Tensor, mode: str, op: str = "op") -> bool:
    """Whether ``op`` on ``tensor``'s device runs its Triton kernel under ``mode``."""
    global _warned_missing_triton
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if mode == "reference":
        return False
    if not HAS_TRITON:
        if mode == "triton" and not _warned_missing_triton:
            warnings.warn(f"{op}: mode='triton' but Triton is not installed; "
                          "running the PyTorch reference instead", RuntimeWarning, stacklevel=3)
            _warned_missing_triton = True
        return False
    if tensor.is_cuda:
        return True
    if mode == "auto":
        return False
    if not interpreting():
        raise RuntimeError(f"{op}: mode='triton' on {tensor.device.type} tensors needs the Triton "
                           "interpreter: export TRITON_INTERPRET=1 before importing lrag_engine")
    return True


def check_kernel_runnable(kernel, tensor: torch.Tensor, op: str) -> None:
    """Fail clearly when a kernel compiled for the GPU is about to get CPU tensors.

    Triton picks compiling or interpreting when a function is decorated: its own
    library (``tl.topk``...) when ``triton`` is first imported, our kernels when their
    module is. ``TRITON_INTERPRET=1`` set any later would otherwise fail deep inside
    the Triton driver.
    """
    if tensor.is_cuda:
        return
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    if not (isinstance(kernel, InterpretedFunction) and isinstance(standard.sort_impl, InterpretedFunction)):
        raise RuntimeError(f"{op}: Triton was imported for the GPU, so its kernels cannot take "
                           f"{tensor.device.type} tensors; set TRITON_INTERPRET=1 before triton is "
                           "first imported (export it, or set it at the top of tests/conftest.py)")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()
