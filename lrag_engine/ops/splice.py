"""Splice: gather frames from page pools into per-layer attention contexts, rotating K.

A page is one frame of one layer of one stream: ``[N, H, D]`` tokens of un-rotated K
(or V). For context frame ``j`` of layer ``l`` and stream ``b`` the splice reads page
``page_ids[l, b, j]``, rotates its K with 3-D RoPE at temporal index
``positions[b, j]`` and writes it (and the page's V, bit for bit) to tokens
``[(frame_offset + j) * N, (frame_offset + j + 1) * N)`` of ``out[l, b]``. Entries of
-1 leave their output frame untouched, so a padded, fixed-size id buffer keeps the
launch grid constant (CUDA-graph friendly).

A pool is either one ``[P, N, H, D]`` tensor or a *chunked* pool: a list of chunk
tensors ``[rows_i, N, H, D]`` (``rows_i <= chunk_pages``) that are never copied when
the pool grows. Page ``p`` of a chunked pool is row ``p % chunk_pages`` of chunk
``p // chunk_pages``. On CUDA a chunk may sit in pinned host memory; the kernel then
reads its pages in place over unified virtual addressing (zero-copy: torch's pinned
memory is mapped into the device's address space at its host address).

The kernel addresses every chunk from one base pointer plus a per-chunk element offset
(``(chunk.data_ptr() - base.data_ptr()) // itemsize``), kept in a small int64 tensor
on the kernel's device and cached by the chunks' addresses, so a steady state uploads
nothing (a graph captured with a chunk list must be replayed while its entry is cached:
at most ``_OFFSET_CACHE_SIZE`` distinct chunk lists are kept). The base is the
lowest-address chunk on the kernel's device (offsets >= 0 on the CPU, where the
interpreter works with unsigned addresses); on CUDA, where Triton takes only device
tensors, offsets to pinned host chunks may be negative, and when no chunk is on the
device a one-element device tensor serves as the base.

An FP8 pool (``float8_e4m3fn`` codes, see :mod:`lrag_engine.ops.quant`) comes with
scale pools of the same layout, ``[P, H]`` float32 (or chunks ``[rows_i, H]``): the
kernel decodes each code times its page's per-head scale in float32, rotates K, and
writes K and V in the outputs' (compute) dtype.

RoPE angle of pair ``c`` (of ``D/2``) of token ``t``: ``cos_t[pos, c]`` for
``c < d_t/2``, else ``cos_hw[t, c - d_t/2]`` (see ``lrag_engine.ops.rope``).

:func:`splice_sources` reads up to two pools (:class:`PageSource`) in one launch: a
per-frame source table ``source [Fc]`` on the device says which pool each context
frame's page comes from, so the engine splices a block's sinks and local frames (the
window pool) and its retrieved frames (the history pool) for every layer at once.
:func:`splice` is its one-pool form.

The kernel sees a page as ``N x H`` rows of ``D`` values (row ``t * H + h``): a
program takes a tile of whole rows, so lanes are masked only in a page's last tile
(and past ``D/2`` pairs when ``D/2`` is not a power of two), whatever the head
count; K and V rows are loaded together before either is used.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from lrag_engine.ops.dispatch import HAS_TRITON, check_kernel_runnable, next_power_of_2, tl, triton, use_triton
from lrag_engine.ops.quant import FP8, dequantize_fp8
from lrag_engine.ops.rope import RopeTables, apply_rope_ref
from lrag_engine.runtime.transfer import index_tensor

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Pools may also hold float8_e4m3fn codes with per-page, per-head float32 scales.
# Elements of one tensor per program (a tile of page rows): 16 KB of a 16-bit dtype gives
# each of 128 threads several 16-byte accesses per tensor, while the float32 rotation
# still fits in registers.
TILE_ELEMENTS = 8192
# Most elements of one page tensor the reference gathers and rotates at once.
_REF_BATCH_ELEMENTS = 1 << 24
# Chunk-offset tensors kept per (device, chunk addresses); a pool that grows adds one
# entry per new chunk count, so a few dozen cover any steady state.
_OFFSET_CACHE_SIZE = 64
_offset_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
# One-element base tensors per (device, dtype) for chunk lists with no chunk on the device.
_dummy_bases: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

if HAS_TRITON:
    @triton.jit
    def _load_page_rows(pk_ptr, pv_ptr, off_ptr, sk_ptr, sv_ptr, soff_ptr, page, chunk_pages, n_chunks,
                        stride_kp, stride_kn, stride_kh, stride_kd, stride_vp, stride_vn, stride_vh, stride_vd,
                        stride_sp, o_n, o_h, o_d, m_r, m_x,
                        CHUNKED: tl.constexpr, OFF_ALIGN: tl.constexpr, FP8: tl.constexpr):
        """Rows ``(o_n, o_h)`` of one page of one source: K in float32 and V (float32 when
        decoded from FP8, else the pool's dtype), both loads issued before either is used."""
        if CHUNKED:
            # Page -> (chunk, row); the chunk's element offset from the base pointers, K
            # offsets first, then V offsets. OFF_ALIGN (checked on the host) keeps the
            # loads vectorised though the offsets are only known at run time.
            chunk = page // chunk_pages
            row_p = page - chunk * chunk_pages
            base_k = pk_ptr + tl.multiple_of(tl.load(off_ptr + chunk), OFF_ALIGN)
            base_v = pv_ptr + tl.multiple_of(tl.load(off_ptr + n_chunks + chunk), OFF_ALIGN)
            if FP8:
                base_sk = sk_ptr + tl.load(soff_ptr + chunk)
                base_sv = sv_ptr + tl.load(soff_ptr + n_chunks + chunk)
            else:
                base_sk = sk_ptr
                base_sv = sv_ptr
        else:
            row_p = page
            base_k = pk_ptr
            base_v = pv_ptr
            base_sk = sk_ptr
            base_sv = sv_ptr
        p_k = (base_k + row_p * stride_kp + (o_n * stride_kn + o_h * stride_kh)[:, None]
               + o_d[None, :] * stride_kd)
        p_v = (base_v + row_p * stride_vp + (o_n * stride_vn + o_h * stride_vh)[:, None]
               + o_d[None, :] * stride_vd)
        b_k = tl.load(p_k, mask=m_x, other=0.0)
        b_v = tl.load(p_v, mask=m_x, other=0.0)
        b_k = b_k.to(tl.float32)
        if FP8:
            # e4m3 codes times the page's per-head scale, one per row
            b_sk = tl.load(base_sk + row_p * stride_sp + o_h, mask=m_r, other=1.0)
            b_sv = tl.load(base_sv + row_p * stride_sp + o_h, mask=m_r, other=1.0)
            b_k = b_k * b_sk[:, None]
            b_v = b_v.to(tl.float32) * b_sv[:, None]
        return b_k, b_v

    @triton.jit
    def _splice_kernel(
        ids_ptr, src_ptr, pos_ptr, cos_t_ptr, sin_t_ptr, cos_hw_ptr, sin_hw_ptr, ok_ptr, ov_ptr,
        B, FC, N, H, frame_offset,
        stride_il, stride_ib, stride_ij, stride_src, stride_posb, stride_posj, stride_ct, stride_chw,
        stride_okl, stride_okb, stride_okn, stride_okh, stride_okd,
        stride_ovl, stride_ovb, stride_ovn, stride_ovh, stride_ovd,
        # source 0
        a_pk, a_pv, a_off, a_sk, a_sv, a_soff, a_chunk_pages, a_chunks,
        a_kp, a_kn, a_kh, a_kd, a_vp, a_vn, a_vh, a_vd, a_sp,
        # source 1 (read only when TWO_SOURCES)
        b_pk, b_pv, b_off, b_sk, b_sv, b_soff, b_chunk_pages, b_chunks,
        b_kp, b_kn, b_kh, b_kd, b_vp, b_vn, b_vh, b_vd, b_sp,
        A_CHUNKED: tl.constexpr, A_ALIGN: tl.constexpr, A_FP8: tl.constexpr,
        B_CHUNKED: tl.constexpr, B_ALIGN: tl.constexpr, B_FP8: tl.constexpr, TWO_SOURCES: tl.constexpr,
        DT2: tl.constexpr, D2: tl.constexpr, BR: tl.constexpr, BD2: tl.constexpr,
    ):
        # One program: BR rows of one page, a row being one (token, head) pair of D values,
        # so that no lane is masked but in the page's last tile.
        i_f = tl.program_id(0).to(tl.int64)
        i_r = tl.program_id(1).to(tl.int64)
        i_l = i_f // (B * FC)
        i_b = (i_f // FC) % B
        i_j = i_f % FC
        page = tl.load(ids_ptr + i_l * stride_il + i_b * stride_ib + i_j * stride_ij).to(tl.int64)
        if page >= 0:
            o_r = i_r * BR + tl.arange(0, BR)
            m_r = o_r < N * H
            o_n = o_r // H
            o_h = o_r - o_n * H
            o_d = tl.arange(0, 2 * BD2)
            o_c = tl.arange(0, BD2)
            m_x = m_r[:, None] & (o_d < 2 * D2)[None, :]
            pos = tl.load(pos_ptr + i_b * stride_posb + i_j * stride_posj).to(tl.int64)
            if TWO_SOURCES:
                source = tl.load(src_ptr + i_j * stride_src)
            else:
                source = 0
            if source == 0:
                b_k, b_v = _load_page_rows(
                    a_pk, a_pv, a_off, a_sk, a_sv, a_soff, page, a_chunk_pages, a_chunks,
                    a_kp, a_kn, a_kh, a_kd, a_vp, a_vn, a_vh, a_vd, a_sp, o_n, o_h, o_d, m_r, m_x,
                    A_CHUNKED, A_ALIGN, A_FP8)
                b_v = b_v.to(ov_ptr.dtype.element_ty)
            else:
                b_k, b_v = _load_page_rows(
                    b_pk, b_pv, b_off, b_sk, b_sv, b_soff, page, b_chunk_pages, b_chunks,
                    b_kp, b_kn, b_kh, b_kd, b_vp, b_vn, b_vh, b_vd, b_sp, o_n, o_h, o_d, m_r, m_x,
                    B_CHUNKED, B_ALIGN, B_FP8)
                b_v = b_v.to(ov_ptr.dtype.element_ty)
            row = (frame_offset + i_j) * N + o_n
            p_ov = (ov_ptr + i_l * stride_ovl + i_b * stride_ovb + (row * stride_ovn + o_h * stride_ovh)[:, None]
                    + o_d[None, :] * stride_ovd)
            tl.store(p_ov, b_v, mask=m_x)

            b_even, b_odd = tl.split(tl.reshape(b_k, [BR, BD2, 2]))
            m_temporal = o_c < DT2
            m_spatial = (o_c >= DT2) & (o_c < D2)
            # [BD2]
            b_cos_t = tl.load(cos_t_ptr + pos * stride_ct + o_c, mask=m_temporal, other=0.0)
            b_sin_t = tl.load(sin_t_ptr + pos * stride_ct + o_c, mask=m_temporal, other=0.0)
            p_hw = o_n[:, None] * stride_chw + (o_c - DT2)[None, :]
            m_hw = m_r[:, None] & m_spatial[None, :]
            # [BR, BD2]
            b_cos = tl.where(m_temporal[None, :], b_cos_t[None, :], tl.load(cos_hw_ptr + p_hw, mask=m_hw, other=0.0))
            b_sin = tl.where(m_temporal[None, :], b_sin_t[None, :], tl.load(sin_hw_ptr + p_hw, mask=m_hw, other=0.0))
            b_rot = tl.reshape(tl.join(b_even * b_cos - b_odd * b_sin, b_even * b_sin + b_odd * b_cos), [BR, 2 * BD2])
            p_ok = (ok_ptr + i_l * stride_okl + i_b * stride_okb + (row * stride_okn + o_h * stride_okh)[:, None]
                    + o_d[None, :] * stride_okd)
            tl.store(p_ok, b_rot.to(ok_ptr.dtype.element_ty), mask=m_x)


# ---- pools: one tensor or a chunk list --------------------------------------------------


@dataclass
class _Pools:
    """Validated K/V pools as chunk lists (a plain tensor is one chunk of all its pages)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    chunk_pages: int
    chunked: bool          # given as chunk lists (contiguous chunks), not one tensor
    scale_k: list[torch.Tensor] | None = None   # FP8 pools: [rows_i, H] float32 per chunk
    scale_v: list[torch.Tensor] | None = None

    @property
    def fp8(self) -> bool:
        return self.scale_k is not None

    @property
    def page_shape(self) -> tuple[int, int, int]:
        return tuple(self.k[0].shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def rows(self) -> list[int]:
        return [c.shape[0] for c in self.k]

    @property
    def end(self) -> int:
        """One past the highest page id that can name a stored page (0: no pages)."""
        if not self.k:
            return 0
        return (len(self.k) - 1) * self.chunk_pages + self.k[-1].shape[0]


def _is_chunk_list(pool) -> bool:
    return isinstance(pool, (list, tuple))


def _chunk_list(op: str, name: str, pool, chunk_pages) -> tuple[list[torch.Tensor], int, bool]:
    """``pool`` as (chunks, chunk_pages, chunked), shapes and layout checked per chunk."""
    if isinstance(pool, torch.Tensor):
        if pool.dim() != 4:
            raise ValueError(f"{op}: {name} must be [P, N, H, D], got {tuple(pool.shape)}")
        return [pool], max(pool.shape[0], 1), False
    if not _is_chunk_list(pool):
        raise ValueError(f"{op}: {name} must be a [P, N, H, D] tensor or a list of chunk tensors, "
                         f"got {type(pool).__name__}")
    if isinstance(chunk_pages, bool) or not isinstance(chunk_pages, int) or chunk_pages < 1:
        raise ValueError(f"{op}: chunk_pages must be an int >= 1 when {name} is a chunk list, got {chunk_pages!r}")
    chunks = list(pool)
    for i, c in enumerate(chunks):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"{op}: {name}[{i}] must be a [rows, N, H, D] tensor, got {got}")
        if c.shape[0] > chunk_pages:
            raise ValueError(f"{op}: {name}[{i}] has {c.shape[0]} rows, more than chunk_pages={chunk_pages}")
        if c.shape[1:] != chunks[0].shape[1:]:
            raise ValueError(f"{op}: {name}[{i}] pages are {tuple(c.shape[1:])}, {name}[0] pages "
                             f"{tuple(chunks[0].shape[1:])}")
        if c.dtype != chunks[0].dtype:
            raise ValueError(f"{op}: {name}[{i}] dtype {c.dtype} differs from {name}[0] dtype {chunks[0].dtype}")
        if not c.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}] must be contiguous")
    return chunks, chunk_pages, True


def _check_scales(ks: list[torch.Tensor], scale_k, scale_v, chunked: bool) -> tuple[list, list] | tuple[None, None]:
    """Scale pools of FP8 K/V chunks ``ks``: paired with them chunk by chunk, [rows_i, H]
    float32 on the chunk's device, contiguous."""
    fp8 = bool(ks) and ks[0].dtype == FP8
    if scale_k is None and scale_v is None:
        if fp8:
            raise ValueError("splice: float8_e4m3fn pools need scale_k and scale_v (per-page, per-head scales)")
        return None, None
    if scale_k is None or scale_v is None:
        raise ValueError("splice: scale_k and scale_v must be given together")
    if ks and not fp8:
        raise ValueError(f"splice: scale_k/scale_v belong with float8_e4m3fn pools, the pools are {ks[0].dtype}")
    out = []
    for name, scales in (("scale_k", scale_k), ("scale_v", scale_v)):
        if chunked != _is_chunk_list(scales):
            raise ValueError(f"splice: {name} must be a chunk list exactly when the pools are")
        chunks = list(scales) if chunked else [scales]
        if len(chunks) != len(ks):
            raise ValueError(f"splice: {name} has {len(chunks)} chunks, the pools {len(ks)}")
        for i, (c, page) in enumerate(zip(chunks, ks)):
            want = (page.shape[0], page.shape[2])
            if not isinstance(c, torch.Tensor) or c.dtype != torch.float32 or tuple(c.shape) != want \
                    or c.device != page.device or not c.is_contiguous():
                got = f"{c.dtype} {tuple(c.shape)} on {c.device}" if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"splice: {name}[{i}] must be contiguous float32 {list(want)} on {page.device} "
                                 f"(one scale per page and head), got {got}")
        out.append(chunks)
    return out[0], out[1]


def _check_pools(pool_k, pool_v, chunk_pages, device: torch.device, scale_k=None, scale_v=None) -> _Pools:
    if _is_chunk_list(pool_k) != _is_chunk_list(pool_v):
        raise ValueError("splice: pool_k and pool_v must both be tensors or both chunk lists, got "
                         f"{type(pool_k).__name__} / {type(pool_v).__name__}")
    ks, cp, chunked = _chunk_list("splice", "pool_k", pool_k, chunk_pages)
    vs, _, _ = _chunk_list("splice", "pool_v", pool_v, cp)
    if not chunked:
        if pool_v.shape != pool_k.shape:
            raise ValueError(f"splice: pool_k/pool_v must be [P, N, H, D] of one shape, got "
                             f"{tuple(pool_k.shape)} / {tuple(pool_v.shape)}")
    else:
        if len(vs) != len(ks):
            raise ValueError(f"splice: pool_k has {len(ks)} chunks, pool_v {len(vs)}: K and V chunks must pair up")
        for i, (k, v) in enumerate(zip(ks, vs)):
            if v.shape != k.shape:
                raise ValueError(f"splice: pool_v[{i}] is {tuple(v.shape)}, pool_k[{i}] {tuple(k.shape)}: "
                                 "K and V chunks must pair up")
    if ks and (ks[0].dtype not in (*_SUPPORTED_DTYPES, FP8) or vs[0].dtype != ks[0].dtype):
        raise ValueError(f"splice: pools must share one of float32/bfloat16/float16/float8_e4m3fn, got "
                         f"{ks[0].dtype} / {vs[0].dtype}")
    sk, sv = _check_scales(ks, scale_k, scale_v, chunked)
    for name, chunks in (("pool_k", ks), ("pool_v", vs)):
        for i, c in enumerate(chunks):
            if c.device == device:
                continue
            label = f"{name}[{i}]" if chunked else name
            if not chunked:
                raise ValueError(f"splice: {label} is on {c.device}, out_k on {device}")
            if not (device.type == "cuda" and c.device.type == "cpu" and c.is_pinned()):
                raise ValueError(f"splice: {label} is on {c.device}{' (not pinned)' if c.device.type == 'cpu' else ''},"
                                 f" out_k on {device}: chunks must be on the outputs' device or, for CUDA "
                                 "outputs, in pinned host memory")
    return _Pools(ks, vs, cp, chunked, sk, sv)


def _check_page_range(op: str, pools: _Pools, ids: torch.Tensor, lowest: int) -> None:
    """Range-check host ``ids`` (>= ``lowest``; non-negative ones must name stored rows)."""
    if not ids.numel():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < lowest or hi >= pools.end:
        raise ValueError(f"{op}: page_ids must lie in [{lowest}, {pools.end}), got [{lo}, {hi}]")
    if pools.chunked and min(pools.rows[:-1], default=pools.chunk_pages) < pools.chunk_pages:
        # A chunk short of chunk_pages before the last one leaves ids that name no row.
        used = ids[ids >= 0].long()
        rows = torch.tensor(pools.rows)
        bad = (used % pools.chunk_pages) >= rows[used // pools.chunk_pages]
        if bad.any():
            p = int(used[bad][0])
            c, r = divmod(p, pools.chunk_pages)
            raise ValueError(f"{op}: page id {p} is row {r} of chunk {c}, which holds {pools.rows[c]} pages")


@dataclass(frozen=True)
class PageSource:
    """One page pool that :func:`splice_sources` reads: the arguments ``pool_k``,
    ``pool_v``, ``chunk_pages``, ``scale_k``, ``scale_v`` of :func:`splice`, as one value.

    k, v: [P, N, H, D] tensors or paired lists of contiguous chunks [rows_i, N, H, D].
    chunk_pages: pages per chunk (chunk lists only). scale_k, scale_v: per-page,
    per-head float32 scales of a float8_e4m3fn pool (and only of one).
    """

    k: object
    v: object
    chunk_pages: int | None = None
    scale_k: object = None
    scale_v: object = None


# Most page sources one launch reads.
MAX_SOURCES = 2


def _check_sources(sources, frames: int, source, device: torch.device) -> torch.Tensor | None:
    """``sources`` (1..MAX_SOURCES PageSource) and ``source`` (None or int [Fc])."""
    if not isinstance(sources, (list, tuple)) or not 1 <= len(sources) <= MAX_SOURCES \
            or not all(isinstance(s, PageSource) for s in sources):
        raise ValueError(f"splice: sources must be a list of 1..{MAX_SOURCES} PageSource, got {sources!r:.200}")
    if source is None:
        if len(sources) > 1:
            raise ValueError(f"splice: {len(sources)} sources need a source index per frame (source=[Fc])")
        return None
    if not isinstance(source, torch.Tensor) or source.dtype not in (torch.int32, torch.int64) \
            or tuple(source.shape) != (frames,):
        got = f"{source.dtype} {tuple(source.shape)}" if isinstance(source, torch.Tensor) else type(source).__name__
        raise ValueError(f"splice: source must be an int32/int64 [Fc={frames}] tensor, got {got}")
    if source.device != device:
        raise ValueError(f"splice: source is on {source.device}, out_k on {device}")
    if device.type == "cpu" and source.numel() and (int(source.min()) < 0 or int(source.max()) >= len(sources)):
        raise ValueError(f"splice: source entries must lie in [0, {len(sources)}), got "
                         f"[{int(source.min())}, {int(source.max())}]")
    return source


def _source_ids(page_ids: torch.Tensor, source: torch.Tensor | None, s: int) -> torch.Tensor:
    """``page_ids`` with the frames of sources other than ``s`` set to -1."""
    if source is None:
        return page_ids
    return torch.where(source == s, page_ids, torch.full_like(page_ids, -1))


def _check_inputs(sources, page_ids, source, positions, tables, out_k, out_v,
                  frame_offset) -> tuple[list[_Pools], torch.Tensor, torch.Tensor | None]:
    """Validate; return each source's pools as chunk lists, ``positions`` as [B, Fc] and
    ``source`` (None for one source)."""
    if not isinstance(out_k, torch.Tensor) or not isinstance(out_v, torch.Tensor):
        raise ValueError("splice: out_k and out_v must be tensors")
    device = out_k.device
    if page_ids.dim() != 3 or page_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"splice: page_ids must be int32/int64 [L, B, Fc], got {page_ids.dtype} "
                         f"{tuple(page_ids.shape)}")
    num_layers, batch, frames = page_ids.shape
    source = _check_sources(sources, frames, source, device)
    all_pools = [_check_pools(s.k, s.v, s.chunk_pages, device, s.scale_k, s.scale_v) for s in sources]
    stored = [p for p in all_pools if p.k]
    if stored:
        n, h, d = stored[0].page_shape
        for i, p in enumerate(all_pools):
            if p.k and p.page_shape != (n, h, d):
                raise ValueError(f"splice: source {i} holds pages {tuple(p.page_shape)}, source 0 {(n, h, d)}: "
                                 "every source must hold pages of one shape")
    else:
        # Empty chunk lists only (a pool before its first chunk): every id must be -1.
        n = tables.tokens_per_frame
        h, d = tuple(out_k.shape[3:5]) if out_k.dim() == 5 else (0, 0)
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
        for pools in stored or [None]:
            if pools is None:
                dtype = out_k.dtype
            elif pools.fp8:
                # decoded into the outputs' dtype
                dtype = out_k.dtype if out_k.dtype in _SUPPORTED_DTYPES else torch.float32
            else:
                dtype = pools.dtype
            if out.dtype != dtype:
                what = ("float32/bfloat16/float16 (FP8 pools decode into it)" if pools is not None and pools.fp8
                        else f"the pools' {dtype}")
                raise ValueError(f"splice: {name} dtype {out.dtype} must be {what}")
    if tables.tokens_per_frame != n:
        raise ValueError(f"splice: RoPE tables are for {tables.tokens_per_frame} tokens per frame, pages hold {n}")
    if d % 2 or 2 * (tables.cos_t.shape[1] + tables.cos_hw.shape[1]) != d:
        raise ValueError(f"splice: head dim D={d} does not match the RoPE tables "
                         f"(d_t/2={tables.cos_t.shape[1]}, (d_h+d_w)/2={tables.cos_hw.shape[1]})")
    tensors = dict(page_ids=page_ids, positions=positions, out_v=out_v,
                   cos_t=tables.cos_t, sin_t=tables.sin_t, cos_hw=tables.cos_hw, sin_hw=tables.sin_hw)
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"splice: {name} is on {t.device}, out_k on {device}")
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(batch, -1)
    # Host-side range checks only where they cost no device sync; CUDA callers are trusted.
    if device.type == "cpu" and page_ids.numel():
        for i, pools in enumerate(all_pools):
            op = "splice" if len(all_pools) == 1 else f"splice (source {i})"
            _check_page_range(op, pools, _source_ids(page_ids, source, i), -1)
        used = positions.unsqueeze(0).expand(num_layers, -1, -1)[page_ids >= 0]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= tables.max_frames):
            raise ValueError(f"splice: positions must lie in [0, {tables.max_frames}), got "
                             f"[{int(used.min())}, {int(used.max())}]")
    return all_pools, positions, source


