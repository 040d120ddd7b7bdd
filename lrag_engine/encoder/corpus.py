"""Corpus of clean latent videos for encoder training and retrieval evaluation.

On disk a corpus is a directory::

    manifest.json            {"format": "lrag-latent-corpus", "version": 1,
                              "frame_shape": [C, H, W], "num_frames": T,
                              "meta": {...}, "shards": [{"index": i, "file": ..., "videos": n}, ...]}
    shard_00000.safetensors  "latents": float32 [n, T, C, H, W]
                             "scene_ids": int64 [n, T] (optional ground truth)

Shards are written first and the manifest second, each atomically, so an
interrupted writer leaves a corpus that lists only complete shards.

The synthetic generator builds videos that visit a few scenes and come back to
each after a long gap; frames are the scene's prototype, panned a little within
a visit, plus a slow drift that accumulates over the video, a per-frame
per-channel flicker and white noise. ``scene_ids`` are the ground truth.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..safe_load import load_tensor_file

FORMAT = "lrag-latent-corpus"
VERSION = 1
MANIFEST = "manifest.json"


class CorpusError(ValueError):
    """A corpus directory or shard that cannot be used; the message names the path."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CorpusWriter:
    """Appends shards to a corpus directory, creating it or resuming it.

    frame_shape: ``(C, H, W)``; num_frames: T per video; meta: free-form JSON
    describing how the corpus was made. Resuming checks that all three match.
    """

    def __init__(self, root: str | os.PathLike, frame_shape: tuple[int, int, int], num_frames: int,
                 meta: dict | None = None) -> None:
        self.root = Path(root)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.num_frames = int(num_frames)
        self.meta = dict(meta or {})
        manifest_path = self.root / MANIFEST
        if manifest_path.exists():
            manifest = read_manifest(self.root)
            if (tuple(manifest["frame_shape"]) != self.frame_shape or manifest["num_frames"] != self.num_frames
                    or manifest.get("meta", {}) != json.loads(json.dumps(self.meta))):
                raise CorpusError(
                    f"corpus {str(self.root)!r} was written with frame_shape={manifest['frame_shape']}, "
                    f"num_frames={manifest['num_frames']}, meta={manifest.get('meta')}; this run has "
                    f"frame_shape={list(self.frame_shape)}, num_frames={self.num_frames}, meta={self.meta}. "
                    "Use another output directory or the same settings to resume.")
            self.manifest = manifest
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "version": VERSION, "frame_shape": list(self.frame_shape),
                             "num_frames": self.num_frames, "meta": self.meta, "shards": []}
            _atomic_write_text(manifest_path, json.dumps(self.manifest, indent=2))

    def done(self, index: int) -> bool:
        return any(shard["index"] == index for shard in self.manifest["shards"])

    def write_shard(self, index: int, latents: torch.Tensor, scene_ids: torch.Tensor | None = None) -> Path:
        """Write shard ``index``: latents ``[n, T, C, H, W]``, optional scene_ids ``[n, T]``."""
        expected = (self.num_frames, *self.frame_shape)
        if latents.dim() != 5 or tuple(latents.shape[1:]) != expected:
            raise CorpusError(f"shard latents must be [n, {', '.join(map(str, expected))}], "
                              f"got {tuple(latents.shape)}")
        tensors = {"latents": latents.detach().to("cpu", torch.float32).contiguous()}
        if scene_ids is not None:
            if tuple(scene_ids.shape) != tuple(latents.shape[:2]):
                raise CorpusError(f"scene_ids must be [n, T] = {tuple(latents.shape[:2])}, "
                                  f"got {tuple(scene_ids.shape)}")
            tensors["scene_ids"] = scene_ids.detach().to("cpu", torch.int64).contiguous()
        name = f"shard_{index:05d}.safetensors"
        path = self.root / name
        tmp = path.with_name(name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        self.manifest["shards"] = [s for s in self.manifest["shards"] if s["index"] != index]
        self.manifest["shards"].append({"index": index, "file": name, "videos": int(latents.shape[0])})
        self.manifest["shards"].sort(key=lambda s: s["index"])
        _atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=2))
        return path


