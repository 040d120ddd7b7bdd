"""splice over FP8 (e4m3) pools: the Triton kernel (interpreter on the CPU) vs the float32
reference vs an independent float64 decode of the e4m3 bits and a complex-number RoPE.

Odd sizes (heads, tokens per frame, chunk rows that do not divide the page count),
-1 entries that must leave their frames untouched, plain and chunked pools, every
output dtype, and codes covering every finite e4m3 value (subnormals included).
"""
import pytest
import torch

from lrag_engine.ops.quant import FP8, quantize_fp8
from lrag_engine.ops.rope import RopeTables
from lrag_engine.ops.splice import splice, splice_ref
from lrag_engine.testing import assert_close

from test_splice import SENTINEL, rotate_float64

OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def e4m3_float64(codes: torch.Tensor) -> torch.Tensor:
    """The value of each float8_e4m3fn code from its bits (sign, 4 exponent bits with bias
    7, 3 mantissa bits; exponent 0 is subnormal), in float64."""
    bits = codes.view(torch.uint8).long()
    sign = 1.0 - 2.0 * (bits >> 7).double()
    exp = (bits >> 3) & 0xF
    man = (bits & 7).double()
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (exp - 7).double())
    subnormal = man / 8.0 * 2.0 ** -6
    return sign * torch.where(exp == 0, subnormal, normal)


def random_codes(shape, gen) -> torch.Tensor:
    """Random finite e4m3 codes (any bit pattern but the two NaNs 0x7f, 0xff)."""
    bits = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64)
    bits = torch.where((bits & 0x7F) == 0x7F, bits - 1, bits)
    return bits.to(torch.uint8).view(FP8)


def make_fp8_case(device, gen, pages, grid, heads, head_dim, layers, batch, frames, max_frames=20):
    n = grid[0] * grid[1]
    tables = RopeTables.build(head_dim, *grid, max_frames=max_frames, device=device)
    codes_k = random_codes((pages, n, heads, head_dim), gen).to(device)
    codes_v = random_codes((pages, n, heads, head_dim), gen).to(device)
    # scales over several orders of magnitude, one per page and head (at most 64, so a
    # rotated 448 * 64 stays finite in float16)
    scale_k = torch.exp(torch.randn(pages, heads, generator=gen) * 2).clamp(max=64).to(device)
    scale_v = torch.exp(torch.randn(pages, heads, generator=gen) * 2).clamp(max=64).to(device)
    ids = torch.randint(0, pages, (layers, batch, frames), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.25] = -1
    positions = torch.randint(0, max_frames, (batch, frames), generator=gen)
    return codes_k, codes_v, scale_k, scale_v, ids.to(device), positions.to(device), tables


def expected_float64(codes_k, codes_v, scale_k, scale_v, ids, positions, grid, ctx, offset):
    """[L, B, ctx, H, D] float64 outputs, NaN where the splice must not write."""
    layers, batch, frames = ids.shape
    n, heads, head_dim = codes_k.shape[1:]
    out_k = torch.full((layers, batch, ctx, heads, head_dim), float("nan"), dtype=torch.float64)
    out_v = out_k.clone()
    for l in range(layers):
        for b in range(batch):
            for j in range(frames):
                p = int(ids[l, b, j])
                if p < 0:
                    continue
                k = e4m3_float64(codes_k[p].cpu()) * scale_k[p].cpu().double()[None, :, None]
                v = e4m3_float64(codes_v[p].cpu()) * scale_v[p].cpu().double()[None, :, None]
                rows = slice((offset + j) * n, (offset + j + 1) * n)
                out_k[l, b, rows] = rotate_float64(k, int(positions[b, j]), *grid)
                out_v[l, b, rows] = v
    return out_k, out_v


def check_outputs(out_k, out_v, want_k, want_v, dtype):
    for got, want in ((out_k, want_k), (out_v, want_v)):
        untouched = want.isnan()
        assert (got.cpu().float()[untouched] == SENTINEL).all(), "a -1 entry or a row outside the frames was written"
        assert_close(got.cpu().double()[~untouched], want[~untouched], dtype=dtype)


def chunk(pool: torch.Tensor, rows: int) -> list[torch.Tensor]:
    return [c.contiguous() for c in pool.split(rows)]


