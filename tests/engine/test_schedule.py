"""Schedule of SPEC section 3 against a float64 recomputation written here."""
import pytest
import torch

from lrag_engine.schedule import DenoiseSchedule, predict_x0, renoise, warp_steps


def _shift(u, s):
    return s * u / (1 + (s - 1) * u)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_warped_steps_match_direct_formula(shift):
    steps = (1000, 750, 500, 250)
    got = warp_steps(steps, shift)
    # timesteps_with_final_zero[1000 - t] = 1000 * shift(u) with u = 1 - (1000 - t) / 1000 = t / 1000
    expected = [1000 * _shift(t / 1000, shift) for t in steps]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_default_schedule_values():
    sched = DenoiseSchedule.from_steps((1000, 750, 500, 250), 5.0)
    # shift 5: u=0.75 -> 3.75/4 = 0.9375; u=0.5 -> 2.5/3; u=0.25 -> 1.25/2
    assert sched.sigmas == pytest.approx((1.0, 0.9375, 2.5 / 3, 0.625), rel=1e-12)
    assert sched.timesteps == pytest.approx((1000.0, 937.5, 2500 / 3, 625.0), rel=1e-12)


def test_x0_and_renoise_invert_flow():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 5, generator=g)
    noise = torch.randn(2, 3, 4, 5, generator=g)
    sigma = 0.7
    x_t = renoise(x0, noise, sigma)
    torch.testing.assert_close(predict_x0(x_t, noise - x0, sigma), x0, rtol=1e-6, atol=1e-6)
