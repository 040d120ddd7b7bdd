"""collect-latents (fake and real engine), precision@K, and the sub-command registration."""
import argparse
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from lrag_engine.encoder import cli as encoder_cli
from lrag_engine.encoder.collect import collect_latents, default_text_embeddings, load_text_embeddings
from lrag_engine.encoder.corpus import CorpusError, LatentCorpus
from lrag_engine.encoder.evaluate import evaluate_descriptors, precision_at_k


@dataclass
class FakeModelConfig:
    text_dim: int = 6
    text_len: int = 5
    out_channels: int = 3
    height: int = 4
    width: int = 5


class FakeEngine:
    """Latents are a deterministic function of the text and the seed; can fail after N calls."""

    def __init__(self, fail_after=None):
        self.model_config = FakeModelConfig()
        self.calls = []
        self.fail_after = fail_after

    def generate(self, num_frames, text, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls.append(seed)
        c = self.model_config
        base = text.mean(dim=(1, 2))[:, None, None, None, None] + seed
        ramp = torch.arange(num_frames, dtype=torch.float32)[None, :, None, None, None]
        return SimpleNamespace(latents=(base + ramp).expand(text.shape[0], num_frames, c.out_channels,
                                                            c.height, c.width).clone())


def test_collect_resumes_after_interruption(tmp_path):
    texts = default_text_embeddings(5, 5, 6, seed=1)
    full = collect_latents(FakeEngine(), texts, tmp_path / "full", num_frames=3, videos_per_shard=2, seed=7,
                           progress=False)
    assert full.latents.shape == (5, 3, 3, 4, 5)
    broken = FakeEngine(fail_after=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        collect_latents(broken, texts, tmp_path / "part", num_frames=3, videos_per_shard=2, seed=7, progress=False)
    assert [s["index"] for s in json.loads((tmp_path / "part" / "manifest.json").read_text())["shards"]] == [0]
    engine = FakeEngine()
    resumed = collect_latents(engine, texts, tmp_path / "part", num_frames=3, videos_per_shard=2, seed=7,
                              progress=False)
    assert engine.calls == [8, 9], "only the missing shards run, with their own seeds"
    assert torch.equal(resumed.latents, full.latents)
    with pytest.raises(CorpusError, match="meta"):
        collect_latents(FakeEngine(), texts, tmp_path / "part", num_frames=3, videos_per_shard=2, seed=8,
                        progress=False)
    with pytest.raises(ValueError, match=r"\[P, L, 6\]"):
        collect_latents(FakeEngine(), torch.randn(2, 5, 7), tmp_path / "x", num_frames=3, progress=False)


def test_load_text_embeddings(tmp_path):
    torch.save(torch.randn(3, 4, 6), tmp_path / "one.pt")
    assert load_text_embeddings(tmp_path / "one.pt").shape == (3, 4, 6)
    folder = tmp_path / "dir"
    folder.mkdir()
    a, b = torch.randn(2, 6), torch.randn(2, 3, 6)
    torch.save(a, folder / "a.pt")
    torch.save(b, folder / "b.pt")
    texts = load_text_embeddings(folder)
    assert texts.shape == (3, 3, 6)
    assert torch.equal(texts[0, :2], a) and torch.all(texts[0, 2] == 0) and torch.equal(texts[1:], b)
    torch.save({"x": 1}, folder / "c.pt")
    with pytest.raises(ValueError, match="c.pt.*must be a tensor"):
        load_text_embeddings(folder)
    with pytest.raises(FileNotFoundError):
        load_text_embeddings(tmp_path / "none.pt")


def test_collect_with_real_engine(tmp_path):
    from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig

    engine = Engine(model=ModelConfig.preset("tiny"), memory=MemoryConfig(),
                    runtime=RuntimeConfig(device="cpu", dtype="float32"), checkpoint=None, seed=0)
    cfg = engine.model_config
    texts = default_text_embeddings(2, cfg.text_len, cfg.text_dim, seed=0)
    corpus = collect_latents(engine, texts, tmp_path, num_frames=6, videos_per_shard=1, seed=0, progress=False)
    assert corpus.latents.shape == (2, 6, cfg.out_channels, cfg.height, cfg.width)
    assert torch.isfinite(corpus.latents).all()


def naive_precision(desc, ids, ks, recency):
    sums, queries = {k: 0.0 for k in ks}, 0
    for t in range(len(ids)):
        cands = list(range(0, t - recency))
        if len(cands) < max(ks) or not any(ids[c] == ids[t] for c in cands):
            continue
        sims = {c: sum(x * y for x, y in zip(desc[t], desc[c])) for c in cands}
        ranked = sorted(cands, key=lambda c: (-sims[c], c))
        for k in ks:
            sums[k] += sum(ids[c] == ids[t] for c in ranked[:k]) / k
        queries += 1
    return sums, queries


@pytest.mark.parametrize("t,recency,seed", [(1, 0, 0), (9, 0, 1), (30, 5, 2), (47, 8, 3)])
def test_precision_matches_naive(t, recency, seed):
    gen = torch.Generator().manual_seed(seed)
    desc = torch.nn.functional.normalize(torch.randn(t, 4, generator=gen, dtype=torch.float64), dim=-1)
    desc[::4] = desc[0].clone()  # exact ties: lower index must win
    ids = torch.randint(3, (t,), generator=gen)
    sums, queries = precision_at_k(desc, ids, (1, 3), recency)
    ref_sums, ref_queries = naive_precision(desc.tolist(), ids.tolist(), (1, 3), recency)
    assert queries == ref_queries
    for k in (1, 3):
        assert sums[k] == pytest.approx(ref_sums[k], abs=1e-12)


def test_oracle_descriptor_is_perfect():
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 0, 1]])
    latents = torch.nn.functional.one_hot(ids, 2).float()[..., None, None]  # [1, T, 2, 1, 1]
    res = evaluate_descriptors(latents, ids, {"oracle": lambda f: f.flatten(1)}, ks=(1, 2), recency=1)
    assert res["oracle"]["p@1"] == 1.0 and res["oracle"]["p@2"] == 1.0


