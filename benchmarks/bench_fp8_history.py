"""The error an FP8 (e4m3) history adds: latents and retrieval of a run with
``history_dtype="fp8_e4m3"`` against the same run with the history in the compute dtype.

Two settings, 64 blocks each (``--blocks``):

- "tiny preset": ``Engine("tiny")`` with its default memory (SPEC defaults) and seed,
  in float32 and in bfloat16;
- "oracle settings": the engine-vs-oracle test inputs of ``tests/oracle/test_oracle.py``
  (its random Wan-named weights, noise with a per-frame channel offset, text and
  re-noise, window 12, sink 1, top_k 6, recency guard 5, 3 frames per block), float32.

Reported per setting: mean and max absolute difference of the latents (over all frames
and over the last block), the blocks whose retrieved frames differ, and the history
bytes per frame of both storages (batch 1). Writes a JSON report.

    python -m benchmarks.bench_fp8_history --out benchmarks/results/fp8-history-cpu-2026-12-02.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from lrag_engine import Engine, MemoryConfig
from lrag_engine.bench.timing import torch_threads
from lrag_engine.config import ModelConfig, RuntimeConfig
from lrag_engine.memory.budget import HistoryBudget

ORACLE_DIR = Path(__file__).resolve().parent.parent / "tests" / "oracle"


def compare(base, fp8, frames_per_block: int) -> dict:
    diff = (base.latents.float() - fp8.latents.float()).abs()
    last = diff[:, -frames_per_block:]
    changed = [i for i, (a, b) in enumerate(zip(base.log, fp8.log)) if a.selected != b.selected]
    return dict(mean_abs_diff=float(diff.mean()), max_abs_diff=float(diff.max()),
                last_block_mean_abs_diff=float(last.mean()), last_block_max_abs_diff=float(last.max()),
                latent_abs_mean=float(base.latents.float().abs().mean()),
                blocks=len(base.log), blocks_with_changed_retrieval=len(changed),
                first_changed_block=changed[0] if changed else None,
                retrieved_frames_per_block=len(base.log[-1].selected[0]))


def frame_bytes(memory: MemoryConfig, cfg: ModelConfig, dtype: torch.dtype) -> dict:
    def per_frame(history_dtype):
        m = MemoryConfig(**{**memory.__dict__, "history_dtype": history_dtype})
        return HistoryBudget.plan(m, cfg.num_layers, 1, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim,
                                  dtype).frame_bytes
    return {"compute_dtype": per_frame(None), "fp8_e4m3": per_frame("fp8_e4m3")}


def tiny_preset(blocks: int, dtype: str) -> tuple[dict, object]:
    runs = {}
    for history_dtype in (None, "fp8_e4m3"):
        engine = Engine("tiny", memory=MemoryConfig(history_dtype=history_dtype),
                        runtime=RuntimeConfig(dtype=dtype), seed=0)
        runs[history_dtype] = engine.generate(num_frames=blocks * engine.memory.frames_per_block)
    memory = MemoryConfig()
    row = dict(setting=f"tiny preset, {dtype}", **compare(runs[None], runs["fp8_e4m3"], memory.frames_per_block),
               history_bytes_per_frame=frame_bytes(memory, ModelConfig.preset("tiny"), engine.dtype))
    return row, runs[None]


def _load(name: str, path: Path):
    """A module of the oracle tests by file (they are not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def oracle_settings(blocks: int, seed: int) -> dict:
    _load("naive", ORACLE_DIR / "naive.py")   # what test_oracle imports
    oracle = _load("test_oracle", ORACLE_DIR / "test_oracle.py")
    STEPS, TINY, Setting, make_inputs = oracle.STEPS, oracle.TINY, oracle.Setting, oracle.make_inputs

    setting = Setting(blocks=blocks)
    state, noise, text, renoise = make_inputs(setting, seed)
    runs = {}
    for history_dtype in (None, "fp8_e4m3"):
        memory = MemoryConfig(**{**setting.memory().__dict__, "history_dtype": history_dtype})
        engine = Engine(model=TINY, memory=memory,
                        runtime=RuntimeConfig(dtype="float32", denoising_steps=STEPS, shift=5.0), seed=0)
        engine.model.load_state_dict(state)
        runs[history_dtype] = engine.generate(num_frames=noise.shape[1], text=text, noise=noise, renoise=renoise)
    return dict(setting=f"oracle test settings (seed {seed}), float32",
                **compare(runs[None], runs["fp8_e4m3"], setting.frames_per_block),
                history_bytes_per_frame=frame_bytes(setting.memory(), TINY, torch.float32))


def wan_bytes() -> dict:
    cfg = ModelConfig.preset("wan2.1-t2v-1.3b")
    return frame_bytes(MemoryConfig(), cfg, torch.bfloat16)


def main(argv: list[str] | None = None) -> dict:
    with torch_threads(None):   # _main sets one thread; the caller's count comes back
        return _main(argv)


def _main(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the oracle-settings inputs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fp32, base32 = tiny_preset(args.blocks, "float32")
    bf16, base16 = tiny_preset(args.blocks, "bfloat16")
    scale = compare(base32, base16, MemoryConfig().frames_per_block)
    report = dict(benchmark="bench_fp8_history", blocks=args.blocks,
                  results=[fp32, bf16, oracle_settings(args.blocks, args.seed)],
                  # for scale: the same tiny run in float32 vs bfloat16 compute, both with the default history
                  for_scale_float32_vs_bfloat16_compute=scale,
                  wan_1_3b_history_bytes_per_frame_bf16_compute=wan_bytes())
    for row in report["results"]:
        print(f"{row['setting']}: mean |d| {row['mean_abs_diff']:.2e}, max |d| {row['max_abs_diff']:.2e} "
              f"(latents |x| {row['latent_abs_mean']:.2f}); retrieval changed in "
              f"{row['blocks_with_changed_retrieval']}/{row['blocks']} blocks; bytes/frame "
              f"{row['history_bytes_per_frame']}", flush=True)
    print(f"for scale, float32 vs bfloat16 compute (default history): mean |d| {scale['mean_abs_diff']:.2e}, "
          f"max |d| {scale['max_abs_diff']:.2e}; retrieval changed in {scale['blocks_with_changed_retrieval']}/"
          f"{scale['blocks']} blocks", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
