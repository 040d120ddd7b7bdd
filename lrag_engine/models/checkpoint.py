"""Reading, writing and LoRA-merging Wan 2.1 checkpoints (SPEC section 2).

Accepted layouts: the Wan state dict under a top-level ``generator_ema``, ``generator``
or ``model`` entry, or bare; keys may carry a ``model.`` / ``module.`` prefix and
FSDP / checkpoint / compile wrapper segments. Safetensors files are flat, so a layout
entry is stored there as a key prefix (``generator.blocks.0...``); a bare dict whose
every key starts with ``model.`` therefore reads as the ``model`` entry (same weights).

Selection rule when several entries exist: ``generator_ema``, else ``generator``, else
``model``, else the bare dict; ``key=`` overrides it.

Files are read by :func:`lrag_engine.safe_load.load_tensor_file`: no pickled code runs, and
an unreadable or unsafe file raises a ValueError naming it. :func:`check_checkpoint_shapes`
compares a checkpoint's shapes (header only) with a ``ModelConfig`` before any model is built.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import MODEL_PRESETS, ModelConfig
from ..safe_load import load_tensor_file, read_safetensors_shapes
from .wan import WanModel

LAYOUTS = ("generator_ema", "generator", "model")
SAVE_LAYOUTS = (*LAYOUTS, "bare")
LORA_KEY = "generator_lora"
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_LEADING_PREFIXES = ("model.", "module.")
_LORA_PREFIXES = ("model.", "module.", "base_model.model.")
# peft names the adapter between lora_A/B and weight (".default.") unless it was stripped.
_LORA_PATTERN = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_LIST_LIMIT = 10


class CheckpointKeyError(KeyError):
    """Missing or unexpected checkpoint keys; the message lists them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _short_list(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else ""
    return f"{len(names)} [{shown}{more}]"


# ------------------------------------------------------------------ reading
def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The mapping stored in a ``.pt``/``.pth`` (``torch.load``, weights only, memory-mapped, on the
    CPU) or ``.safetensors`` file, as stored (it may nest state dicts under layout keys).

    Unreadable or unsafe files raise :class:`~lrag_engine.safe_load.TensorFileError` (a ValueError).
    """
    path = _checked_extension(path, what)
    # mmap keeps a 5.7 GB float32 checkpoint out of RAM until its tensors are copied.
    raw = load_tensor_file(path, what, mmap=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what} {path!r} holds a {type(raw).__name__}, not a dict of tensors")
    return dict(raw)


def _checked_extension(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"{what} {path!r}: unknown extension {ext!r}; use .pt, .pth or .safetensors")
    return path


def _select(raw: Mapping, key: str | None) -> tuple[str, dict]:
    """(entry name, state) by the module's selection rule; flat ``entry.``-prefixed keys count."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"checkpoint content must be a dict, got {type(raw).__name__}")
    if key == "bare":
        return "bare", dict(raw)
    for name in (key,) if key is not None else LAYOUTS:
        value = raw.get(name)
        if isinstance(value, Mapping):
            return name, dict(value)
        flat = {k[len(name) + 1:]: v for k, v in raw.items() if k.startswith(name + ".")}
        if flat:
            return name, flat
    top = sorted(raw)[:_LIST_LIMIT]
    if key is not None:
        raise CheckpointKeyError(f"checkpoint has no entry {key!r}; top-level keys: {top}")
    if raw and all(isinstance(v, Tensor) for v in raw.values()):
        return "bare", dict(raw)
    raise ValueError(f"checkpoint has none of the entries {LAYOUTS} and is not a bare dict of tensors; "
                     f"top-level keys: {top}")


def _strip_leading(k: str, prefixes: tuple[str, ...]) -> str:
    while True:
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        if prefix is None:
            return k
        k = k[len(prefix):]


def _clean_keys(state: Mapping, what: str, prefixes: tuple[str, ...], every_key: bool) -> dict:
    """Drop wrapper segments anywhere in a key, then leading ``prefixes``: only while one is on
    every key when ``every_key`` (a Wan key never starts with one), else key by key."""
    originals, keys = [], []
    for original, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{what}: entry {original!r} is a {type(value).__name__}, not a tensor")
        k = original
        for segment in _WRAPPER_SEGMENTS:
            k = k.replace(segment, "")
        originals.append(original)
        keys.append(k)
    if every_key:
        prefix = next((p for p in prefixes if keys and all(k.startswith(p) for k in keys)), None)
        while prefix is not None:
            keys = [k[len(prefix):] for k in keys]
            prefix = next((p for p in prefixes if keys and all(k.startswith(p) for k in keys)), None)
    else:
        keys = [_strip_leading(k, prefixes) for k in keys]
    cleaned: dict[str, Tensor] = {}
    for original, k in zip(originals, keys):
        if k in cleaned:
            raise ValueError(f"{what}: two entries map to the key {k!r} after removing prefixes")
        cleaned[k] = state[original]
    return cleaned


def extract_wan_state(raw: Mapping, key: str | None = None) -> dict[str, Tensor]:
    """The Wan state dict (plain Wan key names) inside a checkpoint's content.

    ``key``: the entry to use ("generator", "generator_ema", "model", "bare" or any top-level
    name); default: ``generator_ema`` if present, else ``generator``, else ``model``, else bare.
    """
    return _extract(raw, key)[1]


def _extract(raw: Mapping, key: str | None) -> tuple[str, dict[str, Tensor]]:
    name, state = _select(raw, key)
    return name, _clean_keys(state, f"checkpoint entry {name!r}", _LEADING_PREFIXES, every_key=True)


# --------------------------------------------------------------------- LoRA
def _lora_pairs(lora_state: Mapping) -> dict[str, dict[str, Tensor]]:
    """Module path -> {"A": lora_A weight [r, in], "B": lora_B weight [out, r]}."""
    if isinstance(lora_state.get(LORA_KEY), Mapping):
        lora_state = lora_state[LORA_KEY]
    elif any(k.startswith(LORA_KEY + ".") for k in lora_state):
        lora_state = {k[len(LORA_KEY) + 1:]: v for k, v in lora_state.items() if k.startswith(LORA_KEY + ".")}
    cleaned = _clean_keys(lora_state, "LoRA state", _LORA_PREFIXES, every_key=False)
    pairs: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for k, value in cleaned.items():
        match = _LORA_PATTERN.match(k)
        if match is None:
            unknown.append(k)
            continue
        part = pairs.setdefault(match["module"], {})
        if match["part"] in part:
            raise ValueError(f"LoRA state holds two lora_{match['part']} weights for module {match['module']!r} "
                             "(several adapters?)")
        part[match["part"]] = value
    if unknown:
        raise ValueError(f"LoRA state has keys that are not lora_A/lora_B weights: {_short_list(sorted(unknown))}")
    for module, part in pairs.items():
        if set(part) != {"A", "B"}:
            absent = "lora_B" if "A" in part else "lora_A"
            raise ValueError(f"LoRA module {module!r} has no {absent} weight")
    return pairs


def _merge_lora(state: Mapping[str, Tensor], lora_state: Mapping, alpha: float | None
                ) -> tuple[dict[str, Tensor], list[str]]:
    pairs = _lora_pairs(lora_state)
    if not pairs:
        raise ValueError("LoRA state holds no lora_A/lora_B weights")
    merged = dict(state)
    for module in sorted(pairs):
        a, b = pairs[module]["A"], pairs[module]["B"]
        base_key = module + ".weight"
        if base_key not in state:
            raise ValueError(f"LoRA module {module!r} has no base weight {base_key!r} in the checkpoint")
        w = state[base_key]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or w.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"LoRA module {module!r}: lora_A {tuple(a.shape)} [r, in] and lora_B "
                             f"{tuple(b.shape)} [out, r] do not fit the base weight {base_key!r} {tuple(w.shape)}")
        rank = a.shape[0]
        scale = (rank if alpha is None else alpha) / rank
        delta = b.float() @ a.float()
        merged[base_key] = (w.float() + scale * delta).to(w.dtype)
    return merged, sorted(pairs)


