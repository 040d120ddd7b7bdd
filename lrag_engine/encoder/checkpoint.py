"""Public checkpoint format of the retrieval encoder: ``{"config": {...}, "model": state_dict}``.

Training checkpoints are a superset (extra top-level keys such as ``optimizer``,
``step``, ``scaler``), so any of them loads as an encoder too: the public
reference's ``ae_latent_mem.pt`` (its config also holds training fields, which
:meth:`EncoderConfig.from_dict` ignores) as well as this package's ``last.pt``.
Files are read with :func:`lrag_engine.safe_load.load_tensor_file` (no pickled code
runs); files of earlier versions of this package, which nested one ``nn.Sequential``
per stage, load through :func:`flatten_nested_keys`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..safe_load import load_tensor_file
from .model import EncoderConfig, RetrievalEncoder

# Earlier nested layout -> flat layout: entries per stage of each stack (SPEC section 5).
_NESTED_STACKS = {"encoder.conv_stack": 4, "decoder.upsample_stack": 5}
_NESTED_KEY = re.compile(r"^(?P<stack>encoder\.conv_stack|decoder\.upsample_stack)"
                         r"\.(?P<stage>\d+)\.(?P<entry>\d+)\.(?P<rest>.+)$")


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
    """Load (without running pickled code) and check the top-level layout; returns the raw dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"encoder checkpoint {str(path)!r} does not exist")
    payload = load_tensor_file(path, "encoder checkpoint", error=CheckpointError)
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


def flatten_nested_keys(state: dict, source: str = "state dict") -> dict:
    """Rename keys of the earlier nested layout to the flat public one (other keys unchanged):
    ``encoder.conv_stack.{s}.{j}.*`` -> ``encoder.conv_stack.{4s+j}.*`` and
    ``decoder.upsample_stack.{s}.{j}.*`` -> ``decoder.upsample_stack.{5s+j}.*``."""
    flat: dict = {}
    for key, value in state.items():
        match = _NESTED_KEY.match(str(key))
        per_stage = _NESTED_STACKS[match["stack"]] if match else 0
        if match is not None and int(match["entry"]) < per_stage:
            key = f"{match['stack']}.{per_stage * int(match['stage']) + int(match['entry'])}.{match['rest']}"
        if key in flat:
            raise CheckpointError(f"{source} holds {key!r} twice (in the nested and in the flat layout)")
        flat[key] = value
    return flat


def load_state_into(model: RetrievalEncoder, state: dict, source: str = "state dict") -> None:
    """Strictly copy ``state`` (flat or earlier nested layout) into ``model``; errors list
    missing/unexpected keys and shape mismatches."""
    state = flatten_nested_keys(_strip_wrapper_prefix(state), source)
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
    """Build a ``RetrievalEncoder`` from a public-format checkpoint, in eval mode.

    Top-level entries other than ``config`` and ``model`` (optimizer, scaler, epoch, ...)
    are ignored.
    """
    payload = read_checkpoint(path)
    try:
        config = EncoderConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"encoder checkpoint {str(path)!r} has a bad config: {exc}") from None
    model = RetrievalEncoder(config)
    load_state_into(model, payload["model"], source=f"encoder checkpoint {str(path)!r}")
    return model.to(device=device, dtype=dtype).eval()
