"""splice_sources: one launch over two page sources (a window pool and a history pool),
the Triton kernel (interpreter on the CPU) and the float32 reference vs an independent
float64 expectation (page values decoded here, complex-number RoPE), over odd sizes.

The engine side: with kernels="triton" every block splices its whole context (sinks,
retrieved and local frames, every layer) in exactly one launch.
"""
import pytest
import torch

from lrag_engine import Engine, MemoryConfig, RuntimeConfig
from lrag_engine.ops import splice as splice_mod
from lrag_engine.ops.rope import RopeTables
from lrag_engine.ops.splice import PageSource, splice, splice_sources
from lrag_engine.testing import assert_close

from test_splice import SENTINEL, rotate_float64
from test_splice_chunks import LAYOUTS
from test_splice_fp8 import e4m3_float64, random_codes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_window(gen, pages, page_shape, dtype, strided):
    """The window source: one [P, N, H, D] tensor (pages at a doubled stride if ``strided``)."""
    k = torch.randn(pages * (2 if strided else 1), *page_shape, generator=gen).to(dtype)
    v = torch.randn(pages * (2 if strided else 1), *page_shape, generator=gen).to(dtype)
    if strided:
        k, v = k[::2], v[::2]
    return k, v


def make_history(gen, rows, chunk_pages, page_shape, dtype, fp8):
    """The history source as chunk lists: (k chunks, v chunks, k scale chunks, v scale chunks,
    float64 K pages, float64 V pages) with page ``p`` at index ``p`` of the float64 pages
    (pages past a short chunk's rows are NaN: never named by an id)."""
    heads = page_shape[1]
    if fp8:
        ks = [random_codes((r, *page_shape), gen) for r in rows]
        vs = [random_codes((r, *page_shape), gen) for r in rows]
        sk = [torch.exp(torch.randn(r, heads, generator=gen)).clamp(max=32) for r in rows]
        sv = [torch.exp(torch.randn(r, heads, generator=gen)).clamp(max=32) for r in rows]
        dk = [e4m3_float64(c) * s.double()[:, None, :, None] for c, s in zip(ks, sk)]
        dv = [e4m3_float64(c) * s.double()[:, None, :, None] for c, s in zip(vs, sv)]
    else:
        ks = LAYOUTS["separate"](rows, chunk_pages, page_shape, dtype, gen)
        vs = LAYOUTS["carved"](rows, chunk_pages, page_shape, dtype, gen)
        sk = sv = None
        dk, dv = [c.double() for c in ks], [c.double() for c in vs]
    full_k = torch.full((len(rows) * chunk_pages, *page_shape), float("nan"), dtype=torch.float64)
    full_v = full_k.clone()
    for c, r in enumerate(rows):
        full_k[c * chunk_pages:c * chunk_pages + r] = dk[c]
        full_v[c * chunk_pages:c * chunk_pages + r] = dv[c]
    valid = [c * chunk_pages + i for c, r in enumerate(rows) for i in range(r)]
    return ks, vs, sk, sv, full_k, full_v, valid


CASES = [
    # out dtype, history FP8, heads, grid (tokens per frame), head dim, batch, chunk rows, chunk_pages,
    # frame offset, strided window pages, strided outputs
    pytest.param("fp32", False, 1, (1, 3), 6, 1, [2, 1], 2, 0, False, False, id="H1-N3-D6-B1-fp32"),
    pytest.param("bf16", False, 3, (3, 5), 12, 2, [3, 3, 2], 3, 1, True, True, id="H3-N15-D12-B2-bf16-strided"),
    pytest.param("fp16", False, 12, (1, 5), 18, 3, [4, 1], 4, 0, False, True, id="H12-N5-D18-B3-fp16"),
    pytest.param("fp32", True, 3, (3, 3), 30, 2, [3, 2], 3, 2, False, False, id="H3-N9-D30-B2-fp8-fp32"),
    pytest.param("bf16", True, 5, (1, 7), 14, 3, [1, 1, 1], 1, 0, True, True, id="H5-N7-D14-B3-fp8-bf16"),
    pytest.param("fp16", True, 12, (3, 1), 12, 1, [5], 5, 1, False, False, id="H12-N3-D12-B1-fp8-fp16"),
]


@pytest.mark.parametrize("out_name, fp8, heads, grid, head_dim, batch, rows, chunk_pages, frame_offset, "
                         "strided_window, strided_out", CASES)