# ---- gathering pages (reference and inspection) ----------------------------------------


def _gather(chunks: list[torch.Tensor], chunk_pages: int, ids: torch.Tensor) -> torch.Tensor:
    """Pages ``ids`` (>= 0, valid) of ``chunks``: ``[*ids.shape, N, H, D]`` on ``ids``' device.

    One indexed read per chunk touched. Syncs the host when the ids are on a device
    and the pool has more than one chunk, or its chunk is elsewhere.
    """
    if chunks[0].dtype == FP8:
        # float8 has no CPU index_put: move the bytes
        return _gather([c.view(torch.uint8) for c in chunks], chunk_pages, ids).view(FP8)
    device = ids.device
    flat = ids.reshape(-1).long()
    if len(chunks) == 1 and chunks[0].device == device:
        return chunks[0][flat].reshape(*ids.shape, *chunks[0].shape[1:])
    out = torch.empty(flat.numel(), *chunks[0].shape[1:], dtype=chunks[0].dtype, device=device)
    host = flat.cpu()
    which = host // chunk_pages
    for c in which.unique().tolist():
        at = (which == c).nonzero().squeeze(1)
        chunk = chunks[c]
        pages = chunk[(host[at] - c * chunk_pages).to(chunk.device)]
        out[at.to(device)] = pages.to(device)
    return out.reshape(*ids.shape, *chunks[0].shape[1:])


