"""search_topk: Triton kernel vs float32 reference vs an independent float64 oracle."""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrag_engine.ops import dispatch
from lrag_engine.ops import search_topk as search_module
from lrag_engine.ops.search_topk import MAX_K, _plan_splits, search_topk, search_topk_ref
from lrag_engine.testing import assert_close, tolerance

SCORE_DTYPE = torch.float32  # scores are computed in float32 whatever the input dtype


def _bounds(value, batch, default=0):
    if value is None:
        return [default] * batch
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.cpu()]
    return [value] * batch


def oracle(query, keys, k, num_eligible, key_norms=None, eligible_start=None):
    """Float64 cosine by an explicit loop over candidates; returns (top list per stream,
    full score table [B, N] with NaN where a candidate is not eligible)."""
    q = query.detach().to("cpu", torch.float64).numpy()
    kk = keys.detach().to("cpu", torch.float64).numpy()
    norms = None if key_norms is None else key_norms.detach().to("cpu", torch.float64).numpy()
    batch, n, _ = kk.shape
    starts, ends = _bounds(eligible_start, batch), _bounds(num_eligible, batch)
    table = np.full((batch, n), np.nan)
    tops = []
    for b in range(batch):
        q_norm = max(math.sqrt(float(np.dot(q[b], q[b]))), 1e-8)
        ranked = []
        for i in range(max(starts[b], 0), min(ends[b], n)):
            k_norm = math.sqrt(float(np.dot(kk[b, i], kk[b, i]))) if norms is None else norms[b, i]
            score = float(np.dot(q[b], kk[b, i])) / (q_norm * max(k_norm, 1e-8))
            if not math.isnan(score):
                table[b, i] = score
                ranked.append((-score, i))
        ranked.sort()
        tops.append([(-s, i) for s, i in ranked[:k]])
    return tops, table


def assert_topk_matches(scores, index, tops, table, k):
    """The result must list the oracle's top-k: same count, scores within the float32
    tolerance, each returned index's own oracle score equal to its returned score, and
    the exact oracle index wherever no other candidate scores within tolerance."""
    atol, rtol = tolerance(SCORE_DTYPE)
    assert scores.shape == index.shape == (len(tops), k)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    scores, index = scores.cpu(), index.cpu()
    for b, top in enumerate(tops):
        count = len(top)
        assert (index[b, count:] == -1).all(), f"stream {b}: tail {index[b, count:].tolist()} is not -1"
        assert torch.isneginf(scores[b, count:]).all(), f"stream {b}: tail scores {scores[b, count:].tolist()}"
        expected = torch.tensor([s for s, _ in top], dtype=torch.float64)
        assert_close(scores[b, :count].double(), expected, dtype=SCORE_DTYPE, name=f"scores[{b}]")
        got = index[b, :count]
        assert (got >= 0).all(), f"stream {b}: returned {got.tolist()} with -1 inside the first {count}"
        assert len(set(got.tolist())) == count, f"stream {b}: duplicate indices {got.tolist()}"
        own = torch.tensor(table[b, got.numpy()], dtype=torch.float64)
        assert_close(scores[b, :count].double(), own, dtype=SCORE_DTYPE, name=f"own scores[{b}]")
        if count > 1:
            same = scores[b, 1:count] == scores[b, :count - 1]
            assert (got[1:][same] > got[:-1][same]).all(), f"stream {b}: equal scores not by index: {got.tolist()}"
        finite = table[b][~np.isnan(table[b])]
        for pos, (score, i) in enumerate(top):
            near = np.abs(finite - score) <= 2 * (atol + rtol * abs(score))
            if near.sum() == 1:
                assert got[pos] == i, f"stream {b} rank {pos}: index {int(got[pos])}, expected {i}"


