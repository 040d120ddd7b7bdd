"""Checkpoint layouts, LoRA merge and load errors for the Wan backbone."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from lrag_engine.attention.backend import attend_reference
from lrag_engine.config import ModelConfig
from lrag_engine.models.checkpoint import (CheckpointKeyError, LoadReport, extract_wan_state, load_weights,
                                           merge_lora, read_state_dict, save_checkpoint, save_lora)
from lrag_engine.models.wan import WanModel
from lrag_engine.ops.rope import RopeTables, rope_frames
from lrag_engine.testing import assert_close

CFG = ModelConfig.preset("tiny", height=6, width=10)


def attention_fn(cfg: ModelConfig = CFG):
    tables = RopeTables.build(cfg.head_dim, cfg.height // 2, cfg.width // 2, 8)

    def self_attention(layer, q, k, v):
        pos = torch.arange(q.shape[1] // cfg.tokens_per_frame)
        return attend_reference(rope_frames(q, pos, tables), rope_frames(k, pos, tables), v)
    return self_attention


def run(model: WanModel, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, CFG.in_channels, CFG.height, CFG.width, generator=gen)
    t = torch.rand(2, 2, generator=gen) * 1000
    text = torch.randn(2, 5, CFG.text_dim, generator=gen)
    with torch.no_grad():
        return model(x, t, model.encode_text(text), attention_fn())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert set(current) == set(state)
    for k, v in state.items():
        assert torch.equal(current[k], v), f"{k} differs"


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
@pytest.mark.parametrize("prefix", [False, True], ids=["plain", "model-prefix"])
@pytest.mark.parametrize("layout", ["generator", "generator_ema", "model", "bare"])
def test_round_trip_every_layout(tmp_path, layout, prefix, ext):
    source = WanModel(CFG, seed=1)
    path = tmp_path / f"ckpt{ext}"
    save_checkpoint(source, path, layout=layout, prefix=prefix)
    target = WanModel(CFG, seed=2)
    report = load_weights(target, path)
    assert isinstance(report, LoadReport)
    # A bare dict whose every key starts with "model." is the flat form of the "model" entry.
    assert report.source == ("model" if layout == "bare" and prefix else layout)
    assert report.loaded == len(source.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.merged_lora_modules == []
    assert_state_equal(target, source.state_dict())
    assert torch.equal(run(target), run(source))


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_generator_ema_preferred_and_key_override(tmp_path, ext):
    ema, plain = WanModel(CFG, seed=3).state_dict(), WanModel(CFG, seed=4).state_dict()
    path = tmp_path / f"both{ext}"
    raw = {"generator_ema": {"model." + k: v for k, v in ema.items()},
           "generator": {"model." + k: v for k, v in plain.items()}}
    if ext == ".pt":
        torch.save({**raw, "step": 7}, path)
    else:
        from safetensors.torch import save_file
        save_file({f"{top}.{k}": v for top, s in raw.items() for k, v in s.items()}, str(path))
    model = WanModel(CFG, seed=5)
    assert load_weights(model, path).source == "generator_ema"
    assert_state_equal(model, ema)
    assert load_weights(model, path, key="generator").source == "generator"
    assert_state_equal(model, plain)
    with pytest.raises(KeyError, match="no entry 'critic'"):
        load_weights(model, path, key="critic")


def test_wrapper_prefixes_are_removed():
    state = WanModel(CFG, seed=6).state_dict()
    wrapped = {}
    for k, v in state.items():
        if k.startswith("blocks."):  # FSDP wraps each block and names the wrapper in the key
            i, rest = k[len("blocks."):].split(".", 1)
            k = f"blocks.{i}._fsdp_wrapped_module.{rest}"
        wrapped["module._fsdp_wrapped_module." + k] = v
    out = extract_wan_state({"model": wrapped})
    assert set(out) == set(state)
    assert all(out[k] is state[k] for k in state)


def test_load_casts_to_model_dtype(tmp_path):
    source = WanModel(CFG, seed=7)
    save_checkpoint(source, tmp_path / "f32.pt")
    target = WanModel(CFG, dtype=torch.bfloat16, seed=8)
    load_weights(target, tmp_path / "f32.pt")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v.to(torch.bfloat16)), k


# ------------------------------------------------------------------------------ LoRA
def lora_modules(cfg: ModelConfig = CFG) -> list[str]:
    names = []
    for i in range(cfg.num_layers):
        names += [f"blocks.{i}.{a}.{m}" for a in ("self_attn", "cross_attn") for m in "qkvo"]
        names += [f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"]
    return sorted(names)


def random_lora(model: nn.Module, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in lora_modules():
        w = model.get_submodule(name).weight
        out[name] = (torch.randn(rank, w.shape[1], generator=gen) * 0.2,
                     torch.randn(w.shape[0], rank, generator=gen) * 0.2)
    return out


def peft_state(lora, key_style: str) -> dict[str, torch.Tensor]:
    lead = "model." if key_style == "model-prefix" else ""
    adapter = ".default" if key_style == "adapter-name" else ""
    state = {}
    for name, (a, b) in lora.items():
        state[f"{lead}base_model.model.{name}.lora_A{adapter}.weight"] = a
        state[f"{lead}base_model.model.{name}.lora_B{adapter}.weight"] = b
    return state


class UnmergedLoRALinear(nn.Module):
    """x @ W^T + b + scale * (x @ A^T) @ B^T, the computation a peft LoRA layer does."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
