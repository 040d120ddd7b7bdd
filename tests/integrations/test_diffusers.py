"""A diffusers WanTransformer3DModel driven block by block equals the Engine on the same weights."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lrag_engine import Engine, MemoryConfig, RuntimeConfig
from lrag_engine.config import ModelConfig
from lrag_engine.models.layouts import LayoutError, diffusers_config, diffusers_to_wan
from lrag_engine.models.wan import WanModel
from lrag_engine.testing import assert_close

CFG = ModelConfig.preset("tiny")
# Window 6 = sink 1 + 2 retrieved + a 3-frame block: from the third block on, every block
# evicts, and from the fourth, retrieval has eligible frames past the recency guard.
MEMORY = MemoryConfig(window=6, sink=1, top_k=2, recency_guard=1, frames_per_block=3)
RUNTIME = RuntimeConfig(kernels="reference")
BLOCKS = 10


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def twins(diffusers):
    """A random tiny WanTransformer3DModel (every tensor perturbed away from its init, so a
    swapped norm or table shows) and the WanModel holding its weights by the key map."""
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(**diffusers_config(CFG)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = WanModel(CFG, seed=1)
    model.load_state_dict(diffusers_to_wan(transformer.state_dict()))
    return transformer, model


def inputs(seed: int, blocks: int = BLOCKS, batch: int = 2):
    """Noise [B, T, C, H, W], re-noise (block-major, 3 per block) and text in the engine's layout."""
    gen = torch.Generator().manual_seed(seed)
    f = MEMORY.frames_per_block
    noise = torch.randn(batch, blocks * f, CFG.in_channels, CFG.height, CFG.width, generator=gen)
    renoise = [torch.randn(batch, f, CFG.in_channels, CFG.height, CFG.width, generator=gen) for _ in range(blocks * 3)]
    text = torch.randn(batch, 11, CFG.text_dim, generator=gen)
    return noise, renoise, text


def assert_same_logs(got, expected) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g.block, g.frames, g.query_frame, g.eligible, g.selected) == \
            (e.block, e.frames, e.query_frame, e.eligible, e.selected), f"block {e.block}"
        assert_close(torch.tensor(g.similarities), torch.tensor(e.similarities), name=f"similarities {e.block}")


def test_driver_equals_the_engine(twins, diffusers):
    from lrag_engine.integrations.diffusers import CausalDiffusersWan
    transformer, model = twins
    noise, renoise, text = inputs(seed=2)
    num_frames = noise.shape[1]
    expected = Engine(model=model, memory=MEMORY, runtime=RUNTIME).generate(num_frames, text=text, noise=noise,
                                                                           renoise=renoise)
    with CausalDiffusersWan(transformer, memory=MEMORY, runtime=RUNTIME, text_len=CFG.text_len) as wan:
        got = wan.generate(num_frames, text, noise=noise.transpose(1, 2),
                           renoise=[r.transpose(1, 2) for r in renoise])
    assert got.latents.shape == (2, CFG.in_channels, num_frames, CFG.height, CFG.width)
    assert_close(got.latents.transpose(1, 2), expected.latents, name="latents")
    assert_same_logs(got.log, expected.log)
    # The run exercised the memory: evictions, then retrieval of top_k frames per stream.
    assert expected.log[3].eligible >= 1 and all(len(row) == MEMORY.top_k for row in expected.log[-1].selected)
    assert sum(len(row) for entry in expected.log for row in entry.selected) >= 2 * (BLOCKS - 4)


def test_seeded_noise_follows_the_engine_rule(twins, diffusers):
    from lrag_engine.integrations.diffusers import CausalDiffusersWan
    transformer, model = twins
    _, _, text = inputs(seed=3, batch=1)
    num_frames = 4 * MEMORY.frames_per_block
    expected = Engine(model=model, memory=MEMORY, runtime=RUNTIME).generate(num_frames, text=text, seed=7)
    with CausalDiffusersWan(transformer, memory=MEMORY, runtime=RUNTIME, text_len=CFG.text_len) as wan:
        blocks = list(wan.stream(num_frames, text, seed=7, height=CFG.height, width=CFG.width))
    got = torch.cat([b.latents for b in blocks], dim=2)
    assert [b.frames for b in blocks] == [(3 * i, 3 * i + 3) for i in range(4)]
    assert_close(got.transpose(1, 2), expected.latents, name="latents")
    assert_same_logs([b.log for b in blocks], expected.log)


