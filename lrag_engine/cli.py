"""lrag-engine: generate latent videos with LongLive-RAG memory; collect latents, train and evaluate the retrieval encoder.

With no arguments, ``generate`` runs the built-in default: the tiny preset with
seeded random weights and a fixed random text embedding, 48 latent frames (16
blocks), long enough for retrieval to be active.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .config import ATTENTION_BACKENDS, KERNEL_MODES, MODEL_PRESETS, MemoryConfig, ModelConfig, RuntimeConfig
from .memory.history import HistoryFullError
from .models.checkpoint import CheckpointKeyError

DEFAULT_FRAMES = 48
# What a user can cause with an option or a file; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, CheckpointKeyError, HistoryFullError)
# The API names behind generate's options, so that errors name what the user typed.
_FLAGS = {"num_frames": "--frames", "batch_size": "--batch", "frames_per_block": "--frames-per-block",
          "window": "--window", "sink": "--sink", "top_k": "--top-k", "recency_guard": "--recency-guard",
          "widen_local_until_memory": "--widen-local", "RuntimeConfig.device": "--device", "dtype": "--dtype",
          "kernels": "--kernels", "attention_backend": "--attention", "seed": "--seed", "text": "--text",
          "checkpoint_key": "--checkpoint-key", "lora_alpha": "--lora-alpha"}
_API_NAME = (r"(?<![\w.-])(?:(?:MemoryConfig|RuntimeConfig)\.)?("
             + "|".join(re.escape(name) for name in sorted(_FLAGS, key=len, reverse=True)) + r")(?![\w.-])(=?)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" once, and not where there is no value to show: an option
    whose default is None (its help says what leaving it out means), a flag, an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _flag_names(message: str, paths: list[str]) -> str:
    """``message`` with the API names of generate's options replaced by the options
    (``MemoryConfig.top_k`` -> ``--top-k``, ``kernels='x'`` -> ``--kernels 'x'``); quoted text
    and the given ``paths`` are left as they are."""
    # Quoted text starts at a quote that does not follow a letter (that one is an apostrophe).
    keep = [r"(?<!\w)'[^']*'"] + [re.escape(p) for p in sorted(filter(None, paths), key=len, reverse=True)]
    pattern = re.compile("|".join(keep) + "|" + _API_NAME)

    def flag(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group(0)
        return _FLAGS[match.group(1)] + (" " if match.group(2) else "")
    return pattern.sub(flag, message)


def read_text_embedding(path: str | Path) -> torch.Tensor:
    """A text embedding file (.pt / .safetensors) holding one tensor [L, D] or [B, L, D]
    (bare, or the only tensor of a dict) -> [B, L, D] float32."""
    from .safe_load import load_tensor_file

    path = Path(path)
    obj = load_tensor_file(path, "text embedding file")   # never runs pickled code
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
    memory = MemoryConfig()
    p = sub.add_parser("generate", help="generate a latent video (the command run without one: a built-in "
                                        "tiny demo)", formatter_class=HelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model shapes")
    p.add_argument("--checkpoint", help="model weights (.pt/.safetensors) (default: random weights drawn "
                                        "from --seed)")
    p.add_argument("--checkpoint-key", help="checkpoint entry: generator, generator_ema, model or bare "
                                            "(default: generator_ema, else generator, else model, else bare)")
    p.add_argument("--lora", help="LoRA weights (peft naming) merged into --checkpoint (default: none)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the LoRA rank)")
    p.add_argument("--text", help="text embedding file [L, text_dim] or [B, L, text_dim] "
                                  "(default: a fixed random embedding)")
    p.add_argument("--encoder", help="retrieval encoder checkpoint for descriptors (default: the spatial mean)")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help="latent frames to generate, a multiple of --frames-per-block")
    p.add_argument("--batch", type=int, help="streams generated together (default: the batch of --text, else 1)")
    p.add_argument("--frames-per-block", type=int, default=memory.frames_per_block,
                   help="latent frames per autoregressive block")
    p.add_argument("--window", type=int, default=memory.window, help="frames in the sliding-window cache, sink "
                                                                      "included")
    p.add_argument("--sink", type=int, default=memory.sink, help="first frames, never evicted from the window")
    p.add_argument("--top-k", type=int, default=memory.top_k,
                   help="retrieved frames per block; 0 = native sliding window")
    p.add_argument("--recency-guard", type=int, default=memory.recency_guard,
                   help="most recently evicted frames that may not be retrieved")
    p.add_argument("--widen-local", action="store_true",
                   help="give unused retrieval slots to the local window until memory exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model precision (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="auto: Triton kernels on CUDA, PyTorch references elsewhere; triton off CUDA needs "
                        "TRITON_INTERPRET=1 in the environment")
    p.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS, help="attention backend")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the noise")
    p.add_argument("--out", default="lrag_out", help="output directory, created and checked before the run; "
                                                     "latents.pt and retrieval_log.json in it are replaced")
    p.add_argument("--preview", action="store_true", help="write a latent preview strip (PNG)")
    p.add_argument("--plot", action="store_true", help="write a plot of the retrieval log (PNG)")
    p.set_defaults(func=cmd_generate)


def _output_dir(path: str) -> Path:
    """The ``--out`` directory, created and shown to take files before any work is done."""
    out = Path(path)
    probe = out / f".lrag-engine-probe-{secrets.token_hex(4)}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise OSError(f"--out {path!r} is not a writable directory ({exc.strerror or exc})") from None
    return out


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it once the body has written it: an
    interrupted write never leaves a truncated ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_generate(args) -> int:
    from .engine import Engine

    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    memory = MemoryConfig(window=args.window, sink=args.sink, top_k=args.top_k,
                          recency_guard=args.recency_guard, frames_per_block=args.frames_per_block,
                          widen_local_until_memory=args.widen_local)
    runtime = RuntimeConfig(device=args.device, dtype=dtype, kernels=args.kernels,
                            attention_backend=args.attention)
    out_dir = _output_dir(args.out)   # before any work: an unwritable --out must not cost a run
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

    start = time.perf_counter()
    result = engine.generate(args.frames, text=text, seed=args.seed, batch_size=args.batch, progress=True)
    elapsed = time.perf_counter() - start   # generate returns CPU latents: the device is done
    latents, log = result.latents, result.log_dicts()

    with _replacing(out_dir / "latents.pt") as tmp:
        torch.save({"latents": latents, "config": engine.describe()}, tmp)
    with _replacing(out_dir / "retrieval_log.json") as tmp:
        tmp.write_text(json.dumps(log, indent=1))
    active = sum(1 for entry in log if any(entry["selected"]))
    print(f"{len(log)} blocks, {latents.shape[1]} latent frames in {elapsed:.2f} s "
          f"({len(log) / elapsed:.2f} blocks/s); retrieval active in {active} blocks")
    print(f"wrote {out_dir / 'latents.pt'} (latents {list(latents.shape)}) and {out_dir / 'retrieval_log.json'}")
    if args.preview:
        from .preview import save_preview_strip
        with _replacing(out_dir / "preview.png") as tmp:
            save_preview_strip(latents[0], tmp)
        print(f"wrote {out_dir / 'preview.png'}")
    if args.plot:
        from .preview import plot_retrieval_log
        with _replacing(out_dir / "retrieval_log.png") as tmp:
            plot_retrieval_log(log, tmp)
        print(f"wrote {out_dir / 'retrieval_log.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrag-engine", description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command")
    _add_generate(sub)
    from .encoder.cli import add_subcommands
    add_subcommands(sub, formatter_class=HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["generate", *(argv or [])])
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        message = str(exc)
        if args.command == "generate":
            message = _flag_names(message, [args.text, args.checkpoint, args.lora, args.encoder, args.out])
        print(f"lrag-engine: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
