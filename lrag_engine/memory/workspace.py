"""What sessions share on an engine: the Workspace (context K/V, block RoPE, text K/V and
recache staging of one batch size), rows of it for batched forwards (WorkspaceRows),
and the history page pool sized by the memory budgets (make_page_pool)."""
from __future__ import annotations

import torch

from ..attention.context import ContextBuffer, block_rope
from ..config import MemoryConfig
from ..ops.rope import RopeTables
from .budget import HistoryBudget
from .history import PagePool


class Workspace:
    """What the forwards of one block read and write, shared by every session of one
    batch size on an engine: the context K/V ``[sink | retrieved | local | block]``, the
    block RoPE tables by position, and for static (graph) forwards the text K/V and a
    staging area for the recache pass's un-rotated block K/V.

    Each block rewrites the whole context before its first forward (the splice), so
    sessions can take turns block by block; ``owner`` tells whose text K/V is loaded.
    """

    def __init__(self, num_layers: int, batch: int, window: int, tokens_per_frame: int, num_heads: int,
                 head_dim: int, frames_per_block: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.batch = batch
        self.device = torch.device(device)
        self.context = ContextBuffer(num_layers, batch, window, tokens_per_frame, num_heads=num_heads,
                                     head_dim=head_dim, dtype=dtype, device=device)
        self._stage_shape = (num_layers, batch, frames_per_block * tokens_per_frame, num_heads, head_dim)
        self.stage_k: torch.Tensor | None = None
        self.stage_v: torch.Tensor | None = None
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.owner: object | None = None
        self._rope: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, tables: RopeTables, positions: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [F*N, D/2] of a block at ``positions`` (built once per positions)."""
        if positions not in self._rope:
            self._rope[positions] = block_rope(tables, list(positions), self.device)
        return self._rope[positions]

    def load_text(self, owner: object, cross_kv) -> None:
        """Static forwards read the text K/V from here: copy ``owner``'s in unless it is
        already loaded."""
        if self.cross_kv is None:
            self.cross_kv = [(k.clone(), v.clone()) for k, v in cross_kv]
            self.stage_k = torch.empty(self._stage_shape, dtype=self.context.k.dtype, device=self.device)
            self.stage_v = torch.empty_like(self.stage_k)
        elif self.owner is not owner:
            for (dk, dv), (k, v) in zip(self.cross_kv, cross_kv):
                dk.copy_(k)
                dv.copy_(v)
        self.owner = owner

    def forget_text(self, owner: object) -> None:
        """``owner``'s text changed: the next :meth:`load_text` copies it in again."""
        if self.owner is owner:
            self.owner = None

    def _ensure_text(self, like) -> None:
        if self.cross_kv is None:
            self.cross_kv = [(torch.empty((self.batch, *k.shape[1:]), dtype=k.dtype, device=self.device),
                              torch.empty((self.batch, *v.shape[1:]), dtype=v.dtype, device=self.device))
                             for k, v in like]
            self.stage_k = torch.empty(self._stage_shape, dtype=self.context.k.dtype, device=self.device)
            self.stage_v = torch.empty_like(self.stage_k)

    def load_rows(self, key: tuple, parts: list) -> None:
        """Batched forwards: the text K/V of several sessions, ``parts`` (one cross_kv per
        session, in row order) into the first rows, unless ``key`` (who, with which
        text) is already loaded."""
        self._ensure_text(parts[0])
        if self.owner == key:
            return
        row = 0
        for cross_kv in parts:
            b = cross_kv[0][0].shape[0]
            for (dk, dv), (k, v) in zip(self.cross_kv, cross_kv):
                dk[row:row + b].copy_(k)
                dv[row:row + b].copy_(v)
            row += b
        self.owner = key

    def rows(self, start: int, stop: int) -> "WorkspaceRows":
        """Rows ``start:stop`` of this workspace, for one session of a batched forward."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"Workspace.rows: {start}:{stop} is not within its {self.batch} rows")
        return WorkspaceRows(self, start, stop)


class WorkspaceRows:
    """Rows of a :class:`Workspace`: what one session of a batched forward splices into
    and drains (context rows, staging rows); text and RoPE tables are the parent's."""

    def __init__(self, parent: Workspace, start: int, stop: int) -> None:
        self.parent, self.start, self.stop = parent, start, stop
        self.batch = stop - start
        self.device = parent.device
        self.context = parent.context.rows(start, stop)
        self.owner = None

    @property
    def stage_k(self) -> torch.Tensor | None:
        stage = self.parent.stage_k
        return None if stage is None else stage[:, self.start:self.stop]

    @property
    def stage_v(self) -> torch.Tensor | None:
        stage = self.parent.stage_v
        return None if stage is None else stage[:, self.start:self.stop]

    def rope(self, tables: RopeTables, positions: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parent.rope(tables, positions)

    def forget_text(self, owner: object) -> None:
        pass   # batched forwards key the loaded text by (session, text version)


def make_page_pool(memory: MemoryConfig, num_layers: int, batch: int, tokens_per_frame: int, num_heads: int,
                   head_dim: int, dtype: torch.dtype, device: torch.device | str, host_only: bool = False,
                   table: str = "auto") -> PagePool:
    """A page pool sized by ``memory``'s budgets (see :class:`HistoryBudget`)."""
    if host_only and memory.history_dtype is not None:
        raise ValueError(f"MemoryConfig.history_dtype={memory.history_dtype!r} is not available with the "
                         "per-forward refetch baseline (it copies raw pages); use history_dtype=None")
    budget = HistoryBudget.plan(memory, num_layers, batch, tokens_per_frame, num_heads, head_dim, dtype,
                                host_only=host_only)
    gpu_pages, host_pages = budget.pool_pages()
    return PagePool(num_layers, tokens_per_frame, num_heads, head_dim, dtype, device, gpu_pages=gpu_pages,
                    host_pages=host_pages, chunk_pages=budget.chunk_pages, table=table,
                    history_dtype=memory.history_dtype)
