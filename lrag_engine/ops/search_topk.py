"""Cosine-similarity top-k search of each stream's query against its own candidates.

Semantics (kernel and reference alike):

- ``score[b, n] = q_b . k_bn / (max(|q_b|, 1e-8) * max(|k_bn|, 1e-8))`` in float32.
- Candidates of stream ``b`` are rows ``[eligible_start[b], num_eligible[b])`` of
  ``keys[b]`` (clamped to ``[0, N)``).
- Order: score descending, equal scores by lower index; ``-0.0`` ranks as ``+0.0``.
- A candidate whose score is NaN (NaN or inf in its key or in the query) is never
  returned: it counts as ineligible, so a NaN query returns nothing.
- Fewer than ``k`` returned candidates leave a tail of index ``-1`` and score ``-inf``.

Kernel: each program scans one split of a query's rows in tiles, packs every
(score, index) into one int64 whose integer order is the result order (high 32 bits:
the score's bits made order-preserving; low 32 bits: the bit-inverted index), and keeps
a running top-k with bitonic top-k. A merge kernel reduces the splits' top-k lists;
a problem small enough for one split per query runs as a single launch.
"""
from __future__ import annotations

import functools

import torch

from lrag_engine.ops.dispatch import HAS_TRITON, check_kernel_runnable, next_power_of_2, tl, triton, use_triton

MAX_K = 64
NORM_EPS = 1e-8
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per tile; the tile's top-k needs at least KP rows, so it grows with k.
BLOCK_N = 64
# Descriptor-dim chunk: a [64, 128] tile of a 16-bit dtype is 16 KB of loads in flight per step.
BLOCK_D = 128
# ptxas (sm_90) gives a [64, 128] float32 tile about 250 registers per thread on 4 warps
# and about 130 on 8, so tiles this large go to 8 warps: twice the warps per SM.
TILE_ELEMENTS_FOR_8_WARPS = 8192
# A split reading less than this spends more on its own top-k merges and launch share
# than on loading; smaller problems (for example 4096 x 16-dim descriptors) therefore
# run as one program per query in one launch. Not yet tuned on a GPU.
MIN_SPLIT_BYTES = 256 * 1024
# Enough programs in flight per SM to hide DRAM latency without a long merge.
PROGRAMS_PER_SM = 4
# The merge kernel holds splits x KP packed keys in registers.
MAX_MERGE_KEYS = 4096
# Stand-in for the SM count in the CPU interpreter, so that tests reach the merge path.
_INTERPRETER_SMS = 4

