"""Misuse of RetrievalAttention raises a clear error, and the object stays usable after it.

"Usable" is checked by comparison: a run that meets (and recovers from) the errors must
give bit-identical outputs and retrieval logs to an untouched run fed the same inputs.
Inputs are a pure function of (block, forward, layer), so extra or failed calls do not
change them.

"""
from __future__ import annotations

import re

import pytest
import torch

from lrag_engine import MemoryConfig, RetrievalAttention
from lrag_engine.ops.rope import RopeTables

LAYERS, HEADS, HEAD_DIM, GRID, FRAMES, BATCH, CHANNELS = 2, 2, 8, (2, 2), 2, 2, 4
TOKENS = GRID[0] * GRID[1]
L_BLOCK = FRAMES * TOKENS            # 8 tokens per block (!= HEADS, so [B, H, L, D] is recognisable)
MEMORY = MemoryConfig(window=6, sink=1, top_k=2, recency_guard=1, frames_per_block=FRAMES)
BLOCKS = 7                           # retrieval returns frames from block 4 on
RECACHE = 9                          # the "forward index" of the recache pass


def make(**kwargs) -> RetrievalAttention:
    args = dict(memory=MEMORY, positions="rope1d", batch=BATCH, latent_channels=CHANNELS, kernels="reference")
    args.update(kwargs)
    return RetrievalAttention(LAYERS, HEADS, HEAD_DIM, TOKENS, **args)


def qkv(block: int, forward: int, layer: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * block + 10 * forward + layer)
    return [torch.randn(BATCH, L_BLOCK, HEADS, HEAD_DIM, generator=g) for _ in range(3)]


