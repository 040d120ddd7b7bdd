"""The Wan <-> diffusers key map, loading diffusers-named / sharded / folder checkpoints, config.json parsing."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from lrag_engine import Engine
from lrag_engine.attention.backend import attend_reference
from lrag_engine.config import ModelConfig
from lrag_engine.models.checkpoint import (CheckpointKeyError, CheckpointShapeError, check_checkpoint_shapes,
                                           checkpoint_files, load_weights, save_checkpoint)
from lrag_engine.models.layouts import (LayoutError, detect_naming, diffusers_config, diffusers_to_wan,
                                        model_config_from_json, wan_to_diffusers)
from lrag_engine.models.wan import WanModel, sinusoidal_embedding
from lrag_engine.ops.rope import RopeTables, rope_frames
from lrag_engine.testing import assert_close

CFG = ModelConfig.preset("tiny")
INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# The public Wan2.1-T2V-1.3B config.json (original Wan naming).
WAN_1_3B_CONFIG = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
                   "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
                   "num_layers": 30, "out_dim": 16, "text_len": 512}


def wan_state(seed: int) -> dict[str, torch.Tensor]:
    return WanModel(CFG, seed=seed).state_dict()


def assert_state_equal(model: WanModel, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert set(current) == set(state)
    for k, v in state.items():
        assert torch.equal(current[k], v), f"{k} differs"


def write_sharded(folder, state: dict[str, torch.Tensor], shards: int) -> None:
    """diffusers' sharded form: shard files plus an index {"weight_map": {name: file}}."""
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


# --------------------------------------------------------------------------- key map
def test_key_map_round_trip_is_exact():
    state = wan_state(seed=1)
    diffusers = wan_to_diffusers(state)
    assert len(diffusers) == len(state)
    assert not (set(diffusers) & set(state)) - {"patch_embedding.weight", "patch_embedding.bias"}
    back = diffusers_to_wan(diffusers)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)
    # Wan's affine cross-attention norm is norm3, diffusers' is norm2.
    assert diffusers["blocks.1.norm2.weight"] is state["blocks.1.norm3.weight"]
    assert diffusers["blocks.0.scale_shift_table"] is state["blocks.0.modulation"]
    assert diffusers["scale_shift_table"] is state["head.modulation"]
    assert detect_naming(state) == "wan" and detect_naming(diffusers) == "diffusers"
    assert detect_naming(["patch_embedding.weight", "extra"]) is None


def test_key_map_refuses_what_it_does_not_know():
    diffusers = wan_to_diffusers(wan_state(seed=2))
    with pytest.raises(LayoutError, match=r"1 keys are not diffusers-named .*\[blocks.0.attn1.to_qkv.weight\]"):
        diffusers_to_wan({**diffusers, "blocks.0.attn1.to_qkv.weight": torch.zeros(3)})
    with pytest.raises(LayoutError, match=r"image-conditioning tensors "
                                          r"\[condition_embedder.image_embedder.norm1.weight\]: it is an image-to"):
        diffusers_to_wan({**diffusers, "condition_embedder.image_embedder.norm1.weight": torch.zeros(3)})
    with pytest.raises(LayoutError, match=r"\[blocks.1.attn2.add_k_proj.weight\]: it is an image-to-video"):
        diffusers_to_wan({**diffusers, "blocks.1.attn2.add_k_proj.weight": torch.zeros(3)})
    with pytest.raises(LayoutError, match=r"\[blocks.0.cross_attn.k_img.weight\]: it is an image-to-video"):
        wan_to_diffusers({**wan_state(seed=2), "blocks.0.cross_attn.k_img.weight": torch.zeros(3)})
    with pytest.raises(LayoutError, match=r"'blocks.1.scale_shift_table' has shape \(6, 64\); .*\[1, 6, dim\]"):
        diffusers_to_wan({**diffusers, "blocks.1.scale_shift_table": torch.zeros(6, 64)})
    with pytest.raises(LayoutError, match=r"'head.modulation' has shape \(1, 6, 64\); .*\[1, 2, dim\]"):
        wan_to_diffusers({"head.modulation": torch.zeros(1, 6, 64)})
    with pytest.raises(LayoutError, match="mixes the Wan naming"):
        detect_naming(["blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"])
    lenient = diffusers_to_wan({**diffusers, "extra.weight": torch.zeros(1)}, strict=False)
    assert "extra.weight" in lenient and "blocks.0.self_attn.q.weight" in lenient


