"""TextEncoder: prompts -> [B, text_len, text_dim] the way Wan 2.1 encodes them, its cache and loaders."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from lrag_engine.config import ModelConfig  # noqa: E402
from lrag_engine.models.wan import WanModel  # noqa: E402
from lrag_engine.pipeline.text import TextEncoder, TextEncoderError  # noqa: E402

TINY = ModelConfig.preset("tiny")
SHORT, LONG = "a red fox", "a red fox runs through deep snow under a pale winter sky"


@pytest.fixture(scope="module")
def encoder():
    enc = TextEncoder.random(seed=0, cache_size=0)
    # Norm weights start at 1 in UMT5's init; draw them too, so a swapped norm shows.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in enc.model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g))
    return enc


def fresh_copy(enc, **kwargs):
    return TextEncoder(enc.model, enc.tokenizer, text_len=enc.text_len, dtype=torch.float32, **kwargs)


def count_calls(enc):
    calls = []
    enc.model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    return calls


# ------------------------------------------------------------------ encode
def test_random_matches_tiny_preset_and_seed(encoder):
    assert (encoder.text_dim, encoder.text_len) == (TINY.text_dim, TINY.text_len)
    a, b = TextEncoder.random(seed=3), TextEncoder.random(seed=3)
    assert torch.equal(a.encode(SHORT), b.encode(SHORT))
    assert not torch.equal(a.encode(SHORT), TextEncoder.random(seed=4).encode(SHORT))


def test_zero_after_real_length(encoder):
    text = encoder.encode(SHORT)
    (n,) = encoder.token_lengths(SHORT)
    assert text.shape == (1, TINY.text_len, TINY.text_dim) and text.dtype == torch.float32
    assert n == len(SHORT) + 1 < TINY.text_len   # one byte per character, then </s>
    assert (text[0, :n].abs().sum(-1) > 0).all()
    assert (text[0, n:] == 0).all()


def test_truncation_keeps_eos_and_fills_text_len(encoder):
    ids = encoder.tokenizer(LONG, truncation=True, max_length=encoder.text_len)["input_ids"]
    assert len(ids) == encoder.text_len and ids[-1] == encoder.tokenizer.eos_token_id
    text = encoder.encode(LONG)
    assert encoder.token_lengths(LONG) == [encoder.text_len]
    assert text.shape == (1, TINY.text_len, TINY.text_dim) and (text[0].abs().sum(-1) > 0).all()


def test_batch_equals_one_by_one(encoder):
    prompts = [SHORT, LONG, "", "  a   red fox  "]
    batch = encoder.encode(prompts)
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(batch[i:i + 1], encoder.encode(prompt), rtol=1e-5, atol=1e-6)
    # Wan collapses whitespace before tokenizing: the last prompt is the first one.
    torch.testing.assert_close(batch[3], batch[0])


def test_padded_and_trimmed_give_the_dit_the_same_input(encoder):
    model = WanModel(TINY, seed=0)
    padded = encoder.encode(SHORT)
    (n,) = encoder.token_lengths(SHORT)
    for (k_pad, v_pad), (k_cut, v_cut) in zip(model.encode_text(padded), model.encode_text(padded[:, :n])):
        assert torch.equal(k_pad, k_cut) and torch.equal(v_pad, v_cut)


def test_rejects_bad_prompts(encoder):
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode([])
    with pytest.raises(TypeError, match="must be str, got int"):
        encoder.encode(["ok", 3])


# ------------------------------------------------------------------- cache
def test_cache_hit_does_not_run_the_encoder(encoder):
    enc = fresh_copy(encoder, cache_size=4)
    calls = count_calls(enc)
    first = enc.encode(SHORT)
    assert torch.equal(enc.encode(SHORT), first) and calls == [1]
    both = enc.encode([LONG, SHORT, LONG])          # runs LONG only, once
    assert calls == [1, 1] and torch.equal(both[1:2], first) and torch.equal(both[0], both[2])
    enc.clear_cache()
    enc.encode(SHORT)
    assert calls == [1, 1, 1]


def test_cache_is_a_bounded_lru(encoder):
    enc = fresh_copy(encoder, cache_size=2)
    calls = count_calls(enc)
    for prompt in ["a", "b", "a", "c"]:              # "c" evicts "b", the least recently used
        enc.encode(prompt)
    assert len(calls) == 3
    enc.encode("a")
    assert len(calls) == 3
    enc.encode("b")
    assert len(calls) == 4
    # More distinct prompts in one call than the cache holds: all still come back.
    out = enc.encode(["p", "q", "r"])
    torch.testing.assert_close(out, encoder.encode(["p", "q", "r"]))


def test_no_cache_runs_every_time(encoder):
    enc = fresh_copy(encoder, cache_size=0)
    calls = count_calls(enc)
    enc.encode(SHORT)
    enc.encode(SHORT)
    assert calls == [1, 1]


# ------------------------------------------------- original Wan checkpoint
def to_wan_naming(umt5_state):
    """The public Wan T5 names, written out here independently of the module's map."""
    out = {"token_embedding.weight": umt5_state["shared.weight"],
           "norm.weight": umt5_state["encoder.final_layer_norm.weight"]}
    layers = {int(k.split(".")[2]) for k in umt5_state if k.startswith("encoder.block.")}
    for i in layers:
        b = f"encoder.block.{i}.layer."
        out.update({
            f"blocks.{i}.norm1.weight": umt5_state[b + "0.layer_norm.weight"],
            **{f"blocks.{i}.attn.{p}.weight": umt5_state[b + f"0.SelfAttention.{p}.weight"] for p in "qkvo"},
            f"blocks.{i}.pos_embedding.embedding.weight":
                umt5_state[b + "0.SelfAttention.relative_attention_bias.weight"],
            f"blocks.{i}.norm2.weight": umt5_state[b + "1.layer_norm.weight"],
            f"blocks.{i}.ffn.gate.0.weight": umt5_state[b + "1.DenseReluDense.wi_0.weight"],
            f"blocks.{i}.ffn.fc1.weight": umt5_state[b + "1.DenseReluDense.wi_1.weight"],
            f"blocks.{i}.ffn.fc2.weight": umt5_state[b + "1.DenseReluDense.wo.weight"],
        })
    return {k: v.clone() for k, v in out.items()}


