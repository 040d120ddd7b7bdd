"""FP8 (e4m3) quantisation of history pages vs a float64 recomputation, with error bounds."""
import pytest
import torch

from lrag_engine.ops.quant import FP8, dequantize_fp8, fp8_page_bytes, quantize_fp8, storage_dtype

from test_splice_fp8 import e4m3_float64

# every finite non-negative e4m3 value, from the bits (float64)
GRID = e4m3_float64(torch.arange(0, 127, dtype=torch.uint8).view(FP8)).unique()


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 5), (2, 11, 1, 6), (3, 4, 2, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_float64_recomputation(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[-2:-1], generator=gen) * 3)[:, None])
    x = x.to(dtype)
    codes, scale = quantize_fp8(x)
    assert codes.dtype == FP8 and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-3] + x.shape[-2:-1]
    xd = x.double()
    amax = xd.abs().amax(dim=(-3, -1))
    want_scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    torch.testing.assert_close(scale.double(), want_scale, rtol=2 ** -23, atol=0)
    # each code is a nearest e4m3 value of x / scale (either neighbour on an exact tie)
    y = (xd / scale.double().unsqueeze(-2).unsqueeze(-1))
    got = e4m3_float64(codes)
    dist = (y.abs().unsqueeze(-1) - GRID).abs()
    best = dist.min(dim=-1).values
    assert ((got.abs() - y.abs()).abs() <= best * (1 + 1e-6) + 1e-12).all()
    assert (torch.sign(got) * torch.sign(y) >= 0).all()
    # the largest entry of each head maps to +-448 (up to the float32 division)
    assert (got.abs().amax(dim=(-3, -1)) >= 416).all()
    # decode error: 2**-4 relative in the normal range, scale * 2**-10 below it
    deq = dequantize_fp8(codes, scale).double()
    s = scale.double().unsqueeze(-2).unsqueeze(-1)
    bound = torch.maximum(xd.abs() * 2 ** -4, s * 2 ** -10) * (1 + 1e-5)
    assert ((deq - xd).abs() <= bound).all()


def test_zero_heads_and_exact_values():
    x = torch.zeros(3, 2, 4)
    x[:, 1] = torch.tensor([448.0, -224.0, 1.0, 0.0])   # head 1: e4m3 values times 1
    codes, scale = quantize_fp8(x)
    assert scale.tolist() == [1.0, 1.0]                   # all-zero head: scale 1
    assert torch.equal(dequantize_fp8(codes, scale), x)


def test_dequantize_dtype_and_shape_errors():
    codes, scale = quantize_fp8(torch.randn(2, 3, 4, 6))
    assert dequantize_fp8(codes, scale, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale"):
        dequantize_fp8(codes, scale[..., :2])
    with pytest.raises(ValueError, match="floating"):
        quantize_fp8(torch.zeros(3, 4, 5, dtype=torch.int32))


def test_storage_and_page_bytes():
    assert storage_dtype(None, torch.bfloat16) == torch.bfloat16
    assert storage_dtype("fp8_e4m3", torch.bfloat16) == FP8
    with pytest.raises(ValueError, match="history_dtype"):
        storage_dtype("fp8", torch.float32)
    # Wan 1.3B page: 1560 tokens x 12 heads x 128, K and V, plus 12 float32 scales each
    assert fp8_page_bytes(1560, 12, 128) == 2 * 1560 * 12 * 128 + 2 * 12 * 4
