"""Causal Wan 2.1 DiT backbone (SPEC section 2) with the public parameter names.

The model computes everything except self-attention: the engine owns the KV caches and
RoPE, so each block hands its RMS-normed, *un-rotated* q/k/v to a callable and applies
``o`` to what comes back. Cross-attention K/V depend only on the text, so
:meth:`WanModel.encode_text` computes them once per prompt.

Precision follows Wan: the residual stream, every LayerNorm and all modulation
arithmetic (shift / scale / gate) run in float32; Linear layers run in the weight
dtype (float32, bfloat16 or float16).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrag_engine.attention.backend import AttendFn, get_backend
from lrag_engine.config import ModelConfig, resolve_dtype

SelfAttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""``self_attention(layer, q, k, v) -> out``; q/k/v/out ``[B, F*N, H, Dh]``."""

CrossKV = list[tuple[Tensor, Tensor]]
"""Per layer ``(k, v)`` of the cross-attention, each ``[B, text_len, H, Dh]``."""


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Timesteps ``[n]`` -> ``[n, dim]`` float32 ``[cos(t*w_i), sin(t*w_i)]``, ``w_i = 10000^(-i/half)``.

    Computed in float64 as Wan does: at t ~ 1000 a float32 angle loses the low bits
    that the high-frequency components depend on.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def _layer_norm_f32(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm in float32 whatever the weight dtype; returns float32."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


class WanRMSNorm(nn.Module):
    """RMS norm over the last dim with a learned weight; normalises in float32, returns x's dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class WanAttention(nn.Module):
    """Projections of one attention (self or cross): q, k, v, o and the q/k RMS norms."""

    def __init__(self, dim: int, num_heads: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, dtype=dtype)
        self.k = nn.Linear(dim, dim, dtype=dtype)
        self.v = nn.Linear(dim, dim, dtype=dtype)
        self.o = nn.Linear(dim, dim, dtype=dtype)
        self.norm_q = WanRMSNorm(dim, eps, dtype)
        self.norm_k = WanRMSNorm(dim, eps, dtype)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def project_q(self, x: Tensor) -> Tensor:
        """``[B, L, dim]`` -> RMS-normed q ``[B, L, H, Dh]``."""
        return self._heads(self.norm_q(self.q(x)))

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, L, dim]`` -> (RMS-normed k, v), each ``[B, L, H, Dh]``."""
        return self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))


class WanAttentionBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = WanAttention(dim, config.num_heads, eps, dtype)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True, dtype=dtype)
        self.cross_attn = WanAttention(dim, config.num_heads, eps, dtype)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim, dtype=dtype), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim, dtype=dtype))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim, dtype=dtype))

    def forward(self, x: Tensor, e0: Tensor, layer: int, self_attention: SelfAttentionFn,
                cross_k: Tensor, cross_v: Tensor, cross_attend: AttendFn) -> Tensor:
        """x ``[B, F, N, dim]`` float32 residual stream, e0 ``[B, F, 6, dim]`` float32 -> new x."""
        b, f, n, dim = x.shape
        dtype = self.modulation.dtype
        e = (self.modulation.float() + e0).unsqueeze(3)  # [B, F, 6, 1, dim]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = e.unbind(2)

        h = (_layer_norm_f32(self.norm1, x) * (1 + scale_msa) + shift_msa).to(dtype).reshape(b, f * n, dim)
        q = self.self_attn.project_q(h)
        k, v = self.self_attn.project_kv(h)
        y = self_attention(layer, q, k, v)
        if not isinstance(y, Tensor) or y.shape != q.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"self_attention(layer={layer}) must return {tuple(q.shape)} "
                             f"[B, F*N, H, Dh], got {got}")
        y = self.self_attn.o(y.to(dtype).flatten(2))
        x = x + gate_msa * y.float().view(b, f, n, dim)

        h = _layer_norm_f32(self.norm3, x).to(dtype).reshape(b, f * n, dim)
        y = cross_attend(self.cross_attn.project_q(h), cross_k, cross_v)
        y = self.cross_attn.o(y.to(dtype).flatten(2))
        x = x + y.float().view(b, f, n, dim)

        h = (_layer_norm_f32(self.norm2, x) * (1 + scale_mlp) + shift_mlp).to(dtype)
        return x + gate_mlp * self.ffn(h).float()


class WanHead(nn.Module):
    """Output head: modulated LayerNorm then a Linear to ``prod(patch) * out_channels`` per token."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, math.prod(config.patch_size) * config.out_channels, dtype=dtype)
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim, dtype=dtype))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x ``[B, F, N, dim]`` float32, e ``[B, F, dim]`` float32 time embedding -> ``[B, F, N, out]`` float32."""
        mod = (self.modulation.float() + e.unsqueeze(2)).unsqueeze(3)  # [B, F, 2, 1, dim]
        shift, scale = mod.unbind(2)
        h = _layer_norm_f32(self.norm, x) * (1 + scale) + shift
        return self.head(h.to(self.head.weight.dtype)).float()


