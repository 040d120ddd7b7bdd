"""lrag-engine: generate videos with LongLive-RAG memory; collect latents, train and evaluate the retrieval encoder.

With no arguments, ``generate`` runs the built-in default offline: the tiny preset with
seeded random weights, a tiny random UMT5 text encoder and Wan VAE, a default prompt,
48 latent frames (16 blocks, long enough for retrieval to be active), an mp4 out.
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
    p.add_argument("--model-dir", help="a Wan2.1-T2V model directory, original or diffusers layout (DiT, VAE, "
                                       "UMT5 text encoder, tokenizer); --checkpoint/--lora are then laid over its "
                                       "DiT (default: the tiny preset with random weights, text encoder and VAE)")
    p.add_argument("--height", type=int, help="latent frame height with --model-dir (default 60: 480 pixels)")
    p.add_argument("--width", type=int, help="latent frame width with --model-dir (default 104: 832 pixels)")
    p.add_argument("--prompt", help="the text prompt (default: 'a red fox running through snow'); needs the "
                                    "text encoder of --model-dir or of the built-in default")
    p.add_argument("--prompt-at", action="append", default=[], metavar="BLOCK:PROMPT",
                   help="switch to PROMPT from block BLOCK on (a block is --frames-per-block latent frames); "
                        "repeatable")
    p.add_argument("--image", help="start from this image (png/jpg): its VAE latent is the first frame, resized to "
                                   "the model's frame size")
    p.add_argument("--video", help="continue this video (mp4): its first 1 + 4k frames, resized, become the "
                                   "first latent frames")
    p.add_argument("--recache-sink", action="store_true", help="a prompt switch also recomputes the sink frames")
    p.add_argument("--text", help="text embedding file [L, text_dim] or [B, L, text_dim] instead of --prompt")
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
    p.add_argument("--out", default="lrag_out",
                   help="output directory (video.mp4, latents.pt, retrieval_log.json in it are replaced), or a "
                        ".mp4 path (the latents and the log go beside it as <name>.latents.pt and "
                        "<name>.retrieval_log.json); checked before the run")
    p.add_argument("--fps", type=int, default=16, help="frames per second of the mp4 (Wan 2.1: 16)")
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


DEFAULT_PROMPT = "a red fox running through snow"


def _outputs(path: str) -> dict[str, Path]:
    """Where generate writes: ``--out`` as a directory, or as the mp4's path."""
    if path.lower().endswith(".mp4"):
        video = Path(path)
        base = _output_dir(str(video.parent or "."))
        stem = video.stem
        return {"video": video, "latents": base / f"{stem}.latents.pt", "log": base / f"{stem}.retrieval_log.json",
                "preview": base / f"{stem}.preview.png", "plot": base / f"{stem}.retrieval_log.png"}
    base = _output_dir(path)
    return {"video": base / "video.mp4", "latents": base / "latents.pt", "log": base / "retrieval_log.json",
            "preview": base / "preview.png", "plot": base / "retrieval_log.png"}


def _prompt_timeline(entries: list[str]) -> dict[int, str]:
    timeline = {}
    for entry in entries:
        block, sep, prompt = entry.partition(":")
        if not sep or not block.strip().isdigit() or not prompt.strip():
            raise ValueError(f"--prompt-at {entry!r}: expected BLOCK:PROMPT with a block index >= 0 and a prompt")
        if int(block) in timeline:
            raise ValueError(f"--prompt-at: block {int(block)} is given twice")
        timeline[int(block)] = prompt.strip()
    return timeline


