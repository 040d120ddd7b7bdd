"""Module structure, public checkpoint round trip and clear checkpoint errors."""
import pytest
import torch

from lrag_engine.encoder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lrag_engine.encoder.descriptor import EncoderDescriptor
from lrag_engine.memory.retrieval import MeanDescriptor
from lrag_engine.encoder.model import EncoderConfig, RetrievalEncoder, group_norm
from lrag_engine.testing import assert_close

SMALL = dict(in_channels=5, spatial_h=11, spatial_w=14, latent_dim=12, hidden_dims=(8, 12))


def _small(seed=0, **overrides):
    torch.manual_seed(seed)
    return RetrievalEncoder(EncoderConfig(**{**SMALL, **overrides}))


def test_default_state_dict_keys_follow_spec():
    sd = RetrievalEncoder(EncoderConfig()).state_dict()
    # Flat stacks (SPEC section 5): encoder stage i at 4i.., decoder stage i at 5i..
    expected_shapes = {
        "encoder.conv_stack.0.weight": (64, 16, 3, 3),
        "encoder.conv_stack.1.weight": (64,),
        "encoder.conv_stack.3.block.0.weight": (64,),
        "encoder.conv_stack.3.block.2.weight": (64, 64, 3, 3),
        "encoder.conv_stack.3.block.5.weight": (64, 64, 3, 3),
        "encoder.conv_stack.4.weight": (128, 64, 3, 3),
        "encoder.conv_stack.8.weight": (256, 128, 3, 3),
        "encoder.conv_stack.9.weight": (256,),
        "encoder.conv_stack.11.block.5.weight": (256, 256, 3, 3),
        "encoder.final_norm.0.weight": (256,),
        "encoder.fc.weight": (1024, 256),
        "decoder.fc.0.weight": (256 * 8 * 13, 1024),
        "decoder.upsample_stack.1.weight": (128, 256, 3, 3),
        "decoder.upsample_stack.2.weight": (128,),
        "decoder.upsample_stack.4.block.2.weight": (128, 128, 3, 3),
        "decoder.upsample_stack.6.weight": (64, 128, 3, 3),
        "decoder.upsample_stack.9.block.5.weight": (64, 64, 3, 3),
        "decoder.final.1.weight": (16, 64, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert key in sd, f"missing {key}"
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.conv_stack.12.weight" not in sd and "encoder.conv_stack.0.0.weight" not in sd
    assert "decoder.upsample_stack.10.weight" not in sd and "decoder.upsample_stack.0.1.weight" not in sd
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder"}
    assert {k.split(".")[1] for k in sd} == {"conv_stack", "final_norm", "fc", "upsample_stack", "final"}


@pytest.mark.parametrize("h,w,hidden", [(60, 104, (64, 128, 256)), (11, 14, (8, 12)), (1, 7, (4,)),
                                        (33, 17, (4, 8, 8, 16))],
                         ids=["60x104-3stages", "11x14-2stages", "1x7-1stage", "33x17-4stages"])
def test_decoder_output_matches_input_size(h, w, hidden):
    cfg = EncoderConfig(in_channels=3, spatial_h=h, spatial_w=w, latent_dim=8, hidden_dims=hidden)
    model = RetrievalEncoder(cfg)
    z, recon = model(torch.randn(2, 3, h, w))
    assert z.shape == (2, 8) and recon.shape == (2, 3, h, w)
    upsamples = sum(isinstance(m, torch.nn.Upsample) for m in model.decoder.modules())
    strided = sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in model.encoder.modules())
    assert upsamples == strided == len(hidden)


@pytest.mark.parametrize("channels,groups", [(64, 32), (48, 16), (24, 8), (12, 4), (7, 1), (6, 1)])
def test_group_norm_groups(channels, groups):
    assert group_norm(channels).num_groups == groups


@pytest.mark.parametrize("bad,match", [
    (dict(latent_dim=0), "latent_dim"), (dict(hidden_dims=()), "hidden_dims"),
    (dict(hidden_dims=(8, -1)), "hidden_dims"), (dict(delta_margin=1.5), "delta_margin"),
    (dict(delta_weight=-1.0), "delta_weight"), (dict(delta_window=0), "delta_window"),
    (dict(seq_len=2.5), "seq_len"), (dict(smooth_weight="x"), "smooth_weight"),
])
def test_config_validation_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**{**SMALL, **bad})