def wan_t5_reference(state, ids, mask, heads, num_buckets=32, max_dist=128):
    """Wan 2.1's T5 encoder forward on its own names, in float64: RMS norms, per-block
    bidirectional relative position bias, unscaled attention, FFN fc2(fc1(x) * gelu_tanh(gate(x)))."""
    s = {k: v.double() for k, v in state.items()}
    rms = lambda x, w: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    length = ids.shape[1]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]      # key - query
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    far = exact + (torch.log(rel.clamp(min=1).double() / exact) / math.log(max_dist / exact)
                   * (half - exact)).long()
    bucket = bucket + torch.where(rel < exact, rel, far.clamp(max=half - 1))
    key_mask = torch.where(mask[:, None, None, :] > 0, 0.0, float("-inf")).double()
    x = s["token_embedding.weight"][ids]
    layers = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, s[p + "norm1.weight"])
        q, k, v = (F.linear(h, s[p + f"attn.{n}.weight"]).unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
        bias = s[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        attn = torch.softmax(q @ k.transpose(-1, -2) + bias + key_mask, dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).flatten(2), s[p + "attn.o.weight"])
        h = rms(x, s[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, s[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, s[p + "ffn.fc1.weight"]) * gate, s[p + "ffn.fc2.weight"])
    return rms(x, s["norm.weight"])


@pytest.fixture(scope="module")
def tokenizer_dir(encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("umt5-tokenizer")
    encoder.tokenizer.save_pretrained(path)
    return path


def write_original(state, tmp_path):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(state, path)
    return path


def test_from_original_matches_the_wan_t5_forward(encoder, tokenizer_dir, tmp_path):
    state = to_wan_naming(encoder.model.state_dict())
    loaded = TextEncoder.from_original(write_original(state, tmp_path), tokenizer_dir, text_len=TINY.text_len,
                                       dtype=torch.float32)
    assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight
    prompts = [SHORT, LONG, "snow"]
    text = loaded.encode(prompts)
    torch.testing.assert_close(text, encoder.encode(prompts), rtol=1e-5, atol=1e-6)

    batch = loaded.tokenizer(prompts, padding="max_length", truncation=True, max_length=TINY.text_len,
                             return_tensors="pt")
    reference = wan_t5_reference(state, batch["input_ids"], batch["attention_mask"],
                                 heads=encoder.model.config.num_heads)
    reference = reference * batch["attention_mask"][..., None]     # Wan keeps the real tokens only
    torch.testing.assert_close(text.double(), reference, rtol=1e-4, atol=1e-5)


def test_from_original_casts_to_dtype(encoder, tokenizer_dir, tmp_path):
    state = {k: v.bfloat16() for k, v in to_wan_naming(encoder.model.state_dict()).items()}
    loaded = TextEncoder.from_original(write_original(state, tmp_path), tokenizer_dir, text_len=TINY.text_len)
    text = loaded.encode(SHORT)
    assert text.dtype == torch.bfloat16 and text.shape == (1, TINY.text_len, TINY.text_dim)
    assert torch.isfinite(text).all()


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda s: s.update({"decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1)}),
                 r"not in the Wan UMT5 encoder naming: \[decoder\.block\.0", id="unknown-key"),
    pytest.param(lambda s: s.pop("blocks.1.ffn.fc1.weight"), r"lacks keys .*blocks\.1\.ffn\.fc1\.weight",
                 id="missing-key"),
    pytest.param(lambda s: s.pop("token_embedding.weight"), r"lacks \[token_embedding\.weight\]",
                 id="missing-embedding"),
    pytest.param(lambda s: s.update({"pos_embedding.embedding.weight": torch.zeros(32, 4)}), "T5 encoder, not",
                 id="shared-position-bias"),
    pytest.param(lambda s: s.update({"blocks.1.attn.q.weight": torch.zeros(5, 32)}), "inconsistent shapes",
                 id="bad-shape"),
])
def test_from_original_errors_name_the_keys(encoder, tokenizer_dir, tmp_path, edit, message):
    state = to_wan_naming(encoder.model.state_dict())
    edit(state)
    with pytest.raises(TextEncoderError, match=message):
        TextEncoder.from_original(write_original(state, tmp_path), tokenizer_dir, text_len=TINY.text_len)


def test_from_original_missing_files(encoder, tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.pth"):
        TextEncoder.from_original(tmp_path / "does-not-exist.pth", tokenizer_dir)
    path = write_original(to_wan_naming(encoder.model.state_dict()), tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*no-tokenizer"):
        TextEncoder.from_original(path, tmp_path / "no-tokenizer")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TextEncoderError, match="flat state dict"):
        TextEncoder.from_original(path, tokenizer_dir)


# --------------------------------------------------------- diffusers folder
@pytest.fixture(scope="module")
def diffusers_dir(encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("Wan2.1-T2V-Diffusers")
    encoder.model.save_pretrained(root / "text_encoder")
    encoder.tokenizer.save_pretrained(root / "tokenizer")
    return root


def test_from_diffusers(encoder, diffusers_dir):
    loaded = TextEncoder.from_diffusers(diffusers_dir, text_len=TINY.text_len, dtype=torch.float32)
    prompts = [SHORT, LONG]
    torch.testing.assert_close(loaded.encode(prompts), encoder.encode(prompts), rtol=1e-5, atol=1e-6)


def test_from_diffusers_errors(diffusers_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline folder .*absent"):
        TextEncoder.from_diffusers(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no text_encoder/config.json"):
        TextEncoder.from_diffusers(tmp_path)
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(TextEncoderError, match="'t5' model, not the 'umt5'"):
        TextEncoder.from_diffusers(tmp_path)
    (tmp_path / "text_encoder" / "config.json").write_text((diffusers_dir / "text_encoder" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        TextEncoder.from_diffusers(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(TextEncoderError, match="cannot load a tokenizer"):
        TextEncoder.from_diffusers(tmp_path)


# -------------------------------------------------------- optional import
def test_import_does_not_load_transformers():
    code = ("import sys, lrag_engine, lrag_engine.pipeline.text; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_missing_transformers_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from lrag_engine.pipeline.text import TextEncoder\n"
            "try:\n    TextEncoder.random()\nexcept ImportError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install -e ".[pipeline]"' in out.stdout, out.stdout + out.stderr
