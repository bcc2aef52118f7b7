"""MONAI augmentations for 2D training slices, seeded per training step so that a resumed run repeats exactly."""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandFlipd,
                              RandGaussianNoised, RandGaussianSmoothd, RandLambdad, RandRotate90d,
                              RandScaleIntensityd)

# Ruifrok & Johnston's optical-density colours of haematoxylin, eosin and DAB (rows), the usual H&E basis
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def build_augmentation(settings: Dict):
    """Spatial (affine, optional left-right flip) and intensity (gamma, bias field, blur, noise) augmentation.

    ``settings["flip_across_slices"]``: reverse the order of the context slices (the image channels) with
    probability 0.5. That is the mirror image across the slicing plane: for a model that slices sagittally it is
    the left-right mirror of the head, which no in-plane flip gives, so that the model learns both hippocampi.

    ``settings["dihedral"]``: one of the 8 flips and quarter turns of a square slice, uniformly (tissue has no
    preferred orientation). ``settings["stain_jitter"]`` (batched backend, RGB only): each slice's haematoxylin,
    eosin and DAB densities are scaled by 1 + a and shifted by b, a and b uniform in [-sigma, sigma] per stain
    (Tellez et al. 2018), so that a histology model meets the stain variation of other labs. Densities are optical
    densities, -log10 of the intensity: a shift of b is about a sixth of the same shift in scikit-image's
    ``rgb2hed`` units, which divide the natural log by ln(1e-6).

    ``settings["backend"]``: "monai" (default) -> a MONAI ``Compose`` applied slice by slice on the CPU (it
    works on dicts ``{"image": (C, H, W) float in [0, 1], "label": (1, H, W)}``); "batched" -> ``BatchAugmentation``,
    the same transforms on whole batches on the training device. Blur and bias field make a model trained on
    sharp single scans robust to smoother images such as population templates.
    """
    backend = settings.get("backend", "monai")
    if backend == "batched":
        return BatchAugmentation(settings)
    if backend != "monai":
        raise ValueError(f"augmentation backend must be 'monai' or 'batched', got '{backend}'")
    p = float(settings.get("probability", 0.3))
    transforms = [
        RandAffined(keys=["image", "label"], prob=float(settings.get("affine_probability", 0.7)),
                    rotate_range=np.deg2rad(float(settings.get("rotate_degrees", 15))),
                    scale_range=float(settings.get("scale", 0.15)),
                    translate_range=float(settings.get("translate", 4)),
                    mode=("bilinear", "nearest"), padding_mode="border"),
    ]
    if settings.get("flip_axis") is not None:
        transforms.append(RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=int(settings["flip_axis"])))
    if settings.get("flip_across_slices"):
        transforms.append(RandLambdad(keys="image", prob=0.5, func=_reverse_channels))
    if settings.get("dihedral"):
        transforms += [RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                       RandRotate90d(keys=["image", "label"], prob=1.0, max_k=4)]  # k in 1..4: 4 is no turn
    if float(settings.get("stain_jitter", 0.0)) > 0:
        raise ValueError("stain_jitter needs the batched augmentation: set \"backend\": \"batched\"")
    transforms += [
        RandAdjustContrastd(keys="image", prob=p, gamma=(0.7, 1.5)),
        RandScaleIntensityd(keys="image", prob=p, factors=0.1),
        RandBiasFieldd(keys="image", prob=p * 0.5, coeff_range=(0.0, 0.2)),
        RandGaussianSmoothd(keys="image", prob=p * 0.5, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        RandGaussianNoised(keys="image", prob=p, std=0.03),
    ]
    return Compose(transforms)


def _reverse_channels(image):
    """(C, H, W) numpy array or tensor -> the same with its channels (context slices) in reverse order."""
    return image.flip(0) if isinstance(image, torch.Tensor) else np.ascontiguousarray(image[::-1])


def augment_batch(transform: Compose, images: np.ndarray, labels: np.ndarray, seed: int):
    """Apply ``transform`` to every slice of a batch: images (B, C, H, W), labels (B, H, W) -> same shapes."""
    transform.set_random_state(seed=seed % (2**32))
    out_i, out_l = np.empty_like(images), np.empty_like(labels)
    for k in range(len(images)):
        d = transform({"image": images[k], "label": labels[k][None].astype(np.float32)})
        out_i[k] = np.clip(np.asarray(d["image"]), 0.0, 1.0)
        out_l[k] = np.asarray(d["label"])[0].round()
    return out_i, out_l


class BatchAugmentation:
    """The transforms of ``build_augmentation``, drawn per slice but applied to a whole batch at once on the
    batch's device: one grid-sample for the random affines, broadcast arithmetic for the intensity changes and
    one grouped convolution for the blur. The per-slice MONAI loop feeds ~450 slices/s per CPU core, far below
    what a GPU trains on (benchmarks/bench_gpu.py); select it with ``"backend": "batched"``.

    Same probabilities and ranges as the MONAI pipeline: affine (rotation, scale, translation in pixels;
    bilinear image, nearest label, border padding), left-right flip, gamma contrast, intensity scaling,
    a cubic bias field, Gaussian blur and Gaussian noise (std drawn in [0, std]); on request the 8 flips and
    quarter turns (``dihedral``) and an H&E stain jitter (``stain_jitter``).
    """

    def __init__(self, settings: Dict):
        self.p = float(settings.get("probability", 0.3))
        self.p_affine = float(settings.get("affine_probability", 0.7))
        self.rotate = float(np.deg2rad(float(settings.get("rotate_degrees", 15))))
        self.scale = float(settings.get("scale", 0.15))
        self.translate = float(settings.get("translate", 4))
        flip = settings.get("flip_axis")
        self.flip_dim = None if flip is None else 2 + int(flip)   # spatial axis of (C, H, W) -> dim of (B, C, H, W)
        self.flip_across_slices = bool(settings.get("flip_across_slices", False))
        self.dihedral = bool(settings.get("dihedral", False))
        self.stain_jitter = float(settings.get("stain_jitter", 0.0))

    def __call__(self, images, labels, generator):
        """images (B, C, H, W) float in [0, 1], labels (B, H, W) int64, on any device; draws from ``generator``
        (a CPU ``torch.Generator``, so that a seed gives the same batch on every device)."""
        b, dev = images.shape[0], images.device

        def uniform(lo, hi, *shape):
            return (lo + (hi - lo) * torch.rand(b, *shape, generator=generator)).to(dev)

        def chance(p):
            return (torch.rand(b, generator=generator) < p).to(dev)

        images, labels = self._affine(images, labels, uniform, chance)
        if self.flip_dim is not None:
            flip = chance(0.5)
            images = torch.where(flip[:, None, None, None], images.flip(self.flip_dim), images)
            labels = torch.where(flip[:, None, None], labels.flip(self.flip_dim - 1), labels)
        if self.flip_across_slices:  # drawn only when asked for: older runs keep their random stream
            flip = chance(0.5)
            images = torch.where(flip[:, None, None, None], images.flip(1), images)
        if self.dihedral:  # drawn only when asked for, as above
            images, labels = _dihedral(images, labels, chance)
        if self.stain_jitter > 0:
            s = self.stain_jitter
            images = hed_jitter(images, 1 + uniform(-s, s, 3), uniform(-s, s, 3))
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        span = images.amax(dim=(1, 2, 3), keepdim=True) - lo
        gamma = torch.where(chance(self.p), uniform(0.7, 1.5), torch.ones(b, device=dev))[:, None, None, None]
        images = ((images - lo) / (span + 1e-7)).clamp_min(0).pow(gamma) * span + lo
        factor = torch.where(chance(self.p), 1 + uniform(-0.1, 0.1), torch.ones(b, device=dev))
        images = images * factor[:, None, None, None]
        images = images * self._bias_field(images, uniform, chance)
        images = self._blur(images, uniform, chance)
        std = torch.where(chance(self.p), uniform(0.0, 0.03), torch.zeros(b, device=dev))
        noise = torch.randn(images.shape, generator=generator).to(dev)
        return (images + std[:, None, None, None] * noise).clamp(0.0, 1.0), labels

    def _affine(self, images, labels, uniform, chance):
        b, _, h, w = images.shape
        on = chance(self.p_affine)
        angle = torch.where(on, uniform(-self.rotate, self.rotate), torch.zeros(b, device=images.device))
        zoom = torch.where(on[:, None], 1 + uniform(-self.scale, self.scale, 2), torch.ones(b, 2, device=images.device))
        shift = torch.where(on[:, None], uniform(-self.translate, self.translate, 2),
                            torch.zeros(b, 2, device=images.device))
        if not bool(on.any()):
            return images, labels
        theta = affine_theta(angle, zoom, shift, h, w)
        grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels = F.grid_sample(labels[:, None].to(images.dtype), grid, mode="nearest", padding_mode="border",
                               align_corners=False)[:, 0].round().long()
        return images, labels

    def _bias_field(self, images, uniform, chance):
        """exp of a random cubic polynomial over [-1, 1]^2, coefficients in [0, 0.2] (RandBiasField's range)."""
        b, _, h, w = images.shape
        powers = [(i, j) for i in range(4) for j in range(4 - i)]
        coeff = uniform(0.0, 0.2, len(powers)) * chance(self.p * 0.5)[:, None]
        y = torch.linspace(-1, 1, h, device=images.device)[:, None]
        x = torch.linspace(-1, 1, w, device=images.device)[None, :]
        basis = torch.stack([y ** i * x ** j for i, j in powers])                           # (P, H, W)
        return torch.exp(torch.einsum("bp,phw->bhw", coeff, basis))[:, None]

    def _blur(self, images, uniform, chance, radius: int = 4):
        """Separable Gaussian blur with a sigma per slice and axis in [0.3, 1.2]; other slices unchanged."""
        b, c, h, w = images.shape
        on = chance(self.p * 0.5)
        if not bool(on.any()):
            return images
        offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
        out = images.reshape(1, b * c, h, w)
        for axis in (0, 1):
            sigma = uniform(0.3, 1.2)
            kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
            kernel = kernel / kernel.sum(dim=1, keepdim=True)
            identity = (offsets == 0).to(images.dtype)[None].expand(b, -1)
            kernel = torch.where(on[:, None], kernel, identity).repeat_interleave(c, dim=0)
            if axis == 0:
                out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None],
                               groups=b * c)
            else:
                out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :],
                               groups=b * c)
        return out.reshape(b, c, h, w)