def test_config_from_dict_warns_on_unknown_keys():
    with pytest.warns(UserWarning, match=r"\['dropout'\]"):
        cfg = EncoderConfig.from_dict({**SMALL, "hidden_dims": [8, 12], "dropout": 0.1, "lr": 1e-4})
    assert cfg == EncoderConfig(**SMALL)


def test_round_trip_gives_identical_embeddings(tmp_path):
    model = _small(seed=1).eval()
    path = tmp_path / "ae.pt"
    save_checkpoint(path, model)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"config", "model"} and raw["config"]["hidden_dims"] == [8, 12]
    loaded = load_checkpoint(path)
    frames = torch.randn(3, 5, 11, 14)
    with torch.no_grad():
        assert torch.equal(loaded.encode(frames), model.encode(frames))
        assert torch.equal(loaded(frames)[1], model(frames)[1])
    desc = EncoderDescriptor.from_checkpoint(path)
    expected = torch.nn.functional.normalize(model.encode(frames), dim=-1)
    assert_close(desc(frames), expected.detach(), name="descriptor after reload")


def test_loads_wrapped_state_dict(tmp_path):
    model = _small(seed=2)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"config": model.config.to_dict(), "model": state}, tmp_path / "ddp.pt")
    frames = torch.randn(2, 5, 11, 14)
    assert torch.equal(load_checkpoint(tmp_path / "ddp.pt").encode(frames), model.eval().encode(frames))


def _write(path, payload):
    torch.save(payload, path)
    return path


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = _small()
    good = {"config": model.config.to_dict(), "model": model.state_dict()}
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt' is not a readable torch file"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="must hold a dict"):
        load_checkpoint(_write(tmp_path / "list.pt", [1, 2]))
    with pytest.raises(CheckpointError, match="no 'config'"):
        load_checkpoint(_write(tmp_path / "noconf.pt", {"model": good["model"]}))
    with pytest.raises(CheckpointError, match="no 'model'"):
        load_checkpoint(_write(tmp_path / "nomodel.pt", {"config": good["config"]}))
    state = dict(good["model"])
    del state["encoder.fc.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.fc.bias'\].*unexpected keys "
                                              r"\['encoder.extra.weight'\]"):
        load_checkpoint(_write(tmp_path / "keys.pt", {**good, "model": state}))
    other = _small(latent_dim=16).state_dict()
    with pytest.raises(CheckpointError, match=r"shape mismatch for decoder.fc.0.weight"):
        load_checkpoint(_write(tmp_path / "shape.pt", {**good, "model": other}))
    with pytest.raises(CheckpointError, match="bad config.*latent_dim"):
        load_checkpoint(_write(tmp_path / "conf.pt", {**good, "config": {**good["config"], "latent_dim": -3}}))


def test_descriptor_is_normalised_and_batch_independent():
    model = _small(seed=4)
    frames = torch.randn(7, 5, 11, 14)
    whole = EncoderDescriptor(model, batch_size=64)(frames)
    split = EncoderDescriptor(model, batch_size=3)(frames)
    single = torch.cat([EncoderDescriptor(model)(frames[i:i + 1]) for i in range(7)])
    assert whole.dtype == torch.float32 and whole.shape == (7, 12)
    assert EncoderDescriptor(model).dim == 12
    assert_close(whole.norm(dim=-1), torch.ones(7), name="descriptor norms")
    assert_close(split, whole, name="batch 3 vs 64")
    assert_close(single, whole, name="batch 1 vs 64")
    with pytest.raises(ValueError, match="5 channels"):
        EncoderDescriptor(model)(torch.randn(2, 4, 11, 14))


def test_spatial_mean_descriptor():
    frames = torch.randn(4, 6, 5, 3)
    got = MeanDescriptor(6)(frames)
    means = torch.tensor([[sum(frames[n, c].flatten().tolist()) / 15 for c in range(6)] for n in range(4)])
    assert_close(got, means, name="spatial mean descriptor")
    with pytest.raises(ValueError, match="6 channels"):
        MeanDescriptor(6)(torch.randn(2, 5, 3, 3))
