"""Public checkpoint format of the retrieval encoder: ``{"config": {...}, "model": state_dict}``.

Training checkpoints are a superset (extra top-level keys such as ``optimizer``
and ``step``), so any of them loads as an encoder too.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import EncoderConfig, RetrievalEncoder


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: str | os.PathLike, model: RetrievalEncoder, **extra) -> None:
    """Write ``{"config", "model", **extra}`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": model.config.to_dict(),
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    payload.update(extra)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check the top-level layout; returns the raw dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"encoder checkpoint {str(path)!r} could not be read: {exc}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"encoder checkpoint {str(path)!r} must hold a dict with keys 'config' and "
                              f"'model', got {type(payload).__name__}")
    for key in ("config", "model"):
        if key not in payload:
            raise CheckpointError(f"encoder checkpoint {str(path)!r} has no {key!r} entry "
                                  f"(found keys {sorted(map(str, payload))})")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"encoder checkpoint {str(path)!r}: 'config' must be a dict, "
                              f"got {type(payload['config']).__name__}")
    if not isinstance(payload["model"], dict):
        raise CheckpointError(f"encoder checkpoint {str(path)!r}: 'model' must be a state dict, "
                              f"got {type(payload['model']).__name__}")
    return payload


def _strip_wrapper_prefix(state: dict) -> dict:
    # DataParallel / DDP / torch.compile wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if state and all(str(k).startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_into(model: RetrievalEncoder, state: dict, source: str = "state dict") -> None:
    """Strictly copy ``state`` into ``model``; errors list missing/unexpected keys and shape mismatches."""
    state = _strip_wrapper_prefix(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(state)):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != expected[key].shape:
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(value.shape)} vs model "
                            f"{tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError(f"{source} does not match the encoder config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> RetrievalEncoder:
    """Build a ``RetrievalEncoder`` from a public-format checkpoint, in eval mode."""
    payload = read_checkpoint(path)
    try:
        config = EncoderConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"encoder checkpoint {str(path)!r} has a bad config: {exc}") from None
    model = RetrievalEncoder(config)
    load_state_into(model, payload["model"], source=f"encoder checkpoint {str(path)!r}")
    return model.to(device=device, dtype=dtype).eval()
