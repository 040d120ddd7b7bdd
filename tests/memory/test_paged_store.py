"""PagedHistoryStore against HistoryStore, overflow policies, factory and fallback."""
import warnings

import pytest
import torch

from lrag_engine.memory import _ext
from lrag_engine.memory.history import HistoryFullError, HistoryStore
from lrag_engine.testing import assert_close

needs_ext = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))


def _kwargs(L, B, N, H, D, Dd, dtype):
    return dict(num_layers=L, batch=B, tokens_per_frame=N, num_heads=H, head_dim=D, descriptor_dim=Dd, dtype=dtype)


def _frame_bytes(kw):
    return 2 * kw["num_layers"] * kw["batch"] * kw["tokens_per_frame"] * kw["num_heads"] * kw["head_dim"] * \
        kw["dtype"].itemsize


def _random_block(kw, fe, g):
    shape = (kw["num_layers"], kw["batch"], fe, kw["tokens_per_frame"], kw["num_heads"], kw["head_dim"])
    k = torch.randn(shape, generator=g).to(kw["dtype"])
    v = torch.randn(shape, generator=g).to(kw["dtype"])
    return k, v, torch.randn(kw["batch"], fe, kw["descriptor_dim"], generator=g)


def _gather(pool, pages):
    """Pool rows at pages [L, B, K] -> [L, B, K, N, H, D] with zeros where page == -1."""
    out = pool[pages.clamp(min=0)]
    return torch.where((pages >= 0).view(*pages.shape, 1, 1, 1), out, torch.zeros_like(out))


