"""Configuration dataclasses: model shapes, memory (window / retrieval) rules, runtime.

Every dataclass validates itself in ``__post_init__`` and names the bad field and
its allowed range, so a wrong value fails at construction time and never half-way
through a generation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .ops.quant import HISTORY_DTYPES

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of float32, bfloat16, float16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclass
class ModelConfig:
    """Shapes of a Wan 2.1 causal DiT. ``height``/``width`` are latent sizes."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    height: int = 60
    width: int = 104

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        _positive("ModelConfig", dim=self.dim, ffn_dim=self.ffn_dim, num_heads=self.num_heads,
                  num_layers=self.num_layers, in_channels=self.in_channels,
                  out_channels=self.out_channels, text_dim=self.text_dim,
                  text_len=self.text_len, freq_dim=self.freq_dim,
                  height=self.height, width=self.width)
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"ModelConfig head dim (dim/num_heads = {self.head_dim}) must be even and >= 6 for 3-D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"ModelConfig.freq_dim must be even, got {self.freq_dim}")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise ValueError(f"ModelConfig.patch_size must be (1, ph, pw) for a causal model, got {self.patch_size}")
        _, ph, pw = self.patch_size
        if self.height % ph or self.width % pw:
            raise ValueError(f"ModelConfig latent size {self.height}x{self.width} must be divisible by the patch {ph}x{pw}")
        if not self.eps > 0:
            raise ValueError(f"ModelConfig.eps must be > 0, got {self.eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch_size[1]) * (self.width // self.patch_size[2])

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return dataclasses.replace(MODEL_PRESETS[name], **overrides)

    @classmethod
    def from_json(cls, source, height: int | None = None, width: int | None = None,
                  text_len: int | None = None) -> "ModelConfig":
        """From a diffusers ``WanTransformer3DModel`` or original Wan 2.1 ``config.json`` (a path,
        a folder holding one, or a dict); the latent ``height``/``width`` are not in these files.
        See :func:`lrag_engine.models.layouts.model_config_from_json`."""
        from .models.layouts import model_config_from_json
        return model_config_from_json(source, height=height, width=width, text_len=text_len)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Runs a 16-block video on a laptop CPU in seconds; shapes keep every code path
    # (several heads, 3-D RoPE split, a patch grid that is not square) alive.
    "tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=16,
                        out_channels=16, text_dim=32, text_len=16, freq_dim=32,
                        height=8, width=12),
    "wan2.1-t2v-1.3b": ModelConfig(),
}


DESCRIPTORS = ("mean", "encoder")
OVERFLOW_POLICIES = ("error", "drop_oldest")
HISTORY_TIERS = ("device", "host")
RETENTION_POLICIES = ("drop_oldest", "least_retrieved", "diverse")