def _parser():
    parser = argparse.ArgumentParser(prog="lrag-engine")
    encoder_cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_subcommands_registered():
    assert not hasattr(encoder_cli, "main")
    parser = _parser()
    for cmd in ("collect-latents --out x", "train-encoder --corpus c --out o --set lr=1e-4", "eval-retrieval --out o"):
        args = parser.parse_args(cmd.split())
        assert callable(args.func)


def test_train_and_eval_commands(tmp_path, capsys):
    from lrag_engine.encoder.corpus import SyntheticCorpusConfig, write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "corpus", SyntheticCorpusConfig(num_videos=2, frames_per_video=12,
                                                                      channels=4, height=8, width=8))
    args = _parser().parse_args(["train-encoder", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "t"),
                                 "--no-progress", "--set", "in_channels=4", "--set", "spatial_h=8",
                                 "--set", "spatial_w=8", "--set", "hidden_dims=[8]", "--set", "latent_dim=8",
                                 "--set", "steps=2", "--set", "batch_size=2", "--set", "val_fraction=0.5"])
    assert args.func(args) == 0
    assert (tmp_path / "t" / "encoder.pt").is_file() and (tmp_path / "t" / "loss_curves.png").is_file()
    args = _parser().parse_args(["eval-retrieval", "--out", str(tmp_path / "e"), "--videos", "2", "--frames", "40",
                                 "--height", "8", "--width", "8", "--steps", "2", "--hidden-dims", "8",
                                 "--latent-dim", "8", "--no-progress"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "e" / "retrieval_eval.json").read_text())
    assert set(report["results"]) == {"spatial mean", "encoder, no delta loss", "encoder, with delta loss"}
    assert (tmp_path / "e" / "encoder_with_delta" / "encoder.pt").is_file()
    assert "p@6" in capsys.readouterr().out