def _gather_scales(chunks: list[torch.Tensor], chunk_pages: int, ids: torch.Tensor) -> torch.Tensor:
    """Per-head scales ``[*ids.shape, H]`` of pages ``ids`` (>= 0, valid)."""
    as_pages = [c.view(c.shape[0], 1, c.shape[1], 1) for c in chunks]
    return _gather(as_pages, chunk_pages, ids).view(*ids.shape, chunks[0].shape[1])


def read_scales(scales, page_ids: torch.Tensor, chunk_pages: int | None = None) -> torch.Tensor:
    """Per-head scales ``[*page_ids.shape, H]`` of pages ``page_ids`` of an FP8 pool whose
    scale pool is ``scales`` ([P, H] or chunks [rows_i, H], like :func:`read_pages`)."""
    chunks = [scales] if isinstance(scales, torch.Tensor) else list(scales)
    if not chunks or any(not isinstance(c, torch.Tensor) or c.dim() != 2 for c in chunks):
        raise ValueError("read_scales: scales must be a [P, H] tensor or a non-empty list of [rows, H] chunks")
    cp = chunks[0].shape[0] if isinstance(scales, torch.Tensor) else chunk_pages
    as_pages = [c.view(c.shape[0], 1, c.shape[1], 1) for c in chunks]
    pools = _Pools(as_pages, as_pages, max(cp, 1), not isinstance(scales, torch.Tensor))
    _check_page_range("read_scales", pools, page_ids.cpu(), 0)
    return _gather_scales(chunks, max(cp, 1), page_ids)


