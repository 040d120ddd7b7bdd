"""The command line: default run, outputs, options and errors."""
import json

import torch

from lrag_engine.cli import main


def test_generate_writes_latents_log_preview_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["generate", "--frames", "24", "--window", "6", "--top-k", "2", "--recency-guard", "1",
                 "--out", str(out), "--preview", "--plot"])
    assert code == 0
    saved = torch.load(out / "latents.pt", weights_only=True)
    assert list(saved["latents"].shape) == [1, 24, 16, 8, 12]
    log = json.loads((out / "retrieval_log.json").read_text())
    assert len(log) == 8 and any(entry["selected"][0] for entry in log)
    for entry in log:
        assert len(entry["selected"][0]) == len(entry["similarities"][0]) <= 2
        assert all(f < entry["frames"][0] for f in entry["selected"][0])
    assert (out / "preview.png").stat().st_size > 0 and (out / "retrieval_log.png").stat().st_size > 0
    assert (out / "video.mp4").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "text encoder and VAE are random" in printed


def test_text_file_and_batch(tmp_path):
    text = torch.randn(2, 4, 32)
    torch.save(text, tmp_path / "text.pt")
    out = tmp_path / "run"
    assert main(["generate", "--frames", "6", "--text", str(tmp_path / "text.pt"), "--out", str(out)]) == 0
    assert torch.load(out / "latents.pt", weights_only=True)["latents"].shape[0] == 2


def test_bad_values_exit_with_a_message(tmp_path, capsys):
    assert main(["generate", "--frames", "7", "--out", str(tmp_path)]) == 2
    assert "--frames must be a positive multiple of --frames-per-block" in capsys.readouterr().err
    assert main(["generate", "--top-k", "11", "--out", str(tmp_path)]) == 2
    assert "--top-k (11)" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    assert "nope.pt" in capsys.readouterr().err
