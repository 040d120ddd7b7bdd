"""RetrievalAttention driving a non-Wan toy backbone, against a naive keep-everything reference.

The toy backbone (plain multi-head self-attention layers with their own q/k/v/o
projections, a residual and an MLP) maps a block's latents ``[B, F, C, h, w]`` to the
same shape and calls ``self_attention(layer, q, k, v)`` for its attention. It is driven
block by block twice with the same noise:

- through ``lrag_engine.RetrievalAttention`` exactly as its module docstring shows;
- through :class:`NaiveMemory`, written here from SPEC section 4 alone and sharing no
  code with ``lrag_engine.memory``: it keeps every frame's un-rotated K/V per layer and
  its descriptor forever, re-derives the window / history / eligibility / top-K /
  context / positions for each block from the rules, rotates K and q with the angle
  formula of the position encoding (float64), and does plain softmax attention.

Latents (every block's clean output and its recache-pass output) must agree within the
float32 tolerance and every block must retrieve the same global frames (the
attention's BlockLog). The ``test_reference_is_sensitive`` cases check the other
direction: a naive reference with one rule changed must NOT agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

import lrag_engine.ops.search_topk as search_topk_module
import lrag_engine.ops.splice as splice_module
from lrag_engine import MemoryConfig, RetrievalAttention
from lrag_engine.ops.dispatch import interpreting
from lrag_engine.ops.rope import RopeTables
from lrag_engine.testing import assert_close

STEPS = 2            # denoising forwards per block
CHANNELS, GRID = 4, (2, 2)


# ----------------------------------------------------------------------------- toy backbone

class ToyLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class ToyBackbone(nn.Module):
    """[B, F, C, h, w] -> [B, F, C, h, w]; tokens frame-major, row-major (h, w) in a frame."""

    def __init__(self, channels: int, num_layers: int, num_heads: int, head_dim: int, seed: int) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.embed = nn.Linear(channels, dim)
        self.layers = nn.ModuleList(ToyLayer(dim) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if "norm" in name:
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
                elif name.endswith("bias"):
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / math.sqrt(p.shape[1]))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, self_attention) -> torch.Tensor:
        b, f, c, h, w = x.shape
        tokens = f * h * w
        t = self.embed(x.permute(0, 1, 3, 4, 2).reshape(b, tokens, c))
        for i, layer in enumerate(self.layers):
            y = layer.norm1(t)
            q, k, v = (proj(y).view(b, tokens, self.num_heads, self.head_dim) for proj in (layer.q, layer.k, layer.v))
            out = self_attention(i, q, k, v)
            assert out.shape == q.shape
            t = t + layer.o(out.reshape(b, tokens, -1))
            t = t + layer.mlp(layer.norm2(t))
        return self.head(self.norm_out(t)).view(b, f, h, w, c).permute(0, 1, 4, 2, 3)


# ----------------------------------------------------------------------------- angles (naive side)

def angles_none(position: int, tokens: int, head_dim: int) -> torch.Tensor:
    return torch.zeros(tokens, head_dim // 2, dtype=torch.float64)


def angles_rope1d(position: int, tokens: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Pair (2c, 2c+1) rotates by position * theta^(-2c/D), the same for every token."""
    c = torch.arange(head_dim // 2, dtype=torch.float64)
    return (position * theta ** (-2 * c / head_dim)).expand(tokens, -1)


def angles_split(position: int, tokens: int, head_dim: int, theta_t: float, pairs_t: int,
                 theta_tok: float) -> torch.Tensor:
    """First ``pairs_t`` pairs: temporal, position * theta_t^(-c/pairs_t); the others:
    token index * theta_tok^(-j/rest)."""
    c = torch.arange(pairs_t, dtype=torch.float64)
    rest = head_dim // 2 - pairs_t
    j = torch.arange(rest, dtype=torch.float64)
    temporal = (position * theta_t ** (-c / pairs_t)).expand(tokens, -1)
    per_token = torch.arange(tokens, dtype=torch.float64)[:, None] * theta_tok ** (-j / rest)[None, :]
    return torch.cat([temporal, per_token], dim=1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; angles [N, D/2] float64: pair (x[2c], x[2c+1]) times exp(i * angle)."""
    pairs = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.stack([rotated.real, rotated.imag], dim=-1).flatten(-2)   # float64


# ----------------------------------------------------------------------------- user encodings

class OtherThetaRope:
    """A user's 1-D RoPE with theta=100 (a PositionEncoding by duck typing)."""

    theta = 100.0

    def tables(self, max_frames, tokens_per_frame, head_dim, device):
        ang = torch.stack([angles_rope1d(p, 1, head_dim, self.theta)[0] for p in range(max_frames)])
        empty = torch.empty(tokens_per_frame, 0)
        return RopeTables(ang.cos().float(), ang.sin().float(), empty, empty.clone())

    def angles(self, position, tokens, head_dim):
        return angles_rope1d(position, tokens, head_dim, self.theta)


class SplitRope:
    """A user's encoding with a temporal part (theta 500, 2 pairs) and a per-token part."""

    theta_t, pairs_t, theta_tok = 500.0, 2, 30.0

    def tables(self, max_frames, tokens_per_frame, head_dim, device):
        temporal = torch.stack([self._angles(p, 1, head_dim)[0, :self.pairs_t] for p in range(max_frames)])
        per_token = self._angles(0, tokens_per_frame, head_dim)[:, self.pairs_t:]
        f32 = dict(dtype=torch.float32, device=device)
        return RopeTables(temporal.cos().to(**f32), temporal.sin().to(**f32), per_token.cos().to(**f32),
                          per_token.sin().to(**f32))

    def _angles(self, position, tokens, head_dim):
        return angles_split(position, tokens, head_dim, self.theta_t, self.pairs_t, self.theta_tok)

    angles = _angles


# ----------------------------------------------------------------------------- naive reference

@dataclass
class NaiveRules:
    window: int
    sink: int
    top_k: int
    recency_guard: int
    frames_per_block: int
    retrieved_position: int = 0      # SPEC: 0; changed only by the sensitivity test
    local_frames: int | None = None  # SPEC: window - sink - top_k


@dataclass
class NaiveLog:
    selected: list[list[int]]
    similarities: list[list[float]]
    margins: list[float]
    eligible: int
    query_frame: int | None


class NaiveMemory:
    """Keeps everything; rebuilds each block's context from SPEC section 4."""

    def __init__(self, rules: NaiveRules, batch: int, num_layers: int, tokens_per_frame: int, angles) -> None:
        self.rules, self.batch, self.tokens = rules, batch, tokens_per_frame
        self.angles = angles
        self.kv = [[{} for _ in range(num_layers)] for _ in range(batch)]   # [b][layer][frame] = (k, v)
        self.desc: list[dict[int, torch.Tensor]] = [{} for _ in range(batch)]
        self.window: list[int] = []      # global frame ids, oldest first
        self.history: list[int] = []     # eviction order
        self.next_frame = 0

    def begin_block(self) -> NaiveLog:
        r = self.rules
        frames = list(range(self.next_frame, self.next_frame + r.frames_per_block))
        history_before = list(self.history)
        while len(self.window) + len(frames) > r.window:          # evict the oldest non-sink frames
            victim = next(f for f in self.window if f >= r.sink)
            self.window.remove(victim)
            self.history.append(victim)
        self.window += frames
        eligible = history_before[:max(0, len(history_before) - r.recency_guard)]
        query_frame = frames[0] - 1 if frames[0] > 0 and r.top_k > 0 else None
        log = NaiveLog([], [], [], len(eligible), query_frame)
        for b in range(self.batch):
            if query_frame is None:
                ranked = []
            else:
                q = self.desc[b][query_frame]
                scored = [(float(q @ self.desc[b][f] / (q.norm() * self.desc[b][f].norm())), f) for f in eligible]
                ranked = sorted(scored, key=lambda s: (-s[0], s[1]))     # best first, ties to the lower id
            best = ranked[:r.top_k]
            log.selected.append([f for _, f in best])
            log.similarities.append([s for s, _ in best])
            contested = [s for s, _ in ranked[:r.top_k + 1]]
            log.margins.append(min((a - c for a, c in zip(contested, contested[1:])), default=math.inf))
        slot = {f: i for i, f in enumerate(self.window)}
        local_count = r.window - r.sink - r.top_k if r.local_frames is None else r.local_frames
        sinks = [f for f in self.window if f < r.sink]
        local = [f for f in self.window if f >= r.sink][-local_count:]
        assert set(frames) <= set(local) | set(sinks)
        self.frames = frames
        self.block_positions = [slot[f] for f in frames]
        self.entries = [[(f, slot[f]) for f in sinks] + [(f, r.retrieved_position) for f in log.selected[b]]
                        + [(f, slot[f]) for f in local] for b in range(self.batch)]
        self.next_frame += len(frames)
        return log

    def attention(self, recache: bool):
        def self_attention(layer, q, k, v):
            batch, length, heads, head_dim = q.shape
            n, nf = self.tokens, len(self.frames)
            out = torch.empty_like(q)
            for b in range(batch):
                block_k, block_v = k[b].view(nf, n, heads, head_dim), v[b].view(nf, n, heads, head_dim)
                if recache:
                    for i, f in enumerate(self.frames):
                        self.kv[b][layer][f] = (block_k[i].clone(), block_v[i].clone())
                ctx_k, ctx_v = [], []
                for f, position in self.entries[b]:
                    if f in self.frames:
                        fk, fv = block_k[self.frames.index(f)], block_v[self.frames.index(f)]
                    else:
                        fk, fv = self.kv[b][layer][f]
                    ctx_k.append(rotate(fk, self.angles(position, n, head_dim)))
                    ctx_v.append(fv.double())
                qb = torch.cat([rotate(q[b].view(nf, n, heads, head_dim)[i], self.angles(p, n, head_dim))
                                for i, p in enumerate(self.block_positions)])
                ck, cv = torch.cat(ctx_k), torch.cat(ctx_v)
                scores = torch.einsum("qhd,khd->hqk", qb, ck) / math.sqrt(head_dim)
                out[b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), cv).to(q.dtype)
            return out
        return self_attention

    def end_block(self, clean: torch.Tensor) -> None:
        for b in range(self.batch):
            for i, f in enumerate(self.frames):
                self.desc[b][f] = clean[b, i].double().mean(dim=(-2, -1))   # spatial mean per channel

    def start_retrieval(self) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- driver

def generate(model: ToyBackbone, memory, blocks: int, batch: int, frames_per_block: int, seed: int):
    """Drive ``memory`` block by block as RetrievalAttention's docstring shows; returns
    per block (clean latents, recache-pass output, log)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for block in range(blocks):
        x = torch.randn(batch, frames_per_block, CHANNELS, *GRID, generator=g)
        log = memory.begin_block()
        for _ in range(STEPS):
            pred = model(x, self_attention=memory.attention(recache=False))
            x = 0.5 * x + 0.5 * pred
        memory.end_block(x)
        if block % 3 == 1:
            memory.start_retrieval()            # before the recache pass (it overlaps with it)
        recached = model(x, self_attention=memory.attention(recache=True))
        if block % 3 == 2:
            memory.start_retrieval()            # after it
        out.append((x, recached, log() if callable(log) else log))
    memory.close()
    return out


@dataclass(frozen=True)
class Case:
    positions: str = "rope1d"
    batch: int = 1
    frames_per_block: int = 2
    blocks: int = 11
    window: int = 6
    sink: int = 1
    top_k: int = 2
    recency_guard: int = 1
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 8
    kernels: str = "reference"
    page_table: str = "auto"
    seed: int = 0


NAMED_ANGLES = {"none": angles_none, "rope1d": angles_rope1d}


class OnDevice:
    """The attention on ``device`` while the backbone stays on the CPU: moves q/k/v and the
    clean latents there and the outputs back."""

    def __init__(self, attn: RetrievalAttention, device: torch.device) -> None:
        self.attn, self.device = attn, device

    def begin_block(self):
        return self.attn.begin_block()

    def attention(self, recache: bool):
        fn = self.attn.attention(recache=recache)
        return lambda layer, q, k, v: fn(layer, q.to(self.device), k.to(self.device), v.to(self.device)).cpu()

    def end_block(self, clean: torch.Tensor) -> None:
        self.attn.end_block(clean.to(self.device))

    def start_retrieval(self) -> None:
        self.attn.start_retrieval()

    def close(self) -> None:
        self.attn.close()


def run_engine(case: Case, positions=None, device: str = "cpu"):
    model = ToyBackbone(CHANNELS, case.num_layers, case.num_heads, case.head_dim, seed=case.seed)
    memory = MemoryConfig(window=case.window, sink=case.sink, top_k=case.top_k, recency_guard=case.recency_guard,
                          frames_per_block=case.frames_per_block)
    attn = RetrievalAttention(case.num_layers, case.num_heads, case.head_dim, GRID[0] * GRID[1], memory,
                              positions=case.positions if positions is None else positions, batch=case.batch,
                              latent_channels=CHANNELS, kernels=case.kernels, page_table=case.page_table,
                              device=device)
    driven = attn if device == "cpu" else OnDevice(attn, torch.device(device))
    return generate(model, driven, case.blocks, case.batch, case.frames_per_block, seed=case.seed + 1)


def run_naive(case: Case, angles, **rule_changes):
    model = ToyBackbone(CHANNELS, case.num_layers, case.num_heads, case.head_dim, seed=case.seed)
    rules = NaiveRules(case.window, case.sink, case.top_k, case.recency_guard, case.frames_per_block)
    memory = NaiveMemory(replace(rules, **rule_changes), case.batch, case.num_layers, GRID[0] * GRID[1], angles)
    return generate(model, memory, case.blocks, case.batch, case.frames_per_block, seed=case.seed + 1)


def compare(engine_run, naive_run, top_k: int) -> None:
    assert len(engine_run) == len(naive_run)
    for block, ((x, recached, log), (x_ref, recached_ref, log_ref)) in enumerate(zip(engine_run, naive_run)):
        assert log.block == block
        assert log.selected == log_ref.selected, f"block {block}: retrieved {log.selected}, naive {log_ref.selected}"
        assert log.eligible == log_ref.eligible, f"block {block}"
        assert log.query_frame == log_ref.query_frame, f"block {block}"
        for b, (sims, sims_ref) in enumerate(zip(log.similarities, log_ref.similarities)):
            assert_close(torch.tensor(sims, dtype=torch.float64), torch.tensor(sims_ref, dtype=torch.float64),
                         atol=1e-5, rtol=1e-5, name=f"block {block} stream {b} similarities")
        # Setup sanity: the selection is not decided by float rounding (no near-tie at the cut).
        if any(log_ref.selected):
            assert min(log_ref.margins) > 1e-5, f"block {block}: near-tie {log_ref.margins}; pick another seed"
        assert_close(x, x_ref, name=f"block {block} clean latents")
        assert_close(recached, recached_ref, name=f"block {block} recache-pass output")
    counts = [len(row) for _, _, log in naive_run for row in log.selected]
    assert max(counts) == top_k, "retrieval must return full top-K selections"
    assert 0 < sum(counts), "retrieval must return frames"


def check_coverage(run, case: Case) -> None:
    """The run exercises what it should: the window filled, full selections, a real choice."""
    counts = [len(row) for _, _, log in run for row in log.selected]
    assert counts[0] == 0, "the first block has no query"
    assert case.top_k in counts, "some block must retrieve a full top-K"
    assert run[-1][2].eligible > case.top_k, "the last block must choose among more eligible frames than top_k"


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("positions", ["none", "rope1d"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("frames_per_block", [2, 3])
def test_matches_naive_reference(positions, batch, frames_per_block):
    case = Case(positions=positions, batch=batch, frames_per_block=frames_per_block,
                blocks=11 if frames_per_block == 2 else 10, seed=batch + 10 * frames_per_block)
    naive_run = run_naive(case, NAMED_ANGLES[positions])
    check_coverage(naive_run, case)
    compare(run_engine(case), naive_run, case.top_k)


def test_matches_naive_reference_python_page_table():
    case = Case(batch=2, page_table="python", seed=5)
    compare(run_engine(case), run_naive(case, angles_rope1d), case.top_k)


def test_matches_naive_reference_sink0_topk3():
    """No sink, a larger window and budget, recency guard 2."""
    case = Case(batch=2, window=8, sink=0, top_k=3, recency_guard=2, frames_per_block=2, blocks=12, seed=7)
    naive_run = run_naive(case, angles_rope1d)
    check_coverage(naive_run, case)
    compare(run_engine(case), naive_run, case.top_k)


@pytest.fixture
def triton_spy(monkeypatch):
    """Records which ops ran their Triton kernel (not the reference fallback)."""
    ran: list[tuple[str, bool]] = []
    for module in (splice_module, search_topk_module):
        original = module.use_triton

        def spy(tensor, mode, op="op", _original=original):
            used = _original(tensor, mode, op)
            ran.append((op, used))
            return used
        monkeypatch.setattr(module, "use_triton", spy)
    return ran


@pytest.mark.parametrize("positions", ["none", "rope1d"])
def test_matches_naive_reference_triton_kernels(positions, triton_spy):
    """The Triton splice and search: in the CPU interpreter here, on the GPU where there is one."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreting():
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    case = Case(positions=positions, batch=2, blocks=10, num_layers=1, kernels="triton", seed=3)
    compare(run_engine(case, device=device), run_naive(case, NAMED_ANGLES[positions]), case.top_k)
    used = {op for op, ran in triton_spy if ran}
    assert {"splice", "search_topk"} <= used, triton_spy
    assert all(ran for _, ran in triton_spy), "kernels='triton' fell back to the reference somewhere"


@pytest.mark.parametrize("encoding", [OtherThetaRope(), SplitRope()], ids=["rope1d-theta100", "split-per-token"])
@pytest.mark.parametrize("as_tables", [False, True], ids=["encoding", "prebuilt-tables"])
def test_user_position_encoding(encoding, as_tables):
    case = Case(batch=2, seed=11)
    positions = encoding.tables(case.window, GRID[0] * GRID[1], case.head_dim, "cpu") if as_tables else encoding
    compare(run_engine(case, positions=positions), run_naive(case, encoding.angles), case.top_k)


def test_user_position_encoding_differs_from_builtin():
    """The custom encodings really rotate differently (else the test above proves little)."""
    case = Case(batch=1, seed=11)
    naive_custom = run_naive(case, SplitRope().angles)
    with pytest.raises(AssertionError):
        compare(run_engine(case, positions="rope1d"), naive_custom, case.top_k)


_ENGINE_RUNS: dict = {}


def engine_run_cached(case: Case):
    if case not in _ENGINE_RUNS:
        _ENGINE_RUNS[case] = run_engine(case)
    return _ENGINE_RUNS[case]


# name: (changed naive rule, what the comparison must then report)
MUTATIONS = {
    "recency_guard+1": (dict(recency_guard=2), "retrieved"),
    "recency_guard-1": (dict(recency_guard=0), "retrieved"),
    "top_k-1": (dict(top_k=1, local_frames=3), "retrieved"),         # same local part, one frame fewer
    "retrieved_at_1": (dict(retrieved_position=1), "latents"),
    "local_widened": (dict(local_frames=5), "latents"),   # window - sink; SPEC keeps W - S - K
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_reference_is_sensitive(mutation):
    """The comparison direction: a naive reference with one rule changed must disagree."""
    case = Case(batch=2, seed=2)
    engine_run = engine_run_cached(case)
    compare(engine_run, run_naive(case, angles_rope1d), case.top_k)
    changes, reported = MUTATIONS[mutation]
    with pytest.raises(AssertionError, match=reported):
        compare(engine_run, run_naive(case, angles_rope1d, **changes), case.top_k)