@pytest.mark.parametrize("key_style,under_key,alpha", [
    pytest.param("plain", "generator_lora", 5.0, id="generator_lora-alpha5"),
    pytest.param("plain", None, None, id="bare-alpha-default"),
    pytest.param("adapter-name", "generator_lora", 2.0, id="default-adapter"),
    pytest.param("model-prefix", None, 3.0, id="model-prefix"),
])
def test_lora_merge_matches_unmerged_forward(tmp_path, ext, key_style, under_key, alpha):
    rank = 3
    base = WanModel(CFG, seed=9)
    lora = random_lora(base, rank, seed=10)
    save_checkpoint(base, tmp_path / f"base{ext}", layout="generator", prefix=True)
    save_lora(peft_state(lora, key_style), tmp_path / f"lora{ext}", under_key=under_key)

    merged = WanModel(CFG, seed=11)
    report = load_weights(merged, tmp_path / f"base{ext}", lora_path=tmp_path / f"lora{ext}", lora_alpha=alpha)
    assert report.merged_lora_modules == lora_modules()

    scale = (rank if alpha is None else alpha) / rank
    unmerged = copy.deepcopy(base)
    for name, (a, b) in lora.items():
        parent, child = name.rsplit(".", 1)
        module = unmerged.get_submodule(parent)
        setattr(module, child, UnmergedLoRALinear(module.get_submodule(child), a, b, scale))
    expected = run(unmerged)
    assert (expected - run(base)).abs().max() > 1e-2  # the LoRA changes the output
    assert_close(run(merged), expected, name="flow")


def test_merge_lora_in_float32_then_cast_back():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=gen).to(torch.bfloat16)
    a, b = torch.randn(2, 5, generator=gen), torch.randn(7, 2, generator=gen)
    state = {"blocks.0.ffn.0.weight": w, "blocks.0.ffn.0.bias": torch.zeros(7)}
    lora = {"generator_lora": {"base_model.model.blocks.0.ffn.0.lora_A.weight": a,
                               "base_model.model.blocks.0.ffn.0.lora_B.weight": b}}
    out = merge_lora(state, lora, alpha=4.0)
    expected = w.double() + 2.0 * b.double() @ a.double()
    assert out["blocks.0.ffn.0.weight"].dtype == torch.bfloat16
    assert_close(out["blocks.0.ffn.0.weight"], expected, name="merged")
    assert state["blocks.0.ffn.0.weight"] is w and out["blocks.0.ffn.0.bias"] is state["blocks.0.ffn.0.bias"]


def test_lora_errors_name_the_module():
    state = {"blocks.0.ffn.0.weight": torch.zeros(7, 5)}
    a, b = torch.zeros(2, 5), torch.zeros(7, 2)
    key = "base_model.model.blocks.0.ffn.{}.lora_{}.weight"
    with pytest.raises(ValueError, match=r"'blocks.0.ffn.2' has no base weight 'blocks.0.ffn.2.weight'"):
        merge_lora(state, {key.format(2, "A"): a, key.format(2, "B"): b})
    with pytest.raises(ValueError, match=r"'blocks.0.ffn.0'.*\(2, 4\).*\(7, 2\).*\(7, 5\)"):
        merge_lora(state, {key.format(0, "A"): torch.zeros(2, 4), key.format(0, "B"): b})
    with pytest.raises(ValueError, match=r"'blocks.0.ffn.0' has no lora_B"):
        merge_lora(state, {key.format(0, "A"): a})
    with pytest.raises(ValueError, match="not lora_A/lora_B weights: 1 .*lora_magnitude"):
        merge_lora(state, {key.format(0, "A"): a, key.format(0, "B"): b,
                           "base_model.model.blocks.0.ffn.0.lora_magnitude_vector": torch.zeros(7)})


