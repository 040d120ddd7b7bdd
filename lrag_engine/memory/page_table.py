"""Page tables of the history store behind one protocol, with or without the extension.

    table = make_page_table("auto", num_layers=2, gpu_slots=3, host_slots=4)
    s = table.create_stream()
    table.place([s], 2)        # -> [0, 1, 2, -1]: GPU slots 0..2, then host slot 0
    table.locations(s, 1)      # -> [2, -1]

A stream is a list of frames; each frame holds one page per layer, and each live page
occupies one slot of the GPU tier or of the host tier. A location encodes a GPU slot ``s``
as ``s`` (>= 0) and a host slot ``h`` as ``-1 - h``. :meth:`PageTable.place` never moves
a page between tiers: new pages take free GPU slots first, then free host slots.

Two backends with identical observable results for any sequence of calls (same slot
choices, same return values, same error types and messages):

- :class:`CppPageTable`: the C++ ``PagedMemory`` of ``lrag_engine._C``;
- :class:`PyPageTable`: pure Python, for when the extension is not built.

Both hand out slots like ``csrc/core/slot_allocator``: a LIFO free list, the lowest slot
first on a fresh tier, and the slots a :meth:`~PageTable.grow` adds before older free ones.
"""
from __future__ import annotations

import operator
import os
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from lrag_engine.memory import _ext

PAGE_TABLE_KINDS = ("auto", "cpp", "python")
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


class CapacityError(RuntimeError):
    """The pages an operation needs do not fit in the free slots of both tiers together."""


@runtime_checkable
class PageTable(Protocol):
    """What the history store needs of a page table (both backends implement exactly this).

    Argument errors: an unknown stream or a bad count raises ValueError, a frame or a
    drop past a stream's end IndexError, a placement that does not fit CapacityError,
    always before anything changes. Messages name the operation and the bad value.
    """

    kind: str  # "cpp" or "python"
    num_layers: int

    def create_stream(self) -> int:
        """A new empty stream; ids count up from 0 and are never reused."""

    def free_stream(self, stream: int) -> None:
        """Forgets the stream and frees all its pages."""

    def has_stream(self, stream: int) -> bool: ...

    def num_frames(self, stream: int) -> int: ...

    def free_pages(self) -> int:
        """Free GPU slots + free host slots."""

    def grow(self, gpu_slots: int, host_slots: int) -> None:
        """Sets the tier capacities (absolute, in slots); shrinking raises ValueError."""

    def place(self, streams: Sequence[int], frames: int) -> list[int]:
        """Appends ``frames`` frames to every stream in ``streams`` (distinct ids) without
        migration; returns the location of each new page, ordered stream, frame, layer.
        CapacityError when ``len(streams) * frames * num_layers > free_pages()``."""

    def drop_oldest(self, streams: Sequence[int], count: int) -> None:
        """Forgets the ``count`` oldest frames of every stream in ``streams`` (distinct ids)."""

    def drop_frames(self, streams: Sequence[int], frames: Sequence[int]) -> None:
        """Forgets frame ``frames[i]`` of stream ``streams[i]`` (distinct ids, one frame
        each); the later frames of each stream move down by one."""

    def frames_to_drop(self, streams: Sequence[int], pages: int) -> int:
        """Smallest number of oldest frames to drop from every stream in ``streams`` so
        that at least ``pages`` pages are freed (0 when ``pages <= 0``); -1 when impossible."""

    def locations(self, stream: int, frame: int) -> list[int]:
        """Location of each layer's page of ``frame`` of ``stream``."""

    def usage(self) -> dict[str, int]:
        """gpu_capacity, gpu_used, host_capacity, host_used, pages_used, shared_pages,
        page_references, num_streams."""

    def check_invariants(self) -> None:
        """RuntimeError describing the first broken invariant."""


def _check_distinct(streams: Iterable[int], op: str) -> list[int]:
    # The C++ drop_oldest does not check this itself, and a repeated stream would be cut twice.
    ids = [operator.index(s) for s in streams]
    seen: set[int] = set()
    for s in ids:
        if s in seen:
            raise ValueError(f"{op}: stream {s} listed twice")
        seen.add(s)
    return ids


