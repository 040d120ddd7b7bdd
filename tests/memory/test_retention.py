"""The per-stream history cap and its retention policies, on both page-table backends.

What each policy keeps on hand-made descriptor sets; the cap never exceeded over
randomized appends (store, page table and pool agree, each held frame keeps its own
K/V); dropped frames never retrieved in an engine run; FP8 pages in the store; the
configuration and budget checks.
"""
import random

import pytest
import torch

from lrag_engine import Engine, MemoryConfig
from lrag_engine.checks import check_history_budget
from lrag_engine.config import ModelConfig
from lrag_engine.memory import _ext
from lrag_engine.memory.budget import HistoryBudget
from lrag_engine.memory.history import HistoryFullError, HistoryStore, PagePool

needs_cpp = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))


@pytest.fixture(params=[pytest.param("cpp", marks=needs_cpp), "python"])
def table(request):
    return request.param


def make_store(table, batch=1, cap=4, retention="drop_oldest", guard=0, dim=2, history_dtype=None, L=2):
    pool = PagePool(L, 3, 2, 4, torch.float32, "cpu", chunk_pages=5, table=table, history_dtype=history_dtype)
    return HistoryStore(pool, batch, dim, max_frames=cap, retention=retention, recency_guard=guard)


def append(store, desc):
    """Append frames with descriptors desc [B, Fe, Dd]; K of every page of a frame is
    filled with the frame's ordinal, V with minus that."""
    b, fe = desc.shape[:2]
    first = store.appended_frames
    k = torch.empty(store.num_layers, b, fe, *store.page_shape)
    for f in range(fe):
        k[:, :, f] = first + f
    store.append(k, -k, desc)


def held(store):
    return store.frame_ids().tolist()


def frames(*vectors):
    return torch.tensor(vectors, dtype=torch.float32)


# ------------------------------------------------------------------ hand-made descriptor sets

def test_drop_oldest_keeps_the_newest(table):
    store = make_store(table, cap=3)
    for i in range(5):
        append(store, frames([1.0, i]).view(1, 1, 2))
    assert held(store) == [[2, 3, 4]]


def test_diverse_drops_the_frame_closest_to_another(table):
    # frames 0..3: east, north, almost east, west: 0 and 2 are the closest pair
    store = make_store(table, cap=4, retention="diverse")
    vecs = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [-1.0, 0.0]]
    for v in vecs:
        append(store, frames(v).view(1, 1, 2))
    assert held(store) == [[0, 1, 2, 3]]
    append(store, frames([0.0, -1.0]).view(1, 1, 2))     # south: far from all
    assert held(store) == [[1, 2, 3, 4]]                 # 0 (twin of 2, older) dropped
    # an incoming frame counts as a neighbour: a copy of north makes 1 the closest
    append(store, frames([0.0, 2.0]).view(1, 1, 2))
    assert held(store) == [[2, 3, 4, 5]]


def test_diverse_ties_go_to_the_oldest_and_guard_is_kept(table):
    # all frames identical: every candidate ties; the oldest goes. Guard 2 with Fe=1
    # protects the newest held frame as well as the incoming one.
    store = make_store(table, cap=3, retention="diverse", guard=2)
    for _ in range(3):
        append(store, frames([1.0, 1.0]).view(1, 1, 2))
    append(store, frames([1.0, 1.0]).view(1, 1, 2))
    assert held(store) == [[1, 2, 3]]
    # the closest candidates are 1 and 2 (identical to each other and to the guarded 3):
    # the older, 1, goes
    append(store, frames([-1.0, 1.0]).view(1, 1, 2))
    assert held(store) == [[2, 3, 4]]


def test_least_retrieved_keeps_the_frames_retrieved(table):
    store = make_store(table, cap=4, retention="least_retrieved")
    for i in range(4):
        append(store, frames([1.0, float(i)]).view(1, 1, 2))
    # hits: frame 2 twice, frame 0 once (later), frame 1 once (earlier), frame 3 never
    store.record_hits(torch.tensor([[2, 1]]))
    store.record_hits(torch.tensor([[2, 0]]))
    append(store, frames([1.0, 9.0]).view(1, 1, 2))     # drops 3: no hits
    assert held(store) == [[0, 1, 2, 4]]
    append(store, frames([1.0, 9.0]).view(1, 1, 2))     # drops 4: no hits (new frames are not immune)
    assert held(store) == [[0, 1, 2, 5]]
    store.record_hits(torch.tensor([[3]]))               # position 3 = frame 5
    # 0 and 1 both have one hit: 1 was used at clock 1, 0 at clock 2: 1 is least recent
    append(store, frames([1.0, 9.0]).view(1, 1, 2))
    assert held(store) == [[0, 2, 5, 6]]


