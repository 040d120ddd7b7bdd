"""FP8 (e4m3) storage of history pages: quantisation on the way into the history,
dequantisation on the way out (the splice kernel does it on the fly; the functions
here are the float32 reference and the write path).

A page ``[N, H, D]`` (one frame of one layer of one stream, K or V) is stored as
``float8_e4m3fn`` codes ``q`` and one float32 scale per head ``s[h]``:

    s[h] = max(|x[:, h, :]|) / 448        (1 when the head is all zeros)
    q[n, h, d] = e4m3(x[n, h, d] / s[h])  (round to nearest even, |q| <= 448)
    x ~ float(q[n, h, d]) * s[h]

448 is the largest finite e4m3fn value, so no code saturates. An entry with
``|x| >= s[h] * 2**-6`` lands in e4m3's normal range and is off by at most 2**-4 of
itself (half a unit in the last of 3 mantissa bits); a smaller one lands in the
subnormals and is off by at most ``s[h] * 2**-10``.

History dtypes are named by :data:`HISTORY_DTYPES`: None (the compute dtype, stored
as is) or "fp8_e4m3".
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
HISTORY_DTYPES = (None, "fp8_e4m3")


def storage_dtype(history_dtype: str | None, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype history pages are stored in: the compute dtype, or float8_e4m3fn."""
    if history_dtype is None:
        return compute_dtype
    if history_dtype == "fp8_e4m3":
        return FP8
    raise ValueError(f"history_dtype must be one of {HISTORY_DTYPES}, got {history_dtype!r}")


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages ``x [..., N, H, D]`` (any float dtype) -> (codes ``[..., N, H, D]``
    float8_e4m3fn, scales ``[..., H]`` float32), one scale per page and head."""
    if x.dim() < 3 or not x.is_floating_point():
        raise ValueError(f"quantize_fp8: x must be floating [..., N, H, D], got {x.dtype} {tuple(x.shape)}")
    xf = x.float()
    amax = xf.abs().amax(dim=(-3, -1))                                  # [..., H]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (xf / scale.unsqueeze(-2).unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float32 reference of the splice kernel's decode: ``codes [..., N, H, D]``
    (float8_e4m3fn), ``scale [..., H]`` -> ``[..., N, H, D]`` in ``dtype`` (computed in
    float32, rounded once)."""
    if codes.dtype != FP8 or codes.dim() < 3 or scale.shape != codes.shape[:-3] + codes.shape[-2:-1]:
        raise ValueError(f"dequantize_fp8: codes must be float8_e4m3fn [..., N, H, D] and scale [..., H], got "
                         f"{codes.dtype} {tuple(codes.shape)} / {tuple(scale.shape)}")
    return (codes.float() * scale.float().unsqueeze(-2).unsqueeze(-1)).to(dtype)


def fp8_page_bytes(tokens_per_frame: int, num_heads: int, head_dim: int) -> int:
    """K+V bytes of one FP8 page: codes plus one float32 scale per head, K and V each."""
    return 2 * (tokens_per_frame * num_heads * head_dim + 4 * num_heads)


__all__ = ["FP8", "FP8_MAX", "HISTORY_DTYPES", "storage_dtype", "quantize_fp8", "dequantize_fp8",
           "fp8_page_bytes"]