def read_manifest(root: str | os.PathLike) -> dict:
    """Read and validate ``root/manifest.json``."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus directory {str(root)!r} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise CorpusError(f"corpus {str(root)!r} has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorpusError(f"corpus manifest {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorpusError(f"corpus manifest {str(path)!r} must have format {FORMAT!r}, got {found!r}")
    if manifest.get("version") != VERSION:
        raise CorpusError(f"corpus manifest {str(path)!r} has version {manifest.get('version')!r}; "
                          f"this reader supports version {VERSION}")
    for key, kind in (("frame_shape", list), ("num_frames", int), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise CorpusError(f"corpus manifest {str(path)!r}: {key!r} must be a {kind.__name__}, "
                              f"got {manifest.get(key)!r}")
    if len(manifest["frame_shape"]) != 3:
        raise CorpusError(f"corpus manifest {str(path)!r}: frame_shape must be [C, H, W], "
                          f"got {manifest['frame_shape']}")
    return manifest


class LatentCorpus:
    """Reads a corpus directory: ``latents`` ``[V, T, C, H, W]`` and ``scene_ids`` ``[V, T]`` or None."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest["shards"]:
            raise CorpusError(f"corpus {str(self.root)!r} lists no shards")
        self.frame_shape = tuple(self.manifest["frame_shape"])
        self.num_frames = self.manifest["num_frames"]
        latents, labels = [], []
        for shard in self.manifest["shards"]:
            tensors = self._read_shard(shard)
            latents.append(tensors["latents"])
            labels.append(tensors.get("scene_ids"))
        self.latents = torch.cat(latents)
        has_labels = [lab is not None for lab in labels]
        if any(has_labels) and not all(has_labels):
            raise CorpusError(f"corpus {str(self.root)!r}: some shards carry scene_ids and others do not")
        self.scene_ids = torch.cat(labels) if all(has_labels) else None

    def _read_shard(self, shard: dict) -> dict[str, torch.Tensor]:
        path = self.root / str(shard.get("file", ""))
        if path.suffix != ".safetensors":
            raise CorpusError(f"corpus shard {str(path)!r} listed in the manifest is not a .safetensors file")
        if not path.exists():
            raise CorpusError(f"corpus shard {str(path)!r} listed in the manifest is missing")
        tensors = load_tensor_file(path, "corpus shard", error=CorpusError)
        if "latents" not in tensors:
            raise CorpusError(f"corpus shard {str(path)!r} has no 'latents' tensor (found {sorted(tensors)})")
        latents = tensors["latents"]
        expected = (self.num_frames, *self.frame_shape)
        if latents.dim() != 5 or tuple(latents.shape[1:]) != expected or latents.shape[0] != shard.get("videos"):
            raise CorpusError(f"corpus shard {str(path)!r}: latents are {tuple(latents.shape)}, the manifest "
                              f"says [{shard.get('videos')}, {', '.join(map(str, expected))}]")
        scene_ids = tensors.get("scene_ids")
        if scene_ids is not None and tuple(scene_ids.shape) != tuple(latents.shape[:2]):
            raise CorpusError(f"corpus shard {str(path)!r}: scene_ids are {tuple(scene_ids.shape)}, "
                              f"expected {tuple(latents.shape[:2])}")
        return {"latents": latents.float(), **({"scene_ids": scene_ids} if scene_ids is not None else {})}

    @property
    def num_videos(self) -> int:
        return self.latents.shape[0]


