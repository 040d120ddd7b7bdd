"""Splice: gather frames from page pools into per-layer attention contexts, rotating K.

A page is one frame of one layer of one stream: ``[N, H, D]`` tokens of un-rotated K
(or V). For context frame ``j`` of layer ``l`` and stream ``b`` the splice reads page
``page_ids[l, b, j]``, rotates its K with 3-D RoPE at temporal index
``positions[b, j]`` and writes it (and the page's V, bit for bit) to tokens
``[(frame_offset + j) * N, (frame_offset + j + 1) * N)`` of ``out[l, b]``. Entries of
-1 leave their output frame untouched, so a padded, fixed-size id buffer keeps the
launch grid constant (CUDA-graph friendly).

RoPE angle of pair ``c`` (of ``D/2``) of token ``t``: ``cos_t[pos, c]`` for
``c < d_t/2``, else ``cos_hw[t, c - d_t/2]`` (see ``lrag_engine.ops.rope``).
"""
from __future__ import annotations

import torch

from lrag_engine.ops.dispatch import HAS_TRITON, check_kernel_runnable, next_power_of_2, tl, triton, use_triton
from lrag_engine.ops.rope import RopeTables, apply_rope_ref

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of one tensor per program: 16 KB of a 16-bit dtype gives each of 128 threads
# several 16-byte accesses per tensor, while the float32 rotation still fits in registers.
TILE_ELEMENTS = 8192

