"""LongLive-RAG memory for a diffusers ``WanTransformer3DModel``.

The transformer runs block by block, as :class:`lrag_engine.Engine` runs ``WanModel``
(SPEC sections 3-4): a processor on the self-attention (``attn1``) of every block hands
the block's q, k, v, RMS-normed and *un-rotated*, to lrag_engine's attention callable
(:meth:`lrag_engine.RetrievalAttention.attention`, the public seam the engine uses too), which owns the KV window, the
retrieved history frames and the Wan 3-D RoPE at re-based positions. Cross-attention
keeps its diffusers processor.

    from diffusers import WanTransformer3DModel
    from lrag_engine import MemoryConfig
    from lrag_engine.integrations.diffusers import CausalDiffusersWan

    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")  # a causal Wan 2.1
    with CausalDiffusersWan(transformer, memory=MemoryConfig(window=12, top_k=6)) as wan:
        result = wan.generate(num_frames=48, text_embeds=prompt_embeds, height=60, width=104, seed=0)
    result.latents   # [B, C, T, H, W] float32, diffusers' layout (AutoencoderKLWan.decode takes it)
    result.log       # per block: query frame, retrieved global frames, similarities

Everything here speaks diffusers' latent layout ``[B, C, T, H, W]``; the cache and the
schedule work on lrag_engine's ``[B, T, C, H, W]`` inside. With the same weights (see
:func:`lrag_engine.models.layouts.diffusers_to_wan`), seed or noise, and text, a run equals
``Engine(model=<WanModel>).generate`` up to float32 rounding.

Needs diffusers (``pip install -e ".[diffusers]"``); importing this module does not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks
from ..attention.backend import get_backend
from ..config import MemoryConfig, ModelConfig, RuntimeConfig
from ..attention.retrieval import RetrievalAttention
from ..checks import runtime_for_weights
from ..memory.retrieval import BlockLog, Descriptor, MeanDescriptor
from ..models.layouts import model_config_from_json
from ..models.wan import SelfAttentionFn, sinusoidal_embedding
from ..schedule import DenoiseSchedule, predict_x0, renoise as renoise_step

INSTALL_HINT = 'pip install -e ".[diffusers]"'


def require_diffusers():
    """The ``diffusers`` module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"lrag_engine.integrations.diffusers needs diffusers, which is not installed: "
                          f"{INSTALL_HINT} (or pip install diffusers)") from exc
    return diffusers


class AttentionSlot:
    """What the processors of one transformer call: the self-attention callable of the
    forward running now (``(layer, q, k, v) -> out``, all ``[B, L, H, D]``), or None between
    forwards. The driver sets it before each forward and clears it after."""

    def __init__(self) -> None:
        self.attention: SelfAttentionFn | None = None


class RetrievalAttnProcessor:
    """diffusers attention processor for ``blocks[layer].attn1`` of a ``WanTransformer3DModel``.

    Computes q, k, v with the block's projections (fused or not) and q/k RMS norms, splits
    them into heads ``[B, L, H, D]`` *without* diffusers' rotary embedding (the callable
    applies Wan's 3-D RoPE at its own positions), calls ``slot.attention(layer, q, k, v)``
    and applies the block's output projection. Refuses cross-attention, masks, and calls
    outside a driver's forward (no callable in the slot).
    """

    def __init__(self, layer: int, slot: AttentionSlot) -> None:
        self.layer = layer
        self.slot = slot

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb=None, **kwargs) -> Tensor:
        where = f"blocks.{self.layer}.attn1"
        if encoder_hidden_states is not None:
            raise ValueError(f"{type(self).__name__} serves self-attention only; it was called with "
                             f"encoder_hidden_states (installed on a cross-attention instead of {where}?)")
        if attention_mask is not None:
            raise ValueError(f"{where}: lrag_engine's self-attention takes no attention_mask")
        attention = self.slot.attention
        if attention is None:
            raise RuntimeError(f"{where} runs lrag_engine's cached self-attention, which exists only inside a "
                               "CausalDiffusersWan forward: generate through CausalDiffusersWan, or close() it to "
                               "give the transformer its diffusers processors back")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        out = attention(self.layer, q, k, v)
        if not isinstance(out, Tensor) or out.shape != q.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{where}: the self-attention callable must return {tuple(q.shape)} [B, L, H, D], "
                             f"got {got}")
        out = attn.to_out[0](out.flatten(2).to(q.dtype))
        return attn.to_out[1](out)


