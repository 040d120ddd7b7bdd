"""One pass per forward over the block's q, k, v: rotate q and k, store the block's
K/V where the attention and the window need them.

Each forward of each layer rotates the block's q and k by their RoPE positions, writes
rotated K and V at the tail of the layer's context, and on the recache pass also
stores the un-rotated K and V into the block's window slots (or into a staging area
that a static forward can address). Done as separate PyTorch ops that is about nine
elementwise passes per tensor; the kernel reads q, k, v once and writes each output
once.

Semantics (kernel and reference alike): for token ``t`` and pair ``j`` of a head,
``x'[2j] = x[2j] cos[t, j] - x[2j+1] sin[t, j]``, ``x'[2j+1] = x[2j] sin[t, j] +
x[2j+1] cos[t, j]``, computed in float32 and stored in the input dtype.
"""
from __future__ import annotations

import torch

from lrag_engine.ops.dispatch import HAS_TRITON, check_kernel_runnable, next_power_of_2, tl, triton, use_triton
from lrag_engine.ops.rope import apply_rope_ref

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Pairs per tile: 64 pairs are 128 contiguous elements of a token row (256 bytes in
# 16-bit), a full sector run per warp; at 12 heads x 128 dims a row is 12 such chunks,
# so no lane is masked at the Wan shapes.
BLOCK_PAIRS = 64
# Tokens per tile: 16 x 128 elements x 3 inputs keeps about 24 values per thread in
# flight on 4 warps.
BLOCK_TOKENS = 16
# The interpreter pays per program, not per element: larger tiles keep the CPU tests short.
INTERPRETER_BLOCK_TOKENS = 64

if HAS_TRITON:
    @triton.jit
    def _rotate(b_x, b_cos, b_sin):
        """[BT, BP, 2] pairs -> rotated pairs in float32."""
        b_even, b_odd = tl.split(b_x.to(tl.float32))
        return tl.join(b_even * b_cos - b_odd * b_sin, b_even * b_sin + b_odd * b_cos)

    @triton.jit
    def _rope_store_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ck_ptr, cv_ptr, rk_ptr, rv_ptr, slot_ptr,
        T, N, P,
        stride_qb, stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_ct, stride_cj, stride_st, stride_sj,
        stride_ob, stride_ot, stride_oh, stride_od,
        stride_ckb, stride_ckt, stride_ckh, stride_ckd,
        stride_cvb, stride_cvt, stride_cvh, stride_cvd,
        stride_rkb, stride_rkf, stride_rkn, stride_rkh, stride_rkd,
        stride_rvb, stride_rvf, stride_rvn, stride_rvh, stride_rvd,
        stride_slot,
        HALF: tl.constexpr, HAS_RAW: tl.constexpr, HAS_SLOTS: tl.constexpr,
        BT: tl.constexpr, BP: tl.constexpr,
    ):
        i_t = tl.program_id(0).to(tl.int64)
        i_p = tl.program_id(1).to(tl.int64)
        i_b = tl.program_id(2).to(tl.int64)
        o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)
        o_p = i_p * BP + tl.arange(0, BP).to(tl.int64)
        o_h = o_p // HALF
        o_j = o_p % HALF
        o_e = tl.arange(0, 2).to(tl.int64)
        m_tp = (o_t < T)[:, None] & (o_p < P)[None, :]
        m = m_tp[:, :, None] & (o_e < 2)[None, None, :]
        # [BT, BP]
        b_cos = tl.load(cos_ptr + o_t[:, None] * stride_ct + o_j[None, :] * stride_cj, mask=m_tp, other=0.0)
        b_sin = tl.load(sin_ptr + o_t[:, None] * stride_st + o_j[None, :] * stride_sj, mask=m_tp, other=0.0)

        # Element offsets of the pair (2j, 2j+1) of head h at token t: [BT, BP, 2].
        o_q = (o_t[:, None] * stride_qt + o_h[None, :] * stride_qh + 2 * o_j[None, :] * stride_qd)[:, :, None] \
            + o_e[None, None, :] * stride_qd
        o_k = (o_t[:, None] * stride_kt + o_h[None, :] * stride_kh + 2 * o_j[None, :] * stride_kd)[:, :, None] \
            + o_e[None, None, :] * stride_kd
        o_v = (o_t[:, None] * stride_vt + o_h[None, :] * stride_vh + 2 * o_j[None, :] * stride_vd)[:, :, None] \
            + o_e[None, None, :] * stride_vd
        # [BT, BP, 2]
        b_q = tl.load(q_ptr + i_b * stride_qb + o_q, mask=m, other=0.0)
        b_k = tl.load(k_ptr + i_b * stride_kb + o_k, mask=m, other=0.0)
        b_v = tl.load(v_ptr + i_b * stride_vb + o_v, mask=m, other=0.0)

        o_o = (o_t[:, None] * stride_ot + o_h[None, :] * stride_oh + 2 * o_j[None, :] * stride_od)[:, :, None] \
            + o_e[None, None, :] * stride_od
        b_qr = _rotate(b_q, b_cos, b_sin)
        tl.store(qo_ptr + i_b * stride_ob + o_o, b_qr.to(qo_ptr.dtype.element_ty), mask=m)
        o_ck = (o_t[:, None] * stride_ckt + o_h[None, :] * stride_ckh + 2 * o_j[None, :] * stride_ckd)[:, :, None] \
            + o_e[None, None, :] * stride_ckd
        b_kr = _rotate(b_k, b_cos, b_sin)
        tl.store(ck_ptr + i_b * stride_ckb + o_ck, b_kr.to(ck_ptr.dtype.element_ty), mask=m)
        o_cv = (o_t[:, None] * stride_cvt + o_h[None, :] * stride_cvh + 2 * o_j[None, :] * stride_cvd)[:, :, None] \
            + o_e[None, None, :] * stride_cvd
        tl.store(cv_ptr + i_b * stride_cvb + o_cv, b_v, mask=m)

        if HAS_RAW:
            # Token t is token t % N of the block's frame t // N; that frame's row in the
            # destination is its window slot (or the frame itself for a staging area).
            o_f = o_t // N
            o_n = o_t % N
            if HAS_SLOTS:
                o_f = tl.load(slot_ptr + o_f * stride_slot, mask=o_t < T, other=0)
            o_rk = (o_f[:, None] * stride_rkf + o_n[:, None] * stride_rkn + o_h[None, :] * stride_rkh
                    + 2 * o_j[None, :] * stride_rkd)[:, :, None] + o_e[None, None, :] * stride_rkd
            tl.store(rk_ptr + i_b * stride_rkb + o_rk, b_k, mask=m)
            o_rv = (o_f[:, None] * stride_rvf + o_n[:, None] * stride_rvn + o_h[None, :] * stride_rvh
                    + 2 * o_j[None, :] * stride_rvd)[:, :, None] + o_e[None, None, :] * stride_rvd
            tl.store(rv_ptr + i_b * stride_rvb + o_rv, b_v, mask=m)


