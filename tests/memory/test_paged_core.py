"""The C++ page tables (lrag_engine._C.PagedMemory): allocation, errors, refcounts, LRU spill."""
import pytest

from lrag_engine.memory import _ext

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))


def _mem(layers, gpu, host):
    return _ext.load().PagedMemory(layers, gpu, host)


def test_allocation_uses_lowest_slots_and_free_returns_them():
    mem = _mem(2, 6, 0)
    s = mem.create_stream()
    plan = mem.append([s], 2)
    assert sorted(plan.new_gpu) == [0, 1, 2, 3]
    assert mem.usage()["gpu_used"] == 4 and mem.free_pages() == 2
    mem.drop_oldest([s], 1)
    assert mem.usage()["gpu_used"] == 2 and mem.free_pages() == 4
    plan = mem.append([s], 2)
    assert sorted(plan.new_gpu) == [0, 1, 4, 5]  # freed slots are reused
    mem.check_invariants()


def test_errors_name_the_stream_frame_and_page():
    C = _ext.load()
    mem = _mem(3, 6, 3)
    s = mem.create_stream()
    mem.append([s], 1)
    with pytest.raises(ValueError, match="unknown stream 7"):
        mem.append([7], 1)
    with pytest.raises(ValueError, match=f"stream {s} listed twice"):
        mem.append([s, s], 1)
    with pytest.raises(IndexError, match=f"frame 1 of stream {s} out of range"):
        mem.prefetch([s], [1])
    with pytest.raises(IndexError, match=f"frame -1 of stream {s}"):
        mem.page(s, -1, 0)
    with pytest.raises(IndexError, match="layer 3 out of range"):
        mem.page(s, 0, 3)
    with pytest.raises(IndexError, match="page 5 is not a live page"):
        mem.tier(5)
    with pytest.raises(ValueError, match="unknown stream 9"):
        mem.fork(9)
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        C.PagedMemory(0, 1, 1)
    with pytest.raises(ValueError, match="cannot shrink|tiers cannot shrink"):
        mem.grow(5, 3)


def test_capacity_error_leaves_state_untouched():
    C = _ext.load()
    mem = _mem(2, 4, 2)
    a, b = mem.create_stream(), mem.create_stream()
    mem.append([a, b], 1)
    mem.append([a], 1)  # 6 pages: GPU 4 + host 2 full
    before = (mem.usage(), mem.gpu_slot_table([a, b], 3).tolist(), mem.num_frames(a), mem.num_frames(b))
    assert not mem.can_append([b], 1)
    with pytest.raises(C.CapacityError, match="2 new pages but only 0 free"):
        mem.append([b], 1)
    with pytest.raises(C.CapacityError, match="GPU-resident at once"):
        mem.append([a, b], 2)
    after = (mem.usage(), mem.gpu_slot_table([a, b], 3).tolist(), mem.num_frames(a), mem.num_frames(b))
    assert before == after
    mem.check_invariants()


def test_fork_shares_pages_with_refcounts():
    mem = _mem(2, 8, 0)
    parent = mem.create_stream()
    mem.append([parent], 2)
    child = mem.fork(parent)
    pages = [mem.page(parent, f, l) for f in range(2) for l in range(2)]
    assert pages == [mem.page(child, f, l) for f in range(2) for l in range(2)]
    assert all(mem.refcount(p) == 2 for p in pages)
    assert mem.usage()["shared_pages"] == 4 and mem.usage()["pages_used"] == 4
    mem.append([parent], 1)  # the child does not see frames appended after the fork
    assert mem.num_frames(child) == 2 and mem.num_frames(parent) == 3
    assert mem.frames_to_drop([parent], 1) == 3  # its first two frames are shared: dropping them frees nothing
    mem.free_stream(parent)
    assert all(mem.refcount(p) == 1 for p in pages) and mem.usage()["pages_used"] == 4
    mem.free_stream(child)
    assert mem.usage()["pages_used"] == 0 and mem.free_pages() == 8
    with pytest.raises(ValueError, match=f"unknown stream {child}"):
        mem.free_stream(child)
    mem.check_invariants()


def test_spill_evicts_least_recently_retrieved_and_prefetch_brings_back():
    C = _ext.load()
    mem = _mem(1, 2, 2)
    s = mem.create_stream()
    mem.append([s], 2)  # frames 0, 1 on the GPU
    mem.touch([s], [0])  # frame 0 retrieved after frame 1 was appended
    plan = mem.append([s], 1)
    spilled = mem.page(s, 1, 0)
    assert mem.tier(spilled) == C.Tier.HOST and mem.tier(mem.page(s, 0, 0)) == C.Tier.GPU
    assert plan.evict_host == [mem.slot(spilled)] and len(plan.evict_gpu) == 1
    assert plan.new_gpu == plan.evict_gpu  # the vacated slot takes the new page
    mem.touch([s], [2])
    plan = mem.prefetch([s], [1])  # frame 0 is now the least recent: it spills
    assert mem.tier(mem.page(s, 0, 0)) == C.Tier.HOST and mem.tier(spilled) == C.Tier.GPU
    assert plan.load_gpu == [mem.slot(spilled)] and len(plan.evict_gpu) == 1
    table = mem.gpu_slot_table([s], 4)
    assert table.shape == (1, 4, 1) and table[0, 0, 0] == -1 and table[0, 3, 0] == -1
    assert not mem.all_gpu_resident([s])
    with pytest.raises(ValueError, match="3 distinct pages requested but the GPU tier holds 2"):
        mem.prefetch([s, s, s], [0, 1, 2])
    mem.check_invariants()


def test_swap_when_both_tiers_are_full():
    mem = _mem(1, 1, 1)
    s = mem.create_stream()
    mem.append([s], 1)
    mem.append([s], 1)  # frame 0 spilled to host slot 0, frame 1 on GPU slot 0
    plan = mem.prefetch([s], [0])
    # The only host slot is both the load source and the eviction target.
    assert plan.load_host == [0] and plan.evict_host == [0] and plan.load_gpu == [0] and plan.evict_gpu == [0]
    mem.check_invariants()


def test_grow_keeps_existing_slots():
    mem = _mem(1, 1, 0)
    s = mem.create_stream()
    mem.append([s], 1)
    slot = mem.slot(mem.page(s, 0, 0))
    mem.grow(3, 2)
    assert mem.slot(mem.page(s, 0, 0)) == slot
    assert mem.usage()["gpu_capacity"] == 3 and mem.usage()["host_capacity"] == 2 and mem.free_pages() == 4
    mem.check_invariants()


def test_drop_oldest_refuses_a_stream_listed_twice_and_changes_nothing():
    mem = _mem(2, 8, 0)
    s = mem.create_stream()
    mem.append([s], 3)
    with pytest.raises(ValueError, match=f"drop_oldest: stream {s} listed twice"):
        mem.drop_oldest([s, s], 2)   # would otherwise cut 4 frames of a 3-frame stream
    assert mem.num_frames(s) == 3 and mem.usage()["gpu_used"] == 6
    mem.check_invariants()
