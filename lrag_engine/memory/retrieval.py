"""Descriptors, eligibility, the top-K search and the per-block retrieval log (SPEC section 4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..ops.search_topk import search_topk


class Descriptor(Protocol):
    """Batched frames -> embeddings: ``[N, C, H, W] -> [N, dim]`` (float32)."""

    dim: int

    def __call__(self, frames: torch.Tensor) -> torch.Tensor: ...


class MeanDescriptor:
    """Spatial mean of the latent frame: ``[N, C, H, W] -> [N, C]`` (not normalised:
    cosine similarity is scale-free)."""

    def __init__(self, channels: int) -> None:
        self.dim = channels

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 4 or frames.shape[1] != self.dim:
            raise ValueError(f"frames must be [N, C, H, W] with {self.dim} channels, got {tuple(frames.shape)}")
        return frames.float().mean(dim=(-2, -1))


@dataclass
class BlockLog:
    """What retrieval did for one block.

    selected[b] / similarities[b]: global frame ids retrieved for stream b, best first,
    and their cosine similarities to the query.
    eligible: history frames (per stream) the search could pick: those kept, less the
        recency guard.
    kept: history frames (per stream) whose K/V were held when the search ran (None:
        not known to the caller).
    history_frames: frames that had entered the history by then, dropped ones included
        (None: not known); ``history_frames - kept`` were dropped by the cap or the budgets.
    """

    block: int
    frames: tuple[int, int]
    query_frame: int | None
    eligible: int
    selected: list[list[int]] = field(default_factory=list)
    similarities: list[list[float]] = field(default_factory=list)
    kept: int | None = None
    history_frames: int | None = None

    def to_dict(self) -> dict:
        return {"block": self.block, "frames": list(self.frames), "query_frame": self.query_frame,
                "eligible": self.eligible, "kept": self.kept, "history_frames": self.history_frames,
                "selected": self.selected, "similarities": self.similarities}


@dataclass
class RetrievalResult:
    """Device-side result of one search; ``index`` [B, r] are positions among the held
    history frames; ``ids`` [B, r] (when known) their ordinals in the history (stable
    across drops); ``kept``: the history frames held per stream."""

    index: torch.Tensor
    scores: torch.Tensor
    eligible: int
    pages: torch.Tensor | None = None   # [L, B, r] history page ids, resident on the device
    kept: int | None = None
    ids: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.index.shape[1]


def retrieve(query: torch.Tensor, keys: torch.Tensor, key_norms: torch.Tensor, top_k: int,
             recency_guard: int, mode: str = "auto") -> RetrievalResult:
    """Top ``min(top_k, eligible)`` history frames by cosine similarity to ``query``.

    query [B, Dd]; keys [B, n, Dd] (history, eviction order); the ``recency_guard``
    most recently evicted frames are not eligible. Ties go to the lower index.
    """
    eligible = max(0, keys.shape[1] - recency_guard)
    count = min(top_k, eligible)
    if count == 0:
        empty = torch.empty(query.shape[0], 0, device=query.device)
        return RetrievalResult(empty.long(), empty.float(), eligible)
    scores, index = search_topk(query, keys, count, eligible, key_norms=key_norms, mode=mode)
    return RetrievalResult(index, scores, eligible)


def make_log(block: int, frames: tuple[int, int], query_frame: int | None, result: RetrievalResult,
             frame_offset: int, history_frames: int | None = None) -> Callable[[], BlockLog]:
    """A deferred log: the device tensors are copied to pinned host memory without a sync,
    and read only when the returned callable is called.

    The global id of a retrieved frame is ``frame_offset`` plus its history ordinal
    (``result.ids``) or, without ordinals, plus its position (``result.index``: a history
    that never dropped a frame)."""
    index = result.index if result.ids is None else result.ids
    scores = result.scores
    if index.is_cuda:
        index = index.to("cpu", non_blocking=True)
        scores = scores.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        ready = None

    def materialize() -> BlockLog:
        if ready is not None:
            ready.synchronize()
        return BlockLog(block, frames, query_frame, result.eligible,
                        [[int(i) + frame_offset for i in row] for row in index.tolist()],
                        [[float(s) for s in row] for row in scores.tolist()],
                        kept=result.kept, history_frames=history_frames)

    return materialize
