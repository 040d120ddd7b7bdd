"""The two namings of Wan 2.1 weights and configs: the original Wan one and diffusers'.

``"wan"``: the names :class:`~lrag_engine.models.wan.WanModel` uses, those of the public
Wan 2.1 code and of the causal checkpoints built on it (``blocks.{i}.self_attn.q``, ...).
``"diffusers"``: the names of diffusers' ``WanTransformer3DModel`` (``blocks.{i}.attn1.to_q``, ...).

The same tensors under other names, with the same shapes: no tensor is split, fused or
transposed. The one trap is the norms. Both blocks have an affine LayerNorm before the
cross-attention and an affine-free one before the FFN, but Wan names the cross-attention
norm ``norm3`` while diffusers names it ``norm2``; the affine-free norms hold no tensors.

:func:`diffusers_to_wan` / :func:`wan_to_diffusers` rename a state dict, key by key, and
refuse any key they do not know (image-conditioning weights of the i2v / flf2v models
with a message that says so). :func:`model_config_from_json` reads either library's
``config.json`` into a :class:`~lrag_engine.config.ModelConfig`.

    state = diffusers_to_wan(transformer.state_dict())       # -> WanModel.load_state_dict
    config = ModelConfig.from_json("Wan2.1-T2V-1.3B-Diffusers/transformer", height=60, width=104)
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import TypeVar

from ..config import ModelConfig

WAN, DIFFUSERS = "wan", "diffusers"
NAMINGS = (WAN, DIFFUSERS)
_LIST_LIMIT = 6

T = TypeVar("T")

# Module outside the blocks: Wan name -> diffusers name. Weight and bias follow the module.
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Module inside block i (the ``blocks.{i}.`` part is kept).
_BLOCK_MODULES = {
    **{f"self_attn.{w}": f"attn1.{d}" for w, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    **{f"cross_attn.{w}": f"attn2.{d}" for w, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    "norm3": "norm2",   # the affine LayerNorm before the cross-attention
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_RMS_NORMS = {f"{a}.norm_{x}": f"{b}.norm_{x}" for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
              for x in "qk"}
# Whole-tensor names: the adaLN tables, [1, 6, dim] per block and [1, 2, dim] for the head.
_TOP_TENSORS = {"head.modulation": "scale_shift_table"}
_BLOCK_TENSORS = {"modulation": "scale_shift_table"}
# Rows of each adaLN table, under either naming.
_TOP_TABLE_ROWS = {"head.modulation": 2, "scale_shift_table": 2}
_BLOCK_TABLE_ROWS = {"modulation": 6, "scale_shift_table": 6}


def _tensor_pairs(modules: Mapping[str, str], rms: Mapping[str, str], tensors: Mapping[str, str]) -> dict:
    pairs = {f"{w}.{p}": f"{d}.{p}" for w, d in modules.items() for p in ("weight", "bias")}
    pairs.update({f"{w}.weight": f"{d}.weight" for w, d in rms.items()})
    pairs.update(tensors)
    return pairs


# Wan name -> diffusers name, outside the blocks and inside block i (relative to ``blocks.{i}.``).
TOP_LEVEL = _tensor_pairs(_TOP_MODULES, {}, _TOP_TENSORS)
PER_BLOCK = _tensor_pairs(_BLOCK_MODULES, _RMS_NORMS, _BLOCK_TENSORS)
_INVERSE = {WAN: (TOP_LEVEL, PER_BLOCK),
            DIFFUSERS: ({d: w for w, d in TOP_LEVEL.items()}, {d: w for w, d in PER_BLOCK.items()})}

# Image conditioning (i2v / flf2v): the CLIP image projection and the extra cross-attention K/V.
_IMAGE_KEYS = {
    WAN: re.compile(r"^(img_emb\.|blocks\.\d+\.cross_attn\.(k_img|v_img|norm_k_img)\.)"),
    DIFFUSERS: re.compile(r"^(condition_embedder\.image_embedder\.|"
                          r"blocks\.\d+\.attn2\.(add_k_proj|add_v_proj|norm_added_k|norm_added_q)\.)"),
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


class LayoutError(ValueError):
    """A state dict or config in a naming this module cannot convert; the message says which
    naming was found and how to load it."""


def _short(names) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else ""
    return "[" + ", ".join(names[:_LIST_LIMIT]) + more + "]"


def _lookup(key: str, naming: str) -> str | None:
    """The other naming's name of ``key`` (in ``naming``), or None when ``key`` is not one of its names."""
    top, per_block = _INVERSE[naming]
    if key in top:
        return top[key]
    match = _BLOCK_KEY.match(key)
    if match and match[2] in per_block:
        return f"blocks.{match[1]}.{per_block[match[2]]}"
    return None


