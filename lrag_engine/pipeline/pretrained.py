"""Finding the parts of a Wan 2.1 text-to-video model directory.

Two layouts are recognised:

- the original one (``Wan-AI/Wan2.1-T2V-1.3B``): ``config.json`` (Wan naming), the DiT
  weights (``diffusion_pytorch_model*.safetensors``), ``Wan2.1_VAE.pth``,
  ``models_t5_umt5-xxl-enc-bf16.pth`` and the ``google/umt5-xxl`` tokenizer folder;
- the diffusers one (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``): ``model_index.json`` with
  ``transformer/``, ``vae/``, ``text_encoder/`` and ``tokenizer/`` folders.

:func:`find_parts` returns where each part is, or raises one error listing what it
found and what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = ("google/umt5-xxl", "umt5-xxl", "tokenizer")


@dataclass(frozen=True)
class ModelParts:
    """Where the parts of a model directory are. layout: "original" or "diffusers"."""

    layout: str
    root: Path
    config: Path            # the DiT's config.json
    transformer: Path       # a weights file or folder the checkpoint loader takes
    vae: Path               # Wan2.1_VAE.pth, or the diffusers vae/ folder
    text_encoder: Path      # the T5 .pth, or the diffusers text_encoder/ folder
    tokenizer: Path         # a tokenizer folder


def _first(paths) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def find_parts(path: str | Path) -> ModelParts:
    """The parts of the model directory ``path`` (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory {str(root)!r} does not exist or is not a directory")
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    found = ", ".join(listing[:20]) + (" ..." if len(listing) > 20 else "") or "nothing"
    if (root / "model_index.json").exists() or (root / "transformer").is_dir():
        wanted = {"transformer/config.json": root / "transformer" / "config.json",
                  "transformer/ weights": _first(sorted((root / "transformer").glob("diffusion_pytorch_model*"))),
                  "vae/": root / "vae" if (root / "vae").is_dir() else None,
                  "text_encoder/": root / "text_encoder" if (root / "text_encoder").is_dir() else None,
                  "tokenizer/": root / "tokenizer" if (root / "tokenizer").is_dir() else None}
        layout = "diffusers"
    else:
        tokenizer = _first(root / name for name in ORIGINAL_TOKENIZER)
        wanted = {"config.json": root / "config.json",
                  "DiT weights (diffusion_pytorch_model*.safetensors)":
                      _first(sorted(root.glob("diffusion_pytorch_model*.safetensors"))),
                  ORIGINAL_VAE: root / ORIGINAL_VAE, ORIGINAL_T5: root / ORIGINAL_T5,
                  "tokenizer folder (google/umt5-xxl)": tokenizer}
        layout = "original"
    missing = [name for name, p in wanted.items() if p is None or not p.exists()]
    if missing:
        raise ValueError(f"model directory {str(root)!r} ({layout} layout) is missing: {', '.join(missing)}; "
                         f"found: {found}")
    parts = list(wanted.values())
    if layout == "diffusers":
        return ModelParts(layout, root, parts[0], root / "transformer", parts[2], parts[3], parts[4])
    index = root / "diffusion_pytorch_model.safetensors.index.json"
    return ModelParts(layout, root, parts[0], index if index.exists() else parts[1], parts[2], parts[3], parts[4])


# The Wan 2.1 VAE's width (AutoencoderKLWan's default base_dim).
_WAN21_VAE_BASE_DIM = 96


def original_vae_config(path: str | Path) -> dict[str, Any]:
    """AutoencoderKLWan arguments for an original-naming VAE file (``Wan2.1_VAE.pth``): {} for
    the Wan 2.1 width, else its ``base_dim`` read from the first encoder conv
    (``encoder.conv1.weight`` [base_dim, 3, 3, 3, 3]), so a narrower VAE in the same layout
    loads too. The file is memory-mapped; only that tensor's shape is read."""
    from ..safe_load import load_tensor_file, read_safetensors_shapes
    from .vae import VAECheckpointError

    if str(path).lower().endswith(".safetensors"):
        shapes = read_safetensors_shapes(path, what="Wan VAE checkpoint", error=VAECheckpointError)
    else:
        state = load_tensor_file(path, what="Wan VAE checkpoint", mmap=True, error=VAECheckpointError)
        shapes = {k: v.shape for k, v in state.items() if hasattr(v, "shape")} if isinstance(state, dict) else {}
    shape = shapes.get("encoder.conv1.weight")
    if shape is None or len(shape) != 5 or shape[0] == _WAN21_VAE_BASE_DIM:
        return {}   # the Wan 2.1 VAE, or a file from_original reports on itself
    return {"base_dim": int(shape[0])}
