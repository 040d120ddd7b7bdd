"""Engine: block-by-block generation with LongLive-RAG memory.

    engine = Engine(model=ModelConfig.preset("tiny"), memory=MemoryConfig(), seed=0)
    result = engine.generate(num_frames=48)          # latents [B, T, C, H, W], log
    for block in engine.stream(num_frames=48): ...   # each block as soon as it is done
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .attention.backend import get_backend
from .config import MemoryConfig, ModelConfig, RuntimeConfig
from .memory.cache import RetrievalCache
from .memory.history import HistoryFullError
from .memory.retrieval import BlockLog, Descriptor, MeanDescriptor
from .models.checkpoint import LoadReport, load_weights
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
        self.seed = seed
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

        self.model = WanModel(self.model_config, dtype=self.dtype, device=self.device,
                              attention_backend=self.attend, seed=seed).eval()
        self.model.check_finite = False   # inputs are validated once in _prepare
        self.load_report: LoadReport | None = None
        if checkpoint is not None:
            self.load_report = load_weights(self.model, checkpoint, lora_path=lora, lora_alpha=lora_alpha,
                                            key=checkpoint_key)

        if encoder is not None:
            from .encoder.descriptor import EncoderDescriptor
            descriptor = EncoderDescriptor.from_checkpoint(encoder, device=self.device)
            self.memory = dataclasses.replace(self.memory, descriptor="encoder")
        self.descriptor = descriptor or MeanDescriptor(self.model_config.in_channels)
        dim = getattr(self.descriptor, "dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"descriptor must have a positive int .dim, got {dim!r}")

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

    def _prepare(self, num_frames: int, text, noise, renoise_list, seed, batch_size):
        cfg, mem = self.model_config, self.memory
        frames_per_block = mem.frames_per_block
        if not isinstance(num_frames, int) or num_frames <= 0 or num_frames % frames_per_block:
            raise ValueError(f"num_frames must be a positive multiple of frames_per_block "
                             f"({frames_per_block}), got {num_frames!r}")
        batch = batch_size
        for tensor in (noise, text):
            if tensor is not None and isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
                batch = tensor.shape[0] if batch is None else batch
        batch = 1 if batch is None else batch
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch!r}")
        latent_shape = (cfg.in_channels, cfg.height, cfg.width)
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
        seed = self.seed if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self._check_history_budget(num_frames, batch)
        if noise is None:
            # Initial noise from a CPU generator: the same initial noise on every device type.
            noise = torch.randn(batch, num_frames, *latent_shape, generator=torch.Generator().manual_seed(seed))
        # Re-noise is drawn where it is used, so the block loop never copies from the host.
        generator = torch.Generator(self.device).manual_seed(seed)
        return batch, num_blocks, text, noise, renoise_list, generator

    # ------------------------------------------------------------------ generation
    def stream(self, num_frames: int, text: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               renoise: Sequence[torch.Tensor] | None = None, seed: int | None = None,
               batch_size: int | None = None) -> Iterator[BlockOutput]:
        """Generate ``num_frames`` latent frames, yielding each block when it is finished.

        text [B, L, text_dim] (L <= text_len; default: ``default_text``), noise
        [B, T, C, H, W] (default: drawn from ``seed``), renoise: one [B, F, C, H, W]
        per block and non-final step, block-major (default: drawn from ``seed``).
        All inputs are validated before any work starts.
        """
        batch, num_blocks, text, noise, renoise_list, generator = self._prepare(
            num_frames, text, noise, renoise, seed, batch_size)
        return self._run(batch, num_blocks, text, noise, renoise_list, generator)

    def _check_history_budget(self, num_frames: int, batch: int) -> None:
        """With overflow_policy="error", a run whose history cannot fit the budgets fails
        before any work, not minutes into it."""
        mem, cfg = self.memory, self.model_config
        budgets = [b for b in (mem.gpu_budget_bytes, mem.host_budget_bytes) if b is not None]
        if mem.top_k == 0 or mem.overflow_policy != "error" or not budgets:
            return
        frame_bytes = 2 * cfg.num_layers * batch * cfg.tokens_per_frame * cfg.dim * self.dtype.itemsize
        if mem.history_tier == "host":   # the host tier plus the device staging pool
            capacity = mem.host_budget_bytes // frame_bytes + mem.top_k + mem.frames_per_block
        elif mem.host_budget_bytes is not None:
            capacity = sum(budgets) // frame_bytes
        else:
            capacity = mem.gpu_budget_bytes // frame_bytes
        needed = max(0, num_frames - mem.window)
        if needed > capacity:
            raise HistoryFullError(
                f"{num_frames} frames evict {needed} frames into the history, but the budgets hold "
                f"{capacity} frames of {frame_bytes} bytes; raise gpu_budget_bytes/host_budget_bytes, "
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

    def _run(self, batch, num_blocks, text, noise, renoise_list, generator) -> Iterator[BlockOutput]:
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
        # One copy of the inputs to the device up front: per-block copies from pageable
        # host memory would stall the host inside the loop.
        noise = noise.to(self.device, torch.float32)
        if renoise_list is not None:
            renoise_list = [r.to(self.device, torch.float32) for r in renoise_list]
        renoise_iter = iter(renoise_list) if renoise_list is not None else None
        latent_shape = noise.shape[2:]

        try:
            for block in range(num_blocks):
                start = time.perf_counter()
                with torch.inference_mode():
                    log = cache.begin_block(f)
                    x = noise[:, block * f:(block + 1) * f]
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

        Returns latents [B, T, C, H, W] (float32, CPU) and the per-block retrieval log.
        """
        blocks = self.stream(num_frames, text, noise, renoise, seed, batch_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=num_frames // self.memory.frames_per_block, unit="block", desc="generate")
        outputs: list[BlockOutput] = []
        for out in blocks:
            outputs.append(out)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
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
