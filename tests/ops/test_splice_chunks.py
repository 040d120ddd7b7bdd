"""splice over a chunked page pool: kernel and reference vs the same splice on one
concatenated pool (ids remapped), plus read_pages and the chunk-list argument checks."""
import pytest
import torch

from lrag_engine.ops import splice as splice_mod
from lrag_engine.ops.rope import RopeTables
from lrag_engine.ops.splice import read_pages, splice, splice_ref
from lrag_engine.testing import assert_close

SENTINEL = -3.25  # exactly representable in every dtype, never produced by the data
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def carve_descending(rows, chunk_pages, page_shape, dtype, gen):
    """Chunks as contiguous slices of one buffer, chunk 0 at the highest address, with
    gaps between them (the kernel must not assume adjacency or list order)."""
    slot = chunk_pages + 2
    buf = torch.randn(slot * len(rows), *page_shape, generator=gen).to(dtype)
    return [buf[(len(rows) - 1 - i) * slot + 1:][:r] for i, r in enumerate(rows)]


def separate_highest_first(rows, chunk_pages, page_shape, dtype, gen):
    """Chunks allocated one by one, then listed so that chunk 0 has the highest address
    and the rest are in no address order; the last one may be a partial view."""
    full = [torch.randn(chunk_pages, *page_shape, generator=gen).to(dtype) for _ in rows]
    full.sort(key=lambda t: t.data_ptr(), reverse=True)
    rest = full[1:]
    perm = torch.randperm(len(rest), generator=gen).tolist()
    ordered = [full[0]] + [rest[i] for i in perm]
    return [t[:r] for t, r in zip(ordered, rows)]


LAYOUTS = {"carved": carve_descending, "separate": separate_highest_first}


def make_chunked_case(dtype, rows, chunk_pages, layout, grid=(3, 5), heads=3, head_dim=12, num_layers=2,
                      batch=2, frames=3, seed=0, id_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    page_shape = (n, heads, head_dim)
    chunks_k = LAYOUTS[layout](rows, chunk_pages, page_shape, dtype, gen)
    chunks_v = LAYOUTS[layout](rows, chunk_pages, page_shape, dtype, gen)
    valid = [c * chunk_pages + r for c, nr in enumerate(rows) for r in range(nr)]
    picks = torch.randint(0, len(valid), (num_layers, batch, frames), generator=gen)
    page_ids = torch.tensor(valid)[picks]
    page_ids.view(-1)[0] = valid[-1]          # the last row of the last chunk is read
    page_ids.view(-1)[-1] = valid[0]
    page_ids[0, 0, 1] = -1
    page_ids[num_layers - 1, batch - 1, 0] = -1
    positions = torch.randint(0, 20, (batch, frames), generator=gen)
    tables = RopeTables.build(head_dim, *grid, max_frames=20)
    return chunks_k, chunks_v, page_ids.to(id_dtype), positions, tables


def concat_and_remap(chunks, chunk_pages, page_ids):
    """The chunks as one [P, N, H, D] pool and the ids as rows of it (-1 kept)."""
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + c.shape[0])
    ids = page_ids.long()
    chunk, row = ids.div(chunk_pages, rounding_mode="floor"), ids.remainder(chunk_pages)
    remapped = torch.tensor(starts)[chunk.clamp_min(0)] + row
    return torch.cat(chunks), torch.where(ids >= 0, remapped, -1).to(page_ids.dtype)


def sentinel_outputs(dtype, num_layers, batch, ctx, heads, head_dim, extra_h_stride=0):
    return [torch.full((num_layers, batch, ctx, heads, head_dim + extra_h_stride), SENTINEL,
                       dtype=dtype)[..., :head_dim] for _ in range(2)]


CASES = [
    # dtype, chunk rows, chunk_pages, layout, grid, heads, head dim, frame offset, id dtype, 1-D positions,
    # strided outputs
    pytest.param("fp32", [4, 4, 3], 4, "carved", (3, 5), 3, 12, 1, torch.int64, False, False,
                 id="fp32-3chunks-last-partial-carved"),
    pytest.param("bf16", [1, 1, 1, 1, 1], 1, "separate", (3, 5), 3, 12, 0, torch.int32, True, False,
                 id="bf16-chunk_pages1-5chunks-separate"),
    pytest.param("fp32", [3, 3, 3, 3, 2], 3, "separate", (3, 5), 3, 24, 2, torch.int64, False, True,
                 id="fp32-5chunks-separate-strided-out"),
    pytest.param("bf16", [5, 5, 2], 5, "carved", (3, 5), 3, 24, 0, torch.int32, False, True,
                 id="bf16-3chunks-carved-strided-out"),
    pytest.param("fp16", [4], 6, "separate", (3, 5), 3, 12, 1, torch.int64, True, False,
                 id="fp16-one-partial-chunk"),
    # Several token tiles per frame, the last one partial.
    pytest.param("bf16", [2, 2, 1], 2, "carved", (5, 7), 5, 64, 1, torch.int64, False, False,
                 id="bf16-N35-H5-D64-tiles"),
]


