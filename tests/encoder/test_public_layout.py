"""The public reference's training checkpoint (``ae_latent_mem.pt`` layout) loads, and so do
this package's earlier nested-layout files.

The public file is written here from SPEC section 5 alone: keys and shapes index by index,
and an independent functional forward of those weights gives the expected embeddings.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lrag_engine.encoder.checkpoint import load_checkpoint, save_checkpoint
from lrag_engine.encoder.descriptor import EncoderDescriptor
from lrag_engine.encoder.model import EncoderConfig, RetrievalEncoder
from lrag_engine.testing import assert_close

CONFIGS = [
    pytest.param(dict(in_channels=5, spatial_h=11, spatial_w=14, latent_dim=12, hidden_dims=[8, 12]),
                 id="11x14-2stages"),
    pytest.param(dict(in_channels=3, spatial_h=1, spatial_w=7, latent_dim=7, hidden_dims=[4]), id="1x7-1stage"),
    pytest.param(dict(in_channels=16, spatial_h=33, spatial_w=17, latent_dim=24, hidden_dims=[16, 48, 24, 64]),
                 id="33x17-4stages"),
]
TRAINING_FIELDS = dict(lr=3e-4, epochs=400, weight_decay=1e-4, batch_size=128, wandb_project="latent-ae",
                       wandb_run_name="", wandb_entity="", disable_wandb=False, seed=42, data_dir="datasets",
                       val_split=0.1, num_workers=4, use_amp=True, grad_clip=1.0, log_dir="ae_runs", save_every=50,
                       resume="", config="ae/configs/ae_delta.yaml", tag="", gpu=0, log_every=20,
                       data_percentage=1.0)
LOSS_FIELDS = dict(delta_margin=0.85, delta_weight=1.0, delta_window=3, smooth_weight=1.0, seq_len=8)


# ------------------------------------------------------------ SPEC section 5, written out
def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 1) if channels % g == 0)


def spec_state(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """State dict of the public layout: one flat Sequential per stack, index by index."""
    sd: dict[str, torch.Tensor] = {}

    def conv(name, c_in, c_out):
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) / (3 * c_in ** 0.5)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c_out, generator=gen)

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)

    def linear(name, n_in, n_out):
        sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(n_out, generator=gen)

    def resblock(name, c):   # block = [GN, SiLU, Conv3x3, GN, SiLU, Conv3x3]
        norm(f"{name}.block.0", c)
        conv(f"{name}.block.2", c, c)
        norm(f"{name}.block.3", c)
        conv(f"{name}.block.5", c, c)

    widths = cfg["hidden_dims"]
    prev = cfg["in_channels"]
    for i, width in enumerate(widths):   # conv 4i, GN 4i+1, SiLU 4i+2, ResBlock 4i+3
        conv(f"encoder.conv_stack.{4 * i}", prev, width)
        norm(f"encoder.conv_stack.{4 * i + 1}", width)
        resblock(f"encoder.conv_stack.{4 * i + 3}", width)
        prev = width
    norm("encoder.final_norm.0", prev)
    linear("encoder.fc", prev, cfg["latent_dim"])
    h_b, w_b = _bottleneck(cfg)
    rev = widths[::-1]
    linear("decoder.fc.0", cfg["latent_dim"], rev[0] * h_b * w_b)
    for i, (c_in, c_out) in enumerate(zip(rev[:-1], rev[1:])):   # up 5i, conv 5i+1, GN 5i+2, SiLU, ResBlock 5i+4
        conv(f"decoder.upsample_stack.{5 * i + 1}", c_in, c_out)
        norm(f"decoder.upsample_stack.{5 * i + 2}", c_out)
        resblock(f"decoder.upsample_stack.{5 * i + 4}", c_out)
    conv("decoder.final.1", rev[-1], cfg["in_channels"])
    return sd


def _bottleneck(cfg: dict) -> tuple[int, int]:
    h, w = cfg["spatial_h"], cfg["spatial_w"]
    for _ in cfg["hidden_dims"]:
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def _gn(sd, name, x):
    return F.group_norm(x, _groups(x.shape[1]), sd[f"{name}.weight"], sd[f"{name}.bias"])


def _conv(sd, name, x, stride=1):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=1)


def _res(sd, name, x):
    t = _conv(sd, f"{name}.block.2", F.silu(_gn(sd, f"{name}.block.0", x)))
    return x + _conv(sd, f"{name}.block.5", F.silu(_gn(sd, f"{name}.block.3", t)))


def spec_encode(sd, cfg, frames):
    """frames [N, C, H, W] -> raw embeddings [N, latent_dim]."""
    h = frames
    for i in range(len(cfg["hidden_dims"])):
        h = F.silu(_gn(sd, f"encoder.conv_stack.{4 * i + 1}", _conv(sd, f"encoder.conv_stack.{4 * i}", h, 2)))
        h = _res(sd, f"encoder.conv_stack.{4 * i + 3}", h)
    h = F.silu(_gn(sd, "encoder.final_norm.0", h)).mean(dim=(2, 3))
    return F.linear(h, sd["encoder.fc.weight"], sd["encoder.fc.bias"])


def spec_decode(sd, cfg, z):
    """raw embeddings [N, latent_dim] -> frames [N, C, H, W]."""
    h_b, w_b = _bottleneck(cfg)
    h = F.silu(F.linear(z, sd["decoder.fc.0.weight"], sd["decoder.fc.0.bias"]))
    h = h.view(z.shape[0], cfg["hidden_dims"][-1], h_b, w_b)
    for i in range(len(cfg["hidden_dims"]) - 1):
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.silu(_gn(sd, f"decoder.upsample_stack.{5 * i + 2}", _conv(sd, f"decoder.upsample_stack.{5 * i + 1}", h)))
        h = _res(sd, f"decoder.upsample_stack.{5 * i + 4}", h)
    h = _conv(sd, "decoder.final.1", F.interpolate(h, scale_factor=2, mode="nearest"))
    return h[:, :, :cfg["spatial_h"], :cfg["spatial_w"]]


def _optimizer_state(state: dict[str, torch.Tensor]) -> dict:
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer.state_dict()


def _public_file(path, cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Write a checkpoint as the public training script saves it; returns its state dict."""
    gen = torch.Generator().manual_seed(seed)
    state = spec_state(cfg, gen)
    torch.save({"epoch": 399, "model": state, "optimizer": _optimizer_state(state),
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0},
                "config": {**TRAINING_FIELDS, **LOSS_FIELDS, **cfg}, "val_loss": 0.0123}, path)
    return state


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_dict_keys_and_shapes_equal_the_public_layout(cfg):
    public = spec_state(cfg, torch.Generator().manual_seed(0))
    ours = RetrievalEncoder(EncoderConfig(**cfg)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in public.items()}


