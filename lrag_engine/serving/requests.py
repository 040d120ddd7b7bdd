"""What a stream asks for and what it gets: StreamRequest (validated against an engine,
also from JSON), StreamBlock (one block of one stream), StreamEnd, AdmissionError."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .. import checks

OUTPUTS = ("latents", "frames", "both")
_REQUEST_KEYS = ("prompt", "num_frames", "seed", "prompt_timeline", "recache_sink", "top_k", "recency_guard",
                 "widen_local_until_memory", "output", "request_id")


class AdmissionError(ValueError):
    """A request that can never run on this engine (it needs more history memory than
    the budgets hold, or the waiting queue is full)."""


@dataclass
class StreamRequest:
    """One stream to generate (batch 1).

    prompt: text through the engine's text encoder; or text: embeddings ``[1, L,
        text_dim]`` (``[L, text_dim]`` is accepted); neither: ``engine.default_text``.
    num_frames: latent frames to generate, a positive multiple of ``frames_per_block``;
        None: an endless stream that runs until cancelled (its history must be bounded:
        the engine's ``MemoryConfig.max_history_frames``, or ``top_k=0``).
    seed: the stream's noise seed (default: the engine's); the noise rule is the
        session's, so a stream's blocks do not depend on what it is batched with.
    prompt_timeline / text_timeline: ``{block index: prompt (or embeddings)}``: the
        stream switches to that text just before that block (SPEC section 7 recache;
        ``recache_sink`` recomputes the sink too); index 0 is the initial text when
        ``prompt``/``text`` is not given.
    top_k / recency_guard / widen_local_until_memory: the stream's memory options
        (``top_k`` at most the engine's).
    initial_latents: ``[1, n, C, H, W]`` clean latents the stream continues (image- or
        video-to-video, ``Session.prime``).
    output: "latents" (each block's ``[F, C, H, W]`` float32), "frames" (decoded ``uint8``
        video frames, needs the engine's VAE) or "both".
    request_id: a string naming the stream in every output (default: a fresh uuid).
    """

    prompt: str | None = None
    text: torch.Tensor | None = None
    num_frames: int | None = None
    seed: int | None = None
    prompt_timeline: Mapping[int, str] | None = None
    text_timeline: Mapping[int, torch.Tensor] | None = None
    recache_sink: bool = False
    top_k: int | None = None
    recency_guard: int | None = None
    widen_local_until_memory: bool | None = None
    initial_latents: torch.Tensor | None = None
    output: str = "latents"
    request_id: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping) -> "StreamRequest":
        """The JSON form: ``prompt``, ``num_frames``, ``seed``, ``prompt_timeline``
        (keys may be digit strings), ``recache_sink``, ``top_k``, ``recency_guard``,
        ``widen_local_until_memory``, ``output``, ``request_id``. Unknown keys are a
        ValueError naming them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a stream request must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_REQUEST_KEYS))
        if unknown:
            raise ValueError(f"unknown request field(s) {unknown}; allowed: {list(_REQUEST_KEYS)}")
        values = dict(data)
        timeline = values.get("prompt_timeline")
        if timeline is not None:
            if not isinstance(timeline, Mapping):
                raise TypeError(f"prompt_timeline must be an object {{block index: prompt}}, got "
                                f"{type(timeline).__name__}")
            parsed = {}
            for key, prompt in timeline.items():
                if isinstance(key, str) and key.strip().isdigit():
                    key = int(key)
                parsed[key] = prompt
            values["prompt_timeline"] = parsed
        return cls(**values)

    def validate(self, engine) -> None:
        """ValueError/TypeError naming the bad field; nothing is allocated."""
        cfg, f = engine.model_config, engine.memory.frames_per_block
        if self.request_id is not None and (not isinstance(self.request_id, str) or not self.request_id
                                            or len(self.request_id) > 128):
            raise ValueError(f"request_id must be a non-empty string of at most 128 characters, got "
                             f"{self.request_id!r}")
        if self.prompt is not None and self.text is not None:
            raise ValueError("give either prompt (a string) or text (embeddings), not both")
        if self.prompt_timeline is not None and self.text_timeline is not None:
            raise ValueError("give either prompt_timeline or text_timeline, not both")
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if (self.prompt is not None or self.prompt_timeline) and engine.text_encoder is None:
            raise ValueError("prompt needs an engine with a text encoder (Engine.from_pretrained or "
                             "attach_random_pipeline()); or give text embeddings")
        if self.text is not None:
            checks.check_text(_as_batch(self.text), 1, cfg)
        if self.num_frames is not None:
            checks.check_num_frames(self.num_frames, f)
        if self.seed is not None:
            checks.check_seed(self.seed)
        if not isinstance(self.recache_sink, bool):
            raise TypeError(f"recache_sink must be a bool, got {type(self.recache_sink).__name__}")
        engine.session_memory(self.top_k, self.recency_guard, self.widen_local_until_memory)
        for name in ("recency_guard",):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.widen_local_until_memory is not None and not isinstance(self.widen_local_until_memory, bool):
            raise TypeError("widen_local_until_memory must be a bool")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.output != "latents" and engine.vae is None:
            raise ValueError(f"output={self.output!r} needs an engine with a VAE (Engine.from_pretrained or "
                             "attach_random_pipeline()); use output='latents'")
        if self.initial_latents is not None:
            checks.check_initial_latents(_as_batch(self.initial_latents, 5), 1, cfg, self.num_frames)
        blocks = None if self.num_frames is None else self.num_frames // f
        for name in ("prompt_timeline", "text_timeline"):
            timeline = getattr(self, name)
            if timeline is None:
                continue
            if not isinstance(timeline, Mapping):
                raise TypeError(f"{name} must be a mapping {{block index: ...}}, got {type(timeline).__name__}")
            for block, value in timeline.items():
                if isinstance(block, bool) or not isinstance(block, int) or block < 0 or \
                        (blocks is not None and block >= blocks):
                    limit = f"[0, {blocks})" if blocks is not None else ">= 0"
                    raise ValueError(f"{name}: block indices must be ints {limit}, got {block!r}")
                if name == "prompt_timeline" and (not isinstance(value, str) or not value.strip()):
                    raise ValueError(f"prompt_timeline[{block}] must be a non-empty string, got {value!r}")
                if name == "text_timeline":
                    checks.check_text(_as_batch(value), 1, cfg)
            if 0 in timeline and (self.prompt is not None or self.text is not None):
                raise ValueError(f"{name}[0] and prompt/text both give block 0's text; pass one of them")


@dataclass
class StreamBlock:
    """One block of one stream (tensors on the CPU)."""

    request_id: str
    block: int                        # index of the block in its stream
    frames: tuple[int, int]           # latent frame ids [first, end) in the stream
    latents: torch.Tensor | None      # [F, C, H, W] float32
    frames_rgb: torch.Tensor | None   # [F', 8H, 8W, 3] uint8
    log: dict                         # the block's retrieval log (BlockLog.to_dict())
    final: bool                       # the last block of a finite stream
    seconds: float                    # wall time of the step that made it
    batch: int                        # streams that shared this block's forwards


@dataclass
class StreamEnd:
    """A stream is over: "finished" (all its frames), "cancelled" or "failed" (``error``)."""

    request_id: str
    status: str
    blocks: int
    error: str | None = None



def _as_batch(tensor, dims: int = 3):
    if isinstance(tensor, torch.Tensor) and tensor.dim() == dims - 1:
        return tensor.unsqueeze(0)
    return tensor
