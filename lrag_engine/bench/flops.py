"""FLOP model of one engine block (PERF.md: ~141 TFLOP per block at Wan 1.3B shapes)."""
from __future__ import annotations

import math

from ..config import MemoryConfig, ModelConfig


def forward_flops(cfg: ModelConfig, batch: int, frames: int, context_frames: int) -> dict:
    """FLOPs of one DiT forward over one block (a multiply-add counts 2).

    m = batch * frames * tokens_per_frame query tokens; the self-attention keys are the
    whole context ``[sink | retrieved | local | block]`` = context_frames * tokens_per_frame.
    Per layer: self-attention q, k, v, o (4 d^2 per token), cross-attention q, o (2 d^2; the
    text K/V are computed once per prompt), FFN (2 d ffn); then QK^T and PV over the
    context (2 x 2 m Lk d) and over the text (2 x 2 m text_len d). Outside the layers:
    patch embedding, time embedding (per frame) and head; LayerNorm, RoPE, softmax and
    elementwise work are not counted. At the PERF.md shapes (m = 4680, Lk = 18720) this
    gives 11.7 TFLOP linear + 16.2 self-attention + 0.4 cross-attention per forward.
    """
    n = cfg.tokens_per_frame
    d, ffn, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    patch = math.prod(cfg.patch_size)
    m = batch * frames * n
    per_layer = 2 * m * (4 * d * d + 2 * d * d + 2 * d * ffn)
    outside = (2 * m * cfg.in_channels * patch * d                         # patch embedding
               + 2 * batch * frames * (cfg.freq_dim * d + d * d + d * 6 * d)  # time embedding + projection
               + 2 * m * d * patch * cfg.out_channels)                      # head
    linear = layers * per_layer + outside
    self_attention = layers * 4 * m * context_frames * n * d
    cross_attention = layers * 4 * m * cfg.text_len * d
    return {"linear": linear, "self_attention": self_attention, "cross_attention": cross_attention,
            "total": linear + self_attention + cross_attention}


def context_frames(memory: MemoryConfig, block: int, retrieved: int) -> int:
    """Frames of the attention context of ``block`` (its own frames included) when
    ``retrieved`` frames come from the history (SPEC section 4)."""
    in_window = min(memory.window, (block + 1) * memory.frames_per_block)
    local_budget = memory.window - memory.sink - (retrieved if memory.widen_local_until_memory else memory.top_k)
    return min(memory.sink, in_window) + retrieved + min(local_budget, max(0, in_window - memory.sink))


def block_flops(cfg: ModelConfig, memory: MemoryConfig, forwards: int, batch: int, block: int,
                retrieved: int) -> int:
    """FLOPs of one whole block: ``forwards`` (denoising steps + recache) forwards."""
    ctx = context_frames(memory, block, retrieved)
    return forwards * forward_flops(cfg, batch, memory.frames_per_block, ctx)["total"]
