"""Attention backends: torch SDPA always, flash-attn and xformers when installed.

The backend sees only queries and a key/value context, all ``[B, L, H, D]``, so any
AR backbone can call it with its own tensors. No mask: a block attends to its whole
context (its own frames included).
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain float32 softmax attention, for tests."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)


def _attend_flash(q, k, v):
    from flash_attn import flash_attn_func
    return flash_attn_func(q, k, v)


def _attend_xformers(q, k, v):
    from xformers.ops import memory_efficient_attention
    return memory_efficient_attention(q, k, v)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    names = ["sdpa"]
    if _installed("flash_attn"):
        names.append("flash")
    if _installed("xformers"):
        names.append("xformers")
    return names


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, AttendFn]:
    """Pick the attention function. ``auto``: flash-attn, then xformers, on CUDA with a
    16-bit dtype; SDPA otherwise. Naming a backend that is not installed is an error."""
    device = torch.device(device)
    fast_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        for candidate in ("flash", "xformers"):
            if fast_ok and candidate in available_backends():
                name = candidate
                break
        else:
            name = "sdpa"
    if name == "sdpa":
        return name, attend_sdpa
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not installed; available: {available_backends()}")
    if not fast_ok:
        raise ValueError(f"attention backend {name!r} needs a CUDA device and float16/bfloat16, "
                         f"got {device} / {dtype}")
    return name, {"flash": _attend_flash, "xformers": _attend_xformers}[name]