@pytest.mark.parametrize("cfg", CONFIGS)
def test_public_training_checkpoint_loads_and_embeds_like_spec(tmp_path, cfg):
    seed = int(torch.randint(1 << 30, (1,)))
    path = tmp_path / "ae_latent_mem.pt"
    state = _public_file(path, cfg, seed)
    frames = torch.randn(6, cfg["in_channels"], cfg["spatial_h"], cfg["spatial_w"],
                         generator=torch.Generator().manual_seed(seed + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # known training fields are ignored silently
        model = load_checkpoint(path)
        descriptor = EncoderDescriptor.from_checkpoint(path)
    assert model.config == EncoderConfig(**LOSS_FIELDS, **cfg)
    with torch.no_grad():
        expected = spec_encode(state, cfg, frames)
        assert_close(model.encode(frames), expected, name="raw embedding")
        assert_close(descriptor(frames), F.normalize(expected, dim=-1), name="descriptor")
        assert_close(model(frames)[1], spec_decode(state, cfg, expected), name="reconstruction")


def test_unknown_config_field_still_warns(tmp_path):
    cfg = dict(in_channels=3, spatial_h=5, spatial_w=6, latent_dim=4, hidden_dims=[4])
    path = tmp_path / "variant.pt"
    _public_file(path, cfg, seed=1)
    raw = torch.load(path, weights_only=True)
    raw["config"]["attention_heads"] = 4
    torch.save(raw, path)
    with pytest.warns(UserWarning, match=r"ignoring unknown config keys \['attention_heads'\]"):
        load_checkpoint(path)


def _nested(key: str) -> str:
    """Flat key -> the nested key that earlier versions of this package wrote."""
    for stack, per_stage in (("encoder.conv_stack.", 4), ("decoder.upsample_stack.", 5)):
        if key.startswith(stack):
            index, rest = key[len(stack):].split(".", 1)
            return f"{stack}{int(index) // per_stage}.{int(index) % per_stage}.{rest}"
    return key


@pytest.mark.parametrize("cfg", CONFIGS)
def test_earlier_nested_layout_still_loads(tmp_path, cfg):
    torch.manual_seed(int(torch.randint(1 << 30, (1,))))
    model = RetrievalEncoder(EncoderConfig(**cfg)).eval()
    nested = {_nested(k): v for k, v in model.state_dict().items()}
    assert any(".conv_stack.0.0." in k for k in nested) and len(nested) == len(model.state_dict())
    torch.save({"config": model.config.to_dict(), "model": nested}, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    frames = torch.randn(4, cfg["in_channels"], cfg["spatial_h"], cfg["spatial_w"])
    with torch.no_grad():
        assert torch.equal(loaded.encode(frames), model.encode(frames))
        assert torch.equal(loaded(frames)[1], model(frames)[1])


def test_own_checkpoint_is_flat_and_round_trips(tmp_path):
    cfg = dict(in_channels=4, spatial_h=9, spatial_w=10, latent_dim=6, hidden_dims=[8, 16])
    model = RetrievalEncoder(EncoderConfig(**cfg)).eval()
    save_checkpoint(tmp_path / "own.pt", model)
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    assert set(raw["model"]) == set(spec_state(cfg, torch.Generator().manual_seed(0)))
    frames = torch.randn(3, 4, 9, 10)
    with torch.no_grad():
        assert_close(load_checkpoint(tmp_path / "own.pt").encode(frames), spec_encode(raw["model"], cfg, frames),
                     name="own file through the SPEC forward")