@dataclass
class MemoryConfig:
    """Sliding window, history and retrieval rules (SPEC section 4).

    window: frames held by the window cache, sink included.
    sink: first frames generated, never evicted.
    top_k: retrieval budget in frames; 0 is the native sliding window.
    recency_guard: the most recently evicted frames that may not be retrieved.
    frames_per_block: latent frames generated per AR block.
    widen_local_until_memory: when fewer than ``top_k`` frames can be retrieved,
        give the unused context slots to the local window (the reference keeps the
        local part at ``window - sink - top_k`` frames regardless).
    descriptor: "mean" (spatial mean of the latent frame) or "encoder".
    gpu_budget_bytes / host_budget_bytes: history byte budgets for the whole batch of
        streams (None: unbounded GPU tier / no host tier); how they turn into frames is
        ``lrag_engine.memory.budget.HistoryBudget``.
    overflow_policy: what happens when the history budgets are full: "error" raises
        before anything is written; "drop_oldest" forgets the oldest history frames
        (with one warning per stream when dropping starts).
    history_tier: where evicted frames live: "device" (the device pool, continuing in
        the pinned host tier past ``gpu_budget_bytes`` when a host budget is set) or
        "host" (pinned host memory past a device tier of ``top_k + frames_per_block``
        frames; the splice reads host pages in place).
    page_chunk_bytes: the history page pool grows in chunks of this many bytes (whole
        pages, at least one); existing chunks are never copied.
    history_dtype: how history pages are stored: None (the compute dtype, as is) or
        "fp8_e4m3" (e4m3 codes with one float32 scale per page and head, about half the
        bytes of bf16; decoded in the splice, so the window and the context stay in the
        compute dtype). See ``lrag_engine.ops.quant``.
    max_history_frames: the most history frames whose K/V each stream keeps (None: no
        cap). When an append would pass it, ``retention`` drops frames first, before the
        byte budgets are consulted; the budgets and ``overflow_policy`` still bound the
        pool shared by all sessions. At least ``frames_per_block`` and, with retrieval,
        more than ``recency_guard`` (else nothing would ever be eligible).
    retention: which frames the cap drops: "drop_oldest"; "least_retrieved" (fewest
        retrieval hits, ties to the least recently used, i.e. the oldest entry or last
        hit, then to the oldest frame); "diverse" (the frame whose descriptor is most
        cosine-similar to another held frame's, ties to the oldest). The policies never
        drop the ``recency_guard`` newest frames or the frames being appended. Descriptors
        of dropped frames are forgotten with them: a dropped frame is never retrieved.
    """

    window: int = 12
    sink: int = 1
    top_k: int = 6
    recency_guard: int = 5
    frames_per_block: int = 3
    widen_local_until_memory: bool = False
    descriptor: str = "mean"
    gpu_budget_bytes: int | None = None
    host_budget_bytes: int | None = None
    overflow_policy: str = "error"
    history_tier: str = "device"
    page_chunk_bytes: int = 256 * 2 ** 20
    history_dtype: str | None = None
    max_history_frames: int | None = None
    retention: str = "drop_oldest"

    def __post_init__(self) -> None:
        _positive("MemoryConfig", window=self.window, frames_per_block=self.frames_per_block)
        for name in ("sink", "top_k", "recency_guard"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MemoryConfig.{name} must be an integer >= 0, got {value!r}")
        if self.sink >= self.window:
            raise ValueError(f"MemoryConfig.sink ({self.sink}) must be < window ({self.window})")
        if self.top_k >= self.window - self.sink:
            raise ValueError(
                f"MemoryConfig.top_k ({self.top_k}) must be < window - sink ({self.window - self.sink}): "
                "the local part of the context would be empty")
        if self.local_frames < self.frames_per_block:
            raise ValueError(
                f"MemoryConfig: window - sink - top_k = {self.local_frames} local frames cannot hold a "
                f"block of frames_per_block={self.frames_per_block}; raise window or lower top_k/sink")
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"MemoryConfig.descriptor must be one of {DESCRIPTORS}, got {self.descriptor!r}")
        if self.overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(f"MemoryConfig.overflow_policy must be one of {OVERFLOW_POLICIES}, "
                             f"got {self.overflow_policy!r}")
        if self.history_tier not in HISTORY_TIERS:
            raise ValueError(f"MemoryConfig.history_tier must be one of {HISTORY_TIERS}, got {self.history_tier!r}")
        if self.history_tier == "host" and self.host_budget_bytes is None:
            raise ValueError("MemoryConfig.history_tier='host' needs host_budget_bytes (the pinned host tier "
                             "is allocated up front)")
        _positive("MemoryConfig", page_chunk_bytes=self.page_chunk_bytes)
        for name in ("gpu_budget_bytes", "host_budget_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"MemoryConfig.{name} must be None (no budget) or a positive number of bytes, "
                                 f"got {value!r}")
        if self.history_dtype not in HISTORY_DTYPES:
            raise ValueError(f"MemoryConfig.history_dtype must be one of {HISTORY_DTYPES} (None: the compute "
                             f"dtype), got {self.history_dtype!r}")
        if self.retention not in RETENTION_POLICIES:
            raise ValueError(f"MemoryConfig.retention must be one of {RETENTION_POLICIES}, got {self.retention!r}")
        cap = self.max_history_frames
        if cap is not None:
            if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
                raise ValueError(f"MemoryConfig.max_history_frames must be None (no cap) or a positive integer, "
                                 f"got {cap!r}")
            if cap < self.frames_per_block:
                raise ValueError(f"MemoryConfig.max_history_frames={cap} is below frames_per_block="
                                 f"{self.frames_per_block}: one block evicts that many frames at once")
            if self.top_k > 0 and cap <= self.recency_guard:
                raise ValueError(f"MemoryConfig.max_history_frames={cap} must exceed recency_guard="
                                 f"{self.recency_guard}: the recency_guard newest history frames are never "
                                 "eligible, so a smaller cap would never retrieve anything")

    @property
    def local_frames(self) -> int:
        """Local context frames when all ``top_k`` retrieved frames are present."""
        return self.window - self.sink - self.top_k


ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "xformers")
KERNEL_MODES = ("auto", "triton", "reference")
RETRIEVAL_FETCH = ("per_block", "per_forward")
PAGE_TABLES = ("auto", "cpp", "python")