def test_window_and_history_in_one_launch_vs_float64(device, out_name, fp8, heads, grid, head_dim, batch, rows,
                                                     chunk_pages, frame_offset, strided_window, strided_out):
    dtype = DTYPES[out_name]
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim * 10 + batch)
    n = grid[0] * grid[1]
    page_shape = (n, heads, head_dim)
    layers, window_pages, max_frames = 2, 2 * batch * 4, 16
    # context frames: [sink | retrieved x 2 | local x 3]
    source = torch.tensor([0, 1, 1, 0, 0, 0])
    frames = source.numel()
    win_k, win_v = make_window(gen, window_pages, page_shape, dtype, strided_window)
    ks, vs, sk, sv, hist_k, hist_v, valid = make_history(gen, rows, chunk_pages, page_shape, dtype, fp8)
    win_ids = torch.randint(0, window_pages, (layers, batch, frames), generator=gen)
    hist_ids = torch.tensor(valid)[torch.randint(0, len(valid), (layers, batch, frames), generator=gen)]
    ids = torch.where(source == 0, win_ids, hist_ids)
    ids[torch.rand(ids.shape, generator=gen) < 0.2] = -1
    ids[0, 0, 1] = valid[-1]       # the last row of the last (short) chunk is read
    ids[layers - 1, batch - 1, 3] = -1
    positions = torch.randint(0, max_frames, (batch, frames), generator=gen)
    tables = RopeTables.build(head_dim, *grid, max_frames=max_frames, device=device)
    ctx = (frame_offset + frames + 1) * n

    # float64 expectation, NaN where nothing may be written
    want_k = torch.full((layers, batch, ctx, heads, head_dim), float("nan"), dtype=torch.float64)
    want_v = want_k.clone()
    for l in range(layers):
        for b in range(batch):
            for j in range(frames):
                p = int(ids[l, b, j])
                if p < 0:
                    continue
                k, v = (win_k[p].double(), win_v[p].double()) if source[j] == 0 else (hist_k[p], hist_v[p])
                rows_j = slice((frame_offset + j) * n, (frame_offset + j + 1) * n)
                want_k[l, b, rows_j] = rotate_float64(k, int(positions[b, j]), *grid)
                want_v[l, b, rows_j] = v

    sources = [PageSource(win_k.to(device), win_v.to(device)),
               PageSource([c.to(device) for c in ks], [c.to(device) for c in vs], chunk_pages,
                          None if sk is None else [s.to(device) for s in sk],
                          None if sv is None else [s.to(device) for s in sv])]
    outs = {}
    for mode in ("triton", "reference"):
        pad = 4 if strided_out and mode == "triton" else 0
        # a strided output: this stream's rows of a wider context, head dim padded
        buf_k = torch.full((layers, batch + 1, ctx, heads, head_dim + pad), SENTINEL, dtype=dtype, device=device)
        buf_v = buf_k.clone()
        out_k, out_v = buf_k[:, 1:, ..., :head_dim], buf_v[:, 1:, ..., :head_dim]
        splice_sources(sources, ids.to(device), source.to(device), positions.to(device), tables, out_k, out_v,
                       frame_offset, mode=mode)
        assert (buf_k[:, 0] == SENTINEL).all() and (buf_v[:, 0] == SENTINEL).all(), f"{mode}: another row written"
        for got, want, name in ((out_k, want_k, "k"), (out_v, want_v, "v")):
            untouched = want.isnan()
            assert (got.cpu()[untouched] == SENTINEL).all(), f"{mode} {name}: a -1 frame or a row outside was written"
            assert_close(got.cpu().double()[~untouched], want[~untouched], dtype=dtype, name=f"{mode} {name}")
        outs[mode] = (out_k.cpu(), out_v.cpu())
    assert_close(outs["triton"][0], outs["reference"][0], dtype=dtype, name="kernel k vs reference")
    if fp8 and dtype == torch.bfloat16 and device.type == "cpu":
        # The Triton interpreter rounds float32 -> bfloat16 toward zero (the GPU to nearest
        # even, like torch): the decoded V may sit one bfloat16 step from the reference's.
        assert_close(outs["triton"][1], outs["reference"][1], dtype=dtype, name="kernel v vs reference")
    else:
        # V: a bit-exact copy, or one rounding of code * scale on both sides
        assert torch.equal(outs["triton"][1], outs["reference"][1]), "kernel v differs from the reference"


