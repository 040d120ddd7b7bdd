"""HistoryStore over a shared PagePool, on both page-table backends.

Against a plain per-stream list of the appended frames: contents, descriptors, page
addresses and drops over many random appends; one copy per frame from the window;
chunked growth that never moves a chunk, device chunks first; the overflow policies;
sessions sharing one pool; page_ids without a host sync; argument errors.
"""
import math
import warnings

import pytest
import torch

from lrag_engine.memory import _ext
from lrag_engine.memory.history import HistoryFullError, HistoryStore, PagePool
from lrag_engine.ops.splice import read_pages
from lrag_engine.testing import assert_close

needs_cpp = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))


@pytest.fixture(params=[pytest.param("cpp", marks=needs_cpp), "python"])
def table(request):
    return request.param


def make_pool(table, L=2, N=3, H=2, D=4, dtype=torch.float32, gpu=None, host=0, chunk=3):
    return PagePool(L, N, H, D, dtype, "cpu", gpu_pages=gpu, host_pages=host, chunk_pages=chunk, table=table)


def random_block(store, fe, g):
    shape = (store.num_layers, store.batch, fe, *store.page_shape)
    k = torch.randn(shape, generator=g).to(store.dtype)
    v = torch.randn(shape, generator=g).to(store.dtype)
    return k, v, torch.randn(store.batch, fe, store.descriptor_dim, generator=g)


class Model:
    """What a store must hold: per stream, oldest first, (k [L, N, H, D], v, desc [Dd])."""

    def __init__(self, batch):
        self.frames = [[] for _ in range(batch)]
        self.dropped = 0

    def __len__(self):
        return len(self.frames[0])

    def append(self, k, v, desc):
        """k, v [L, B, Fe, N, H, D], desc [B, Fe, Dd] (cloned: the caller may reuse them)."""
        for b, frames in enumerate(self.frames):
            frames += [(k[:, b, f].clone(), v[:, b, f].clone(), desc[b, f].clone()) for f in range(k.shape[2])]

    def drop(self, count):
        for frames in self.frames:
            del frames[:count]
        self.dropped += count


def snapshot(store):
    """Everything observable about a store and its pool (clones)."""
    pool = store.pool
    return dict(num_frames=store.num_frames, dropped=store.dropped_frames, desc=store.descriptors().clone(),
                norms=store.descriptor_norms().clone(), pages=store.page_addresses().clone(),
                kv=[tuple(t.clone() for t in store.frame_kv(f)) for f in range(store.num_frames)],
                usage=pool.usage(), chunks=[c.data_ptr() for c in pool.k_chunks + pool.v_chunks])


def assert_unchanged(store, before, ignore=()):
    after = snapshot(store)
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key in ignore:
            continue
        if key == "kv":
            assert len(after[key]) == len(value)
            for (ak, av), (bk, bv) in zip(after[key], value):
                assert torch.equal(ak, bk) and torch.equal(av, bv)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


