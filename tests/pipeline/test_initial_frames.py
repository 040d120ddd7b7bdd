"""Starting from an image or a video: the given frames lead the decoded video, and the
CLI's --image/--video encode them into the first latent frames."""
import pytest
import torch

from lrag_engine import Engine, MemoryConfig, RuntimeConfig
from lrag_engine.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("av")

MEMORY = MemoryConfig(window=6, sink=1, top_k=2, recency_guard=1)


def _engine():
    engine = Engine("tiny", MEMORY, RuntimeConfig(kernels="reference", denoising_steps=(1000, 500)), seed=3)
    engine.attach_random_pipeline(seed=3)
    return engine


def test_video_continues_the_given_frames():
    engine = _engine()
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 1, 64, 96, 3, generator=g) * 255).to(torch.uint8)
    given = engine.vae.encode(image)                      # one latent frame
    result = engine.generate(6, prompt="a red fox", initial_latents=given, seed=1)
    assert result.latents.shape[1] == 6                    # only the generated frames
    assert result.frames.shape == (1, 4 * (1 + 6) - 3, 64, 96, 3)
    # the streamed decode of [given | generated] equals decoding them all at once
    whole = engine.vae.decode(torch.cat([given.cpu(), result.latents], dim=1))
    assert (whole.int() - result.frames.int()).abs().max() <= 1


def test_cli_image_and_video_starts(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    image = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype("uint8")).save(image)
    out = tmp_path / "i.mp4"
    assert main(["generate", "--image", str(image), "--frames", "6", "--out", str(out)]) == 0
    from lrag_engine.pipeline.video import read_video
    assert read_video(out).shape == (4 * (1 + 6) - 3, 64, 96, 3)
    assert "start: 1 latent frames" in capsys.readouterr().out
    # a 25-frame video: 1 + 4*6 frames -> 7 latent frames, continued by 3
    video = tmp_path / "w.mp4"
    assert main(["generate", "--video", str(out), "--frames", "3", "--out", str(video)]) == 0
    assert read_video(video).shape[0] == 4 * (7 + 3) - 3
    assert main(["generate", "--image", str(image), "--video", str(out), "--out", str(tmp_path)]) == 2
    assert "either --image or --video" in capsys.readouterr().err