def clean(block: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(123457 + block)
    return torch.randn(BATCH, FRAMES, CHANNELS, *GRID, generator=g)


def forward(attn, block: int, index: int, recache: bool, layers=range(LAYERS)) -> list[torch.Tensor]:
    fn = attn.attention(recache=recache)
    return [fn(layer, *qkv(block, index, layer)) for layer in layers]


def run_block(attn, block: int) -> tuple[list[torch.Tensor], list]:
    """One block exactly as the docstring shows (two denoising forwards)."""
    log = attn.begin_block()
    outs = forward(attn, block, 0, False) + forward(attn, block, 1, False)
    attn.end_block(clean(block))
    outs += forward(attn, block, RECACHE, True)
    return outs, log().selected


@pytest.fixture(scope="module")
def untouched() -> list[tuple[list[torch.Tensor], list]]:
    attn = make()
    runs = [run_block(attn, block) for block in range(BLOCKS)]
    attn.close()
    assert any(selected[0] for _, selected in runs), "the untouched run must retrieve frames"
    return runs


def same(outs, selected, expected, block) -> None:
    exp_outs, exp_selected = expected[block]
    assert selected == exp_selected, f"block {block}: retrieval changed after the errors"
    assert len(outs) == len(exp_outs)
    for i, (a, b) in enumerate(zip(outs, exp_outs)):
        assert torch.equal(a, b), f"block {block}: output {i} differs from the untouched run"


# ----------------------------------------------------------------------------- q / k / v

def _bad_calls():
    """(description, call(fn, q, k, v), exception, message pattern)."""
    def swap(index, value):
        def call(fn, q, k, v, layer):
            args = [q, k, v]
            args[index] = value(args[index])
            return fn(layer, *args)
        return call
    return [
        ("q float64", swap(0, lambda t: t.double()), ValueError, r"q dtype torch\.float64 differs from the cache's "
                                                                 r"torch\.float32"),
        ("v bfloat16", swap(2, lambda t: t.bfloat16()), ValueError, r"v dtype torch\.bfloat16 differs"),
        ("k as [B, H, L, D]", swap(1, lambda t: t.transpose(1, 2).contiguous()), ValueError,
         r"it looks like \[B, H, L, D\]"),
        ("q wrong batch", swap(0, lambda t: torch.cat([t, t[:1]])), ValueError,
         r"batch 3, but this attention was built for batch 2"),
        ("k one token more", swap(1, lambda t: torch.cat([t, t[:, :1]], dim=1)), ValueError,
         r"k must be \[B=2, L=8 \(frames x tokens per frame\), H=2, D=8\], got \[2, 9, 2, 8\]"),
        ("v flattened heads", swap(2, lambda t: t.flatten(2)), ValueError, r"v must be \[B=2, L=8.*got \[2, 8, 16\]"),
        ("q not a tensor", swap(0, lambda t: t.tolist()), TypeError, r"q must be a torch\.Tensor, got list"),
        ("k on another device", swap(1, lambda t: torch.empty(t.shape, device="meta")), ValueError,
         r"k is on meta, the cache on cpu"),
        ("layer = L", lambda fn, q, k, v, layer: fn(LAYERS, q, k, v), ValueError,
         r"layer must be an int in \[0, 2\), got 2"),
        ("layer = -1", lambda fn, q, k, v, layer: fn(-1, q, k, v), ValueError, r"layer must be an int in \[0, 2\)"),
        ("layer = True", lambda fn, q, k, v, layer: fn(True, q, k, v), ValueError, r"got True"),
        ("layer = 0.0", lambda fn, q, k, v, layer: fn(0.0, q, k, v), ValueError, r"got 0\.0"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("desc, call, exc, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_qkv_raises(desc, call, exc, match):
    attn = make()
    attn.begin_block()
    fn = attn.attention(recache=False)
    q, k, v = qkv(0, 0, 0)
    with pytest.raises(exc, match=match):
        call(fn, q, k, v, 0)


def test_bad_calls_leave_no_trace(untouched):
    """Every bad call, in every forward (recache pass included) of every block, then the
    good call: outputs and retrieval equal the untouched run bit for bit."""
    attn = make()
    for block in range(BLOCKS):
        log = attn.begin_block()
        outs = []
        for index, recache in ((0, False), (1, False), (RECACHE, True)):
            if recache:
                attn.end_block(clean(block))
            fn = attn.attention(recache=recache)
            for layer in range(LAYERS):
                q, k, v = qkv(block, index, layer)
                for desc, call, exc, match in BAD_CALLS:
                    with pytest.raises(exc, match=match):
                        call(fn, q, k, v, layer)
                outs.append(fn(layer, q, k, v))
        same(outs, log().selected, untouched, block)
    attn.close()


def test_non_contiguous_qkv_accepted(untouched):
    """[B, L, H, D] views of [B, H, L, D] tensors (the hint's x.transpose(1, 2)) are fine."""
    attn = make()
    for block in range(BLOCKS):
        log = attn.begin_block()
        outs = []
        for index, recache in ((0, False), (1, False), (RECACHE, True)):
            if recache:
                attn.end_block(clean(block))
            fn = attn.attention(recache=recache)
            for layer in range(LAYERS):
                views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(block, index, layer)]
                assert not views[0].is_contiguous()
                outs.append(fn(layer, *views))
        same(outs, log().selected, untouched, block)


# ----------------------------------------------------------------------------- construction

class ShortTables:
    """A user's encoding whose tables hold 4 positions whatever max_frames asks."""

    def tables(self, max_frames, tokens_per_frame, head_dim, device):
        ones = torch.ones(4, head_dim // 2)
        empty = torch.empty(tokens_per_frame, 0)
        return RopeTables(ones, torch.zeros_like(ones), empty, empty.clone())


class NotTables:
    def tables(self, max_frames, tokens_per_frame, head_dim, device):
        return {"cos": torch.ones(max_frames, head_dim // 2)}


class NarrowTables:
    """Tables covering half the head's channels."""

    def tables(self, max_frames, tokens_per_frame, head_dim, device):
        ones = torch.ones(max_frames, head_dim // 4)
        empty = torch.empty(tokens_per_frame, 0)
        return RopeTables(ones, torch.zeros_like(ones), empty, empty.clone())


def _no_dim(frames):
    return frames.float().mean(dim=(-2, -1))


class ZeroDim:
    dim = 0

    def __call__(self, frames):
        return frames.float().mean(dim=(-2, -1))


class NotCallable:
    dim = CHANNELS


CONSTRUCTION = [
    ("odd head_dim", dict(head_dim=7), ValueError, r"head_dim must be even \(rotations work on channel pairs\), got 7"),
    ("zero layers", dict(num_layers=0), ValueError, r"num_layers must be a positive int, got 0"),
    ("batch 0", dict(batch=0), ValueError, r"batch must be a positive int, got 0"),
    ("wan3d without grid", dict(positions="wan3d"), ValueError, r"positions='wan3d' needs grid=\(grid_h, grid_w\)"),
    ("wan3d grid mismatch", dict(positions="wan3d", grid=(2, 3)), ValueError,
     r"Wan3DRope: a 2x3 grid has 6 tokens per frame, but tokens_per_frame=4"),
    ("unknown positions", dict(positions="rope2d"), ValueError, r"positions must be one of \('wan3d', 'rope1d', "
                                                                r"'none'\) or a PositionEncoding, got 'rope2d'"),
    ("positions without tables()", dict(positions=object()), TypeError, r"an object with \.tables\("),
    ("tables shorter than the window", dict(positions=ShortTables()), ValueError,
     r"temporal tables hold 4 positions, the window needs 6"),
    ("prebuilt tables shorter than the window",
     dict(positions=RopeTables(torch.ones(5, 4), torch.zeros(5, 4), torch.empty(TOKENS, 0), torch.empty(TOKENS, 0))),
     ValueError, r"temporal tables hold 5 positions, the window needs 6"),
    ("tables() not RopeTables", dict(positions=NotTables()), TypeError, r"\.tables\(\.\.\.\) must return RopeTables"),
    ("tables too narrow", dict(positions=NarrowTables()), ValueError, r"pairs cover 4 channels, head_dim=8"),
    ("no descriptor, no latent_channels", dict(latent_channels=None), ValueError,
     r"give descriptor= \(frames -> embeddings\) or latent_channels="),
    ("descriptor without .dim", dict(descriptor=_no_dim, latent_channels=None), ValueError,
     r"descriptor must be callable with a positive int \.dim, got None"),
    ("descriptor with .dim 0", dict(descriptor=ZeroDim()), ValueError, r"positive int \.dim, got 0"),
    ("descriptor not callable", dict(descriptor=NotCallable()), ValueError, r"descriptor must be callable"),
    ("memory not a MemoryConfig", dict(memory={"window": 6}), TypeError, r"memory must be a MemoryConfig, got dict"),
    ("unknown page_table", dict(page_table="bogus"), ValueError, r"page table kind must be one of"),
    ("unknown attention_backend", dict(attention_backend="bogus"), ValueError,
     r"attention backend 'bogus' is not installed"),
    ("unknown dtype", dict(dtype="float8"), ValueError, r"dtype 'float8' is not supported"),
]


@pytest.mark.parametrize("desc, changes, exc, match", CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_construction_errors(desc, changes, exc, match):
    args = dict(num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=TOKENS, memory=MEMORY,
                positions="rope1d", batch=BATCH, latent_channels=CHANNELS, kernels="reference")
    args.update(changes)
    with pytest.raises(exc, match=match):
        RetrievalAttention(**args)


def test_long_enough_user_tables_accepted():
    """The check is about length, not the encoding: tables of exactly the window work."""
    class Exact(ShortTables):
        def tables(self, max_frames, tokens_per_frame, head_dim, device):
            ones = torch.ones(max_frames, head_dim // 2)
            empty = torch.empty(tokens_per_frame, 0)
            return RopeTables(ones, torch.zeros_like(ones), empty, empty.clone())
    attn = make(positions=Exact())
    for block in range(BLOCKS):
        run_block(attn, block)


# ----------------------------------------------------------------------------- block protocol

def test_skipping_end_block(untouched):
    attn = make()
    for block in range(3):
        run_block(attn, block)
    log = attn.begin_block()
    outs = forward(attn, 3, 0, False) + forward(attn, 3, 1, False)
    outs += forward(attn, 3, RECACHE, True)                      # recache ran, end_block did not
    with pytest.raises(RuntimeError, match=r"begin_block: end_block\(clean\) was not called for block 3"):
        attn.begin_block()
    attn.end_block(clean(3))                                     # recover
    same(outs, log().selected, untouched, 3)
    for block in range(4, BLOCKS):
        same(*run_block(attn, block), untouched, block)


@pytest.mark.parametrize("layers, missing", [((), "[0, 1]"), ((0,), "[1]"), ((1,), "[0]")])
def test_skipping_recache(untouched, layers, missing):
    attn = make()
    for block in range(4):
        run_block(attn, block)
    log = attn.begin_block()
    outs = forward(attn, 4, 0, False) + forward(attn, 4, 1, False)
    attn.end_block(clean(4))
    fn = attn.attention(recache=True)
    for layer in layers:
        fn(layer, *qkv(4, RECACHE, layer))
    for _ in range(2):                                           # it keeps refusing
        with pytest.raises(RuntimeError, match=r"the recache pass of block 4 did not run for layers "
                                               + re.escape(missing)):
            attn.begin_block()
    outs += forward(attn, 4, RECACHE, True)                      # recover: a full recache pass
    same(outs, log().selected, untouched, 4)
    for block in range(5, BLOCKS):
        same(*run_block(attn, block), untouched, block)


def test_recache_layer_that_raised_is_missing():
    """A layer whose recache call raised stored nothing, and begin_block says so."""
    attn = make()
    attn.begin_block()
    attn.end_block(clean(0))
    fn = attn.attention(recache=True)
    q, k, v = qkv(0, RECACHE, 0)
    fn(0, q, k, v)
    with pytest.raises(ValueError, match="dtype"):
        fn(1, q.double(), k, v)
    with pytest.raises(RuntimeError, match=r"did not run for layers \[1\]"):
        attn.begin_block()


def test_recache_finished_by_the_same_callable(untouched):
    """Layers of one recache pass may come in any order, as long as all come."""
    attn = make()
    for block in range(BLOCKS):
        log = attn.begin_block()
        outs = forward(attn, block, 0, False) + forward(attn, block, 1, False)
        attn.end_block(clean(block))
        fn = attn.attention(recache=True)
        recached = {layer: fn(layer, *qkv(block, RECACHE, layer)) for layer in reversed(range(LAYERS))}
        same(outs + [recached[layer] for layer in range(LAYERS)], log().selected, untouched, block)


def test_end_block_twice_and_before_begin_block(untouched):
    attn = make()
    message = r"end_block: no block is running \(call begin_block first, and end_block once per block\)"
    with pytest.raises(RuntimeError, match=message):
        attn.end_block(clean(0))
    for block in range(BLOCKS):
        log = attn.begin_block()
        outs = forward(attn, block, 0, False) + forward(attn, block, 1, False)
        attn.end_block(clean(block))
        with pytest.raises(RuntimeError, match=message):
            attn.end_block(clean(block))
        with pytest.raises(RuntimeError, match=message):
            attn.end_block(clean(block + 1))                     # a different clean must not overwrite either
        outs += forward(attn, block, RECACHE, True)
        same(outs, log().selected, untouched, block)


def test_end_block_bad_clean(untouched):
    attn = make()
    for block in range(BLOCKS):
        log = attn.begin_block()
        outs = forward(attn, block, 0, False) + forward(attn, block, 1, False)
        good = clean(block)
        message = r"end_block: clean must be the block's output \[B=2, F=2, C, \.\.\.\]"
        for bad in (good[:1], good[:, :1], good[0, 0], good.tolist()):
            with pytest.raises(ValueError, match=message):
                attn.end_block(bad)
        with pytest.raises(ValueError, match=r"frames must be \[N, C, H, W\] with 4 channels"):
            attn.end_block(good[:, :, :3])                       # the descriptor refuses 3 channels
        attn.end_block(good)
        outs += forward(attn, block, RECACHE, True)
        same(outs, log().selected, untouched, block)


def test_descriptor_returning_the_wrong_shape():
    class Wrong:
        dim = CHANNELS

        def __call__(self, frames):
            return frames.float().mean(dim=(-2, -1))[:, :2]
    attn = make(descriptor=Wrong())
    attn.begin_block()
    with pytest.raises(ValueError, match=r"descriptor returned \(4, 2\) for 4 frames; expected \[4, 4\] \(its \.dim\)"):
        attn.end_block(clean(0))


def test_attention_before_begin_block(untouched):
    attn = make()
    for recache in (False, True):
        with pytest.raises(RuntimeError, match=r"attention: called before begin_block"):
            attn.attention(recache=recache)
    for block in range(BLOCKS):
        same(*run_block(attn, block), untouched, block)


def test_begin_block_wrong_frames(untouched):
    attn = make()
    with pytest.raises(ValueError, match=r"begin_block: frames must be frames_per_block=2, got 3"):
        attn.begin_block(3)
    for block in range(BLOCKS):
        same(*run_block(attn, block), untouched, block)


def test_begin_block_after_close():
    attn = make()
    run_block(attn, 0)
    attn.close()
    attn.close()                                                 # idempotent
    with pytest.raises(RuntimeError, match=r"begin_block: this retrieval attention is closed"):
        attn.begin_block()
    with make() as ctx:
        run_block(ctx, 0)
    with pytest.raises(RuntimeError, match=r"closed"):
        ctx.begin_block()


def test_begin_block_after_close_before_any_block():
    attn = make()
    attn.close()
    with pytest.raises(RuntimeError, match=r"closed"):
        attn.begin_block()


def test_start_retrieval_after_end_block_is_equivalent(untouched):
    """The documented place for start_retrieval (after end_block, before or after the
    recache pass) changes nothing."""
    attn = make()
    for block in range(BLOCKS):
        log = attn.begin_block()
        outs = forward(attn, block, 0, False) + forward(attn, block, 1, False)
        attn.end_block(clean(block))
        if block % 2:
            attn.start_retrieval()
        outs += forward(attn, block, RECACHE, True)
        if not block % 2:
            attn.start_retrieval()
            attn.start_retrieval()                               # twice: harmless
        same(outs, log().selected, untouched, block)


# ----------------------------------------------------------------------------- late misuse

def test_start_retrieval_before_end_block_is_refused_or_harmless(untouched):
    attn = make()
    for block in range(BLOCKS):
        log = attn.begin_block()
        outs = forward(attn, block, 0, False) + forward(attn, block, 1, False)
        with pytest.raises(RuntimeError, match="after end_block"):
            attn.start_retrieval()                               # too early: this block has no descriptors yet
        attn.end_block(clean(block))
        outs += forward(attn, block, RECACHE, True)
        same(outs, log().selected, untouched, block)             # so would a search redone after end_block


def test_stale_callable_is_refused():
    attn = make()
    run_block(attn, 0)
    attn.begin_block()
    old = attn.attention(recache=False)
    attn.end_block(clean(1))
    forward(attn, 1, RECACHE, True)
    attn.begin_block()
    with pytest.raises(RuntimeError, match="belongs to a block that is over"):
        old(0, *qkv(2, 0, 0))


def test_attention_after_close_is_refused():
    attn = make()
    attn.begin_block()
    attn.close()
    with pytest.raises(RuntimeError, match="closed"):
        attn.attention(recache=False)


def test_unknown_kernels_refused_at_construction():
    with pytest.raises(ValueError, match="kernels"):
        make(kernels="cuda")
