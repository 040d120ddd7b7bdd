"""Input checks of a generation request, run before any work starts.

Every check names the bad argument and what it should be. None of them allocates
anything proportional to the number of frames.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .config import MemoryConfig, ModelConfig, RuntimeConfig
from .memory.budget import HistoryBudget
from .memory.history import HistoryFullError

# Frame numbers, history positions and the top-k search's packed candidate index are
# 32-bit, so one run holds fewer than 2**31 frames.
MAX_FRAMES = 2 ** 31 - 1
# What torch.Generator.manual_seed accepts (negative seeds wrap modulo 2**64).
SEED_RANGE = (-2 ** 63, 2 ** 64)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    return seed


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where ``os.sysconf`` cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_tensor(name: str, tensor: torch.Tensor, shape: Sequence[int | None]) -> None:
    """A finite floating-point tensor of ``shape`` (None: any size)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_num_frames(num_frames, frames_per_block: int) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0 \
            or num_frames % frames_per_block:
        raise ValueError(f"num_frames must be a positive multiple of frames_per_block "
                         f"({frames_per_block}), got {num_frames!r}")
    if num_frames > MAX_FRAMES:
        raise ValueError(f"num_frames must be <= {MAX_FRAMES} (frame numbers are 32-bit), got {num_frames}")
    return num_frames


def infer_batch(batch_size, *tensors) -> int:
    """``batch_size``, else the leading size of the first tensor given, else 1."""
    batch = batch_size
    for tensor in tensors:
        if batch is None and isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
            batch = tensor.shape[0]
    batch = 1 if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch!r}")
    return batch


def check_text(text: torch.Tensor, batch: int, cfg: ModelConfig) -> None:
    check_tensor("text", text, (batch, None, cfg.text_dim))
    if not 1 <= text.shape[1] <= cfg.text_len:
        raise ValueError(f"text must have 1..text_len={cfg.text_len} tokens, got {text.shape[1]}")


def check_initial_latents(latents, batch: int, cfg: ModelConfig, num_frames: int | None = None) -> None:
    """Given clean frames [B, n, C, H, W], 1 <= n, finite; with ``num_frames`` the stream's
    n + num_frames frames must stay within MAX_FRAMES."""
    check_tensor("initial_latents", latents, (batch, None, cfg.in_channels, cfg.height, cfg.width))
    n = latents.shape[1]
    if n < 1:
        raise ValueError("initial_latents must hold at least one frame, got 0")
    if num_frames is not None and n + num_frames > MAX_FRAMES:
        raise ValueError(f"initial_latents ({n} frames) + num_frames ({num_frames}) must be <= {MAX_FRAMES} "
                         "(frame numbers are 32-bit)")


def check_renoise(renoise, batch: int, num_blocks: int, steps: int, frames_per_block: int,
                  cfg: ModelConfig) -> list[torch.Tensor] | None:
    if renoise is None:
        return None
    renoise = list(renoise)
    want = num_blocks * (steps - 1)
    if len(renoise) != want:
        raise ValueError(f"renoise must hold {want} tensors ({num_blocks} blocks x {steps - 1} "
                         f"non-final steps), got {len(renoise)}")
    for i, r in enumerate(renoise):
        check_tensor(f"renoise[{i}]", r, (batch, frames_per_block, cfg.in_channels, cfg.height, cfg.width))
    return renoise


def check_output_fits(cfg: ModelConfig, batch: int, num_frames: int, device: torch.device) -> None:
    """The float32 output [B, T, C, H, W] must fit in physical memory (``generate``
    gathers it on the host)."""
    shape = [batch, num_frames, cfg.in_channels, cfg.height, cfg.width]
    need = math.prod(shape) * 4
    limit = physical_memory_bytes()
    if limit is not None and need > limit:
        raise ValueError(f"num_frames={num_frames} (batch {batch}): the float32 output {shape} needs "
                         f"{need} bytes, more than the {limit} bytes of physical memory; generate fewer "
                         "frames, or use stream() and keep only what is needed of each block")