if HAS_TRITON:
    @triton.jit
    def _splice_kernel(
        pk_ptr, pv_ptr, ids_ptr, pos_ptr, cos_t_ptr, sin_t_ptr, cos_hw_ptr, sin_hw_ptr, ok_ptr, ov_ptr,
        B, FC, N, H, frame_offset,
        stride_pkp, stride_pkn, stride_pkh, stride_pkd,
        stride_pvp, stride_pvn, stride_pvh, stride_pvd,
        stride_il, stride_ib, stride_ij, stride_posb, stride_posj, stride_ct, stride_chw,
        stride_okl, stride_okb, stride_okn, stride_okh, stride_okd,
        stride_ovl, stride_ovb, stride_ovn, stride_ovh, stride_ovd,
        DT2: tl.constexpr, D2: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BD2: tl.constexpr,
    ):
        i_f = tl.program_id(0).to(tl.int64)
        i_t = tl.program_id(1).to(tl.int64)
        i_l = i_f // (B * FC)
        i_b = (i_f // FC) % B
        i_j = i_f % FC
        page = tl.load(ids_ptr + i_l * stride_il + i_b * stride_ib + i_j * stride_ij).to(tl.int64)
        if page >= 0:
            pos = tl.load(pos_ptr + i_b * stride_posb + i_j * stride_posj).to(tl.int64)
            o_t = i_t * BT + tl.arange(0, BT)
            o_h = tl.arange(0, BH)
            o_d = tl.arange(0, 2 * BD2)
            o_c = tl.arange(0, BD2)
            m_t = o_t < N
            m_x = m_t[:, None, None] & (o_h < H)[None, :, None] & (o_d < 2 * D2)[None, None, :]
            row = (frame_offset + i_j) * N + o_t

            p_pk = (pk_ptr + page * stride_pkp + o_t[:, None, None] * stride_pkn
                    + o_h[None, :, None] * stride_pkh + o_d[None, None, :] * stride_pkd)
            # [BT, BH, 2*BD2]
            b_k = tl.load(p_pk, mask=m_x, other=0.0)
            b_even, b_odd = tl.split(tl.reshape(b_k.to(tl.float32), [BT, BH, BD2, 2]))

            m_temporal = o_c < DT2
            m_spatial = (o_c >= DT2) & (o_c < D2)
            # [BD2]
            b_cos_t = tl.load(cos_t_ptr + pos * stride_ct + o_c, mask=m_temporal, other=0.0)
            b_sin_t = tl.load(sin_t_ptr + pos * stride_ct + o_c, mask=m_temporal, other=0.0)
            p_hw = o_t[:, None] * stride_chw + (o_c - DT2)[None, :]
            m_hw = m_t[:, None] & m_spatial[None, :]
            # [BT, BD2]
            b_cos = tl.where(m_temporal[None, :], b_cos_t[None, :], tl.load(cos_hw_ptr + p_hw, mask=m_hw, other=0.0))
            b_sin = tl.where(m_temporal[None, :], b_sin_t[None, :], tl.load(sin_hw_ptr + p_hw, mask=m_hw, other=0.0))
            b_cos = b_cos[:, None, :]
            b_sin = b_sin[:, None, :]
            b_rot = tl.join(b_even * b_cos - b_odd * b_sin, b_even * b_sin + b_odd * b_cos)
            b_rot = tl.reshape(b_rot, [BT, BH, 2 * BD2])
            p_ok = (ok_ptr + i_l * stride_okl + i_b * stride_okb + row[:, None, None] * stride_okn
                    + o_h[None, :, None] * stride_okh + o_d[None, None, :] * stride_okd)
            tl.store(p_ok, b_rot.to(ok_ptr.dtype.element_ty), mask=m_x)

            p_pv = (pv_ptr + page * stride_pvp + o_t[:, None, None] * stride_pvn
                    + o_h[None, :, None] * stride_pvh + o_d[None, None, :] * stride_pvd)
            # [BT, BH, 2*BD2]
            b_v = tl.load(p_pv, mask=m_x, other=0.0)
            p_ov = (ov_ptr + i_l * stride_ovl + i_b * stride_ovb + row[:, None, None] * stride_ovn
                    + o_h[None, :, None] * stride_ovh + o_d[None, None, :] * stride_ovd)
            tl.store(p_ov, b_v, mask=m_x)


def _check_inputs(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, frame_offset) -> torch.Tensor:
    """Validate and return ``positions`` as [B, Fc]."""
    if pool_k.dim() != 4 or pool_v.shape != pool_k.shape:
        raise ValueError(f"splice: pool_k/pool_v must be [P, N, H, D] of one shape, got "
                         f"{tuple(pool_k.shape)} / {tuple(pool_v.shape)}")
    _, n, h, d = pool_k.shape
    if pool_k.dtype not in _SUPPORTED_DTYPES or pool_v.dtype != pool_k.dtype:
        raise ValueError(f"splice: pools must share one of float32/bfloat16/float16, got "
                         f"{pool_k.dtype} / {pool_v.dtype}")
    if page_ids.dim() != 3 or page_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"splice: page_ids must be int32/int64 [L, B, Fc], got {page_ids.dtype} "
                         f"{tuple(page_ids.shape)}")
    num_layers, batch, frames = page_ids.shape
    if positions.dtype not in (torch.int32, torch.int64) or positions.shape not in ((batch, frames), (frames,)):
        raise ValueError(f"splice: positions must be int32/int64 [B={batch}, Fc={frames}] or [Fc], got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset < 0:
        raise ValueError(f"splice: frame_offset must be an int >= 0, got {frame_offset!r}")
    need = (frame_offset + frames) * n
    for name, out in (("out_k", out_k), ("out_v", out_v)):
        if out.dim() != 5 or out.shape[:2] != (num_layers, batch) or out.shape[3:] != (h, d) or out.shape[2] < need:
            raise ValueError(f"splice: {name} must be [L={num_layers}, B={batch}, Lctx>={need}, H={h}, D={d}], "
                             f"got {tuple(out.shape)}")
        if out.dtype != pool_k.dtype:
            raise ValueError(f"splice: {name} dtype {out.dtype} differs from the pools' {pool_k.dtype}")
    if tables.tokens_per_frame != n:
        raise ValueError(f"splice: RoPE tables are for {tables.tokens_per_frame} tokens per frame, pages hold {n}")
    if d % 2 or 2 * (tables.cos_t.shape[1] + tables.cos_hw.shape[1]) != d:
        raise ValueError(f"splice: head dim D={d} does not match the RoPE tables "
                         f"(d_t/2={tables.cos_t.shape[1]}, (d_h+d_w)/2={tables.cos_hw.shape[1]})")
    tensors = dict(pool_v=pool_v, page_ids=page_ids, positions=positions, out_k=out_k, out_v=out_v,
                   cos_t=tables.cos_t, sin_t=tables.sin_t, cos_hw=tables.cos_hw, sin_hw=tables.sin_hw)
    for name, t in tensors.items():
        if t.device != pool_k.device:
            raise ValueError(f"splice: {name} is on {t.device}, pool_k on {pool_k.device}")
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(batch, -1)
    # Host-side range checks only where they cost no device sync; CUDA callers are trusted.
    if pool_k.device.type == "cpu" and page_ids.numel():
        lo, hi = int(page_ids.min()), int(page_ids.max())
        if lo < -1 or hi >= pool_k.shape[0]:
            raise ValueError(f"splice: page_ids must lie in [-1, {pool_k.shape[0]}), got [{lo}, {hi}]")
        used = positions.unsqueeze(0).expand(num_layers, -1, -1)[page_ids >= 0]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= tables.max_frames):
            raise ValueError(f"splice: positions must lie in [0, {tables.max_frames}), got "
                             f"[{int(used.min())}, {int(used.max())}]")
    return positions