@needs_ext
@pytest.mark.parametrize("shape,budget_frames,dtype", [
    pytest.param((1, 1, 1, 1, 1, 1), (1, 0), torch.float32, id="all1-gpu1-nohost"),
    pytest.param((3, 2, 7, 2, 5, 4), (2, 5), torch.float32, id="L3-B2-N7-gpu2-host5"),
    pytest.param((2, 3, 5, 3, 4, 3), (1, 9), torch.bfloat16, id="L2-B3-N5-gpu1-host9-bf16"),
    pytest.param((2, 2, 3, 1, 8, 2), (None, None), torch.float16, id="unbounded-f16"),
])
def test_matches_history_store(shape, budget_frames, dtype):
    from lrag_engine.memory.paged import PagedHistoryStore
    kw = _kwargs(*shape, dtype)
    fb = _frame_bytes(kw)
    gpu_f, host_f = budget_frames
    grow = {"initial_frames": 2} if gpu_f is None else {}  # unbounded: the device pool must grow
    paged = PagedHistoryStore(**kw, gpu_budget_bytes=None if gpu_f is None else gpu_f * fb + fb // 3,
                              host_budget_bytes=None if host_f is None else host_f * fb, **grow)
    ref = HistoryStore(**kw)
    g = torch.Generator().manual_seed(sum(shape))
    capacity = None if gpu_f is None else gpu_f + (host_f or 0)
    for step in range(7):
        fe = 1 + step % 2
        if capacity is not None and ref.num_frames + fe > capacity:
            break
        block = _random_block(kw, fe, g)
        paged.append(*block)
        ref.append(*block)
        assert paged.num_frames == ref.num_frames
        assert paged.bytes_used == ref.bytes_used
        assert_close(paged.descriptors(), ref.descriptors(), name="descriptors")
        assert_close(paged.descriptor_norms(), ref.descriptor_norms(), name="descriptor norms")
        top_k = min(ref.num_frames, paged.usage()["gpu_capacity"] // (kw["batch"] * kw["num_layers"]), 3)
        ids = torch.stack([torch.randperm(ref.num_frames, generator=g)[:top_k] for _ in range(kw["batch"])])
        ids[0, -1] = -1  # "no frame" entries stay -1
        got = paged.page_ids(ids)
        want = ref.page_ids(ids)
        assert got.shape == want.shape and got.dtype == torch.int64
        assert torch.equal(got == -1, want == -1)
        # bit-identical pages, even after spills and prefetches through the host tier
        assert torch.equal(_gather(paged.pool_k, got), _gather(ref.pool_k, want))
        assert torch.equal(_gather(paged.pool_v, got), _gather(ref.pool_v, want))
    for f in range(ref.num_frames):
        for a, b in zip(paged.frame_kv(f), ref.frame_kv(f)):
            assert torch.equal(a, b)
    if gpu_f is None:
        assert paged.usage()["gpu_capacity"] >= ref.num_frames * kw["batch"] * kw["num_layers"] > 2 * kw["batch"] * \
            kw["num_layers"]
    paged._mem.check_invariants()


@needs_ext
def test_error_policy_raises_before_modifying():
    from lrag_engine.memory.paged import PagedHistoryStore
    kw = _kwargs(2, 2, 3, 2, 4, 3, torch.float32)
    fb = _frame_bytes(kw)
    store = PagedHistoryStore(**kw, gpu_budget_bytes=fb, host_budget_bytes=2 * fb, overflow_policy="error")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        store.append(*_random_block(kw, 1, g))
    before = [tuple(t.clone() for t in store.frame_kv(f)) for f in range(3)]
    desc, usage = store.descriptors().clone(), store.usage()
    with pytest.raises(HistoryFullError, match="overflow_policy='error'"):
        store.append(*_random_block(kw, 1, g))
    assert store.num_frames == 3 and store.usage() == usage and torch.equal(store.descriptors(), desc)
    for f in range(3):
        assert all(torch.equal(a, b) for a, b in zip(store.frame_kv(f), before[f]))


@needs_ext
def test_drop_oldest_matches_history_store():
    from lrag_engine.memory.paged import PagedHistoryStore
    kw = _kwargs(2, 2, 3, 2, 4, 3, torch.float32)
    fb = _frame_bytes(kw)
    paged = PagedHistoryStore(**kw, gpu_budget_bytes=2 * fb, host_budget_bytes=3 * fb, overflow_policy="drop_oldest")
    ref = HistoryStore(**kw, gpu_budget_bytes=5 * fb, overflow_policy="drop_oldest")
    g = torch.Generator().manual_seed(1)
    for fe in (2, 2, 1, 2, 1):
        block = _random_block(kw, fe, g)
        dropped_before = ref.dropped_frames
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paged.append(*block)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.append(*block)
        assert paged.dropped_frames == ref.dropped_frames
        dropped_now = ref.dropped_frames - dropped_before
        warned = [w for w in caught if "dropping" in str(w.message)]
        assert len(warned) == (1 if dropped_now > 0 and dropped_before == 0 else 0)
        assert paged.num_frames == ref.num_frames
        assert torch.equal(paged.descriptors(), ref.descriptors())
        for f in range(ref.num_frames):
            assert all(torch.equal(a, b) for a, b in zip(paged.frame_kv(f), ref.frame_kv(f)))
    assert ref.dropped_frames > 0


@needs_ext
@pytest.mark.parametrize("kind", ["paged", "torch"])
def test_drop_oldest_warns_once_when_dropping_starts(kind):
    from lrag_engine.memory.paged import PagedHistoryStore
    kw = _kwargs(1, 1, 2, 1, 2, 2, torch.float32)
    fb = _frame_bytes(kw)
    store = (PagedHistoryStore(**kw, gpu_budget_bytes=fb, host_budget_bytes=fb, overflow_policy="drop_oldest")
             if kind == "paged" else HistoryStore(**kw, gpu_budget_bytes=2 * fb, overflow_policy="drop_oldest"))
    g = torch.Generator().manual_seed(2)
    store.append(*_random_block(kw, 1, g))
    store.append(*_random_block(kw, 1, g))
    with pytest.warns(UserWarning, match="budget full at 2 frames.*dropping the oldest") as caught:
        store.append(*_random_block(kw, 1, g))
    assert len(caught) == 1
    assert store.dropped_frames == 1 and store.num_frames == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # later drops are silent
        for _ in range(5):
            store.append(*_random_block(kw, 1, g))
    assert store.dropped_frames == 6 and store.num_frames == 2


@needs_ext
def test_forked_pages_block_drop_oldest_with_a_clear_error():
    from lrag_engine.memory.paged import PagedHistoryStore
    kw = _kwargs(1, 1, 2, 1, 2, 2, torch.float32)
    fb = _frame_bytes(kw)
    store = PagedHistoryStore(**kw, gpu_budget_bytes=fb, host_budget_bytes=fb, overflow_policy="drop_oldest")
    g = torch.Generator().manual_seed(3)
    store.append(*_random_block(kw, 1, g))
    store.append(*_random_block(kw, 1, g))
    child = store.fork(0)
    assert store.usage()["shared_pages"] == 2 and store.bytes_used == 2 * fb
    with pytest.raises(HistoryFullError, match="forked streams share pages"):
        store.append(*_random_block(kw, 1, g))
    assert store.num_frames == 2 and store.dropped_frames == 0
    with pytest.raises(ValueError, match="stream 0 is engine stream"):
        store.free_stream(0)
    store.free_stream(child)
    with pytest.warns(UserWarning, match="dropping the oldest"):
        store.append(*_random_block(kw, 1, g))  # room again once the fork is gone
    assert store.dropped_frames == 1


@needs_ext
def test_page_ids_pure_gather_when_resident_and_prefetch_when_not():
    from lrag_engine.memory.paged import PagedHistoryStore
    kw = _kwargs(2, 1, 2, 1, 2, 2, torch.float32)
    fb = _frame_bytes(kw)
    store = PagedHistoryStore(**kw, gpu_budget_bytes=2 * fb, host_budget_bytes=2 * fb)
    g = torch.Generator().manual_seed(4)
    store.append(*_random_block(kw, 2, g))
    assert store._all_resident
    store.page_ids(torch.tensor([[0]]))  # recorded, applied to the LRU at the next append
    store.append(*_random_block(kw, 1, g))
    # frame 1 (not retrieved) spilled rather than frame 0
    assert (store._table[0, 1] == -1).all() and (store._table[0, 0] >= 0).all() and not store._all_resident
    pages = store.page_ids(torch.tensor([[1, -1]]))
    assert (pages[:, 0, 0] >= 0).all() and (pages[:, 0, 1] == -1).all()
    k, _ = store.frame_kv(1)
    assert torch.equal(store.pool_k[pages[:, 0, 0]], k[:, 0])
    with pytest.raises(IndexError, match="frame 3 of stream 0 out of range"):
        store.prefetch(torch.tensor([[3]]))
    with pytest.raises(ValueError, match=r"frame_ids must be \[B=1, K\]"):
        store.page_ids(torch.tensor([0, 1]))


@needs_ext
def test_constructor_and_append_validation():
    from lrag_engine.memory.paged import PagedHistoryStore
    kw = _kwargs(2, 2, 3, 2, 4, 3, torch.float32)
    fb = _frame_bytes(kw)
    with pytest.raises(ValueError, match="overflow_policy must be one of"):
        PagedHistoryStore(**kw, overflow_policy="ignore")
    with pytest.raises(ValueError, match="gpu_budget_bytes=10 holds 0 pages"):
        PagedHistoryStore(**kw, gpu_budget_bytes=10)
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1, got 0"):
        PagedHistoryStore(**{**kw, "num_heads": 0})
    store = PagedHistoryStore(**kw, gpu_budget_bytes=fb)
    k, v, d = _random_block(kw, 1, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="k/v must be"):
        store.append(k[:1], v[:1], d)
    with pytest.raises(ValueError, match="descriptors must be"):
        store.append(k, v, d[:1])
    with pytest.raises(HistoryFullError):
        store.append(*_random_block(kw, 2, torch.Generator().manual_seed(6)))  # more than both tiers hold


def test_missing_extension_gives_clear_errors(monkeypatch):
    from lrag_engine.memory import paged
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_import_error", "lrag_engine._C is not importable (test); build it with ...")
    kw = _kwargs(1, 1, 2, 1, 2, 2, torch.float32)
    assert not _ext.extension_available() and "not importable" in _ext.missing_reason()
    with pytest.raises(ImportError, match="lrag_engine._C is not importable"):
        paged.PagedHistoryStore(**kw)
    with pytest.warns(UserWarning, match="host_budget_bytes=64 ignored"):
        store = paged.make_history_store("auto", **kw, host_budget_bytes=64)
    assert type(store) is HistoryStore
    with pytest.raises(ImportError):
        paged.make_history_store("paged", **kw)


def test_factory_kinds():
    from lrag_engine.memory import paged
    kw = _kwargs(1, 1, 2, 1, 2, 2, torch.float32)
    assert type(paged.make_history_store("torch", **kw)) is HistoryStore
    assert type(paged.make_history_store("auto", **kw)) is HistoryStore  # no host budget: single tier
    with pytest.raises(ValueError, match="kind must be"):
        paged.make_history_store("disk", **kw)
    with pytest.raises(ValueError, match="has no host tier"):
        paged.make_history_store("torch", **kw, host_budget_bytes=64)
    if _ext.extension_available():
        assert type(paged.make_history_store("auto", **kw, host_budget_bytes=64)) is paged.PagedHistoryStore
        assert type(paged.make_history_store("paged", **kw)) is paged.PagedHistoryStore
