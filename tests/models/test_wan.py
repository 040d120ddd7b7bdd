"""WanModel against a second, naive implementation of SPEC section 2 written here from the state dict."""
from __future__ import annotations

import math

import pytest
import torch

from lrag_engine.attention.backend import attend_reference
from lrag_engine.config import ModelConfig
from lrag_engine.models.wan import WanModel
from lrag_engine.ops.rope import RopeTables, rope_frames
from lrag_engine.testing import assert_close


def tiny_config(height: int = 6, width: int = 10) -> ModelConfig:
    return ModelConfig.preset("tiny", height=height, width=width)


def rope_attention(cfg: ModelConfig, max_frames: int = 16):
    """Test-local full attention: RoPE at temporal positions 0..F-1, plain softmax."""
    tables = RopeTables.build(cfg.head_dim, cfg.height // 2, cfg.width // 2, max_frames)
    calls = []

    def self_attention(layer, q, k, v):
        calls.append(layer)
        frames = q.shape[1] // cfg.tokens_per_frame
        pos = torch.arange(frames)
        return attend_reference(rope_frames(q, pos, tables), rope_frames(k, pos, tables), v)

    self_attention.calls = calls
    return self_attention


# ----------------------------------------------------------------------------- reference
def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, eps, weight=None, bias=None):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def _rms_norm(x, eps, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rope_freqs(length, dim):
    """[length, dim/2] complex128 unit rotations, pair j turning at 10000^(-2j/dim)."""
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.polar(torch.ones(length, dim // 2, dtype=torch.float64),
                       torch.outer(torch.arange(length, dtype=torch.float64), inv))


def _rope(x, frames, gh, gw):
    """x [B, F*gh*gw, H, D] -> rotated, via complex multiplication in float64."""
    d = x.shape[-1]
    d_s = 2 * (d // 6)
    d_t = d - 2 * d_s
    ft, fh, fw = _rope_freqs(frames, d_t), _rope_freqs(gh, d_s), _rope_freqs(gw, d_s)
    grid = torch.cat([ft[:, None, None].expand(frames, gh, gw, -1),
                      fh[None, :, None].expand(frames, gh, gw, -1),
                      fw[None, None, :].expand(frames, gh, gw, -1)], dim=-1).reshape(frames * gh * gw, 1, d // 2)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * grid).flatten(-2).to(x.dtype)


def _attention(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def reference_forward(state, cfg, x, timestep, text, dtype=torch.float64):
    """Naive Wan 2.1 forward in ``dtype`` (RoPE and the timestep sinusoid in float64)."""
    p = {k: v.to(dtype) for k, v in state.items()}
    lin = lambda h, name: h @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731
    b, frames, c, hh, ww = x.shape
    _, ph, pw = cfg.patch_size
    gh, gw = hh // ph, ww // pw
    dim, heads = cfg.dim, cfg.num_heads
    dh = dim // heads

    tok = torch.nn.functional.conv3d(x.to(dtype).permute(0, 2, 1, 3, 4), p["patch_embedding.weight"],
                                     p["patch_embedding.bias"], stride=cfg.patch_size)
    tok = tok.flatten(2).transpose(1, 2)  # [B, F*gh*gw, dim], frame-major

    half = cfg.freq_dim // 2
    ang = timestep.to(torch.float64).reshape(-1, 1) * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    sinus = torch.cat([ang.cos(), ang.sin()], dim=1).to(torch.float32).to(dtype)
    e = lin(torch.nn.functional.silu(lin(sinus, "time_embedding.0")), "time_embedding.2")
    e0 = lin(torch.nn.functional.silu(e), "time_projection.1").reshape(b, frames, 6, dim)
    per_token = gh * gw
    e0_tok = e0.repeat_interleave(per_token, dim=1)  # [B, F*N, 6, dim]
    e_tok = e.reshape(b, frames, dim).repeat_interleave(per_token, dim=1)

    ctx = torch.zeros(b, cfg.text_len, cfg.text_dim, dtype=dtype)
    ctx[:, :text.shape[1]] = text.to(dtype)
    ctx = lin(_gelu_tanh(lin(ctx, "text_embedding.0")), "text_embedding.2")

    split = lambda h: h.reshape(*h.shape[:2], heads, dh)  # noqa: E731
    for i in range(cfg.num_layers):
        pre = f"blocks.{i}."
        mod = p[pre + "modulation"][0] + e0_tok
        h = _layer_norm(tok, cfg.eps) * (1 + mod[:, :, 1]) + mod[:, :, 0]
        q = split(_rms_norm(lin(h, pre + "self_attn.q"), cfg.eps, p[pre + "self_attn.norm_q.weight"]))
        k = split(_rms_norm(lin(h, pre + "self_attn.k"), cfg.eps, p[pre + "self_attn.norm_k.weight"]))
        v = split(lin(h, pre + "self_attn.v"))
        att = _attention(_rope(q, frames, gh, gw), _rope(k, frames, gh, gw), v).flatten(2)
        tok = tok + lin(att, pre + "self_attn.o") * mod[:, :, 2]

        h = _layer_norm(tok, cfg.eps, p[pre + "norm3.weight"], p[pre + "norm3.bias"])
        q = split(_rms_norm(lin(h, pre + "cross_attn.q"), cfg.eps, p[pre + "cross_attn.norm_q.weight"]))
        k = split(_rms_norm(lin(ctx, pre + "cross_attn.k"), cfg.eps, p[pre + "cross_attn.norm_k.weight"]))
        v = split(lin(ctx, pre + "cross_attn.v"))
        tok = tok + lin(_attention(q, k, v).flatten(2), pre + "cross_attn.o")

        h = _layer_norm(tok, cfg.eps) * (1 + mod[:, :, 4]) + mod[:, :, 3]
        tok = tok + lin(_gelu_tanh(lin(h, pre + "ffn.0")), pre + "ffn.2") * mod[:, :, 5]

    head_mod = p["head.modulation"][0] + e_tok[:, :, None]  # [B, F*N, 2, dim]
    out = lin(_layer_norm(tok, cfg.eps) * (1 + head_mod[:, :, 1]) + head_mod[:, :, 0], "head.head")
    c_out = cfg.out_channels
    result = []
    for u in out:  # unpatchify as Wan: 'fhwpqrc->cfphqwr'
        u = u.reshape(frames, gh, gw, 1, ph, pw, c_out)
        u = torch.einsum("fhwpqrc->cfphqwr", u).reshape(c_out, frames, hh, ww)
        result.append(u.permute(1, 0, 2, 3))
    return torch.stack(result)


def random_inputs(cfg, batch, frames, text_tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, cfg.in_channels, cfg.height, cfg.width, generator=gen)
    t = torch.rand(batch, frames, generator=gen) * 1000  # a different timestep per frame
    text = torch.randn(batch, text_tokens, cfg.text_dim, generator=gen)
    return x, t, text


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("batch,frames,height,width,text_tokens", [
    pytest.param(1, 3, 6, 10, 5, id="B1-F3-6x10-L5"),
    pytest.param(2, 2, 6, 10, 16, id="B2-F2-6x10-Lfull"),
    pytest.param(2, 1, 2, 14, 1, id="B2-F1-2x14-L1"),
    pytest.param(1, 4, 10, 6, 9, id="B1-F4-10x6-L9"),
])
def test_forward_matches_reference(batch, frames, height, width, text_tokens):
    cfg = tiny_config(height, width)
    model = WanModel(cfg, seed=batch * 100 + frames)
    x, t, text = random_inputs(cfg, batch, frames, text_tokens, seed=frames)
    attention = rope_attention(cfg)
    with torch.no_grad():
        out = model(x, t, model.encode_text(text), attention)
    expected = reference_forward(model.state_dict(), cfg, x, t, text)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert attention.calls == list(range(cfg.num_layers))
    assert_close(out, expected, dtype=torch.float32, name="flow")


def test_per_frame_timesteps_are_not_collapsed():
    """Frames with different timesteps must not collapse to one timestep per batch."""
    cfg = tiny_config()
    model = WanModel(cfg, seed=3)
    x, _, text = random_inputs(cfg, 1, 2, 4, seed=7)
    attention = rope_attention(cfg)
    kv = model.encode_text(text)
    with torch.no_grad():
        mixed = model(x, torch.tensor([[900.0, 100.0]]), kv, attention)
        same = model(x, torch.tensor([[900.0, 900.0]]), kv, attention)
    assert (mixed - same).abs().max() > 1e-2
    expected = reference_forward(model.state_dict(), cfg, x, torch.tensor([[900.0, 100.0]]), text)
    assert_close(mixed, expected, dtype=torch.float32, name="flow")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_naive_error(dtype):
    """Error of the model in ``dtype`` <= 2x the error of the naive forward in ``dtype``, both
    against the float64 forward on the same (rounded) weights."""
    cfg = tiny_config()
    model = WanModel(cfg, dtype=dtype, seed=11)
    x, t, text = random_inputs(cfg, 2, 3, 7, seed=12)
    with torch.no_grad():
        out = model(x, t, model.encode_text(text), rope_attention(cfg))
    state = model.state_dict()
    truth = reference_forward(state, cfg, x, t, text)
    naive = reference_forward(state, cfg, x, t, text, dtype=dtype)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err, naive_err = (out.double() - truth).abs(), (naive.double() - truth).abs()
    assert err.max() <= 2 * naive_err.max(), f"max err {err.max():.3e} vs naive {naive_err.max():.3e}"
    assert err.mean() <= 2 * naive_err.mean(), f"mean err {err.mean():.3e} vs naive {naive_err.mean():.3e}"


def expected_wan_keys(cfg: ModelConfig) -> set[str]:
    keys = {"patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias",
            "head.modulation", "time_projection.1.weight", "time_projection.1.bias"}
    for seq in ("text_embedding", "time_embedding"):
        keys |= {f"{seq}.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for i in range(cfg.num_layers):
        pre = f"blocks.{i}."
        keys |= {pre + "modulation", pre + "norm3.weight", pre + "norm3.bias"}
        keys |= {f"{pre}ffn.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
        for attn in ("self_attn", "cross_attn"):
            keys |= {f"{pre}{attn}.{m}.{p}" for m in "qkvo" for p in ("weight", "bias")}
            keys |= {f"{pre}{attn}.norm_q.weight", f"{pre}{attn}.norm_k.weight"}
    return keys


def test_parameter_names_are_wan_names():
    cfg = tiny_config()
    model = WanModel(cfg)
    assert set(model.state_dict()) == expected_wan_keys(cfg)
    assert model.blocks[0].modulation.shape == (1, 6, cfg.dim)
    assert model.head.modulation.shape == (1, 2, cfg.dim)
    assert model.patch_embedding.weight.shape == (cfg.dim, cfg.in_channels, *cfg.patch_size)
    assert model.head.head.weight.shape == (math.prod(cfg.patch_size) * cfg.out_channels, cfg.dim)


def test_wan_1_3b_parameter_count_on_meta():
    cfg = ModelConfig.preset("wan2.1-t2v-1.3b")
    with torch.device("meta"):
        model = WanModel(cfg)
    assert model.patch_embedding.weight.is_meta
    d, f = cfg.dim, cfg.ffn_dim
    linear = lambda i, o: i * o + o  # noqa: E731
    attention = 4 * linear(d, d) + 2 * d
    block = 2 * attention + 2 * d + linear(d, f) + linear(f, d) + 6 * d
    patch = math.prod(cfg.patch_size)
    expected = (cfg.in_channels * patch * d + d + linear(cfg.text_dim, d) + linear(d, d)
                + linear(cfg.freq_dim, d) + linear(d, d) + linear(d, 6 * d)
                + cfg.num_layers * block + linear(d, patch * cfg.out_channels) + 2 * d)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected
    assert abs(count - 1.42e9) < 0.01 * 1.42e9  # the published size of Wan2.1-T2V-1.3B
    assert set(model.state_dict()) == expected_wan_keys(cfg)


def test_init_random_is_seeded_and_gives_order_one_outputs():
    cfg = tiny_config()
    a, b, c = WanModel(cfg, seed=5), WanModel(cfg, seed=5), WanModel(cfg, seed=6)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
        assert value.abs().max() > 0, f"{name} is all zeros"
    assert not torch.equal(a.head.head.weight, c.head.head.weight)
    x, t, text = random_inputs(cfg, 1, 3, 4, seed=0)
    with torch.no_grad():
        out = a(x, t, a.encode_text(text), rope_attention(cfg))
    assert torch.isfinite(out).all()
    assert 0.1 < out.std() < 10


def test_encode_text_pads_with_zeros():
    cfg = tiny_config()
    model = WanModel(cfg, seed=1)
    text = torch.randn(2, 5, cfg.text_dim)
    padded = torch.cat([text, torch.zeros(2, cfg.text_len - 5, cfg.text_dim)], dim=1)
    with torch.no_grad():
        short, full = model.encode_text(text), model.encode_text(padded)
    assert len(short) == cfg.num_layers
    for layer, ((k1, v1), (k2, v2)) in enumerate(zip(short, full)):
        assert k1.shape == (2, cfg.text_len, cfg.num_heads, cfg.head_dim)
        assert_close(k1, k2, name=f"k[{layer}]")
        assert_close(v1, v2, name=f"v[{layer}]")


@pytest.mark.parametrize("shape,match", [
    pytest.param((1, 17, 32), "text_len=16", id="too-long"),
    pytest.param((1, 4, 31), "text_dim=32", id="bad-dim"),
    pytest.param((4, 32), r"\[B, L, text_dim", id="2d"),
])
def test_encode_text_rejects_bad_shapes(shape, match):
    model = WanModel(tiny_config())
    with pytest.raises(ValueError, match=match):
        model.encode_text(torch.randn(shape))


def test_forward_rejects_bad_inputs():
    cfg = tiny_config()
    model = WanModel(cfg)
    x, t, text = random_inputs(cfg, 2, 2, 3, seed=0)
    kv = model.encode_text(text)
    attention = rope_attention(cfg)
    with pytest.raises(ValueError, match=r"x must be .*C=16, H=6, W=10.*got \(2, 2, 16, 6, 12\)"):
        model(torch.randn(2, 2, 16, 6, 12), t, kv, attention)
    with pytest.raises(ValueError, match=r"x must be"):
        model(x[0], t, kv, attention)
    with pytest.raises(ValueError, match=r"timestep must be per frame \[B=2, F=2\], got \(2,\)"):
        model(x, t[:, 0], kv, attention)
    with pytest.raises(ValueError, match=r"cross_kv must hold one \(k, v\) per layer \(2\), got 1"):
        model(x, t, kv[:1], attention)
    with pytest.raises(ValueError, match=r"cross_kv\[0\] must be \(k, v\) of shape \(2, 16, 2, 32\)"):
        model(x, t, model.encode_text(text[:1]), attention)
    bad = x.clone()
    bad[1, 0, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        model(bad, t, kv, attention)
    with pytest.raises(ValueError, match="timestep contains NaN or inf"):
        model(x, torch.tensor([[1.0, float("inf")], [2.0, 3.0]]), kv, attention)
    with pytest.raises(ValueError, match=r"self_attention\(layer=0\) must return \(2, 30, 2, 32\)"):
        model(x, t, kv, lambda layer, q, k, v: q[:, :-1])
