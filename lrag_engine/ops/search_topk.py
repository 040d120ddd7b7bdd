"""Cosine-similarity top-k search of each stream's query against its own candidates.

Semantics (kernel and reference alike):

- ``score[b, n] = q_b . k_bn / (max(|q_b|, 1e-8) * max(|k_bn|, 1e-8))`` in float32.
- Candidates of stream ``b`` are rows ``[eligible_start[b], num_eligible[b])`` of
  ``keys[b]`` (clamped to ``[0, N)``).
- Order: score descending, equal scores by lower index; ``-0.0`` ranks as ``+0.0``.
- A candidate whose score is NaN (NaN or inf in its key or in the query) is never
  returned: it counts as ineligible, so a NaN query returns nothing.
- Fewer than ``k`` returned candidates leave a tail of index ``-1`` and score ``-inf``.

Kernel: each program scans one split of the rows in tiles for one query (or, for
streams sharing one key buffer, a group of queries reading each key tile once), packs every
(score, index) into one int64 whose integer order is the result order (high 32 bits:
the score's bits made order-preserving; low 32 bits: the bit-inverted index), and keeps
a running top-k with bitonic top-k. A merge kernel reduces the splits' top-k lists;
a problem small enough for one split per query runs as a single launch.

The row loop is software-pipelined on CUDA (``tl.range(..., num_stages)``); the query
stays in registers whenever a tile holds whole rows (descriptors up to 1024 dims at 16
rows), and one check per tile decides whether any row beats the running k-th best
before any sort. On CUDA the row tile, pipeline depth and warps are autotuned over a
small set (``_autotune_configs``) keyed by (N rounded up to a power of two, D, query
group, padded k, norms given) from ``AUTOTUNE_MIN_ROWS`` rows on; smaller searches and
the interpreter run one fixed tile.
"""
from __future__ import annotations

import functools

import torch

from lrag_engine.ops.dispatch import HAS_TRITON, check_kernel_runnable, next_power_of_2, tl, triton, use_triton

MAX_K = 64
NORM_EPS = 1e-8
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Register budget of one tile, in float32 elements across the query group, rows and the
# descriptor dims it covers: [GB, BN, BD]. At 16K a whole 1024-dim row tile of 16 rows
# fits, so q stays in registers (loaded once per program) for descriptors up to 1024
# dims; wider descriptors (or large k with wide ones) loop over dim chunks.
TILE_ELEMENTS = 16384
# Rows per split are a multiple of the largest row tile, so every tuned tile divides them.
MAX_BLOCK_N = 128
# Streams whose keys are one shared buffer (batch stride 0) are served by one program
# per split for up to this many streams, which reads each key tile once for all of them.
MAX_GROUP = 8
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
# The interpreter runs one fixed tile (autotuning times on a GPU): rows per tile there.
INTERPRETER_BLOCK_N = 64
# Below this many rows a search takes microseconds whatever the tile, and tuning would
# cost each new power-of-two history length seconds of compiles: a fixed tile instead
# (row tile, pipeline depth, warps).
AUTOTUNE_MIN_ROWS = 8192
SMALL_CONFIG = (32, 2, 4)


def _autotune_configs() -> list:
    """Row tile x pipeline depth x warps; ``_prune`` drops what a shape cannot use."""
    shapes = [(16, 3, 4), (16, 4, 8), (32, 3, 4), (32, 4, 8), (64, 2, 8), (64, 3, 8), (128, 2, 8)]
    return [triton.Config({"BN": bn, "NUM_STAGES": stages}, num_warps=warps) for bn, stages, warps in shapes]


