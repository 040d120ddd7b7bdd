"""The Wan 2.1 VAE between the DiT's latents and pixels, with a streaming decoder.

:class:`WanVAE` wraps diffusers' ``AutoencoderKLWan`` (imported when a VAE is built, so
the package imports without diffusers) and speaks lrag_engine's layout:

    vae = WanVAE.from_diffusers("Wan2.1-T2V-1.3B-Diffusers")      # or its vae/ folder
    vae = WanVAE.from_original("Wan2.1_VAE.pth")                   # the original Wan release
    frames = vae.decode(latents)          # [B, T, 16, H, W] -> uint8 [B, 4T-3, 8H, 8W, 3]
    latents = vae.encode(frames)          # uint8 [B, 4k+1, 8H, 8W, 3] -> [B, k+1, 16, H, W]

    decoder = vae.stream_decoder()
    for block in blocks:                  # [B, F, 16, H, W] each, in order
        writer.append(decoder.decode_block(block))

Latents are the DiT's: normalised per channel with Wan 2.1's mean/std (the VAE config's
``latents_mean`` / ``latents_std``; their defaults are the 16 published values).
``decode`` computes ``z * std + mean`` before the VAE, ``encode`` ``(z - mean) / std`` after.

Frame counts. The decoder is causal in time and upsamples twice by 2: the first latent
frame gives 1 video frame, every later one 4, so T latent frames give 4T - 3 frames.
The encoder inverts it: 1 + 4k frames give k + 1 latent frames (an image gives one);
other frame counts are refused.

Streaming. The decoder runs one latent frame at a time and keeps, for each causal conv,
the last two input frames it saw (diffusers' ``_feat_map``). :class:`StreamingDecoder`
owns such a cache and keeps it across blocks, so the concatenated outputs of
``decode_block`` equal ``decode`` of the whole latent video; block i > 0 of F latent
frames gives 4F frames, the first one 4F - 3.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..safe_load import load_tensor_file

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4
# Test / demo VAE: the Wan 2.1 structure (4 stages, 2 residual blocks, two temporal
# up/downsamplings) at a width a CPU decodes in milliseconds.
TINY_CONFIG: dict[str, Any] = {"base_dim": 8, "z_dim": 16}
_INSTALL_HINT = 'the Wan VAE needs diffusers: pip install -e ".[pipeline]"'
_LIST_LIMIT = 6


class VAECheckpointError(ValueError):
    """A VAE checkpoint or folder that cannot be loaded; the message says why."""


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from None
    return AutoencoderKLWan


def _short(names) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else ""
    return "[" + ", ".join(names[:_LIST_LIMIT]) + more + "]"


# ---------------------------------------------------------------------------------------
# The original Wan 2.1 naming (Wan2.1_VAE.pth) and diffusers' naming.
#
# The modules are the same and in the same order; the original code keeps them in flat
# nn.Sequential lists where diffusers nests them. A residual block is
# ``residual = [RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv]`` + ``shortcut``;
# the middle is ``[residual, attention, residual]``; a head ``[RMS_norm, SiLU, conv]``.
# The decoder's ``upsamples`` list holds, per stage, num_res_blocks + 1 residual blocks
# then the stage's upsampler (all stages but the last have one). Attention blocks and
# resamplers (``resample.1``, ``time_conv``) have the same names in both.
# ---------------------------------------------------------------------------------------
_RESIDUAL_PARTS = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.",
                   "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}
_TOP = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
_COMMON = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2."}
_MID_RESNET = re.compile(r"^mid_block\.resnets\.(\d+)\.(.+)$")
_MID_ATTENTION = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_DOWN = re.compile(r"^down_blocks\.(\d+)\.(.+)$")
_UP_RESNET = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_UP_SAMPLER = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")


def _residual(rest: str) -> str:
    for diffusers, original in _RESIDUAL_PARTS.items():
        if rest.startswith(diffusers):
            return original + rest[len(diffusers):]
    return rest   # attention and resample tensors keep their names


def _original_name(key: str, num_res_blocks: int) -> str | None:
    """The original Wan name of the diffusers tensor ``key``, or None when it has none."""
    for diffusers, original in _TOP.items():
        if key.startswith(diffusers):
            return original + key[len(diffusers):]
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return None
    for diffusers, original in _COMMON.items():
        if rest.startswith(diffusers):
            return f"{part}.{original}{rest[len(diffusers):]}"
    if m := _MID_RESNET.match(rest):
        return f"{part}.middle.{2 * int(m[1])}.{_residual(m[2])}"
    if m := _MID_ATTENTION.match(rest):
        return f"{part}.middle.1.{m[1]}"
    stage_len = num_res_blocks + 2   # residual blocks and the upsampler of one decoder stage
    if part == "encoder" and (m := _DOWN.match(rest)):
        return f"encoder.downsamples.{m[1]}.{_residual(m[2])}"
    if part == "decoder" and (m := _UP_RESNET.match(rest)):
        return f"decoder.upsamples.{int(m[1]) * stage_len + int(m[2])}.{_residual(m[3])}"
    if part == "decoder" and (m := _UP_SAMPLER.match(rest)):
        return f"decoder.upsamples.{int(m[1]) * stage_len + num_res_blocks + 1}.{m[2]}"
    return None


def _check_wan21_layout(config: Mapping[str, Any]) -> None:
    unsupported = {name: config.get(name) for name in ("is_residual", "attn_scales", "patch_size")
                   if config.get(name)}
    if unsupported:
        raise VAECheckpointError(f"the original-naming key map covers the Wan 2.1 VAE layout only; this config "
                                 f"sets {unsupported} (a Wan 2.2 or other VAE): load it with from_diffusers")


def original_key_map(model) -> dict[str, str]:
    """Original Wan name -> diffusers name for every tensor of ``model`` (an AutoencoderKLWan
    with the Wan 2.1 layout)."""
    _check_wan21_layout(model.config)
    mapping = {}
    for key in model.state_dict():
        original = _original_name(key, model.config.num_res_blocks)
        if original is None:
            raise VAECheckpointError(f"AutoencoderKLWan tensor {key!r} has no original Wan name")
        mapping[original] = key
    return mapping


def _rename_original(state: Mapping[str, torch.Tensor], model, path: str) -> dict[str, torch.Tensor]:
    what = f"Wan VAE checkpoint {path!r}"
    if not isinstance(state, Mapping):
        raise VAECheckpointError(f"{what} holds a {type(state).__name__}, not a dict of tensors")
    nested = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if nested:
        raise VAECheckpointError(f"{what} is not a flat dict of tensors: {_short(map(str, nested))} hold "
                                 "other objects (a wrapped training checkpoint?)")
    mapping = original_key_map(model)
    expected = model.state_dict()
    unknown = sorted(set(state) - set(mapping))
    if unknown and sum(k in expected for k in unknown) > len(unknown) // 2:
        raise VAECheckpointError(f"{what} uses diffusers' names ({_short(unknown)}): load it with from_diffusers")
    missing = sorted(set(mapping) - set(state))
    if unknown or missing:
        raise VAECheckpointError(f"{what} does not match the Wan 2.1 VAE: {len(missing)} tensors missing "
                                 f"{_short(missing)}, {len(unknown)} unknown {_short(unknown)}")
    renamed = {}
    for original, tensor in state.items():
        name = mapping[original]
        if tensor.shape != expected[name].shape:
            raise VAECheckpointError(f"{what}: {original!r} has shape {tuple(tensor.shape)}, the VAE config "
                                     f"expects {tuple(expected[name].shape)} (for {name!r}); wrong config?")
        renamed[name] = tensor
    return renamed


# ---------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------
def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B, 3, T, H, W] -> uint8 [B, T, H, W, 3]."""
    return video.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


