"""Algorithm 2: T denoising steps from noise, K samples per slice batched together.

Given images ``(N, in_channels, H, W)`` (already scaled to [-1, 1]) returns per slice the mean class
probabilities ``(N, C, H, W)``, labels ``(N, H, W)``, the per-pixel variance across samples ``(N, H, W)``
(summed over classes) and optionally the discriminator attention ``(N, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .networks import Discriminator, Generator, attention_map, is_channels_last
from .schedule import DiffusionSchedule


@dataclass
class SampleOutput:
    probabilities: torch.Tensor   # (N, C, H, W), sums to 1 over C
    variance: torch.Tensor        # (N, H, W) across-sample variance of the class probabilities, summed over C
    attention: Optional[torch.Tensor] = None  # (N, H, W) |channel mean - its slice median| of D's inner features
    early: Optional[torch.Tensor] = None      # (N,) bool: stopped before the last step, surely background

    @property
    def labels(self) -> torch.Tensor:
        """(N, H, W) int64 argmax of the mean; computed on demand (volume inference argmaxes on its own grid)."""
        return self.probabilities.argmax(dim=1)


def x0_to_probabilities(x0: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] (one-hot * 2 - 1) -> non-negative class weights summing to 1 over dim 1."""
    p = ((x0 + 1) * 0.5).clamp(0.0, 1.0)
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-6)


def _memory_format(module: torch.nn.Module) -> torch.memory_format:
    """Channels-last when the module's convolution weights are (see model_io.load_model), else contiguous."""
    conv = next((p for p in module.parameters() if p.dim() == 4), None)
    return torch.channels_last if conv is not None and is_channels_last(conv) else torch.contiguous_format