def _wan_precision_timesteps(transformer) -> None:
    """diffusers computes the timestep sinusoid in float32, Wan in float64 (SPEC section 2);
    give the diffusers model Wan's so the comparison is at float32 rounding."""
    proj = transformer.condition_embedder.timesteps_proj
    proj.register_forward_hook(lambda m, inputs, out: sinusoidal_embedding(inputs[0], out.shape[-1]))


def test_key_map_matches_a_real_diffusers_model():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(**diffusers_config(CFG)).eval()
    with torch.no_grad():  # diffusers initialises norms to 1 and 0: perturb so a swapped norm shows
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = {k: v.shape for k, v in transformer.state_dict().items()}
    assert {k: v.shape for k, v in wan_to_diffusers(wan_state(seed=3)).items()} == expected

    model = WanModel(CFG, seed=4)
    model.load_state_dict(diffusers_to_wan(transformer.state_dict()))
    _wan_precision_timesteps(transformer)
    tables = RopeTables.build(CFG.head_dim, CFG.height // 2, CFG.width // 2, 8)

    def full_attention(layer, q, k, v):   # diffusers' RoPE: frames at positions 0..F-1
        pos = torch.arange(q.shape[1] // CFG.tokens_per_frame)
        return attend_reference(rope_frames(q, pos, tables), rope_frames(k, pos, tables), v)

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, CFG.in_channels, CFG.height, CFG.width, generator=gen)
    text = torch.randn(2, CFG.text_len, CFG.text_dim, generator=gen)
    t = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        expected = transformer(x.transpose(1, 2), t, text, return_dict=False)[0].transpose(1, 2)
        got = model(x, t[:, None].expand(2, 3), model.encode_text(text), full_attention)
    assert_close(got, expected, name="flow")


# ------------------------------------------------------------------- loading layouts
def test_single_file_and_folder_in_diffusers_naming(tmp_path):
    state = wan_state(seed=6)
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in wan_to_diffusers(state).items()}, str(folder / WEIGHTS))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                    **diffusers_config(CFG)}))
    for path in (folder / WEIGHTS, folder):
        check_checkpoint_shapes(path, CFG)
        model = WanModel(CFG, seed=7)
        report = load_weights(model, path)
        assert report.naming == "diffusers" and report.source == "bare" and report.loaded == len(state)
        assert "diffusers naming" in str(report)
        assert_state_equal(model, state)
    assert ModelConfig.from_json(folder, height=CFG.height, width=CFG.width, text_len=CFG.text_len) == CFG
    # A diffusers pipeline folder: its transformer/ is the checkpoint.
    (tmp_path / "model_index.json").write_text("{}")
    assert checkpoint_files(tmp_path).files == (str(folder / WEIGHTS),)
    assert_state_equal(Engine(CFG, checkpoint=tmp_path).model, state)
    with pytest.raises(CheckpointShapeError, match=r"'blocks.0.ffn.0.weight' \(128, 64\) in the checkpoint vs "
                                                   r"\(96, 64\) in the model"):
        check_checkpoint_shapes(folder, ModelConfig.preset("tiny", ffn_dim=96))


@pytest.mark.parametrize("naming", ["diffusers", "wan"])
def test_sharded_checkpoint_by_index_and_folder(tmp_path, naming):
    state = wan_state(seed=8)
    write_sharded(tmp_path, wan_to_diffusers(state) if naming == "diffusers" else state, shards=3)
    files = checkpoint_files(tmp_path)
    assert files.path == str(tmp_path / INDEX) and len(files.files) == 3
    for path in (tmp_path, tmp_path / INDEX):
        check_checkpoint_shapes(path, CFG)
        model = WanModel(CFG, seed=9)
        assert load_weights(model, path).naming == naming
        assert_state_equal(model, state)


