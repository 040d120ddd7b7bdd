"""lrag-engine: generate latent videos with LongLive-RAG memory; collect latents, train and evaluate the retrieval encoder.

With no arguments, ``generate`` runs the built-in default: the tiny preset with
seeded random weights and a fixed random text embedding, 48 latent frames (16
blocks), long enough for retrieval to be active.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import MODEL_PRESETS, MemoryConfig, ModelConfig, RuntimeConfig
from .memory.history import HistoryFullError

DEFAULT_FRAMES = 48


def read_text_embedding(path: str | Path) -> torch.Tensor:
    """A text embedding file (.pt / .safetensors) holding one tensor [L, D] or [B, L, D]
    (bare, or the only tensor of a dict) -> [B, L, D] float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embedding file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor in the file, found keys {sorted(obj)}")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (2, 3):
        raise ValueError(f"{path}: expected a tensor [L, D] or [B, L, D], got "
                         f"{getattr(obj, 'shape', type(obj).__name__)}")
    return (obj.unsqueeze(0) if obj.dim() == 2 else obj).float()


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a latent video (default: built-in tiny demo)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    p.add_argument("--checkpoint", help="model weights (.pt/.safetensors); default: seeded random weights")
    p.add_argument("--checkpoint-key", help="checkpoint entry: generator, generator_ema, model or bare "
                                            "(default: generator_ema, else generator, else model)")
    p.add_argument("--lora", help="LoRA weights (peft naming) merged into the checkpoint")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the LoRA rank)")
    p.add_argument("--text", help="text embedding file [L, text_dim] or [B, L, text_dim]; "
                                  "default: a fixed random embedding")
    p.add_argument("--encoder", help="retrieval encoder checkpoint for descriptors (default: spatial mean)")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="latent frames to generate")
    p.add_argument("--batch", type=int, default=None, help="streams (default: from --text, else 1)")
    p.add_argument("--frames-per-block", type=int, default=3)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--top-k", type=int, default=6, help="retrieved frames per block; 0 = native window")
    p.add_argument("--recency-guard", type=int, default=5)
    p.add_argument("--widen-local", action="store_true",
                   help="give unused retrieval slots to the local window until memory exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash", "xformers"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lrag_out", help="output directory")
    p.add_argument("--preview", action="store_true", help="write a latent preview strip (PNG)")
    p.add_argument("--plot", action="store_true", help="write a plot of the retrieval log (PNG)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .engine import Engine
    from tqdm.auto import tqdm

    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    memory = MemoryConfig(window=args.window, sink=args.sink, top_k=args.top_k,
                          recency_guard=args.recency_guard, frames_per_block=args.frames_per_block,
                          widen_local_until_memory=args.widen_local)
    runtime = RuntimeConfig(device=args.device, dtype=dtype, kernels=args.kernels,
                            attention_backend=args.attention)
    text = read_text_embedding(args.text) if args.text else None
    engine = Engine(ModelConfig.preset(args.preset), memory, runtime, checkpoint=args.checkpoint,
                    checkpoint_key=args.checkpoint_key, lora=args.lora, lora_alpha=args.lora_alpha,
                    encoder=args.encoder, seed=args.seed)
    weights = args.checkpoint or f"random weights (seed {args.seed})"
    print(f"lrag-engine generate: preset {args.preset}, weights: {weights}, "
          f"text: {args.text or 'fixed random embedding (seed 0)'}")
    if engine.load_report is not None:
        print(f"checkpoint: {engine.load_report}")
    print(f"memory: window {memory.window}, sink {memory.sink}, top_k {memory.top_k}, recency guard "
          f"{memory.recency_guard}, {memory.frames_per_block} frames/block, descriptor "
          f"{type(engine.descriptor).__name__}; device {args.device}, {dtype}, attention "
          f"{engine.attention_backend}")

    blocks = args.frames // args.frames_per_block if args.frames % args.frames_per_block == 0 else 0
    stream = engine.stream(args.frames, text=text, seed=args.seed, batch_size=args.batch)
    outputs = []
    start = time.perf_counter()
    with tqdm(total=blocks, unit="block", desc="generate") as bar:
        for out in stream:
            outputs.append(out)
            bar.update(1)
    latents = torch.cat([o.latents for o in outputs], dim=1).cpu()   # waits for the device
    elapsed = time.perf_counter() - start
    log = [o.log.to_dict() for o in outputs]

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": latents, "config": engine.describe()}, out_dir / "latents.pt")
    (out_dir / "retrieval_log.json").write_text(json.dumps(log, indent=1))
    active = sum(1 for entry in log if any(entry["selected"]))
    print(f"{len(outputs)} blocks, {latents.shape[1]} latent frames in {elapsed:.2f} s "
          f"({len(outputs) / elapsed:.2f} blocks/s); retrieval active in {active} blocks")
    print(f"wrote {out_dir / 'latents.pt'} (latents {list(latents.shape)}) and {out_dir / 'retrieval_log.json'}")
    if args.preview:
        from .preview import save_preview_strip
        print(f"wrote {save_preview_strip(latents[0], out_dir / 'preview.png')}")
    if args.plot:
        from .preview import plot_retrieval_log
        print(f"wrote {plot_retrieval_log(log, out_dir / 'retrieval_log.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrag-engine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    _add_generate(sub)
    from .encoder.cli import add_subcommands
    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["generate", *(argv or [])])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, HistoryFullError) as exc:
        print(f"lrag-engine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