@torch.inference_mode()
def sample(generator: Generator, images: torch.Tensor, schedule: DiffusionSchedule, num_samples: int = 5,
           rng: Optional[torch.Generator] = None, discriminator: Optional[Discriminator] = None,
           attention_block: Optional[int] = None, use_latent: bool = True,
           early_exit: Optional[float] = None, step_weights: Optional[Sequence[float]] = None) -> SampleOutput:
    """Run the reverse process for all ``N`` slices x ``K`` samples in one batch of ``N * K``.

    The image encoder runs once per slice; its features are shared by every step and sample.
    Noise comes from ``rng`` (a CPU generator) so CPU and GPU give the same draws for the same seed.

    ``early_exit``: a slice whose ``K`` predictions of x0 are all background, with foreground probability
    below this value at every pixel, keeps that prediction and skips the remaining steps (about 30 % of
    hippocampus slices hold no hippocampus). ``None`` runs every step for every slice.

    ``step_weights``: one weight per step, from step T down to 1. Each sample's probabilities become the weighted
    mean of its x0 predictions at the steps it ran (the earlier ones cost nothing extra); ``None`` keeps the
    last step's prediction alone, as Algorithm 2 does.
    """
    n, k = images.shape[0], num_samples
    c = generator.cfg.num_classes
    device, dtype = images.device, images.dtype
    layout = _memory_format(generator)
    images = images.contiguous(memory_format=layout)
    feats = generator.encode(images)  # (N, ...) shared by the K samples of each slice, never copied

    def noise(*shape):
        return torch.randn(*shape, generator=rng).to(device=device, dtype=dtype)

    x = noise(n * k, c, *images.shape[2:]).contiguous(memory_format=layout)
    final = torch.empty(n * k, c, *images.shape[2:], device=device)   # x0 of every sample, float32
    # D's partner of x0: x_1, or for a slice that stopped early the x_{t-1} drawn at its last step
    pairs = torch.empty_like(final) if discriminator is not None else None
    active = torch.arange(n, device=device)  # slices still being denoised
    if step_weights is not None and len(step_weights) != schedule.num_steps:
        raise ValueError(f"step_weights needs one weight per step ({schedule.num_steps}), got {len(step_weights)}")
    pooled = torch.zeros(n * k, c, *images.shape[2:], device=device) if step_weights is not None else None
    weight_sum = torch.zeros(n * k, device=device) if step_weights is not None else None
    early = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(schedule.num_steps, 0, -1):
        t = torch.full((x.shape[0],), step, device=device, dtype=torch.long)
        z = noise(x.shape[0], generator.cfg.latent_dim) if use_latent else \
            torch.zeros(x.shape[0], generator.cfg.latent_dim, device=device, dtype=dtype)
        x0 = generator.decode(x, schedule.time(t[:1]), z, feats)  # one step for all: a (1,) time
        x_t, x = x, (schedule.posterior_sample(x0, x, t, generator=rng) if step > 1 else x0)
        if pooled is not None and step_weights[schedule.num_steps - step] > 0:
            w = float(step_weights[schedule.num_steps - step])
            rows_now = _sample_rows(active, k)
            pooled[rows_now] += w * x0_to_probabilities(x0.float())
            weight_sum[rows_now] += w
        done = torch.ones(len(active), dtype=torch.bool, device=device) if step == 1 else \
            _confidently_background(x0, k, early_exit)
        if bool(done.any()):
            rows, done_rows = _sample_rows(active[done], k), done.repeat_interleave(k)
            final[rows] = x0[done_rows].float()
            early[active[done]] = step > 1
            if pairs is not None:
                pairs[rows] = (x_t if step == 1 else x)[done_rows].float()
            keep = ~done
            active = active[keep]
            x = x[keep.repeat_interleave(k)].contiguous(memory_format=layout)
            feats = [f[keep].contiguous(memory_format=layout) for f in feats]
        if len(active) == 0:
            break
    if pooled is None:
        probs_k = x0_to_probabilities(final)
    else:
        unweighted = weight_sum == 0  # a sample that stopped before any weighted step keeps its last prediction
        probs_k = pooled.div_(weight_sum.masked_fill(unweighted, 1.0)[:, None, None, None])
        if bool(unweighted.any()):
            probs_k[unweighted] = x0_to_probabilities(final[unweighted])
    probs_k = probs_k.view(n, k, c, *images.shape[2:])
    probs = probs_k.mean(dim=1)
    # mean squared deviation written out: torch's var over a non-innermost dim is ~50x slower on CPU
    variance = (probs_k - probs[:, None]).square_().mean(dim=1).sum(dim=1)
    attention = None
    if discriminator is not None:
        t1 = torch.ones(n * k, device=device, dtype=torch.long)
        d_image = images.repeat_interleave(k, dim=0) if discriminator.cfg.disc_uses_image else None
        block = discriminator.cfg.attention_block if attention_block is None else attention_block
        d_layout = _memory_format(discriminator)
        d_feats = discriminator.features(final.to(dtype).contiguous(memory_format=d_layout),
                                         pairs.to(dtype).contiguous(memory_format=d_layout), schedule.time(t1),
                                         image=d_image, up_to=block)
        a = attention_map(d_feats, block, tuple(images.shape[2:])).float()
        # D answers flat background with a constant; where it looks is where it departs from that level
        a = (a - a.flatten(1).median(dim=1).values[:, None, None, None]).abs()
        attention = a.view(n, k, *images.shape[2:]).mean(dim=1)
    return SampleOutput(probs, variance, attention, early)


STEP_POOLING = ("last", "mean", "linear")


def step_pooling_weights(pooling: str, num_steps: int) -> Optional[Sequence[float]]:
    """A card's ``sampling.step_pooling`` -> ``sample``'s ``step_weights`` (from step T down to 1).

    ``last``: Algorithm 2, the last step's x0 alone (None); ``mean``: every step's x0 alike; ``linear``: step t
    weighs t (the noisiest, first prediction most)."""
    if pooling not in STEP_POOLING:
        raise ValueError(f"step pooling must be one of {', '.join(STEP_POOLING)}, got {pooling!r}")
    if pooling == "last":
        return None
    if pooling == "mean":
        return [1.0] * num_steps
    return [float(t) for t in range(num_steps, 0, -1)]


def _confidently_background(x0: torch.Tensor, k: int, below: Optional[float]) -> torch.Tensor:
    """(N * K, C, H, W) x0 predictions -> (N,) True where all K samples put every pixel's foreground
    probability below ``below``; all False when ``below`` is None."""
    n = x0.shape[0] // k
    if below is None:
        return torch.zeros(n, dtype=torch.bool, device=x0.device)
    foreground = 1.0 - x0_to_probabilities(x0.float())[:, 0]
    return foreground.reshape(n, k, -1).amax(dim=(1, 2)) < below


def _sample_rows(slices: torch.Tensor, k: int) -> torch.Tensor:
    """Slice indices -> the rows of their K samples in the sample-major batch."""
    return (slices[:, None] * k + torch.arange(k, device=slices.device)[None]).reshape(-1)