class CppPageTable:
    """:class:`PageTable` over ``lrag_engine._C.PagedMemory``; ImportError when not built."""

    kind = "cpp"

    def __init__(self, num_layers: int, gpu_slots: int, host_slots: int) -> None:
        reason = _cpp_missing_reason()
        if reason is not None:
            raise ImportError(reason)
        ext = _ext.load()
        self._mem = ext.PagedMemory(num_layers, gpu_slots, host_slots)
        self._capacity_error = ext.CapacityError

    @property
    def num_layers(self) -> int:
        return self._mem.num_layers

    def create_stream(self) -> int:
        return self._mem.create_stream()

    def free_stream(self, stream: int) -> None:
        self._mem.free_stream(stream)

    def has_stream(self, stream: int) -> bool:
        return self._mem.has_stream(stream)

    def num_frames(self, stream: int) -> int:
        return self._mem.num_frames(stream)

    def free_pages(self) -> int:
        return self._mem.free_pages()

    def grow(self, gpu_slots: int, host_slots: int) -> None:
        self._mem.grow(gpu_slots, host_slots)

    def place(self, streams: Sequence[int], frames: int) -> list[int]:
        try:
            return self._mem.place(streams, frames)
        except self._capacity_error as exc:
            raise CapacityError(str(exc)) from exc

    def drop_oldest(self, streams: Sequence[int], count: int) -> None:
        self._mem.drop_oldest(_check_distinct(streams, "drop_oldest"), count)

    def drop_frames(self, streams: Sequence[int], frames: Sequence[int]) -> None:
        self._mem.drop_frames(list(streams), list(frames))

    def frames_to_drop(self, streams: Sequence[int], pages: int) -> int:
        return self._mem.frames_to_drop(streams, pages)

    def locations(self, stream: int, frame: int) -> list[int]:
        return self._mem.locations(stream, frame)

    def usage(self) -> dict[str, int]:
        return self._mem.usage()

    def check_invariants(self) -> None:
        self._mem.check_invariants()


class _Slots:
    """One tier's slots, handed out like csrc/core/slot_allocator (a LIFO free list)."""

    __slots__ = ("name", "free", "in_use")

    def __init__(self, name: str) -> None:
        self.name = name
        self.free: list[int] = []  # stack: the last one is handed out next
        self.in_use = bytearray()  # per slot

    @property
    def capacity(self) -> int:
        return len(self.in_use)

    @property
    def used(self) -> int:
        return len(self.in_use) - len(self.free)

    def allocate(self) -> int:
        slot = self.free.pop()
        self.in_use[slot] = 1
        return slot

    def release(self, slot: int) -> None:
        if not self.in_use[slot]:
            raise RuntimeError(f"{self.name}: slot {slot} released but not allocated")
        self.in_use[slot] = 0
        self.free.append(slot)

    def grow(self, capacity: int) -> None:
        old = len(self.in_use)
        self.in_use.extend(bytes(capacity - old))
        self.free.extend(range(capacity - 1, old - 1, -1))  # lowest new slot on top