def _own_names(keys, naming: str) -> int:
    """How many of ``keys`` are names of ``naming`` that the other naming does not share."""
    other = DIFFUSERS if naming == WAN else WAN
    return sum(1 for k in keys if (_lookup(k, naming) is not None or _IMAGE_KEYS[naming].match(k))
               and _lookup(k, other) is None)


def detect_naming(keys) -> str | None:
    """``"wan"``, ``"diffusers"``, or None when the keys hold names of neither.

    Decided by the names only one naming has (``patch_embedding`` is in both); a key of
    neither naming (an extra tensor) does not count. Keys of both namings raise LayoutError.
    """
    keys = list(keys)
    wan, diffusers = _own_names(keys, WAN), _own_names(keys, DIFFUSERS)
    if wan and diffusers:
        raise LayoutError(f"the state dict mixes the Wan naming ({wan} keys such as 'blocks.0.self_attn.q.weight') "
                          f"and the diffusers naming ({diffusers} keys such as 'blocks.0.attn1.to_q.weight'); "
                          "it cannot be loaded as either")
    return WAN if wan else DIFFUSERS if diffusers else None


def _refuse_image_conditioning(keys, naming: str, what: str) -> None:
    image = [k for k in keys if _IMAGE_KEYS[naming].match(k)]
    if image:
        raise LayoutError(f"{what} holds image-conditioning tensors {_short(image)}: it is an image-to-video "
                          "Wan model (i2v / flf2v); WanModel is the text-to-video model and cannot load it")


def _rename(state: Mapping[str, T], naming: str, what: str, strict: bool) -> dict[str, T]:
    target = DIFFUSERS if naming == WAN else WAN
    _refuse_image_conditioning(state, naming, what)
    renamed, unknown = {}, []
    for key, value in state.items():
        new = _lookup(key, naming)
        if new is None:
            unknown.append(key)
            if not strict:
                renamed[key] = value
            continue
        _check_table(key, value, what)
        renamed[new] = value
    if unknown and strict:
        found = detect_naming(unknown)
        hint = f" (they are {found}-named)" if found is not None else ""
        raise LayoutError(f"{what}: {len(unknown)} keys are not {naming}-named Wan 2.1 text-to-video tensors"
                          f"{hint}: {_short(unknown)}; cannot rename them to the {target} naming")
    return renamed


def _check_table(key: str, value, what: str) -> None:
    """The adaLN tables keep their shape across namings: [1, 6, dim] per block, [1, 2, dim] for the head."""
    match = _BLOCK_KEY.match(key)
    rows = _BLOCK_TABLE_ROWS.get(match[2]) if match else _TOP_TABLE_ROWS.get(key)
    shape = tuple(getattr(value, "shape", ()))
    if rows is not None and (len(shape) != 3 or shape[:2] != (1, rows)):
        raise LayoutError(f"{what}: {key!r} has shape {shape}; an adaLN table must be [1, {rows}, dim]")


def diffusers_to_wan(state: Mapping[str, T], what: str = "state dict", strict: bool = True) -> dict[str, T]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to the Wan naming (same tensors,
    not copied).

    Image-conditioning tensors (i2v / flf2v) always raise :class:`LayoutError`. ``strict``:
    every other key must be a diffusers name of a Wan 2.1 t2v tensor, else LayoutError naming
    them; when False, unknown keys are kept as they are (a loader then reports them as
    unexpected). ``what``: how messages name the source.
    """
    return _rename(state, DIFFUSERS, what, strict)


def wan_to_diffusers(state: Mapping[str, T], what: str = "state dict", strict: bool = True) -> dict[str, T]:
    """Rename a Wan-named state dict (``WanModel.state_dict()``) to diffusers' names; the
    inverse of :func:`diffusers_to_wan`, with the same rules."""
    return _rename(state, WAN, what, strict)


# ------------------------------------------------------------------------- config.json
# Per naming: the fields read, those that must have one value for a text-to-video model,
# and where each ModelConfig field comes from.
_DIFFUSERS_FIELDS = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
                     "image_dim", "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len"}
_WAN_FIELDS = {"model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
               "out_dim", "num_heads", "num_layers", "window_size", "qk_norm", "cross_attn_norm", "eps"}
_REQUIRED = {DIFFUSERS: ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers"),
             WAN: ("dim", "num_heads", "ffn_dim", "num_layers")}
# (field, allowed value, why another value is refused); a missing field counts as allowed.
_FIXED = {
    DIFFUSERS: (("image_dim", None, "image conditioning (i2v / flf2v)"),
                ("added_kv_proj_dim", None, "image conditioning (i2v / flf2v)"),
                ("pos_embed_seq_len", None, "image conditioning (flf2v)"),
                ("cross_attn_norm", True, "WanModel always has the affine cross-attention norm"),
                ("qk_norm", "rms_norm_across_heads", "WanModel RMS-normalises q and k over all heads")),
    WAN: (("model_type", "t2v", "WanModel is the text-to-video model"),
          ("window_size", [-1, -1], "WanModel attends globally"),
          ("qk_norm", True, "WanModel RMS-normalises q and k"),
          ("cross_attn_norm", True, "WanModel always has the affine cross-attention norm")),
}


def read_config_json(source: str | os.PathLike | Mapping) -> dict:
    """A config as a dict: ``source`` is a dict, a ``config.json`` path, or a folder holding one."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model config {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayoutError(f"model config {path!r} is not a readable JSON file: {exc}") from None
    if not isinstance(config, dict):
        raise LayoutError(f"model config {path!r} holds a JSON {type(config).__name__}, not an object")
    return config


