"""Property-based sequences over the paged memory (hypothesis state machines).

Core machine: the C++ page tables with both tiers simulated as lists of content tags;
every copy plan is executed and each stream's pages must read back exactly its own tags.
Store machine: PagedHistoryStore on CPU tensors (both tiers are CPU tensors, so the
spill/prefetch copies run) against a plain per-stream list of the appended K/V.
"""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lrag_engine.memory import _ext

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))

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


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = SETTINGS


class StoreMachine(RuleBasedStateMachine):
    """PagedHistoryStore (CPU tiers) against per-stream lists of appended K/V."""

    L, B, N, H, D, DD = 2, 2, 3, 2, 4, 5

    def __init__(self):
        super().__init__()
        self.store = None

    @rule(gpu_frames=st.integers(1, 3), host_frames=st.integers(0, 4),
          policy=st.sampled_from(["error", "drop_oldest"]))
    @precondition(lambda self: self.store is None)
    def create(self, gpu_frames, host_frames, policy):
        from lrag_engine.memory.paged import PagedHistoryStore
        frame_bytes = 2 * self.L * self.B * self.N * self.H * self.D * 4
        self.store = PagedHistoryStore(self.L, self.B, self.N, self.H, self.D, self.DD, torch.float32,
                                       gpu_budget_bytes=gpu_frames * frame_bytes,
                                       host_budget_bytes=host_frames * frame_bytes, overflow_policy=policy)
        self.frames = [[] for _ in range(self.B)]  # per stream: (k [L, N, H, D], v, desc [Dd])
        self.forks = {}

    @rule(fe=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
    @precondition(lambda self: self.store is not None)
    def append(self, fe, seed):
        from lrag_engine.memory.history import HistoryFullError
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(self.L, self.B, fe, self.N, self.H, self.D, generator=g)
        v = torch.randn(k.shape, generator=g)
        desc = torch.randn(self.B, fe, self.DD, generator=g)
        dropped = self.store.dropped_frames
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.store.append(k, v, desc)
            except HistoryFullError:
                usage = self.store.usage()
                assert self.store.overflow_policy == "error" or self.forks or \
                    fe * self.B * self.L > usage["gpu_capacity"] + usage["host_capacity"]
                assert self.store.dropped_frames == dropped
                return  # contents unchanged: checked by the invariant
        first_drop = dropped == 0
        dropped = self.store.dropped_frames - dropped
        warned = [w for w in caught if "dropping" in str(w.message)]
        # One warning when dropping starts, none for the drops after it.
        assert bool(warned) == (dropped > 0 and first_drop), f"dropped {dropped} frame(s) with warnings {warned}"
        assert dropped == 0 or self.store.overflow_policy == "drop_oldest"
        for b in range(self.B):
            del self.frames[b][:dropped]
            self.frames[b] += [(k[:, b, f].clone(), v[:, b, f].clone(), desc[b, f]) for f in range(fe)]

    @rule(data=st.data())
    @precondition(lambda self: self.store is not None and self.store.num_frames > 0)
    def page_ids(self, data):
        n = self.store.num_frames
        kmax = max(1, self.store.usage()["gpu_capacity"] // (self.B * self.L))
        rows = []
        for _ in range(self.B):
            frames = data.draw(st.lists(st.integers(0, n - 1), max_size=min(kmax, n), unique=True))
            rows.append(data.draw(st.permutations(frames + [-1] * (kmax - len(frames)))))
        ids = torch.tensor(rows, dtype=torch.int64)
        pages = self.store.page_ids(ids)
        assert pages.shape == (self.L, self.B, kmax)
        seen = {}
        for b in range(self.B):
            for j, f in enumerate(ids[b].tolist()):
                if f < 0:
                    assert (pages[:, b, j] == -1).all()
                    continue
                for layer in range(self.L):
                    p = int(pages[layer, b, j])
                    assert p not in seen, f"page {p} returned for {seen.get(p)} and {(b, f, layer)}"
                    seen[p] = (b, f, layer)
                    assert torch.equal(self.store.pool_k[p], self.frames[b][f][0][layer])
                    assert torch.equal(self.store.pool_v[p], self.frames[b][f][1][layer])

    @rule(stream=st.integers(0, 1))
    @precondition(lambda self: self.store is not None)
    def fork(self, stream):
        child = self.store.fork(stream)
        self.forks[child] = list(self.frames[stream])

    @rule(data=st.data())
    @precondition(lambda self: self.store is not None and self.forks)
    def free_fork(self, data):
        child = data.draw(st.sampled_from(sorted(self.forks)))
        self.store.free_stream(child)
        del self.forks[child]

    @invariant()
    def contents_match(self):
        if self.store is None:
            return
        self.store._mem.check_invariants()
        n = self.store.num_frames
        assert all(len(f) == n for f in self.frames)
        for f in range(n):
            k, v = self.store.frame_kv(f)
            for b in range(self.B):
                assert torch.equal(k[:, b], self.frames[b][f][0]) and torch.equal(v[:, b], self.frames[b][f][1])
        if n:
            expected = torch.stack([torch.stack([fr[2] for fr in self.frames[b]]) for b in range(self.B)])
            assert torch.equal(self.store.descriptors(), expected)
        for child, frames in self.forks.items():
            assert self.store.stream_num_frames(child) == len(frames)
            for f, (k, v, _) in enumerate(frames):
                ck, cv = self.store.stream_frame_kv(child, f)
                assert torch.equal(ck, k) and torch.equal(cv, v)

    def teardown(self):
        if self.store is None:
            return
        for child in list(self.forks):
            self.store.free_stream(child)
        usage = self.store.usage()
        assert usage["pages_used"] == self.store.num_frames * self.B * self.L, "pages leaked by forks"


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = SETTINGS
