"""Page-table backends (lrag_engine.memory.page_table): hand-made placements with exact
locations on both backends, and random call sequences run on the pure-Python table and
the C++ one side by side (identical results, errors and usage)."""
import random

import pytest

from lrag_engine.memory import _ext
from lrag_engine.memory import page_table as pt
from lrag_engine.memory.page_table import (PAGE_TABLE_KINDS, CapacityError, PageTable, PyPageTable, backend_name,
                                           make_page_table, page_table_kind)

needs_cpp = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))


@pytest.fixture(params=[pytest.param("cpp", marks=needs_cpp), "python"])
def kind(request):
    return request.param


def _state(table, streams):
    """Everything observable about `streams`: usage, free pages, every frame's locations."""
    return (table.usage(), table.free_pages(),
            {s: [table.locations(s, f) for f in range(table.num_frames(s))] for s in streams})


# ---- placement ------------------------------------------------------------------------

def test_place_fills_gpu_lowest_slot_first_then_host(kind):
    table = make_page_table(kind, 2, 3, 4)
    a, b = table.create_stream(), table.create_stream()
    assert table.place([a], 0) == []
    assert table.place([a, b], 1) == [0, 1, 2, -1]  # host slot 0 is encoded as -1
    assert table.locations(a, 0) == [0, 1] and table.locations(b, 0) == [2, -1]
    assert table.place([b], 1) == [-2, -3]
    usage = table.usage()
    assert (usage["gpu_used"], usage["host_used"], usage["pages_used"], usage["num_streams"]) == (3, 3, 6, 2)
    assert table.free_pages() == 1
    table.check_invariants()


def test_place_orders_stream_then_frame_then_layer(kind):
    table = make_page_table(kind, 2, 8, 0)
    a, b = table.create_stream(), table.create_stream()
    assert table.place([b, a], 2) == [0, 1, 2, 3, 4, 5, 6, 7]  # b first, as listed
    assert table.locations(b, 0) == [0, 1] and table.locations(b, 1) == [2, 3]
    assert table.locations(a, 0) == [4, 5] and table.locations(a, 1) == [6, 7]
    assert table.num_frames(a) == table.num_frames(b) == 2


def test_place_never_moves_pages_between_tiers(kind):
    table = make_page_table(kind, 1, 2, 3)
    a = table.create_stream()
    assert table.place([a], 4) == [0, 1, -1, -2]
    table.drop_oldest([a], 1)  # frees GPU slot 0; the host pages stay where they are
    assert [table.locations(a, f) for f in range(3)] == [[1], [-1], [-2]]
    assert table.place([a], 2) == [0, -3]
    assert [table.locations(a, f) for f in range(5)] == [[1], [-1], [-2], [0], [-3]]


def test_capacity_error_leaves_state_unchanged(kind):
    table = make_page_table(kind, 2, 3, 4)
    a, b = table.create_stream(), table.create_stream()
    table.place([a, b], 1)
    before = _state(table, [a, b])
    with pytest.raises(CapacityError, match=r"place: 4 new pages but only 3 free \(GPU 3 \+ host 4 slots, 4 in use\)"):
        table.place([a, b], 1)
    with pytest.raises(CapacityError):
        table.place([a], 2**62)  # the page count overflows int64 in C++
    assert isinstance(CapacityError("x"), RuntimeError)
    assert _state(table, [a, b]) == before
    table.check_invariants()
    assert table.place([a], 1) == [-2, -3]  # the slots it would have used without the failure


def test_drop_oldest_frees_slots_reused_last_freed_first(kind):
    table = make_page_table(kind, 2, 3, 4)
    a, b = table.create_stream(), table.create_stream()
    table.place([a, b], 1)  # a: GPU 0, 1; b: GPU 2, host 0
    table.drop_oldest([a], 1)  # releases GPU 0, then GPU 1
    assert table.num_frames(a) == 0 and table.free_pages() == 5
    assert table.place([a], 1) == [1, 0]
    table.place([b], 1)  # host 1, 2
    table.drop_oldest([b], 2)  # releases GPU 2, host 0, host 1, host 2
    assert table.place([b], 2) == [2, -3, -2, -1]
    table.drop_oldest([a, b], 0)
    table.check_invariants()


def test_frames_to_drop(kind):
    table = make_page_table(kind, 2, 8, 8)
    a, b, empty = table.create_stream(), table.create_stream(), table.create_stream()
    table.place([a], 3)
    table.place([b], 1)
    # dropping f frames from each of a (3 frames) and b (1 frame) frees 2 * (min(f, 3) + min(f, 1)) pages
    assert [table.frames_to_drop([a, b], pages) for pages in range(-1, 10)] == [0, 0, 1, 1, 1, 1, 2, 2, 3, 3, -1]
    assert table.frames_to_drop([a], 5) == 3 and table.frames_to_drop([a], 7) == -1
    assert table.frames_to_drop([a, a], 3) == 2  # a stream listed twice frees its pages once
    assert table.frames_to_drop([], 1) == -1 and table.frames_to_drop([empty], 1) == -1
    with pytest.raises(ValueError, match="unknown stream 99"):
        table.frames_to_drop([a, 99], 1)
    # dropping what it says frees enough, one frame fewer does not
    before = table.free_pages()
    table.drop_oldest([a, b], table.frames_to_drop([a, b], 5) - 1)
    assert table.free_pages() - before < 5