@pytest.mark.parametrize("heads, grid, head_dim", [(1, (1, 1), 6), (3, (1, 3), 12), (12, (3, 3), 12),
                                                   (7, (5, 3), 42)])
def test_rows_layout_covers_every_token_and_head(device, heads, grid, head_dim):
    """A page as [N x H, D] rows: a tile may start mid-token; every (token, head) row is
    written exactly as the float64 rotation, none outside the frame (one source)."""
    gen = torch.Generator().manual_seed(heads + head_dim)
    n = grid[0] * grid[1]
    pool_k = torch.randn(3, n, heads, head_dim, generator=gen)
    pool_v = torch.randn(3, n, heads, head_dim, generator=gen)
    tables = RopeTables.build(head_dim, *grid, max_frames=5, device=device)
    ids = torch.tensor([[[2, -1, 0]]])
    positions = torch.tensor([4, 0, 1])
    out_k = torch.full((1, 1, 4 * n, heads, head_dim), SENTINEL, device=device)
    out_v = out_k.clone()
    splice(pool_k.to(device), pool_v.to(device), ids.to(device), positions.to(device), tables, out_k, out_v,
           frame_offset=1, mode="triton")
    out_k, out_v = out_k.cpu(), out_v.cpu()
    for frame in (0, 2):   # before frame_offset, and the -1 entry
        rows = slice(frame * n, (frame + 1) * n)
        assert (out_k[0, 0, rows] == SENTINEL).all() and (out_v[0, 0, rows] == SENTINEL).all()
    for frame, page, pos in ((1, 2, 4), (3, 0, 1)):
        rows = slice(frame * n, (frame + 1) * n)
        assert_close(out_k[0, 0, rows].double(), rotate_float64(pool_k[page], pos, *grid), dtype=torch.float32,
                     name=f"k frame {frame}")
        assert torch.equal(out_v[0, 0, rows], pool_v[page])


def test_source_argument_errors():
    tables = RopeTables.build(12, 1, 3, max_frames=4)
    pool = torch.zeros(4, 3, 2, 12)
    out = torch.zeros(1, 1, 6, 2, 12)
    ids = torch.zeros(1, 1, 2, dtype=torch.int64)
    pos = torch.zeros(2, dtype=torch.int64)
    two = [PageSource(pool, pool), PageSource([pool[:2]], [pool[:2]], 2)]
    with pytest.raises(ValueError, match="need a source index per frame"):
        splice_sources(two, ids, None, pos, tables, out, out.clone())
    with pytest.raises(ValueError, match=r"source must be an int32/int64 \[Fc=2\]"):
        splice_sources(two, ids, torch.zeros(3, dtype=torch.int64), pos, tables, out, out.clone())
    with pytest.raises(ValueError, match=r"source entries must lie in \[0, 2\)"):
        splice_sources(two, ids, torch.tensor([0, 2]), pos, tables, out, out.clone())
    with pytest.raises(ValueError, match=r"list of 1..2 PageSource"):
        splice_sources(two * 2, ids, torch.tensor([0, 1]), pos, tables, out, out.clone())
    with pytest.raises(ValueError, match=r"source 1 holds pages \(3, 2, 6\)"):
        splice_sources([two[0], PageSource(pool[..., :6], pool[..., :6])], ids, torch.tensor([0, 1]), pos, tables,
                       out, out.clone())
    # An id of the history source beyond its 2 pages (valid for the 4-page window).
    with pytest.raises(ValueError, match=r"source 1\): page_ids must lie in \[-1, 2\)"):
        splice_sources(two, torch.tensor([[[3, 3]]]), torch.tensor([0, 1]), pos, tables, out, out.clone())
    with pytest.raises(ValueError, match="out_k dtype"):
        splice_sources([two[0], PageSource(pool.half(), pool.half())], ids, torch.tensor([0, 1]), pos, tables,
                       out, out.clone())


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_window_on_device_history_in_pinned_host_chunks_on_gpu(fp8):
    """One launch over a device window pool and a history of device and pinned host chunks
    (host chunk first), at Wan-like page shapes (12 heads, not a power of two)."""
    grid, heads, head_dim, chunk_pages, layers, batch = (6, 10), 12, 128, 3, 3, 2
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(2)
    tables = RopeTables.build(head_dim, *grid, max_frames=32, device="cuda")
    page = (n, heads, head_dim)
    win_k = torch.randn(layers * batch * 6, *page, generator=gen).bfloat16().cuda()
    win_v = torch.randn(layers * batch * 6, *page, generator=gen).bfloat16().cuda()
    rows = (3, 3, 2)
    if fp8:
        ks, vs = ([random_codes((r, *page), gen) for r in rows] for _ in range(2))
        sk, sv = ([torch.exp(torch.randn(r, heads, generator=gen)) for r in rows] for _ in range(2))
    else:
        ks, vs = ([torch.randn(r, *page, generator=gen).bfloat16() for r in rows] for _ in range(2))
        sk = sv = None

    def place(chunks):   # chunk 0 and 2 pinned on the host, chunk 1 on the device
        return None if chunks is None else [c.cuda() if i == 1 else c.pin_memory() for i, c in enumerate(chunks)]

    sources = [PageSource(win_k, win_v), PageSource(place(ks), place(vs), chunk_pages, place(sk), place(sv))]
    source = torch.tensor([0, 1, 1, 1, 0, 0], device="cuda")
    valid = [c * chunk_pages + i for c, r in enumerate(rows) for i in range(r)]
    hist_ids = torch.tensor(valid)[torch.randint(0, len(valid), (layers, batch, 6), generator=gen)]
    win_ids = torch.randint(0, win_k.shape[0], (layers, batch, 6), generator=gen)
    ids = torch.where(source.cpu() == 0, win_ids, hist_ids)
    ids[1, 0, 2] = -1
    positions = torch.randint(0, 32, (batch, 6), generator=gen).cuda()
    outs = [torch.full((layers, batch, 7 * n, heads, head_dim), SENTINEL, dtype=torch.bfloat16, device="cuda")
            for _ in range(4)]
    splice_sources(sources, ids.cuda(), source, positions, tables, outs[0], outs[1], 1, mode="reference")
    splice_sources(sources, ids.cuda(), source, positions, tables, outs[2], outs[3], 1, mode="triton")
    assert_close(outs[2], outs[0], name="kernel k")
    assert torch.equal(outs[3], outs[1])
    assert (outs[2][:, :, :n] == SENTINEL).all() and (outs[2][1, 0, 3 * n:4 * n] == SENTINEL).all()


