"""Training loop: loss goes down, resume continues exactly, outputs and config handling."""
import json

import pytest
import torch

from lrag_engine.encoder.checkpoint import CheckpointError, load_checkpoint
from lrag_engine.encoder.corpus import SyntheticCorpusConfig, generate_synthetic_corpus
from lrag_engine.encoder.model import EncoderConfig
from lrag_engine.encoder.train import DEFAULT_CONFIG, TrainConfig, load_configs, train_encoder
from lrag_engine.testing import assert_close

MODEL = EncoderConfig(in_channels=4, spatial_h=8, spatial_w=12, latent_dim=16, hidden_dims=(8,), seq_len=6)


@pytest.fixture(scope="module")
def latents():
    cfg = SyntheticCorpusConfig(num_videos=4, frames_per_video=24, num_scenes=3, segment_len=6, channels=4,
                                height=8, width=12, seed=11)
    return generate_synthetic_corpus(cfg)[0]


def _train_cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=3e-3, val_fraction=0.25, val_every=3, val_max_chunks=4,
                checkpoint_every=3, seed=5)
    return TrainConfig(**{**base, **kw})


def test_short_training_lowers_loss(latents, tmp_path):
    # An offset far from the decoder's initial output gives a large, quickly learnable error.
    shifted = latents + 1.5
    result = train_encoder(MODEL, _train_cfg(steps=20, lr=1e-2, val_every=20, checkpoint_every=20), shifted,
                           tmp_path, progress=False)
    totals = [r["total"] for r in result.history["train"]]
    first, last = sum(totals[:4]) / 4, sum(totals[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(totals)))


def test_outputs_and_validation(latents, tmp_path):
    result = train_encoder(MODEL, _train_cfg(), latents, tmp_path, progress=False)
    assert [r["step"] for r in result.history["train"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in result.history["val"]] == [3, 6]
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    public = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert set(public) == {"config", "model"}
    frames = latents[0, :5]
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "encoder.pt").encode(frames), result.model.encode(frames))
        assert torch.equal(load_checkpoint(tmp_path / "last.pt").encode(frames), result.model.encode(frames))


def test_resume_continues_at_the_right_step(latents, tmp_path):
    straight = train_encoder(MODEL, _train_cfg(), latents, tmp_path / "a", progress=False)
    train_encoder(MODEL, _train_cfg(steps=3), latents, tmp_path / "b", progress=False)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    resumed = train_encoder(MODEL, _train_cfg(), latents, tmp_path / "b", resume=tmp_path / "b" / "last.pt",
                            progress=False)
    assert [r["step"] for r in resumed.history["train"]] == [1, 2, 3, 4, 5, 6]
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 6
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert_close(b, a, name=name)
    for a, b in zip(straight.history["train"], resumed.history["train"]):
        assert_close(torch.tensor(b["total"]), torch.tensor(a["total"]), name=f"loss at step {a['step']}")


def test_training_refuses_bad_inputs(latents, tmp_path):
    train_encoder(MODEL, _train_cfg(steps=1), latents, tmp_path, progress=False)
    with pytest.raises(ValueError, match="last.pt' exists"):
        train_encoder(MODEL, _train_cfg(steps=2), latents, tmp_path, progress=False)
    other = EncoderConfig(**{**MODEL.to_dict(), "latent_dim": 8})
    with pytest.raises(CheckpointError, match="encoder config"):
        train_encoder(other, _train_cfg(steps=2), latents, tmp_path, resume=tmp_path / "last.pt", progress=False)
    with pytest.raises(CheckpointError, match="without training state"):
        train_encoder(MODEL, _train_cfg(steps=2), latents, tmp_path / "c", resume=tmp_path / "encoder.pt",
                      progress=False)
    with pytest.raises(ValueError, match=r"\[C, H, W\] = \[4, 8, 12\]"):
        train_encoder(MODEL, _train_cfg(), latents[:, :, :, :6], tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="seq_len=6"):
        train_encoder(MODEL, _train_cfg(), latents[:, :4], tmp_path / "e", progress=False)


def test_default_yaml_holds_spec_defaults():
    model, train = load_configs()
    assert model == EncoderConfig()
    assert (model.latent_dim, model.hidden_dims, model.delta_margin, model.delta_window) == (1024, (64, 128, 256),
                                                                                             0.85, 3)
    assert (model.delta_weight, model.smooth_weight, model.seq_len) == (1.0, 1.0, 8)
    assert isinstance(train.lr, float) and DEFAULT_CONFIG.is_file()


def test_overrides(tmp_path):
    model, train = load_configs(None, ["lr=1e-4", "model.latent_dim=32", "hidden_dims=[8, 16]", "train.amp=false",
                                       "delta_weight=0"])
    assert train.lr == 1e-4 and isinstance(train.lr, float) and train.amp is False
    assert model.latent_dim == 32 and model.hidden_dims == (8, 16) and model.delta_weight == 0.0
    with pytest.raises(ValueError, match="unknown field 'learning_rate'"):
        load_configs(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_configs(None, ["lr"])
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        load_configs(None, ["steps=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  latent_dims: 3\n")
    with pytest.raises(ValueError, match="unknown model field 'latent_dims'"):
        load_configs(bad)
    bad.write_text("optim:\n  lr: 3\n")
    with pytest.raises(ValueError, match="unknown sections \\['optim'\\]"):
        load_configs(bad)
