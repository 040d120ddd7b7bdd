"""A deliberately naive reference for LongLive-RAG generation (SPEC sections 2, 3, 4, 6, 7).

Written from the specification alone and sharing no code with the engine: one batch
element at a time, plain Python lists and dicts for the caches, the window and history
rebuilt from the rules for every block, plain softmax attention over the whole
context. It is slow on purpose; its only job is to be obviously right.

Everything computes in ``dtype`` (float32 or float64) except the RoPE rotation and the
sinusoidal timestep embedding, which always compute in float64, and the schedule and
cosine similarities, which are float64 Python/torch scalars.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_THETA = 10000.0
SINUSOID_BASE = 10000.0
NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------- parameters

def wan_parameter_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Wan 2.1 DiT with its Wan name and shape (SPEC section 2)."""
    d, f = cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    shapes = {
        "patch_embedding.weight": (d, cfg.in_channels, pt, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (pt * ph * pw * cfg.out_channels, d),
        "head.head.bias": (pt * ph * pw * cfg.out_channels,),
        "head.modulation": (1, 2, d),
    }
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        shapes[p + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{p}{attn}.{proj}.weight"] = (d, d)
                shapes[f"{p}{attn}.{proj}.bias"] = (d,)
            shapes[f"{p}{attn}.norm_q.weight"] = (d,)
            shapes[f"{p}{attn}.norm_k.weight"] = (d,)
        shapes[p + "norm3.weight"] = (d,)
        shapes[p + "norm3.bias"] = (d,)
        shapes[p + "ffn.0.weight"] = (f, d)
        shapes[p + "ffn.0.bias"] = (f,)
        shapes[p + "ffn.2.weight"] = (d, f)
        shapes[p + "ffn.2.bias"] = (d,)
    return shapes


def random_state_dict(cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 Wan parameters, every one non-zero, scaled so activations stay O(1).

    Zero-initialised parts (as in a fresh Wan model, whose head starts at zero) would hide
    whole code paths from a comparison, hence this instead of a model's own init.
    """
    state = {}
    for name, shape in wan_parameter_shapes(cfg).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        if name.endswith("modulation"):
            value = 0.2 * noise
        elif "norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        else:
            fan_in = math.prod(shape[1:])
            value = noise / math.sqrt(fan_in)
        state[name] = value.float()
    return state


# ----------------------------------------------------------------------------- schedule

def warped_timesteps(steps=(1000, 750, 500, 250), shift: float = 5.0) -> list[float]:
    """SPEC section 3: step ``t`` -> ``timesteps_with_final_zero[1000 - t]`` (float64)."""
    u = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64)[:-1]
    sigmas = shift * u / (1.0 + (shift - 1.0) * u)
    timesteps = NUM_TRAIN_TIMESTEPS * sigmas
    with_final_zero = torch.cat([timesteps, torch.zeros(1, dtype=torch.float64)])
    return [with_final_zero[NUM_TRAIN_TIMESTEPS - t].item() for t in steps]


# ----------------------------------------------------------------------------- layers

def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] timesteps -> [N, dim] float64 ``[cos(t*w_i) | sin(t*w_i)]``, ``w_i = 10000^(-i/half)``."""
    half = dim // 2
    w = SINUSOID_BASE ** (-torch.arange(half, dtype=torch.float64) / half)
    angle = timesteps.to(torch.float64)[:, None] * w[None, :]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


def linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return x @ state[name + ".weight"].T + state[name + ".bias"]


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dim; without affine unless weight/bias are given."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the full last dim (all heads together) with a learned weight."""
    return x / torch.sqrt((x ** 2).mean(dim=-1, keepdim=True) + eps) * weight


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Nq, heads, d], k/v [Nk, heads, d] -> [Nq, heads, d]; softmax over all Nk, no mask."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


# ----------------------------------------------------------------------------- RoPE

def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dims of the (temporal, height, width) parts of a head."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(head_dim: int, t_pos, h_pos, w_pos) -> torch.Tensor:
    """Positions [N] (each of the three axes) -> rotation angles [N, head_dim/2] float64."""
    parts = []
    for size, pos in zip(rope_split(head_dim), (t_pos, h_pos, w_pos)):
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, size, 2, dtype=torch.float64) / size)
        parts.append(torch.as_tensor(pos, dtype=torch.float64)[:, None] * inv_freq[None, :])
    return torch.cat(parts, dim=1)


