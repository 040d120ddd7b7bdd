"""Sub-commands ``collect-latents``, ``train-encoder`` and ``eval-retrieval`` of ``lrag-engine``.

``add_subcommands(subparsers)`` registers them; each parser sets ``func``, a
handler taking the parsed namespace and returning an exit code.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_subcommands(subparsers,
                    formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter) -> None:
    """Register the encoder sub-commands on an ``argparse`` subparsers object; their help
    uses ``formatter_class``, which should show the defaults."""
    p = subparsers.add_parser("collect-latents", help="run the engine and store clean latents as a corpus",
                              formatter_class=formatter_class)
    p.add_argument("--out", required=True, help="corpus directory (created, or resumed when it exists)")
    p.add_argument("--text", help="text embeddings: .pt [P, L, text_dim] or a directory of .pt files "
                                  "(default: seeded random embeddings)")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts when --text is not given")
    p.add_argument("--num-frames", type=int, default=24, help="latent frames per video")
    p.add_argument("--videos-per-shard", type=int, default=2, help="videos stored per corpus shard file")
    p.add_argument("--preset", default="tiny", help="model preset (ModelConfig.preset)")
    p.add_argument("--checkpoint", help="generator checkpoint (default: seeded random weights)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", help="model precision")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, texts and noise")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_collect)

    p = subparsers.add_parser("train-encoder", help="train the retrieval encoder on a latent corpus",
                              formatter_class=formatter_class)
    p.add_argument("--corpus", required=True, help="corpus directory (collect-latents output)")
    p.add_argument("--out", required=True, help="output directory for checkpoints, history and curves")
    p.add_argument("--config", help="YAML with model/train sections (default: the packaged default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lr=1e-4 --set model.latent_dim=512")
    p.add_argument("--resume", help="last.pt of an earlier run to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval-retrieval", help="precision@K of descriptors on a synthetic corpus",
                              formatter_class=formatter_class)
    p.add_argument("--out", required=True, help="output directory (retrieval_eval.json, trained encoders)")
    p.add_argument("--videos", type=int, default=8, help="videos in the synthetic corpus")
    p.add_argument("--frames", type=int, default=96, help="frames per video")
    p.add_argument("--scenes", type=int, default=4, help="scenes per video")
    p.add_argument("--segment-len", type=int, default=8, help="frames per scene visit")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width", type=int, default=24, help="latent width")
    p.add_argument("--noise", type=float, default=0.3, help="std of the white noise on every frame")
    p.add_argument("--drift", type=float, default=0.03,
                   help="per-frame step of a slow drift that accumulates over a video")
    p.add_argument("--flicker", type=float, default=0.2, help="per-frame per-channel offset (lighting)")
    p.add_argument("--mean-contrast", type=float, default=0.2,
                   help="spread of the scenes' per-channel means (what a spatial mean can see)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and of training")
    p.add_argument("--latent-dim", type=int, default=64, help="encoder embedding size")
    # A width of 32 or less gets one channel per GroupNorm group (instance norm), after
    # which the pooled features barely depend on the input; 128 keeps 4 per group.
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[32, 128], help="encoder stage widths")
    p.add_argument("--steps", type=int, default=300, help="training steps per encoder")
    p.add_argument("--batch-size", type=int, default=8, help="training chunks per step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 6], help="K values of precision@K")
    p.add_argument("--recency", type=int, help="recency window in frames (default: --segment-len)")
    p.add_argument("--with-delta-ckpt", help="encoder trained with the delta loss (skips its training)")
    p.add_argument("--without-delta-ckpt", help="encoder trained without it (skips its training)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)


def _collect(args: argparse.Namespace) -> int:
    from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig

    from .collect import collect_latents, default_text_embeddings, load_text_embeddings

    engine = Engine(model=ModelConfig.preset(args.preset), memory=MemoryConfig(),
                    runtime=RuntimeConfig(device=args.device, dtype=args.dtype),
                    checkpoint=args.checkpoint, seed=args.seed)
    cfg = engine.model_config
    if args.checkpoint is None:
        print(f"collect-latents: no --checkpoint given: preset {args.preset!r} with seeded random weights "
              f"(seed {args.seed}); these latents do not come from a trained video model.")
    if args.text:
        texts = load_text_embeddings(args.text)
        source = str(Path(args.text).resolve())
    else:
        texts = default_text_embeddings(args.num_prompts, cfg.text_len, cfg.text_dim, args.seed)
        source = f"random(seed={args.seed})"
        print(f"collect-latents: no --text given: {args.num_prompts} seeded random text embeddings.")
    meta = {"source": "engine", "preset": args.preset, "checkpoint": args.checkpoint, "text": source,
            "dtype": args.dtype}
    corpus = collect_latents(engine, texts, args.out, args.num_frames, args.videos_per_shard, args.seed,
                             meta, progress=not args.no_progress)
    print(f"collect-latents: {corpus.num_videos} videos of {corpus.num_frames} frames "
          f"{list(corpus.frame_shape)} in {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .corpus import LatentCorpus
    from .train import load_configs, train_encoder

    model_config, train_config = load_configs(args.config, args.set)
    result = train_encoder(model_config, train_config, LatentCorpus(args.corpus), args.out,
                           resume=args.resume, progress=not args.no_progress)
    last = result.history["train"][-1] if result.history["train"] else {}
    print(f"train-encoder: step {len(result.history['train'])}, last train loss {last.get('total', float('nan')):.4f}; "
          f"wrote {result.out_dir / 'encoder.pt'}, last.pt, history.json, loss_curves.png")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .corpus import SyntheticCorpusConfig
    from .evaluate import format_table, run_retrieval_eval
    from .model import EncoderConfig
    from .train import TrainConfig

    corpus_config = SyntheticCorpusConfig(
        num_videos=args.videos, frames_per_video=args.frames, num_scenes=args.scenes,
        segment_len=args.segment_len, height=args.height, width=args.width, noise=args.noise,
        drift=args.drift, flicker=args.flicker,
        mean_contrast=args.mean_contrast, seed=args.seed)
    encoder_config = EncoderConfig(in_channels=corpus_config.channels, spatial_h=args.height,
                                   spatial_w=args.width, latent_dim=args.latent_dim,
                                   hidden_dims=tuple(args.hidden_dims))
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               val_every=max(1, args.steps // 4), checkpoint_every=args.steps,
                               seed=args.seed, device=args.device)
    report = run_retrieval_eval(args.out, corpus_config, encoder_config, train_config,
                                with_delta_ckpt=args.with_delta_ckpt, without_delta_ckpt=args.without_delta_ckpt,
                                ks=tuple(args.k), recency=args.recency, progress=not args.no_progress)
    print(format_table(report["results"], tuple(args.k)))
    print(f"eval-retrieval: recency window {report['recency']} frames; wrote "
          f"{Path(args.out) / 'retrieval_eval.json'}")
    print(json.dumps(report["results"]))
    return 0