def _check(q, k, v, cos, sin, ctx_k, ctx_v, raw_k, raw_v, slots) -> None:
    if q.dim() != 4:
        raise ValueError(f"rope_store: q must be [B, T, H, D], got {tuple(q.shape)}")
    batch, tokens, heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"rope_store: head_dim must be even (RoPE rotates pairs), got {head_dim}")
    for name, t in (("k", k), ("v", v), ("ctx_k", ctx_k), ("ctx_v", ctx_v)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"rope_store: {name} must be [B, T, H, D]={tuple(q.shape)} like q, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("ctx_k", ctx_k), ("ctx_v", ctx_v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"rope_store: {name} dtype {t.dtype} is not one of float32, bfloat16, float16")
        if t.dtype != q.dtype:
            raise ValueError(f"rope_store: {name} dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"rope_store: {name} is on {t.device}, q on {q.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or tuple(t.shape) != (tokens, head_dim // 2):
            raise ValueError(f"rope_store: {name} must be float32 [T={tokens}, D/2={head_dim // 2}], "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"rope_store: {name} is on {t.device}, q on {q.device}")
    if (raw_k is None) != (raw_v is None):
        raise ValueError("rope_store: raw_k and raw_v go together (both or neither)")
    if raw_k is None:
        if slots is not None:
            raise ValueError("rope_store: slots given without raw_k/raw_v")
        return
    if slots is None:
        if tuple(raw_k.shape) != tuple(q.shape) or tuple(raw_v.shape) != tuple(q.shape):
            raise ValueError(f"rope_store: a staging raw_k/raw_v must be [B, T, H, D]={tuple(q.shape)}, got "
                             f"{tuple(raw_k.shape)} and {tuple(raw_v.shape)}")
    else:
        if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64) or slots.device != q.device:
            raise ValueError(f"rope_store: slots must be an int32/int64 [F] tensor on {q.device}, got "
                             f"{slots.dtype} {tuple(slots.shape)} on {slots.device}")
        frames = slots.shape[0]
        if frames == 0 or tokens % frames:
            raise ValueError(f"rope_store: T={tokens} tokens do not split into {frames} frames of slots")
        want = (batch, tokens // frames, heads, head_dim)
        for name, t in (("raw_k", raw_k), ("raw_v", raw_v)):
            if t.dim() != 5 or t.shape[0] != batch or tuple(t.shape[2:]) != want[1:]:
                raise ValueError(f"rope_store: {name} must be a window [B={batch}, W, N={want[1]}, H={heads}, "
                                 f"D={head_dim}], got {tuple(t.shape)}")
    for name, t in (("raw_k", raw_k), ("raw_v", raw_v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"rope_store: {name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")


def rope_store_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   ctx_k: torch.Tensor, ctx_v: torch.Tensor, raw_k: torch.Tensor | None = None,
                   raw_v: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`rope_store` (same arguments and result)."""
    _check(q, k, v, cos, sin, ctx_k, ctx_v, raw_k, raw_v, slots)
    ctx_k.copy_(apply_rope_ref(k, cos, sin))
    ctx_v.copy_(v)
    if raw_k is not None:
        if slots is None:
            raw_k.copy_(k)
            raw_v.copy_(v)
        else:
            b, _, h, d = k.shape
            frames = slots.shape[0]
            raw_k.index_copy_(1, slots, k.reshape(b, frames, -1, h, d))
            raw_v.index_copy_(1, slots, v.reshape(b, frames, -1, h, d))
    return apply_rope_ref(q, cos, sin)


def _rope_store_triton(q, k, v, cos, sin, ctx_k, ctx_v, raw_k, raw_v, slots) -> torch.Tensor:
    batch, tokens, heads, head_dim = q.shape
    q_rot = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() == 0:
        return q_rot
    check_kernel_runnable(_rope_store_kernel, q, "rope_store")
    half = head_dim // 2
    pairs = heads * half
    block_p = min(BLOCK_PAIRS, next_power_of_2(pairs))
    block_t = BLOCK_TOKENS if q.is_cuda else INTERPRETER_BLOCK_TOKENS
    block_t = min(block_t, next_power_of_2(tokens))
    has_raw = raw_k is not None
    if not has_raw:
        rk_strides = rv_strides = (0,) * 5
        frame_tokens = tokens
        raw_k, raw_v = ctx_k, ctx_v     # never written (HAS_RAW is off)
    elif slots is None:
        # A staging area [B, T, H, D] is a window of frames 0..F-1 with one frame of T tokens.
        frame_tokens = tokens
        rk_strides = (raw_k.stride(0), 0, *raw_k.stride()[1:])
        rv_strides = (raw_v.stride(0), 0, *raw_v.stride()[1:])
    else:
        frame_tokens = tokens // slots.shape[0]
        rk_strides, rv_strides = raw_k.stride(), raw_v.stride()
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(pairs, block_p), batch)
    _rope_store_kernel[grid](
        q, k, v, cos, sin, q_rot, ctx_k, ctx_v, raw_k, raw_v, slots if slots is not None else cos,
        tokens, frame_tokens, pairs,
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(), *q_rot.stride(),
        *ctx_k.stride(), *ctx_v.stride(), *rk_strides, *rv_strides,
        slots.stride(0) if slots is not None else 0,
        HALF=half, HAS_RAW=has_raw, HAS_SLOTS=slots is not None, BT=block_t, BP=block_p,
        num_warps=4,
    )
    return q_rot


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               ctx_k: torch.Tensor, ctx_v: torch.Tensor, raw_k: torch.Tensor | None = None,
               raw_v: torch.Tensor | None = None, slots: torch.Tensor | None = None,
               mode: str = "auto") -> torch.Tensor:
    """Rotate the block's q and k, store K/V; returns rotated q.

    Args:
        q, k, v: [B, T, H, D] float32/bfloat16/float16, any strides; T = F frames x N
            tokens, D even. q and k un-rotated.
        cos, sin: float32 [T, D/2], the RoPE of each token's position.
        ctx_k, ctx_v: [B, T, H, D] destinations (the context tail): rotated k, and v.
        raw_k, raw_v: optional destinations of the un-rotated k and v: a window
            [B, W, N, H, D] whose frame rows ``slots`` [F] (int32/int64) receive the
            block's F frames, or with ``slots`` None a staging area [B, T, H, D].
        mode: "auto" | "triton" | "reference" (see ``lrag_engine.ops.dispatch``).

    Returns:
        rotated q, [B, T, H, D] contiguous in q's dtype.
    """
    if not use_triton(q, mode, "rope_store"):
        return rope_store_ref(q, k, v, cos, sin, ctx_k, ctx_v, raw_k, raw_v, slots)
    _check(q, k, v, cos, sin, ctx_k, ctx_v, raw_k, raw_v, slots)
    return _rope_store_triton(q, k, v, cos, sin, ctx_k, ctx_v, raw_k, raw_v, slots)
