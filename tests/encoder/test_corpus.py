"""Corpus format, clear corpus errors and the synthetic generator's structure."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lrag_engine.encoder.corpus import (CorpusError, CorpusWriter, LatentCorpus, SyntheticCorpusConfig,
                                        generate_synthetic_corpus, write_synthetic_corpus)


def _write(root, n_shards=2, per_shard=3, labels=True):
    writer = CorpusWriter(root, (2, 3, 5), 4, {"source": "test"})
    data, ids = torch.randn(n_shards * per_shard, 4, 2, 3, 5), torch.randint(9, (n_shards * per_shard, 4))
    for i in range(n_shards):
        sl = slice(i * per_shard, (i + 1) * per_shard)
        writer.write_shard(i, data[sl], ids[sl] if labels else None)
    return data, ids


def test_round_trip(tmp_path):
    data, ids = _write(tmp_path)
    corpus = LatentCorpus(tmp_path)
    assert torch.equal(corpus.latents, data) and torch.equal(corpus.scene_ids, ids)
    assert corpus.num_videos == 6 and corpus.frame_shape == (2, 3, 5) and corpus.num_frames == 4


def test_writer_resumes_and_checks_settings(tmp_path):
    _write(tmp_path, n_shards=1)
    writer = CorpusWriter(tmp_path, (2, 3, 5), 4, {"source": "test"})
    assert writer.done(0) and not writer.done(1)
    with pytest.raises(CorpusError, match="num_frames=4.*num_frames=5"):
        CorpusWriter(tmp_path, (2, 3, 5), 5, {"source": "test"})
    with pytest.raises(CorpusError, match="meta"):
        CorpusWriter(tmp_path, (2, 3, 5), 4, {"source": "other"})
    with pytest.raises(CorpusError, match=r"\[n, 4, 2, 3, 5\]"):
        writer.write_shard(1, torch.randn(2, 4, 2, 3, 6))


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        LatentCorpus(tmp_path / "missing")
    with pytest.raises(CorpusError, match="no manifest.json"):
        LatentCorpus(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="not valid JSON"):
        LatentCorpus(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CorpusError, match="must have format"):
        LatentCorpus(tmp_path)

    root = tmp_path / "c"
    CorpusWriter(root, (2, 3, 5), 4, {"source": "test"})
    with pytest.raises(CorpusError, match="lists no shards"):
        LatentCorpus(root)
    _write(root)
    (root / "shard_00001.safetensors").unlink()
    with pytest.raises(CorpusError, match="shard_00001.safetensors.*missing"):
        LatentCorpus(root)
    (root / "shard_00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorpusError, match="shard_00001.safetensors' is not a readable safetensors file"):
        LatentCorpus(root)
    save_file({"latents": torch.zeros(3, 4, 2, 3, 6)}, str(root / "shard_00001.safetensors"))
    with pytest.raises(CorpusError, match=r"latents are \(3, 4, 2, 3, 6\)"):
        LatentCorpus(root)
    save_file({"frames": torch.zeros(3, 4, 2, 3, 5)}, str(root / "shard_00001.safetensors"))
    with pytest.raises(CorpusError, match="no 'latents'"):
        LatentCorpus(root)
    save_file({"latents": torch.zeros(3, 4, 2, 3, 5)}, str(root / "shard_00001.safetensors"))
    with pytest.raises(CorpusError, match="some shards carry scene_ids"):
        LatentCorpus(root)


def test_synthetic_structure():
    cfg = SyntheticCorpusConfig(num_videos=3, frames_per_video=40, num_scenes=3, segment_len=5, channels=4,
                                height=8, width=12, seed=3)
    latents, ids = generate_synthetic_corpus(cfg)
    assert latents.shape == (3, 40, 4, 8, 12) and ids.shape == (3, 40)
    again, ids_again = generate_synthetic_corpus(cfg)
    assert torch.equal(latents, again) and torch.equal(ids, ids_again)
    for v in range(3):
        segments = ids[v].view(8, 5)
        assert torch.all(segments == segments[:, :1]), "a scene holds for a whole segment"
        seq = segments[:, 0].tolist()
        assert all(a != b for a, b in zip(seq, seq[1:])), "a scene never follows itself"
        assert set(seq) <= set(range(v * 3, v * 3 + 3))
        assert len(seq) > len(set(seq)), "scenes recur"
    # Same-scene frames from different visits are closer than frames of other scenes.
    flat, lab = latents[0].flatten(1), ids[0]
    dist = torch.cdist(flat, flat)
    same = lab[:, None] == lab[None, :]
    far_in_time = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs() > 5
    assert dist[same & far_in_time].mean() < dist[~same].mean()


def test_write_synthetic_corpus(tmp_path):
    cfg = SyntheticCorpusConfig(num_videos=3, frames_per_video=8, segment_len=4, channels=2, height=4, width=4)
    corpus = write_synthetic_corpus(tmp_path, cfg, videos_per_shard=2)
    latents, ids = generate_synthetic_corpus(cfg)
    assert torch.equal(corpus.latents, latents) and torch.equal(corpus.scene_ids, ids)
    assert len(corpus.manifest["shards"]) == 2


@pytest.mark.parametrize("bad,match", [(dict(num_scenes=1), "num_scenes"), (dict(noise=-1.0), "noise"),
                                       (dict(segment_len=0), "segment_len")])
def test_synthetic_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        SyntheticCorpusConfig(**bad)
