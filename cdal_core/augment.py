"""MONAI augmentations for 2D training slices, seeded per training step so that a resumed run repeats exactly."""

from __future__ import annotations

from typing import Dict

import numpy as np
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandFlipd,
                              RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd)


def build_augmentation(settings: Dict) -> Compose:
    """Spatial (affine, optional left-right flip) and intensity (gamma, bias field, blur, noise) augmentation.

    Works on dicts ``{"image": (C, H, W) float in [0, 1], "label": (1, H, W)}``. Blur and bias field make a
    model trained on sharp single scans robust to smoother images such as population templates.
    """
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
    transforms += [
        RandAdjustContrastd(keys="image", prob=p, gamma=(0.7, 1.5)),
        RandScaleIntensityd(keys="image", prob=p, factors=0.1),
        RandBiasFieldd(keys="image", prob=p * 0.5, coeff_range=(0.0, 0.2)),
        RandGaussianSmoothd(keys="image", prob=p * 0.5, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        RandGaussianNoised(keys="image", prob=p, std=0.03),
    ]
    return Compose(transforms)


def augment_batch(transform: Compose, images: np.ndarray, labels: np.ndarray, seed: int):
    """Apply ``transform`` to every slice of a batch: images (B, C, H, W), labels (B, H, W) -> same shapes."""
    transform.set_random_state(seed=seed % (2**32))
    out_i, out_l = np.empty_like(images), np.empty_like(labels)
    for k in range(len(images)):
        d = transform({"image": images[k], "label": labels[k][None].astype(np.float32)})
        out_i[k] = np.clip(np.asarray(d["image"]), 0.0, 1.0)
        out_l[k] = np.asarray(d["label"])[0].round()
    return out_i, out_l