def check_matches(store, model, g):
    """The store holds exactly the model's frames, read four ways."""
    pool, n, batch = store.pool, len(model), store.batch
    assert store.num_frames == n and store.dropped_frames == model.dropped
    assert store.bytes_used == n * batch * store.num_layers * pool.page_bytes
    desc = store.descriptors()
    assert desc.shape == (batch, n, store.descriptor_dim) and desc.dtype == torch.float32
    pool.table.check_invariants()
    # the store's page addresses are what the page table holds for its streams
    streams = store.usage()["streams"]
    assert len(streams) == batch and all(pool.table.num_frames(s) == n for s in streams)
    addresses = store.page_addresses().tolist()
    for b, s in enumerate(streams):
        assert [[pool.address(loc) for loc in pool.table.locations(s, f)] for f in range(n)] == addresses[b]
    if n == 0:
        assert store.descriptor_norms().shape == (batch, 0) and store.page_addresses().shape == (batch, 0,
                                                                                                 store.num_layers)
        return
    want_desc = torch.stack([torch.stack([d for *_, d in frames]) for frames in model.frames])
    assert torch.equal(desc, want_desc)
    assert_close(store.descriptor_norms(), want_desc.double().norm(dim=-1), dtype=torch.float32, name="norms")
    want_k = torch.stack([torch.stack([k for k, _, _ in frames]) for frames in model.frames])   # [B, n, L, N, H, D]
    want_v = torch.stack([torch.stack([v for _, v, _ in frames]) for frames in model.frames])
    # 1. frame_kv
    for f in range(n):
        k, v = store.frame_kv(f)
        assert torch.equal(k, want_k[:, f].transpose(0, 1)) and torch.equal(v, want_v[:, f].transpose(0, 1))
    # 2. every page address, read by the pool; the addresses are distinct
    addresses = store.page_addresses()
    assert addresses.shape == (batch, n, store.num_layers) and addresses.dtype == torch.int64
    assert addresses.unique().numel() == addresses.numel()
    k, v = pool.read(addresses)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    # 3. page_ids of random frames (-1 among them), read from the chunk lists as the splice does
    top = min(n, 4)
    ids = torch.stack([torch.randperm(n, generator=g)[:top] for _ in range(batch)])
    ids[0, -1] = -1
    pages = store.page_ids(ids)
    assert pages.shape == (store.num_layers, batch, top) and pages.dtype == torch.int64
    assert ((pages == -1) == (ids == -1).unsqueeze(0)).all()
    got_k = read_pages(pool.k_chunks, pages.clamp(min=0), pool.chunk_pages)
    got_v = read_pages(pool.v_chunks, pages.clamp(min=0), pool.chunk_pages)
    for b in range(batch):
        for j, f in enumerate(ids[b].tolist()):
            if f >= 0:
                assert torch.equal(got_k[:, b, j], want_k[b, f]) and torch.equal(got_v[:, b, j], want_v[b, f])


# ---- 1. against a list model ------------------------------------------------------------

SHAPES = [  # L, B, N, H, D, Dd, dtype
    pytest.param((1, 1, 1, 1, 1, 1, torch.float32), id="all1-f32"),
    pytest.param((3, 3, 5, 3, 7, 4, torch.bfloat16), id="L3-B3-N5-H3-D7-bf16"),
    pytest.param((2, 1, 7, 2, 5, 3, torch.float32), id="L2-B1-N7-D5-f32"),
    pytest.param((2, 3, 3, 1, 6, 2, torch.bfloat16), id="L2-B3-N3-H1-bf16"),
]