def test_grow_adds_slots_handed_out_first_and_refuses_shrinking(kind):
    table = make_page_table(kind, 2, 3, 4)
    a, b = table.create_stream(), table.create_stream()
    table.place([a, b], 1)
    table.drop_oldest([a], 1)  # GPU free list: 0, 1 (1 on top)
    table.place([a], 1)
    table.place([b], 1)
    before = _state(table, [a, b])
    for gpu, host in ((2, 4), (3, 3), (0, 0)):
        with pytest.raises(ValueError, match=f"cannot shrink \\(GPU 3 -> {gpu}, host 4 -> {host}\\)"):
            table.grow(gpu, host)
    assert _state(table, [a, b]) == before
    table.grow(3, 4)  # same sizes: nothing changes
    assert _state(table, [a, b]) == before
    table.grow(4, 4)
    assert table.free_pages() == 2 and table.usage()["gpu_capacity"] == 4
    table.free_stream(a)  # releases GPU 1, then GPU 0, on top of the new slot 3
    assert table.place([b], 2) == [0, 1, 3, -4]
    table.grow(4, 6)
    assert table.place([b], 1) == [-5, -6]
    table.check_invariants()


def test_free_stream_returns_every_page_and_ids_are_not_reused(kind):
    table = make_page_table(kind, 3, 4, 5)
    a, b = table.create_stream(), table.create_stream()
    table.place([a], 2)
    table.place([b], 1)
    table.free_stream(a)
    assert not table.has_stream(a) and table.has_stream(b)
    assert table.free_pages() == 6
    table.free_stream(b)
    usage = table.usage()
    assert (usage["gpu_used"], usage["host_used"], usage["pages_used"], usage["num_streams"]) == (0, 0, 0, 0)
    assert table.free_pages() == 9
    assert table.create_stream() == 2
    with pytest.raises(ValueError, match="free_stream: unknown stream 0"):
        table.free_stream(a)
    table.check_invariants()


def test_streams_never_share_a_location(kind):
    rng = random.Random(7)
    table = make_page_table(kind, 2, 10, 14)
    streams = [table.create_stream() for _ in range(3)]
    for _ in range(60):
        s = rng.choice(streams)
        if rng.random() < 0.6 and table.free_pages() >= 2:
            table.place([s], 1)
        else:
            table.drop_oldest([s], rng.randint(0, table.num_frames(s)))
        owned = [loc for t in streams for f in range(table.num_frames(t)) for loc in table.locations(t, f)]
        assert len(owned) == len(set(owned)) == table.usage()["pages_used"]
        assert sum(loc >= 0 for loc in owned) == table.usage()["gpu_used"]
        assert all(-1 - loc < 14 if loc < 0 else loc < 10 for loc in owned)


def test_errors_name_the_bad_stream_frame_and_count(kind):
    table = make_page_table(kind, 2, 4, 0)
    a = table.create_stream()
    table.place([a], 1)
    with pytest.raises(ValueError, match="place: unknown stream 99"):
        table.place([a, 99], 1)
    with pytest.raises(ValueError, match="place: stream 0 listed twice"):
        table.place([a, a], 1)
    with pytest.raises(ValueError, match="place: frames must be >= 0, got -1"):
        table.place([a], -1)
    with pytest.raises(IndexError, match=r"locations: frame 1 of stream 0 out of range \[0, 1\)"):
        table.locations(a, 1)
    with pytest.raises(IndexError, match=r"locations: frame -1 of stream 0"):
        table.locations(a, -1)
    with pytest.raises(ValueError, match="locations: unknown stream 5"):
        table.locations(5, 0)
    with pytest.raises(IndexError, match="drop_oldest: cannot drop 2 frames of stream 0 holding 1"):
        table.drop_oldest([a], 2)
    with pytest.raises(ValueError, match="drop_oldest: stream 0 listed twice"):
        table.drop_oldest([a, a], 1)
    with pytest.raises(ValueError, match="unknown stream 7"):
        table.num_frames(7)
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        make_page_table(kind, 0, 1, 1)
    with pytest.raises(ValueError, match="slot counts must be >= 0"):
        make_page_table(kind, 1, -1, 1)
    assert table.num_frames(a) == 1 and table.usage()["pages_used"] == 2  # nothing changed