def test_processors_are_installed_and_given_back(twins, diffusers):
    from lrag_engine.integrations.diffusers import CausalDiffusersWan, RetrievalAttnProcessor
    transformer, _ = twins
    before = {name: type(p) for name, p in transformer.attn_processors.items()}
    x = torch.randn(1, CFG.in_channels, 3, CFG.height, CFG.width)
    text = torch.randn(1, CFG.text_len, CFG.text_dim)
    wan = CausalDiffusersWan(transformer, memory=MEMORY, runtime=RUNTIME, text_len=CFG.text_len)
    installed = transformer.attn_processors
    assert all(isinstance(installed[f"blocks.{i}.attn1.processor"], RetrievalAttnProcessor) for i in range(2))
    assert all(type(installed[f"blocks.{i}.attn2.processor"]) is before[f"blocks.{i}.attn2.processor"]
               for i in range(2))
    with pytest.raises(RuntimeError, match="exists only inside a CausalDiffusersWan forward"):
        transformer(x, torch.zeros(1), text)
    with pytest.raises(ValueError, match="already runs under another CausalDiffusersWan"):
        CausalDiffusersWan(transformer, memory=MEMORY, runtime=RUNTIME, text_len=CFG.text_len)
    wan.close()
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == before
    assert transformer(x, torch.zeros(1), text, return_dict=False)[0].shape == x.shape
    with pytest.raises(RuntimeError, match="closed"):
        wan.stream(3, text, height=CFG.height, width=CFG.width)


def test_bad_transformers_and_inputs_are_refused(twins, diffusers):
    from lrag_engine.integrations.diffusers import CausalDiffusersWan
    transformer, model = twins
    with pytest.raises(TypeError, match="must be a diffusers WanTransformer3DModel, got WanModel"):
        CausalDiffusersWan(model)
    i2v = diffusers.WanTransformer3DModel(**{**diffusers_config(CFG), "num_layers": 1, "image_dim": 24,
                                             "added_kv_proj_dim": CFG.dim})
    with pytest.raises(LayoutError, match="image_dim=24 is not supported"):
        CausalDiffusersWan(i2v)
    with pytest.raises(ValueError, match="RuntimeConfig.dtype='bfloat16' but the transformer's weights are float32"):
        CausalDiffusersWan(transformer, runtime=RuntimeConfig(dtype="bfloat16"))
    with CausalDiffusersWan(transformer, memory=MEMORY, runtime=RUNTIME, text_len=CFG.text_len) as wan:
        text = torch.randn(1, 5, CFG.text_dim)
        with pytest.raises(ValueError, match="height and width"):
            wan.generate(3, text)
        with pytest.raises(ValueError, match=r"noise must have shape \[1, 16, 3, \*, \*\]"):
            wan.generate(3, text, noise=torch.randn(1, 3, 16, CFG.height, CFG.width))
        with pytest.raises(ValueError, match="text must have 1..text_len=16 tokens"):
            wan.generate(3, torch.randn(1, 17, CFG.text_dim), height=CFG.height, width=CFG.width)
        with pytest.raises(ValueError, match="renoise must hold 3 tensors"):
            wan.generate(3, text, height=CFG.height, width=CFG.width, renoise=[])
        with pytest.raises(ValueError, match="num_frames must be a positive multiple"):
            wan.generate(4, text, height=CFG.height, width=CFG.width)


def test_no_module_imports_diffusers_at_import_time():
    """diffusers is an optional extra: importing every lrag_engine module leaves it unloaded,
    and without it the driver says how to install it."""
    script = (
        "import importlib, pkgutil, sys\n"
        "import lrag_engine\n"
        "for m in pkgutil.walk_packages(lrag_engine.__path__, 'lrag_engine.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
        "sys.modules['diffusers'] = None\n"
        "from lrag_engine.integrations.diffusers import CausalDiffusersWan\n"
        "try:\n"
        "    CausalDiffusersWan(object())\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install -e ".[diffusers]"' in out.stdout