if HAS_TRITON:
    # Smallest packed key: below every real (score, index), marks "no candidate".
    KEY_NONE = tl.constexpr(-(2 ** 63))
    EPS = tl.constexpr(NORM_EPS)

    @triton.jit
    def _unpack_keys(b_key):
        """Packed int64 keys -> (score float32, index int64); KEY_NONE -> (-inf, -1)."""
        m_none = b_key == KEY_NONE
        b_index = 0xFFFFFFFF - (b_key & 0xFFFFFFFF)
        b_ord = (b_key >> 32).to(tl.int32)
        b_bits = b_ord ^ ((b_ord >> 31) & 0x7FFFFFFF)
        b_score = b_bits.to(tl.float32, bitcast=True)
        b_score = tl.where(m_none, float("-inf"), b_score)
        b_index = tl.where(m_none, -1, b_index)
        return b_score, b_index

    @triton.jit
    def _search_partial_kernel(
        q_ptr, k_ptr, norms_ptr, start_ptr, end_ptr, part_ptr, score_ptr, index_ptr,
        start_value, end_value, N, K, rows_per_split,
        stride_qb, stride_qd, stride_kb, stride_kn, stride_kd, stride_nb, stride_nn,
        stride_sb, stride_eb, stride_pb, stride_ps, stride_ob, stride_ib,
        HAS_NORMS: tl.constexpr, START_PER_STREAM: tl.constexpr, END_PER_STREAM: tl.constexpr,
        FINAL: tl.constexpr, D: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        i_s = tl.program_id(1).to(tl.int64)
        # Scalar arguments equal to 1 arrive as constexprs, so no method calls on them.
        if START_PER_STREAM:
            lo = tl.load(start_ptr + i_b * stride_sb)
        else:
            lo = start_value
        if END_PER_STREAM:
            hi = tl.load(end_ptr + i_b * stride_eb)
        else:
            hi = end_value
        lo = tl.maximum(i_s * rows_per_split, lo)
        hi = tl.minimum(tl.minimum((i_s + 1) * rows_per_split, N), hi)

        o_d = tl.arange(0, BD)
        b_qsq = tl.zeros([BD], dtype=tl.float32)
        for d0 in range(0, D, BD):
            # [BD]
            b_q = tl.load(q_ptr + i_b * stride_qb + (d0 + o_d) * stride_qd, mask=d0 + o_d < D, other=0.0)
            b_q = b_q.to(tl.float32)
            b_qsq += b_q * b_q
        q_norm = tl.maximum(tl.sqrt_rn(tl.sum(b_qsq, axis=0)), EPS)

        b_top = tl.full([KP], KEY_NONE, dtype=tl.int64)
        # A while loop, not range(lo, hi): the Triton 3.6 interpreter cannot take runtime
        # range bounds under NumPy >= 2.4, and the CPU tests run there.
        n0 = lo
        while n0 < hi:
            o_n = n0 + tl.arange(0, BN).to(tl.int64)
            m_n = o_n < hi
            b_dot = tl.zeros([BN], dtype=tl.float32)
            b_ksq = tl.zeros([BN], dtype=tl.float32)
            for d0 in range(0, D, BD):
                m_d = d0 + o_d < D
                # [BD]
                b_q = tl.load(q_ptr + i_b * stride_qb + (d0 + o_d) * stride_qd, mask=m_d, other=0.0)
                p_k = k_ptr + i_b * stride_kb + o_n[:, None] * stride_kn + (d0 + o_d)[None, :] * stride_kd
                # [BN, BD]
                b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
                b_dot += tl.sum(b_k * b_q.to(tl.float32)[None, :], axis=1)
                if not HAS_NORMS:
                    b_ksq += tl.sum(b_k * b_k, axis=1)
            if HAS_NORMS:
                # [BN]
                k_norm = tl.load(norms_ptr + i_b * stride_nb + o_n * stride_nn, mask=m_n, other=1.0)
            else:
                k_norm = tl.sqrt_rn(b_ksq)
            # IEEE sqrt and division, as in the reference: the default approximate ones could
            # reorder near-equal candidates against it.
            b_score = tl.div_rn(b_dot, q_norm * tl.maximum(k_norm, EPS))
            # -0.0 would otherwise pack below +0.0 and break the lower-index tie rule.
            b_score = tl.where(b_score == 0.0, 0.0, b_score)
            b_bits = b_score.to(tl.int32, bitcast=True)
            b_ord = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
            b_key = (b_ord.to(tl.int64) << 32) | (0xFFFFFFFF - o_n)
            b_key = tl.where(m_n & (b_score == b_score), b_key, KEY_NONE)
            # Past the first tiles few candidates beat the running k-th best: skip the sorts.
            if tl.max(b_key, axis=0) > tl.min(b_top, axis=0):
                b_best = tl.topk(b_key, KP)
                b_top = tl.topk(tl.reshape(tl.join(b_top, b_best), [2 * KP]), KP)
            n0 += BN

        o_k = tl.arange(0, KP)
        if FINAL:
            b_score, b_index = _unpack_keys(b_top)
            tl.store(score_ptr + i_b * stride_ob + o_k, b_score, mask=o_k < K)
            tl.store(index_ptr + i_b * stride_ib + o_k, b_index, mask=o_k < K)
        else:
            tl.store(part_ptr + i_b * stride_pb + i_s * stride_ps + o_k, b_top)

    @triton.jit
    def _search_merge_kernel(
        part_ptr, score_ptr, index_ptr, S, K,
        stride_pb, stride_ps, stride_ob, stride_ib,
        SP: tl.constexpr, KP: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        o_s = tl.arange(0, SP)
        o_k = tl.arange(0, KP)
        p_part = part_ptr + i_b * stride_pb + o_s[:, None] * stride_ps + o_k[None, :]
        # [SP, KP]
        b_part = tl.load(p_part, mask=(o_s < S)[:, None], other=KEY_NONE)
        b_top = tl.topk(tl.reshape(b_part, [SP * KP]), KP)
        b_score, b_index = _unpack_keys(b_top)
        tl.store(score_ptr + i_b * stride_ob + o_k, b_score, mask=o_k < K)
        tl.store(index_ptr + i_b * stride_ib + o_k, b_index, mask=o_k < K)


def _check_bound(name: str, value, batch: int, device: torch.device) -> None:
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int32, torch.int64) or value.shape != (batch,):
            raise ValueError(f"search_topk: {name} must be an int or an int32/int64 tensor [B={batch}], "
                             f"got {value.dtype} {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"search_topk: {name} is on {value.device}, keys on {device}")
    elif not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"search_topk: {name} must be an int or a tensor [B], got {value!r}")


def _check_inputs(query, keys, k, num_eligible, key_norms, eligible_start) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_K:
        raise ValueError(f"search_topk: k must be an int in [0, {MAX_K}], got k={k!r}")
    if query.dim() != 2 or keys.dim() != 3 or keys.shape[0] != query.shape[0] or keys.shape[2] != query.shape[1]:
        raise ValueError(f"search_topk: query must be [B, D] and keys [B, N, D], got {tuple(query.shape)} "
                         f"and {tuple(keys.shape)}")
    for name, t in (("query", query), ("keys", keys)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"search_topk: {name} dtype {t.dtype} is not one of float32, bfloat16, float16")
    if query.device != keys.device:
        raise ValueError(f"search_topk: query is on {query.device}, keys on {keys.device}")
    if keys.shape[1] >= 2 ** 31 - 1:
        raise ValueError(f"search_topk: N={keys.shape[1]} candidates exceed the 32-bit index packing")
    if key_norms is not None:
        if key_norms.dtype != torch.float32 or key_norms.shape != keys.shape[:2]:
            raise ValueError(f"search_topk: key_norms must be float32 [B, N]={tuple(keys.shape[:2])}, got "
                             f"{key_norms.dtype} {tuple(key_norms.shape)}")
        if key_norms.device != keys.device:
            raise ValueError(f"search_topk: key_norms is on {key_norms.device}, keys on {keys.device}")
    _check_bound("num_eligible", num_eligible, keys.shape[0], keys.device)
    _check_bound("eligible_start", 0 if eligible_start is None else eligible_start, keys.shape[0], keys.device)


def _empty_result(batch: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((batch, k), float("-inf"), dtype=torch.float32, device=device),
            torch.full((batch, k), -1, dtype=torch.int64, device=device))


def search_topk_ref(query: torch.Tensor, keys: torch.Tensor, k: int, num_eligible: int | torch.Tensor,
                    key_norms: torch.Tensor | None = None,
                    eligible_start: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 PyTorch reference of :func:`search_topk` (same arguments and results)."""
    _check_inputs(query, keys, k, num_eligible, key_norms, eligible_start)
    batch, n, _ = keys.shape
    device = keys.device
    scores_out, index_out = _empty_result(batch, k, device)
    if batch == 0 or n == 0 or k == 0:
        return scores_out, index_out
    q = query.float()
    kf = keys.float()
    # Elementwise product + row sum (not a matmul) so that identical rows get
    # bit-identical scores and the tie rule is observable.
    dot = (kf * q[:, None, :]).sum(-1)
    k_norm = kf.square().sum(-1).sqrt() if key_norms is None else key_norms
    q_norm = q.square().sum(-1).sqrt()
    scores = dot / (q_norm.clamp_min(NORM_EPS)[:, None] * k_norm.clamp_min(NORM_EPS))
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores)

    rows = torch.arange(n, device=device)
    start = torch.as_tensor(0 if eligible_start is None else eligible_start, device=device).reshape(-1, 1)
    end = torch.as_tensor(num_eligible, device=device).reshape(-1, 1)
    valid = (rows >= start) & (rows < end) & ~scores.isnan()
    # Selection in O(N): the take-th best score is the threshold; every valid row above it
    # is in, and rows at it fill the rest lowest index first. Only the chosen rows are
    # then sorted (score descending, lower index first on ties); invalid rows never
    # displace valid ones and come back as -1.
    take = min(k, n)
    masked = scores.masked_fill(~valid, float("-inf"))
    threshold = masked.topk(take, dim=1).values[:, -1:]
    above = valid & (masked > threshold)
    at = valid & (masked == threshold)
    chosen = above | (at & (at.cumsum(1) <= take - above.sum(1, keepdim=True)))
    index = torch.where(chosen, rows, n).topk(take, dim=1, largest=False, sorted=True).values   # ascending
    present = index < n
    safe = index.clamp(max=n - 1)
    order = torch.sort(torch.where(present, scores.gather(1, safe), float("-inf")), dim=1, descending=True,
                       stable=True).indices
    top, top_valid = safe.gather(1, order), present.gather(1, order)
    scores_out[:, :take] = torch.where(top_valid, scores.gather(1, top), float("-inf"))
    index_out[:, :take] = torch.where(top_valid, top, -1)
    return scores_out, index_out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _plan_splits(batch: int, n: int, d: int, itemsize: int, kp: int, device: torch.device) -> tuple[int, int]:
    """(splits per query, rows per split, a multiple of the row tile) for ``n`` rows of ``d`` elements."""
    block_n = max(BLOCK_N, kp)
    wanted = _cdiv(n * d * itemsize, MIN_SPLIT_BYTES)
    cap = max(1, PROGRAMS_PER_SM * _sm_count(device) // max(batch, 1))
    splits = max(1, min(wanted, cap, MAX_MERGE_KEYS // kp, _cdiv(n, block_n)))
    rows = _cdiv(_cdiv(n, splits), block_n) * block_n
    return _cdiv(n, rows), rows


def _search_topk_triton(query, keys, k, num_eligible, key_norms, eligible_start):
    batch, n, d = keys.shape
    device = keys.device
    scores, index = _empty_result(batch, k, device)
    if batch == 0 or n == 0 or k == 0:
        return scores, index
    check_kernel_runnable(_search_partial_kernel, keys, "search_topk")
    # tl.topk (Triton 3.6) fails to build for k == 1, so the running list keeps at least two.
    kp = max(next_power_of_2(k), 2)
    block_n = max(BLOCK_N, kp)
    block_d = min(BLOCK_D, next_power_of_2(d))
    splits, rows = _plan_splits(batch, n, d, keys.element_size(), kp, device)
    start = 0 if eligible_start is None else eligible_start
    start_t = start if isinstance(start, torch.Tensor) else None
    end_t = num_eligible if isinstance(num_eligible, torch.Tensor) else None
    start_v = 0 if start_t is not None else max(min(start, n), 0)
    end_v = 0 if end_t is not None else max(min(num_eligible, n), 0)
    final = splits == 1
    part = scores if final else torch.empty(batch, splits, kp, dtype=torch.int64, device=device)
    norms = key_norms if key_norms is not None else scores
    _search_partial_kernel[(batch, splits)](
        query, keys, norms, start_t if start_t is not None else index, end_t if end_t is not None else index,
        part, scores, index,
        start_v, end_v, n, k, rows,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        norms.stride(0), norms.stride(1),
        start_t.stride(0) if start_t is not None else 0, end_t.stride(0) if end_t is not None else 0,
        part.stride(0), part.stride(1), scores.stride(0), index.stride(0),
        HAS_NORMS=key_norms is not None, START_PER_STREAM=start_t is not None,
        END_PER_STREAM=end_t is not None, FINAL=final, D=d, KP=kp, BN=block_n, BD=block_d,
        num_warps=8 if block_n * block_d >= TILE_ELEMENTS_FOR_8_WARPS else 4,
    )
    if not final:
        _search_merge_kernel[(batch,)](
            part, scores, index, splits, k,
            part.stride(0), part.stride(1), scores.stride(0), index.stride(0),
            SP=next_power_of_2(splits), KP=kp, num_warps=8,
        )
    return scores, index


def search_topk(query: torch.Tensor, keys: torch.Tensor, k: int, num_eligible: int | torch.Tensor,
                key_norms: torch.Tensor | None = None, eligible_start: int | torch.Tensor | None = None,
                mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` candidates of each stream by cosine similarity.

    Args:
        query: [B, D] float32/bfloat16/float16.
        keys: [B, N, D], any strides (a slice of a larger buffer, batch stride 0 for a
            candidate set shared by all streams).
        k: results per stream, 0 <= k <= 64.
        num_eligible: int or int32/int64 tensor [B] on the keys' device: end (exclusive)
            of each stream's eligible rows. Never read on the host by the kernel path.
        key_norms: optional float32 [B, N] L2 norms of the keys (kept from insertion).
        eligible_start: int or tensor [B], first eligible row (default 0).
        mode: "auto" | "triton" | "reference" (see ``lrag_engine.ops.dispatch``).

    Returns:
        scores float32 [B, k] (descending) and index int64 [B, k]; ties go to the lower
        index; missing results are index -1 with score -inf; NaN scores are never returned.
    """
    if not use_triton(keys, mode, "search_topk"):
        return search_topk_ref(query, keys, k, num_eligible, key_norms, eligible_start)
    _check_inputs(query, keys, k, num_eligible, key_norms, eligible_start)
    return _search_topk_triton(query, keys, k, num_eligible, key_norms, eligible_start)
