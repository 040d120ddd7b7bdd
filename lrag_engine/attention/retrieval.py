"""RetrievalAttention: LongLive-RAG memory as the self-attention of any AR video backbone.

Build it from the backbone's shapes, then drive it block by block:

    attn = RetrievalAttention(num_layers=L, num_heads=H, head_dim=D, tokens_per_frame=N,
                              memory=MemoryConfig(window=12, sink=1, top_k=6), positions="rope1d",
                              latent_channels=C)
    for each block of F frames:
        log = attn.begin_block()                       # search, evict, splice the context
        for each denoising forward:
            backbone(x, self_attention=attn.attention(recache=False))
        attn.end_block(clean)                          # clean [B, F, C, ...]: descriptors
        backbone(clean, self_attention=attn.attention(recache=True))   # store the block's K/V
        attn.start_retrieval()                         # optional: search for the next block now
        log()                                          # the block's retrieval log (BlockLog)
    attn.close()                                       # its pages go back to the pool

``attention(recache)`` returns ``self_attention(layer, q, k, v) -> out``, to be called by
every layer ``0 .. L-1`` in each forward, with q, k, v ``[B, F*N, H, D]`` in the
attention's dtype, **un-rotated**, tokens **frame-major** (frame 0's N tokens, then frame
1's...; inside a frame in the order the position encoding's per-token table uses:
row-major (h, w) for Wan 3-D RoPE). It returns ``[B, F*N, H, D]``.

Position rules (SPEC section 4): storage keeps K un-rotated; every block the context is
``[sinks | retrieved | local | block]``, each window frame rotated at its index in the
window order, retrieved frames at position 0, the block's q and K at its own positions.
A backbone that applies its own rotary embedding must not let K be rotated twice: give
``positions="none"`` and pass q and K already rotated (at absolute positions), or give
its rotation as a :class:`~lrag_engine.attention.positions.PositionEncoding` and pass
them un-rotated.

Misuse raises instead of computing garbage: wrong shapes, dtype, device, the
``[B, H, L, D]`` layout, a layer index out of range, a block that skipped
``end_block`` (its frames would never be found) or the recache pass (the window would
hold zeros), and position tables shorter than the window.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import KERNEL_MODES, MemoryConfig, resolve_dtype
from ..memory.cache import RetrievalCache
from ..memory.workspace import Workspace
from ..memory.history import HistoryStore, PagePool
from ..memory.retrieval import BlockLog, Descriptor, MeanDescriptor
from ..ops.rope import RopeTables
from .backend import AttendFn, get_backend
from .positions import PositionEncoding, check_tables, resolve_positions


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RetrievalAttention: {name} must be a positive int, got {value!r}")
    return value


class RetrievalAttention(RetrievalCache):
    """Window + retrieval memory for the self-attention of one session (one stream or a
    lockstep batch of ``batch`` streams) of an AR video backbone.

    num_layers, num_heads, head_dim, tokens_per_frame: the backbone's attention shapes
        (``head_dim`` even: rotations work on channel pairs).
    memory: window, sink, top_k, recency guard, frames per block, history budgets.
    positions: "wan3d" (needs ``grid=(h, w)``), "rope1d", "none", a
        :class:`PositionEncoding`, or prebuilt ``RopeTables``.
    descriptor: frames ``[n, C, ...] -> [n, dim]`` for the search; default: the spatial
        mean of ``latent_channels`` channels.
    dtype, device: of q/k/v and every buffer. attention_backend: "auto" | "sdpa" |
        "flash" | "xformers" or a callable ``(q, k, v) -> out`` on ``[B, L, H, D]``.
    kernels: "auto" | "triton" | "reference". page_table: "auto" | "cpp" | "python".
    pool / workspace: share an engine's page pool and context buffers (default: its own).
    refetch_per_forward: the per-forward baseline (re-reads retrieved K/V per layer).
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, tokens_per_frame: int,
                 memory: MemoryConfig | None = None, *, positions: str | PositionEncoding | RopeTables = "wan3d",
                 grid: tuple[int, int] | None = None, batch: int = 1, descriptor: Descriptor | None = None,
                 latent_channels: int | None = None, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu", attention_backend: str | AttendFn = "auto",
                 kernels: str = "auto", page_table: str = "auto", pool: PagePool | None = None,
                 workspace: Workspace | None = None, history: HistoryStore | None = None,
                 refetch_per_forward: bool = False) -> None:
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("head_dim", head_dim),
                            ("tokens_per_frame", tokens_per_frame), ("batch", batch)):
            _positive_int(name, value)
        if head_dim % 2:
            raise ValueError(f"RetrievalAttention: head_dim must be even (rotations work on channel pairs), "
                             f"got {head_dim}")
        if kernels not in KERNEL_MODES:
            raise ValueError(f"RetrievalAttention: kernels must be one of {KERNEL_MODES}, got {kernels!r}")
        memory = MemoryConfig() if memory is None else memory
        if not isinstance(memory, MemoryConfig):
            raise TypeError(f"RetrievalAttention: memory must be a MemoryConfig, got {type(memory).__name__}")
        dtype = resolve_dtype(dtype)
        device = torch.device(device)
        if descriptor is None:
            if latent_channels is None:
                raise ValueError("RetrievalAttention: give descriptor= (frames -> embeddings) or latent_channels= "
                                 "(the default descriptor is the spatial mean of the clean latents' channels)")
            descriptor = MeanDescriptor(_positive_int("latent_channels", latent_channels))
        dim = getattr(descriptor, "dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or not callable(descriptor):
            raise ValueError(f"RetrievalAttention: descriptor must be callable with a positive int .dim, got {dim!r}")
        if isinstance(positions, RopeTables):
            tables, source = positions, "positions"
        else:
            encoding = resolve_positions(positions, grid)
            tables, source = encoding.tables(memory.window, tokens_per_frame, head_dim, device), encoding
        tables = check_tables(tables, memory.window, tokens_per_frame, head_dim, source)
        if callable(attention_backend):
            attend = attention_backend
        else:
            _, attend = get_backend(attention_backend, device, dtype)
        super().__init__(memory, num_layers, batch, tokens_per_frame, num_heads, head_dim, descriptor, tables,
                         attend, dtype, device, kernels=kernels, history=history,
                         refetch_per_forward=refetch_per_forward, pool=pool, workspace=workspace,
                         page_table=page_table)

    def begin_block(self, frames: int | None = None) -> Callable[[], BlockLog]:
        """Start the next block of ``frames`` frames (default ``frames_per_block``; fewer
        only for a short block priming the cache from given frames): search the history (unless
        ``start_retrieval`` did), move frames leaving the window into it, splice the
        context. Returns the block's log as a callable (reading it may wait for the device)."""
        return super().begin_block(self.memory.frames_per_block if frames is None else frames)

    def __enter__(self) -> "RetrievalAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