@pytest.mark.parametrize("out_name", list(OUT_DTYPES))
@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize("heads,grid,head_dim", [(3, (3, 5), 12), (1, (1, 7), 8), (5, (2, 3), 20)])
def test_fp8_kernel_and_reference_vs_float64(device, out_name, chunk_rows, heads, grid, head_dim):
    dtype = OUT_DTYPES[out_name]
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    layers, batch, frames, offset, pages = 2, 2, 3, 1, 10
    ck, cv, sk, sv, ids, pos, tables = make_fp8_case(device, gen, pages, grid, heads, head_dim, layers, batch,
                                                     frames)
    n = grid[0] * grid[1]
    ctx = (offset + frames + 1) * n
    want_k, want_v = expected_float64(ck, cv, sk, sv, ids, pos, grid, ctx, offset)
    pools = (ck, cv, sk, sv) if chunk_rows is None else tuple(chunk(t, chunk_rows) for t in (ck, cv, sk, sv))
    for fn, kwargs in ((splice, dict(mode="triton")), (splice_ref, {})):
        out_k = torch.full((layers, batch, ctx, heads, head_dim), SENTINEL, dtype=dtype, device=device)
        out_v = out_k.clone()
        fn(pools[0], pools[1], ids, pos, tables, out_k, out_v, frame_offset=offset, chunk_pages=chunk_rows,
           scale_k=pools[2], scale_v=pools[3], **kwargs)
        check_outputs(out_k, out_v, want_k, want_v, dtype)


def test_fp8_kernel_matches_reference_on_quantised_pages(device):
    """Pages quantised from real data (the history's write path): kernel == reference,
    and both within the quantisation error of the unquantised splice."""
    gen = torch.Generator().manual_seed(7)
    grid, heads, head_dim, pages = (2, 5), 3, 16, 7
    n = grid[0] * grid[1]
    tables = RopeTables.build(head_dim, *grid, max_frames=9, device=device)
    k = (torch.randn(pages, n, heads, head_dim, generator=gen) * torch.rand(1, 1, heads, 1, generator=gen) * 4)
    v = torch.randn(pages, n, heads, head_dim, generator=gen)
    (ck, sk), (cv, sv) = quantize_fp8(k), quantize_fp8(v)
    ids = torch.randint(0, pages, (1, 3, 4), generator=gen)
    pos = torch.randint(0, 9, (3, 4), generator=gen)
    outs = {}
    for name, fn, kw in (("triton", splice, dict(mode="triton")), ("ref", splice_ref, {})):
        out_k = torch.zeros(1, 3, 4 * n, heads, head_dim, device=device)
        out_v = torch.zeros_like(out_k)
        fn(ck.to(device), cv.to(device), ids.to(device), pos.to(device), tables, out_k, out_v,
           scale_k=sk.to(device), scale_v=sv.to(device), **kw)
        outs[name] = (out_k.cpu(), out_v.cpu())
    assert_close(outs["triton"][0], outs["ref"][0], dtype=torch.float32)
    assert torch.equal(outs["triton"][1], outs["ref"][1])   # V: one rounding of code * scale, both sides
    full_k = torch.zeros(1, 3, 4 * n, heads, head_dim)
    full_v = torch.zeros_like(full_k)
    splice_ref(k, v, ids, pos, RopeTables.build(head_dim, *grid, max_frames=9), full_k, full_v)
    # per head: within e4m3's half-ulp (2**-4 relative) of the head's largest entry,
    # which the rotation (norm-preserving per pair) can spread over a pair (sqrt 2)
    used = ids[0].unique()
    bound_k = sk[used].amax(dim=0) * 448 * 2 ** -4 * 2 ** 0.5          # [H]
    bound_v = sv[used].amax(dim=0) * 448 * 2 ** -4
    err_k = (outs["ref"][0] - full_k).abs().amax(dim=(0, 1, 2, 4))
    err_v = (outs["ref"][1] - full_v).abs().amax(dim=(0, 1, 2, 4))
    assert (err_k <= bound_k).all() and (err_v <= bound_v).all()
    assert err_v.max() > 0   # quantisation did happen


def test_fp8_argument_errors():
    tables = RopeTables.build(8, 1, 3, max_frames=4)
    codes = torch.zeros(2, 3, 2, 8, dtype=FP8)
    scale = torch.ones(2, 2)
    ids = torch.zeros(1, 1, 1, dtype=torch.int64)
    pos = torch.zeros(1, 1, dtype=torch.int64)
    out = torch.zeros(1, 1, 3, 2, 8)
    with pytest.raises(ValueError, match="need scale_k and scale_v"):
        splice_ref(codes, codes, ids, pos, tables, out, out.clone())
    with pytest.raises(ValueError, match="given together"):
        splice_ref(codes, codes, ids, pos, tables, out, out.clone(), scale_k=scale)
    with pytest.raises(ValueError, match=r"scale_k\[0\] must be contiguous float32 \[2, 2\]"):
        splice_ref(codes, codes, ids, pos, tables, out, out.clone(), scale_k=torch.ones(2, 3), scale_v=scale)
    with pytest.raises(ValueError, match="belong with float8_e4m3fn pools"):
        splice_ref(codes.float(), codes.float(), ids, pos, tables, out, out.clone(), scale_k=scale, scale_v=scale)