def test_eval_run_folders_are_named_and_plots_titled(tmp_path, monkeypatch):
    from lrag_engine.encoder import train as train_module
    from lrag_engine.encoder.corpus import SyntheticCorpusConfig
    from lrag_engine.encoder.evaluate import run_retrieval_eval
    from lrag_engine.encoder.model import EncoderConfig
    from lrag_engine.encoder.train import TrainConfig

    titles = {}
    real_plot = train_module.plot_history

    def recording_plot(history, path, *args, **kwargs):
        titles[path.parent.name] = real_plot(history, path, *args, **kwargs)
        return titles[path.parent.name]
    monkeypatch.setattr(train_module, "plot_history", recording_plot)

    corpus = SyntheticCorpusConfig(num_videos=2, frames_per_video=40, height=8, width=8)
    weight = float(torch.empty(1).uniform_(0.5, 2.0))
    encoder = EncoderConfig(in_channels=16, spatial_h=8, spatial_w=8, latent_dim=8, hidden_dims=(8,),
                            delta_weight=weight)
    train = TrainConfig(steps=2, batch_size=2, val_every=1, checkpoint_every=2)
    out = tmp_path / "eval"
    report = run_retrieval_eval(out, corpus, encoder, train, progress=False)

    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["encoder_no_delta", "encoder_with_delta"]
    assert report["checkpoints"] == {"encoder, no delta loss": str(out / "encoder_no_delta" / "encoder.pt"),
                                     "encoder, with delta loss": str(out / "encoder_with_delta" / "encoder.pt")}
    weights = {name: torch.load(out / name / "encoder.pt", weights_only=True)["config"]["delta_weight"]
               for name in ("encoder_no_delta", "encoder_with_delta")}
    assert weights == {"encoder_no_delta": 0.0, "encoder_with_delta": weight}
    assert titles["encoder_no_delta"]["figure"] == "encoder, no delta loss: delta loss not optimised (weight 0)"
    assert titles["encoder_no_delta"]["delta"] == "delta (weight 0: logged, not optimised)"
    assert titles["encoder_with_delta"]["figure"] == f"encoder, with delta loss: delta loss weighted {weight:g}"
    assert titles["encoder_with_delta"]["delta"] == f"delta (weight {weight:g})"
    assert (out / "encoder_no_delta" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"

    # A re-run into the same folder is refused before anything is trained, naming the way out.
    before = (out / "encoder_no_delta" / "encoder.pt").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"encoder_no_delta' already holds a training run: reuse its encoder "
                                         r"'.*encoder_no_delta/encoder\.pt' as without_delta_ckpt "
                                         r"\(--without-delta-ckpt\)"):
        run_retrieval_eval(out, corpus, encoder, train, with_delta_ckpt=report["checkpoints"]
                           ["encoder, with delta loss"], progress=False)
    assert (out / "encoder_no_delta" / "encoder.pt").stat().st_mtime_ns == before
    again = run_retrieval_eval(out, corpus, encoder, train, progress=False,
                               with_delta_ckpt=report["checkpoints"]["encoder, with delta loss"],
                               without_delta_ckpt=report["checkpoints"]["encoder, no delta loss"])
    assert again["results"] == report["results"]


def test_plot_titles_follow_the_loss_weights(tmp_path):
    from lrag_engine.encoder.model import EncoderConfig
    from lrag_engine.encoder.train import plot_history

    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    values = torch.rand(5, 4, generator=gen).tolist()
    history = {"train": [{"step": i + 1, **dict(zip(("total", "recon", "delta", "smooth"), v))}
                         for i, v in enumerate(values)], "val": []}
    cfg = EncoderConfig(delta_weight=0.0, smooth_weight=0.25)
    drawn = plot_history(history, tmp_path / "curves.png", cfg, "run A")
    assert drawn == {"figure": "run A: delta loss not optimised (weight 0)",
                     "total": "total = recon + 0*delta + 0.25*smooth",
                     "recon": "recon (MSE, weight 1)",
                     "delta": "delta (weight 0: logged, not optimised)",
                     "smooth": "smooth (weight 0.25)"}
    drawn = plot_history(history, tmp_path / "curves.png", EncoderConfig(delta_weight=1.5, smooth_weight=0.0))
    assert drawn["figure"] == "encoder training: delta loss weighted 1.5"
    assert drawn["delta"] == "delta (weight 1.5)" and drawn["smooth"] == "smooth (weight 0: logged, not optimised)"
