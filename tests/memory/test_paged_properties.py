"""Property-based sequences over the paged memory (hypothesis state machines).

Core machine: the C++ page tables with both tiers simulated as lists of content tags;
every copy plan is executed and each stream's pages must read back exactly its own tags.
Store machine: sessions (HistoryStores) opening, appending, dropping and closing on one
PagePool of CPU chunks, on both page-table backends, against a plain per-stream list of
the appended K/V and a count of the pool's pages.
"""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lrag_engine.memory import _ext
from lrag_engine.memory.history import HistoryFullError, HistoryStore, PagePool

needs_cpp = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))

SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class CoreMachine(RuleBasedStateMachine):
    """Random allocate / free / fork / spill / prefetch / drop on PagedMemory."""

    def __init__(self):
        super().__init__()
        self.mem = None

    @rule(layers=st.integers(1, 3), gpu_frames=st.integers(1, 4), host_slots=st.integers(0, 8))
    @precondition(lambda self: self.mem is None)
    def create(self, layers, gpu_frames, host_slots):
        self.layers, self.gpu_slots, self.host_slots = layers, layers * gpu_frames, host_slots
        self.mem = _ext.load().PagedMemory(layers, self.gpu_slots, host_slots)
        self.gpu, self.host = [None] * self.gpu_slots, [None] * host_slots
        self.model = {self.mem.create_stream(): []}  # stream -> tags, frame-major
        self.next_tag = 0

    def _stream(self, data):
        return data.draw(st.sampled_from(sorted(self.model)))

    def _run(self, plan):
        evicted = [self.gpu[g] for g in plan.evict_gpu]
        for h, g in zip(plan.load_host, plan.load_gpu):
            self.gpu[g] = self.host[h]
        for h, tag in zip(plan.evict_host, evicted):
            self.host[h] = tag

    @rule(data=st.data(), frames=st.integers(1, 2))
    @precondition(lambda self: self.mem is not None)
    def append(self, data, frames):
        s = self._stream(data)
        needed = frames * self.layers
        fits = needed <= self.mem.free_pages() and needed <= self.gpu_slots
        assert self.mem.can_append([s], frames) == fits
        if not fits:
            before = self.mem.usage()
            with pytest.raises(_ext.load().CapacityError):
                self.mem.append([s], frames)
            assert self.mem.usage() == before
            return
        plan = self.mem.append([s], frames)
        self._run(plan)
        assert len(plan.new_gpu) == needed and len(set(plan.new_gpu)) == needed
        for g in plan.new_gpu:
            self.gpu[g] = self.next_tag
            self.model[s].append(self.next_tag)
            self.next_tag += 1

    @rule(data=st.data())
    @precondition(lambda self: self.mem is not None)
    def prefetch(self, data):
        s = self._stream(data)
        n = self.mem.num_frames(s)
        if n == 0:
            return
        frames = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
        if len(set(frames)) * self.layers > self.gpu_slots:
            with pytest.raises(ValueError, match="distinct pages requested"):
                self.mem.prefetch([s] * len(frames), frames)
            return
        self._run(self.mem.prefetch([s] * len(frames), frames))
        C = _ext.load()
        for f in frames:
            for layer in range(self.layers):
                assert self.mem.tier(self.mem.page(s, f, layer)) == C.Tier.GPU

    @rule(data=st.data())
    @precondition(lambda self: self.mem is not None)
    def touch(self, data):
        s = self._stream(data)
        n = self.mem.num_frames(s)
        if n:
            self.mem.touch([s], [data.draw(st.integers(0, n - 1))])

    @rule(data=st.data())
    @precondition(lambda self: self.mem is not None)
    def fork(self, data):
        s = self._stream(data)
        child = self.mem.fork(s)
        assert child not in self.model
        self.model[child] = list(self.model[s])

    @rule(data=st.data())
    @precondition(lambda self: self.mem is not None and len(self.model) > 1)
    def free(self, data):
        s = self._stream(data)
        self.mem.free_stream(s)
        del self.model[s]

    @rule(data=st.data())
    @precondition(lambda self: self.mem is not None)
    def drop(self, data):
        s = self._stream(data)
        count = data.draw(st.integers(0, self.mem.num_frames(s)))
        self.mem.drop_oldest([s], count)
        del self.model[s][: count * self.layers]

    @invariant()
    def pages_read_back_and_refcounts_match(self):
        if self.mem is None:
            return
        self.mem.check_invariants()
        C = _ext.load()
        owners = {}
        for s, tags in self.model.items():
            assert self.mem.num_frames(s) * self.layers == len(tags)
            for i, tag in enumerate(tags):
                p = self.mem.page(s, i // self.layers, i % self.layers)
                tier_store = self.gpu if self.mem.tier(p) == C.Tier.GPU else self.host
                assert tier_store[self.mem.slot(p)] == tag, f"stream {s} entry {i} reads another page"
                owners.setdefault(p, []).append(s)
        slots = {}
        for p, streams in owners.items():
            assert self.mem.refcount(p) == len(streams)
            key = (self.mem.tier(p), self.mem.slot(p))
            assert key not in slots, f"pages {slots.get(key)} and {p} share {key}"
            slots[key] = p
        usage = self.mem.usage()
        assert usage["gpu_used"] + usage["host_used"] == usage["pages_used"] == len(owners)
        assert self.mem.free_pages() + usage["pages_used"] == self.gpu_slots + self.host_slots

    def teardown(self):
        if self.mem is None:
            return
        for s in list(self.model):
            self.mem.free_stream(s)
        usage = self.mem.usage()
        assert usage["pages_used"] == usage["gpu_used"] == usage["host_used"] == 0, "pages leaked"
        assert self.mem.free_pages() == self.gpu_slots + self.host_slots
        self.mem.check_invariants()


TestCoreMachine = needs_cpp(CoreMachine.TestCase)
TestCoreMachine.settings = SETTINGS


class StoreMachine(RuleBasedStateMachine):
    """Sessions on one PagePool (CPU chunks) against per-stream lists of appended K/V.

    The model knows the pool's page budgets and every open session's frames, so it
    predicts each append's outcome on its own: fits, drops the fewest oldest frames of
    that session, or raises HistoryFullError with nothing changed.
    """

    TABLE = "python"
    N, H, D, DD = 2, 1, 3, 2

    @initialize(layers=st.integers(1, 2), chunk=st.integers(1, 4),
                gpu=st.integers(-1, 8).map(lambda n: None if n < 0 else n), host=st.integers(0, 8),
                sessions=st.lists(st.tuples(st.integers(1, 2), st.sampled_from(["error", "drop_oldest"])),
                                  min_size=1, max_size=2))
    def create(self, layers, chunk, gpu, host, sessions):
        self.pool = PagePool(layers, self.N, self.H, self.D, torch.float32, "cpu", gpu_pages=gpu, host_pages=host,
                             chunk_pages=chunk, table=self.TABLE)
        self.capacity = None if gpu is None else gpu + host
        self.stores = {}   # id -> (store, per-stream lists of (k [L, N, H, D], v, desc [Dd]))
        self.next_id = 0
        self.chunks = []   # (k, v) data_ptr of every chunk seen so far
        for batch, policy in sessions:
            self.open(batch, policy)

    # Rules stay enabled in every state (a rule that does nothing is cheaper for hypothesis
    # than a precondition that leaves one rule to draw).
    @rule(batch=st.integers(1, 2), policy=st.sampled_from(["error", "drop_oldest"]))
    def open(self, batch, policy):
        if len(self.stores) >= 3:
            return
        store = HistoryStore(self.pool, batch, self.DD, overflow_policy=policy, initial_frames=1)
        self.stores[self.next_id] = (store, [[] for _ in range(batch)])
        self.next_id += 1

    def _pick(self, data):
        return data.draw(st.sampled_from(sorted(self.stores))) if self.stores else None

    def _used(self):
        return sum(s.num_frames * s.pages_per_frame for s, _ in self.stores.values())

    @rule(data=st.data(), fe=st.integers(1, 3), window=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def append(self, data, fe, window, seed):
        sid = self._pick(data)
        if sid is None:
            return
        store, frames = self.stores[sid]
        g = torch.Generator().manual_seed(seed)
        L, B = store.num_layers, store.batch
        desc = torch.randn(B, fe, self.DD, generator=g)
        if window:   # evicted from a window of fe + 2 slots, in a shuffled slot order
            w = fe + 2
            wk, wv = torch.randn(L, B, w, self.N, self.H, self.D, generator=g), torch.randn(
                L, B, w, self.N, self.H, self.D, generator=g)
            slots = torch.randperm(w, generator=g)[:fe].tolist()
            k, v = wk[:, :, slots], wv[:, :, slots]
            call = lambda: store.append_window(wk, wv, slots, desc)   # noqa: E731
        else:
            k = torch.randn(L, B, fe, self.N, self.H, self.D, generator=g)
            v = torch.randn(k.shape, generator=g)
            call = lambda: store.append(k, v, desc)   # noqa: E731
        ppf, needed = store.pages_per_frame, fe * store.pages_per_frame
        free = None if self.capacity is None else self.capacity - self._used()
        drop = 0
        if free is not None and needed > free:
            drop = math.ceil((needed - free) / ppf)
            if store.overflow_policy == "error" or drop > store.num_frames:
                drop = None
        dropped_before = store.dropped_frames
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if drop is None:
                usage = self.pool.usage()
                with pytest.raises(HistoryFullError):
                    call()
                event(f"history full ({store.overflow_policy})")
                assert self.pool.usage() == usage and store.dropped_frames == dropped_before
                assert not caught
                return   # contents unchanged: checked by the invariant
            call()
        warned = [w for w in caught if "dropping the oldest" in str(w.message)]
        # one warning when this session starts dropping, none for its later drops
        assert len(warned) == (1 if drop and dropped_before == 0 else 0), (drop, dropped_before, warned)
        assert store.dropped_frames - dropped_before == drop
        event("dropped" if drop else "appended")
        for b in range(B):
            del frames[b][:drop]
            frames[b] += [(k[:, b, f].clone(), v[:, b, f].clone(), desc[b, f]) for f in range(fe)]

    @rule(data=st.data())
    def page_ids(self, data):
        sid = self._pick(data)
        if sid is None:
            return
        store, frames = self.stores[sid]
        n = store.num_frames
        rows = []
        for _ in range(store.batch):
            ids = data.draw(st.lists(st.integers(0, n - 1), max_size=min(n, 3), unique=True)) if n else []
            rows.append(data.draw(st.permutations(ids + [-1] * (3 - len(ids)))))
        ids = torch.tensor(rows, dtype=torch.int64)
        pages = store.page_ids(ids)
        assert pages.shape == (store.num_layers, store.batch, 3)
        for b in range(store.batch):
            for j, f in enumerate(ids[b].tolist()):
                if f < 0:
                    assert (pages[:, b, j] == -1).all()
                    continue
                k, v = self.pool.read(pages[:, b, j])
                assert torch.equal(k, frames[b][f][0]) and torch.equal(v, frames[b][f][1])

    @rule(data=st.data())
    def close(self, data):
        sid = self._pick(data)
        if sid is None:
            return
        store, frames = self.stores.pop(sid)
        used = self.pool.usage()["pages_used"]
        store.close()
        assert self.pool.usage()["pages_used"] == used - store.pages_per_frame * len(frames[0])
        store.close()   # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            store.page_ids(torch.zeros(store.batch, 1, dtype=torch.int64))

    @invariant()
    def contents_match(self):
        pool = self.pool
        pool.table.check_invariants()
        usage = pool.usage()
        assert usage["pages_used"] == self._used() and usage["sessions"] == len(self.stores)
        if self.capacity is not None:
            assert usage["gpu_bytes_reserved"] <= pool.gpu_cap * pool.page_bytes
            assert usage["host_bytes_reserved"] <= pool.host_cap * pool.page_bytes
            assert pool.free_pages() == self.capacity - self._used()
        chunks = [(k.data_ptr(), v.data_ptr()) for k, v in zip(pool.k_chunks, pool.v_chunks)]
        assert chunks[:len(self.chunks)] == self.chunks, "a chunk moved"
        self.chunks = chunks
        owned = set()
        for store, frames in self.stores.values():
            n = store.num_frames
            assert all(len(f) == n for f in frames)
            table_addresses = [[[pool.address(loc) for loc in pool.table.locations(s, f)] for f in range(n)]
                               for s in store.usage()["streams"]]
            assert store.page_addresses().tolist() == table_addresses
            addresses = store.page_addresses().flatten().tolist()
            assert owned.isdisjoint(addresses) and len(set(addresses)) == len(addresses)
            owned.update(addresses)
            for f in range(n):
                k, v = store.frame_kv(f)
                for b in range(store.batch):
                    assert torch.equal(k[:, b], frames[b][f][0]) and torch.equal(v[:, b], frames[b][f][1])
            if n:
                expected = torch.stack([torch.stack([fr[2] for fr in frames[b]]) for b in range(store.batch)])
                assert torch.equal(store.descriptors(), expected)

    def teardown(self):
        for store, _ in self.stores.values():
            store.close()
        usage = self.pool.usage()
        assert usage["pages_used"] == usage["gpu_pages_used"] == usage["host_pages_used"] == 0, "pages leaked"
        assert usage["sessions"] == usage["streams"] == 0
        self.pool.table.check_invariants()


class PythonStoreMachine(StoreMachine):
    TABLE = "python"


class CppStoreMachine(StoreMachine):
    TABLE = "cpp"


STORE_SETTINGS = settings(SETTINGS, max_examples=80)
TestStoreMachinePython = PythonStoreMachine.TestCase
TestStoreMachinePython.settings = STORE_SETTINGS
TestStoreMachineCpp = needs_cpp(CppStoreMachine.TestCase)
TestStoreMachineCpp.settings = STORE_SETTINGS