# ---------------------------------------------------------------- engine
# Window 6 with sink 1 and top_k 2: from the fourth block on, each block's context holds
# a sink, retrieved frames and local frames.
TINY_MEMORY = dict(window=6, sink=1, top_k=2, frames_per_block=2, recency_guard=1)
BLOCKS = 6


@pytest.mark.parametrize("history_dtype", [None, "fp8_e4m3"], ids=["bf16-like", "fp8"])
def test_engine_splices_each_block_in_one_launch(history_dtype, monkeypatch):
    """With kernels="triton" every block's context (sinks, retrieved and local frames,
    every layer) is one launch of the splice kernel, reading both sources once the
    history has frames; the video equals the run with the reference splice."""
    if torch.cuda.is_available():
        pytest.skip("counts launches in the Triton interpreter on the CPU; on CUDA, tests/oracle runs the engine "
                    "with the kernels")
    pytest.importorskip("triton")
    from lrag_engine.memory.cache import RetrievalCache

    def generate(kernels):
        launches, per_block = [], []
        kernel = splice_mod._splice_kernel

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(kwargs["TWO_SOURCES"])
                    return kernel[grid](*args, **kwargs)
                return launch

        commit = RetrievalCache.commit_block

        def counted_commit(self):
            before = len(launches)
            log = commit(self)
            per_block.append(launches[before:])
            return log

        with monkeypatch.context() as m:
            m.setattr(splice_mod, "_splice_kernel", Counted())
            m.setattr(splice_mod, "check_kernel_runnable", lambda *a: None)
            m.setattr(RetrievalCache, "commit_block", counted_commit)
            engine = Engine("tiny", MemoryConfig(**TINY_MEMORY, history_dtype=history_dtype),
                            RuntimeConfig(kernels=kernels), seed=3)
            result = engine.generate(BLOCKS * TINY_MEMORY["frames_per_block"], seed=5)
        return result.latents, per_block

    got, per_block = generate("triton")
    want, ref_blocks = generate("reference")
    assert len(per_block) == BLOCKS
    assert [len(b) for b in per_block[1:]] == [1] * (BLOCKS - 1), f"splice launches per block: {per_block}"
    assert any(b == [True] for b in per_block), "no block read the window and the history in one launch"
    assert all(b == [] for b in ref_blocks)
    assert_close(got, want, dtype=torch.float32, name="latents")
