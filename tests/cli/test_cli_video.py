"""The command line's prompt-to-video path: mp4 and side files, prompt switches, option errors."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("av")

from lrag_engine.cli import main  # noqa: E402
from lrag_engine.config import ModelConfig  # noqa: E402
from lrag_engine.pipeline.video import read_video  # noqa: E402

TINY = ModelConfig.preset("tiny")
FRAMES = 12   # four blocks of three latent frames


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("lrag-engine: error: ") and err.count("\n") == 1, err
    return err


def test_prompt_to_mp4_with_latents_and_log_beside_it(tmp_path, capsys):
    video = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a red fox running", "--frames", str(FRAMES), "--out", str(video)]) == 0
    frames = read_video(video)
    assert frames.shape == (4 * FRAMES - 3, 8 * TINY.height, 8 * TINY.width, 3) == (45, 64, 96, 3)
    assert frames.dtype == torch.uint8
    saved = torch.load(tmp_path / "v.latents.pt", weights_only=True)
    assert list(saved["latents"].shape) == [1, FRAMES, 16, TINY.height, TINY.width]
    assert len(json.loads((tmp_path / "v.retrieval_log.json").read_text())) == FRAMES // 3
    printed = capsys.readouterr().out
    assert "prompt 'a red fox running'" in printed
    assert "DiT weights, text encoder and VAE are random" in printed
    assert f"wrote {video} (45 frames of 96x64 at 16 fps)" in printed


def test_default_run_writes_video_latents_and_log_in_the_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", "--frames", str(FRAMES), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["latents.pt", "retrieval_log.json", "video.mp4"]
    assert read_video(out / "video.mp4").shape == (45, 64, 96, 3)
    assert "prompt 'a red fox running through snow'" in capsys.readouterr().out


def test_prompt_at_switches_the_prompt(tmp_path, capsys):
    out = tmp_path / "switch"
    assert main(["generate", "--frames", str(FRAMES), "--prompt-at", "2:a blue bird", "--out", str(out)]) == 0
    assert len(json.loads((out / "retrieval_log.json").read_text())) == 4
    assert read_video(out / "video.mp4").shape[0] == 45
    assert "from block 2: 'a blue bird'" in capsys.readouterr().out


@pytest.mark.parametrize("entry", ["2-a blue bird", "x:a blue bird", "2:", "-1:a blue bird"])
def test_malformed_prompt_at_exits_2_naming_the_option(tmp_path, capsys, entry):
    assert main(["generate", "--frames", str(FRAMES), f"--prompt-at={entry}", "--out", str(tmp_path)]) == 2
    assert "--prompt-at" in _one_line_error(capsys)
    assert not (tmp_path / "video.mp4").exists()


def test_text_and_prompt_together_exit_2(tmp_path, capsys):
    text = tmp_path / "text.pt"
    torch.save(torch.zeros(4, TINY.text_dim), text)
    assert main(["generate", "--text", str(text), "--prompt", "a red fox", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "--text" in err and "--prompt" in err


def test_missing_model_dir_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "--model-dir", str(missing), "--frames", "3", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert str(missing) in err and "does not exist or is not a directory" in err
