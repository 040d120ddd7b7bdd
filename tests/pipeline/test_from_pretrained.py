"""Engine.from_pretrained: tiny Wan2.1-T2V directories in the original and the diffusers
layout load to the same engine as one built from the same parts; checkpoints laid over
the DiT, missing parts, prompts, and the frames generate decodes."""
import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from lrag_engine import Engine  # noqa: E402
from lrag_engine.config import ModelConfig, RuntimeConfig  # noqa: E402
from lrag_engine.models.layouts import diffusers_config, wan_to_diffusers  # noqa: E402
from lrag_engine.models.wan import WanModel  # noqa: E402
from lrag_engine.pipeline.pretrained import find_parts, original_vae_config  # noqa: E402
from lrag_engine.pipeline.text import TextEncoder, _wan_name  # noqa: E402
from lrag_engine.pipeline.vae import WanVAE, original_key_map  # noqa: E402

TINY = ModelConfig.preset("tiny")
RUNTIME = RuntimeConfig(device="cpu", dtype="float32", kernels="reference", denoising_steps=(1000, 500))
SIZE = dict(height=TINY.height, width=TINY.width)
FRAMES = 6          # two blocks of three latent frames
PROMPT, OTHER = "a red fox running", "a blue bird"
# The original Wan 2.1 config.json (Wan naming) for the tiny preset's shapes.
WAN_CONFIG = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
              "patch_size": list(TINY.patch_size), "dim": TINY.dim, "ffn_dim": TINY.ffn_dim,
              "freq_dim": TINY.freq_dim, "in_dim": TINY.in_channels, "out_dim": TINY.out_channels,
              "num_heads": TINY.num_heads, "num_layers": TINY.num_layers, "text_dim": TINY.text_dim,
              "text_len": TINY.text_len, "eps": TINY.eps}


@pytest.fixture(scope="module")
def parts():
    """The parts every directory below holds: DiT weights, text encoder, VAE (all random, seeded)."""
    return {"dit": WanModel(TINY, seed=1).state_dict(), "text": TextEncoder.random(seed=2),
            "vae": WanVAE.random(seed=3)}


def write_original(root, parts):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(WAN_CONFIG))
    save_file({k: v.contiguous() for k, v in parts["dit"].items()}, str(root / "diffusion_pytorch_model.safetensors"))
    vae_state = parts["vae"].model.state_dict()
    torch.save({original: vae_state[name].clone() for original, name in original_key_map(parts["vae"].model).items()},
               root / "Wan2.1_VAE.pth")
    t5 = {_wan_name(k): v.clone() for k, v in parts["text"].model.state_dict().items()}
    torch.save(t5, root / "models_t5_umt5-xxl-enc-bf16.pth")
    parts["text"].tokenizer.save_pretrained(root / "google" / "umt5-xxl")
    return root


def write_diffusers(root, parts):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"]}))
    transformer = diffusers.WanTransformer3DModel(**diffusers_config(TINY))
    transformer.load_state_dict(wan_to_diffusers(parts["dit"]))
    transformer.save_pretrained(root / "transformer")
    parts["vae"].model.save_pretrained(root / "vae")
    parts["text"].model.save_pretrained(root / "text_encoder")
    parts["text"].tokenizer.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def original_dir(parts, tmp_path_factory):
    return write_original(tmp_path_factory.mktemp("wan-original"), parts)


@pytest.fixture(scope="module")
def diffusers_dir(parts, tmp_path_factory):
    return write_diffusers(tmp_path_factory.mktemp("wan-diffusers"), parts)


def direct_engine(parts, state=None):
    """An engine built from the parts themselves, no directory involved."""
    model = WanModel(TINY, seed=99)
    model.load_state_dict(state if state is not None else parts["dit"])
    engine = Engine.from_model(model, runtime=RUNTIME)
    engine.text_encoder, engine.vae = parts["text"], parts["vae"]
    return engine


@pytest.fixture(scope="module")
def reference(parts):
    engine = direct_engine(parts)
    return engine, engine.generate(FRAMES, prompt=PROMPT, seed=5)


# ------------------------------------------------------------------ both layouts
def test_find_parts_reads_both_layouts(original_dir, diffusers_dir):
    original = find_parts(original_dir)
    assert original.layout == "original" and original.tokenizer == original_dir / "google" / "umt5-xxl"
    assert original.transformer.name == "diffusion_pytorch_model.safetensors"
    pipe = find_parts(diffusers_dir)
    assert pipe.layout == "diffusers" and pipe.transformer == diffusers_dir / "transformer"
    assert pipe.config == diffusers_dir / "transformer" / "config.json"
    assert original_vae_config(original.vae) == {"base_dim": 8}


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_both_layouts_equal_the_engine_built_from_the_parts(layout, original_dir, diffusers_dir, reference):
    path = original_dir if layout == "original" else diffusers_dir
    # diffusers' transformer config has no text_len (pipelines pad to 512): give the tiny one.
    engine = Engine.from_pretrained(path, runtime=RUNTIME, text_len=TINY.text_len, **SIZE)
    assert engine.model_config == TINY
    assert engine.load_report is not None and engine.pipeline_is_random == ""
    direct, expected = reference
    for name, value in direct.model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], value), name
    assert torch.equal(engine.encode_prompts(PROMPT), direct.encode_prompts(PROMPT))
    result = engine.generate(FRAMES, prompt=PROMPT, seed=5)
    assert torch.equal(result.latents, expected.latents)
    assert torch.equal(result.frames, expected.frames)


