"""cDAL networks: the conditional generator x_theta(x_t, t, z, I) and the time-step discriminator D(x_{t-1}, x_t, t).

Shapes: images ``I`` are ``(B, in_channels, H, W)`` with ``in_channels = image_channels * (2 * context_slices + 1)``;
label maps ``x`` are ``(B, num_classes, H, W)`` in [-1, 1] (one-hot * 2 - 1); ``tau`` is ``(B,)`` continuous time t/T in (0, 1]
(the schedule's alpha_bar depends on t/T only, so one model serves T = 2 and T = 4);
``z`` is ``(B, latent_dim)``. H and W must be multiples of ``2 ** (len(channel_mults) - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .schedule import sinusoidal_embedding


@dataclass
class NetworkConfig:
    """Everything needed to rebuild both networks; stored verbatim in the model card."""

    image_channels: int = 1            # 1 for grey MRI / X-ray, 3 for RGB histology
    context_slices: int = 0            # neighbouring slices on each side given to the image encoder (2.5D)
    num_classes: int = 3               # including background
    base_channels: int = 16
    channel_mults: Tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    latent_dim: int = 32               # z
    mapping_layers: int = 3
    time_dim: int = 64
    dropout: float = 0.0
    disc_channels: int = 32
    disc_mults: Tuple[int, ...] = (1, 2, 4, 4)    # every D block halves the resolution
    disc_uses_image: bool = False      # the reference D sees only the two label maps
    attention_block: int = 1           # D block whose features become A_D: H / 2**(block+1), 16x16 for 64x64

    @property
    def in_channels(self) -> int:
        return self.image_channels * (2 * self.context_slices + 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["channel_mults"], d["disc_mults"] = list(self.channel_mults), list(self.disc_mults)
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "NetworkConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network settings: {sorted(unknown)}")
        d = dict(d)
        for key in ("channel_mults", "disc_mults"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        for f in fields(cls):  # a hand-edited card ("base_channels": "sixteen") would fail deep in the network
            value, kind = d.get(f.name, f.default), {"int": int, "float": (int, float), "bool": bool}.get(str(f.type))
            if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise ValueError(f"network.{f.name} is {value!r}, expected {f.type}")
        return cls(**d)


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose scale and shift come from the mapped latent w (DDGAN's AdaGN)."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.style = nn.Linear(w_dim, 2 * channels)
        nn.init.zeros_(self.style.weight)
        nn.init.zeros_(self.style.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(w).chunk(2, dim=1)
        if _fused_norm_on_cpu(x):
            return group_norm_modulate(x, self.norm.num_groups, 1 + gamma.float(), beta.float(), self.norm.eps)
        return modulate(self.norm(x), 1 + gamma, beta)


# Below this many pixels torch's CPU GroupNorm walks each group across the map with the channel stride
# (its "HxW < 1024" algorithm): 12.7 ms for a 200x32x28x20 bf16 map whose statistics alone take 1.5 ms.
_SMALL_MAP_PIXELS = 1024


def _fused_norm_on_cpu(x: torch.Tensor) -> bool:
    """Channels-last CPU maps normalised and modulated in one pass (``group_norm_modulate``): every float32
    map (torch's GroupNorm and then the broadcast multiply-add over the channels-last view cost 2-5x more on
    an AVX2 EPYC, e.g. 7.5 against 1.4 ms for 70x32x28x20), and bf16 maps under ``_SMALL_MAP_PIXELS``."""
    if x.device.type != "cpu" or not is_channels_last(x):
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.shape[2] * x.shape[3] < _SMALL_MAP_PIXELS)


def group_norm_modulate(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                        eps: float = 1e-5) -> torch.Tensor:
    """``GroupNorm(x) * scale + shift`` for a channels-last ``x`` (B, C, H, W) and float32 ``scale``, ``shift``
    (B, C): float32 per-channel moments, then the normalisation and the modulation as one per-sample affine
    (``_affine_rows``, as in ``modulate``). Returns channels-last (B, C, H, W), x's dtype."""
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)                 # a view: channels are contiguous
    moments = pixels.float()
    sums = moments.sum(dim=1)
    # float32 input: .float() is x itself, which must not be squared in place
    squares = (moments.square_() if moments.dtype != x.dtype else moments.square()).sum(dim=1)
    per_group = c // groups
    count = h * w * per_group
    mean = sums.view(b, groups, -1).sum(dim=2).div_(count)
    var = squares.view(b, groups, -1).sum(dim=2).div_(count).sub_(mean * mean).clamp_min_(0)
    gain = torch.rsqrt(var.add_(eps)).repeat_interleave(per_group, dim=1).mul_(scale)
    bias = shift - mean.repeat_interleave(per_group, dim=1) * gain
    y = _affine_rows(pixels, gain.to(x.dtype), bias.to(x.dtype))
    return y.view(b, h, w, c).permute(0, 3, 1, 2)


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys; the same results to float rounding) that normalises
    CPU channels-last maps with ``group_norm_modulate`` wherever torch's kernel is slow there
    (``_fused_norm_on_cpu``: every float32 map, and bf16 maps under ``_SMALL_MAP_PIXELS``, e.g. the image
    encoder's 28x20 level in bf16: 3.5 ms per call). Training runs contiguous maps, so it keeps torch's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.affine and _fused_norm_on_cpu(x)):
            return super().forward(x)
        b, c = x.shape[:2]
        return group_norm_modulate(x, self.num_groups, self.weight.float().expand(b, c),
                                   self.bias.float().expand(b, c), self.eps)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` for ``x`` (B, C, H, W) and per-sample, per-channel ``scale``, ``shift`` (B, C).

    bf16 channels-last tensors on CPU (inference) are modulated as rows of pixels (``_affine_rows``): torch's
    CPU broadcast over the (B, C, H, W) view of that layout is a scalar loop, up to 8x slower."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and is_channels_last(x):
        b, c, h, w = x.shape
        y = _affine_rows(x.permute(0, 2, 3, 1).reshape(b, h * w, c), scale.to(x.dtype), shift.to(x.dtype))
        return y.view(b, h, w, c).permute(0, 3, 1, 2)
    return x * scale[:, :, None, None] + shift[:, :, None, None]


def _affine_rows(pixels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``pixels * scale + shift`` for ``pixels`` (B, N, C) and ``scale``, ``shift`` (B, C). Rows of fewer than
    32 channels are too short for torch's bf16 multiply-add: a batched matmul with diagonal scales is faster
    there (1.4 ms against 7.4 ms for 200x2240x16 in bf16) and 3-18x slower for wider rows. In float32 the
    multiply-add is always the faster (1.5 against 3.6 ms for 70x2240x16)."""
    if pixels.shape[2] < 32 and pixels.dtype == torch.bfloat16:
        return torch.baddbmm(shift[:, None, :], pixels, torch.diag_embed(scale))
    return torch.addcmul(shift[:, None, :], pixels, scale[:, None, :])


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4D tensor stored channels-last (and not also plain contiguous, as 1-channel tensors are)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient is recorded (inference: one buffer less per block)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ConditionalResBlock(nn.Module):
    """Residual block: AdaGN(w) -> SiLU -> conv, + time embedding, AdaGN(w) -> SiLU -> conv; residual / sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int, w_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = AdaptiveGroupNorm(in_ch, w_dim)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(t_dim, out_ch)
        self.norm2 = AdaptiveGroupNorm(out_ch, w_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``temb`` (B, t_dim), or (1, t_dim) when the whole batch is at one time step (sampling): the time
        shift is then folded into conv1's bias instead of costing a pass over the feature map."""
        shift = self.time(temb)
        h = _silu(self.norm1(x, w))
        if shift.shape[0] == 1:
            h = F.conv2d(h, self.conv1.weight, self.conv1.bias + shift[0], padding=1)
        else:
            h = self.conv1(h) + shift[:, :, None, None]
        h = self.conv2(self.dropout(_silu(self.norm2(h, w))))
        return (h + self.skip(x)).mul_(1 / math.sqrt(2))


class LatentMapping(nn.Module):
    """z -> w: pixel-norm then an MLP with SiLU (as in DDGAN / StyleGAN)."""

    def __init__(self, latent_dim: int, layers: int):
        super().__init__()
        mods: List[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(latent_dim, latent_dim), nn.SiLU()]
        self.mlp = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        return self.mlp(z)


class _Conv(nn.Module):
    """A bias-free convolution stored as ``.conv`` (the state-dict layout of MONAI's ``Convolution``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=(kernel_size - stride + 1) // 2,
                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class EncoderResBlock(nn.Module):
    """MONAI's ``UnetResBlock`` (2D, group norm, LeakyReLU 0.01) with the same state-dict keys and the same
    arithmetic, written out so that inference does not import MONAI (4-7 s of start-up: it imports scipy,
    pandas and matplotlib). conv -> GN -> LReLU -> conv -> GN, + (1x1 conv -> GN when the shape changes),
    -> LReLU. Testing/core/test_networks.py checks it against MONAI's block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = _Conv(in_ch, out_ch, 3, stride)
        self.conv2 = _Conv(out_ch, out_ch, 3, 1)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = FastGroupNorm(groups, out_ch)
        self.norm2 = FastGroupNorm(groups, out_ch)
        if in_ch != out_ch or stride != 1:
            self.conv3 = _Conv(in_ch, out_ch, 1, stride)
            self.norm3 = FastGroupNorm(groups, out_ch)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.norm2(self.conv2(out))
        residual = self.norm3(self.conv3(inp)) if hasattr(self, "conv3") else inp
        out += residual
        return self.lrelu(out)


class ImageEncoder(nn.Module):
    """Encodes the image once into one feature map per generator scale: list of ``(B, C_l, H / 2**l, W / 2**l)``."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        self.stem = EncoderResBlock(in_channels, widths[0], 1, _groups(widths[0]))
        self.downs = nn.ModuleList(
            EncoderResBlock(widths[i], widths[i + 1], 2, _groups(widths[i + 1])) for i in range(len(widths) - 1)
        )

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        feats = [self.stem(image)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return feats


class Generator(nn.Module):
    """x_theta(x_t, t, z, I): predicts the clean one-hot label map x0_hat in [-1, 1], shape ``(B, num_classes, H, W)``.

    The image features are added to the label branch at every encoder scale. ``encode`` depends only on the
    image, so a sampler computes it once per slice and reuses it for every step and sample (``decode``).
    """

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        self.encoder = ImageEncoder(cfg.in_channels, widths)
        self.mapping = LatentMapping(cfg.latent_dim, cfg.mapping_layers)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.time_dim * 2), nn.SiLU(),
                                      nn.Linear(cfg.time_dim * 2, cfg.time_dim * 2))
        t_dim, w_dim = cfg.time_dim * 2, cfg.latent_dim
        self.stem = nn.Conv2d(cfg.num_classes, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_widths = []
        ch = widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ConditionalResBlock(ch, width, t_dim, w_dim, cfg.dropout))
                ch = width
                skip_widths.append(ch)
            self.down_blocks.append(blocks)
            if level < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(ch, widths[level + 1], 3, stride=2, padding=1))
                ch = widths[level + 1]
        self.mid = ConditionalResBlock(ch, ch, t_dim, w_dim, cfg.dropout)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ConditionalResBlock(ch + skip_widths.pop(), widths[level], t_dim, w_dim, cfg.dropout))
                ch = widths[level]
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(nn.Conv2d(ch, widths[level - 1], 3, padding=1))
                ch = widths[level - 1]
        self.out_norm = FastGroupNorm(_groups(ch), ch)
        self.out_conv = nn.Conv2d(ch, cfg.num_classes, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        return self.encoder(image)

    def decode(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
               image_features: List[torch.Tensor]) -> torch.Tensor:
        """``image_features`` may hold N slices for ``x_t`` of N * K samples (sample-major per slice):
        they are broadcast, not copied. ``t`` is (B,), or (1,) when the whole batch is at one step (the
        sampler): the blocks then fold the time into a conv bias."""
        temb = self.time_mlp(sinusoidal_embedding(t * 1000.0, self.cfg.time_dim).to(x_t.dtype))
        w = self.mapping(z)
        h = _add_per_image(self.stem(x_t), image_features[0])
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, temb, w)
                skips.append(h)
            if level < len(self.downsamples):
                h = _add_per_image(self.downsamples[level](h), image_features[level + 1])
        h = self.mid(h, temb, w)
        for i, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb, w)
            if i < len(self.upsamples):
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = F.silu(self.out_norm(h))
        # The output layer runs in float32 even under bf16 autocast: x0 near +-1 must keep its small
        # sample-to-sample differences, or the ensemble variance (the uncertainty map) turns into ties.
        with torch.autocast(h.device.type, enabled=False):
            return torch.tanh(self.out_conv(h.float()))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.decode(x_t, t, z, self.encode(image))


def _add_per_image(h: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """h (N*K, C, H, W) + feature (N, C, H, W), each slice's feature shared by its K samples."""
    if feature.shape[0] == h.shape[0]:
        return h + feature
    k = h.shape[0] // feature.shape[0]
    return (h.view(feature.shape[0], k, *h.shape[1:]) + feature[:, None]).view(h.shape)


class DownBlock(nn.Module):
    """Discriminator residual block that halves the resolution: conv (+ time embedding) at the input
    resolution, average-pool, conv at the lower resolution (as in DDGAN, cheap at full size)."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(t_dim, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, 0.2)) + self.time(temb)[:, :, None, None]
        h = self.conv2(F.avg_pool2d(F.leaky_relu(h, 0.2), 2))
        return (h + self.skip(F.avg_pool2d(x, 2))) * (1 / math.sqrt(2))


class Discriminator(nn.Module):
    """D(x_{t-1}, x_t, t) -> real/fake logit ``(B,)``; optionally also returns each block's feature map
    (block i has resolution ``H / 2**(i + 1)``)."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        in_ch = 2 * cfg.num_classes + (cfg.in_channels if cfg.disc_uses_image else 0)
        widths = [cfg.disc_channels * m for m in cfg.disc_mults]
        t_dim = cfg.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.LeakyReLU(0.2), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(in_ch, widths[0] // 2, 3, padding=1)
        self.blocks = nn.ModuleList(
            DownBlock(widths[i - 1] if i else widths[0] // 2, widths[i], t_dim) for i in range(len(widths))
        )
        self.head = nn.Linear(widths[-1], 1)
        if not 0 <= cfg.attention_block < len(widths):
            raise ValueError(f"attention_block must be in 0..{len(widths) - 1}")

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                image: Optional[torch.Tensor] = None,
                return_features: bool = False):
        feats = self.features(x_prev, x_t, t, image)
        logit = self.head(F.leaky_relu(feats[-1], 0.2).sum(dim=(2, 3))).squeeze(1)
        return (logit, feats) if return_features else logit

    def features(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 image: Optional[torch.Tensor] = None, up_to: Optional[int] = None) -> List[torch.Tensor]:
        """The feature maps of blocks ``0..up_to`` (all when None); block i is ``(B, C_i, H / 2**(i + 1),
        W / 2**(i + 1))``. Sampling needs only the attention block's map: the blocks after it (about 40 % of D's
        work for hippocampus) and the head would be wasted."""
        temb = self.time_mlp(sinusoidal_embedding(t * 1000.0, self.cfg.time_dim).to(x_t.dtype))
        inputs = [x_prev, x_t] + ([image] if self.cfg.disc_uses_image else [])
        h = self.stem(torch.cat(inputs, dim=1))
        last = len(self.blocks) - 1 if up_to is None else up_to
        feats = []
        for block in self.blocks[:last + 1]:
            h = block(h, temb)
            feats.append(h)
        return feats


def attention_map(features: List[torch.Tensor], block: int, size: Tuple[int, int]) -> torch.Tensor:
    """A_D: channel mean of one inner D feature map, bilinearly upsampled to ``size``: ``(B, 1, H, W)``."""
    a = features[block].mean(dim=1, keepdim=True)
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)


def normalise_attention(a: torch.Tensor) -> torch.Tensor:
    """Scale each map to max |A| = 1 so that x0 * A_D keeps the label's range whatever D's feature scale."""
    return a / a.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