def _to_float(video: torch.Tensor) -> torch.Tensor:
    return video.permute(0, 2, 3, 4, 1).contiguous()


def _place(model, dtype: torch.dtype, device: str | torch.device):
    """Move a freshly built (float32) model; ``to(dtype)`` only when it changes anything,
    since diffusers warns on every dtype cast."""
    model = model.to(device)
    return model if dtype == torch.float32 else model.to(dtype)


def _check_latents(latents: torch.Tensor, channels: int, name: str = "latents") -> None:
    if latents.dim() != 5 or latents.shape[2] != channels or latents.shape[1] == 0:
        raise ValueError(f"{name} must be [B, T, {channels}, H, W] with T >= 1, got {tuple(latents.shape)}")


class WanVAE:
    """The Wan 2.1 VAE in lrag_engine's layout (see the module docstring).

    model: a diffusers ``AutoencoderKLWan``; it is put in eval mode and kept on its device
    and dtype (``self.device``, ``self.dtype``).
    """

    def __init__(self, model) -> None:
        self.model = model.eval().requires_grad_(False)
        config = model.config
        channels = config.z_dim
        if len(config.latents_mean) != channels or len(config.latents_std) != channels:
            raise VAECheckpointError(f"VAE config latents_mean / latents_std have {len(config.latents_mean)} / "
                                     f"{len(config.latents_std)} values; z_dim is {channels}")
        self.channels = channels
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32)
        self.std = torch.tensor(config.latents_std, dtype=torch.float32)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> WanVAE:
        """From a diffusers folder: the VAE's own (``config.json`` + weights) or a pipeline
        folder with a ``vae/`` subfolder (``Wan2.1-T2V-1.3B-Diffusers``)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise VAECheckpointError(f"diffusers VAE folder {path!r} is not a directory")
        folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "vae")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise VAECheckpointError(f"{path!r} is neither a diffusers VAE folder (config.json) nor a pipeline "
                                     "folder with a vae/ subfolder")
        with open(config_path) as handle:
            class_name = json.load(handle).get("_class_name")
        if class_name != "AutoencoderKLWan":
            raise VAECheckpointError(f"{config_path!r} describes a {class_name!r}, not an AutoencoderKLWan")
        model = _autoencoder_class().from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        return cls(model.to(device))

    @classmethod
    def from_original(cls, path: str | os.PathLike, config: Mapping[str, Any] | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WanVAE:
        """From the original release's ``Wan2.1_VAE.pth`` (or a ``.safetensors`` in its
        naming), renamed to diffusers' names; every tensor must be present, known and of
        the expected shape. ``config``: AutoencoderKLWan arguments (default: Wan 2.1's)."""
        path = os.fspath(path)
        _check_wan21_layout(config or {})
        state = load_tensor_file(path, what="Wan VAE checkpoint", error=VAECheckpointError)
        model = _autoencoder_class()(**dict(config or {}))
        model.load_state_dict(_rename_original(state, model, path), strict=True)
        return cls(_place(model, dtype, device))

    @classmethod
    def random(cls, seed: int = 0, config: Mapping[str, Any] | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WanVAE:
        """A randomly initialised VAE (``TINY_CONFIG`` updated by ``config``) for tests and
        the offline demo; the same seed gives the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _autoencoder_class()(**{**TINY_CONFIG, **dict(config or {})})
        return cls(_place(model, dtype, device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- latent normalisation ---------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels, 1, 1, 1)
        return self.mean.to(like.device).view(shape), self.std.to(like.device).view(shape)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents [B, T, C, H, W] -> the VAE's raw latents [B, C, T, H, W] (float32)."""
        _check_latents(latents, self.channels)
        z = latents.to(self.device, torch.float32).permute(0, 2, 1, 3, 4)
        mean, std = self._stats(z)
        return z * std + mean

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents [B, C, T, H, W] -> DiT latents [B, T, C, H, W] (float32)."""
        mean, std = self._stats(raw)
        return ((raw.float() - mean) / std).permute(0, 2, 1, 3, 4).contiguous()

    # -- decode / encode --------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, as_float: bool = False) -> torch.Tensor:
        """latents [B, T, C, H, W] -> frames uint8 [B, 4T-3, 8H, 8W, 3], or float in
        [-1, 1] with ``as_float``. One call of diffusers' decode (the reference the
        streaming decoder is tested against)."""
        z = self.denormalize(latents).to(self.dtype)
        video = self.model.decode(z, return_dict=False)[0].float()
        return _to_float(video) if as_float else _to_uint8(video)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, T, H, W, 3] (uint8, or float in [-1, 1]) with T = 1 + 4k and H, W
        multiples of 8 -> latents [B, k+1, C, H/8, W/8], normalised (the posterior's mode,
        no sampling)."""
        if frames.dim() != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [B, T, H, W, 3], got {tuple(frames.shape)}")
        t, h, w = frames.shape[1:4]
        if t < 1 or (t - 1) % TEMPORAL_FACTOR:
            raise ValueError(f"the Wan VAE encodes 1 + 4k frames (1, 5, 9, ...), got {t}")
        if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
            raise ValueError(f"frame height and width must be multiples of {SPATIAL_FACTOR}, got {h}x{w}")
        if frames.dtype == torch.uint8:
            x = frames.to(self.device).float() / 127.5 - 1
        elif frames.is_floating_point():
            lo, hi = frames.aminmax()
            if lo < -1.001 or hi > 1.001:
                raise ValueError(f"float frames must lie in [-1, 1], got [{lo.item():.3g}, {hi.item():.3g}]")
            x = frames.to(self.device).float()
        else:
            raise ValueError(f"frames must be uint8 or float, got {frames.dtype}")
        x = x.permute(0, 4, 1, 2, 3).to(self.dtype)
        raw = self.model.encode(x, return_dict=False)[0].mode()
        return self.normalize(raw)

    def stream_decoder(self) -> StreamingDecoder:
        """A decoder for one video (batch) decoded block by block."""
        return StreamingDecoder(self)


class PendingFrames:
    """Decoded frames on their way to host memory: ``result()`` waits (the host only,
    for this decode only) and returns them, uint8 ``[B, F', 8H, 8W, 3]`` on the CPU."""

    def __init__(self, frames: torch.Tensor, done: "torch.cuda.Event | None") -> None:
        self._frames, self._done = frames, done

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._frames


class StreamingDecoder:
    """Decodes one latent video block by block with the causal-conv cache kept between
    blocks: ``cat([decode_block(b) for b in blocks], dim=1) == vae.decode(cat(blocks, 1))``.

    The first block's first latent frame gives 1 frame, every other latent frame 4.
    The batch size is fixed by the first block. One decoder per video: start a new one
    (``vae.stream_decoder()``) for the next.

    On CUDA the decode runs on the decoder's own stream, after the work already queued
    on the caller's stream (which produced the latents). ``decode_block`` then makes the
    caller's stream wait for it (results in program order); ``decode_block_async``
    does not: the frames come to pinned host memory on the decoder's stream, and only
    the host waits for them (``PendingFrames.result``), so the decode of block n runs
    while the caller's stream computes block n + 1.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        causal_conv = type(vae.model.post_quant_conv)
        self._cache: list = [None] * sum(isinstance(m, causal_conv) for m in vae.model.decoder.modules())
        self.latent_frames = 0
        self.batch: int | None = None
        self._stream = torch.cuda.Stream(vae.device) if vae.device.type == "cuda" else None

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor, as_float: bool = False) -> torch.Tensor:
        """latents [B, F, C, H, W] (the next F latent frames) -> frames uint8
        [B, F', 8H, 8W, 3] (F' = 4F - 3 for the first block, 4F after), or float in
        [-1, 1] with ``as_float``."""
        _check_latents(latents, self.vae.channels)
        if self.batch is not None and latents.shape[0] != self.batch:
            raise ValueError(f"a streaming decoder decodes one batch: got {latents.shape[0]} videos, "
                             f"its first block had {self.batch}")
        if self._stream is None:
            video = self._decode(latents)
        else:
            caller = torch.cuda.current_stream(self._stream.device)
            self._stream.wait_stream(caller)
            with torch.cuda.stream(self._stream):
                video = self._decode(latents)
            caller.wait_stream(self._stream)
            video.record_stream(caller)
        self.batch = latents.shape[0]
        return _to_float(video) if as_float else _to_uint8(video)

    @torch.no_grad()
    def decode_block_async(self, latents: torch.Tensor) -> "PendingFrames":
        """Like ``decode_block`` (uint8 frames), but the caller's stream does not wait:
        the frames arrive in host memory (pinned on CUDA) when ``result()`` says so.
        Blocks must still be given in order; each waits for the caller's work queued
        before it (the latents)."""
        if self._stream is None:
            return PendingFrames(self.decode_block(latents).cpu(), None)
        _check_latents(latents, self.vae.channels)
        if self.batch is not None and latents.shape[0] != self.batch:
            raise ValueError(f"a streaming decoder decodes one batch: got {latents.shape[0]} videos, "
                             f"its first block had {self.batch}")
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        latents.record_stream(self._stream)   # the caller may free them before the decode ran
        with torch.cuda.stream(self._stream):
            video = _to_uint8(self._decode(latents))
            host = torch.empty(video.shape, dtype=video.dtype, pin_memory=True)
            host.copy_(video, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self.batch = latents.shape[0]
        return PendingFrames(host, done)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The loop of diffusers' ``AutoencoderKLWan._decode``, with a cache that outlives it."""
        model = self.vae.model
        x = model.post_quant_conv(self.vae.denormalize(latents).to(self.vae.dtype))
        outputs = []
        for i in range(x.shape[2]):
            outputs.append(model.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=[0],
                                         first_chunk=self.latent_frames == 0))
            self.latent_frames += 1
        return torch.cat(outputs, dim=2).float().clamp(-1, 1)