def rope_rotate(x: torch.Tensor, t_pos, h_pos, w_pos) -> torch.Tensor:
    """x [N, heads, d]; positions [N] -> x with (even, odd) pairs rotated, in x's dtype.

    The pair (x[2j], x[2j+1]) is the complex number x[2j] + i*x[2j+1], multiplied by
    exp(i * angle_j) in complex128.
    """
    angles = rope_angles(x.shape[-1], t_pos, h_pos, w_pos)            # [N, d/2]
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # [N, 1, d/2]
    pairs = torch.complex(x[..., 0::2].to(torch.float64), x[..., 1::2].to(torch.float64))
    rotated = pairs * rotation
    out = torch.empty(x.shape, dtype=torch.float64)
    out[..., 0::2] = rotated.real
    out[..., 1::2] = rotated.imag
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- patches

def patchify(x: torch.Tensor, patch_size) -> torch.Tensor:
    """[F, C, H, W] -> [F*h*w, C*pt*ph*pw] patch vectors in (C, pt, ph, pw) order, tokens (f, i, j)."""
    pt, ph, pw = patch_size
    frames, channels, height, width = x.shape
    assert pt == 1, "a causal model patches one frame at a time"
    h, w = height // ph, width // pw
    return (x.reshape(frames, channels, h, ph, w, pw)
             .permute(0, 2, 4, 1, 3, 5)
             .reshape(frames * h * w, channels * ph * pw))


def unpatchify(tokens: torch.Tensor, frames: int, height: int, width: int, patch_size, channels: int):
    """[F*h*w, pt*ph*pw*C] head outputs (C fastest) -> [F, C, H, W]."""
    pt, ph, pw = patch_size
    h, w = height // ph, width // pw
    return (tokens.reshape(frames, h, w, ph, pw, channels)
                  .permute(0, 5, 1, 3, 2, 4)
                  .reshape(frames, channels, height, width))


# ----------------------------------------------------------------------------- window rules

@dataclass
class BlockWindow:
    """What the rules of SPEC section 4 say about one block.

    window: global frame ids in the window after inserting this block, oldest first.
    evicted: frames this block evicts (into the history, in this order).
    history_before: the history (eviction order) before this block's evictions.
    """

    block: int
    frames: list[int]
    window: list[int]
    evicted: list[int]
    history_before: list[int]


class HistoryOverflow(Exception):
    """The history outgrew its capacity under the "error" overflow policy."""


