"""Engine: block-by-block generation with LongLive-RAG memory.

    engine = Engine(model=ModelConfig.preset("tiny"), memory=MemoryConfig(), seed=0)
    result = engine.generate(num_frames=48)          # latents [B, T, C, H, W], log
    for block in engine.stream(num_frames=48): ...   # each block as soon as it is done
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .attention.backend import get_backend
from .config import MemoryConfig, ModelConfig, RuntimeConfig
from .memory.cache import RetrievalCache
from .memory.budget import HistoryBudget
from .memory.history import HistoryFullError
from .memory.retrieval import BlockLog, Descriptor, MeanDescriptor
from .models.checkpoint import LoadReport, check_checkpoint_shapes, load_weights
from .models.wan import WanModel
from .ops.rope import RopeTables
from .runtime.graphs import GraphCache
from .schedule import DenoiseSchedule, predict_x0, renoise


class BlockOutput:
    """One finished block.

    latents: [B, F, C, H, W] float32 on the engine's device (``.cpu()`` when needed: the
        engine itself never waits for the device inside the block loop).
    log: the block's retrieval log, read from the device on first access.
    seconds: host time spent enqueueing the block (on CUDA not the device time).
    """

    def __init__(self, block: int, frames: tuple[int, int], latents: torch.Tensor,
                 log: Callable[[], BlockLog], seconds: float) -> None:
        self.block, self.frames, self.latents, self.seconds = block, frames, latents, seconds
        self._log_fn, self._log = log, None

    @property
    def log(self) -> BlockLog:
        if self._log is None:
            self._log = self._log_fn()
        return self._log


@dataclass
class GenerationResult:
    latents: torch.Tensor                      # [B, T, C, H, W] float32, CPU
    log: list[BlockLog] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)

    def log_dicts(self) -> list[dict]:
        return [entry.to_dict() for entry in self.log]


# Frame numbers, history positions and the top-k search's packed candidate index are
# 32-bit, so one run holds fewer than 2**31 frames.
MAX_FRAMES = 2 ** 31 - 1
# What torch.Generator.manual_seed accepts (negative seeds wrap modulo 2**64).
SEED_RANGE = (-2 ** 63, 2 ** 64)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    return seed


def _physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where ``os.sysconf`` cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_tensor(name: str, tensor: torch.Tensor, shape: Sequence[int | None]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf")


class Engine:
    """A Wan-style causal DiT with the sliding-window cache and retrieval memory.

    model: a ModelConfig or the name of a preset ("tiny", "wan2.1-t2v-1.3b").
    checkpoint / lora: weight files (.pt / .safetensors); without a checkpoint the
        weights are random, drawn from ``seed``.
    checkpoint_key: which entry of the checkpoint to load ("generator", "generator_ema",
        "model", "bare"); default: generator_ema, else generator, else model, else bare.
    encoder: a retrieval encoder checkpoint; when given, descriptors come from it
        (``memory.descriptor`` becomes "encoder").
    """

    def __init__(self, model: ModelConfig | str = "tiny", memory: MemoryConfig | None = None,
                 runtime: RuntimeConfig | None = None, checkpoint: str | Path | None = None,
                 lora: str | Path | None = None, lora_alpha: float | None = None,
                 checkpoint_key: str | None = None,
                 encoder: str | Path | None = None, descriptor: Descriptor | None = None,
                 seed: int = 0) -> None:
        self.model_config = ModelConfig.preset(model) if isinstance(model, str) else model
        self.memory = memory or MemoryConfig()
        self.runtime = runtime or RuntimeConfig()
        self.device = torch.device(self.runtime.device)
        self.dtype = self.runtime.torch_dtype
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.runtime.device!r} requested but CUDA is not available")
        self.seed = _check_seed(seed)
        self.graphs: GraphCache | None = None
        self.cache: RetrievalCache | None = None
        self.attention_backend, self.attend = get_backend(self.runtime.attention_backend, self.device, self.dtype)
        if self.runtime.cuda_graphs and self.runtime.retrieval_fetch == "per_forward":
            raise ValueError("RuntimeConfig: cuda_graphs cannot be combined with retrieval_fetch='per_forward' "
                             "(the baseline reads host memory inside every forward)")
        if self.runtime.cuda_graphs and self.device.type != "cuda":
            warnings.warn(f"cuda_graphs=True on {self.device}: CUDA graphs need a CUDA device; running the "
                          "same static-buffer forwards eagerly", stacklevel=2)
        if lora is not None and checkpoint is None:
            raise ValueError("a LoRA file needs a base checkpoint (checkpoint=...)")
        if encoder is not None and descriptor is not None:
            raise ValueError("give either encoder= (a checkpoint) or descriptor= (a callable), not both")
        if self.memory.descriptor == "encoder" and encoder is None and descriptor is None:
            raise ValueError("MemoryConfig.descriptor='encoder' needs an encoder checkpoint (encoder=...)")

        # Files are checked before the model is built (seconds at 1.3B): the encoder
        # whole, the checkpoint's shapes from its header.
        if encoder is not None:
            from .encoder.descriptor import EncoderDescriptor
            descriptor = EncoderDescriptor.from_checkpoint(encoder, device=self.device)
            self.memory = dataclasses.replace(self.memory, descriptor="encoder")
        self.descriptor = descriptor or MeanDescriptor(self.model_config.in_channels)
        dim = getattr(self.descriptor, "dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"descriptor must have a positive int .dim, got {dim!r}")
        if checkpoint is not None:
            check_checkpoint_shapes(checkpoint, self.model_config, key=checkpoint_key)

        self.model = WanModel(self.model_config, dtype=self.dtype, device=self.device,
                              attention_backend=self.attend, seed=seed).eval()
        self.model.check_finite = False   # inputs are validated once in _prepare
        self.load_report: LoadReport | None = None
        if checkpoint is not None:
            self.load_report = load_weights(self.model, checkpoint, lora_path=lora, lora_alpha=lora_alpha,
                                            key=checkpoint_key)

        cfg = self.model_config
        self.tables = RopeTables.build(cfg.head_dim, cfg.height // cfg.patch_size[1],
                                       cfg.width // cfg.patch_size[2], max_frames=self.memory.window,
                                       device=self.device)
        self.schedule = DenoiseSchedule.from_steps(self.runtime.denoising_steps, self.runtime.shift,
                                                   self.runtime.num_train_timesteps)

    # ------------------------------------------------------------------ inputs
    def default_text(self, batch: int = 1) -> torch.Tensor:
        """The built-in text embedding: fixed standard-normal ``[B, text_len, text_dim]``
        drawn from seed 0 (the same for every stream), for demos without a text encoder."""
        g = torch.Generator().manual_seed(0)
        cfg = self.model_config
        text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
        return text.expand(batch, -1, -1).clone()

    def _prepare(self, num_frames: int, text, noise, renoise_list, seed, batch_size, keep_output: bool):
        """Validate a run's inputs, allocating nothing proportional to ``num_frames``.

        keep_output: the run's whole output is kept (``generate``), so it must fit in memory.
        """
        cfg, mem = self.model_config, self.memory
        frames_per_block = mem.frames_per_block
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0 \
                or num_frames % frames_per_block:
            raise ValueError(f"num_frames must be a positive multiple of frames_per_block "
                             f"({frames_per_block}), got {num_frames!r}")
        if num_frames > MAX_FRAMES:
            raise ValueError(f"num_frames must be <= {MAX_FRAMES} (frame numbers are 32-bit), got {num_frames}")
        batch = batch_size
        for tensor in (noise, text):
            if tensor is not None and isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
                batch = tensor.shape[0] if batch is None else batch
        batch = 1 if batch is None else batch
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch!r}")
        latent_shape = (cfg.in_channels, cfg.height, cfg.width)
        if keep_output:
            self._check_output_fits(batch, num_frames)
        if noise is not None:
            _check_tensor("noise", noise, (batch, num_frames, *latent_shape))
        if text is None:
            text = self.default_text(batch)
        _check_tensor("text", text, (batch, None, cfg.text_dim))
        if not 1 <= text.shape[1] <= cfg.text_len:
            raise ValueError(f"text must have 1..text_len={cfg.text_len} tokens, got {text.shape[1]}")
        num_blocks = num_frames // frames_per_block
        steps = len(self.schedule)
        if renoise_list is not None:
            renoise_list = list(renoise_list)
            want = num_blocks * (steps - 1)
            if len(renoise_list) != want:
                raise ValueError(f"renoise must hold {want} tensors ({num_blocks} blocks x {steps - 1} "
                                 f"non-final steps), got {len(renoise_list)}")
            for i, r in enumerate(renoise_list):
                _check_tensor(f"renoise[{i}]", r, (batch, frames_per_block, *latent_shape))
        seed = self.seed if seed is None else _check_seed(seed)
        self._check_history_budget(num_frames, batch)
        # The noise rule of ``stream``. The re-noise generator gets a seed of its own: on the
        # CPU two generators seeded alike would re-noise with the initial noise itself.
        noise_generator = torch.Generator().manual_seed(seed)
        renoise_seed = int(torch.randint(2 ** 63 - 1, (), generator=noise_generator))
        generator = torch.Generator(self.device).manual_seed(renoise_seed)
        block_noise = self._block_noise(batch, num_blocks, noise, noise_generator)
        return batch, num_blocks, text, block_noise, renoise_list, generator

    def _check_output_fits(self, batch: int, num_frames: int) -> None:
        """The float32 output [B, T, C, H, W] must fit in physical memory, and on CUDA also in
        the device's memory, where the finished blocks wait until the run ends."""
        cfg = self.model_config
        shape = [batch, num_frames, cfg.in_channels, cfg.height, cfg.width]
        need = math.prod(shape) * 4
        limits = {"physical memory": _physical_memory_bytes()}
        if self.device.type == "cuda":
            limits["device memory"] = torch.cuda.get_device_properties(self.device).total_memory
        for where, limit in limits.items():
            if limit is not None and need > limit:
                raise ValueError(f"num_frames={num_frames} (batch {batch}): the float32 output {shape} needs "
                                 f"{need} bytes, more than the {limit} bytes of {where}; generate fewer "
                                 "frames, or use stream() and keep only what is needed of each block")

    def _block_noise(self, batch: int, num_blocks: int, noise: torch.Tensor | None,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
        """The initial noise [B, F, C, H, W] of each block in order, on the device: slices of
        ``noise`` (copied to the device once), else drawn block by block from ``generator``."""
        cfg, f = self.model_config, self.memory.frames_per_block
        if noise is not None:
            # One copy up front: per-block copies from pageable host memory would stall the loop.
            noise = noise.to(self.device, torch.float32)
            for block in range(num_blocks):
                yield noise[:, block * f:(block + 1) * f]
            return
        # A copy from pinned memory runs asynchronously; a pageable one would stall the host.
        pinned = self.device.type == "cuda"
        for _ in range(num_blocks):
            drawn = torch.randn(batch, f, cfg.in_channels, cfg.height, cfg.width, generator=generator,
                                pin_memory=pinned)
            yield drawn.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ generation
    def stream(self, num_frames: int, text: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               renoise: Sequence[torch.Tensor] | None = None, seed: int | None = None,
               batch_size: int | None = None) -> Iterator[BlockOutput]:
        """Generate ``num_frames`` latent frames, yielding each block when it is finished.

        num_frames: a positive multiple of ``frames_per_block`` F, at most ``MAX_FRAMES``
        (2**31 - 1: frame numbers are 32-bit). text [B, L, text_dim] (L <= text_len; default:
        ``default_text``), noise [B, T, C, H, W] (default: drawn from ``seed``), renoise: one
        [B, F, C, H, W] per block and non-final step, block-major (default: drawn from ``seed``).
        seed: an int in [-2**63, 2**64) (default: the engine's). All inputs are validated
        before any work starts.

        Noise rule: a CPU ``torch.Generator`` seeded with ``seed`` first draws the seed of
        the re-noise generator (``torch.randint(2**63 - 1, ())``), then, unless ``noise`` is
        given, the initial noise of each block just before the block runs, one
        ``torch.randn(B, F, C, H, W)`` after another. So the initial noise is the same on
        every device, a long run never holds more than one block of it, and the blocks of a
        run are a prefix of those of a longer run with the same seed and batch. Without
        ``renoise`` the re-noise is drawn on the engine's device from that second generator,
        one ``[B, F, C, H, W]`` per block and non-final step, in order.
        """
        batch, num_blocks, text, block_noise, renoise_list, generator = self._prepare(
            num_frames, text, noise, renoise, seed, batch_size, keep_output=False)
        return self._run(batch, num_blocks, text, block_noise, renoise_list, generator)

    def _check_history_budget(self, num_frames: int, batch: int) -> None:
        """A history budget that cannot hold one block's evictions, or (overflow_policy
        "error") the run's whole history, fails before any work, not minutes into it."""
        mem, cfg = self.memory, self.model_config
        if mem.top_k == 0:
            return   # native mode keeps no history
        budget = HistoryBudget.plan(mem, cfg.num_layers, batch, cfg.tokens_per_frame, cfg.num_heads,
                                    cfg.head_dim, self.dtype,
                                    host_only=self.runtime.retrieval_fetch == "per_forward")
        capacity = budget.capacity_frames
        if capacity is None:
            return
        host_only = mem.history_tier == "host" or self.runtime.retrieval_fetch == "per_forward"
        names = "host_budget_bytes" if host_only else "gpu_budget_bytes/host_budget_bytes"
        if capacity < mem.frames_per_block:
            raise ValueError(
                f"MemoryConfig.{names}: the history budgets hold {capacity} frames of {budget.frame_bytes} bytes "
                f"(batch {batch}), fewer than the {mem.frames_per_block} frames one block evicts; give at least "
                f"{mem.frames_per_block * budget.frame_bytes} bytes")
        resident = max(mem.top_k, mem.frames_per_block)
        if budget.host_bytes is not None and budget.gpu_frames < resident:
            raise ValueError(
                f"MemoryConfig.gpu_budget_bytes={mem.gpu_budget_bytes} holds {budget.gpu_frames} frames of "
                f"{budget.frame_bytes} bytes (batch {batch}), but the {mem.top_k} retrieved frames and the "
                f"{mem.frames_per_block} evicted frames of a block must each fit on the device at once; give at "
                f"least {resident * budget.frame_bytes} bytes, or use history_tier='host'")
        needed = max(0, num_frames - mem.window)
        if mem.overflow_policy == "error" and needed > capacity:
            raise HistoryFullError(
                f"{num_frames} frames evict {needed} frames into the history, but the budgets hold "
                f"{capacity} frames of {budget.frame_bytes} bytes; raise {names}, "
                "generate fewer frames, or set overflow_policy='drop_oldest'")

    def _forward(self, cache: RetrievalCache, graphs: GraphCache | None, seen: set[tuple], x: torch.Tensor,
                 t: torch.Tensor, cross_kv, recache: bool) -> torch.Tensor:
        attention = cache.attention(recache=recache)
        if graphs is None or cache.signature not in seen:
            # A shape seen for the first time (the blocks before the window fills) runs
            # eagerly; from its second block on it gets a static forward.
            return self.model(x, t, cross_kv, attention)
        forward = graphs.get((cache.signature, recache),
                             lambda x, t: self.model(x, t, cross_kv, attention))
        return forward(x=x, t=t)

    def _run(self, batch, num_blocks, text, block_noise, renoise_list, generator) -> Iterator[BlockOutput]:
        cfg, mem, rt = self.model_config, self.memory, self.runtime
        f = mem.frames_per_block
        refetch = rt.retrieval_fetch == "per_forward"
        cache = RetrievalCache(mem, cfg.num_layers, batch, cfg.tokens_per_frame, cfg.num_heads,
                               cfg.head_dim, self.descriptor, self.tables, self.attend, self.dtype,
                               self.device, kernels=rt.kernels, refetch_per_forward=refetch)
        self.cache = cache   # the last run's memory, for inspection
        graphs = GraphCache(capture=self.device.type == "cuda") if rt.cuda_graphs else None
        self.graphs = graphs   # the last run's static forwards, for inspection
        seen: set[tuple] = set()   # context signatures already run once (eagerly)
        with torch.inference_mode():
            cross_kv = self.model.encode_text(text.to(self.device, self.dtype))
        sigmas = self.schedule.sigmas
        step_t = [torch.full((batch, f), t, device=self.device) for t in self.schedule.timesteps]
        zero_t = torch.zeros(batch, f, device=self.device)
        # One copy of the given re-noise to the device up front: per-block copies from
        # pageable host memory would stall the host inside the loop.
        if renoise_list is not None:
            renoise_list = [r.to(self.device, torch.float32) for r in renoise_list]
        renoise_iter = iter(renoise_list) if renoise_list is not None else None
        latent_shape = (cfg.in_channels, cfg.height, cfg.width)

        try:
            for block in range(num_blocks):
                start = time.perf_counter()
                with torch.inference_mode():
                    log = cache.begin_block(f)
                    x = next(block_noise)
                    for i, sigma in enumerate(sigmas):
                        flow = self._forward(cache, graphs, seen, x, step_t[i], cross_kv, recache=False)
                        x0 = predict_x0(x, flow, sigma)
                        if i + 1 < len(sigmas):
                            if renoise_iter is not None:
                                fresh = next(renoise_iter)
                            else:
                                fresh = torch.randn(batch, f, *latent_shape, generator=generator,
                                                    device=self.device)
                            x = renoise(x0, fresh, sigmas[i + 1])
                    cache.end_block(x0)
                    self._forward(cache, graphs, seen, x0, zero_t, cross_kv, recache=True)
                    seen.add(cache.signature)
                    if block + 1 < num_blocks:
                        cache.start_retrieval()   # overlaps with the recache pass on CUDA
                yield BlockOutput(block, (block * f, (block + 1) * f), x0, log, time.perf_counter() - start)
        finally:
            cache.close()   # a consumer may stop early; settle the side stream first

    def generate(self, num_frames: int, text: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 renoise: Sequence[torch.Tensor] | None = None, seed: int | None = None,
                 batch_size: int | None = None, progress: bool = False) -> GenerationResult:
        """Generate a whole video; see ``stream`` for the arguments.

        Returns latents [B, T, C, H, W] (float32, CPU) and the per-block retrieval log: the
        blocks ``stream`` yields for the same arguments. The whole output is kept, so a
        ``num_frames`` whose float32 output [B, T, C, H, W] exceeds the physical memory (on
        CUDA also the device memory, which holds the blocks until the end) is a ValueError
        before any work.
        """
        blocks = self._run(*self._prepare(num_frames, text, noise, renoise, seed, batch_size, keep_output=True))
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=num_frames // self.memory.frames_per_block, unit="block", desc="generate")
        outputs: list[BlockOutput] = []
        try:
            for out in blocks:
                outputs.append(out)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()   # ends its line, so an error message does not share it
        latents = torch.cat([o.latents for o in outputs], dim=1).to("cpu", torch.float32)
        return GenerationResult(latents, [o.log for o in outputs], [o.seconds for o in outputs])

    def describe(self) -> dict:
        """A summary of what this engine runs (printed by the CLI)."""
        return {
            "model": self.model_config.to_dict(),
            "memory": vars(self.memory).copy(),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention_backend": self.attention_backend,
            "kernels": self.runtime.kernels,
            "cuda_graphs": self.runtime.cuda_graphs,
            "retrieval_fetch": self.runtime.retrieval_fetch,
            "timesteps": list(self.schedule.timesteps),
            "descriptor": type(self.descriptor).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
