"""rope_store: the fused per-forward kernel vs an independent float64 rotation, its
PyTorch reference, and its use by the engine (launch count, same output as the
reference kernels)."""
import math

import pytest
import torch

from lrag_engine import Engine, MemoryConfig, RuntimeConfig
from lrag_engine.ops import rope_store as rope_store_op
from lrag_engine.ops.rope_store import rope_store, rope_store_ref
from lrag_engine.testing import assert_close

SENTINEL = -3.25  # exactly representable in every dtype, never produced by the data
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rotate_float64(x, angle):
    """x [B, T, H, D] rotated pairwise by angle [T, D/2] as complex multiplication, float64."""
    b, t, h, d = x.shape
    pairs = x.double().reshape(b, t, h, d // 2, 2)
    z = torch.complex(pairs[..., 0], pairs[..., 1]) * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.view_as_real(z).reshape(b, t, h, d)


def make_case(device, dtype, batch, frames, tokens, heads, head_dim, window, seed=0):
    """Inputs as a backbone makes them: q, k, v slices of one fused [B, T, 3, H, D]
    projection (non-contiguous), random angles, a context and a window padded in the
    head dim (non-contiguous views), all outputs filled with SENTINEL."""
    gen = torch.Generator().manual_seed(seed)
    t = frames * tokens
    qkv = torch.randn(batch, t, 3, heads, head_dim, generator=gen).to(device, dtype)
    q, k, v = qkv.unbind(2)
    angle = torch.rand(t, head_dim // 2, generator=gen, dtype=torch.float64) * 40 * math.pi
    cos, sin = angle.cos().float().to(device), angle.sin().float().to(device)
    ctx_len = t + 2 * tokens + 1

    def padded(*shape):
        return torch.full((*shape[:-1], shape[-1] + 3), SENTINEL, dtype=dtype, device=device)[..., :shape[-1]]

    ctx_k, ctx_v = padded(batch, ctx_len, heads, head_dim), padded(batch, ctx_len, heads, head_dim)
    win_k, win_v = padded(batch, window, tokens, heads, head_dim), padded(batch, window, tokens, heads, head_dim)
    slots = torch.randperm(window, generator=gen)[:frames].to(device)
    return q, k, v, angle, cos, sin, ctx_k, ctx_v, win_k, win_v, slots


CASES = [
    # (batch, frames, tokens per frame, heads, head_dim, window)
    pytest.param(1, 1, 1, 1, 2, 1, id="B1-F1-N1-H1-D2"),
    pytest.param(2, 3, 5, 3, 10, 7, id="B2-F3-N5-H3-D10"),
    pytest.param(3, 2, 7, 5, 6, 4, id="B3-F2-N7-H5-D6"),
    pytest.param(1, 4, 13, 2, 24, 9, id="B1-F4-N13-H2-D24"),
    pytest.param(2, 1, 33, 12, 14, 3, id="B2-F1-N33-H12-D14"),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("raw", ["none", "window", "stage"])
@pytest.mark.parametrize("batch,frames,tokens,heads,head_dim,window", CASES)
def test_kernel_matches_float64(device, dtype_name, raw, batch, frames, tokens, heads, head_dim, window):
    dtype = DTYPES[dtype_name]
    q, k, v, angle, cos, sin, ctx_k, ctx_v, win_k, win_v, slots = make_case(
        device, dtype, batch, frames, tokens, heads, head_dim, window)
    t = frames * tokens
    start = ctx_k.shape[1] - t - tokens      # a tail that does not end the buffer
    stage_k = torch.full((batch, t, heads, head_dim), SENTINEL, dtype=dtype, device=device)
    stage_v = torch.full_like(stage_k, SENTINEL)
    raw_args = {"none": (None, None, None), "window": (win_k, win_v, slots), "stage": (stage_k, stage_v, None)}[raw]

    q_rot = rope_store(q, k, v, cos, sin, ctx_k[:, start:start + t], ctx_v[:, start:start + t], *raw_args,
                       mode="triton")

    assert q_rot.dtype == dtype and q_rot.shape == q.shape and q_rot.is_contiguous()
    assert_close(q_rot, rotate_float64(q, angle.to(device)), dtype=dtype, name="q_rot")
    assert_close(ctx_k[:, start:start + t], rotate_float64(k, angle.to(device)), dtype=dtype, name="ctx_k")
    assert torch.equal(ctx_v[:, start:start + t], v)
    for buf in (ctx_k, ctx_v):
        outside = torch.cat([buf[:, :start], buf[:, start + t:]], dim=1)
        assert bool((outside == SENTINEL).all()), "wrote outside the context tail"
    if raw == "window":
        for buf, src in ((win_k, k), (win_v, v)):
            assert torch.equal(buf[:, slots.cpu()].cpu(), src.reshape(batch, frames, tokens, heads, head_dim).cpu())
            others = [s for s in range(window) if s not in slots.tolist()]
            assert bool((buf[:, others] == SENTINEL).all()), "wrote window slots outside the block's"
    else:
        assert bool((win_k == SENTINEL).all()) and bool((win_v == SENTINEL).all())
    if raw == "stage":
        assert torch.equal(stage_k, k) and torch.equal(stage_v, v)
    else:
        assert bool((stage_k == SENTINEL).all())


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_reference_matches_kernel(device, dtype_name):
    """The PyTorch path (the CPU fallback) and the kernel agree on every output."""
    dtype = DTYPES[dtype_name]
    outs = []
    for mode in ("reference", "triton"):
        q, k, v, _, cos, sin, ctx_k, ctx_v, win_k, win_v, slots = make_case(device, dtype, 2, 3, 5, 3, 10, 7, seed=3)
        q_rot = rope_store(q, k, v, cos, sin, ctx_k[:, :15], ctx_v[:, :15], win_k, win_v, slots, mode=mode)
        outs.append((q_rot, ctx_k, ctx_v, win_k, win_v))
    for name, got, want in zip(("q_rot", "ctx_k", "ctx_v", "win_k", "win_v"), outs[1], outs[0]):
        assert_close(got, want, dtype=dtype, name=name)


def test_bad_arguments_are_named():
    q = torch.randn(1, 6, 2, 4)
    cos = sin = torch.zeros(6, 2)
    ctx = torch.zeros(1, 6, 2, 4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_store_ref(torch.randn(1, 6, 2, 5), torch.randn(1, 6, 2, 5), torch.randn(1, 6, 2, 5),
                       torch.zeros(6, 2), torch.zeros(6, 2), torch.zeros(1, 6, 2, 5), torch.zeros(1, 6, 2, 5))
    with pytest.raises(ValueError, match="cos must be float32"):
        rope_store_ref(q, q, q, cos.double(), sin, ctx, ctx.clone())
    with pytest.raises(ValueError, match=r"ctx_v must be \[B, T, H, D\]"):
        rope_store_ref(q, q, q, cos, sin, ctx, torch.zeros(1, 5, 2, 4))
    with pytest.raises(ValueError, match="do not split into 4 frames"):
        rope_store_ref(q, q, q, cos, sin, ctx, ctx.clone(), torch.zeros(1, 5, 2, 2, 4), torch.zeros(1, 5, 2, 2, 4),
                       torch.arange(4))
    with pytest.raises(ValueError, match="raw_k and raw_v go together"):
        rope_store_ref(q, q, q, cos, sin, ctx, ctx.clone(), torch.zeros(1, 6, 2, 4))


# ---------------------------------------------------------------- engine
TINY_MEMORY = dict(window=6, sink=1, top_k=2, frames_per_block=2, recency_guard=1)
BLOCKS = 4


def _generate(kernels: str, cuda_graphs: bool, monkeypatch) -> tuple[torch.Tensor, int]:
    calls = []
    launch = rope_store_op._rope_store_triton

    def counted(*args):
        calls.append(args[0].shape)
        return launch(*args)

    monkeypatch.setattr(rope_store_op, "_rope_store_triton", counted)
    engine = Engine("tiny", MemoryConfig(**TINY_MEMORY), RuntimeConfig(kernels=kernels, cuda_graphs=cuda_graphs),
                    seed=3)
    result = engine.generate(BLOCKS * TINY_MEMORY["frames_per_block"], seed=5)
    return result.latents, len(calls), engine


@pytest.mark.filterwarnings("ignore:cuda_graphs=True on cpu")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "static"])
def test_engine_runs_the_fused_kernel_once_per_layer_forward(cuda_graphs, monkeypatch):
    """With kernels="triton" every self-attention call of every forward is one launch
    of the fused kernel (denoising steps + the recache pass, each over every layer),
    and the video equals the run with the reference kernels."""
    if torch.cuda.is_available():
        pytest.skip("counts launches in the Triton interpreter on the CPU; on CUDA, tests/oracle runs the engine "
                    "with the kernels")
    pytest.importorskip("triton")
    got, launches, engine = _generate("triton", cuda_graphs, monkeypatch)
    want, ref_launches, _ = _generate("reference", cuda_graphs, monkeypatch)
    forwards = BLOCKS * (len(engine.runtime.denoising_steps) + 1)
    assert launches == forwards * engine.model_config.num_layers
    assert ref_launches == 0
    assert_close(got, want, dtype=torch.float32, name="latents")