@pytest.mark.parametrize("chunk", [1, 3, 5])
@pytest.mark.parametrize("budgeted", [False, True], ids=["unbudgeted", "budget-drop_oldest"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_a_list_model(table, shape, budgeted, chunk):
    L, B, N, H, D, Dd, dtype = shape
    ppf = L * B
    # budgets of odd page counts: 5 frames and a part of one, split over both tiers
    gpu, host = (2 * ppf + 1, 3 * ppf + ppf // 2) if budgeted else (None, 0)
    pool = make_pool(table, L, N, H, D, dtype, gpu=gpu, host=host, chunk=chunk)
    store = HistoryStore(pool, B, Dd, overflow_policy="drop_oldest", initial_frames=2)
    model = Model(B)
    g = torch.Generator().manual_seed(L * 100 + B * 10 + chunk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(14):
            fe = int(torch.randint(1, 5, (1,), generator=g))
            block = random_block(store, fe, g)
            if budgeted:   # the fewest oldest frames that make room
                free = gpu + host - len(model) * ppf
                model.drop(max(0, math.ceil((fe * ppf - free) / ppf)))
            store.append(*block)
            model.append(*block)
            check_matches(store, model, g)
            usage = pool.usage()
            assert usage["pages_used"] == len(model) * ppf and usage["sessions"] == 1
            if budgeted:
                assert usage["gpu_bytes_reserved"] <= gpu * pool.page_bytes
                assert usage["host_bytes_reserved"] <= host * pool.page_bytes
                assert store.capacity_frames == (gpu + host) // ppf
            else:
                assert usage["host_chunks"] == 0 and store.capacity_frames is None
    warned = [w for w in caught if "dropping the oldest" in str(w.message)]
    assert len(warned) == (1 if model.dropped else 0)
    assert (model.dropped > 0) == budgeted
    store.close()
    assert pool.usage()["pages_used"] == 0


# ---- 2. append_window: one copy per frame, from the window ------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_append_window_copies_each_frame_once_from_the_window(table, chunk, monkeypatch):
    L, B, W, N, H, D, Dd = 2, 2, 6, 3, 2, 4, 3
    pool = make_pool(table, L, N, H, D, chunk=chunk)
    store = HistoryStore(pool, B, Dd)
    calls = []
    real_write = PagePool.write

    def spy(self, addresses, k, v):
        calls.append((list(addresses), k, v))
        return real_write(self, addresses, k, v)

    monkeypatch.setattr(PagePool, "write", spy)
    model = Model(B)
    g = torch.Generator().manual_seed(chunk)
    for slots in ([0, 1, 2], [5, 3], [4], [2, 0, 1, 5], [3, 4, 5, 0, 1, 2]):
        window_k = torch.randn(L, B, W, N, H, D, generator=g)
        window_v = torch.randn(L, B, W, N, H, D, generator=g)
        desc = torch.randn(B, len(slots), Dd, generator=g)
        calls.clear()
        store.append_window(window_k, window_v, slots, desc)
        assert len(calls) == len(slots), "one write per evicted frame"
        written = []
        for (addresses, k, v), slot in zip(calls, slots):
            # the source is the window itself (a view), not a copy of it
            assert k.untyped_storage().data_ptr() == window_k.untyped_storage().data_ptr()
            assert v.untyped_storage().data_ptr() == window_v.untyped_storage().data_ptr()
            assert torch.equal(k, window_k[:, :, slot].flatten(0, 1))
            assert torch.equal(v, window_v[:, :, slot].flatten(0, 1))
            assert len(addresses) == L * B
            written += addresses
        assert len(set(written)) == len(written) == len(slots) * L * B
        model.append(window_k[:, :, slots], window_v[:, :, slots], desc)
        window_k.fill_(float("nan"))   # the window moves on: the history kept its own copy
        window_v.fill_(float("nan"))
        check_matches(store, model, g)


def test_append_window_pool_copy_reads_the_window_directly(table, monkeypatch):
    """Below PagePool.write: the only writes into the pool's chunks take their source from
    the window's storage, and they move exactly the frames' K/V (one chunk: no gather)."""
    L, B, W, N, H, D, Dd = 2, 2, 5, 3, 2, 4, 3
    pool = make_pool(table, L, N, H, D, chunk=1000)
    store = HistoryStore(pool, B, Dd)
    g = torch.Generator().manual_seed(7)
    store.append(*random_block(store, 1, g))   # the chunk exists before the spy
    window_k = torch.randn(L, B, W, N, H, D, generator=g)
    window_v = torch.randn(L, B, W, N, H, D, generator=g)
    chunk_storage = {c.untyped_storage().data_ptr() for c in pool.k_chunks + pool.v_chunks}
    writes = []
    real_index_copy, real_copy = torch.Tensor.index_copy_, torch.Tensor.copy_

    def index_copy(self, dim, index, src, *args, **kwargs):
        if self.untyped_storage().data_ptr() in chunk_storage:
            writes.append(src)
        return real_index_copy(self, dim, index, src, *args, **kwargs)

    def copy(self, src, *args, **kwargs):
        if self.untyped_storage().data_ptr() in chunk_storage:
            writes.append(src)
        return real_copy(self, src, *args, **kwargs)

    slots = [3, 0, 4]
    monkeypatch.setattr(torch.Tensor, "index_copy_", index_copy)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    store.append_window(window_k, window_v, slots, torch.randn(B, len(slots), Dd, generator=g))
    monkeypatch.undo()
    assert writes, "no write into the pool seen"
    window = {window_k.untyped_storage().data_ptr(), window_v.untyped_storage().data_ptr()}
    assert all(src.untyped_storage().data_ptr() in window for src in writes), "a staging copy of the window"
    assert sum(src.numel() for src in writes) == 2 * len(slots) * L * B * N * H * D
    for f, slot in enumerate(slots, start=1):
        k, v = store.frame_kv(f)
        assert torch.equal(k, window_k[:, :, slot]) and torch.equal(v, window_v[:, :, slot])


# ---- 3. chunked growth ------------------------------------------------------------------


def test_unbudgeted_growth_never_moves_a_chunk_and_reserves_at_most_one_chunk_ahead(table):
    pool = make_pool(table, L=2, chunk=3)   # 2-page frames over 3-page chunks: frames span chunks
    store = HistoryStore(pool, 1, 4, initial_frames=1)
    model, g = Model(1), torch.Generator().manual_seed(3)
    chunk_bytes = pool.chunk_pages * pool.page_bytes
    seen: list[tuple[int, int]] = []
    for _ in range(12):
        block = random_block(store, int(torch.randint(1, 4, (1,), generator=g)), g)
        store.append(*block)
        model.append(*block)
        ptrs = [(k.data_ptr(), v.data_ptr()) for k, v in zip(pool.k_chunks, pool.v_chunks)]
        assert ptrs[:len(seen)] == seen, "an existing chunk was reallocated"
        assert all(c.shape[0] == pool.chunk_pages for c in pool.k_chunks)
        seen = ptrs
        usage = pool.usage()
        assert usage["host_chunks"] == 0 and usage["gpu_chunks"] == len(ptrs)
        assert usage["gpu_bytes_used"] <= usage["gpu_bytes_reserved"] <= usage["gpu_bytes_used"] + chunk_bytes
        check_matches(store, model, g)
    assert len(seen) > 3


def test_budgeted_growth_fills_device_chunks_before_host_chunks(table):
    pool = make_pool(table, L=2, gpu=4, host=8, chunk=3)
    store = HistoryStore(pool, 1, 4, overflow_policy="error")
    model, g = Model(1), torch.Generator().manual_seed(4)
    seen: list[tuple[int, int]] = []
    for frame in range(6):   # 2 pages each: 2 frames on the device, 4 on the host
        block = random_block(store, 1, g)
        store.append(*block)
        model.append(*block)
        ptrs = [(k.data_ptr(), v.data_ptr()) for k, v in zip(pool.k_chunks, pool.v_chunks)]
        assert ptrs[:len(seen)] == seen, "an existing chunk was reallocated"
        seen = ptrs
        usage = pool.usage()
        assert usage["gpu_pages_used"] == min(4, 2 * (frame + 1))
        assert usage["host_pages_used"] == max(0, 2 * (frame + 1) - 4)
        assert usage["gpu_bytes_reserved"] <= 4 * pool.page_bytes
        assert usage["host_bytes_reserved"] <= 8 * pool.page_bytes
        assert usage["host_chunks"] == (0 if frame < 2 else -(-(2 * frame - 2) // 3))
        check_matches(store, model, g)
    addresses = store.page_addresses()[0].flatten().tolist()   # frame-major
    assert [pool.is_host(a) for a in addresses] == [False] * 4 + [True] * 8
    # device chunks come first in the chunk list, each tier's last chunk is cut to its budget
    assert [c.shape[0] for c in pool.k_chunks] == [3, 1, 3, 3, 2]
    assert [pool.is_host(c * pool.chunk_pages) for c in range(5)] == [False, False, True, True, True]
    assert pool.free_pages() == 0 and store.capacity_frames == 6
    with pytest.raises(HistoryFullError):
        store.append(*random_block(store, 1, g))
    check_matches(store, model, g)


def test_raised_device_cap_after_a_short_chunk_maps_new_pages_to_the_new_chunk(table):
    """A tier whose last chunk was cut to the budget gets another chunk when the budget is
    raised (host-tier staging for a larger batch): its slots must map into that chunk."""
    pool = make_pool(table, L=1, gpu=2, host=0, chunk=3)
    store = HistoryStore(pool, 1, 2)
    model, g = Model(1), torch.Generator().manual_seed(5)
    for fe in (2, 3, 1):
        if fe == 3:
            pool.raise_gpu_cap(6)
        block = random_block(store, fe, g)
        store.append(*block)
        model.append(*block)
        check_matches(store, model, g)
    assert [c.shape[0] for c in pool.k_chunks] == [2, 3, 1]
    assert sorted(store.page_addresses().flatten().tolist()) == [0, 1, 3, 4, 5, 6]


# ---- 4. overflow ------------------------------------------------------------------------


def test_error_policy_raises_before_anything_changes(table):
    pool = make_pool(table, L=2, gpu=4, host=2, chunk=3)   # 3 frames of batch 1
    store = HistoryStore(pool, 1, 3, overflow_policy="error")
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        store.append(*random_block(store, 1, g))
    before = snapshot(store)
    with pytest.raises(HistoryFullError, match="overflow_policy='error'"):
        store.append(*random_block(store, 1, g))
    assert_unchanged(store, before)
    window = torch.randn(2, 1, 4, *store.page_shape, generator=g)
    with pytest.raises(HistoryFullError, match="overflow_policy='error'"):
        store.append_window(window, window.clone(), [1, 2], torch.randn(1, 2, 3))
    assert_unchanged(store, before)


def test_drop_oldest_refuses_an_append_larger_than_the_budgets(table):
    pool = make_pool(table, L=1, gpu=2, host=1, chunk=2)
    store = HistoryStore(pool, 1, 3, overflow_policy="drop_oldest")
    g = torch.Generator().manual_seed(7)
    store.append(*random_block(store, 2, g))
    before = snapshot(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no drop, so no warning either
        with pytest.raises(HistoryFullError, match="frees too little"):
            store.append(*random_block(store, 4, g))
    assert_unchanged(store, before)


def test_drop_oldest_warns_once_and_keeps_the_newest_frames(table):
    pool = make_pool(table, L=1, N=2, H=1, D=2, gpu=1, host=1, chunk=1)
    store = HistoryStore(pool, 1, 2, overflow_policy="drop_oldest")
    model, g = Model(1), torch.Generator().manual_seed(8)
    for _ in range(2):
        block = random_block(store, 1, g)
        store.append(*block)
        model.append(*block)
    block = random_block(store, 1, g)
    with pytest.warns(UserWarning, match="budget full at 2 frames.*dropping the oldest") as caught:
        store.append(*block)
    assert len([w for w in caught if "dropping the oldest" in str(w.message)]) == 1
    model.drop(1)
    model.append(*block)
    check_matches(store, model, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # later drops are silent
        for fe in (1, 2, 1, 1, 2):
            block = random_block(store, fe, g)
            store.append(*block)
            model.drop(fe)
            model.append(*block)
            check_matches(store, model, g)
    assert store.dropped_frames == 8 and store.num_frames == 2


# ---- 5. sessions on one pool ------------------------------------------------------------


def test_two_sessions_hold_disjoint_pages_and_read_only_their_own(table):
    pool = make_pool(table, L=2, chunk=3)
    a, b = HistoryStore(pool, 2, 3), HistoryStore(pool, 1, 3)
    assert pool.usage()["sessions"] == 2 and set(a.usage()["streams"]).isdisjoint(b.usage()["streams"])
    models, g = {a: Model(2), b: Model(1)}, torch.Generator().manual_seed(9)
    for step in range(8):
        store = (a, b)[step % 2]
        block = random_block(store, 1 + step % 3, g)
        store.append(*block)
        models[store].append(*block)
        pages_a, pages_b = set(a.page_addresses().flatten().tolist()), set(b.page_addresses().flatten().tolist())
        assert pages_a.isdisjoint(pages_b)
        for s in (a, b):
            check_matches(s, models[s], g)
    assert pool.usage()["pages_used"] == (len(models[a]) * 2 + len(models[b])) * 2


def test_a_drop_in_one_session_never_touches_another(table):
    pool = make_pool(table, L=2, gpu=5, host=7, chunk=2)   # 6 frames of batch 1
    a = HistoryStore(pool, 1, 3, overflow_policy="drop_oldest")
    b = HistoryStore(pool, 1, 3, overflow_policy="error")
    models, g = {a: Model(1), b: Model(1)}, torch.Generator().manual_seed(10)
    for store in (b, b, a):
        block = random_block(store, 1, g)
        store.append(*block)
        models[store].append(*block)
    before_b = snapshot(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fe in (2, 1, 2, 2, 1):
            block = random_block(a, fe, g)
            free = 12 - 2 * (len(models[a]) + len(models[b]))
            models[a].drop(max(0, math.ceil((2 * fe - free) / 2)))
            a.append(*block)
            models[a].append(*block)
            check_matches(a, models[a], g)
            assert_unchanged(b, before_b, ignore=("usage", "chunks"))   # those are the shared pool's
    assert a.dropped_frames > 0 and b.dropped_frames == 0
    check_matches(b, models[b], g)


def test_a_full_shared_pool_refuses_a_session_with_nothing_to_drop(table):
    pool = make_pool(table, L=2, gpu=4, host=2, chunk=3)
    a = HistoryStore(pool, 1, 3, overflow_policy="error")
    b = HistoryStore(pool, 1, 3, overflow_policy="drop_oldest")
    g = torch.Generator().manual_seed(11)
    a.append(*random_block(a, 3, g))   # every page
    before = snapshot(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(HistoryFullError, match=r"frees too little \(the pool is shared with other sessions"):
            b.append(*random_block(b, 1, g))
    assert_unchanged(a, before)
    assert b.num_frames == 0 and b.dropped_frames == 0
    a.close()
    b.append(*random_block(b, 1, g))   # room again
    assert b.num_frames == 1


def test_close_gives_every_page_back_and_freed_pages_are_reused(table):
    pool = make_pool(table, L=2, gpu=9, host=5, chunk=3)   # exactly the pages of a and b
    a, b = HistoryStore(pool, 1, 3), HistoryStore(pool, 2, 3)
    model_b, g = Model(2), torch.Generator().manual_seed(12)
    a.append(*random_block(a, 3, g))
    block = random_block(b, 2, g)
    b.append(*block)
    model_b.append(*block)
    a_pages = set(a.page_addresses().flatten().tolist())
    chunks = len(pool.k_chunks)
    a.close()
    assert pool.usage()["pages_used"] == 2 * 2 * 2 and pool.usage()["sessions"] == 1
    a.close()   # idempotent
    assert pool.usage()["sessions"] == 1 and a.closed and a.num_frames == 0
    k, v, d = random_block(a, 1, g)
    for call in (lambda: a.append(k, v, d), lambda: a.page_ids(torch.zeros(1, 1, dtype=torch.long)),
                 lambda: a.append_window(k, v, [0], d), lambda: a.frame_kv(0)):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert pool.usage()["pages_used"] == 8
    block = random_block(b, 1, g)   # 4 pages: the pool is full but for those a gave back
    b.append(*block)
    model_b.append(*block)
    new_pages = set(b.page_addresses()[:, -1].flatten().tolist())
    assert new_pages <= a_pages and len(pool.k_chunks) == chunks
    check_matches(b, model_b, g)
    b.close()
    b.close()
    usage = pool.usage()
    assert usage["pages_used"] == usage["gpu_pages_used"] == usage["host_pages_used"] == 0
    assert usage["sessions"] == 0 and usage["streams"] == 0
    pool.table.check_invariants()


# ---- 6. page_ids ------------------------------------------------------------------------


def test_page_ids_is_a_gather_with_no_host_sync(table, monkeypatch):
    pool = make_pool(table, L=3, chunk=2)
    store = HistoryStore(pool, 2, 3)
    ids = torch.tensor([[0, -1, 1], [-1, -1, 0]])

    def refuse(self, *args, **kwargs):
        raise AssertionError("page_ids read a tensor on the host")

    def page_ids(frame_ids):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__"):
                m.setattr(torch.Tensor, name, refuse)
            return store.page_ids(frame_ids)

    empty = page_ids(ids)
    assert empty.shape == (3, 2, 3) and empty.dtype == torch.int64 and (empty == -1).all()
    g = torch.Generator().manual_seed(13)
    store.append(*random_block(store, 2, g))
    store.append(*random_block(store, 1, g))
    pages = page_ids(ids)
    addresses = store.page_addresses()   # [B, n, L]
    assert pages.shape == (3, 2, 3)
    for b in range(2):
        for j, f in enumerate(ids[b].tolist()):
            want = [-1] * 3 if f < 0 else addresses[b, f].tolist()
            assert pages[:, b, j].tolist() == want
    assert page_ids(torch.zeros(2, 0, dtype=torch.long)).shape == (3, 2, 0)
    with pytest.raises(ValueError, match=r"frame_ids must be \[B=2, K\]"):
        store.page_ids(torch.tensor([0, 1]))


# ---- 7. argument errors -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_layers=0), "PagePool.num_layers must be an integer >= 1, got 0"),
    (dict(tokens_per_frame=True), "PagePool.tokens_per_frame must be an integer >= 1, got True"),
    (dict(num_heads=-1), "PagePool.num_heads must be an integer >= 1"),
    (dict(head_dim=2.0), "PagePool.head_dim must be an integer >= 1"),
    (dict(gpu_pages=-1), "PagePool.gpu_pages must be None or an integer >= 0, got -1"),
    (dict(host_pages="8"), "PagePool.host_pages must be None or an integer >= 0"),
    (dict(chunk_pages=0), "PagePool.chunk_pages must be an integer >= 1, got 0"),
    (dict(table="disk"), "page table kind must be one of"),
])
def test_page_pool_arguments(kwargs, message):
    args = dict(num_layers=2, tokens_per_frame=3, num_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=message):
        PagePool(**{**args, **kwargs})


def test_store_arguments(table):
    pool = make_pool(table)
    for kwargs, message in [(dict(batch=0), "HistoryStore.batch must be an integer >= 1, got 0"),
                            (dict(batch=True), "HistoryStore.batch"),
                            (dict(descriptor_dim=0), "HistoryStore.descriptor_dim must be an integer >= 1"),
                            (dict(overflow_policy="ignore"), "HistoryStore.overflow_policy must be one of")]:
        with pytest.raises(ValueError, match=message):
            HistoryStore(pool, **{**dict(batch=2, descriptor_dim=3), **kwargs})
    assert pool.sessions == 0 and pool.usage()["streams"] == 0


def test_append_shapes_are_checked_before_anything_changes(table):
    pool = make_pool(table, L=2, N=3, H=2, D=4, chunk=3)
    store = HistoryStore(pool, 2, 3)
    g = torch.Generator().manual_seed(14)
    store.append(*random_block(store, 1, g))
    k, v, d = random_block(store, 2, g)
    before = snapshot(store)
    for args, message in [((k[:1], v[:1], d), "k/v must be"),                  # L
                          ((k[:, :1], v[:, :1], d), "k/v must be"),            # B
                          ((k[..., :3], v[..., :3], d), "k/v must be"),        # page shape
                          ((k, v[:, :, :1], d), "k/v must be"),                # v differs
                          ((k, v, d[:1]), "descriptors must be"),              # B
                          ((k, v, d[:, :1]), "descriptors must be"),           # Fe
                          ((k, v, d[..., :2]), "descriptors must be")]:        # Dd
        with pytest.raises(ValueError, match=message):
            store.append(*args)
    window = torch.randn(2, 2, 4, 3, 2, 4, generator=g)
    for args, message in [((window[:1], window[:1], [0], d[:, :1]), "window_k/window_v must be"),
                          ((window, window[..., :3], [0], d[:, :1]), "window_k/window_v must be"),
                          ((window, window.double(), [0], d[:, :1]), "window_k/window_v must be"),
                          ((window, window, [4], d[:, :1]), r"slots must lie in \[0, W=4\)"),
                          ((window, window, [0, 1], d[:, :1]), "descriptors must be"),
                          ((window, window, [0], d[:, :1, :2]), "descriptors must be")]:
        with pytest.raises(ValueError, match=message):
            store.append_window(*args)
    assert_unchanged(store, before)