@dataclass
class SyntheticCorpusConfig:
    """Videos that revisit scenes after long gaps (see module docstring).

    Each video has its own ``num_scenes`` scenes, visited in segments of
    ``segment_len`` frames; a scene never follows itself, so it comes back after
    at least one other segment. Amplitudes are relative to the prototypes'
    spatial pattern, which has zero mean and unit variance per channel;
    ``mean_contrast`` is the spread of the scenes' per-channel means, the only
    thing a spatial-mean descriptor can tell scenes apart by.
    """

    num_videos: int = 8
    frames_per_video: int = 96
    num_scenes: int = 4
    segment_len: int = 8
    channels: int = 16
    height: int = 16
    width: int = 24
    noise: float = 0.3
    drift: float = 0.03
    flicker: float = 0.2
    mean_contrast: float = 0.2
    pan_every: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_videos", "frames_per_video", "segment_len", "channels", "height", "width", "pan_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SyntheticCorpusConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_scenes, int) or self.num_scenes < 2:
            raise ValueError(f"SyntheticCorpusConfig.num_scenes must be an integer >= 2, got {self.num_scenes!r}")
        for name in ("noise", "drift", "flicker", "mean_contrast"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SyntheticCorpusConfig.{name} must be >= 0, got {getattr(self, name)}")


def _smooth_field(gen: torch.Generator, n: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Random fields with structure at about a quarter of the frame, zero mean and unit
    variance per field and channel: ``[n, C, H, W]``."""
    low = torch.randn(n, channels, max(2, height // 4), max(2, width // 4), generator=gen)
    field = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    field = field - field.mean(dim=(2, 3), keepdim=True)
    return field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def generate_synthetic_corpus(config: SyntheticCorpusConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``latents`` float32 ``[V, T, C, H, W]`` and ``scene_ids`` int64 ``[V, T]``.

    Scene ids are unique across videos (video v owns ids ``v*num_scenes ..``).
    """
    c = config
    gen = torch.Generator().manual_seed(c.seed)
    latents = torch.empty(c.num_videos, c.frames_per_video, c.channels, c.height, c.width)
    scene_ids = torch.empty(c.num_videos, c.frames_per_video, dtype=torch.int64)
    for v in range(c.num_videos):
        offsets = c.mean_contrast * torch.randn(c.num_scenes, c.channels, 1, 1, generator=gen)
        prototypes = _smooth_field(gen, c.num_scenes, c.channels, c.height, c.width) + offsets
        drift = torch.zeros(c.channels, c.height, c.width)
        scene, start_shift, direction = -1, 0, 1
        for t in range(c.frames_per_video):
            pos = t % c.segment_len
            if pos == 0:
                choices = [s for s in range(c.num_scenes) if s != scene]
                scene = choices[int(torch.randint(len(choices), (1,), generator=gen))]
                start_shift = int(torch.randint(-2, 3, (1,), generator=gen))
                direction = 1 if float(torch.rand(1, generator=gen)) < 0.5 else -1
            drift += c.drift * _smooth_field(gen, 1, c.channels, c.height, c.width)[0]
            shift = start_shift + direction * (pos // c.pan_every)
            frame = torch.roll(prototypes[scene], shifts=shift, dims=-1)
            flicker = c.flicker * torch.randn(c.channels, 1, 1, generator=gen)
            noise = c.noise * torch.randn(c.channels, c.height, c.width, generator=gen)
            latents[v, t] = frame + drift + flicker + noise
            scene_ids[v, t] = v * c.num_scenes + scene
    return latents, scene_ids


def write_synthetic_corpus(root: str | os.PathLike, config: SyntheticCorpusConfig,
                           videos_per_shard: int = 4) -> LatentCorpus:
    """Generate the synthetic corpus and write it (with scene_ids) to ``root``."""
    latents, scene_ids = generate_synthetic_corpus(config)
    meta = {"source": "synthetic", **{k: v for k, v in vars(config).items()}}
    writer = CorpusWriter(root, tuple(latents.shape[2:]), latents.shape[1], meta)
    for index, start in enumerate(range(0, latents.shape[0], videos_per_shard)):
        if not writer.done(index):
            writer.write_shard(index, latents[start:start + videos_per_shard],
                               scene_ids[start:start + videos_per_shard])
    return LatentCorpus(root)