class PyPageTable:
    """:class:`PageTable` in pure Python, with the C++ backend's results.

    Each call costs the pages it touches; :meth:`locations` also walks the stream's deque
    of frames from its nearer end (``frames / 64`` block hops inside CPython's deque).
    """

    kind = "python"

    def __init__(self, num_layers: int, gpu_slots: int, host_slots: int) -> None:
        num_layers, gpu_slots, host_slots = map(operator.index, (num_layers, gpu_slots, host_slots))
        if num_layers < 1:
            raise ValueError(f"PagedMemory: num_layers must be >= 1, got {num_layers}")
        if gpu_slots < 0 or host_slots < 0:
            raise ValueError(f"PagedMemory: slot counts must be >= 0, got gpu_slots={gpu_slots}, "
                             f"host_slots={host_slots}")
        self.num_layers = num_layers
        self._gpu = _Slots("GPU tier")
        self._host = _Slots("host tier")
        # per stream, oldest first: one tuple of num_layers locations per frame
        self._streams: dict[int, deque[tuple[int, ...]]] = {}
        self._next_stream = 0
        self.grow(gpu_slots, host_slots)

    def _frames(self, stream: int, op: str) -> deque[tuple[int, ...]]:
        frames = self._streams.get(operator.index(stream))
        if frames is None:
            raise ValueError(f"{op}: unknown stream {stream}")
        return frames

    def create_stream(self) -> int:
        stream = self._next_stream
        self._streams[stream] = deque()
        self._next_stream += 1
        return stream

    def free_stream(self, stream: int) -> None:
        for frame in self._frames(stream, "free_stream"):
            self._release(frame)
        del self._streams[operator.index(stream)]

    def has_stream(self, stream: int) -> bool:
        return operator.index(stream) in self._streams

    def num_frames(self, stream: int) -> int:
        return len(self._frames(stream, "num_frames"))

    def free_pages(self) -> int:
        return len(self._gpu.free) + len(self._host.free)

    def grow(self, gpu_slots: int, host_slots: int) -> None:
        gpu_slots, host_slots = operator.index(gpu_slots), operator.index(host_slots)
        gpu, host = self._gpu, self._host
        if gpu_slots < gpu.capacity or host_slots < host.capacity:
            raise ValueError(f"PagedMemory.grow: tiers cannot shrink (GPU {gpu.capacity} -> {gpu_slots}, "
                             f"host {host.capacity} -> {host_slots})")
        # Checked before anything grows (the C++ may grow one tier before refusing the other).
        limits = (("GPU tier", gpu_slots), ("host tier", host_slots), ("page ids", gpu_slots + host_slots))
        for name, capacity in limits:
            if capacity > _INT32_MAX:
                raise ValueError(f"{name}: capacity {capacity} exceeds the int32 slot range")
        gpu.grow(gpu_slots)
        host.grow(host_slots)

    def place(self, streams: Sequence[int], frames: int) -> list[int]:
        frames = operator.index(frames)
        if frames < 0:
            raise ValueError(f"place: frames must be >= 0, got {frames}")
        ids: list[int] = []
        seen: set[int] = set()
        for s in streams:
            self._frames(s, "place")
            if s in seen:
                raise ValueError(f"place: stream {s} listed twice")
            seen.add(s)
            ids.append(operator.index(s))
        needed = len(ids) * frames * self.num_layers
        available = self.free_pages()
        if needed > available:
            shown = needed if needed <= _INT64_MAX else f"{len(ids)} x {frames} x {self.num_layers}"
            raise CapacityError(f"place: {shown} new pages but only {available} free (GPU {self._gpu.capacity} + "
                                f"host {self._host.capacity} slots, {self._gpu.used + self._host.used} in use)")
        gpu_free, host = self._gpu.free, self._host
        placed: list[int] = []
        for s in ids:
            history = self._streams[s]
            for _ in range(frames):
                frame = tuple(self._gpu.allocate() if gpu_free else -1 - host.allocate()
                              for _ in range(self.num_layers))
                history.append(frame)
                placed.extend(frame)
        return placed

    def drop_oldest(self, streams: Sequence[int], count: int) -> None:
        ids = _check_distinct(streams, "drop_oldest")
        count = operator.index(count)
        for s in ids:
            n = self.num_frames(s)
            if count < 0 or count > n:
                raise IndexError(f"drop_oldest: cannot drop {count} frames of stream {s} holding {n}")
        for s in ids:
            history = self._streams[s]
            for _ in range(count):
                self._release(history.popleft())

    def drop_frames(self, streams: Sequence[int], frames: Sequence[int]) -> None:
        streams, frames = list(streams), [operator.index(f) for f in frames]
        if len(streams) != len(frames):
            raise ValueError(f"drop_frames: {len(streams)} streams but {len(frames)} frames")
        seen: set[int] = set()
        for s, f in zip(streams, frames):
            s = operator.index(s)
            if s in seen:
                raise ValueError(f"drop_frames: stream {s} listed twice")
            seen.add(s)
            n = self.num_frames(s)
            if f < 0 or f >= n:
                raise IndexError(f"drop_frames: frame {f} of stream {s} out of range [0, {n})")
        for s, f in zip(streams, frames):
            history = self._streams[operator.index(s)]
            self._release(history[f])
            del history[f]

    def frames_to_drop(self, streams: Sequence[int], pages: int) -> int:
        pages = operator.index(pages)
        if pages <= 0:
            return 0
        lengths = {operator.index(s): self.num_frames(s) for s in streams}  # a repeated stream frees once
        # Dropping f frames from each frees L * sum(min(f, n_s)): walk the sorted lengths.
        needed_frames = -(-pages // self.num_layers)
        if sum(lengths.values()) < needed_frames:
            return -1
        ordered = sorted(lengths.values())
        freed_below = 0  # frames of the streams shorter than the current segment
        for i, n in enumerate(ordered):
            longer = len(ordered) - i  # streams holding >= n frames
            if freed_below + n * longer >= needed_frames:
                return -(-(needed_frames - freed_below) // longer)
            freed_below += n
        raise AssertionError("unreachable: the total was checked above")

    def locations(self, stream: int, frame: int) -> list[int]:
        history = self._frames(stream, "locations")
        frame = operator.index(frame)
        if frame < 0 or frame >= len(history):
            raise IndexError(f"locations: frame {frame} of stream {stream} out of range [0, {len(history)})")
        return list(history[frame])

    def usage(self) -> dict[str, int]:
        pages_used = self._gpu.used + self._host.used
        return {"gpu_capacity": self._gpu.capacity, "gpu_used": self._gpu.used,
                "host_capacity": self._host.capacity, "host_used": self._host.used,
                "pages_used": pages_used, "shared_pages": 0, "page_references": pages_used,
                "num_streams": len(self._streams)}

    def check_invariants(self) -> None:
        def fail(what: str) -> None:
            raise RuntimeError(f"PagedMemory invariant broken: {what}")

        owners: dict[int, int] = {}  # location -> stream
        for stream, history in self._streams.items():
            for f, frame in enumerate(history):
                if len(frame) != self.num_layers:
                    fail(f"stream {stream} frame {f} holds {len(frame)} pages for {self.num_layers} layers")
                for loc in frame:
                    tier, slot = (self._gpu, loc) if loc >= 0 else (self._host, -1 - loc)
                    if slot >= tier.capacity or not tier.in_use[slot]:
                        fail(f"stream {stream} frame {f} sits in a free {tier.name} slot {slot}")
                    if loc in owners:
                        fail(f"{tier.name} slot {slot} owned by stream {owners[loc]} and stream {stream}")
                    owners[loc] = stream
        on_gpu = sum(1 for loc in owners if loc >= 0)
        for tier, on_tier in ((self._gpu, on_gpu), (self._host, len(owners) - on_gpu)):
            if on_tier != tier.used:
                fail(f"{tier.name} counts {tier.used} used but {on_tier} pages there")
            if len(set(tier.free)) != len(tier.free) or any(tier.in_use[s] for s in tier.free):
                fail(f"{tier.name} free list holds a slot twice or a slot in use")
        if self._streams and max(self._streams) >= self._next_stream:
            fail(f"stream id {max(self._streams)} not below the next id {self._next_stream}")

    def _release(self, frame: tuple[int, ...]) -> None:
        for loc in frame:
            if loc >= 0:
                self._gpu.release(loc)
            else:
                self._host.release(-1 - loc)


def _cpp_missing_reason() -> str | None:
    """None when CppPageTable can be built here, else why not."""
    if not _ext.extension_available():
        return _ext.missing_reason()
    if not hasattr(_ext.load().PagedMemory, "place"):
        return ("lrag_engine._C predates PagedMemory.place/locations; rebuild it with "
                "`python setup.py build_ext --inplace`")
    return None


# "auto" resolves to this environment variable's value when it is set ("cpp" or
# "python"): the test suite runs the engine over both backends this way.
ENV_VAR = "LRAG_PAGE_TABLE"


def page_table_kind(kind: str) -> str:
    """The backend ("cpp" or "python") that ``make_page_table(kind, ...)`` builds here;
    "auto" is ``$LRAG_PAGE_TABLE`` when set, else cpp when the extension imports. ValueError
    naming a kind not in PAGE_TABLE_KINDS."""
    if kind not in PAGE_TABLE_KINDS:
        raise ValueError(f"page table kind must be one of {PAGE_TABLE_KINDS}, got {kind!r}")
    if kind == "auto":
        forced = os.environ.get(ENV_VAR)
        if forced:
            if forced not in ("cpp", "python"):
                raise ValueError(f"{ENV_VAR} must be 'cpp' or 'python', got {forced!r}")
            return forced
        return "cpp" if _cpp_missing_reason() is None else "python"
    return kind


def make_page_table(kind: str, num_layers: int, gpu_slots: int, host_slots: int) -> PageTable:
    """A page table of the given backend: "cpp" (ImportError with the reason when the
    extension is not built), "python", or "auto" (see :func:`page_table_kind`)."""
    if page_table_kind(kind) == "cpp":
        return CppPageTable(num_layers, gpu_slots, host_slots)
    return PyPageTable(num_layers, gpu_slots, host_slots)


def backend_name(table: PageTable) -> str:
    """"cpp" or "python"."""
    return table.kind


__all__ = ["PAGE_TABLE_KINDS", "CapacityError", "PageTable", "CppPageTable", "PyPageTable", "make_page_table",
           "page_table_kind", "backend_name"]