def _dim_block(d: int, group: int, block_n: int) -> int:
    """Descriptor dims per step: all of them (q in registers) when the tile budget allows."""
    return max(16, min(next_power_of_2(d), TILE_ELEMENTS // (group * block_n)))


def _prune(configs, named_args, **kwargs):
    """Tiles must hold the running top-k (BN >= KP) and small problems gain nothing from
    row tiles much longer than their rows; keep at least the smallest valid tile."""
    kp, group, n_bucket = named_args["KP"], named_args["GB"], named_args["N_BUCKET"]
    valid = [c for c in configs if c.kwargs["BN"] >= kp and c.kwargs["BN"] * group <= TILE_ELEMENTS // 16]
    fitting = [c for c in valid if c.kwargs["BN"] <= max(n_bucket, kp)]
    if fitting:
        return fitting
    if valid:
        return valid[:1]
    return [triton.Config({"BN": kp, "NUM_STAGES": 2}, num_warps=8)]


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
    def _scan_tile(b_top, b_q, n0, q_ptr, k_ptr, norms_ptr, b_lo, b_hi, q_norm, o_b, m_b,
                   stride_qb, stride_qd, stride_kb, stride_kn, stride_kd, stride_nb, stride_nn, k_base,
                   HAS_NORMS: tl.constexpr, D: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr, Q_RESIDENT: tl.constexpr):
        """Scores of rows [n0, n0 + BN) for the group's queries, merged into the running
        top-k ``b_top`` [GB, KP]."""
        o_n = n0 + tl.arange(0, BN).to(tl.int64)
        o_d = tl.arange(0, BD)
        m_rows = (o_n[None, :] >= b_lo[:, None]) & (o_n[None, :] < b_hi[:, None])   # [GB, BN]
        m_n = tl.max(m_rows.to(tl.int32), axis=0) > 0                              # [BN]
        b_dot = tl.zeros([b_top.shape[0], BN], dtype=tl.float32)
        b_ksq = tl.zeros([BN], dtype=tl.float32)
        for d0 in tl.static_range(0, D, BD):
            m_d = d0 + o_d < D
            p_k = k_ptr + k_base + o_n[:, None] * stride_kn + (d0 + o_d)[None, :] * stride_kd
            # [BN, BD]: one read of the tile serves every query of the group.
            b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            if not Q_RESIDENT:
                # [GB, BD]
                b_q = tl.load(q_ptr + o_b[:, None] * stride_qb + (d0 + o_d)[None, :] * stride_qd,
                              mask=m_b[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_dot += tl.sum(b_k[None, :, :] * b_q[:, None, :], axis=2)
            if not HAS_NORMS:
                b_ksq += tl.sum(b_k * b_k, axis=1)
        if HAS_NORMS:
            # [GB, BN]
            k_norm = tl.load(norms_ptr + o_b[:, None] * stride_nb + o_n[None, :] * stride_nn,
                             mask=m_rows, other=1.0)
        else:
            k_norm = tl.sqrt_rn(b_ksq)[None, :]
        # IEEE sqrt and division, as in the reference: the default approximate ones could
        # reorder near-equal candidates against it.
        b_score = tl.div_rn(b_dot, q_norm[:, None] * tl.maximum(k_norm, EPS))
        # -0.0 would otherwise pack below +0.0 and break the lower-index tie rule.
        b_score = tl.where(b_score == 0.0, 0.0, b_score)
        b_bits = b_score.to(tl.int32, bitcast=True)
        b_ord = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
        b_key = (b_ord.to(tl.int64) << 32) | (0xFFFFFFFF - o_n)[None, :]
        b_key = tl.where(m_rows & (b_score == b_score), b_key, KEY_NONE)
        # Past the first tiles few candidates beat the running k-th best: skip the sorts
        # (one check for the whole group: a single reduction, a single branch).
        if tl.max(tl.max((b_key > tl.min(b_top, axis=1)[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            b_best = tl.topk(b_key, KP, dim=1)
            b_top = tl.topk(tl.reshape(tl.join(b_top, b_best), [b_top.shape[0], 2 * KP]), KP, dim=1)
        return b_top

    @triton.jit
    def _search_partial_kernel(
        q_ptr, k_ptr, norms_ptr, start_ptr, end_ptr, part_ptr, score_ptr, index_ptr,
        start_value, end_value, B, N, K, rows_per_split, N_BUCKET,
        stride_qb, stride_qd, stride_kb, stride_kn, stride_kd, stride_nb, stride_nn,
        stride_sb, stride_eb, stride_pb, stride_ps, stride_ob, stride_ib,
        HAS_NORMS: tl.constexpr, START_PER_STREAM: tl.constexpr, END_PER_STREAM: tl.constexpr,
        FINAL: tl.constexpr, D: tl.constexpr, KP: tl.constexpr, GB: tl.constexpr, BN: tl.constexpr,
        BD: tl.constexpr, NUM_STAGES: tl.constexpr, PIPELINED: tl.constexpr,
    ):
        """One program: GB queries (a group of streams sharing one key buffer, else one
        stream) against one split of the rows."""
        i_g = tl.program_id(0).to(tl.int64)
        i_s = tl.program_id(1).to(tl.int64)
        o_b = i_g * GB + tl.arange(0, GB).to(tl.int64)
        m_b = o_b < B
        # Scalar arguments equal to 1 arrive as constexprs, so no method calls on them.
        if START_PER_STREAM:
            b_lo = tl.load(start_ptr + o_b * stride_sb, mask=m_b, other=0).to(tl.int64)
        else:
            b_lo = tl.full([GB], start_value, dtype=tl.int64)
        if END_PER_STREAM:
            b_hi = tl.load(end_ptr + o_b * stride_eb, mask=m_b, other=0).to(tl.int64)
        else:
            b_hi = tl.full([GB], end_value, dtype=tl.int64)
        b_hi = tl.where(m_b, b_hi, 0)
        b_lo = tl.maximum(b_lo, i_s * rows_per_split)
        b_hi = tl.minimum(b_hi, tl.minimum((i_s + 1) * rows_per_split, N))
        lo = tl.min(b_lo, axis=0)
        hi = tl.max(b_hi, axis=0)

        o_d = tl.arange(0, BD)
        Q_RESIDENT: tl.constexpr = BD >= D
        b_qsq = tl.zeros([GB], dtype=tl.float32)
        b_q = tl.zeros([GB, BD], dtype=tl.float32)
        for d0 in tl.static_range(0, D, BD):
            # [GB, BD]
            b_qc = tl.load(q_ptr + o_b[:, None] * stride_qb + (d0 + o_d)[None, :] * stride_qd,
                           mask=m_b[:, None] & (d0 + o_d < D)[None, :], other=0.0).to(tl.float32)
            b_qsq += tl.sum(b_qc * b_qc, axis=1)
            if Q_RESIDENT:
                b_q = b_qc
        q_norm = tl.maximum(tl.sqrt_rn(b_qsq), EPS)
        # Keys shared by the group have batch stride 0; otherwise the group is one stream.
        k_base = i_g * GB * stride_kb

        b_top = tl.full([GB, KP], KEY_NONE, dtype=tl.int64)
        if PIPELINED:
            for n0 in tl.range(lo, hi, BN, num_stages=NUM_STAGES):
                b_top = _scan_tile(b_top, b_q, n0, q_ptr, k_ptr, norms_ptr, b_lo, b_hi, q_norm, o_b, m_b,
                                   stride_qb, stride_qd, stride_kb, stride_kn, stride_kd, stride_nb, stride_nn,
                                   k_base, HAS_NORMS, D, KP, BN, BD, Q_RESIDENT)
        else:
            # A while loop: the Triton 3.6 interpreter cannot take runtime range bounds
            # under NumPy >= 2.4, and the CPU tests run there.
            n0 = lo
            while n0 < hi:
                b_top = _scan_tile(b_top, b_q, n0, q_ptr, k_ptr, norms_ptr, b_lo, b_hi, q_norm, o_b, m_b,
                                   stride_qb, stride_qd, stride_kb, stride_kn, stride_kd, stride_nb, stride_nn,
                                   k_base, HAS_NORMS, D, KP, BN, BD, Q_RESIDENT)
                n0 += BN

        o_k = tl.arange(0, KP)
        m_out = m_b[:, None] & (o_k < K)[None, :]
        if FINAL:
            b_score, b_index = _unpack_keys(b_top)
            tl.store(score_ptr + o_b[:, None] * stride_ob + o_k[None, :], b_score, mask=m_out)
            tl.store(index_ptr + o_b[:, None] * stride_ib + o_k[None, :], b_index, mask=m_out)
        else:
            tl.store(part_ptr + o_b[:, None] * stride_pb + i_s * stride_ps + o_k[None, :], b_top,
                     mask=m_b[:, None] & (o_k < KP)[None, :])

    _search_partial_tuned = triton.autotune(
        configs=_autotune_configs(), key=["N_BUCKET", "D", "GB", "KP", "HAS_NORMS"],
        prune_configs_by={"early_config_prune": _prune},
    )(triton.heuristics({"BD": lambda args: _dim_block(args["D"], args["GB"], args["BN"])})(_search_partial_kernel))

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


def _plan_splits(groups: int, n: int, d: int, itemsize: int, kp: int, device: torch.device) -> tuple[int, int]:
    """(splits per query group, rows per split, a multiple of every row tile) for ``n``
    rows of ``d`` elements read by ``groups`` programs per split."""
    block_n = max(MAX_BLOCK_N, kp)
    wanted = _cdiv(n * d * itemsize, MIN_SPLIT_BYTES)
    cap = max(1, PROGRAMS_PER_SM * _sm_count(device) // max(groups, 1))
    splits = max(1, min(wanted, cap, MAX_MERGE_KEYS // kp, _cdiv(n, block_n)))
    rows = _cdiv(_cdiv(n, splits), block_n) * block_n
    return _cdiv(n, rows), rows


def _n_bucket(n: int) -> int:
    """Autotuning key of the row count: its power of two, so that a growing history
    retunes a handful of times, not at every block."""
    return next_power_of_2(n)


def _search_topk_triton(query, keys, k, num_eligible, key_norms, eligible_start):
    batch, n, d = keys.shape
    device = keys.device
    scores, index = _empty_result(batch, k, device)
    if batch == 0 or n == 0 or k == 0:
        return scores, index
    check_kernel_runnable(_search_partial_kernel, keys, "search_topk")
    # tl.topk (Triton 3.6) fails to build for k == 1, so the running list keeps at least two.
    kp = max(next_power_of_2(k), 2)
    # Streams whose keys are one buffer (batch stride 0) share each key tile's read.
    group = min(next_power_of_2(batch), MAX_GROUP) if keys.stride(0) == 0 and batch > 1 else 1
    groups = _cdiv(batch, group)
    splits, rows = _plan_splits(groups, n, d, keys.element_size(), kp, device)
    start = 0 if eligible_start is None else eligible_start
    start_t = start if isinstance(start, torch.Tensor) else None
    end_t = num_eligible if isinstance(num_eligible, torch.Tensor) else None
    start_v = 0 if start_t is not None else max(min(start, n), 0)
    end_v = 0 if end_t is not None else max(min(num_eligible, n), 0)
    final = splits == 1
    part = scores if final else torch.empty(batch, splits, kp, dtype=torch.int64, device=device)
    norms = key_norms if key_norms is not None else scores
    args = (query, keys, norms, start_t if start_t is not None else index, end_t if end_t is not None else index,
            part, scores, index,
            start_v, end_v, batch, n, k, rows, _n_bucket(n),
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            norms.stride(0), norms.stride(1),
            start_t.stride(0) if start_t is not None else 0, end_t.stride(0) if end_t is not None else 0,
            part.stride(0), part.stride(1), scores.stride(0), index.stride(0))
    flags = dict(HAS_NORMS=key_norms is not None, START_PER_STREAM=start_t is not None,
                 END_PER_STREAM=end_t is not None, FINAL=final, D=d, KP=kp, GB=group)
    if keys.is_cuda and n >= AUTOTUNE_MIN_ROWS:
        _search_partial_tuned[(groups, splits)](*args, **flags, PIPELINED=True)
    elif keys.is_cuda:
        block_n, stages, warps = max(SMALL_CONFIG[0], kp), SMALL_CONFIG[1], SMALL_CONFIG[2]
        _search_partial_kernel[(groups, splits)](
            *args, **flags, BN=block_n, BD=_dim_block(d, group, block_n), NUM_STAGES=stages, PIPELINED=True,
            num_warps=warps)
    else:
        block_n = max(INTERPRETER_BLOCK_N, kp)
        _search_partial_kernel[(groups, splits)](
            *args, **flags, BN=block_n, BD=_dim_block(d, group, block_n), NUM_STAGES=1, PIPELINED=False)
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