def test_failed_lora_load_leaves_model_unchanged(tmp_path):
    model = WanModel(CFG, seed=12)
    save_checkpoint(WanModel(CFG, seed=13), tmp_path / "base.pt")
    lora = random_lora(model, 2, seed=0)
    state = peft_state(lora, "plain")
    state["base_model.model.blocks.1.self_attn.x.lora_A.weight"] = torch.zeros(2, CFG.dim)
    state["base_model.model.blocks.1.self_attn.x.lora_B.weight"] = torch.zeros(CFG.dim, 2)
    save_lora(state, tmp_path / "lora.pt")
    before = snapshot(model)
    with pytest.raises(ValueError, match="blocks.1.self_attn.x"):
        load_weights(model, tmp_path / "base.pt", lora_path=tmp_path / "lora.pt")
    assert_state_equal(model, before)


# ---------------------------------------------------------------------------- errors
def test_missing_key_strict_and_lenient(tmp_path):
    state = WanModel(CFG, seed=14).state_dict()
    del state["head.head.weight"]
    save_checkpoint(state, tmp_path / "missing.pt")
    model = WanModel(CFG, seed=15)
    before = snapshot(model)
    with pytest.raises(CheckpointKeyError, match=r"missing 1 \[head.head.weight\]; unexpected 0") as info:
        load_weights(model, tmp_path / "missing.pt")
    assert isinstance(info.value, KeyError) and "missing.pt" in str(info.value)
    assert_state_equal(model, before)

    report = load_weights(model, tmp_path / "missing.pt", strict=False)
    assert report.missing == ["head.head.weight"] and report.unexpected == []
    assert "missing (kept model values): 1 [head.head.weight]" in str(report)
    assert torch.equal(model.head.head.weight, before["head.head.weight"])
    assert torch.equal(model.head.head.bias, state["head.head.bias"])


def test_unexpected_keys_listed_with_count(tmp_path):
    state = WanModel(CFG, seed=16).state_dict()
    extra = {f"blocks.{i}.extra.weight": torch.zeros(3) for i in range(12)}
    save_checkpoint({**state, **extra}, tmp_path / "extra.safetensors", layout="model")
    model = WanModel(CFG, seed=17)
    before = snapshot(model)
    with pytest.raises(KeyError, match=r"unexpected 12 \[blocks.0.extra.weight, .*\.\.\. \(2 more\)\]"):
        load_weights(model, tmp_path / "extra.safetensors")
    assert_state_equal(model, before)
    report = load_weights(model, tmp_path / "extra.safetensors", strict=False)
    assert report.unexpected == sorted(extra) and report.missing == []
    assert_state_equal(model, state)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = WanModel(CFG, seed=18).state_dict()
    state["head.head.weight"] = torch.zeros(63, CFG.dim)
    save_checkpoint(state, tmp_path / "shape.pt", layout="generator_ema")
    model = WanModel(CFG, seed=19)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'head.head.weight' has shape \(63, 64\) in the checkpoint "
                                         r"but \(64, 64\) in the model"):
        load_weights(model, tmp_path / "shape.pt", strict=False)
    assert_state_equal(model, before)


def test_legacy_torch_save_is_readable(tmp_path):
    state = WanModel(CFG, seed=20).state_dict()
    torch.save({"generator": state}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    model = WanModel(CFG, seed=21)
    load_weights(model, tmp_path / "legacy.pth")
    assert_state_equal(model, state)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w.bin.*unknown extension '.bin'"):
        read_state_dict(tmp_path / "w.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt.*holds a list, not a dict"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"generator": {"a": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match=r"obj.pt.*objects other than tensors"):
        read_state_dict(tmp_path / "obj.pt")
    with pytest.raises(ValueError, match=r"none of the entries .* top-level keys: \['config', 'weights'\]"):
        extract_wan_state({"config": {"dim": 1}, "weights": [1, 2]})
    with pytest.raises(ValueError, match="unknown extension"):
        save_checkpoint(WanModel(CFG), tmp_path / "x.bin")


def test_meta_model_is_refused(tmp_path):
    save_checkpoint(WanModel(CFG), tmp_path / "c.pt")
    with torch.device("meta"):
        model = WanModel(CFG)
    with pytest.raises(ValueError, match="meta device"):
        load_weights(model, tmp_path / "c.pt")