def merge_lora(state: Mapping[str, Tensor], lora_state: Mapping, alpha: float | None = None
               ) -> dict[str, Tensor]:
    """New state with ``W += (alpha / rank) * B @ A`` (float32, cast back to W's dtype) for every
    LoRA module. ``lora_state``: a peft dict, bare or under ``generator_lora``, with keys
    ``[model.]base_model.model.<module>.lora_{A,B}[.<adapter>].weight``; rank = lora_A rows;
    ``alpha`` defaults to the rank. ``state`` is not modified."""
    return _merge_lora(state, lora_state, alpha)[0]


# --------------------------------------------------------------------- load
@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``source``: the checkpoint entry used."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    merged_lora_modules: list[str] = field(default_factory=list)
    loaded: int = 0
    source: str = ""
    path: str = ""

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.path!r} (entry {self.source!r})"]
        if self.merged_lora_modules:
            lines.append(f"LoRA merged into {_short_list(self.merged_lora_modules)} modules")
        if self.missing:
            lines.append(f"missing (kept model values): {_short_list(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (ignored): {_short_list(self.unexpected)}")
        return "\n".join(lines)


def load_weights(model: nn.Module, path: str | os.PathLike, lora_path: str | os.PathLike | None = None,
                 lora_alpha: float | None = None, strict: bool = True, key: str | None = None) -> LoadReport:
    """Load a Wan checkpoint (any accepted layout) into ``model``, merging a LoRA file if given.

    Tensors are cast to the model's dtypes before the LoRA merge, so the merge happens once
    at the model's precision. Everything is validated before the first copy: on any error
    the model is unchanged. ``strict``: missing or unexpected keys raise
    :class:`CheckpointKeyError` (a KeyError); shape mismatches always raise ValueError.
    """
    path = os.fspath(path)
    source, state = _extract(read_state_dict(path), key)
    target = model.state_dict()
    meta = [k for k, t in target.items() if t.is_meta]
    if meta:
        raise ValueError(f"model has tensors on the meta device ({meta[0]!r}, ...); materialise it with "
                         "model.to_empty(device=...) before load_weights")
    state = {k: v.to(target[k].dtype) if k in target and v.is_floating_point() else v for k, v in state.items()}
    merged_modules: list[str] = []
    if lora_path is not None:
        state, merged_modules = _merge_lora(state, read_state_dict(lora_path, "LoRA file"), lora_alpha)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if strict and (missing or unexpected):
        raise CheckpointKeyError(f"checkpoint {path!r} (entry {source!r}) does not match the model: "
                                 f"missing {_short_list(missing)}; unexpected {_short_list(unexpected)}")
    loadable = [k for k in target if k in state]
    for k in loadable:
        if state[k].shape != target[k].shape:
            raise ValueError(f"checkpoint {path!r}: {k!r} has shape {tuple(state[k].shape)} in the checkpoint "
                             f"but {tuple(target[k].shape)} in the model")
    with torch.no_grad():
        for k in loadable:
            target[k].copy_(state[k])
    return LoadReport(missing, unexpected, merged_modules, len(loadable), source, path)


