"""Collect clean latents from the engine into a training corpus (``collect-latents``).

Prompts are processed in shards of ``videos_per_shard``; a shard already listed
in the corpus manifest is skipped, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..safe_load import load_tensor_file
from .corpus import CorpusWriter, LatentCorpus


def load_text_embeddings(path: str | os.PathLike) -> torch.Tensor:
    """Text embeddings ``[P, L, text_dim]`` from a ``.pt`` file or a directory of ``.pt`` files.

    Each file holds one tensor ``[L, text_dim]`` or ``[P_i, L, text_dim]``;
    directory entries are read in name order and zero-padded to the longest L
    (the engine zero-pads to ``text_len`` anyway). Files are read without running
    pickled code; unreadable or unsafe ones raise ``TensorFileError`` (a ValueError).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".pt")
        if not files:
            raise ValueError(f"text embedding directory {str(path)!r} holds no .pt files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"text embeddings {str(path)!r} do not exist")
    parts = []
    for file in files:
        value = load_tensor_file(file, "text embedding file")
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"text embeddings in {str(file)!r} must be a tensor [L, text_dim] or "
                             f"[P, L, text_dim], got {shape}")
        parts.append(value.float() if value.dim() == 3 else value.float()[None])
    dims = {p.shape[-1] for p in parts}
    if len(dims) != 1:
        raise ValueError(f"text embeddings under {str(path)!r} mix text_dim values {sorted(dims)}")
    longest = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0, 0, longest - p.shape[1])) for p in parts])


def default_text_embeddings(num_prompts: int, text_len: int, text_dim: int, seed: int) -> torch.Tensor:
    """Seeded random stand-in prompts ``[num_prompts, text_len, text_dim]`` (no text encoder needed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_prompts, text_len, text_dim, generator=gen)


def collect_latents(engine, texts: torch.Tensor, out_dir: str | os.PathLike, num_frames: int,
                    videos_per_shard: int = 2, seed: int = 0, meta: dict | None = None,
                    progress: bool = True) -> LatentCorpus:
    """Generate one video per prompt and store its clean latents.

    engine: anything with ``model_config`` (``text_dim``, ``out_channels``,
    ``height``, ``width``) and ``generate(num_frames=, text=[B, L, text_dim],
    seed=)`` returning ``.latents`` ``[B, T, C, H, W]``. Shard ``i`` uses seed
    ``seed + i``, so a resumed run writes the same shards as an uninterrupted one.
    """
    if texts.dim() != 3 or texts.shape[-1] != engine.model_config.text_dim:
        raise ValueError(f"texts must be [P, L, {engine.model_config.text_dim}] (the model's text_dim), "
                         f"got {tuple(texts.shape)}")
    if not isinstance(videos_per_shard, int) or videos_per_shard <= 0:
        raise ValueError(f"videos_per_shard must be a positive integer, got {videos_per_shard!r}")
    cfg = engine.model_config
    frame_shape = (cfg.out_channels, cfg.height, cfg.width)
    meta = {**(meta or {}), "num_prompts": int(texts.shape[0]), "videos_per_shard": videos_per_shard,
            "seed": seed}
    writer = CorpusWriter(out_dir, frame_shape, num_frames, meta)
    starts = list(range(0, texts.shape[0], videos_per_shard))
    todo = [i for i in range(len(starts)) if not writer.done(i)]
    bar = tqdm(total=len(starts), initial=len(starts) - len(todo), disable=not progress,
               desc="collect-latents", unit="shard")
    for index in todo:
        batch = texts[starts[index]:starts[index] + videos_per_shard]
        result = engine.generate(num_frames=num_frames, text=batch, seed=seed + index)
        writer.write_shard(index, result.latents.float())
        bar.update(1)
    bar.close()
    return LatentCorpus(out_dir)
