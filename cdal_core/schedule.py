"""The cDAL / DDGAN variance-preserving schedule for a few (T = 2..4) denoising steps.

Time is an integer ``t`` in ``1..T``; ``t = 0`` is the clean label map ``x_0``. All tensors broadcast over a
batch: ``t`` has shape ``(B,)`` and ``x`` has shape ``(B, C, H, W)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def paper_betas(num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """beta_t = 1 - exp(-beta_min/T - 0.5 (beta_max - beta_min) (2t - 1) / T^2) for t = 1..T, shape ``(T,)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.arange(1, num_steps + 1, dtype=torch.float64)
    exponent = -beta_min / num_steps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / num_steps**2
    return 1.0 - torch.exp(exponent)


class DiffusionSchedule:
    """Closed-form forward process q(x_t | x_0), training pairs and the posterior q(x_{t-1} | x_t, x_0).

    Arrays are indexed by t = 0..T (index 0 is the clean state: alpha_bar_0 = 1, beta_0 = 0).
    """

    def __init__(self, num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0):
        self.num_steps = num_steps
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), paper_betas(num_steps, beta_min, beta_max)])
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.betas = betas
        self.alpha_bar = alpha_bar
        self.sqrt_alpha_bar = alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, var); defined for t >= 1.
        denom = (1.0 - alpha_bar).clamp_min(1e-20)
        self.posterior_coef_x0 = betas * alpha_bar_prev.sqrt() / denom
        self.posterior_coef_xt = (1.0 - alpha_bar_prev) * alphas.sqrt() / denom
        self.posterior_variance = betas * (1.0 - alpha_bar_prev) / denom
        self.posterior_coef_x0[0], self.posterior_coef_xt[0], self.posterior_variance[0] = 1.0, 0.0, 0.0

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather ``values[t]`` and shape it ``(B, 1, 1, ...)`` to broadcast against ``like``."""
        out = values.to(like.device)[t.long().to(like.device)].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
        if noise is None:
            noise = _randn_like(x0, generator)
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def q_pair(self, x0: torch.Tensor, t: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Real training pair (x_{t-1}, x_t): x_{t-1} ~ q(x_{t-1}|x_0), then one forward step to x_t."""
        x_prev = self.q_sample(x0, t - 1, generator=generator)
        beta = self._at(self.betas, t, x0)
        x_t = (1.0 - beta).sqrt() * x_prev + beta.sqrt() * _randn_like(x0, generator)
        return x_prev, x_t

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor,
                                t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_coef_x0, t, x0) * x0 + self._at(self.posterior_coef_xt, t, x0) * x_t
        return mean, self._at(self.posterior_variance, t, x0)

    def posterior_sample(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw x_{t-1} ~ q(x_{t-1} | x_t, x0_hat); at t = 1 the variance is 0 and x0_hat itself is returned."""
        mean, var = self.posterior_mean_variance(x0, x_t, t)
        return mean + var.sqrt() * _randn_like(x0, generator)

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """Network time input tau = t / T in (0, 1]; alpha_bar is a function of tau alone for this schedule."""
        return t.float() / self.num_steps

    def __repr__(self) -> str:
        sab = ", ".join(f"{v:.4f}" for v in self.sqrt_alpha_bar.tolist())
        return f"DiffusionSchedule(T={self.num_steps}, sqrt_alpha_bar=[{sab}])"


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (possibly fractional) steps ``t`` (shape ``(B,)``) -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