def test_folder_holding_one_checkpoint_file(tmp_path):
    state = wan_state(seed=10)
    save_checkpoint(state, tmp_path / "self_forcing.pt", layout="generator_ema", prefix=True)
    (tmp_path / "notes.txt").write_text("not weights")
    model = WanModel(CFG, seed=11)
    report = load_weights(model, tmp_path)
    assert report.source == "generator_ema" and report.naming == "wan"
    assert_state_equal(model, state)


def test_real_diffusers_save_pretrained_sharded(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    transformer = diffusers.WanTransformer3DModel(**diffusers_config(CFG))
    transformer.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / INDEX).exists() and len(checkpoint_files(tmp_path).files) > 1
    cfg = ModelConfig.from_json(tmp_path / "config.json", height=CFG.height, width=CFG.width, text_len=CFG.text_len)
    assert cfg == CFG
    model = WanModel(cfg, seed=12)
    check_checkpoint_shapes(tmp_path, cfg)
    report = load_weights(model, tmp_path)
    assert report.naming == "diffusers" and report.missing == [] and report.unexpected == []
    assert_state_equal(model, diffusers_to_wan(transformer.state_dict()))


# ------------------------------------------------------------------------- errors
def test_naming_mismatch_and_unknown_naming_say_how_to_load(tmp_path):
    state = wan_state(seed=13)
    path = tmp_path / WEIGHTS
    save_file({k: v.contiguous() for k, v in wan_to_diffusers(state).items()}, str(path))
    model = WanModel(CFG, seed=14)
    with pytest.raises(LayoutError, match=r"uses the diffusers naming .*naming='wan' was asked; load it with "
                                          r"naming='diffusers' or naming='auto'"):
        load_weights(model, path, naming="wan")
    with pytest.raises(LayoutError, match="uses the diffusers naming"):
        check_checkpoint_shapes(path, CFG, naming="wan")
    save_checkpoint(state, tmp_path / "wan.pt")
    with pytest.raises(LayoutError, match=r"entry 'generator'\) uses the wan naming .*naming='wan'"):
        load_weights(model, tmp_path / "wan.pt", naming="diffusers")
    torch.save({"generator": {"layer.weight": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(LayoutError, match=r"neither the Wan naming .* nor the diffusers .*layer.weight.*pass "
                                          r"key=<entry>"):
        load_weights(model, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="naming must be"):
        load_weights(model, path, naming="original")


def test_diffusers_extra_and_image_keys(tmp_path):
    state = wan_to_diffusers(wan_state(seed=15))
    save_file({**state, "blocks.0.extra.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    model = WanModel(CFG, seed=16)
    with pytest.raises(CheckpointKeyError, match=r"unexpected 1 \[blocks.0.extra.weight\]"):
        load_weights(model, tmp_path / "extra.safetensors")
    assert load_weights(model, tmp_path / "extra.safetensors", strict=False).unexpected == ["blocks.0.extra.weight"]
    save_file({**state, "blocks.0.attn2.add_v_proj.weight": torch.zeros(2)}, str(tmp_path / "i2v.safetensors"))
    with pytest.raises(LayoutError, match="image-to-video"):
        check_checkpoint_shapes(tmp_path / "i2v.safetensors", CFG)


def test_folder_and_index_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds no checkpoint .*pickled diffusers weights.*safe_serialization=True"):
        checkpoint_files(empty)
    two = tmp_path / "two"
    two.mkdir()
    save_checkpoint(wan_state(seed=17), two / "a.pt")
    save_checkpoint(wan_state(seed=17), two / "b.safetensors")
    with pytest.raises(ValueError, match=r"several checkpoints \['a.pt', 'b.safetensors'\]; pass the file"):
        load_weights(WanModel(CFG), two)

    state = wan_to_diffusers(wan_state(seed=18))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_sharded(sharded, state, shards=2)
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    other_shard = next(f for f in sorted(set(weight_map.values())) if f != weight_map["proj_out.weight"])
    (sharded / INDEX).write_text(json.dumps({"weight_map": {**weight_map, "proj_out.weight": other_shard}}))
    with pytest.raises(ValueError, match=r"places elsewhere or not at all: 1 \[proj_out.weight\]"):
        load_weights(WanModel(CFG), sharded)
    (sharded / INDEX).write_text(json.dumps({"weight_map": {**weight_map, "ghost.weight": other_shard}}))
    with pytest.raises(ValueError, match=r"lists tensors no shard holds: 1 \[ghost.weight\]"):
        check_checkpoint_shapes(sharded, CFG)
    (sharded / INDEX).write_text(json.dumps({"weight_map": {"proj_out.weight": "../escape.safetensors"}}))
    with pytest.raises(ValueError, match="names shards outside its folder"):
        checkpoint_files(sharded)
    (sharded / INDEX).write_text(json.dumps({"weight_map": {"proj_out.weight": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=re.escape("gone.safetensors")):
        checkpoint_files(sharded / INDEX)
    (sharded / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        checkpoint_files(sharded)


# ------------------------------------------------------------------------ config.json
DROP = object()   # a field left out of the config


def test_config_json_in_both_namings(tmp_path):
    assert ModelConfig.from_json(WAN_1_3B_CONFIG) == ModelConfig.preset("wan2.1-t2v-1.3b")
    diffusers_1_3b = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
                      "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                      "ffn_dim": 8960, "freq_dim": 256, "image_dim": None, "in_channels": 16,
                      "num_attention_heads": 12, "num_layers": 30, "out_channels": 16, "patch_size": [1, 2, 2],
                      "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}
    assert ModelConfig.from_json(diffusers_1_3b) == ModelConfig.preset("wan2.1-t2v-1.3b")
    (tmp_path / "config.json").write_text(json.dumps(diffusers_1_3b))
    small = ModelConfig.from_json(tmp_path, height=30, width=52)
    assert (small.height, small.width, small.text_len, small.dim) == (30, 52, 512, 1536)
    assert model_config_from_json(dict(WAN_1_3B_CONFIG, text_len=256)).text_len == 256
    assert ModelConfig.from_json(diffusers_config(CFG), height=8, width=12, text_len=16) == CFG


@pytest.mark.parametrize("change,message", [
    pytest.param({"image_dim": 1280}, r"image_dim=1280 is not supported \(image conditioning", id="diffusers-i2v"),
    pytest.param({"added_kv_proj_dim": 1536}, "added_kv_proj_dim=1536 is not supported", id="diffusers-added-kv"),
    pytest.param({"cross_attn_norm": False}, "cross_attn_norm=False", id="diffusers-no-cross-norm"),
    pytest.param({"lora_rank": 4}, r"fields this loader does not know: \[lora_rank\]", id="diffusers-unknown"),
    pytest.param({"num_layers": DROP}, r"lacks \['num_layers'\]", id="diffusers-missing"),
    pytest.param({"patch_size": [2, 2, 2]}, r"patch_size must be \(1, ph, pw\)", id="diffusers-temporal-patch"),
])
def test_diffusers_config_errors(change, message):
    config = {"_class_name": "WanTransformer3DModel", **diffusers_config(CFG), **change}
    config = {k: v for k, v in config.items() if v is not DROP}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_json(config)


@pytest.mark.parametrize("change,message", [
    pytest.param({"model_type": "i2v"}, "model_type='i2v' is not supported .*text-to-video", id="wan-i2v"),
    pytest.param({"window_size": [4, 4]}, r"window_size=\[4, 4\]", id="wan-window"),
    pytest.param({"text_lenght": 512}, r"does not know: \[text_lenght\]", id="wan-typo"),
])
def test_wan_config_errors(change, message):
    with pytest.raises(LayoutError, match=message):
        ModelConfig.from_json({**WAN_1_3B_CONFIG, **change})


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(LayoutError, match="holds a JSON list"):
        ModelConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(LayoutError, match="not a readable JSON file"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(LayoutError, match="neither a diffusers WanTransformer3DModel config"):
        ModelConfig.from_json({"_class_name": "UNet2DConditionModel", "sample_size": 64})