def _build_engine(args, memory: MemoryConfig, runtime: RuntimeConfig):
    from .engine import Engine

    common = dict(checkpoint_key=args.checkpoint_key, lora=args.lora, lora_alpha=args.lora_alpha,
                  encoder=args.encoder, seed=args.seed)
    if args.model_dir:
        return Engine.from_pretrained(args.model_dir, memory=memory, runtime=runtime, checkpoint=args.checkpoint,
                                      height=args.height, width=args.width, **common), f"{args.model_dir}" + (f" + {args.checkpoint}" if args.checkpoint
                                                                          else "")
    engine = Engine(ModelConfig.preset(args.preset), memory, runtime, checkpoint=args.checkpoint, **common)
    if args.text is None:
        engine.attach_random_pipeline(seed=args.seed)
    weights = args.checkpoint or f"random weights (seed {args.seed})"
    return engine, f"preset {args.preset}, {weights}"


def _initial_latents(engine, image: str | None, video: str | None) -> torch.Tensor:
    """An image (one latent frame) or the first 1 + 4k frames of a video, resized to the
    model's frame size and encoded by the engine's VAE."""
    from .pipeline.video import read_image, read_video

    if engine.vae is None:
        raise ValueError("--image/--video need a VAE: --model-dir, or the built-in default without --text")
    frames = read_image(image)[None] if image else read_video(video)
    if frames.shape[0] == 0:
        raise ValueError(f"--video {video!r} has no frames")
    frames = frames[: 1 + 4 * ((frames.shape[0] - 1) // 4)]          # the Wan VAE takes 1 + 4k frames
    cfg = engine.model_config
    size = (cfg.height * 8, cfg.width * 8)
    pixels = frames.permute(0, 3, 1, 2).float()
    if tuple(pixels.shape[-2:]) != size:
        pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True,
                                                 align_corners=False)
    pixels = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return engine.vae.encode(pixels[None].to(engine.vae.device)).float()


def cmd_generate(args) -> int:
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    memory = MemoryConfig(window=args.window, sink=args.sink, top_k=args.top_k,
                          recency_guard=args.recency_guard, frames_per_block=args.frames_per_block,
                          widen_local_until_memory=args.widen_local)
    runtime = RuntimeConfig(device=args.device, dtype=dtype, kernels=args.kernels,
                            attention_backend=args.attention)
    if (args.height or args.width) and not args.model_dir:
        raise ValueError("--height/--width set the latent size of a --model-dir model; presets have their own")
    if args.text and (args.prompt or args.prompt_at):
        raise ValueError("--text gives text embeddings: it cannot be combined with --prompt/--prompt-at")
    outputs = _outputs(args.out)   # before any work: an unwritable --out must not cost a run
    timeline = _prompt_timeline(args.prompt_at)
    text = read_text_embedding(args.text) if args.text else None
    engine, weights = _build_engine(args, memory, runtime)
    random_parts = engine.pipeline_is_random
    if args.text:
        what = f"text embeddings from {args.text}"
    else:
        prompt = args.prompt or DEFAULT_PROMPT
        what = f"prompt {prompt!r}" + "".join(f", from block {b}: {p!r}" for b, p in sorted(timeline.items()))
    print(f"lrag-engine generate: {weights}; {what}")
    if random_parts:
        print(f"note: {random_parts} random (seeded, nothing downloaded): the video shows what the engine does, not "
              "what a trained model draws")
    if engine.load_report is not None:
        print(f"checkpoint: {engine.load_report}")
    print(f"memory: window {memory.window}, sink {memory.sink}, top_k {memory.top_k}, recency guard "
          f"{memory.recency_guard}, {memory.frames_per_block} frames/block, descriptor "
          f"{type(engine.descriptor).__name__}; device {args.device}, {dtype}, attention "
          f"{engine.attention_backend}")

    if args.text:
        run = dict(text=text)
    else:
        run = dict(prompt=prompt, prompt_timeline=timeline or None, recache_sink=args.recache_sink)
    if args.image and args.video:
        raise ValueError("give either --image or --video, not both")
    if args.image or args.video:
        run["initial_latents"] = _initial_latents(engine, args.image, args.video)
        print(f"start: {run['initial_latents'].shape[1]} latent frames from {args.image or args.video}")
    start = time.perf_counter()
    result = engine.generate(args.frames, seed=args.seed, batch_size=args.batch, progress=True,
                             video_path=outputs["video"] if engine.vae is not None else None, fps=args.fps, **run)
    elapsed = time.perf_counter() - start
    latents, log = result.latents, result.log_dicts()

    with _replacing(outputs["latents"]) as tmp:
        torch.save({"latents": latents, "config": engine.describe()}, tmp)
    with _replacing(outputs["log"]) as tmp:
        tmp.write_text(json.dumps(log, indent=1))
    active = sum(1 for entry in log if any(entry["selected"]))
    print(f"{len(log)} blocks, {latents.shape[1]} latent frames in {elapsed:.2f} s "
          f"({len(log) / elapsed:.2f} blocks/s); retrieval active in {active} blocks")
    if result.frames is not None:
        b, t, h, w, _ = result.frames.shape
        print(f"wrote {outputs['video']} ({t} frames of {w}x{h} at {args.fps} fps"
              + (f", first stream of {b}" if b > 1 else "") + ")")
    print(f"wrote {outputs['latents']} (latents {list(latents.shape)}) and {outputs['log']}")
    if args.preview:
        from .preview import save_preview_strip
        with _replacing(outputs["preview"]) as tmp:
            save_preview_strip(latents[0], tmp)
        print(f"wrote {outputs['preview']}")
    if args.plot:
        from .preview import plot_retrieval_log
        with _replacing(outputs["plot"]) as tmp:
            plot_retrieval_log(log, tmp)
        print(f"wrote {outputs['plot']}")
    return 0


def _add_serve(sub) -> None:
    memory = MemoryConfig()
    p = sub.add_parser("serve", help="serve streams over WebSocket and HTTP (FastAPI + uvicorn; the built-in tiny "
                                     "demo model without --model-dir)", formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--model-dir", help="a Wan2.1-T2V model directory (see generate) (default: the tiny preset with "
                                       "random weights, text encoder and VAE)")
    p.add_argument("--checkpoint", help="model weights laid over --model-dir or the preset (default: random weights)")
    p.add_argument("--checkpoint-key", help="checkpoint entry (see generate)")
    p.add_argument("--lora", help="LoRA weights merged into --checkpoint (default: none)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the LoRA rank)")
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model shapes without --model-dir")
    p.add_argument("--height", type=int, help="latent frame height with --model-dir (default 60)")
    p.add_argument("--width", type=int, help="latent frame width with --model-dir (default 104)")
    p.add_argument("--encoder", help="retrieval encoder checkpoint for descriptors (default: the spatial mean)")
    p.add_argument("--frames-per-block", type=int, default=memory.frames_per_block,
                   help="latent frames per autoregressive block")
    p.add_argument("--window", type=int, default=memory.window, help="frames in the sliding-window cache")
    p.add_argument("--sink", type=int, default=memory.sink, help="first frames, never evicted from the window")
    p.add_argument("--top-k", type=int, default=memory.top_k,
                   help="most retrieved frames per block a request may ask for")
    p.add_argument("--recency-guard", type=int, default=memory.recency_guard,
                   help="most recently evicted frames that may not be retrieved")
    p.add_argument("--max-history-frames", type=int,
                   help="history frames each stream keeps at most (default: no cap); endless streams (no "
                        "num_frames) need a cap, or top_k 0")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model precision (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES, help="kernel choice (see generate)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS, help="attention backend")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the default noise seed")
    p.add_argument("--max-streams", type=int, default=16, help="streams running at once")
    p.add_argument("--max-batch", type=int, default=8, help="streams sharing one forward")
    p.add_argument("--max-waiting", type=int, default=64, help="requests waiting for a place; more are refused")
    p.add_argument("--queue-blocks", type=int, default=4,
                   help="finished blocks a stream may hold for a slow client before it pauses")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.add_argument("--replicas", type=int, default=0,
                   help="0: one engine in this process; N >= 1: N Ray Serve replicas, one engine each (one GPU each "
                        "with --device cuda), streams pinned to the replica that holds them (pip install -e "
                        "'.[ray]')")
    p.add_argument("--ray-address", help="Ray cluster to join with --replicas (default: RAY_ADDRESS, a running "
                                         "local cluster, else a new local Ray instance)")
    p.set_defaults(func=cmd_serve, text=None)


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise OSError(f'serve needs FastAPI and uvicorn: pip install -e ".[serve]" ({exc})') from None
    from .serving.async_engine import AsyncEngine
    from .serving.server import create_app
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if (args.height or args.width) and not args.model_dir:
        raise ValueError("--height/--width set the latent size of a --model-dir model; presets have their own")
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    memory = MemoryConfig(window=args.window, sink=args.sink, top_k=args.top_k, recency_guard=args.recency_guard,
                          frames_per_block=args.frames_per_block, max_history_frames=args.max_history_frames)
    runtime = RuntimeConfig(device=args.device, dtype=dtype, kernels=args.kernels, attention_backend=args.attention)
    if args.replicas:
        return _serve_ray(args, memory, runtime)
    engine, weights = _build_engine(args, memory, runtime)
    ae = AsyncEngine(engine, max_streams=args.max_streams, max_batch=args.max_batch, max_waiting=args.max_waiting,
                     queue_blocks=args.queue_blocks)
    print(f"lrag-engine serve: {weights}; device {args.device}, {dtype}; up to {args.max_streams} streams, "
          f"{args.max_batch} per forward")
    random_parts = engine.pipeline_is_random
    if random_parts:
        print(f"note: {random_parts} random (seeded, nothing downloaded): streams show what the engine does, not "
              "what a trained model draws")
    print(f"WebSocket ws://{args.host}:{args.port}/v1/stream; HTTP /health, /metrics, POST /v1/generate", flush=True)
    uvicorn.run(create_app(ae), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_ray(args, memory: MemoryConfig, runtime: RuntimeConfig) -> int:
    """``serve --replicas N``: the same server in N Ray Serve replicas."""
    if args.replicas < 0:
        raise ValueError(f"--replicas must be >= 0, got {args.replicas}")
    if args.port == 0:
        raise ValueError("--port 0 cannot be used with --replicas: Ray Serve needs a fixed port")
    try:
        from .serving import ray_app
    except ImportError as exc:
        raise OSError(f'serve --replicas needs Ray Serve: pip install -e ".[ray]" ({exc})') from None
    spec = ray_app.EngineSpec(preset=args.preset, model_dir=args.model_dir, checkpoint=args.checkpoint,
                              checkpoint_key=args.checkpoint_key, lora=args.lora, lora_alpha=args.lora_alpha,
                              encoder=args.encoder, height=args.height, width=args.width, memory=memory,
                              runtime=runtime, random_pipeline=args.model_dir is None, seed=args.seed)
    app = ray_app.build_app(spec, replicas=args.replicas, max_streams=args.max_streams, max_batch=args.max_batch,
                            queue_blocks=args.queue_blocks, max_waiting=args.max_waiting)
    where = "one GPU each" if spec.device_type == "cuda" else "on the CPU"
    print(f"lrag-engine serve: {args.replicas} Ray Serve replica(s), {where}; "
          f"WebSocket ws://{args.host}:{args.port}/v1/stream", flush=True)
    ray_app.run(app, host=args.host, port=args.port, address=args.ray_address, blocking=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrag-engine", description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command")
    _add_generate(sub)
    _add_serve(sub)
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
            message = _flag_names(message, [args.text, args.checkpoint, args.lora, args.encoder, args.out,
                                            args.model_dir, args.image, args.video])
        print(f"lrag-engine: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
