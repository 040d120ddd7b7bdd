"""A checkpoint that does not fit the ModelConfig is refused from its shapes, before the model is built."""
from __future__ import annotations

import math
import re

import pytest
import torch

import lrag_engine.engine as engine_module
from lrag_engine import Engine
from lrag_engine.config import ModelConfig
from lrag_engine.models.checkpoint import (CheckpointKeyError, CheckpointShapeError, check_checkpoint_shapes,
                                           read_shapes, save_checkpoint)
from lrag_engine.models.wan import WanModel

TINY = ModelConfig.preset("tiny")
BIG = ModelConfig.preset("wan2.1-t2v-1.3b")


def _state(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    return WanModel(config, seed=seed).state_dict()


@pytest.fixture
def no_model_build(monkeypatch):
    """Engine's WanModel fails the test when called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("WanModel was built before the checkpoint shapes were checked")
    monkeypatch.setattr(engine_module, "WanModel", forbidden)


def _shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """A few Wan parameter shapes written from SPEC section 2, independent of wan.py."""
    return {
        "patch_embedding.weight": (cfg.dim, cfg.in_channels, *cfg.patch_size),
        "text_embedding.0.weight": (cfg.dim, cfg.text_dim),
        "blocks.0.ffn.0.weight": (cfg.ffn_dim, cfg.dim),
        "head.head.weight": (math.prod(cfg.patch_size) * cfg.out_channels, cfg.dim),
    }[name]


def _pair(name: str, found: ModelConfig, model: ModelConfig) -> str:
    return re.escape(f"'{name}' {_shape(name, found)} in the checkpoint vs {_shape(name, model)} in the model")


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
@pytest.mark.parametrize("layout,prefix", [("generator", False), ("generator_ema", True), ("bare", False),
                                           ("model", True)])
def test_tiny_checkpoint_for_the_big_preset_fails_before_the_model_is_built(tmp_path, no_model_build, ext,
                                                                            layout, prefix):
    path = tmp_path / f"tiny{ext}"
    save_checkpoint(_state(TINY, seed=int(torch.randint(100, (1,)))), path, layout=layout, prefix=prefix)
    with pytest.raises(CheckpointShapeError) as info:
        Engine(BIG, checkpoint=path)
    message = str(info.value)
    assert repr(str(path)) in message
    assert re.search(_pair("patch_embedding.weight", TINY, BIG), message), message
    assert "Preset 'wan2.1-t2v-1.3b' does not fit this checkpoint; its shapes fit preset 'tiny'" in message
    assert isinstance(info.value, ValueError)


def test_other_ffn_width_names_the_first_mismatching_keys(tmp_path, no_model_build):
    narrow = ModelConfig.preset("tiny", ffn_dim=96)
    path = tmp_path / "narrow.safetensors"
    save_checkpoint(_state(narrow, seed=3), path)
    with pytest.raises(CheckpointShapeError) as info:
        Engine(TINY, checkpoint=path)
    message = str(info.value)
    # Only the FFN matrices and first bias differ: 3 tensors per layer.
    assert f"{3 * TINY.num_layers} tensors have other shapes" in message
    assert re.search(_pair("blocks.0.ffn.0.weight", narrow, TINY), message), message
    assert "Preset 'tiny' does not fit this checkpoint, and neither does any preset" in message


def test_custom_config_gets_the_fitting_preset_suggested(tmp_path, no_model_build):
    path = tmp_path / "tiny.pt"
    save_checkpoint(_state(TINY, seed=4), path)
    wide = ModelConfig.preset("tiny", ffn_dim=192)
    with pytest.raises(CheckpointShapeError, match=r"This ModelConfig does not fit this checkpoint; its shapes fit "
                                                   r"preset 'tiny' \(ModelConfig.preset\('tiny'\), --preset tiny\)"):
        Engine(wide, checkpoint=path)


def test_missing_key_is_found_before_the_model_is_built(tmp_path, no_model_build):
    state = _state(TINY, seed=5)
    del state["blocks.1.cross_attn.norm_k.weight"]
    save_checkpoint(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointKeyError, match=r"missing 1 \[blocks\.1\.cross_attn\.norm_k\.weight\]"):
        Engine(TINY, checkpoint=tmp_path / "broken.pt")
    check_checkpoint_shapes(tmp_path / "broken.pt", TINY, strict=False)   # lenient: only shapes count


def test_fitting_checkpoint_builds_the_model_once(tmp_path, monkeypatch):
    calls = []
    real = engine_module.WanModel

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "WanModel", counting)
    state = _state(ModelConfig.preset("tiny", height=6, width=10), seed=6)   # latent size: no parameter shape
    save_checkpoint(state, tmp_path / "ok.safetensors", layout="generator_ema", prefix=True)
    engine = Engine(TINY, checkpoint=tmp_path / "ok.safetensors")
    assert len(calls) == 1 and engine.load_report.loaded == len(state)
    for key, value in state.items():
        assert torch.equal(engine.model.state_dict()[key], value), key


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_read_shapes_reads_no_tensor_data(tmp_path, ext):
    gen = torch.Generator().manual_seed(7)
    state = {"generator": {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen)}}
    path = tmp_path / f"s{ext}"
    save_checkpoint(state["generator"], path)
    shapes = read_shapes(path)
    flat = shapes["generator"] if ext == ".pt" else {k.split(".", 1)[1]: v for k, v in shapes.items()}
    assert {k: tuple(v.shape) for k, v in flat.items()} == {"a": (3, 5), "b": (7,)}
    if ext == ".safetensors":
        assert all(v.is_meta for v in flat.values()), "the header alone gives the shapes"


def test_unreadable_encoder_fails_before_the_model_is_built(tmp_path, no_model_build):
    bad = tmp_path / "encoder.pt"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        Engine(BIG, encoder=bad)