@dataclass
class DiffusersBlockOutput:
    """One finished block: ``latents`` [B, C, F, H, W] float32 on the transformer's device,
    frames [first, end) of the video, and its retrieval log (read from the device on first access)."""

    block: int
    frames: tuple[int, int]
    latents: Tensor
    _log_fn: Callable[[], BlockLog] = field(repr=False)
    _log: BlockLog | None = field(default=None, repr=False)

    @property
    def log(self) -> BlockLog:
        if self._log is None:
            self._log = self._log_fn()
        return self._log


@dataclass
class DiffusersGeneration:
    """A whole run: ``latents`` [B, C, T, H, W] float32 on the CPU and one log per block."""

    latents: Tensor
    log: list[BlockLog]


class CausalDiffusersWan:
    """Block-by-block generation with LongLive-RAG memory on a diffusers ``WanTransformer3DModel``.

    transformer: a text-to-video ``WanTransformer3DModel`` (a causal Wan 2.1: Self-Forcing,
        Causal-Forcing, LongLive...); its attn1 processors are replaced until :meth:`close`.
    memory: window / retrieval rules (default ``MemoryConfig()``).
    runtime: schedule (denoising_steps, shift), kernels, attention backend, page table;
        its device and dtype must be the transformer's (default: the transformer's).
    text_len: text positions the cross-attention sees; shorter text embeddings are
        zero-padded to it, as Wan and diffusers' pipelines do (512).
    descriptor: frame descriptor for retrieval (default: the spatial mean).
    wan_timestep_embedding: compute the sinusoidal timestep embedding in float64 as the
        original Wan (and ``WanModel``) do, instead of diffusers' float32: at t near 1000 a
        float32 angle loses its low bits, which moves a forward's O(1) outputs by about 1e-5.
    """

    def __init__(self, transformer, memory: MemoryConfig | None = None, runtime: RuntimeConfig | None = None,
                 text_len: int = 512, descriptor: Descriptor | None = None,
                 wan_timestep_embedding: bool = True) -> None:
        diffusers = require_diffusers()
        if not isinstance(transformer, diffusers.WanTransformer3DModel):
            raise TypeError(f"transformer must be a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
        # Refuses image conditioning and other models WanModel's math does not cover.
        self.model_config = model_config_from_json(transformer.config, text_len=text_len)
        self.transformer = transformer.eval()
        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.runtime = self._checked_runtime(runtime)
        self.memory = memory or MemoryConfig()
        self.descriptor = descriptor or MeanDescriptor(self.model_config.in_channels)
        self.schedule = DenoiseSchedule.from_steps(self.runtime.denoising_steps, self.runtime.shift,
                                                   self.runtime.num_train_timesteps)
        self.attention_backend, self.attend = get_backend(self.runtime.attention_backend, self.device, self.dtype)
        self._slot = AttentionSlot()
        self._previous = self._install_processors()
        self._hook = self._install_timestep_embedding() if wan_timestep_embedding else None
        self.closed = False

    # ------------------------------------------------------------------ setup
    def _checked_runtime(self, runtime: RuntimeConfig | None) -> RuntimeConfig:
        runtime = runtime_for_weights(self.device, self.dtype, runtime, what="transformer")
        if runtime.cuda_graphs:
            raise ValueError("RuntimeConfig.cuda_graphs is not supported by CausalDiffusersWan (the diffusers "
                             "forward runs eagerly)")
        return runtime

    def _install_processors(self) -> dict:
        previous = self.transformer.attn_processors
        processors = dict(previous)
        for layer in range(self.model_config.num_layers):
            name = f"blocks.{layer}.attn1.processor"
            if name not in processors:
                raise ValueError(f"the transformer has no attention processor {name!r}")
            if isinstance(processors[name], RetrievalAttnProcessor):
                raise ValueError("the transformer already runs under another CausalDiffusersWan; close() that one "
                                 "first")
            processors[name] = RetrievalAttnProcessor(layer, self._slot)
        self.transformer.set_attn_processor(processors)
        return previous

    def _install_timestep_embedding(self):
        proj = self.transformer.condition_embedder.timesteps_proj
        layout = (proj.num_channels, proj.flip_sin_to_cos, float(proj.downscale_freq_shift), proj.scale)
        if layout != (self.model_config.freq_dim, True, 0.0, 1):
            raise ValueError(f"the transformer's timestep embedding (channels, flip_sin_to_cos, downscale_freq_shift, "
                             f"scale) = {layout} is not Wan's [cos, sin] embedding; pass wan_timestep_embedding=False")

        def wan_embedding(module, inputs, output):
            return sinusoidal_embedding(inputs[0], module.num_channels).to(output.dtype)
        return proj.register_forward_hook(wan_embedding)

    def close(self) -> None:
        """Give the transformer its previous attention processors and timestep embedding back. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.transformer.set_attn_processor(dict(self._previous))
        if self._hook is not None:
            self._hook.remove()

    def __enter__(self) -> "CausalDiffusersWan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one forward
    def _forward(self, x: Tensor, t: float, text: Tensor, attention: SelfAttentionFn) -> Tensor:
        """x [B, F, C, H, W] float32 at timestep t (every frame of the block shares it, so one
        per batch row is diffusers' form of WanModel's per-frame ``[B, F]``) -> flow [B, F, C, H, W] float32."""
        timestep = torch.full((x.shape[0],), t, device=self.device)
        self._slot.attention = attention
        try:
            out = self.transformer(hidden_states=x.transpose(1, 2).to(self.dtype), timestep=timestep,
                                   encoder_hidden_states=text, return_dict=False)[0]
        finally:
            self._slot.attention = None
        return out.transpose(1, 2).float()

    def _cache(self, cfg: ModelConfig, batch: int) -> RetrievalAttention:
        _, ph, pw = cfg.patch_size
        return RetrievalAttention(cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.tokens_per_frame, self.memory,
                                  positions="wan3d", grid=(cfg.height // ph, cfg.width // pw), batch=batch,
                                  descriptor=self.descriptor, dtype=self.dtype, device=self.device,
                                  attention_backend=self.attend, kernels=self.runtime.kernels,
                                  page_table=self.runtime.page_table,
                                  refetch_per_forward=self.runtime.retrieval_fetch == "per_forward")

    # ------------------------------------------------------------------ generation
    def stream(self, num_frames: int, text_embeds: Tensor, noise: Tensor | None = None,
               renoise: Sequence[Tensor] | None = None, seed: int = 0, height: int | None = None,
               width: int | None = None) -> Iterator[DiffusersBlockOutput]:
        """Generate ``num_frames`` latent frames, yielding each block when it is finished.

        text_embeds: ``[B, L, text_dim]`` (diffusers' ``encoder_hidden_states``, ``L <= text_len``).
        noise: initial noise ``[B, C, T, H, W]`` (default: drawn from ``seed`` by the Engine's
            rule, so a seed gives the Engine's video). height / width: latent size, needed
            when ``noise`` is not given.
        renoise: one ``[B, C, F, H, W]`` per block and non-final step, block-major
            (default: drawn from ``seed``).
        All inputs are validated before any work starts.
        """
        if self.closed:
            raise RuntimeError("CausalDiffusersWan is closed")
        cfg, batch, noise, renoise, seed = self._prepare(num_frames, text_embeds, noise, renoise, seed, height, width)
        text = F.pad(text_embeds.to(self.device, self.dtype), (0, 0, 0, cfg.text_len - text_embeds.shape[1]))
        return self._run(cfg, batch, num_frames // self.memory.frames_per_block, text, noise, renoise, seed)

    def generate(self, num_frames: int, text_embeds: Tensor, noise: Tensor | None = None,
                 renoise: Sequence[Tensor] | None = None, seed: int = 0, height: int | None = None,
                 width: int | None = None) -> DiffusersGeneration:
        """The whole video (see :meth:`stream` for the arguments): latents ``[B, C, T, H, W]``
        float32 on the CPU and the per-block retrieval logs."""
        blocks = list(self.stream(num_frames, text_embeds, noise, renoise, seed, height, width))
        latents = torch.cat([b.latents.cpu() for b in blocks], dim=2)
        return DiffusersGeneration(latents, [b.log for b in blocks])

    def _prepare(self, num_frames, text, noise, renoise, seed, height, width):
        f = self.memory.frames_per_block
        checks.check_num_frames(num_frames, f)
        checks.check_seed(seed)
        batch = checks.infer_batch(None, noise, text)
        if noise is not None:
            checks.check_tensor("noise", noise, (batch, self.model_config.in_channels, num_frames, height, width))
            height, width = noise.shape[-2:]
        if height is None or width is None:
            raise ValueError("give the latent height and width (height=, width=) or the noise [B, C, T, H, W]")
        cfg = dataclasses.replace(self.model_config, height=int(height), width=int(width))
        checks.check_text(text, batch, cfg)
        steps = len(self.schedule) - 1
        if renoise is not None:
            renoise = list(renoise)
            want = num_frames // f * steps
            if len(renoise) != want:
                raise ValueError(f"renoise must hold {want} tensors ({num_frames // f} blocks x {steps} non-final "
                                 f"steps), got {len(renoise)}")
            for i, r in enumerate(renoise):
                checks.check_tensor(f"renoise[{i}]", r, (batch, cfg.in_channels, f, cfg.height, cfg.width))
        checks.check_history_budget(self.memory, cfg, self.dtype, num_frames, batch,
                                    self.runtime.retrieval_fetch == "per_forward")
        return cfg, batch, noise, renoise, seed

    def _run(self, cfg: ModelConfig, batch: int, num_blocks: int, text: Tensor, noise: Tensor | None,
             renoise: list[Tensor] | None, seed: int) -> Iterator[DiffusersBlockOutput]:
        # The Engine's noise rule: a CPU generator seeded with ``seed`` draws the re-noise
        # generator's seed, then each block's initial noise [B, F, C, H, W] as the block starts.
        noise_generator = torch.Generator().manual_seed(seed)
        renoise_seed = int(torch.randint(2 ** 63 - 1, (), generator=noise_generator))
        generator = torch.Generator(self.device).manual_seed(renoise_seed)
        f, steps = self.memory.frames_per_block, len(self.schedule) - 1
        sigmas, timesteps = self.schedule.sigmas, self.schedule.timesteps
        block_shape = (batch, f, cfg.in_channels, cfg.height, cfg.width)
        cache = self._cache(cfg, batch)
        try:
            for block in range(num_blocks):
                with torch.inference_mode():
                    if noise is None:
                        x = torch.randn(block_shape, generator=noise_generator).to(self.device)
                    else:
                        x = noise[:, :, block * f:(block + 1) * f].transpose(1, 2).to(self.device, torch.float32)
                    log = cache.begin_block(f)
                    for i, sigma in enumerate(sigmas):
                        x0 = predict_x0(x, self._forward(x, timesteps[i], text, cache.attention(recache=False)), sigma)
                        if i + 1 < len(sigmas):
                            if renoise is None:
                                fresh = torch.randn(block_shape, generator=generator, device=self.device)
                            else:
                                fresh = renoise[block * steps + i].transpose(1, 2).to(self.device, torch.float32)
                            x = renoise_step(x0, fresh, sigmas[i + 1])
                    cache.end_block(x0)
                    self._forward(x0, 0.0, text, cache.attention(recache=True))
                    cache.finish_recache()
                    if block + 1 < num_blocks:
                        cache.start_retrieval()
                yield DiffusersBlockOutput(block, (block * f, (block + 1) * f), x0.transpose(1, 2), log)
        finally:
            cache.close()