def check_history_budget(memory: MemoryConfig, cfg: ModelConfig, dtype: torch.dtype, num_frames: int | None,
                         batch: int, host_only: bool) -> None:
    """A history budget that cannot hold one block's evictions, or (overflow_policy
    "error") the run's whole history, fails before any work, not minutes into it.
    ``num_frames`` None: a run of unknown length (only the first checks).

    With ``max_history_frames`` the history keeps at most that many frames per stream,
    so "the run's whole history" is at most the cap; with overflow_policy "error" the
    budgets must then hold the cap (for any run length), since the cap is what is
    meant to bound the history. The per-forward baseline (``host_only``) reads raw
    pages and needs the history in the compute dtype."""
    if memory.top_k == 0:
        return   # native mode keeps no history
    if host_only and memory.history_dtype is not None:
        raise ValueError(f"MemoryConfig.history_dtype={memory.history_dtype!r} is not available with "
                         "RuntimeConfig.retrieval_fetch='per_forward' (the baseline copies raw pages); use "
                         "retrieval_fetch='per_block' or history_dtype=None")
    budget = HistoryBudget.plan(memory, cfg.num_layers, batch, cfg.tokens_per_frame, cfg.num_heads,
                                cfg.head_dim, dtype, host_only=host_only)
    capacity = budget.capacity_frames
    if capacity is None:
        return
    host_tier = memory.history_tier == "host" or host_only
    names = "host_budget_bytes" if host_tier else "gpu_budget_bytes/host_budget_bytes"
    if capacity < memory.frames_per_block:
        raise ValueError(
            f"MemoryConfig.{names}: the history budgets hold {capacity} frames of {budget.frame_bytes} bytes "
            f"(batch {batch}), fewer than the {memory.frames_per_block} frames one block evicts; give at least "
            f"{memory.frames_per_block * budget.frame_bytes} bytes")
    resident = max(memory.top_k, memory.frames_per_block)
    if budget.host_bytes is not None and budget.gpu_frames < resident:
        raise ValueError(
            f"MemoryConfig.gpu_budget_bytes={memory.gpu_budget_bytes} holds {budget.gpu_frames} frames of "
            f"{budget.frame_bytes} bytes (batch {batch}), fewer than the {memory.top_k} retrieved frames or the "
            f"{memory.frames_per_block} evicted frames of a block; give at least "
            f"{resident * budget.frame_bytes} bytes, or use history_tier='host'")
    cap = memory.max_history_frames
    if cap is not None and memory.overflow_policy == "error" and cap > capacity:
        raise HistoryFullError(
            f"MemoryConfig.max_history_frames={cap} but the budgets hold {capacity} frames of "
            f"{budget.frame_bytes} bytes (batch {batch}, {budget.page_bytes} bytes per page): the history would "
            f"fill before the cap; give {names} at least {cap * budget.frame_bytes} bytes, lower "
            "max_history_frames, or set overflow_policy='drop_oldest'")
    needed = 0 if num_frames is None else max(0, num_frames - memory.window)
    if cap is not None:
        needed = min(needed, cap)
    if memory.overflow_policy == "error" and needed > capacity:
        raise HistoryFullError(
            f"{num_frames} frames evict {needed} frames into the history, but the budgets hold "
            f"{capacity} frames of {budget.frame_bytes} bytes; raise {names}, "
            "generate fewer frames, or set overflow_policy='drop_oldest'")


def runtime_for_weights(device: torch.device, dtype: torch.dtype, runtime: RuntimeConfig | None,
                        what: str = "model") -> RuntimeConfig:
    """The RuntimeConfig of an already-built network on ``device`` with ``dtype`` weights:
    ``runtime`` when it agrees with them (a bare "cuda" matches any CUDA device), else a
    ValueError naming the disagreement; None gives one on that device and dtype."""
    name = str(dtype).removeprefix("torch.")
    if runtime is None:
        return RuntimeConfig(device=str(device), dtype=name)
    wanted = torch.device(runtime.device)
    if wanted != device and not (wanted.type == device.type == "cuda" and wanted.index is None):
        raise ValueError(f"RuntimeConfig.device={runtime.device!r} but the {what} is on {device}")
    if runtime.torch_dtype != dtype:
        raise ValueError(f"RuntimeConfig.dtype={runtime.dtype!r} but the {what}'s weights are {name}")
    return runtime