def assert_same_result(actual, expected):
    """Kernel vs reference: identical indices, scores within the float32 tolerance."""
    (s_a, i_a), (s_e, i_e) = actual, expected
    assert torch.equal(i_a.cpu(), i_e.cpu()), f"index {i_a.tolist()} != reference {i_e.tolist()}"
    assert_close(s_a, s_e, dtype=SCORE_DTYPE, name="scores")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CASES = [
    # batch, n, d, k, dtype, norms given
    pytest.param(3, 0, 96, 4, "fp32", False, id="N0-D96-K4-fp32-B3"),
    pytest.param(1, 1, 96, 6, "fp32", False, id="N1-D96-K6-fp32-B1"),
    pytest.param(3, 7, 96, 1, "fp32", False, id="N7-D96-K1-fp32-B3"),
    pytest.param(3, 1025, 96, 1, "bf16", False, id="N1025-D96-K1-bf16-B3"),
    pytest.param(3, 7, 96, 6, "bf16", True, id="N7-D96-K6-bf16-B3-norms"),
    pytest.param(3, 7, 96, 12, "fp16", False, id="N7-D96-K12-fp16-B3"),
    pytest.param(3, 1025, 96, 6, "fp32", False, id="N1025-D96-K6-fp32-B3"),
    pytest.param(1, 1025, 96, 6, "bf16", True, id="N1025-D96-K6-bf16-B1-norms"),
    pytest.param(1, 1025, 96, 64, "fp16", False, id="N1025-D96-K64-fp16-B1"),
    pytest.param(1, 300, 1024, 5, "bf16", False, id="N300-D1024-K5-bf16-B1"),
]


@pytest.mark.parametrize("batch, n, d, k, dtype_name, with_norms", CASES)
def test_kernel_and_reference_match_oracle(device, batch, n, d, k, dtype_name, with_norms):
    gen = torch.Generator().manual_seed(1000 * n + d + k)
    dtype = DTYPES[dtype_name]
    query = torch.randn(batch, d, generator=gen).to(device, dtype)
    keys = torch.randn(batch, n, d, generator=gen).to(device, dtype)
    norms = keys.float().norm(dim=-1) if with_norms else None
    tops, table = oracle(query, keys, k, n, norms)
    ref = search_topk_ref(query, keys, k, n, key_norms=norms)
    assert_topk_matches(*ref, tops, table, k)
    out = search_topk(query, keys, k, n, key_norms=norms, mode="triton")
    assert_topk_matches(*out, tops, table, k)
    assert_same_result(out, ref)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), n=st.integers(0, 150), d=st.integers(1, 40), k=st.integers(0, 20),
       duplicates=st.integers(0, 6), seed=st.integers(0, 2 ** 31 - 1), data=st.data())
def test_random_sizes_with_ties(device, batch, n, d, k, duplicates, seed, data):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, d, generator=gen)
    keys = torch.randn(batch, n, d, generator=gen)
    if n > 1:
        # Copies of a few rows elsewhere: exact ties at random places.
        src = torch.randint(0, n, (duplicates,), generator=gen)
        dst = torch.randint(0, n, (duplicates,), generator=gen)
        keys[:, dst] = keys[:, src]
    start = torch.tensor(data.draw(st.lists(st.integers(-3, n + 3), min_size=batch, max_size=batch)))
    end = torch.tensor(data.draw(st.lists(st.integers(-3, n + 3), min_size=batch, max_size=batch)))
    query, keys, start, end = query.to(device), keys.to(device), start.to(device), end.to(device)
    tops, table = oracle(query, keys, k, end, eligible_start=start)
    assert_topk_matches(*search_topk_ref(query, keys, k, end, eligible_start=start), tops, table, k)
    assert_topk_matches(*search_topk(query, keys, k, end, eligible_start=start, mode="triton"), tops, table, k)


def test_size_plan_covers_single_launch_and_merge():
    cpu = torch.device("cpu")
    assert _plan_splits(1, 7, 96, 2, 8, cpu)[0] == 1
    assert _plan_splits(3, 1025, 96, 4, 8, cpu)[0] > 1
    assert _plan_splits(1, 300, 1024, 2, 8, cpu)[0] > 1