# -------------------------------------------------------------- shape check
class CheckpointShapeError(ValueError):
    """Checkpoint tensors whose shapes do not fit the model config; the message names them."""


def read_shapes(path: str | os.PathLike) -> dict:
    """A checkpoint's content with every tensor's shape but without reading tensor data:
    meta tensors from a ``.safetensors`` header, memory-mapped tensors from a torch file."""
    path = _checked_extension(path, "checkpoint")
    if not path.lower().endswith(".safetensors"):
        return read_state_dict(path)
    # Only the shapes of these stand-ins are used (their dtype is not the stored one).
    return {k: torch.empty(shape, device="meta") for k, shape in read_safetensors_shapes(path, "checkpoint").items()}


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of ``WanModel(config)``, built on the meta device (no memory, no init)."""
    return {k: v.shape for k, v in WanModel(config, device="meta").state_dict().items()}


def _preset_hint(config: ModelConfig, found: dict[str, torch.Size]) -> str:
    name = next((n for n, preset in MODEL_PRESETS.items() if preset == config), None)
    own = f"Preset {name!r}" if name else "This ModelConfig"
    fits = [n for n, preset in MODEL_PRESETS.items() if n != name and expected_shapes(preset) == found]
    if fits:
        return (f"{own} does not fit this checkpoint; its shapes fit preset {fits[0]!r} "
                f"(ModelConfig.preset({fits[0]!r}), --preset {fits[0]})")
    return f"{own} does not fit this checkpoint, and neither does any preset ({', '.join(sorted(MODEL_PRESETS))})"


def check_checkpoint_shapes(path: str | os.PathLike, config: ModelConfig, key: str | None = None,
                            strict: bool = True) -> None:
    """Refuse a checkpoint that does not fit ``config`` before any model is built.

    Reads only the tensor shapes (see :func:`read_shapes`), selects the entry and cleans the
    keys as :func:`load_weights` does, and compares with :func:`expected_shapes`. Raises
    :class:`CheckpointShapeError` naming the first mismatching keys with both shapes and the
    preset whose shapes fit, if any; with ``strict``, missing or unexpected keys raise
    :class:`CheckpointKeyError` as :func:`load_weights` would.
    """
    path = os.fspath(path)
    source, state = _extract(read_shapes(path), key)
    found = {k: v.shape for k, v in state.items()}
    expected = expected_shapes(config)
    mismatched = [k for k in expected if k in found and found[k] != expected[k]]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if not mismatched and not (strict and (missing or unexpected)):
        return
    where = f"checkpoint {path!r} (entry {source!r})"
    if mismatched:
        shown = "; ".join(f"{k!r} {tuple(found[k])} in the checkpoint vs {tuple(expected[k])} in the model"
                          for k in mismatched[:3])
        more = f"; ... ({len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise CheckpointShapeError(f"{where}: {len(mismatched)} tensors have other shapes than the model: "
                                   f"{shown}{more}. {_preset_hint(config, found)}")
    raise CheckpointKeyError(f"{where} does not match the model: missing {_short_list(missing)}; unexpected "
                             f"{_short_list(unexpected)}. {_preset_hint(config, found)}")


# --------------------------------------------------------------------- save
def _write(payload: dict, path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        torch.save(payload, path)
    elif ext == ".safetensors":
        from safetensors.torch import save_file
        flat = {}
        for name, value in payload.items():
            if isinstance(value, Mapping):
                flat.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                flat[name] = value
        save_file(flat, path)
    else:
        raise ValueError(f"cannot write {path!r}: unknown extension {ext!r}; use .pt, .pth or .safetensors")


def save_checkpoint(model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                    layout: str = "generator", prefix: bool = False) -> None:
    """Write a Wan state dict under ``layout`` ("generator", "generator_ema", "model" or
    "bare"), with a ``model.`` prefix on every key when ``prefix``; format by extension."""
    if layout not in SAVE_LAYOUTS:
        raise ValueError(f"layout must be one of {SAVE_LAYOUTS}, got {layout!r}")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {("model." if prefix else "") + k: v.detach().cpu().contiguous() for k, v in state.items()}
    _write(tensors if layout == "bare" else {layout: tensors}, os.fspath(path))


def save_lora(lora_state: Mapping[str, Tensor], path: str | os.PathLike, under_key: str | None = LORA_KEY) -> None:
    """Write a peft LoRA dict under ``under_key`` (None: bare); format by extension."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state.items()}
    _write(tensors if under_key is None else {under_key: tensors}, os.fspath(path))