def read_pages(pool, page_ids: torch.Tensor, chunk_pages: int | None = None) -> torch.Tensor:
    """Pages ``page_ids`` of a pool, ``[*page_ids.shape, N, H, D]`` on ``page_ids``' device.

    ``pool`` is a ``[P, N, H, D]`` tensor (``chunk_pages`` ignored) or a list of chunk
    tensors ``[rows_i, N, H, D]`` with page ``p`` at row ``p % chunk_pages`` of chunk
    ``p // chunk_pages`` (chunks may sit on different devices, e.g. CUDA and pinned host).
    Ids must be >= 0 and name stored pages. For inspection: it may sync the host (it
    reads the ids there to pick the chunks, and checks them).
    """
    if not isinstance(page_ids, torch.Tensor) or page_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"read_pages: page_ids must be an int32/int64 tensor, got "
                         f"{getattr(page_ids, 'dtype', type(page_ids).__name__)}")
    chunks, cp, chunked = _chunk_list("read_pages", "pool", pool, chunk_pages)
    if not chunks:
        raise ValueError("read_pages: pool is an empty chunk list: no pages to read")
    pools = _Pools(chunks, chunks, cp, chunked)
    _check_page_range("read_pages", pools, page_ids.cpu(), 0)
    return _gather(chunks, cp, page_ids)