@pytest.mark.parametrize("dtype_name, rows, chunk_pages, layout, grid, heads, head_dim, frame_offset, id_dtype, "
                         "flat_positions, strided", CASES)
def test_chunked_matches_concatenated_pool(dtype_name, rows, chunk_pages, layout, grid, heads, head_dim,
                                           frame_offset, id_dtype, flat_positions, strided):
    dtype = DTYPES[dtype_name]
    chunks_k, chunks_v, page_ids, positions, tables = make_chunked_case(
        dtype, rows, chunk_pages, layout, grid=grid, heads=heads, head_dim=head_dim, id_dtype=id_dtype,
        seed=len(rows) * 7 + head_dim + frame_offset)
    if len(chunks_k) > 1:
        ptrs = [c.data_ptr() for c in chunks_k]
        assert min(range(len(ptrs)), key=ptrs.__getitem__) != 0, "chunk 0 must not be the lowest address"
    if flat_positions:
        positions = positions[0]
    num_layers, batch, frames = page_ids.shape
    n = grid[0] * grid[1]
    ctx = (frame_offset + frames + 1) * n

    pool_k, ids_k = concat_and_remap(chunks_k, chunk_pages, page_ids)
    pool_v, _ = concat_and_remap(chunks_v, chunk_pages, page_ids)
    exp_k, exp_v = sentinel_outputs(dtype, num_layers, batch, ctx, heads, head_dim)
    splice_ref(pool_k, pool_v, ids_k, positions, tables, exp_k, exp_v, frame_offset)

    written = torch.zeros(num_layers, batch, ctx, dtype=torch.bool)
    for l, b, j in (page_ids >= 0).nonzero().tolist():
        written[l, b, (frame_offset + j) * n:(frame_offset + j + 1) * n] = True
        # V straight from the chunk that holds the page: the remapping is right.
        c, r = divmod(int(page_ids[l, b, j]), chunk_pages)
        assert torch.equal(exp_v[l, b, (frame_offset + j) * n:(frame_offset + j + 1) * n], chunks_v[c][r])

    for mode in ("reference", "triton"):
        out_k, out_v = sentinel_outputs(dtype, num_layers, batch, ctx, heads, head_dim, 4 if strided else 0)
        splice(chunks_k, chunks_v, page_ids, positions, tables, out_k, out_v, frame_offset, mode=mode,
               chunk_pages=chunk_pages)
        assert (out_k[~written] == SENTINEL).all() and (out_v[~written] == SENTINEL).all(), \
            f"{mode}: a skipped frame was written"
        assert_close(out_k, exp_k, dtype=dtype, name=f"{mode} k")
        assert torch.equal(out_v, exp_v), f"{mode}: v is not a bit-exact copy"
    out_k, out_v = sentinel_outputs(dtype, num_layers, batch, ctx, heads, head_dim)
    splice_ref(chunks_k, chunks_v, page_ids, positions, tables, out_k, out_v, frame_offset, chunk_pages=chunk_pages)
    assert_close(out_k, exp_k, dtype=dtype, name="splice_ref k")
    assert torch.equal(out_v, exp_v)


def test_offsets_are_from_the_lowest_chunk_and_cached():
    chunks_k, chunks_v, page_ids, positions, tables = make_chunked_case(torch.float32, [2, 2, 2], 2, "separate")
    pools = splice_mod._check_pools(chunks_k, chunks_v, 2, torch.device("cpu"))
    base_k, base_v, offsets, align = splice_mod._base_and_offsets(pools, torch.device("cpu"))
    assert align in (1, 2, 4, 8, 16) and (offsets % align == 0).all()
    for base, chunks, offs in ((base_k, chunks_k, offsets[:3]), (base_v, chunks_v, offsets[3:])):
        assert base.data_ptr() == min(c.data_ptr() for c in chunks)
        assert (offs >= 0).all()
        assert [base.data_ptr() + 4 * int(o) for o in offs] == [c.data_ptr() for c in chunks]
    entries = len(splice_mod._offset_cache)
    out_k, out_v = sentinel_outputs(torch.float32, 2, 2, 3 * 15, 3, 12)
    for _ in range(2):
        splice(chunks_k, chunks_v, page_ids, positions, tables, out_k, out_v, mode="triton", chunk_pages=2)
    assert len(splice_mod._offset_cache) == entries, "a steady state must reuse the cached offsets"
    assert splice_mod._base_and_offsets(pools, torch.device("cpu"))[2] is offsets