def test_diffusers_layout_default_text_len_is_wans(diffusers_dir):
    engine = Engine.from_pretrained(diffusers_dir, runtime=RUNTIME, **SIZE)
    assert engine.model_config.text_len == 512 and engine.text_encoder.text_len == 512


def test_checkpoint_is_laid_over_the_directory_dit(original_dir, parts, tmp_path):
    other = WanModel(TINY, seed=7).state_dict()
    assert not torch.equal(other["blocks.0.self_attn.q.weight"], parts["dit"]["blocks.0.self_attn.q.weight"])
    checkpoint = tmp_path / "causal.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(checkpoint))
    engine = Engine.from_pretrained(original_dir, runtime=RUNTIME, checkpoint=checkpoint, **SIZE)
    assert engine.load_report is not None
    for name, value in other.items():
        assert torch.equal(engine.model.state_dict()[name], value), name
    expected = direct_engine(parts, other).generate(3, prompt=PROMPT, seed=1)
    result = engine.generate(3, prompt=PROMPT, seed=1)
    assert torch.equal(result.latents, expected.latents) and torch.equal(result.frames, expected.frames)


# ------------------------------------------------------------------ errors
def test_missing_parts_are_one_error_listing_found_and_missing(tmp_path, parts):
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps(WAN_CONFIG))
    parts["text"].tokenizer.save_pretrained(original / "google" / "umt5-xxl")
    with pytest.raises(ValueError) as error:
        Engine.from_pretrained(original, runtime=RUNTIME, **SIZE)
    message = str(error.value)
    assert "original layout" in message and "found: config.json, google/" in message
    missing = message.split("is missing: ")[1].split("; found")[0]
    assert missing == ("DiT weights (diffusion_pytorch_model*.safetensors), Wan2.1_VAE.pth, "
                       "models_t5_umt5-xxl-enc-bf16.pth")

    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "vae").mkdir()
    (pipe / "model_index.json").write_text("{}")
    (pipe / "transformer" / "config.json").write_text(json.dumps(diffusers_config(TINY)))
    with pytest.raises(ValueError) as error:
        Engine.from_pretrained(pipe, runtime=RUNTIME, **SIZE)
    message = str(error.value)
    assert "diffusers layout" in message and "found: model_index.json, transformer/, vae/" in message
    assert message.split("is missing: ")[1].split("; found")[0] == "transformer/ weights, text_encoder/, tokenizer/"


def test_a_path_that_is_not_a_directory(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    for path in (file, tmp_path / "nowhere"):
        with pytest.raises(ValueError, match=f"model directory '{path}' does not exist or is not a directory"):
            Engine.from_pretrained(path, runtime=RUNTIME)


def test_prompt_without_text_encoder_and_prompt_with_text():
    engine = Engine(TINY, runtime=RUNTIME)
    with pytest.raises(ValueError, match="prompt needs a text encoder: use Engine.from_pretrained.*"
                                         "attach_random_pipeline"):
        engine.generate(3, prompt=PROMPT)
    engine.attach_random_pipeline(seed=0)
    with pytest.raises(ValueError, match="either prompt= .* or text= .*not both"):
        engine.generate(3, prompt=PROMPT, text=torch.zeros(1, 4, TINY.text_dim))
    with pytest.raises(ValueError, match="either prompt_timeline= or text_timeline="):
        engine.generate(6, prompt_timeline={1: OTHER}, text_timeline={1: torch.zeros(1, 4, TINY.text_dim)})


# ------------------------------------------------------------------ frames and prompts
def test_frames_equal_decoding_the_whole_latent_video(reference, parts):
    engine, result = reference
    assert result.frames.shape == (1, 4 * FRAMES - 3, 8 * TINY.height, 8 * TINY.width, 3)
    assert result.frames.dtype == torch.uint8
    # generate decodes block by block; equal to one decode of all latents = the cache is carried.
    assert torch.equal(result.frames, engine.vae.decode(result.latents))
    # A batch of two prompts: each stream's frames, too.
    batch = engine.generate(3, prompt=[PROMPT, OTHER], seed=2)
    assert batch.frames.shape == (2, 9, 8 * TINY.height, 8 * TINY.width, 3)
    assert torch.equal(batch.frames, engine.vae.decode(batch.latents))
    # stream() carries each block's frames: the first block 4F - 3, the later ones 4F.
    blocks = list(engine.stream(FRAMES, prompt=PROMPT, seed=5))
    assert [b.frames_rgb.shape[1] for b in blocks] == [9, 12]
    assert torch.equal(torch.cat([b.frames_rgb.cpu() for b in blocks], dim=1), result.frames)


def test_prompt_timeline_equals_text_timeline_of_the_encoded_prompts(reference):
    engine, plain = reference
    by_prompt = engine.generate(FRAMES, prompt=PROMPT, prompt_timeline={1: OTHER}, seed=5)
    by_text = engine.generate(FRAMES, text=engine.encode_prompts(PROMPT),
                              text_timeline={1: engine.encode_prompts(OTHER)}, seed=5)
    assert torch.equal(by_prompt.latents, by_text.latents) and torch.equal(by_prompt.frames, by_text.frames)
    assert torch.equal(plain.latents[:, :3], by_prompt.latents[:, :3])     # block 0 is before the switch
    assert not torch.equal(plain.latents[:, 3:], by_prompt.latents[:, 3:])