def test_ties_go_to_the_lower_index(device):
    gen = torch.Generator().manual_seed(7)
    batch, n, d, k = 2, 1025, 96, 6
    query = torch.randn(batch, d, generator=gen)
    keys = torch.randn(batch, n, d, generator=gen) * 0.1
    # Duplicates of one strong row, spread over both splits and out of index order.
    for b in range(batch):
        for i in (900, 3, 512, 1024, 40):
            keys[b, i] = query[b] * 3 + 0.5
    query, keys = query.to(device), keys.to(device)
    ref = search_topk_ref(query, keys, k, n)
    assert ref[1][:, :5].tolist() == [[3, 40, 512, 900, 1024]] * batch
    out = search_topk(query, keys, k, n, mode="triton")
    assert_same_result(out, ref)
    assert torch.equal(out[0][:, :5], out[0][:, :1].expand(-1, 5))


@pytest.mark.parametrize("negative_keys", [False, True], ids=["pos-keys", "neg-keys"])
def test_zero_query_ties_everything(device, negative_keys):
    # A zero query scores 0 (or -0) against everything: the first eligible rows win.
    keys = torch.rand(2, 50, 24, generator=torch.Generator().manual_seed(3)) + 0.1
    keys = (-keys if negative_keys else keys).to(device)
    query = torch.zeros(2, 24, device=device)
    start = torch.tensor([5, 11], device=device)
    for run in (lambda: search_topk_ref(query, keys, 4, 40, eligible_start=start),
                lambda: search_topk(query, keys, 4, 40, eligible_start=start, mode="triton")):
        scores, index = run()
        assert index.tolist() == [[5, 6, 7, 8], [11, 12, 13, 14]]
        assert (scores == 0).all() and not torch.signbit(scores).any()


ELIGIBILITY = [
    pytest.param(10, 10, id="start-eq-end"),
    pytest.param(3, 0, id="end-below-start"),
    pytest.param(0, -4, id="negative-end"),
    pytest.param(60, 90, id="start-beyond-N"),
]


@pytest.mark.parametrize("start, end", ELIGIBILITY)
def test_masks_that_exclude_everything(device, start, end):
    query = torch.randn(3, 16, device=device)
    keys = torch.randn(3, 50, 16, device=device)
    for run in (lambda: search_topk_ref(query, keys, 5, end, eligible_start=start),
                lambda: search_topk(query, keys, 5, end, eligible_start=start, mode="triton")):
        scores, index = run()
        assert (index == -1).all() and torch.isneginf(scores).all()