class WanModel(nn.Module):
    """Wan 2.1 causal DiT.

    Args:
        config: shapes; ``config.height``/``config.width`` fix the latent frame size.
        dtype: weight dtype (float32, bfloat16, float16 or their names).
        device: where the parameters live; default: torch's current default device, so
            ``with torch.device("meta"): WanModel(cfg)`` builds without allocating.
        attention_backend: cross-attention backend name for
            :func:`lrag_engine.attention.backend.get_backend` ("sdpa", "auto", ...), or an
            attend callable ``(q, k, v) -> out`` on ``[B, L, H, Dh]``.
        seed: seed of :meth:`init_random`, run unless the device is ``meta``.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str | None = None, attention_backend: str | AttendFn = "sdpa",
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"WanModel needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        # The finiteness check of forward() syncs the host; a caller that validated its
        # inputs up front (the Engine) turns it off for the hot loop.
        self.check_finite = True
        dtype = resolve_dtype(dtype)
        device = torch.get_default_device() if device is None else torch.device(device)
        dim = config.dim
        # Built on meta then materialised once: the default PyTorch init of 1.4e9
        # parameters would cost seconds only to be overwritten by init_random.
        with torch.device("meta"):
            self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                             stride=config.patch_size, dtype=dtype)
            self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim, dtype=dtype),
                                                nn.GELU(approximate="tanh"), nn.Linear(dim, dim, dtype=dtype))
            self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim, dtype=dtype), nn.SiLU(),
                                                nn.Linear(dim, dim, dtype=dtype))
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, dtype=dtype))
            self.blocks = nn.ModuleList(WanAttentionBlock(config, dtype) for _ in range(config.num_layers))
            self.head = WanHead(config, dtype)
        self.to_empty(device=device)
        self.set_attention_backend(attention_backend)
        if device.type != "meta":
            self.init_random(seed)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def set_attention_backend(self, backend: str | AttendFn) -> None:
        """Pick the cross-attention function for the current device and dtype (call again after ``.to()``)."""
        if callable(backend):
            self.attention_backend, self.cross_attend = getattr(backend, "__name__", "custom"), backend
        else:
            self.attention_backend, self.cross_attend = get_backend(backend, self.device, self.dtype)

    @torch.no_grad()
    def init_random(self, seed: int) -> "WanModel":
        """Seeded random weights giving O(1) outputs; the same seed on the same device type
        gives the same weights.

        Matrices: Xavier-uniform (the conv weight over its flattened ``C*pt*ph*pw`` fan-in).
        Biases: N(0, 0.02). RMS/LayerNorm weights: 1 + N(0, 0.1). Modulations:
        N(0, 1/dim) as in Wan. Nothing is zero, so every term of the forward is exercised.
        """
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def normal(shape, std, mean=0.0):
            return torch.randn(shape, generator=gen, device=self.device) * std + mean

        for name, param in self.named_parameters():
            shape = param.shape
            if name.endswith("modulation"):
                value = normal(shape, self.config.dim ** -0.5)
            elif param.dim() >= 2:
                fan_in, fan_out = math.prod(shape[1:]), shape[0]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                value = torch.rand(shape, generator=gen, device=self.device) * (2 * bound) - bound
            elif "norm" in name and name.endswith("weight"):
                value = normal(shape, 0.1, mean=1.0)
            else:
                value = normal(shape, 0.02)
            param.copy_(value)
        return self

    # ------------------------------------------------------------------ text
    def encode_text(self, text: Tensor) -> CrossKV:
        """Text embeddings ``[B, L, text_dim]`` (``L <= text_len``) -> per layer the cross-attention
        ``(k, v)``, each ``[B, text_len, H, Dh]`` in the weight dtype (k after ``norm_k``).

        The text is zero-padded to ``text_len`` before ``text_embedding``; the padded positions
        are attended like any other (as Wan does).
        """
        cfg = self.config
        if not isinstance(text, Tensor) or text.dim() != 3 or text.shape[-1] != cfg.text_dim \
                or not 1 <= text.shape[1] <= cfg.text_len or text.shape[0] < 1:
            got = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"text must be [B, L, text_dim={cfg.text_dim}] with 1 <= L <= "
                             f"text_len={cfg.text_len}, got {got}")
        if not torch.isfinite(text).all():
            raise ValueError("text embeddings contain NaN or inf")
        padded = F.pad(text.to(self.device, self.dtype), (0, 0, 0, cfg.text_len - text.shape[1]))
        context = self.text_embedding(padded)
        return [block.cross_attn.project_kv(context) for block in self.blocks]

    # ------------------------------------------------------------- patching
    def patchify(self, x: Tensor) -> Tensor:
        """Latents ``[B, F, C, H, W]`` -> tokens ``[B, F*N, dim]`` in the weight dtype, order
        frame-major then row-major (h, w). Same as the Conv3d, written as one matmul."""
        b, f, c, hh, ww = x.shape
        _, ph, pw = self.config.patch_size
        patches = x.to(self.dtype).view(b, f, c, hh // ph, ph, ww // pw, pw)
        patches = patches.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f * (hh // ph) * (ww // pw), c * ph * pw)
        return F.linear(patches, self.patch_embedding.weight.flatten(1), self.patch_embedding.bias)

    def unpatchify(self, out: Tensor, frames: int) -> Tensor:
        """Head output ``[B, F*N, ph*pw*C]`` (C fastest) -> ``[B, F, C, H, W]``."""
        cfg = self.config
        _, ph, pw = cfg.patch_size
        gh, gw = cfg.height // ph, cfg.width // pw
        u = out.view(out.shape[0], frames, gh, gw, ph, pw, cfg.out_channels)
        return u.permute(0, 1, 6, 2, 4, 3, 5).reshape(out.shape[0], frames, cfg.out_channels,
                                                       cfg.height, cfg.width)

    # --------------------------------------------------------------- forward
    def time_embeddings(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame timesteps ``[B, F]`` -> (e ``[B, F, dim]``, e0 ``[B, F, 6, dim]``), float32."""
        b, f = timestep.shape
        sinus = sinusoidal_embedding(timestep.reshape(-1), self.config.freq_dim).to(self.device, self.dtype)
        e = self.time_embedding(sinus)
        e0 = self.time_projection(e).float().view(b, f, 6, self.config.dim)
        return e.float().view(b, f, self.config.dim), e0

    def forward(self, x: Tensor, timestep: Tensor, cross_kv: CrossKV,
                self_attention: SelfAttentionFn) -> Tensor:
        """Predict the flow ``noise - x0``.

        Args:
            x: noisy latents ``[B, F, C, H, W]``.
            timestep: per-frame timesteps ``[B, F]`` (0..1000 scale).
            cross_kv: :meth:`encode_text` output for the same batch.
            self_attention: ``self_attention(layer, q, k, v) -> out``; q, k, v ``[B, F*N, H, Dh]``
                in the weight dtype, q and k RMS-normed and not rotated, tokens frame-major
                then row-major (h, w); must return ``[B, F*N, H, Dh]``.
        Returns:
            flow ``[B, F, C, H, W]`` float32.
        """
        self._check_inputs(x, timestep, cross_kv)
        b, f = x.shape[:2]
        n = self.config.tokens_per_frame
        tokens = self.patchify(x.to(self.device)).float().view(b, f, n, self.config.dim)
        e, e0 = self.time_embeddings(timestep.to(self.device))
        for layer, (block, (ck, cv)) in enumerate(zip(self.blocks, cross_kv)):
            tokens = block(tokens, e0, layer, self_attention, ck, cv, self.cross_attend)
        return self.unpatchify(self.head(tokens, e).view(b, f * n, -1), f)

    def _check_inputs(self, x: Tensor, timestep: Tensor, cross_kv: CrossKV) -> None:
        cfg = self.config
        expected = f"[B, F, C={cfg.in_channels}, H={cfg.height}, W={cfg.width}]"
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[2:]) != (
                cfg.in_channels, cfg.height, cfg.width) or x.shape[0] < 1 or x.shape[1] < 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be {expected} with B, F >= 1, got {got}")
        b, f = x.shape[:2]
        if not isinstance(timestep, Tensor) or tuple(timestep.shape) != (b, f):
            got = tuple(timestep.shape) if isinstance(timestep, Tensor) else type(timestep).__name__
            raise ValueError(f"timestep must be per frame [B={b}, F={f}], got {got}")
        if not isinstance(cross_kv, (list, tuple)) or len(cross_kv) != cfg.num_layers:
            got = len(cross_kv) if isinstance(cross_kv, (list, tuple)) else type(cross_kv).__name__
            raise ValueError(f"cross_kv must hold one (k, v) per layer ({cfg.num_layers}), got {got}")
        kv_shape = (b, cfg.text_len, cfg.num_heads, cfg.head_dim)
        for layer, pair in enumerate(cross_kv):
            if len(pair) != 2 or any(not isinstance(t, Tensor) or tuple(t.shape) != kv_shape for t in pair):
                got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in pair]
                raise ValueError(f"cross_kv[{layer}] must be (k, v) of shape {kv_shape}, got {got}")
        # A finiteness check syncs the host; inside CUDA graph capture that is illegal, and the
        # captured inputs were checked on the eager warm-up run anyway.
        if not self.check_finite or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        if not bool(torch.isfinite(x).all() & torch.isfinite(timestep).all()):
            bad = "x" if not torch.isfinite(x).all() else "timestep"
            raise ValueError(f"{bad} contains NaN or inf")