def _dihedral(images, labels, chance):
    """Each slice of images (B, C, H, W) and labels (B, H, W) transposed, then flipped along each axis, each with
    probability 1/2: the 8 symmetries of a square, equally likely."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square slices, got {tuple(images.shape[-2:])}")
    for flip_image, flip_label, on in ((lambda x: x.transpose(-1, -2), lambda y: y.transpose(-1, -2), chance(0.5)),
                                       (lambda x: x.flip(-2), lambda y: y.flip(-2), chance(0.5)),
                                       (lambda x: x.flip(-1), lambda y: y.flip(-1), chance(0.5))):
        images = torch.where(on[:, None, None, None], flip_image(images), images)
        labels = torch.where(on[:, None, None], flip_label(labels), labels)
    return images, labels


def hed_jitter(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB slices (B, 3, H, W) in [0, 1] (1 = no absorption) with their stain densities changed: optical density
    -log10(I) is split into haematoxylin, eosin and DAB, each becomes ``scale * density + shift`` (scale and shift
    (B, 3)), and the result is recombined into RGB in [0, 1]."""
    if images.shape[1] != 3:
        raise ValueError(f"stain_jitter needs RGB images (3 channels), got {images.shape[1]}")
    dev = images.device
    od = -torch.log10(images.float().clamp_min(1e-3))                                   # (B, 3, H, W)
    stains = torch.einsum("bchw,cs->bshw", od, HED_FROM_RGB.to(dev))                    # (B, 3 stains, H, W)
    stains = stains * scale[:, :, None, None] + shift[:, :, None, None]
    od = torch.einsum("bshw,sc->bchw", stains, RGB_FROM_HED.to(dev))
    return torch.pow(10.0, -od).clamp(0.0, 1.0).to(images.dtype)


def affine_theta(angle: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid``'s (B, 2, 3) matrices (align_corners=False) for a rotation by ``angle`` (B,) radians
    about the image centre, a zoom (B, 2) along (x, y) and a shift (B, 2) of (x, y) pixels, all in pixel
    units: the output pixel p samples the input at centre + R(p - centre) / zoom + shift."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    half = torch.tensor([w / 2.0, h / 2.0], device=angle.device, dtype=angle.dtype)   # pixels per unit (x, y)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2) in pixels
    linear = (rot / zoom[:, None, :]) * half[None, None, :] / half[None, :, None]      # S^-1 (R Z^-1) S
    return torch.cat([linear, (shift / half)[:, :, None]], dim=2)
