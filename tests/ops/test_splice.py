"""splice: Triton kernel vs float32 reference vs an independent float64 complex RoPE."""
import pytest
import torch

from lrag_engine.ops.rope import ROPE_THETA, RopeTables, rope_split
from lrag_engine.ops.splice import splice, splice_ref
from lrag_engine.testing import assert_close

SENTINEL = -3.25  # exactly representable in every dtype, never produced by the data
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rotate_float64(page, pos, grid_h, grid_w):
    """RoPE of one page [N, H, D] at temporal index ``pos`` as complex multiplication,
    angles computed here from the formula (not from the tables)."""
    n, h, d = page.shape
    d_t, d_h, d_w = rope_split(d)

    def inv_freq(part):
        return ROPE_THETA ** (-torch.arange(0, part, 2, dtype=torch.float64) / part)

    rows = torch.arange(n) // grid_w
    cols = torch.arange(n) % grid_w
    angle = torch.cat([
        (torch.full((n, 1), float(pos), dtype=torch.float64) * inv_freq(d_t)),
        rows[:, None].double() * inv_freq(d_h),
        cols[:, None].double() * inv_freq(d_w),
    ], dim=1)  # [N, D/2]
    x = page.double().reshape(n, h, d // 2, 2)
    z = torch.complex(x[..., 0], x[..., 1]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.view_as_real(z).reshape(n, h, d)


def make_case(device, dtype, id_dtype, num_layers=2, batch=2, frames=3, grid=(3, 5), heads=3, head_dim=12,
              pages=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    tables = RopeTables.build(head_dim, *grid, max_frames=20, device=device)
    pool_k = torch.randn(pages, n, heads, head_dim, generator=gen).to(device, dtype)
    pool_v = torch.randn(pages, n, heads, head_dim, generator=gen).to(device, dtype)
    page_ids = torch.randint(0, pages, (num_layers, batch, frames), generator=gen)
    page_ids[0, 0, 1] = -1
    page_ids[1, 1, 0] = -1
    page_ids[1, 0, 2] = -1
    positions = torch.randint(0, 20, (batch, frames), generator=gen)
    return pool_k, pool_v, page_ids.to(device, id_dtype), positions.to(device), tables


def sentinel_outputs(like, num_layers, batch, ctx, heads, head_dim, extra_h_stride=0):
    """Two outputs filled with SENTINEL; ``extra_h_stride`` pads the head dim so the
    outputs are non-contiguous views of a larger buffer."""
    outs = []
    for _ in range(2):
        buf = torch.full((num_layers, batch, ctx, heads, head_dim + extra_h_stride), SENTINEL,
                         dtype=like.dtype, device=like.device)
        outs.append(buf[..., :head_dim])
    return outs


CASES = [
    # dtype, id dtype, grid, heads, head dim, frame offset, positions per stream, non-contiguous
    pytest.param("fp32", torch.int64, (3, 5), 3, 12, 0, True, False, id="N15-H3-D12-off0-fp32-i64"),
    pytest.param("fp32", torch.int32, (3, 5), 3, 24, 2, False, True, id="N15-H3-D24-off2-fp32-i32-strided"),
    pytest.param("bf16", torch.int32, (3, 5), 3, 12, 1, True, True, id="N15-H3-D12-off1-bf16-i32-strided"),
    pytest.param("bf16", torch.int64, (3, 5), 3, 24, 0, False, False, id="N15-H3-D24-off0-bf16-i64"),
    pytest.param("fp16", torch.int64, (3, 5), 3, 24, 3, True, False, id="N15-H3-D24-off3-fp16-i64"),
    # Several token tiles per frame, the last one partial.
    pytest.param("bf16", torch.int64, (5, 7), 5, 64, 1, True, True, id="N35-H5-D64-off1-bf16-i64-strided"),
]


@pytest.mark.parametrize("dtype_name, id_dtype, grid, heads, head_dim, frame_offset, per_stream, strided", CASES)
def test_kernel_and_reference_match_float64(device, dtype_name, id_dtype, grid, heads, head_dim, frame_offset,
                                            per_stream, strided):
    dtype = DTYPES[dtype_name]
    pool_k, pool_v, page_ids, positions, tables = make_case(device, dtype, id_dtype, grid=grid, heads=heads,
                                                            head_dim=head_dim, seed=head_dim + frame_offset)
    if strided:
        # Pages at a doubled stride: the pools are views into a larger buffer.
        pool_k = torch.repeat_interleave(pool_k, 2, dim=0)[::2]
        pool_v = torch.repeat_interleave(pool_v, 2, dim=0)[::2]
        assert not pool_k.is_contiguous()
    if not per_stream:
        positions = positions[0]
    num_layers, batch, frames = page_ids.shape
    n, heads = pool_k.shape[1], pool_k.shape[2]
    ctx = (frame_offset + frames + 1) * n
    ref_k, ref_v = sentinel_outputs(pool_k, num_layers, batch, ctx, heads, head_dim)
    out_k, out_v = sentinel_outputs(pool_k, num_layers, batch, ctx, heads, head_dim, 4 if strided else 0)
    splice_ref(pool_k, pool_v, page_ids, positions, tables, ref_k, ref_v, frame_offset)
    splice(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, frame_offset, mode="triton")

    pos = positions if per_stream else positions.expand(batch, -1)
    written = torch.zeros(num_layers, batch, ctx, dtype=torch.bool)
    for l in range(num_layers):
        for b in range(batch):
            for j in range(frames):
                page = int(page_ids[l, b, j])
                if page < 0:
                    continue
                rows = slice((frame_offset + j) * n, (frame_offset + j + 1) * n)
                written[l, b, rows] = True
                expected = rotate_float64(pool_k[page].cpu(), int(pos[b, j]), *grid)
                assert_close(ref_k[l, b, rows].cpu(), expected, dtype=dtype, name=f"ref k[{l},{b},{j}]")
                assert torch.equal(ref_v[l, b, rows].cpu(), pool_v[page].cpu()), f"ref v[{l},{b},{j}]"
    for out in (ref_k, ref_v, out_k, out_v):
        assert (out.cpu()[~written] == SENTINEL).all(), "a skipped or out-of-range frame was written"
    assert_close(out_k, ref_k, dtype=dtype, name="kernel k")
    assert torch.equal(out_v.cpu(), ref_v.cpu()), "kernel v is not a bit-exact copy"


def test_all_skipped_writes_nothing(device):
    pool_k, pool_v, page_ids, positions, tables = make_case(device, torch.float32, torch.int64)
    page_ids = torch.full_like(page_ids, -1)
    for mode in ("reference", "triton"):
        out_k, out_v = sentinel_outputs(pool_k, 2, 2, 3 * 15, 3, 12)
        splice(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, mode=mode)
        assert (out_k == SENTINEL).all() and (out_v == SENTINEL).all()


def _bad_cases():
    return [
        ("page-id-too-large", dict(page_ids=lambda a: a["page_ids"].clamp_min(0) + 11), r"page_ids must lie in \[-1, 11\)"),
        ("page-id-below-minus-one", dict(page_ids=lambda a: a["page_ids"] - 3), r"page_ids must lie"),
        ("position-beyond-table", dict(positions=lambda a: a["positions"] + 20), r"positions must lie in \[0, 20\)"),
        ("out-too-short", dict(out_k=lambda a: a["out_k"][:, :, :40]), r"out_k must be .*Lctx>=45"),
        ("dtype-mismatch", dict(out_v=lambda a: a["out_v"].double()), r"out_v dtype"),
        ("float-ids", dict(page_ids=lambda a: a["page_ids"].float()), r"page_ids must be int32/int64"),
        ("positions-shape", dict(positions=lambda a: a["positions"][:, :2]), r"positions must be"),
        ("negative-offset", dict(frame_offset=lambda a: -1), r"frame_offset must be"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments_are_named(case):
    _, changes, message = case
    pool_k, pool_v, page_ids, positions, tables = make_case("cpu", torch.float32, torch.int64)
    out_k, out_v = sentinel_outputs(pool_k, 2, 2, 3 * 15, 3, 12)
    args = dict(pool_k=pool_k, pool_v=pool_v, page_ids=page_ids, positions=positions, tables=tables,
                out_k=out_k, out_v=out_v, frame_offset=0)
    args.update({key: fn(args) for key, fn in changes.items()})
    for mode in ("reference", "triton"):
        with pytest.raises(ValueError, match=message):
            splice(**args, mode=mode)


def test_tables_must_fit_the_pages():
    pool_k, pool_v, page_ids, positions, _ = make_case("cpu", torch.float32, torch.int64)
    out_k, out_v = sentinel_outputs(pool_k, 2, 2, 3 * 15, 3, 12)
    with pytest.raises(ValueError, match="tokens per frame"):
        splice(pool_k, pool_v, page_ids, positions, RopeTables.build(12, 4, 4, 20), out_k, out_v)
    with pytest.raises(ValueError, match="head dim D=12"):
        splice(pool_k, pool_v, page_ids, positions, RopeTables.build(24, 3, 5, 20), out_k, out_v)


@pytest.mark.cuda
def test_wan_shapes_on_gpu():
    # Wan 1.3B: N=1560 (30x52 patches), 12 heads x 128; 6 retrieved + 12 window frames.
    # Ten layers rather than thirty keep the float32 reference's memory modest.
    num_layers, frames, grid, heads, head_dim = 10, 18, (30, 52), 12, 128
    n = grid[0] * grid[1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    tables = RopeTables.build(head_dim, *grid, max_frames=64, device="cuda")
    pages = num_layers * frames
    pool_k = torch.randn(pages, n, heads, head_dim, device="cuda", generator=gen).bfloat16()
    pool_v = torch.randn(pages, n, heads, head_dim, device="cuda", generator=gen).bfloat16()
    page_ids = torch.randperm(pages, device="cuda", generator=gen).reshape(num_layers, 1, frames)
    page_ids[:, :, 3] = -1
    positions = torch.arange(frames, device="cuda")
    outs = [torch.full((num_layers, 1, (frames + 1) * n, heads, head_dim), SENTINEL, device="cuda",
                       dtype=torch.bfloat16) for _ in range(4)]
    splice_ref(pool_k, pool_v, page_ids, positions, tables, outs[0], outs[1], frame_offset=1)
    splice(pool_k, pool_v, page_ids, positions, tables, outs[2], outs[3], frame_offset=1)
    assert_close(outs[2], outs[0], name="kernel k")
    assert torch.equal(outs[3], outs[1])
    assert (outs[2][:, :, :n] == SENTINEL).all() and (outs[2][:, :, 4 * n:5 * n] == SENTINEL).all()
