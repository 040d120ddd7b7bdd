"""Encoder losses against naive loop implementations written here."""
import math

import pytest
import torch

from lrag_engine.encoder.losses import encoder_loss, trajectory_smoothing_loss, window_temporal_delta_loss
from lrag_engine.encoder.model import EncoderConfig
from lrag_engine.testing import assert_close


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / max(na * nb, 1e-8)


def naive_delta(emb, margin, window):
    batch, length = len(emb), len(emb[0])
    per_offset = []
    for k in range(1, window + 1):
        if k >= length:
            continue
        hinges = []
        for b in range(batch):
            for t in range(k, length):
                hinges.append(max(0.0, _cos(emb[b][t], emb[b][t - k]) - margin))
        per_offset.append(sum(hinges) / len(hinges))
    return sum(per_offset) / len(per_offset) if per_offset else 0.0


def naive_smooth(emb):
    norms = []
    for seq in emb:
        for t in range(1, len(seq) - 1):
            norms.append(math.sqrt(sum((a - 2 * b + c) ** 2 for a, b, c in zip(seq[t + 1], seq[t], seq[t - 1]))))
    return sum(norms) / len(norms) if norms else 0.0


def _correlated(b, l, d, gen, rho):
    # Slowly varying sequences so cosines cross the margin and the hinge is exercised both ways.
    base = torch.randn(b, 1, d, generator=gen, dtype=torch.float64)
    steps = torch.randn(b, l, d, generator=gen, dtype=torch.float64) * rho
    return base + steps.cumsum(dim=1)


CASES = [
    pytest.param(1, 1, 5, 3, 0.85, 0.1, id="B1-L1-w3"),
    pytest.param(2, 2, 7, 3, 0.85, 0.3, id="B2-L2-w3"),
    pytest.param(3, 3, 4, 3, 0.5, 0.3, id="B3-L3-w3"),
    pytest.param(2, 4, 9, 3, 0.85, 0.2, id="B2-L4-w3-Lequalsw+1"),
    pytest.param(2, 8, 11, 3, 0.85, 0.25, id="B2-L8-w3"),
    pytest.param(1, 7, 3, 5, 0.0, 0.6, id="B1-L7-w5-m0"),
    pytest.param(3, 5, 6, 1, -0.2, 1.0, id="B3-L5-w1-negmargin"),
]


@pytest.mark.parametrize("b,l,d,window,margin,rho", CASES)
def test_delta_loss_matches_loops(b, l, d, window, margin, rho):
    gen = torch.Generator().manual_seed(1000 * b + 10 * l + d)
    emb = _correlated(b, l, d, gen, rho)
    got = window_temporal_delta_loss(emb, margin, window)
    expected = naive_delta(emb.tolist(), margin, window)
    assert_close(got, torch.tensor(expected, dtype=torch.float64), name="delta loss")


@pytest.mark.parametrize("b,l,d,window,margin,rho", CASES)
def test_smoothing_loss_matches_loops(b, l, d, window, margin, rho):
    gen = torch.Generator().manual_seed(7 + 1000 * b + 10 * l + d)
    emb = _correlated(b, l, d, gen, rho)
    got = trajectory_smoothing_loss(emb)
    assert_close(got, torch.tensor(naive_smooth(emb.tolist()), dtype=torch.float64), name="smoothing loss")


def test_delta_loss_hinge_is_active_and_inactive():
    gen = torch.Generator().manual_seed(3)
    emb = _correlated(2, 8, 16, gen, 0.05)  # nearly constant: every cosine above 0.85
    assert window_temporal_delta_loss(emb, 0.85, 3) > 0
    far = torch.randn(2, 8, 256, generator=gen, dtype=torch.float64)  # near-orthogonal frames
    assert window_temporal_delta_loss(far, 0.85, 3) == 0


def test_total_loss_combines_terms_with_weights():
    gen = torch.Generator().manual_seed(5)
    cfg = EncoderConfig(in_channels=3, spatial_h=4, spatial_w=5, latent_dim=6, hidden_dims=(4,),
                        delta_weight=0.7, smooth_weight=2.5, delta_window=2, delta_margin=0.1)
    frames = torch.randn(2, 5, 3, 4, 5, generator=gen)
    recon = torch.randn(2, 5, 3, 4, 5, generator=gen)
    emb = _correlated(2, 5, 6, gen, 0.3).float()
    terms = encoder_loss(frames, recon, emb, cfg)
    mse = sum((a - b) ** 2 for a, b in zip(frames.flatten().tolist(), recon.flatten().tolist())) / frames.numel()
    expected = mse + 0.7 * naive_delta(emb.tolist(), 0.1, 2) + 2.5 * naive_smooth(emb.tolist())
    assert_close(terms.total, torch.tensor(expected, dtype=torch.float32), name="total loss")
    assert_close(terms.recon, torch.tensor(mse, dtype=torch.float32), name="recon loss")


def test_short_chunks_give_zero_with_gradient():
    emb = torch.randn(2, 1, 4, requires_grad=True)
    total = window_temporal_delta_loss(emb, 0.85, 3) + trajectory_smoothing_loss(emb)
    total.backward()
    assert total.item() == 0 and emb.grad is not None and torch.all(emb.grad == 0)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        window_temporal_delta_loss(torch.randn(4, 5), 0.85, 3)
    with pytest.raises(ValueError, match="window"):
        window_temporal_delta_loss(torch.randn(1, 4, 5), 0.85, 0)
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        trajectory_smoothing_loss(torch.randn(4))