@pytest.mark.parametrize("bound_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_per_stream_eligible_ranges(device, bound_dtype):
    gen = torch.Generator().manual_seed(11)
    batch, n, d, k = 3, 200, 96, 8
    query = torch.randn(batch, d, generator=gen).to(device, torch.bfloat16)
    keys = torch.randn(batch, n, d, generator=gen).to(device, torch.bfloat16)
    start = torch.tensor([0, 17, 150], dtype=bound_dtype, device=device)
    end = torch.tensor([200, 20, 199], dtype=bound_dtype, device=device)
    tops, table = oracle(query, keys, k, end, eligible_start=start)
    ref = search_topk_ref(query, keys, k, end, eligible_start=start)
    assert_topk_matches(*ref, tops, table, k)
    out = search_topk(query, keys, k, end, eligible_start=start, mode="triton")
    assert_same_result(out, ref)
    assert (out[1][1, 3:] == -1).all()


def _views(device):
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(3, 400, 96, generator=gen).to(device, torch.float16)
    shared = torch.randn(130, 96, generator=gen).to(device, torch.float16)
    strided = torch.randn(3, 130, 192, generator=gen).to(device, torch.float16)
    return {
        "prefix-of-buffer": big[:, :130],
        "every-other-row": big[:, 1:261:2],
        "shared-stride0-batch": shared.unsqueeze(0).expand(3, -1, -1),
        "strided-dim": strided[:, :, ::2],
    }


@pytest.mark.parametrize("view", ["prefix-of-buffer", "every-other-row", "shared-stride0-batch", "strided-dim"])
def test_non_contiguous_keys(device, view):
    keys = _views(device)[view]
    assert not keys.is_contiguous()
    query = torch.randn(6, 96, generator=torch.Generator().manual_seed(9)).to(device, torch.float16)[::2]
    tops, table = oracle(query, keys, 7, 125)
    ref = search_topk_ref(query, keys, 7, 125)
    assert_topk_matches(*ref, tops, table, 7)
    assert_same_result(search_topk(query, keys, 7, 125, mode="triton"), ref)


SHARED_CASES = [
    # batch, n, d, k, dtype, norms given: batch 5 and 11 leave a group partly empty
    pytest.param(5, 301, 40, 6, "bf16", False, id="B5-N301-D40-K6-bf16"),
    pytest.param(11, 97, 24, 3, "fp32", True, id="B11-N97-D24-K3-fp32-norms"),
    pytest.param(2, 5, 96, 9, "fp16", False, id="B2-N5-D96-K9-fp16-N<K"),
    pytest.param(8, 200, 1030, 4, "bf16", False, id="B8-N200-D1030-K4-bf16-dim-chunks"),
]


@pytest.mark.parametrize("batch, n, d, k, dtype_name, with_norms", SHARED_CASES)
def test_keys_shared_across_the_batch(device, batch, n, d, k, dtype_name, with_norms):
    """One key buffer for every stream (batch stride 0), each stream with its own query
    and its own eligible range (a recency guard per stream), copies of rows for ties."""
    gen = torch.Generator().manual_seed(batch * 1000 + n)
    dtype = DTYPES[dtype_name]
    base = torch.randn(n, d, generator=gen)
    if n > 4:
        base[n // 2] = base[1]
        base[n - 1] = base[1]
    keys = base.to(device, dtype).unsqueeze(0).expand(batch, -1, -1)
    assert keys.stride(0) == 0
    query = torch.randn(batch, d, generator=gen).to(device, dtype)
    query[-1] = keys[0, 1]          # its best candidate is a three-way tie
    start = torch.randint(0, max(n // 3, 1), (batch,), generator=gen).to(device)
    end = torch.randint(max(n // 2, 1), n + 3, (batch,), generator=gen).to(device)
    end[0] = n
    start[-1] = 0
    norms = keys.float().norm(dim=-1) if with_norms else None
    tops, table = oracle(query, keys, k, end, norms, eligible_start=start)
    ref = search_topk_ref(query, keys, k, end, key_norms=norms, eligible_start=start)
    assert_topk_matches(*ref, tops, table, k)
    out = search_topk(query, keys, k, end, key_norms=norms, eligible_start=start, mode="triton")
    assert_topk_matches(*out, tops, table, k)
    assert_same_result(out, ref)


def test_shared_keys_are_read_once_per_group(monkeypatch):
    """Streams over one key buffer go to one program per split (grid [groups, splits]);
    distinct buffers get one program per stream."""
    grids = []
    kernel = search_module._search_partial_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(search_module, "check_kernel_runnable", lambda *args: None)
    monkeypatch.setattr(search_module, "_search_partial_kernel", Recorder())
    query = torch.randn(11, 16)
    shared = torch.randn(40, 16).unsqueeze(0).expand(11, -1, -1)
    search_topk(query, shared, 3, 40, mode="triton")
    search_topk(query, shared.contiguous(), 3, 40, mode="triton")
    assert [g[0] for g in grids] == [2, 11]     # 11 streams: groups of 8, or one each


def test_autotune_configs_fit_every_shape():
    """Pruning keeps at least one config, every kept row tile holds the running top-k, and
    the dim block keeps the tile in its register budget (whole rows, q resident, when it can)."""
    configs = search_module._autotune_configs()
    for kp in (2, 8, 64):
        for group in (1, 8):
            for n_bucket in (1, 64, 1 << 17):
                kept = search_module._prune(configs, {"KP": kp, "GB": group, "N_BUCKET": n_bucket})
                assert kept and all(c.kwargs["BN"] >= kp for c in kept)
                for c in kept:
                    for d in (1, 24, 96, 1024, 1030):
                        bd = search_module._dim_block(d, group, c.kwargs["BN"])
                        assert group * c.kwargs["BN"] * bd <= max(search_module.TILE_ELEMENTS, 16 * group * kp)
    assert search_module._dim_block(1024, 1, 16) >= 1024


def test_given_norms_are_used(device):
    gen = torch.Generator().manual_seed(13)
    query = torch.randn(2, 32, generator=gen).to(device)
    keys = torch.randn(2, 90, 32, generator=gen).to(device)
    norms = (torch.rand(2, 90, generator=gen) * 3 + 0.1).to(device)  # deliberately not the true norms
    tops, table = oracle(query, keys, 9, 90, norms)
    ref = search_topk_ref(query, keys, 9, 90, key_norms=norms)
    assert_topk_matches(*ref, tops, table, 9)
    assert_same_result(search_topk(query, keys, 9, 90, key_norms=norms, mode="triton"), ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN math
def test_nan_candidates_are_never_returned(device):
    gen = torch.Generator().manual_seed(17)
    query = torch.randn(2, 24, generator=gen)
    keys = torch.randn(2, 12, 24, generator=gen)
    keys[0, [1, 4, 5]] = float("nan")
    keys[0, 7, 3] = float("inf")
    query[1, 0] = float("nan")
    query, keys = query.to(device), keys.to(device)
    tops, table = oracle(query, keys, 12, 12)
    assert len(tops[0]) == 8 and len(tops[1]) == 0
    ref = search_topk_ref(query, keys, 12, 12)
    assert_topk_matches(*ref, tops, table, 12)
    assert_same_result(search_topk(query, keys, 12, 12, mode="triton"), ref)


def test_k_zero_and_k_too_large(device):
    query, keys = torch.randn(2, 8, device=device), torch.randn(2, 5, 8, device=device)
    for mode in ("reference", "triton"):
        scores, index = search_topk(query, keys, 0, 5, mode=mode)
        assert scores.shape == index.shape == (2, 0)
        with pytest.raises(ValueError, match=f"k={MAX_K + 1}"):
            search_topk(query, keys, MAX_K + 1, 5, mode=mode)


@pytest.mark.parametrize("bad, message", [
    (dict(query=torch.randn(2, 9)), "query must be"),
    (dict(keys=torch.randn(2, 5, 8, dtype=torch.float64)), "keys dtype"),
    (dict(num_eligible=torch.tensor([1.0, 2.0])), "num_eligible"),
    (dict(num_eligible=torch.tensor([1, 2, 3])), "num_eligible"),
    (dict(eligible_start=2.5), "eligible_start"),
    (dict(key_norms=torch.ones(2, 5, dtype=torch.float16)), "key_norms"),
], ids=["query-shape", "keys-dtype", "float-bound", "bound-shape", "float-start", "norms-dtype"])
def test_bad_arguments_are_named(bad, message):
    args = dict(query=torch.randn(2, 8), keys=torch.randn(2, 5, 8), k=3, num_eligible=5)
    args.update(bad)
    for mode in ("reference", "triton"):
        with pytest.raises(ValueError, match=message):
            search_topk(**args, mode=mode)


def test_dispatch_modes(monkeypatch):
    cpu = torch.zeros(1)
    assert not dispatch.use_triton(cpu, "auto")
    assert not dispatch.use_triton(cpu, "reference")
    with pytest.raises(ValueError, match="'fast'"):
        dispatch.use_triton(cpu, "fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(cpu, "triton")
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    monkeypatch.setattr(dispatch, "_warned_missing_triton", False)
    query, keys = torch.randn(2, 8), torch.randn(2, 5, 8)
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        out = search_topk(query, keys, 3, 5, mode="triton")
    assert_same_result(out, search_topk_ref(query, keys, 3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search_topk(query, keys, 3, 5, mode="auto")


@pytest.mark.cuda
def test_real_size_on_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, n, d, k = 8, 100_000, 1024, 6
    query = torch.randn(batch, d, device="cuda", generator=gen).bfloat16()
    keys = torch.randn(batch, n, d, device="cuda", generator=gen).bfloat16()
    eligible = torch.tensor([n, n - 5, 4096, 1, 0, 77_777, n, 50_000], device="cuda")
    ref = search_topk_ref(query, keys, k, eligible)
    out = search_topk(query, keys, k, eligible)
    assert_same_result(out, ref)
    norms = keys.float().norm(dim=-1)
    assert_same_result(search_topk(query, keys, 64, eligible, key_norms=norms),
                       search_topk_ref(query, keys, 64, eligible, key_norms=norms))
