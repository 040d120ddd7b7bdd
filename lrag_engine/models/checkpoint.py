"""Reading, writing and LoRA-merging Wan 2.1 checkpoints (SPEC section 2).

Accepted layouts: the Wan state dict under a top-level ``generator_ema``, ``generator``
or ``model`` entry, or bare; keys may carry a ``model.`` / ``module.`` prefix and
FSDP / checkpoint / compile wrapper segments. Safetensors files are flat, so a layout
entry is stored there as a key prefix (``generator.blocks.0...``); a bare dict whose
every key starts with ``model.`` therefore reads as the ``model`` entry (same weights).

Selection rule when several entries exist: ``generator_ema``, else ``generator``, else
``model``, else the bare dict; ``key=`` overrides it.

Parameter names: the Wan naming, or diffusers' ``WanTransformer3DModel`` naming, told apart
by the keys and renamed on load (:mod:`lrag_engine.models.layouts`; ``naming=`` forces one).
A checkpoint is a file, a sharded one (its ``*.safetensors.index.json``), or a folder: a
diffusers ``transformer/`` folder (``diffusion_pytorch_model.safetensors`` or its sharded
index), a diffusers pipeline folder (its ``transformer/``), or a folder holding one checkpoint file.

Files are read by :func:`lrag_engine.safe_load.load_tensor_file`: no pickled code runs, and
an unreadable or unsafe file raises a ValueError naming it. :func:`check_checkpoint_shapes`
compares a checkpoint's shapes (header only) with a ``ModelConfig`` before any model is built.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import MODEL_PRESETS, ModelConfig
from ..safe_load import load_tensor_file, read_safetensors_shapes
from .layouts import DIFFUSERS, NAMINGS, WAN, LayoutError, detect_naming, diffusers_to_wan
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
CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".safetensors")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"


class CheckpointKeyError(KeyError):
    """Missing or unexpected checkpoint keys; the message lists them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _short_list(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else ""
    return f"{len(names)} [{shown}{more}]"


# ------------------------------------------------------------------ reading
@dataclass(frozen=True)
class CheckpointFiles:
    """The tensor files of one checkpoint. ``weight_map``: for a sharded checkpoint, tensor
    name -> shard file (from its index), else None."""

    path: str
    files: tuple[str, ...]
    weight_map: dict[str, str] | None = None


def checkpoint_files(path: str | os.PathLike, what: str = "checkpoint") -> CheckpointFiles:
    """Which files make up the checkpoint at ``path``: a ``.pt``/``.pth``/``.safetensors`` file,
    a sharded checkpoint's ``*.safetensors.index.json``, or a folder holding a diffusers
    ``diffusion_pytorch_model.safetensors`` (or its sharded index), a diffusers pipeline's
    ``transformer/`` folder, or exactly one checkpoint file (or sharded index)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        return _folder_files(path, what)
    if path.endswith(".index.json"):
        return _sharded_files(path, what)
    return CheckpointFiles(path, (_checked_extension(path, what),))


def _folder_files(folder: str, what: str) -> CheckpointFiles:
    names = sorted(os.listdir(folder))
    if DIFFUSERS_INDEX in names:
        return _sharded_files(os.path.join(folder, DIFFUSERS_INDEX), what)
    if DIFFUSERS_WEIGHTS in names:
        return CheckpointFiles(folder, (os.path.join(folder, DIFFUSERS_WEIGHTS),))
    if "model_index.json" in names and os.path.isdir(os.path.join(folder, "transformer")):
        return _folder_files(os.path.join(folder, "transformer"), what)   # a diffusers pipeline
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    weights = [n for n in names if os.path.splitext(n)[1].lower() in CHECKPOINT_EXTENSIONS
               and os.path.isfile(os.path.join(folder, n))]
    if len(indexes) == 1:
        return _sharded_files(os.path.join(folder, indexes[0]), what)
    if len(indexes) > 1 or len(weights) > 1:
        several = indexes if len(indexes) > 1 else weights
        raise ValueError(f"{what} folder {folder!r} holds several checkpoints {several[:_LIST_LIMIT]}; "
                         "pass the file (or index) to load")
    if weights:
        return CheckpointFiles(folder, (os.path.join(folder, weights[0]),))
    pickled = [n for n in names if n.endswith(".bin")]
    hint = (f"; its {pickled[:3]} are pickled diffusers weights, which are not read: save them again with "
            "save_pretrained(..., safe_serialization=True)") if pickled else ""
    raise ValueError(f"{what} folder {folder!r} holds no checkpoint ({DIFFUSERS_WEIGHTS}, a "
                     f"*.safetensors.index.json, or one .pt/.pth/.safetensors file); it holds "
                     f"{names[:_LIST_LIMIT]}{hint}")


def _sharded_files(index_path: str, what: str) -> CheckpointFiles:
    """Shards listed by a (diffusers / transformers) ``*.safetensors.index.json``: ``{"weight_map": {name: file}}``."""
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} index {index_path!r} is not a readable JSON file: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{what} index {index_path!r} has no weight_map {{tensor name: shard file}}")
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    outside = [f for f in shards if os.path.basename(f) != f or f in (".", "..")]
    if outside:
        raise ValueError(f"{what} index {index_path!r} names shards outside its folder: {outside[:3]}")
    for f in shards:
        _checked_extension(os.path.join(folder, f), f"{what} shard (listed in {index_path!r})")
    return CheckpointFiles(index_path, tuple(os.path.join(folder, f) for f in shards),
                           {k: os.path.join(folder, f) for k, f in weight_map.items()})


def _read_files(files: CheckpointFiles, what: str, read) -> dict:
    """Content of a one-file checkpoint, or the union of the shards (checked against the index)."""
    if files.weight_map is None:
        return read(files.files[0], what)
    merged: dict = {}
    for shard in files.files:
        content = read(shard, f"{what} shard")
        if not isinstance(content, Mapping):
            raise ValueError(f"{what} shard {shard!r} holds a {type(content).__name__}, not a dict of tensors")
        stray = sorted(k for k in content if files.weight_map.get(k) != shard)
        if stray:
            raise ValueError(f"{what} shard {shard!r} holds tensors its index {files.path!r} places elsewhere "
                             f"or not at all: {_short_list(stray)}")
        merged.update(content)
    absent = sorted(set(files.weight_map) - set(merged))
    if absent:
        raise ValueError(f"{what} index {files.path!r} lists tensors no shard holds: {_short_list(absent)}")
    return merged


def _read_tensor_file(path: str, what: str) -> dict:
    # mmap keeps a 5.7 GB float32 checkpoint out of RAM until its tensors are copied.
    raw = load_tensor_file(path, what, mmap=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what} {path!r} holds a {type(raw).__name__}, not a dict of tensors")
    return dict(raw)


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The mapping stored in a checkpoint (see :func:`checkpoint_files`), as stored (it may nest
    state dicts under layout keys); the shards of a sharded checkpoint are merged. Torch files
    are read with ``torch.load`` (weights only, memory-mapped, on the CPU).

    Unreadable or unsafe files raise :class:`~lrag_engine.safe_load.TensorFileError` (a ValueError).
    """
    return _read_files(checkpoint_files(path, what), what, _read_tensor_file)


def _checked_extension(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in CHECKPOINT_EXTENSIONS:
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


def extract_wan_state(raw: Mapping, key: str | None = None, naming: str = "auto") -> dict[str, Tensor]:
    """The Wan state dict (plain Wan key names) inside a checkpoint's content.

    ``key``: the entry to use ("generator", "generator_ema", "model", "bare" or any top-level
    name); default: ``generator_ema`` if present, else ``generator``, else ``model``, else bare.
    ``naming``: the parameter names the entry uses, "wan" or "diffusers" (renamed to Wan's);
    default "auto": told from the keys.
    """
    return _extract(raw, key, naming)[2]


_NAMING_EXAMPLE = {WAN: "keys such as 'blocks.0.self_attn.q.weight'",
                   DIFFUSERS: "WanTransformer3DModel keys such as 'blocks.0.attn1.to_q.weight'"}


def _extract(raw: Mapping, key: str | None, naming: str = "auto",
             where: str = "checkpoint") -> tuple[str, str, dict[str, Tensor]]:
    """(entry name, naming found, state in the Wan naming)."""
    if naming not in ("auto", *NAMINGS):
        raise ValueError(f"naming must be 'auto', 'wan' or 'diffusers', got {naming!r}")
    name, state = _select(raw, key)
    state = _clean_keys(state, f"checkpoint entry {name!r}", _LEADING_PREFIXES, every_key=True)
    what = f"{where} (entry {name!r})"
    found = detect_naming(state)
    if found is None:
        shown = _short_list(sorted(state))
        raise LayoutError(f"{what} is in neither the Wan naming ({_NAMING_EXAMPLE[WAN]}) nor the diffusers "
                          f"naming ({_NAMING_EXAMPLE[DIFFUSERS]}): its keys are {shown}. If the weights sit "
                          f"under another top-level entry, pass key=<entry> (checkpoint_key=, --checkpoint-key); "
                          f"top-level keys: {sorted(raw)[:_LIST_LIMIT]}")
    if naming != "auto" and found != naming:
        raise LayoutError(f"{what} uses the {found} naming ({_NAMING_EXAMPLE[found]}), but naming={naming!r} was "
                          f"asked; load it with naming={found!r} or naming='auto' (renamed to the Wan naming on load)")
    if found == DIFFUSERS:
        # Unknown keys keep their names: load_weights reports them as unexpected, as for Wan names.
        state = diffusers_to_wan(state, what, strict=False)
    return name, found, state


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
    """What :func:`load_weights` did. ``source``: the checkpoint entry used; ``naming``: the
    parameter names it had ("wan", or "diffusers": renamed on load)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    merged_lora_modules: list[str] = field(default_factory=list)
    loaded: int = 0
    source: str = ""
    path: str = ""
    naming: str = WAN

    def __str__(self) -> str:
        names = f", {self.naming} naming" if self.naming != WAN else ""
        lines = [f"loaded {self.loaded} tensors from {self.path!r} (entry {self.source!r}{names})"]
        if self.merged_lora_modules:
            lines.append(f"LoRA merged into {_short_list(self.merged_lora_modules)} modules")
        if self.missing:
            lines.append(f"missing (kept model values): {_short_list(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (ignored): {_short_list(self.unexpected)}")
        return "\n".join(lines)


def load_weights(model: nn.Module, path: str | os.PathLike, lora_path: str | os.PathLike | None = None,
                 lora_alpha: float | None = None, strict: bool = True, key: str | None = None,
                 naming: str = "auto") -> LoadReport:
    """Load a Wan checkpoint (any accepted layout, file or folder, Wan or diffusers naming; see
    the module docstring) into ``model``, merging a LoRA file (Wan module names) if given.

    Tensors are cast to the model's dtypes before the LoRA merge, so the merge happens once
    at the model's precision. Everything is validated before the first copy: on any error
    the model is unchanged. ``strict``: missing or unexpected keys raise
    :class:`CheckpointKeyError` (a KeyError); shape mismatches always raise ValueError.
    """
    path = os.fspath(path)
    source, found, state = _extract(read_state_dict(path), key, naming, f"checkpoint {path!r}")
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
    return LoadReport(missing, unexpected, merged_modules, len(loadable), source, path, found)


# -------------------------------------------------------------- shape check
class CheckpointShapeError(ValueError):
    """Checkpoint tensors whose shapes do not fit the model config; the message names them."""


def read_shapes(path: str | os.PathLike) -> dict:
    """A checkpoint's content (see :func:`checkpoint_files`) with every tensor's shape but without
    reading tensor data: meta tensors from ``.safetensors`` headers, memory-mapped tensors from
    torch files."""
    return _read_files(checkpoint_files(path), "checkpoint", _read_file_shapes)


def _read_file_shapes(path: str, what: str) -> dict:
    if not path.lower().endswith(".safetensors"):
        return _read_tensor_file(path, what)
    # Only the shapes of these stand-ins are used (their dtype is not the stored one).
    return {k: torch.empty(shape, device="meta") for k, shape in read_safetensors_shapes(path, what).items()}


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
                            strict: bool = True, naming: str = "auto") -> None:
    """Refuse a checkpoint that does not fit ``config`` before any model is built.

    Reads only the tensor shapes (see :func:`read_shapes`), selects the entry, cleans and
    renames the keys as :func:`load_weights` does, and compares with :func:`expected_shapes`. Raises
    :class:`CheckpointShapeError` naming the first mismatching keys with both shapes and the
    preset whose shapes fit, if any; with ``strict``, missing or unexpected keys raise
    :class:`CheckpointKeyError` as :func:`load_weights` would.
    """
    path = os.fspath(path)
    source, _, state = _extract(read_shapes(path), key, naming, f"checkpoint {path!r}")
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