def test_least_retrieved_ties_go_to_the_oldest(table):
    store = make_store(table, cap=3, retention="least_retrieved", guard=1)
    for i in range(3):
        append(store, frames([1.0, float(i)]).view(1, 1, 2))
    append(store, frames([1.0, 5.0]).view(1, 1, 2))
    assert held(store) == [[1, 2, 3]]


def test_policies_choose_per_stream(table):
    # two streams of one session drop different frames; their pages stay their own
    store = make_store(table, batch=2, cap=3, retention="diverse")
    d = [[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.01], [1.0, 0.0]]]
    for step in d:
        append(store, torch.tensor(step).view(2, 1, 2))
    append(store, torch.tensor([[-1.0, -1.0], [-1.0, 1.0]]).view(2, 1, 2))
    # stream 0: 0 and 2 nearly equal -> 0 goes; stream 1: 0 and 1 equal -> 0 goes
    assert held(store) == [[1, 2, 3], [1, 2, 3]]
    append(store, torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(2, 1, 2))
    # stream 0: 1 (north) and incoming north -> 1 goes; stream 1: 2 (east) and incoming east -> 2 goes
    assert held(store) == [[2, 3, 4], [1, 3, 4]]
    for s in range(2):
        for pos, ordinal in enumerate(held(store)[s]):
            k, v = store.frame_kv(pos)
            assert (k[:, s] == ordinal).all() and (v[:, s] == -ordinal).all()


# ------------------------------------------------------------------ randomized appends

@pytest.mark.parametrize("retention", ["drop_oldest", "least_retrieved", "diverse"])
def test_cap_never_exceeded_over_random_appends(table, retention):
    rng = random.Random(hash(retention) % 1000)
    gen = torch.Generator().manual_seed(3)
    cap, guard, batch = 7, 2, 3
    store = make_store(table, batch=batch, cap=cap, retention=retention, guard=guard, dim=3)
    pool = store.pool
    for step in range(60):
        fe = rng.randint(1, 3)
        before = [set(h) for h in held(store)] if store.num_frames else [set() for _ in range(batch)]
        append(store, torch.randn(batch, fe, 3, generator=gen))
        if store.num_frames and rng.random() < 0.5:
            r = min(2, store.num_frames)
            store.record_hits(torch.stack([torch.randperm(store.num_frames, generator=gen)[:r]
                                           for _ in range(batch)]))
        ids = held(store)
        assert store.num_frames <= cap
        for s in range(batch):
            assert pool.table.num_frames(store.usage()["streams"][s]) == store.num_frames <= cap
            assert ids[s] == sorted(ids[s]) and len(set(ids[s])) == len(ids[s])
            new = set(range(store.appended_frames - fe, store.appended_frames))
            assert new <= set(ids[s])                             # the incoming frames stay
            assert set(ids[s]) - new <= before[s]                 # nothing dropped comes back
            newest = sorted(before[s] | new)[-max(guard, fe):]
            assert set(newest) <= set(ids[s])                     # the guarded newest stay
        assert pool.usage()["pages_used"] == batch * store.num_layers * store.num_frames
        pool.table.check_invariants()
    # every held frame still holds its own K/V
    for pos in range(store.num_frames):
        k, v = store.frame_kv(pos)
        for s in range(batch):
            assert (k[:, s] == ids[s][pos]).all() and (v[:, s] == -ids[s][pos]).all()
    store.close()
    assert pool.usage()["pages_used"] == 0


def test_cap_append_errors(table):
    store = make_store(table, cap=2)
    with pytest.raises(ValueError, match="exceed max_frames=2"):
        append(store, torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="retention"):
        make_store(table, retention="newest")
    with pytest.raises(ValueError, match="below recency_guard"):
        make_store(table, cap=2, guard=3)


# ------------------------------------------------------------------ FP8 pages in the store