def test_empty_chunk_and_single_tensor_as_one_chunk():
    chunks_k, chunks_v, page_ids, positions, tables = make_chunked_case(torch.float32, [3, 3], 3, "carved")
    # A pool of one tensor and the same pages as a one-chunk list agree.
    pool_k, pool_v = torch.cat(chunks_k), torch.cat(chunks_v)
    ref = sentinel_outputs(torch.float32, 2, 2, 3 * 15, 3, 12)
    splice(pool_k, pool_v, page_ids, positions, tables, *ref, mode="reference")
    out = sentinel_outputs(torch.float32, 2, 2, 3 * 15, 3, 12)
    splice([pool_k], [pool_v], page_ids, positions, tables, *out, mode="triton", chunk_pages=6)
    assert torch.equal(out[1], ref[1])
    assert_close(out[0], ref[0], name="one-chunk k")
    # An empty chunk in the middle (no id names it) is skipped.
    empty = pool_k[:0]
    ids = torch.where(page_ids >= 3, page_ids + 3, page_ids)
    out = sentinel_outputs(torch.float32, 2, 2, 3 * 15, 3, 12)
    splice([chunks_k[0], empty, chunks_k[1]], [chunks_v[0], empty, chunks_v[1]], ids, positions, tables, *out,
           mode="triton", chunk_pages=3)
    assert torch.equal(out[1], ref[1])
    assert_close(out[0], ref[0], name="empty-chunk k")


def test_empty_chunk_list_writes_nothing():
    # A pool before its first chunk: all ids -1 (a fixed-size retrieval buffer with no history yet).
    _, _, page_ids, positions, tables = make_chunked_case(torch.float32, [2], 2, "carved")
    page_ids = torch.full_like(page_ids, -1)
    for mode in ("reference", "triton"):
        out_k, out_v = sentinel_outputs(torch.float32, 2, 2, 3 * 15, 3, 12)
        splice([], [], page_ids, positions, tables, out_k, out_v, mode=mode, chunk_pages=2)
        assert (out_k == SENTINEL).all() and (out_v == SENTINEL).all()
    with pytest.raises(ValueError, match="read_pages: pool is an empty chunk list"):
        read_pages([], torch.zeros(0, dtype=torch.int64), chunk_pages=2)


def test_read_pages():
    chunks, _, page_ids, _, _ = make_chunked_case(torch.bfloat16, [2, 2, 1], 2, "separate")
    pool, ids = concat_and_remap(chunks, 2, page_ids.clamp_min(0))
    got = read_pages(chunks, page_ids.clamp_min(0), chunk_pages=2)
    assert got.shape == (*page_ids.shape, 15, 3, 12)
    assert torch.equal(got, pool[ids])
    assert torch.equal(read_pages(pool, ids), pool[ids])
    assert torch.equal(read_pages(pool, ids[0, 0, 0]), pool[ids[0, 0, 0]])   # 0-d ids
    assert read_pages(chunks, torch.zeros(0, dtype=torch.int32), 2).shape == (0, 15, 3, 12)
    with pytest.raises(ValueError, match=r"read_pages: page_ids must lie in \[0, 5\)"):
        read_pages(chunks, page_ids, chunk_pages=2)          # holds a -1
    with pytest.raises(ValueError, match=r"read_pages: page_ids must lie in \[0, 5\)"):
        read_pages(chunks, torch.tensor([5]), chunk_pages=2)
    with pytest.raises(ValueError, match="read_pages: chunk_pages must be an int >= 1"):
        read_pages(chunks, torch.tensor([0]))
    with pytest.raises(ValueError, match="read_pages: page_ids must be an int32/int64 tensor"):
        read_pages(chunks, torch.tensor([0.0]), chunk_pages=2)