# ---- factory --------------------------------------------------------------------------

def test_make_page_table_kinds(kind):
    table = make_page_table(kind, 2, 1, 1)
    assert isinstance(table, PageTable)
    assert backend_name(table) == table.kind == kind == page_table_kind(kind)
    assert table.num_layers == 2
    assert PAGE_TABLE_KINDS == ("auto", "cpp", "python")
    expected_auto = "cpp" if _ext.extension_available() else "python"
    assert backend_name(make_page_table("auto", 1, 0, 0)) == page_table_kind("auto") == expected_auto
    with pytest.raises(ValueError, match="'gpu'"):
        make_page_table("gpu", 1, 1, 1)


def test_cpp_kind_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "extension_available", lambda: False)
    monkeypatch.setattr(_ext, "missing_reason", lambda: "lrag_engine._C is not importable (test)")
    with pytest.raises(ImportError, match=r"not importable \(test\)"):
        make_page_table("cpp", 1, 1, 1)
    assert isinstance(make_page_table("auto", 1, 1, 1), PyPageTable)


# ---- random sequences, both backends side by side --------------------------------------

def _outcome(fn):
    try:
        return "ok", fn()
    except (ValueError, IndexError, CapacityError) as exc:
        return type(exc).__name__, str(exc)


def _random_run(tables, seed, steps):
    """Applies one random call sequence to every table; all must give the same outcomes."""
    rng = random.Random(seed)
    layers, gpu, host = rng.randint(1, 3), rng.randint(0, 6), rng.randint(0, 6)
    tables = [make(layers, gpu, host) for make in tables]
    streams = []  # ids ever created; freed ones stay to probe the unknown-stream paths

    def one_stream():
        live = [s for s in streams if tables[0].has_stream(s)]
        return rng.choice(live if live and rng.random() < 0.9 else streams + [1000])  # 1000: never created

    def some_streams():
        live = [s for s in streams if tables[0].has_stream(s)]
        picked = rng.sample(live, rng.randint(0, min(3, len(live))))
        if picked and rng.random() < 0.05:
            picked.append(rng.choice(picked))  # a stream listed twice
        if rng.random() < 0.05:
            picked.insert(rng.randint(0, len(picked)), one_stream())  # maybe freed or unknown
        return picked

    for _ in range(steps):
        op = rng.choices(["create", "place", "drop", "free", "grow", "to_drop", "locate"],
                         weights=[2, 6, 3, 1, 1, 2, 2])[0]
        if op == "create" or not streams:
            calls = [t.create_stream for t in tables]
        elif op == "place":
            args = (some_streams(), rng.choice([0, 1, 1, 1, 2, 3, -1]))
            calls = [lambda t=t, a=args: t.place(*a) for t in tables]
        elif op == "drop":
            args = (some_streams(), rng.randint(-1, 3))
            calls = [lambda t=t, a=args: t.drop_oldest(*a) for t in tables]
        elif op == "free":
            stream = one_stream()
            calls = [lambda t=t, s=stream: t.free_stream(s) for t in tables]
        elif op == "grow":  # sometimes a refused shrink
            args = (gpu + rng.randint(-1, 3), host + rng.randint(-1, 3))
            calls = [lambda t=t, a=args: t.grow(*a) for t in tables]
        elif op == "to_drop":
            args = (some_streams(), rng.randint(-1, 3 * layers * 3))
            calls = [lambda t=t, a=args: t.frames_to_drop(*a) for t in tables]
        else:
            args = (one_stream(), rng.randint(-1, 4))
            calls = [lambda t=t, a=args: t.locations(*a) for t in tables]
        outcomes = [_outcome(call) for call in calls]
        if op == "grow":  # the capacities after the call, which may have been refused
            gpu, host = tables[0].usage()["gpu_capacity"], tables[0].usage()["host_capacity"]
        assert all(o == outcomes[0] for o in outcomes), (op, outcomes)
        if op == "create" or not streams:
            streams.append(outcomes[0][1])
        live = [s for s in streams if tables[0].has_stream(s)]
        states = [_state(t, live) for t in tables]
        assert all(s == states[0] for s in states), (op, states)
        owned = [loc for frames in states[0][2].values() for frame in frames for loc in frame]
        assert len(owned) == len(set(owned)) == states[0][0]["pages_used"]
        for t in tables:
            t.check_invariants()
    return tables


@needs_cpp
@pytest.mark.parametrize("seed", range(40))
def test_random_sequences_match_the_cpp_backend(seed):
    _random_run([pt.CppPageTable, pt.PyPageTable], seed, 150)


@pytest.mark.parametrize("seed", range(10))
def test_random_sequences_python_alone(seed):
    # Without the extension the differential test skips; this keeps isolation and the
    # invariants checked on the pure-Python table everywhere.
    _random_run([pt.PyPageTable], seed, 150)
