import math

import pytest
import torch

from cdal_core.schedule import DiffusionSchedule, paper_betas, sinusoidal_embedding


def test_betas_follow_the_paper_formula():
    for T in (2, 3, 4):
        betas = paper_betas(T)
        for t in range(1, T + 1):
            expected = 1 - math.exp(-0.1 / T - 0.5 * (20 - 0.1) * (2 * t - 1) / T**2)
            assert betas[t - 1].item() == pytest.approx(expected, rel=1e-12)


def test_sqrt_alpha_bar_matches_reference_values():
    # Values the reference implementation reports for T=2 and T=4.
    assert DiffusionSchedule(2).sqrt_alpha_bar.tolist() == pytest.approx([1, 0.2806, 0.0066], abs=1e-3)
    assert DiffusionSchedule(4).sqrt_alpha_bar.tolist() == pytest.approx([1, 0.722, 0.2806, 0.059, 0.0066],
                                                                        abs=2e-3)


def test_alpha_bar_depends_on_t_over_T_only():
    two, four = DiffusionSchedule(2), DiffusionSchedule(4)
    assert two.alpha_bar[1].item() == pytest.approx(four.alpha_bar[2].item(), rel=1e-9)
    assert two.time(torch.tensor([1])).item() == four.time(torch.tensor([2])).item()


def test_q_sample_moments():
    s = DiffusionSchedule(4)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 2)
    xt = s.q_sample(x0, t, generator=torch.Generator().manual_seed(0))
    ab = s.alpha_bar[2].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, abs=0.02)


def test_pair_has_the_forward_marginal():
    s = DiffusionSchedule(4)
    x0 = torch.full((20000, 1, 1, 1), -1.0)
    t = torch.full((20000,), 3)
    x_prev, x_t = s.q_pair(x0, t, generator=torch.Generator().manual_seed(1))
    assert x_prev.mean().item() == pytest.approx(-s.sqrt_alpha_bar[2].item(), abs=0.02)
    assert x_t.mean().item() == pytest.approx(-s.sqrt_alpha_bar[3].item(), abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - s.alpha_bar[3].item(), abs=0.02)


def test_posterior_matches_gaussian_closed_form():
    s = DiffusionSchedule(3)
    for t in (2, 3):
        ab, ab_prev, beta = s.alpha_bar[t].item(), s.alpha_bar[t - 1].item(), s.betas[t].item()
        x0, xt = torch.tensor([[[[0.3]]]]), torch.tensor([[[[-0.4]]]])
        mean, var = s.posterior_mean_variance(x0, xt, torch.tensor([t]))
        # Product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0), as precisions.
        prec = (1 - beta) / beta + 1 / (1 - ab_prev)
        m = ((1 - beta) ** 0.5 * xt.item() / beta + ab_prev ** 0.5 * x0.item() / (1 - ab_prev)) / prec
        assert var.item() == pytest.approx(1 / prec, rel=1e-5)
        assert mean.item() == pytest.approx(m, rel=1e-5)


def test_last_step_returns_the_prediction():
    s = DiffusionSchedule(2)
    x0, xt = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    out = s.posterior_sample(x0, xt, torch.ones(4, dtype=torch.long))
    assert torch.allclose(out, x0, atol=1e-6)


def test_sinusoidal_embedding_shape_and_distinct():
    e = sinusoidal_embedding(torch.tensor([250.0, 500.0, 1000.0]), 16)
    assert e.shape == (3, 16)
    assert not torch.allclose(e[0], e[1])