@dataclass
class RuntimeConfig:
    """Device, precision and schedule.

    kernels: "auto" runs Triton kernels on CUDA and the float32 references on the
        CPU; "triton" forces the kernels (off CUDA only in Triton's interpreter:
        TRITON_INTERPRET=1 set before import, else a ValueError here); "reference"
        forces the references.
    cuda_graphs: capture the steady-state forwards as CUDA graphs (CUDA only; on
        other devices the same static-buffer path runs eagerly).
    retrieval_fetch: "per_block" gathers retrieved K/V into the context once per
        block; "per_forward" fetches them from host memory again for every layer of
        every forward, as the public LongLive-RAG reference does (a benchmark baseline).
    denoising_steps: the (un-warped) step list of SPEC section 3.
    page_table: the history's page-table backend: "cpp" (the compiled extension),
        "python" (pure Python, same behaviour), "auto" (cpp when built).
    """

    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "auto"
    kernels: str = "auto"
    cuda_graphs: bool = False
    retrieval_fetch: str = "per_block"
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    page_table: str = "auto"

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)
        if self.page_table not in PAGE_TABLES:
            raise ValueError(f"RuntimeConfig.page_table must be one of {PAGE_TABLES}, got {self.page_table!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"RuntimeConfig.device {self.device!r} is not a torch device: {exc}") from None
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"RuntimeConfig.attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if self.kernels not in KERNEL_MODES:
            raise ValueError(f"RuntimeConfig.kernels must be one of {KERNEL_MODES}, got {self.kernels!r}")
        if self.kernels == "triton" and torch.device(self.device).type != "cuda":
            from .ops.dispatch import HAS_TRITON, interpreting
            if not (HAS_TRITON and interpreting()):
                why = "TRITON_INTERPRET=1 is not set" if HAS_TRITON else "triton is not installed"
                raise ValueError(
                    f"RuntimeConfig.kernels='triton' on device {self.device!r} needs the Triton CPU interpreter, "
                    f"but {why}: set TRITON_INTERPRET=1 in the environment before lrag_engine is imported, "
                    "use a CUDA device, or kernels='auto' or 'reference'")
        if self.retrieval_fetch not in RETRIEVAL_FETCH:
            raise ValueError(f"RuntimeConfig.retrieval_fetch must be one of {RETRIEVAL_FETCH}, "
                             f"got {self.retrieval_fetch!r}")
        self.denoising_steps = tuple(self.denoising_steps)
        if not self.denoising_steps:
            raise ValueError("RuntimeConfig.denoising_steps must hold at least one step")
        for step in self.denoising_steps:
            if not isinstance(step, int) or not 0 < step <= self.num_train_timesteps:
                raise ValueError(f"RuntimeConfig.denoising_steps entries must be integers in "
                                 f"(0, {self.num_train_timesteps}], got {step!r}")
        if list(self.denoising_steps) != sorted(self.denoising_steps, reverse=True):
            raise ValueError(f"RuntimeConfig.denoising_steps must be decreasing, got {self.denoising_steps}")
        if not self.shift > 0:
            raise ValueError(f"RuntimeConfig.shift must be > 0, got {self.shift}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)