def priming_block_sizes(num_given: int, frames_per_block: int) -> list[int]:
    """Given clean frames enter as blocks of [n mod F (when not 0), F, F, ...]."""
    remainder = num_given % frames_per_block
    return ([remainder] if remainder else []) + [frames_per_block] * (num_given // frames_per_block)


def plan_windows(num_blocks: int, frames_per_block: int, window: int, sink: int,
                 capacity: int | None = None, overflow: str = "drop_oldest",
                 leading_blocks: list[int] | None = None) -> list[BlockWindow]:
    """Simulate the window frame by frame: sinks never leave, the oldest non-sink frames go.

    capacity: history frames kept (None: all). Past it, ``overflow="drop_oldest"``
    forgets the oldest history frames one by one; ``"error"`` raises HistoryOverflow.
    leading_blocks: sizes of blocks (of given frames) before the ``num_blocks`` blocks of
    ``frames_per_block``; they are planned by the same rules.
    """
    in_window: list[int] = []
    history: list[int] = []
    evicted_ever: list[int] = []
    plans = []
    sizes = list(leading_blocks or []) + [frames_per_block] * num_blocks
    next_frame = 0
    for block, size in enumerate(sizes):
        frames = list(range(next_frame, next_frame + size))
        next_frame += size
        history_before = list(history)
        evicted = []
        while len(in_window) + size > window:
            victim = next(f for f in in_window if f >= sink)
            in_window.remove(victim)
            history.append(victim)
            evicted.append(victim)
            evicted_ever.append(victim)
            if capacity is not None and len(history) > capacity:
                if overflow == "error":
                    raise HistoryOverflow(f"block {block}: history of {len(history)} frames > {capacity}")
                history.pop(0)
        in_window.extend(frames)
        plans.append(BlockWindow(block, frames, list(in_window), evicted, history_before))
    for i, frame in enumerate(evicted_ever):
        assert frame == sink + i, "evicted frame i must be global frame sink + i"
    return plans


def history_capacity(cfg, batch: int, dtype: torch.dtype, top_k: int, frames_per_block: int,
                     gpu_budget_bytes: int | None, host_budget_bytes: int | None,
                     history_tier: str = "device") -> int | None:
    """Frames a history keeps under byte budgets, by the rule the engine documents.

    A page is the K and V of one frame, one layer, one stream: 2 x tokens x dim values.
    Each budget holds whole pages; a frame is num_layers x batch pages. With the host
    tier the device holds a staging pool of top_k + frames_per_block frames whose
    pages hold history too. None: no device budget, nothing is ever dropped.
    """
    page_bytes = 2 * cfg.tokens_per_frame * cfg.dim * torch.empty(0, dtype=dtype).element_size()
    pages_per_frame = cfg.num_layers * batch
    if history_tier == "host":
        gpu_pages = (top_k + frames_per_block) * pages_per_frame
    elif gpu_budget_bytes is None:
        return None
    else:
        gpu_pages = gpu_budget_bytes // page_bytes
    host_pages = 0 if host_budget_bytes is None else host_budget_bytes // page_bytes
    return (gpu_pages + host_pages) // pages_per_frame


def eligible_frames(history_before: list[int], recency_guard: int) -> list[int]:
    """History minus its ``recency_guard`` most recently evicted frames."""
    return history_before[:max(0, len(history_before) - recency_guard)]


def rank_frames(query: torch.Tensor, descriptors: dict[int, torch.Tensor], eligible: list[int]):
    """Cosine similarity of query [C] with each eligible frame's descriptor [C].

    Returns [(similarity, frame id)] over all eligible frames, best first, ties to the
    lower id.
    """
    q = query.to(torch.float64)
    scored = []
    for frame in eligible:
        d = descriptors[frame].to(torch.float64)
        scored.append((float(q @ d / (q.norm() * d.norm())), frame))
    return sorted(scored, key=lambda item: (-item[0], item[1]))


def retrieve(query: torch.Tensor, descriptors: dict[int, torch.Tensor], eligible: list[int], top_k: int):
    """Top ``min(top_k, len(eligible))`` frames: (selected ids, similarities), best first.

    Also returns the margin: the smallest score gap among the first top_k + 1 ranks
    (inf when fewer than two), i.e. how far the selection is from a tie.
    """
    ranked = rank_frames(query, descriptors, eligible)
    best = ranked[:min(top_k, len(ranked))]
    contested = [score for score, _ in ranked[:top_k + 1]]
    margin = min((a - b for a, b in zip(contested, contested[1:])), default=math.inf)
    return [frame for _, frame in best], [score for score, _ in best], margin


@dataclass
class ContextEntry:
    """One frame of the attention context and the RoPE temporal index its K gets."""

    frame: int
    temporal: int


@dataclass
class BlockContext:
    entries: list[ContextEntry]   # [sink | retrieved | local]
    query_temporal: list[int]     # temporal index of each frame of the block


def block_context(plan: BlockWindow, window: int, sink: int, top_k: int, retrieved: list[int],
                  widen_local_until_memory: bool) -> BlockContext:
    """Attention context of one block; positions re-based on window slots."""
    slot = {frame: i for i, frame in enumerate(plan.window)}
    sink_frames = [f for f in plan.window if f < sink]
    non_sink = [f for f in plan.window if f >= sink]
    local_count = window - sink - (len(retrieved) if widen_local_until_memory else top_k)
    if local_count <= 0:
        raise ValueError(f"window - sink - retrieved = {local_count}: no local frames left")
    local = non_sink[-local_count:]
    assert all(f in local or f in sink_frames for f in plan.frames), "the block must see itself"
    query_temporal = [slot[f] for f in plan.frames]
    assert query_temporal == list(range(len(plan.window) - len(plan.frames), len(plan.window)))
    entries = ([ContextEntry(f, slot[f]) for f in sink_frames]
               + [ContextEntry(f, 0) for f in retrieved]
               + [ContextEntry(f, slot[f]) for f in local])
    return BlockContext(entries, query_temporal)


# ----------------------------------------------------------------------------- DiT forward

def dit_forward(state: dict, cfg, x: torch.Tensor, timesteps: list[float], text_tokens: torch.Tensor,
                context: BlockContext, block_frames: list[int], cache: list[dict]):
    """One causal Wan forward of one block of one sample.

    x: [F, C, H, W] block latents; timesteps: per frame; text_tokens: [text_len, dim]
    (already through text_embedding); cache[layer][frame] = (k, v), each [h*w, dim],
    k un-rotated after RMSNorm. Returns (flow [F, C_out, H, W], the block's new
    (k, v) per layer, each [F, h*w, dim]).
    """
    frames, _, height, width = x.shape
    _, ph, pw = cfg.patch_size
    h, w = height // ph, width // pw
    hw = h * w
    heads, head_dim, dim = cfg.num_heads, cfg.head_dim, cfg.dim
    eps = cfg.eps
    dtype = x.dtype

    weight = state["patch_embedding.weight"].reshape(dim, -1)
    tokens = patchify(x, cfg.patch_size) @ weight.T + state["patch_embedding.bias"]  # [F*hw, dim]

    sinusoid = sinusoidal_embedding(torch.tensor(timesteps, dtype=torch.float64), cfg.freq_dim).to(dtype)
    time_emb = linear(silu(linear(sinusoid, state, "time_embedding.0")), state, "time_embedding.2")  # [F, dim]
    time_proj = linear(silu(time_emb), state, "time_projection.1").reshape(frames, 6, dim)

    grid_h = torch.arange(h).repeat_interleave(w)   # [hw] row of each token of a frame
    grid_w = torch.arange(w).repeat(h)              # [hw] column
    query_t = torch.tensor(context.query_temporal).repeat_interleave(hw)
    query_h, query_w = grid_h.repeat(frames), grid_w.repeat(frames)
    block_offset = {frame: i for i, frame in enumerate(block_frames)}

    new_kv = []
    for layer in range(cfg.num_layers):
        p = f"blocks.{layer}."
        modulation = (state[p + "modulation"][0] + time_proj).repeat_interleave(hw, dim=0)  # [F*hw, 6, dim]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = modulation.unbind(dim=1)

        y = layer_norm(tokens, eps) * (1 + scale_sa) + shift_sa
        q = rms_norm(linear(y, state, p + "self_attn.q"), state[p + "self_attn.norm_q.weight"], eps)
        k = rms_norm(linear(y, state, p + "self_attn.k"), state[p + "self_attn.norm_k.weight"], eps)
        v = linear(y, state, p + "self_attn.v")
        block_k, block_v = k.reshape(frames, hw, dim), v.reshape(frames, hw, dim)
        new_kv.append((block_k, block_v))

        context_k, context_v = [], []
        for entry in context.entries:
            if entry.frame in block_offset:
                frame_k, frame_v = block_k[block_offset[entry.frame]], block_v[block_offset[entry.frame]]
            else:
                frame_k, frame_v = cache[layer][entry.frame]
            temporal = torch.full((hw,), entry.temporal)
            context_k.append(rope_rotate(frame_k.reshape(hw, heads, head_dim), temporal, grid_h, grid_w))
            context_v.append(frame_v.reshape(hw, heads, head_dim))
        rotated_q = rope_rotate(q.reshape(frames * hw, heads, head_dim), query_t, query_h, query_w)
        attended = attention(rotated_q, torch.cat(context_k), torch.cat(context_v))
        tokens = tokens + linear(attended.reshape(frames * hw, dim), state, p + "self_attn.o") * gate_sa

        y = layer_norm(tokens, eps, state[p + "norm3.weight"], state[p + "norm3.bias"])
        cq = rms_norm(linear(y, state, p + "cross_attn.q"), state[p + "cross_attn.norm_q.weight"], eps)
        ck = rms_norm(linear(text_tokens, state, p + "cross_attn.k"), state[p + "cross_attn.norm_k.weight"], eps)
        cv = linear(text_tokens, state, p + "cross_attn.v")
        attended = attention(cq.reshape(-1, heads, head_dim), ck.reshape(-1, heads, head_dim),
                             cv.reshape(-1, heads, head_dim))
        tokens = tokens + linear(attended.reshape(frames * hw, dim), state, p + "cross_attn.o")

        y = layer_norm(tokens, eps) * (1 + scale_ff) + shift_ff
        tokens = tokens + linear(gelu_tanh(linear(y, state, p + "ffn.0")), state, p + "ffn.2") * gate_ff

    head_mod = (state["head.modulation"][0] + time_emb[:, None, :]).repeat_interleave(hw, dim=0)  # [F*hw, 2, dim]
    shift, scale = head_mod.unbind(dim=1)
    out = linear(layer_norm(tokens, eps) * (1 + scale) + shift, state, "head.head")
    flow = unpatchify(out, frames, height, width, cfg.patch_size, cfg.out_channels)
    return flow, new_kv


def embed_text(state: dict, cfg, text: torch.Tensor) -> torch.Tensor:
    """[L, text_dim] with L <= text_len -> [text_len, dim]: zero-pad, then text_embedding."""
    if text.shape[0] > cfg.text_len:
        raise ValueError(f"text length {text.shape[0]} exceeds text_len {cfg.text_len}")
    padded = torch.zeros(cfg.text_len, cfg.text_dim, dtype=text.dtype)
    padded[:text.shape[0]] = text
    return linear(gelu_tanh(linear(padded, state, "text_embedding.0")), state, "text_embedding.2")


# ----------------------------------------------------------------------------- prompt switch

def switch_context(window_frames: list[int], sink: int, recache_sink: bool) -> tuple[BlockContext, list[int]]:
    """SPEC section 7: the context of the recache pass that a text switch runs.

    window_frames: the window before the switch, oldest first. The recomputed frames are
    the non-sink ones (every one with ``recache_sink``); they query at their window
    slots, and the keys/values are [sink | recomputed frames], each at its window slot.
    Returns (context, recomputed frames).
    """
    slot = {frame: i for i, frame in enumerate(window_frames)}
    redo = [f for f in window_frames if recache_sink or f >= sink]
    kept = [] if recache_sink else [f for f in window_frames if f < sink]
    entries = [ContextEntry(f, slot[f]) for f in kept] + [ContextEntry(f, slot[f]) for f in redo]
    return BlockContext(entries, [slot[f] for f in redo]), redo


def recache_window(state, cfg, window_frames: list[int], sink: int, recache_sink: bool, latents: torch.Tensor,
                   text_tokens: torch.Tensor, cache: list[dict]) -> list[int]:
    """Recompute the window's K/V under ``text_tokens`` from the clean ``latents [T, C, H, W]``:
    one forward at timestep 0, outputs discarded; the new K/V replace the old ones in
    ``cache`` (history frames are not touched). Returns the recomputed frames."""
    context, redo = switch_context(window_frames, sink, recache_sink)
    if not redo:
        return []
    _, new_kv = dit_forward(state, cfg, latents[redo], [0.0] * len(redo), text_tokens, context, redo, cache)
    for layer, (k, v) in enumerate(new_kv):
        for offset, frame in enumerate(redo):
            cache[layer][frame] = (k[offset], v[offset])
    return redo


# ----------------------------------------------------------------------------- generation

def _generate_one(state, cfg, noise, text, renoise, plans, timesteps, window, sink, top_k,
                  recency_guard, widen, switches=None, recache_sink=False, caches=None, given=None):
    """One batch element: noise [T, C, H, W], text [L, text_dim], renoise list of [F, C, H, W].

    switches: {block: text [L, text_dim]} (SPEC section 7); caches: a list that gets this
    element's final K/V cache. given: clean frames [n, C, H, W] that the first plans
    (blocks of sizes ``priming_block_sizes``) write into the cache with the timestep-0
    pass only; they get no log entry, and block numbers in ``switches`` and the log
    count the generated blocks only. Returns the generated latents only."""
    n_given = 0 if given is None else given.shape[0]
    primes = len(priming_block_sizes(n_given, len(plans[-1].frames))) if n_given else 0
    if primes and switches:
        switches = dict(switches)
        if 0 in switches:
            text = switches.pop(0)   # block 0's text: the given frames run under it too
        switches = {block + primes: t for block, t in switches.items()}
    text_tokens = embed_text(state, cfg, text)
    cache: list[dict] = [{} for _ in range(cfg.num_layers)]
    if caches is not None:
        caches.append(cache)
    descriptors: dict[int, torch.Tensor] = {}
    latents = torch.empty(n_given + noise.shape[0], *noise.shape[1:], dtype=noise.dtype)
    if n_given:
        latents[:n_given] = given
    logs = []
    renoise_iter = iter(renoise)
    for plan in plans:
        if plan.block < primes:
            # Given frames: the block is the clean frames, written by the recache pass alone.
            query_frame, selected = None, []
            if top_k > 0 and plan.block > 0:
                query_frame = plan.frames[0] - 1
                selected, _, _ = retrieve(descriptors[query_frame], descriptors,
                                          eligible_frames(plan.history_before, recency_guard), top_k)
            context = block_context(plan, window, sink, top_k, selected, widen)
            x0 = latents[plan.frames[0]:plan.frames[-1] + 1]
            for offset, frame in enumerate(plan.frames):
                descriptors[frame] = x0[offset].mean(dim=(-2, -1))
            _, new_kv = dit_forward(state, cfg, x0, [0.0] * len(plan.frames), text_tokens, context,
                                    plan.frames, cache)
            for layer, (k, v) in enumerate(new_kv):
                for offset, frame in enumerate(plan.frames):
                    cache[layer][frame] = (k[offset], v[offset])
            continue
        if switches and plan.block in switches:
            text_tokens = embed_text(state, cfg, switches[plan.block])
            if plan.block > 0:
                recache_window(state, cfg, plans[plan.block - 1].window, sink, recache_sink, latents,
                               text_tokens, cache)
        query_frame, selected, similarities, margin = None, [], [], math.inf
        if top_k > 0 and plan.block > 0:
            query_frame = plan.frames[0] - 1
            selected, similarities, margin = retrieve(descriptors[query_frame], descriptors,
                                              eligible_frames(plan.history_before, recency_guard), top_k)
        context = block_context(plan, window, sink, top_k, selected, widen)
        start, stop = plan.frames[0], plan.frames[-1] + 1
        n = len(plan.frames)

        x = noise[start - n_given:stop - n_given]
        for i, t in enumerate(timesteps):
            flow, _ = dit_forward(state, cfg, x, [t] * n, text_tokens, context, plan.frames, cache)
            x0 = x - (t / NUM_TRAIN_TIMESTEPS) * flow
            if i + 1 < len(timesteps):
                sigma_next = timesteps[i + 1] / NUM_TRAIN_TIMESTEPS
                x = (1 - sigma_next) * x0 + sigma_next * next(renoise_iter)
        latents[start:stop] = x0
        for offset, frame in enumerate(plan.frames):
            descriptors[frame] = x0[offset].mean(dim=(-2, -1))

        _, new_kv = dit_forward(state, cfg, x0, [0.0] * n, text_tokens, context, plan.frames, cache)
        for layer, (k, v) in enumerate(new_kv):
            for offset, frame in enumerate(plan.frames):
                cache[layer][frame] = (k[offset], v[offset])
        logs.append((query_frame, selected, similarities, margin))
    return latents[n_given:], logs


def naive_generate(state_dict, model_cfg, window, sink, top_k, recency_guard, frames_per_block,
                   noise, text, renoise, steps=(1000, 750, 500, 250), shift=5.0,
                   widen_local_until_memory=False, dtype=torch.float32, history_capacity=None,
                   overflow="drop_oldest", text_timeline=None, recache_sink=False, caches=None,
                   initial_latents=None):
    """Generate a video the slow, obvious way.

    noise: [B, T, C, H, W]; text: [B, L, text_dim]; renoise: one [B, F, C, H, W] per block
    and non-final step, block-major. history_capacity / overflow: see ``plan_windows``
    (HistoryOverflow before any work when the "error" policy would trip).
    text_timeline: {block: text [B, L, text_dim]}: the text switches before that block
    (SPEC section 7, ``recache_sink`` as there; at block 0 it just replaces ``text``).
    caches: a list that gets each batch element's final K/V cache, [layer][frame] -> (k, v).
    initial_latents: clean frames [B, n, C, H, W] the stream starts from: before the
    generated blocks they enter as blocks of sizes [n mod F (when not 0), F, F, ...], each
    written by one timestep-0 forward under the same context rules (no denoising, no
    log entry); generated frame ids then start at n, and only the generated latents are
    returned; log block numbers and ``text_timeline`` keys count the generated blocks.
    Returns (latents [B, T, C, H, W] in ``dtype``, log),
    log holding one dict per block: block, frames (start, stop), query_frame (global id
    or None), selected (per batch element, global ids best first), similarities, and
    margin (smallest score gap that decided the selection, over the batch).
    """
    batch, num_frames = noise.shape[:2]
    if num_frames % frames_per_block:
        raise ValueError(f"num_frames {num_frames} is not a multiple of frames_per_block {frames_per_block}")
    num_blocks = num_frames // frames_per_block
    expected = num_blocks * (len(steps) - 1)
    if len(renoise) != expected:
        raise ValueError(f"renoise holds {len(renoise)} tensors, expected {expected}")
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in state_dict.items()}
    missing = set(wan_parameter_shapes(model_cfg)) - set(state)
    if missing:
        raise KeyError(f"state dict lacks {sorted(missing)}")
    n_given = 0 if initial_latents is None else initial_latents.shape[1]
    leading = priming_block_sizes(n_given, frames_per_block)
    plans = plan_windows(num_blocks, frames_per_block, window, sink, history_capacity, overflow,
                         leading_blocks=leading)
    timesteps = warped_timesteps(steps, shift)

    latents, per_element = [], []
    for b in range(batch):
        switches = {block: t[b].to(dtype) for block, t in (text_timeline or {}).items()}
        out, logs = _generate_one(state, model_cfg, noise[b].to(dtype), text[b].to(dtype),
                                  [r[b].to(dtype) for r in renoise], plans, timesteps,
                                  window, sink, top_k, recency_guard, widen_local_until_memory,
                                  switches, recache_sink, caches,
                                  None if initial_latents is None else initial_latents[b].to(dtype))
        latents.append(out)
        per_element.append(logs)

    log = []
    for block, plan in enumerate(plans[len(leading):]):
        query_frames = {per_element[b][block][0] for b in range(batch)}
        assert len(query_frames) == 1
        log.append({
            "block": block,
            "frames": (plan.frames[0], plan.frames[-1] + 1),
            "query_frame": query_frames.pop(),
            "selected": [per_element[b][block][1] for b in range(batch)],
            "similarities": [per_element[b][block][2] for b in range(batch)],
            "margin": min(per_element[b][block][3] for b in range(batch)),
        })
    return torch.stack(latents), log