def config_naming(config: Mapping) -> str:
    """Which library wrote ``config``: ``"diffusers"`` or ``"wan"``; LayoutError if neither."""
    cls = config.get("_class_name")
    if cls == "WanTransformer3DModel" or "num_attention_heads" in config or "attention_head_dim" in config:
        return DIFFUSERS
    if cls == "WanModel" or "dim" in config or "num_heads" in config:
        return WAN
    raise LayoutError(f"model config (_class_name {cls!r}, fields {_short(config)}) is neither a diffusers "
                      "WanTransformer3DModel config (num_attention_heads, attention_head_dim, ...) nor an original "
                      "Wan 2.1 config (dim, num_heads, ...)")


def model_config_from_json(source: str | os.PathLike | Mapping, height: int | None = None,
                           width: int | None = None, text_len: int | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from a diffusers ``WanTransformer3DModel`` or original Wan 2.1 config.

    source: a dict, a ``config.json`` path, or a folder holding one. The fields of the
        config's own naming are read (``_``-prefixed metadata is ignored); an unknown field,
        or one that describes another model (image conditioning, no q/k norm, windowed
        attention), raises :class:`LayoutError` naming it.
    height / width: latent frame size (not in these files; default: ModelConfig's).
    text_len: text positions the cross-attention sees; default: the config's ``text_len``
        (Wan), else ModelConfig's 512 (diffusers pipelines pad prompts to 512).
    """
    config = read_config_json(source)
    naming = config_naming(config)
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    known = _DIFFUSERS_FIELDS if naming == DIFFUSERS else _WAN_FIELDS
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LayoutError(f"{naming} model config has fields this loader does not know: {_short(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    missing = [k for k in _REQUIRED[naming] if k not in fields]
    if missing:
        raise LayoutError(f"{naming} model config lacks {missing}")
    for name, allowed, why in _FIXED[naming]:
        value = fields.get(name, allowed)
        if (list(value) if isinstance(value, (list, tuple)) else value) != allowed:
            raise LayoutError(f"{naming} model config field {name}={value!r} is not supported ({why}; "
                              f"expected {allowed!r})")
    defaults = ModelConfig()
    if naming == DIFFUSERS:
        in_channels = fields.get("in_channels", defaults.in_channels)
        shapes = dict(dim=fields["num_attention_heads"] * fields["attention_head_dim"],
                      num_heads=fields["num_attention_heads"], in_channels=in_channels,
                      out_channels=fields.get("out_channels") or in_channels)
    else:
        shapes = dict(dim=fields["dim"], num_heads=fields["num_heads"],
                      in_channels=fields.get("in_dim", defaults.in_channels),
                      out_channels=fields.get("out_dim", defaults.out_channels))
        text_len = fields.get("text_len", defaults.text_len) if text_len is None else text_len
    given = {k: v for k, v in (("height", height), ("width", width), ("text_len", text_len)) if v is not None}
    return ModelConfig(**shapes, ffn_dim=fields["ffn_dim"], num_layers=fields["num_layers"],
                       text_dim=fields.get("text_dim", defaults.text_dim),
                       freq_dim=fields.get("freq_dim", defaults.freq_dim), eps=fields.get("eps", defaults.eps),
                       patch_size=tuple(fields.get("patch_size", defaults.patch_size)), **given)


def diffusers_config(config: ModelConfig) -> dict:
    """``WanTransformer3DModel(**diffusers_config(cfg))`` builds the diffusers twin of ``WanModel(cfg)``."""
    return dict(patch_size=tuple(config.patch_size), num_attention_heads=config.num_heads,
                attention_head_dim=config.head_dim, in_channels=config.in_channels,
                out_channels=config.out_channels, text_dim=config.text_dim, freq_dim=config.freq_dim,
                ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=config.eps)
