"""Engine: block-by-block generation with LongLive-RAG memory.

    engine = Engine(model=ModelConfig.preset("tiny"), memory=MemoryConfig(), seed=0)
    result = engine.generate(num_frames=48)          # latents [B, T, C, H, W], log
    for block in engine.stream(num_frames=48): ...   # each block as soon as it is done
    with engine.session(seed=1) as s: s.step()       # one stream, block by block
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from . import checks
from .attention.backend import get_backend
from .checks import MAX_FRAMES, check_seed  # noqa: F401  (MAX_FRAMES is part of the API)
from .config import MemoryConfig, ModelConfig, RuntimeConfig
from .memory.budget import HistoryBudget
from .memory.workspace import Workspace, make_page_pool
from .memory.history import PagePool
from .memory.page_table import page_table_kind
from .memory.retrieval import BlockLog, Descriptor, MeanDescriptor
from .models.checkpoint import LoadReport, check_checkpoint_shapes, load_weights
from .models.wan import WanModel
from .ops.rope import RopeTables
from .runtime.graphs import GraphCache
from .schedule import DenoiseSchedule
from .session import BlockOutput, Session


@dataclass
class GenerationResult:
    latents: torch.Tensor                      # [B, T, C, H, W] float32, CPU
    log: list[BlockLog] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    frames: torch.Tensor | None = None         # [B, T', H, W, 3] uint8 video frames, CPU (with a VAE)

    def log_dicts(self) -> list[dict]:
        return [entry.to_dict() for entry in self.log]


class Engine:
    """What generations share: a Wan-style causal DiT and its weights, RoPE tables, kernel
    choice, attention backend, static (CUDA-graph) forwards and the history page pool.
    Per-stream state lives in :class:`~lrag_engine.session.Session` (``engine.session``);
    ``generate`` and ``stream`` run one session each.

    model: a ModelConfig, the name of a preset ("tiny", "wan2.1-t2v-1.3b"), or an
        already-built ``WanModel`` (used as is: building engines with other options around
        one model never reloads weights; see also :meth:`from_model`).
    checkpoint / lora: weight files (.pt / .safetensors); without a checkpoint the
        weights are random, drawn from ``seed``.
    checkpoint_key: which entry of the checkpoint to load ("generator", "generator_ema",
        "model", "bare"); default: generator_ema, else generator, else model, else bare.
    encoder: a retrieval encoder checkpoint; when given, descriptors come from it
        (``memory.descriptor`` becomes "encoder").
    memory: the engine's memory rules; ``top_k`` is the most a session may ask for.
    """

    def __init__(self, model: ModelConfig | str | WanModel = "tiny", memory: MemoryConfig | None = None,
                 runtime: RuntimeConfig | None = None, checkpoint: str | Path | None = None,
                 lora: str | Path | None = None, lora_alpha: float | None = None,
                 checkpoint_key: str | None = None,
                 encoder: str | Path | None = None, descriptor: Descriptor | None = None,
                 seed: int = 0) -> None:
        built = model if isinstance(model, torch.nn.Module) else None
        if built is not None:
            if not isinstance(getattr(built, "config", None), ModelConfig):
                raise TypeError(f"model must be a WanModel (a module with a ModelConfig .config), got "
                                f"{type(built).__name__}")
            runtime = checks.runtime_for_weights(built.device, built.dtype, runtime)
            if checkpoint is not None or lora is not None:
                raise ValueError("checkpoint/lora load weights into a model the engine builds; for an "
                                 "already-built WanModel load them first (lrag_engine.models.checkpoint."
                                 "load_weights) or pass a ModelConfig")
            self.model_config = built.config
        elif isinstance(model, ModelConfig):
            self.model_config = model
        elif isinstance(model, str):
            self.model_config = ModelConfig.preset(model)
        else:
            raise TypeError(f"model must be a ModelConfig, a preset name or a WanModel, got {type(model).__name__}")
        self.memory = memory or MemoryConfig()
        self.runtime = runtime or RuntimeConfig()
        self.device = torch.device(self.runtime.device)
        self.dtype = self.runtime.torch_dtype
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.runtime.device!r} requested but CUDA is not available")
        self.seed = check_seed(seed)
        self.page_table = self.runtime.page_table
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

        self.load_report: LoadReport | None = None
        if built is not None:
            self.model = built.eval()
        else:
            self.model = WanModel(self.model_config, dtype=self.dtype, device=self.device,
                                  attention_backend=self.attend, seed=seed).eval()
            if checkpoint is not None:
                self.load_report = load_weights(self.model, checkpoint, lora_path=lora, lora_alpha=lora_alpha,
                                                key=checkpoint_key)
        self.model.check_finite = False   # inputs are validated once, before a run

        cfg = self.model_config
        self.tables = RopeTables.build(cfg.head_dim, cfg.height // cfg.patch_size[1],
                                       cfg.width // cfg.patch_size[2], max_frames=self.memory.window,
                                       device=self.device)
        self.schedule = DenoiseSchedule.from_steps(self.runtime.denoising_steps, self.runtime.shift,
                                                   self.runtime.num_train_timesteps)
        # Shared by every session: static forwards by signature, workspaces by batch size,
        # and the history page pool (made when a session first needs it).
        self.graphs: GraphCache | None = \
            GraphCache(capture=self.device.type == "cuda") if self.runtime.cuda_graphs else None
        self._workspaces: dict[int, Workspace] = {}
        # Slots for the text encoder (prompts -> text embeddings) and the VAE (latents ->
        # pixels); empty until a pipeline fills them: runs take text embeddings and
        # return latents.
        self.text_encoder = None
        self.vae = None
        self._random_parts: list[str] = []
        self._pool: PagePool | None = None
        self.last_session: Session | None = None

    @classmethod
    def from_model(cls, model: WanModel, memory: MemoryConfig | None = None, runtime: RuntimeConfig | None = None,
                   **options) -> "Engine":
        """An engine around an already-built ``WanModel`` (its weights are used as they
        are). ``runtime`` defaults to the model's device and dtype; options: those of
        the constructor other than checkpoint/lora."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Engine.from_model needs a WanModel, got {type(model).__name__}")
        return cls(model, memory=memory, runtime=runtime, **options)

    # ------------------------------------------------------------------ pipeline parts
    @classmethod
    def from_pretrained(cls, path: str | Path, memory: MemoryConfig | None = None,
                        runtime: RuntimeConfig | None = None, checkpoint: str | Path | None = None,
                        lora: str | Path | None = None, lora_alpha: float | None = None,
                        checkpoint_key: str | None = None, height: int | None = None, width: int | None = None,
                        text_len: int | None = None, **options) -> "Engine":
        """An engine with the DiT, UMT5 text encoder, tokenizer and VAE of a Wan2.1-T2V model
        directory, original or diffusers layout (:func:`lrag_engine.pipeline.pretrained.find_parts`;
        a missing part is one error listing what was found). ``checkpoint`` (a causal
        generator: Self-Forcing, Causal-Forcing, LongLive) and ``lora`` are laid over the
        directory's DiT weights. height / width: latent frame size (default 60 x 104).
        text_len: text positions (default: the original config.json's text_len, else 512).
        options: the constructor's other options (encoder, descriptor, seed)."""
        from .pipeline.pretrained import find_parts, original_vae_config
        from .pipeline.text import TextEncoder
        from .pipeline.vae import WanVAE

        parts = find_parts(path)
        config = ModelConfig.from_json(parts.config, height=height, width=width, text_len=text_len)
        base_lora = None if checkpoint is not None else lora
        engine = cls(config, memory, runtime, checkpoint=parts.transformer, lora=base_lora,
                     lora_alpha=lora_alpha if base_lora else None, **options)
        if checkpoint is not None:
            check_checkpoint_shapes(checkpoint, config, key=checkpoint_key)
            engine.load_report = load_weights(engine.model, checkpoint, lora_path=lora, lora_alpha=lora_alpha,
                                              key=checkpoint_key)
        on = dict(device=engine.device, dtype=engine.dtype)
        if parts.layout == "diffusers":
            engine.text_encoder = TextEncoder.from_diffusers(parts.root, text_len=config.text_len, **on)
            engine.vae = WanVAE.from_diffusers(parts.vae, device=engine.device)
        else:
            engine.text_encoder = TextEncoder.from_original(parts.text_encoder, parts.tokenizer,
                                                            text_len=config.text_len, **on)
            engine.vae = WanVAE.from_original(parts.vae, config=original_vae_config(parts.vae), device=engine.device)
        return engine

    def attach_random_pipeline(self, seed: int = 0) -> None:
        """A tiny random-config UMT5 text encoder (with a tokenizer built in code) and a tiny
        random Wan VAE, seeded: the offline demo's prompt-to-mp4 path, nothing downloaded."""
        from .pipeline.text import TextEncoder
        from .pipeline.vae import WanVAE

        cfg = self.model_config
        self.text_encoder = TextEncoder.random(seed=seed, text_dim=cfg.text_dim, text_len=cfg.text_len,
                                               device=self.device)
        self.vae = WanVAE.random(seed=seed, device=self.device)
        self._random_parts = ["text encoder", "VAE"]

    @property
    def pipeline_is_random(self) -> str:
        """What of this engine is random: "" when everything was loaded."""
        parts = ([] if self.load_report is not None else ["DiT weights"]) + self._random_parts
        if not parts:
            return ""
        return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + \
            (" are" if len(parts) > 1 else " is")

    def encode_prompts(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text strings (one per stream) -> text embeddings [B, text_len, text_dim]."""
        if self.text_encoder is None:
            raise ValueError("prompt needs a text encoder: use Engine.from_pretrained(model_dir) or "
                             "attach_random_pipeline(), or pass text embeddings (text=)")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or a list of them, got {prompts!r}")
        return self.text_encoder.encode(list(prompts))

    def _prompt_texts(self, prompt, prompt_timeline, text, text_timeline):
        if prompt is not None:
            if text is not None:
                raise ValueError("give either prompt= (strings) or text= (embeddings), not both")
            text = self.encode_prompts(prompt)
        if prompt_timeline is not None:
            if text_timeline is not None:
                raise ValueError("give either prompt_timeline= or text_timeline=, not both")
            if not isinstance(prompt_timeline, Mapping):
                raise TypeError(f"prompt_timeline must be a mapping {{block index: prompt}}, got "
                                f"{type(prompt_timeline).__name__}")
            text_timeline = {block: self.encode_prompts(p) for block, p in prompt_timeline.items()}
            if text is not None and text.shape[0] > 1:
                text_timeline = {b: t.expand(text.shape[0], -1, -1) if t.shape[0] == 1 else t
                                 for b, t in text_timeline.items()}
        return text, text_timeline

    # ------------------------------------------------------------------ shared state
    def workspace(self, batch: int) -> Workspace:
        """The context buffers the sessions of ``batch`` streams share."""
        if batch not in self._workspaces:
            cfg, mem = self.model_config, self.memory
            self._workspaces[batch] = Workspace(cfg.num_layers, batch, mem.window, cfg.tokens_per_frame,
                                                cfg.num_heads, cfg.head_dim, mem.frames_per_block, self.dtype,
                                                self.device)
        return self._workspaces[batch]

    def page_pool(self, batch: int = 1) -> PagePool:
        """The history page pool every session takes its pages from, sized by the
        engine's memory budgets (made on first use; with ``history_tier="host"`` the
        device staging grows to the largest batch seen)."""
        cfg = self.model_config
        host_only = self.runtime.retrieval_fetch == "per_forward"
        if self._pool is None:
            self._pool = make_page_pool(self.memory, cfg.num_layers, batch, cfg.tokens_per_frame, cfg.num_heads,
                                        cfg.head_dim, self.dtype, self.device, host_only=host_only,
                                        table=self.page_table)
        elif self.memory.history_tier == "host" and not host_only:
            budget = HistoryBudget.plan(self.memory, cfg.num_layers, batch, cfg.tokens_per_frame, cfg.num_heads,
                                        cfg.head_dim, self.dtype)
            self._pool.raise_gpu_cap(budget.pool_pages()[0])
        return self._pool

    @property
    def cache(self):
        """The last run's window/history/retrieval state (for inspection), or None."""
        return None if self.last_session is None else self.last_session.cache

    def memory_usage(self) -> dict:
        """The page pool's usage (pages and bytes per tier, chunks, sessions); empty
        before any session kept history."""
        return {} if self._pool is None else self._pool.usage()

    # ------------------------------------------------------------------ inputs
    def default_text(self, batch: int = 1) -> torch.Tensor:
        """The built-in text embedding: fixed standard-normal ``[B, text_len, text_dim]``
        drawn from seed 0 (the same for every stream), for demos without a text encoder."""
        g = torch.Generator().manual_seed(0)
        cfg = self.model_config
        text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
        return text.expand(batch, -1, -1).clone()

    def session_memory(self, top_k: int | None = None, recency_guard: int | None = None,
                       widen_local_until_memory: bool | None = None) -> MemoryConfig:
        """The engine's memory rules with a session's own options: ``top_k`` up to the
        engine's, the recency guard, widening the local window."""
        changes = {name: value for name, value in (("top_k", top_k), ("recency_guard", recency_guard),
                                                   ("widen_local_until_memory", widen_local_until_memory))
                   if value is not None}
        if "top_k" in changes:
            k = changes["top_k"]
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.memory.top_k:
                raise ValueError(f"top_k must be an int in [0, {self.memory.top_k}] (the engine's "
                                 f"MemoryConfig.top_k), got {k!r}")
        return dataclasses.replace(self.memory, **changes) if changes else self.memory

    def session(self, batch_size: int | None = None, text: torch.Tensor | None = None, seed: int | None = None,
                top_k: int | None = None, recency_guard: int | None = None,
                widen_local_until_memory: bool | None = None) -> Session:
        """A new session: one stream, or a lockstep batch of ``batch_size`` streams, with
        its own text [B, L, text_dim] (default: ``default_text``), seed (default: the
        engine's) and memory options. Close it (or use it as a context manager) to give
        its history pages back."""
        batch = checks.infer_batch(batch_size, text)
        memory = self.session_memory(top_k, recency_guard, widen_local_until_memory)
        if text is None:
            text = self.default_text(batch)
        checks.check_text(text, batch, self.model_config)
        seed = self.seed if seed is None else check_seed(seed)
        checks.check_history_budget(memory, self.model_config, self.dtype, None, batch, self._host_only)
        return Session(self, batch, text, seed, memory)

    @property
    def _host_only(self) -> bool:
        return self.runtime.retrieval_fetch == "per_forward"

    def _check_timeline(self, text_timeline, text, recache_sink, num_blocks: int):
        """Validate a prompt timeline up front: a mapping {block index: text} with int
        indices in [0, num_blocks); index 0 only without ``text`` (then it is block 0's
        text). Returns (text, {block >= 1: text}) or (text, None)."""
        if not isinstance(recache_sink, bool):
            raise TypeError(f"recache_sink must be a bool, got {type(recache_sink).__name__}")
        if text_timeline is None:
            return text, None
        if not isinstance(text_timeline, Mapping):
            raise TypeError(f"text_timeline must be a mapping {{block index: text [B, L, text_dim]}}, got "
                            f"{type(text_timeline).__name__}")
        for block in text_timeline:
            if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < num_blocks:
                raise ValueError(f"text_timeline: block indices must be ints in [0, {num_blocks}) (the run has "
                                 f"{num_blocks} blocks), got {block!r}")
        timeline = dict(text_timeline)
        if 0 in timeline:
            if text is not None:
                raise ValueError("text_timeline[0] and text both give block 0's text; pass one of them")
            text = timeline.pop(0)
        return text, dict(sorted(timeline.items())) or None

    def _prepare(self, num_frames: int, text, noise, renoise, seed, batch_size, keep_output: bool,
                 memory: MemoryConfig, text_timeline=None, recache_sink: bool = False, initial_latents=None):
        """Validate a run's inputs, allocating nothing proportional to ``num_frames``.

        keep_output: the run's whole output is kept (``generate``), so it must fit in memory.
        """
        cfg = self.model_config
        f = memory.frames_per_block
        checks.check_num_frames(num_frames, f)
        text, timeline = self._check_timeline(text_timeline, text, recache_sink, num_frames // f)
        first_switch = None if timeline is None else next(iter(timeline.values()))
        batch = checks.infer_batch(batch_size, noise, text, first_switch, initial_latents)
        primed = 0
        if initial_latents is not None:
            checks.check_initial_latents(initial_latents, batch, cfg, num_frames)
            primed = initial_latents.shape[1]
        if keep_output:
            checks.check_output_fits(cfg, batch, num_frames, self.device)
        if noise is not None:
            checks.check_tensor("noise", noise, (batch, num_frames, cfg.in_channels, cfg.height, cfg.width))
        if text is None:
            text = self.default_text(batch)
        checks.check_text(text, batch, cfg)
        for block, switched in (timeline or {}).items():
            try:
                checks.check_text(switched, batch, cfg)
            except (TypeError, ValueError) as error:
                raise type(error)(f"text_timeline[{block}]: {error}") from None
        num_blocks = num_frames // f
        renoise = checks.check_renoise(renoise, batch, num_blocks, len(self.schedule), f, cfg)
        seed = self.seed if seed is None else check_seed(seed)
        checks.check_history_budget(memory, cfg, self.dtype, primed + num_frames, batch, self._host_only)
        return batch, num_blocks, text, noise, renoise, seed, timeline, recache_sink, initial_latents

    # ------------------------------------------------------------------ generation
    def stream(self, num_frames: int, text: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               renoise: Sequence[torch.Tensor] | None = None, seed: int | None = None,
               batch_size: int | None = None, top_k: int | None = None, recency_guard: int | None = None,
               widen_local_until_memory: bool | None = None,
               text_timeline: Mapping[int, torch.Tensor] | None = None,
               recache_sink: bool = False, prompt: str | Sequence[str] | None = None,
               prompt_timeline: Mapping[int, str | Sequence[str]] | None = None,
               initial_latents: torch.Tensor | None = None) -> Iterator[BlockOutput]:
        """Generate ``num_frames`` latent frames, yielding each block when it is finished.

        num_frames: a positive multiple of ``frames_per_block`` F, at most ``MAX_FRAMES``
        (2**31 - 1: frame numbers are 32-bit). text [B, L, text_dim] (L <= text_len; default:
        ``default_text``), noise [B, T, C, H, W] (default: drawn from ``seed``), renoise: one
        [B, F, C, H, W] per block and non-final step, block-major (default: drawn from ``seed``).
        seed: an int in [-2**63, 2**64) (default: the engine's). top_k / recency_guard /
        widen_local_until_memory: this run's memory options (see ``session``).
        text_timeline: prompt switches, {block index: text [B, L, text_dim]}: from that
        block on the stream cross-attends to that text, and just before it the window's
        K/V are recomputed under it (SPEC section 7; ``Session.switch_text``; the sink's
        too with ``recache_sink=True``); block 0's text is ``text`` (or ``text_timeline[0]``
        when ``text`` is None). prompt / prompt_timeline: the same as text strings (one
        per stream), through the engine's text encoder. With a VAE each block carries its
        decoded frames (``frames_rgb`` [B, F', 8H, 8W, 3] uint8 on the CPU; F' = 4F - 3 for the first
        block, 4F after). All inputs are validated before any work starts.

        Noise rule: a CPU ``torch.Generator`` seeded with ``seed`` first draws the seed of
        the re-noise generator (``torch.randint(2**63 - 1, ())``), then, unless ``noise`` is
        given, the initial noise of each block just before the block runs, one
        ``torch.randn(B, F, C, H, W)`` after another. So the initial noise is the same on
        every device, a long run never holds more than one block of it, and the blocks of a
        run are a prefix of those of a longer run with the same seed and batch. Without
        ``renoise`` the re-noise is drawn on the engine's device from that second generator,
        one ``[B, F, C, H, W]`` per block and non-final step, in order.

        initial_latents: start from given clean frames ``[B, n, C, H, W]`` (normalised
        latents, e.g. from ``WanVAE.encode``; an image gives n = 1), as Self-Forcing's
        ``initial_latent``. Before the first generated block they are written into the
        cache block by block, each with one forward at timestep 0 under ``text`` (a
        generated block's recache pass, same context rules: sinks, retrieved, local), so
        they count as generated frames for the sink, the window, the history and
        retrieval; when n is not a multiple of F the first of these blocks holds the
        n mod F remainder (an image: one frame), then blocks of F (``Session.prime``).
        They yield no block, draw no noise and have no log entries (logs and
        ``text_timeline`` number the generated blocks from 0); ``num_frames`` counts the
        generated frames only, which are all that is returned, their global frame ids
        starting at n. n + num_frames must be <= ``MAX_FRAMES``. With a VAE the given frames
        are decoded first and lead the first block's ``frames_rgb`` (the video continues
        them: 4 (n + num_frames) - 3 frames in all).
        """
        text, text_timeline = self._prompt_texts(prompt, prompt_timeline, text, text_timeline)
        memory = self.session_memory(top_k, recency_guard, widen_local_until_memory)
        args = self._prepare(num_frames, text, noise, renoise, seed, batch_size, keep_output=False, memory=memory,
                             text_timeline=text_timeline, recache_sink=recache_sink,
                             initial_latents=initial_latents)
        return self._run(memory, *args)

    def _run(self, memory, batch, num_blocks, text, noise, renoise, seed, timeline=None,
             recache_sink=False, initial_latents=None) -> Iterator[BlockOutput]:
        session = Session(self, batch, text, seed, memory)
        self.last_session = session   # the last run's state, for inspection
        if initial_latents is not None:
            try:
                session.prime(initial_latents)
            except BaseException:
                session.close()
                raise
        f = memory.frames_per_block
        block_noise = None
        if noise is not None:
            # One copy up front: per-block copies from pageable host memory would stall the loop.
            noise = noise.to(self.device, torch.float32)
            block_noise = (noise[:, b * f:(b + 1) * f] for b in range(num_blocks))
        if renoise is not None:
            renoise = [r.to(self.device, torch.float32) for r in renoise]
        # Pixels: each block is decoded as soon as it is done, the VAE's causal cache carried
        # from block to block; on CUDA on the decoder's own stream, which the compute stream
        # never waits for (the decode of block n overlaps the DiT of block n + 1).
        decoder = self.vae.stream_decoder() if self.vae is not None else None
        # Given frames are decoded first: the video continues them, and the decoder's causal
        # cache holds them when the first generated block is decoded.
        given = None
        if decoder is not None and initial_latents is not None:
            given = decoder.decode_block_async(initial_latents.to(self.device, torch.float32)).result()
        try:
            for out in session.run(num_blocks, block_noise, renoise, text_timeline=timeline,
                                   recache_sink=recache_sink):
                if decoder is not None:
                    out.set_pending_frames(decoder.decode_block_async(out.latents), given)
                    given = None
                yield out
        finally:
            session.close()   # a consumer may stop early: settle the side stream, free the pages

    def generate(self, num_frames: int, text: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 renoise: Sequence[torch.Tensor] | None = None, seed: int | None = None,
                 batch_size: int | None = None, progress: bool = False, top_k: int | None = None,
                 recency_guard: int | None = None, widen_local_until_memory: bool | None = None,
                 text_timeline: Mapping[int, torch.Tensor] | None = None,
                 recache_sink: bool = False, prompt: str | Sequence[str] | None = None,
                 prompt_timeline: Mapping[int, str | Sequence[str]] | None = None,
                 video_path: str | Path | None = None, fps: int = 16,
                 initial_latents: torch.Tensor | None = None) -> GenerationResult:
        """Generate a whole video; see ``stream`` for the arguments.

        Returns latents [B, T, C, H, W] (float32, CPU) and the per-block retrieval log: the
        blocks ``stream`` yields for the same arguments; with a VAE also the decoded frames
        [B, 4T - 3, 8H, 8W, 3] uint8, and with ``video_path`` the first stream's frames are
        appended to that mp4 block by block (written atomically at the end). Each block is
        copied to the host output as it finishes (asynchronously from the device), so the
        device never holds the whole video. With ``initial_latents`` only the generated
        frames are returned (``stream`` documents the rule). A ``num_frames`` whose float32
        output exceeds the physical memory is a ValueError before any work.
        """
        text, text_timeline = self._prompt_texts(prompt, prompt_timeline, text, text_timeline)
        memory = self.session_memory(top_k, recency_guard, widen_local_until_memory)
        batch, num_blocks, *rest = self._prepare(num_frames, text, noise, renoise, seed, batch_size,
                                                 keep_output=True, memory=memory, text_timeline=text_timeline,
                                                 recache_sink=recache_sink, initial_latents=initial_latents)
        primed = 0 if initial_latents is None else initial_latents.shape[1]
        cfg = self.model_config
        out = torch.empty(batch, num_frames, cfg.in_channels, cfg.height, cfg.width,
                          pin_memory=self.device.type == "cuda")
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=num_blocks, unit="block", desc="generate")
        logs, seconds, frames = [], [], []
        writer = None
        if video_path is not None:
            if self.vae is None:
                raise ValueError("video_path needs a VAE (Engine.from_pretrained, or attach_random_pipeline())")
            from .pipeline.video import Mp4Writer
            writer = Mp4Writer(video_path, fps=fps)
        start = time.perf_counter()

        def take_pixels(block: BlockOutput) -> None:
            pixels = block.frames_rgb       # waits for this block's decode only
            if pixels is not None:
                frames.append(pixels)
                if writer is not None:
                    writer.append(pixels[0])

        decoded = None   # the previous block: its frames are read once the next one is queued
        try:
            for block in self._run(memory, batch, num_blocks, *rest):
                host = out[:, block.frames[0] - primed:block.frames[1] - primed]   # generated frames only
                host.copy_(block.latents, non_blocking=True)
                block.latents = host   # the device copy is released (stream-ordered reuse)
                if decoded is not None:
                    take_pixels(decoded)
                decoded = block
                logs.append(block)
                seconds.append(block.seconds)
                if bar is not None:
                    bar.update(1)
                    video = sum(f.shape[1] for f in frames)
                    if video:
                        bar.set_postfix_str(f"{video / (time.perf_counter() - start):.1f} video frames/s")
            if decoded is not None:
                take_pixels(decoded)
            if writer is not None:
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()   # ends its line, so an error message does not share it
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return GenerationResult(out, [b.log for b in logs], seconds, torch.cat(frames, dim=1) if frames else None)

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
            "page_table": page_table_kind(self.page_table),
            "timesteps": list(self.schedule.timesteps),
            "descriptor": type(self.descriptor).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