def splice_ref(pool_k: torch.Tensor, pool_v: torch.Tensor, page_ids: torch.Tensor, positions: torch.Tensor,
               tables: RopeTables, out_k: torch.Tensor, out_v: torch.Tensor, frame_offset: int = 0) -> None:
    """Float32 PyTorch reference of :func:`splice` (same arguments, writes ``out_k``/``out_v``)."""
    positions = _check_inputs(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, frame_offset)
    n = pool_k.shape[1]
    for l, b, j in (page_ids >= 0).nonzero().tolist():
        page = int(page_ids[l, b, j])
        cos, sin = tables.frame_cos_sin(positions[b, j])
        start = (frame_offset + j) * n
        out_k[l, b, start:start + n] = apply_rope_ref(pool_k[page], cos, sin)
        out_v[l, b, start:start + n] = pool_v[page]


def _splice_triton(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, frame_offset) -> None:
    num_layers, batch, frames = page_ids.shape
    _, n, h, d = pool_k.shape
    if page_ids.numel() == 0 or n == 0:
        return
    check_kernel_runnable(_splice_kernel, pool_k, "splice")
    block_h = next_power_of_2(h)
    block_d2 = next_power_of_2(d // 2)
    block_t = max(1, min(next_power_of_2(n), TILE_ELEMENTS // (block_h * 2 * block_d2)))
    grid = (num_layers * batch * frames, -(-n // block_t))
    _splice_kernel[grid](
        pool_k, pool_v, page_ids, positions, tables.cos_t, tables.sin_t, tables.cos_hw, tables.sin_hw,
        out_k, out_v,
        batch, frames, n, h, frame_offset,
        *pool_k.stride(), *pool_v.stride(), *page_ids.stride(), *positions.stride(),
        tables.cos_t.stride(0), tables.cos_hw.stride(0), *out_k.stride(), *out_v.stride(),
        DT2=tables.cos_t.shape[1], D2=d // 2, BT=block_t, BH=block_h, BD2=block_d2,
        num_warps=4,
    )


def splice(pool_k: torch.Tensor, pool_v: torch.Tensor, page_ids: torch.Tensor, positions: torch.Tensor,
           tables: RopeTables, out_k: torch.Tensor, out_v: torch.Tensor, frame_offset: int = 0,
           mode: str = "auto") -> None:
    """Write context frames ``frame_offset .. frame_offset + Fc - 1`` of every layer and stream.

    Args:
        pool_k, pool_v: [P, N, H, D] page pools (un-rotated K, V), float32/bfloat16/float16.
        page_ids: int32/int64 [L, B, Fc]; -1 skips the frame (its output is left untouched).
            Ids are range-checked on CPU tensors only; on CUDA they are trusted.
        positions: int32/int64 [B, Fc] or [Fc]: temporal RoPE index of each context frame,
            in ``[0, tables.max_frames)`` (checked on CPU only, trusted on CUDA).
        tables: RoPE tables on the pools' device, ``tokens_per_frame == N``.
        out_k, out_v: [L, B, Lctx, H, D] in the pools' dtype, ``Lctx >= (frame_offset + Fc) * N``.
            K is rotated in float32 and stored in that dtype; V is copied bit for bit.
        frame_offset: first context frame written.
        mode: "auto" | "triton" | "reference" (see ``lrag_engine.ops.dispatch``).
    """
    if not use_triton(pool_k, mode, "splice"):
        splice_ref(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, frame_offset)
        return
    positions = _check_inputs(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, frame_offset)
    _splice_triton(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, frame_offset)