def _bad_chunk_cases():
    def chunk_k(i, fn):
        return lambda a: [fn(c) if j == i else c for j, c in enumerate(a["pool_k"])]

    return [
        ("chunk_pages-missing", dict(chunk_pages=lambda a: None), r"chunk_pages must be an int >= 1"),
        ("chunk_pages-zero", dict(chunk_pages=lambda a: 0), r"chunk_pages must be an int >= 1"),
        ("chunk_pages-bool", dict(chunk_pages=lambda a: True), r"chunk_pages must be an int >= 1"),
        ("kv-count", dict(pool_v=lambda a: a["pool_v"][:2]), r"pool_k has 3 chunks, pool_v 2"),
        ("kv-shape", dict(pool_v=lambda a: a["pool_v"][:2] + [a["pool_v"][2][:1]]), r"pool_v\[2\] is .*pool_k\[2\]"),
        ("tensor-and-list", dict(pool_v=lambda a: torch.cat(a["pool_v"])), r"both be tensors or both chunk lists"),
        ("empty-list-with-ids", dict(pool_k=lambda a: [], pool_v=lambda a: []), r"page_ids must lie in \[-1, 0\)"),
        ("empty-list-out-dtype", dict(pool_k=lambda a: [], pool_v=lambda a: [], out_v=lambda a: a["out_v"].double(),
                                      page_ids=lambda a: torch.full_like(a["page_ids"], -1)), r"out_v dtype"),
        ("too-many-rows", dict(chunk_pages=lambda a: 3), r"pool_k\[0\] has 4 rows, more than chunk_pages=3"),
        ("non-contiguous", dict(pool_k=chunk_k(1, lambda c: c.transpose(1, 2).contiguous().transpose(1, 2))),
         r"pool_k\[1\] must be contiguous"),
        ("chunk-dtype", dict(pool_k=chunk_k(2, lambda c: c.double())), r"pool_k\[2\] dtype torch.float64"),
        ("chunk-page-shape", dict(pool_k=chunk_k(1, lambda c: c[:, :, :2])), r"pool_k\[1\] pages are"),
        ("not-a-tensor", dict(pool_k=chunk_k(0, lambda c: c.tolist())), r"pool_k\[0\] must be a \[rows, N, H, D\]"),
        ("kv-dtype", dict(pool_v=lambda a: [c.double() for c in a["pool_v"]]), r"pools must share"),
        ("page-id-beyond-chunks", dict(page_ids=lambda a: a["page_ids"].clamp_min(0) + 11),
         r"page_ids must lie in \[-1, 11\)"),
        ("page-id-in-short-chunk", dict(pool_k=lambda a: [a["pool_k"][0][:2], *a["pool_k"][1:]],
                                        pool_v=lambda a: [a["pool_v"][0][:2], *a["pool_v"][1:]],
                                        page_ids=lambda a: torch.full_like(a["page_ids"], 3)),
         r"page id 3 is row 3 of chunk 0, which holds 2 pages"),
    ]


@pytest.mark.parametrize("case", _bad_chunk_cases(), ids=lambda c: c[0])
def test_bad_chunk_arguments_are_named(case):
    _, changes, message = case
    chunks_k, chunks_v, page_ids, positions, tables = make_chunked_case(torch.float32, [4, 4, 3], 4, "separate")
    out_k, out_v = sentinel_outputs(torch.float32, 2, 2, 3 * 15, 3, 12)
    args = dict(pool_k=chunks_k, pool_v=chunks_v, page_ids=page_ids, positions=positions, tables=tables,
                out_k=out_k, out_v=out_v, chunk_pages=4)
    args.update({key: fn(args) for key, fn in changes.items()})
    for mode in ("reference", "triton"):
        with pytest.raises(ValueError, match=message):
            splice(**args, mode=mode)
    with pytest.raises(ValueError, match=message):
        splice_ref(**args)
    assert (out_k == SENTINEL).all() and (out_v == SENTINEL).all()


@pytest.mark.cuda
def test_pinned_host_and_device_chunks_on_gpu():
    """Device chunks and pinned host chunks mixed (host chunk first), and all on the host:
    the kernel reads host pages in place over UVA."""
    grid, heads, head_dim, chunk_pages = (6, 10), 4, 64, 3
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(1)
    tables = RopeTables.build(head_dim, *grid, max_frames=32, device="cuda")
    host = [torch.randn(r, n, heads, head_dim, generator=gen).bfloat16().pin_memory() for r in (3, 3)]
    dev = [torch.randn(r, n, heads, head_dim, generator=gen).bfloat16().cuda() for r in (3, 2)]
    for chunks in ([host[0], dev[0], host[1], dev[1]], host):
        valid = [i for i in range(len(chunks) * chunk_pages) if i % chunk_pages < chunks[i // chunk_pages].shape[0]]
        page_ids = torch.tensor(valid)[torch.randint(0, len(valid), (3, 2, 5), generator=gen)]
        page_ids[1, 0, 2] = -1
        page_ids = page_ids.cuda()
        positions = torch.randint(0, 32, (2, 5), generator=gen).cuda()
        vs = [c.flip(0).contiguous() if c.is_cuda else c.flip(0).contiguous().pin_memory() for c in chunks]
        outs = [torch.full((3, 2, 6 * n, heads, head_dim), SENTINEL, dtype=torch.bfloat16, device="cuda")
                for _ in range(4)]
        splice_ref(chunks, vs, page_ids, positions, tables, outs[0], outs[1], 1, chunk_pages=chunk_pages)
        splice(chunks, vs, page_ids, positions, tables, outs[2], outs[3], 1, chunk_pages=chunk_pages)
        assert_close(outs[2], outs[0], name="kernel k")
        assert torch.equal(outs[3], outs[1])
