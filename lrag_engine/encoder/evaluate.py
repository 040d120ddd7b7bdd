"""Retrieval quality of frame descriptors on a corpus with known scene labels.

For a query frame ``t`` of a video, the candidates are that video's frames
``t' < t - recency`` (the recency guard of SPEC section 4), ranked by cosine
similarity of descriptors (ties: lower index first). A retrieved frame is right
when it shows the query's scene. precision@K = (right frames in the top K) / K,
averaged over the queries that have at least ``max(ks)`` candidates and at least
one right candidate.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import torch

from .corpus import SyntheticCorpusConfig, generate_synthetic_corpus
from ..memory.retrieval import MeanDescriptor
from .descriptor import EncoderDescriptor
from .model import EncoderConfig
from .train import TrainConfig, train_encoder

Descriptor = Callable[[torch.Tensor], torch.Tensor]


def precision_at_k(descriptors: torch.Tensor, scene_ids: torch.Tensor, ks: tuple[int, ...],
                   recency: int) -> tuple[dict[int, float], int]:
    """Precision@K of one video. descriptors ``[T, D]`` (L2-normalised), scene_ids ``[T]``.

    Returns ({K: summed precision over queries}, number of queries); sums let the
    caller average over several videos.
    """
    if descriptors.dim() != 2 or scene_ids.shape != descriptors.shape[:1]:
        raise ValueError(f"descriptors must be [T, D] and scene_ids [T], got {tuple(descriptors.shape)} "
                         f"and {tuple(scene_ids.shape)}")
    if not ks or min(ks) <= 0:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if recency < 0:
        raise ValueError(f"recency must be >= 0, got {recency}")
    sims = descriptors.double() @ descriptors.double().T
    k_max = max(ks)
    sums = {k: 0.0 for k in ks}
    queries = 0
    for t in range(descriptors.shape[0]):
        n_cand = max(0, t - recency)
        if n_cand < k_max:
            continue
        right = scene_ids[:n_cand] == scene_ids[t]
        if not bool(right.any()):
            continue
        order = torch.sort(-sims[t, :n_cand], stable=True).indices
        for k in ks:
            sums[k] += int(right[order[:k]].sum()) / k
        queries += 1
    return sums, queries


def evaluate_descriptors(latents: torch.Tensor, scene_ids: torch.Tensor, descriptors: dict[str, Descriptor],
                         ks: tuple[int, ...] = (1, 3, 6), recency: int = 8) -> dict[str, dict]:
    """latents ``[V, T, C, H, W]``, scene_ids ``[V, T]`` -> {name: {"p@K": value, "queries": n}}."""
    results = {}
    for name, describe in descriptors.items():
        totals = {k: 0.0 for k in ks}
        queries = 0
        for v in range(latents.shape[0]):
            sums, n = precision_at_k(describe(latents[v]), scene_ids[v], ks, recency)
            for k in ks:
                totals[k] += sums[k]
            queries += n
        if queries == 0:
            raise ValueError(f"no query frame has {max(ks)} candidates older than the recency window "
                             f"({recency}) and a same-scene candidate; use longer videos")
        results[name] = {**{f"p@{k}": totals[k] / queries for k in ks}, "queries": queries}
    return results


def format_table(results: dict[str, dict], ks: tuple[int, ...]) -> str:
    header = f"{'descriptor':<28}" + "".join(f"{f'p@{k}':>8}" for k in ks) + f"{'queries':>9}"
    rows = [header, "-" * len(header)]
    for name, row in results.items():
        rows.append(f"{name:<28}" + "".join(f"{row[f'p@{k}']:>8.3f}" for k in ks) + f"{row['queries']:>9}")
    return "\n".join(rows)


# (report name, run folder under out_dir, delta loss on?) of the two trained encoders.
ENCODER_RUNS = (("encoder, no delta loss", "encoder_no_delta", False),
                ("encoder, with delta loss", "encoder_with_delta", True))


def _check_run_dirs_free(out_dir: Path, runs: list[tuple[str, str]]) -> None:
    """Refuse, before any training, run folders that already hold a training run."""
    for folder, option in runs:
        if (out_dir / folder / "last.pt").exists():
            raise ValueError(f"{str(out_dir / folder)!r} already holds a training run: reuse its encoder "
                             f"{str(out_dir / folder / 'encoder.pt')!r} as {option} (--{option.replace('_', '-')}), "
                             "delete that folder, or choose another output directory")


def run_retrieval_eval(out_dir: str | os.PathLike, corpus_config: SyntheticCorpusConfig,
                       encoder_config: EncoderConfig, train_config: TrainConfig,
                       with_delta_ckpt: str | None = None, without_delta_ckpt: str | None = None,
                       ks: tuple[int, ...] = (1, 3, 6), recency: int | None = None,
                       progress: bool = True) -> dict:
    """Compare spatial mean, encoder without delta loss and encoder with it on a synthetic corpus.

    Encoders are trained on a corpus drawn with ``corpus_config.seed`` and
    evaluated on a fresh one (seed + 1, so new scenes) unless checkpoints are
    given. ``recency`` defaults to the segment length, so the current visit
    of a scene is excluded and only earlier visits count as right answers.

    Writes ``out_dir/retrieval_eval.json`` and returns its content; an encoder that
    is trained here goes to ``out_dir/encoder_no_delta/`` (delta_weight 0) or
    ``out_dir/encoder_with_delta/`` (``encoder_config.delta_weight``), each with
    ``encoder.pt``, ``last.pt``, ``history.json`` and ``loss_curves.png``. A run folder
    that already holds a ``last.pt`` is an error (raised before anything is trained):
    pass its ``encoder.pt`` as ``with_delta_ckpt``/``without_delta_ckpt`` to reuse it.
    """
    out_dir = Path(out_dir)
    recency = corpus_config.segment_len if recency is None else recency
    frame_shape = (corpus_config.channels, corpus_config.height, corpus_config.width)
    encoder_shape = (encoder_config.in_channels, encoder_config.spatial_h, encoder_config.spatial_w)
    if encoder_shape != frame_shape:
        raise ValueError(f"encoder config frames {encoder_shape} != synthetic corpus frames {frame_shape}")
    given = {False: without_delta_ckpt, True: with_delta_ckpt}
    _check_run_dirs_free(out_dir, [(folder, "with_delta_ckpt" if delta else "without_delta_ckpt")
                                   for _, folder, delta in ENCODER_RUNS if given[delta] is None])
    out_dir.mkdir(parents=True, exist_ok=True)
    test_config = dataclasses.replace(corpus_config, seed=corpus_config.seed + 1)
    test_latents, test_ids = generate_synthetic_corpus(test_config)

    encoders: dict[str, str] = {}
    needs_training = with_delta_ckpt is None or without_delta_ckpt is None
    train_latents = generate_synthetic_corpus(corpus_config)[0] if needs_training else None
    for name, folder, delta in ENCODER_RUNS:
        ckpt = given[delta]
        if ckpt is None:
            config = dataclasses.replace(encoder_config, delta_weight=encoder_config.delta_weight if delta else 0.0)
            train_encoder(config, train_config, train_latents, out_dir / folder, progress=progress, run_name=name)
            ckpt = str(out_dir / folder / "encoder.pt")
        encoders[name] = ckpt

    descriptors: dict[str, Descriptor] = {"spatial mean": MeanDescriptor(corpus_config.channels)}
    for name, ckpt in encoders.items():
        descriptors[name] = EncoderDescriptor.from_checkpoint(ckpt, device=train_config.device)
    results = evaluate_descriptors(test_latents, test_ids, descriptors, ks=ks, recency=recency)
    report = {"results": results, "ks": list(ks), "recency": recency, "checkpoints": encoders,
              "train_corpus": dataclasses.asdict(corpus_config), "test_corpus": dataclasses.asdict(test_config),
              "encoder_config": encoder_config.to_dict(), "train_config": dataclasses.asdict(train_config)}
    (out_dir / "retrieval_eval.json").write_text(json.dumps(report, indent=2))
    return report