def test_fp8_store_round_trip_and_bytes(table):
    gen = torch.Generator().manual_seed(0)
    store = make_store(table, batch=2, cap=None, history_dtype="fp8_e4m3")
    plain = make_store(table, batch=2, cap=None)
    k = torch.randn(2, 2, 3, 3, 2, 4, generator=gen)
    v = torch.randn(2, 2, 3, 3, 2, 4, generator=gen)
    desc = torch.randn(2, 3, 2, generator=gen)
    store.append(k, v, desc)
    for f in range(3):
        gk, gv = store.frame_kv(f)
        for got, want in ((gk, k[:, :, f]), (gv, v[:, :, f])):
            amax = want.abs().amax(dim=(-3, -1), keepdim=True)     # per page and head
            assert ((got - want).abs() <= torch.maximum(want.abs() * 2 ** -4, amax / 448 * 2 ** -10)
                    * 1.0001).all()
            assert not torch.equal(got, want)
    assert store.pool.page_bytes == 2 * (3 * 2 * 4 + 4 * 2)
    assert plain.pool.page_bytes == 2 * 3 * 2 * 4 * 4


# ------------------------------------------------------------------ engine: dropped frames are never retrieved

@pytest.mark.parametrize("retention", ["drop_oldest", "least_retrieved", "diverse"])
def test_dropped_frames_never_retrieved(retention):
    memory = MemoryConfig(window=6, sink=1, top_k=2, recency_guard=1, frames_per_block=1, max_history_frames=4,
                          retention=retention)
    engine = Engine("tiny", memory=memory, seed=0)
    held_before = set()
    dropped_seen = False
    for out in engine.stream(num_frames=30):
        log = out.log.to_dict()
        for selected in log["selected"]:
            assert set(selected) <= {memory.sink + o for o in held_before}, (log, held_before)
        assert log["kept"] == len(held_before) <= 4
        if log["history_frames"] is not None and log["history_frames"] > log["kept"]:
            dropped_seen = True
        held_before = set(engine.cache.history.frame_ids()[0].tolist())
        assert len(held_before) <= 4
    assert dropped_seen


# ------------------------------------------------------------------ configuration and budgets

def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="max_history_frames=2 is below frames_per_block=3"):
        MemoryConfig(max_history_frames=2)
    with pytest.raises(ValueError, match="must exceed recency_guard=5"):
        MemoryConfig(max_history_frames=5)
    MemoryConfig(max_history_frames=5, top_k=0, recency_guard=5)     # native mode: no retrieval
    with pytest.raises(ValueError, match="positive integer, got 0"):
        MemoryConfig(max_history_frames=0)
    with pytest.raises(ValueError, match="retention must be one of"):
        MemoryConfig(retention="lru")
    with pytest.raises(ValueError, match="history_dtype must be one of"):
        MemoryConfig(history_dtype="fp8_e5m2")


def test_budget_checks_with_a_cap():
    cfg = ModelConfig.preset("tiny")
    frame = HistoryBudget.plan(MemoryConfig(), cfg.num_layers, 1, cfg.tokens_per_frame, cfg.num_heads,
                               cfg.head_dim, torch.float32).frame_bytes
    small = MemoryConfig(gpu_budget_bytes=10 * frame, max_history_frames=20)
    with pytest.raises(HistoryFullError, match="max_history_frames=20 but the budgets hold 10 frames"):
        check_history_budget(small, cfg, torch.float32, None, 1, False)
    # dropping on overflow is allowed; a cap within the budget lets any run length pass
    check_history_budget(MemoryConfig(gpu_budget_bytes=10 * frame, max_history_frames=20,
                                      overflow_policy="drop_oldest"), cfg, torch.float32, None, 1, False)
    fits = MemoryConfig(gpu_budget_bytes=10 * frame, max_history_frames=10)
    check_history_budget(fits, cfg, torch.float32, 10 ** 6, 1, False)
    with pytest.raises(HistoryFullError):
        check_history_budget(MemoryConfig(gpu_budget_bytes=10 * frame), cfg, torch.float32, 10 ** 6, 1, False)
    with pytest.raises(ValueError, match="per_forward"):
        check_history_budget(MemoryConfig(history_dtype="fp8_e4m3"), cfg, torch.float32, None, 1, True)
    plan = HistoryBudget.plan(fits, cfg.num_layers, 2, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim,
                              torch.float32)
    assert plan.max_pages == min(10, plan.capacity_frames) * cfg.num_layers * 2
    fp8 = HistoryBudget.plan(MemoryConfig(history_dtype="fp8_e4m3"), cfg.num_layers, 1, cfg.tokens_per_frame,
                             cfg.num_heads, cfg.head_dim, torch.bfloat16)
    bf16 = HistoryBudget.plan(MemoryConfig(), cfg.num_layers, 1, cfg.tokens_per_frame, cfg.num_heads,
                              cfg.head_dim, torch.bfloat16)
    assert bf16.page_bytes // 2 < fp8.page_bytes < bf16.page_bytes // 2 + 64