# ---- reference ----------------------------------------------------------------------------


def _splice_reference(pools: _Pools, page_ids, positions, tables, out_k, out_v, frame_offset) -> None:
    if pools.end == 0:
        return
    n = pools.page_shape[0]
    device = out_k.device
    sel = (page_ids >= 0).nonzero()
    if not sel.numel():
        return
    layer, stream, frame = sel.unbind(1)
    pages = page_ids[layer, stream, frame]
    batch = max(1, _REF_BATCH_ELEMENTS // max(1, pools.k[0][0].numel()))
    tokens = torch.arange(n, device=device)
    for s in range(0, pages.numel(), batch):
        l, b, j, p = (t[s:s + batch] for t in (layer, stream, frame, pages))
        cos, sin = tables.frame_cos_sin(positions[b, j])     # [m, N, D/2]
        rows = ((frame_offset + j) * n).unsqueeze(1) + tokens  # [m, N]
        l, b = l.unsqueeze(1), b.unsqueeze(1)
        k, v = _gather(pools.k, pools.chunk_pages, p), _gather(pools.v, pools.chunk_pages, p)
        if pools.fp8:
            k = dequantize_fp8(k, _gather_scales(pools.scale_k, pools.chunk_pages, p))
            v = dequantize_fp8(v, _gather_scales(pools.scale_v, pools.chunk_pages, p), out_v.dtype)
        out_k[l, b, rows] = apply_rope_ref(k, cos, sin).to(out_k.dtype)
        out_v[l, b, rows] = v


def _splice_sources_reference(all_pools: list[_Pools], page_ids, source, positions, tables, out_k, out_v,
                              frame_offset) -> None:
    for s, pools in enumerate(all_pools):
        _splice_reference(pools, _source_ids(page_ids, source, s), positions, tables, out_k, out_v, frame_offset)


def splice_ref(pool_k, pool_v, page_ids: torch.Tensor, positions: torch.Tensor, tables: RopeTables,
               out_k: torch.Tensor, out_v: torch.Tensor, frame_offset: int = 0,
               chunk_pages: int | None = None, scale_k=None, scale_v=None) -> None:
    """Float32 PyTorch reference of :func:`splice` (same arguments, writes ``out_k``/``out_v``).

    A test path: it syncs the host (it finds the used ids there) and, on CUDA, copies
    the pages it needs out of pinned host chunks.
    """
    splice_sources([PageSource(pool_k, pool_v, chunk_pages, scale_k, scale_v)], page_ids, None, positions, tables,
                   out_k, out_v, frame_offset, mode="reference")


# ---- kernel launch ----------------------------------------------------------------------


def _base_and_offsets(pools: _Pools, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(K base, V base, int64 [2 * chunks] element offsets of K then V chunks on ``device``,
    the largest power of two up to 16 that divides every offset)."""
    itemsize = pools.dtype.itemsize
    bases = []
    for chunks in (pools.k, pools.v):
        # Empty chunks hold no page to read (and may have no address): never the base.
        local = [c for c in chunks if c.device == device and c.numel()]
        if local:
            bases.append(min(local, key=lambda c: c.data_ptr()))
        else:
            # Only on CUDA (on the CPU every chunk is local, and a pool without pages launches nothing).
            key = (device, pools.dtype)
            if key not in _dummy_bases:
                _dummy_bases[key] = torch.zeros(1, dtype=pools.dtype, device=device)
            bases.append(_dummy_bases[key])
    k_ptrs = tuple(c.data_ptr() for c in pools.k)
    v_ptrs = tuple(c.data_ptr() for c in pools.v)
    key = (device, itemsize, bases[0].data_ptr(), bases[1].data_ptr(), k_ptrs, v_ptrs)
    entry = _offset_cache.get(key)
    if entry is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A captured upload would replay from a staging buffer that is reused later.
            raise RuntimeError("splice: a chunk list first seen during CUDA graph capture; run the splice "
                               "once with these chunks before capturing")
        values = []
        for base, chunks, ptrs in ((bases[0], pools.k, k_ptrs), (bases[1], pools.v, v_ptrs)):
            for c, ptr in zip(chunks, ptrs):
                delta = ptr - base.data_ptr() if c.numel() else 0
                assert delta % itemsize == 0, f"splice: chunk address {ptr:#x} not aligned to its dtype"
                values.append(delta // itemsize)
        align = 16
        while any(v % align for v in values):
            align //= 2
        entry = index_tensor(values, device), align
        _offset_cache[key] = entry
        if len(_offset_cache) > _OFFSET_CACHE_SIZE:
            _offset_cache.popitem(last=False)
    else:
        _offset_cache.move_to_end(key)
    return bases[0], bases[1], *entry


def _source_args(pools: _Pools, device: torch.device, dummy: torch.Tensor) -> tuple[tuple, tuple]:
    """One source's kernel arguments: (runtime arguments, (CHUNKED, ALIGN, FP8))."""
    if not pools.k:
        # No pages: every id of this source is -1, so nothing of it is read.
        return (dummy,) * 6 + (1, 0) + (0,) * 9, (False, 1, False)
    n, h, d = pools.page_shape
    if pools.chunked:
        base_k, base_v, offsets, align = _base_and_offsets(pools, device)
        # Chunks are contiguous; strides from the shape (a one-row chunk may report any stride(0)).
        stride_k = stride_v = (n * h * d, h * d, d, 1)
    else:
        base_k, base_v, offsets, align = pools.k[0], pools.v[0], dummy, 1   # offsets unused
        stride_k, stride_v = pools.k[0].stride(), pools.v[0].stride()
    if pools.fp8 and pools.chunked:
        scales = _Pools(pools.scale_k, pools.scale_v, pools.chunk_pages, True)
        base_sk, base_sv, scale_offsets, _ = _base_and_offsets(scales, device)
    elif pools.fp8:
        base_sk, base_sv, scale_offsets = pools.scale_k[0], pools.scale_v[0], dummy   # offsets unused
    else:
        base_sk = base_sv = scale_offsets = dummy   # unused (FP8=False)
    args = (base_k, base_v, offsets, base_sk, base_sv, scale_offsets, pools.chunk_pages, len(pools.k),
            *stride_k, *stride_v, h if pools.fp8 else 0)
    return args, (pools.chunked, align, pools.fp8)


def _splice_triton(all_pools: list[_Pools], page_ids, source, positions, tables, out_k, out_v,
                   frame_offset) -> None:
    stored = [p for p in all_pools if p.end]
    if page_ids.numel() == 0 or not stored or stored[0].page_shape[0] == 0:
        return
    num_layers, batch, frames = page_ids.shape
    n, h, d = stored[0].page_shape
    check_kernel_runnable(_splice_kernel, out_k, "splice")
    device = out_k.device
    first, first_flags = _source_args(all_pools[0], device, page_ids)
    if len(all_pools) > 1:
        second, second_flags = _source_args(all_pools[1], device, page_ids)
    else:
        second, second_flags = first, first_flags
    two = len(all_pools) > 1
    block_d2 = next_power_of_2(d // 2)
    block_r = max(1, min(next_power_of_2(n * h), TILE_ELEMENTS // (2 * block_d2)))
    grid = (num_layers * batch * frames, -(-(n * h) // block_r))
    _splice_kernel[grid](
        page_ids, source if two else page_ids, positions,
        tables.cos_t, tables.sin_t, tables.cos_hw, tables.sin_hw, out_k, out_v,
        batch, frames, n, h, frame_offset,
        *page_ids.stride(), source.stride(0) if two else 0, *positions.stride(),
        tables.cos_t.stride(0), tables.cos_hw.stride(0), *out_k.stride(), *out_v.stride(),
        *first, *second,
        A_CHUNKED=first_flags[0], A_ALIGN=first_flags[1], A_FP8=first_flags[2],
        B_CHUNKED=second_flags[0], B_ALIGN=second_flags[1], B_FP8=second_flags[2], TWO_SOURCES=two,
        DT2=tables.cos_t.shape[1], D2=d // 2, BR=block_r, BD2=block_d2,
        num_warps=4,
    )


def splice_sources(sources, page_ids: torch.Tensor, source: torch.Tensor | None, positions: torch.Tensor,
                   tables: RopeTables, out_k: torch.Tensor, out_v: torch.Tensor, frame_offset: int = 0,
                   mode: str = "auto") -> None:
    """:func:`splice` over frames from up to two page sources, in one kernel launch.

    Args:
        sources: 1..``MAX_SOURCES`` :class:`PageSource`; each as ``splice``'s pools (a
            plain or chunked pool, FP8 with scales, chunks in pinned host memory); pages of
            one shape [N, H, D]; each non-FP8 source in the outputs' dtype.
        page_ids: int32/int64 [L, B, Fc]: context frame ``j`` reads page ``page_ids[l, b, j]``
            of source ``source[j]``; -1 skips the frame.
        source: int32/int64 [Fc] on the outputs' device, the source index of each context
            frame (entries in ``[0, len(sources))``, checked on CPU only); None with one source.
        positions, tables, out_k, out_v, frame_offset, mode: as :func:`splice`.

    Frame ``j`` of every layer and stream comes from one source, so a block's sink,
    retrieved and local frames (the window pool and the history pool) splice in one
    launch whose ids and source table live on the device (CUDA-graph friendly).
    """
    all_pools, positions, source = _check_inputs(sources, page_ids, source, positions, tables, out_k, out_v,
                                                  frame_offset)
    if use_triton(out_k, mode, "splice"):
        _splice_triton(all_pools, page_ids, source, positions, tables, out_k, out_v, frame_offset)
    else:
        _splice_sources_reference(all_pools, page_ids, source, positions, tables, out_k, out_v, frame_offset)


def splice(pool_k, pool_v, page_ids: torch.Tensor, positions: torch.Tensor, tables: RopeTables,
           out_k: torch.Tensor, out_v: torch.Tensor, frame_offset: int = 0, mode: str = "auto",
           chunk_pages: int | None = None, scale_k=None, scale_v=None) -> None:
    """Write context frames ``frame_offset .. frame_offset + Fc - 1`` of every layer and stream.

    Args:
        pool_k, pool_v: the page pools (un-rotated K, V), float32/bfloat16/float16, or
            float8_e4m3fn codes with ``scale_k``/``scale_v``: either
            [P, N, H, D] tensors on the outputs' device (``chunk_pages`` ignored), or paired
            lists of contiguous chunk tensors [rows_i, N, H, D], ``rows_i <= chunk_pages``,
            page ``p`` at row ``p % chunk_pages`` of chunk ``p // chunk_pages`` (an empty
            list holds no page: every id must then be -1, and nothing is written). A chunk is
            on the outputs' device or, for CUDA outputs, in pinned host memory (the kernel
            reads it in place over UVA; the reference copies the pages it needs).
        page_ids: int32/int64 [L, B, Fc]; -1 skips the frame (its output is left untouched).
            Ids are range-checked on CPU tensors only; on CUDA they are trusted.
        positions: int32/int64 [B, Fc] or [Fc]: temporal RoPE index of each context frame,
            in ``[0, tables.max_frames)`` (checked on CPU only, trusted on CUDA).
        tables: RoPE tables on the outputs' device, ``tokens_per_frame == N``.
        out_k, out_v: [L, B, Lctx, H, D] in the pools' dtype, ``Lctx >= (frame_offset + Fc) * N``.
            K is rotated in float32 and stored in that dtype; V is copied bit for bit.
        frame_offset: first context frame written.
        mode: "auto" | "triton" | "reference" (see ``lrag_engine.ops.dispatch``).
        chunk_pages: pages per chunk; required (int >= 1) with chunk lists.
        scale_k, scale_v: for float8_e4m3fn pools (and only for them): the per-page, per-head
            float32 scales, laid out like the pools ([P, H] tensors, or chunk lists
            [rows_i, H] paired with the pools' chunks, on the same devices). Codes decode
            as ``float(code) * scale`` in float32; K is then rotated, and K and V are
            stored in the outputs' dtype (float32/bfloat16/float16).
    """
    splice_sources([PageSource(pool_k, pool_v, chunk_pages, scale_k, scale_v)], page_ids, None, positions, tables,
                   out_k, out_v, frame_offset, mode)
