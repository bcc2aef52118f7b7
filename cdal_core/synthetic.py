"""Small synthetic MSD-style datasets (two foreground classes) for tests, demos and smoke-training.

Each volume holds two touching ellipsoids, "Anterior" (bright) and "Posterior" (darker), in smooth textured
background, with a random bias field, noise and a random intensity range (uint8 or float with outliers) so
that per-volume normalisation is exercised the way real MSD data needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    img = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
    out = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma))
    return out / (out.std() + 1e-6)


def make_volume(rng: np.random.Generator, shape: Optional[Tuple[int, int, int]] = None):
    """One (image, label) pair as arrays in (z, y, x) order."""
    if shape is None:
        shape = (int(rng.integers(28, 37)), int(rng.integers(40, 53)), int(rng.integers(30, 41)))
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = np.array(shape, float) / 2 + rng.uniform(-3, 3, 3)
    radii = np.array([rng.uniform(6, 9), rng.uniform(11, 15), rng.uniform(6, 9)])
    angle = rng.uniform(-0.4, 0.4)
    dy, dx = yy - centre[1], xx - centre[2]
    ry, rx = np.cos(angle) * dy - np.sin(angle) * dx, np.sin(angle) * dy + np.cos(angle) * dx
    inside = ((zz - centre[0]) / radii[0]) ** 2 + (ry / radii[1]) ** 2 + (rx / radii[2]) ** 2 <= 1
    split = rng.uniform(-0.2, 0.2) * radii[1]
    label = np.zeros(shape, np.uint8)
    label[inside & (ry < split)] = 1
    label[inside & (ry >= split)] = 2
    image = 0.25 + 0.08 * _smooth_noise(rng, shape, 2.0)
    image[label == 1] = 0.85 + rng.uniform(-0.05, 0.05)
    image[label == 2] = 0.6 + rng.uniform(-0.05, 0.05)
    image = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(image), 0.7))
    image *= 1 + 0.15 * _smooth_noise(rng, shape, 6.0)          # bias field
    image += rng.normal(0, 0.04, shape)
    if rng.random() < 0.5:
        image = np.clip(image * 255, 0, 255).astype(np.uint8)
    else:
        image = (image * rng.uniform(100, 5000)).astype(np.float32)
        image.flat[rng.integers(0, image.size, 3)] = rng.uniform(1e5, 1e6)  # outlier voxels
    return image, label


def to_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS, like MSD NIfTI files
    return img


def make_msd_dataset(out_dir, num_volumes: int = 24, seed: int = 0, name: str = "Synthetic") -> Path:
    """Write ``dataset.json``, ``imagesTr/case_XXX.nii.gz`` and ``labelsTr/case_XXX.nii.gz``."""
    root = Path(out_dir)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    for i in range(num_volumes):
        image, label = make_volume(rng)
        stem = f"case_{i:03d}"
        sitk.WriteImage(to_image(image), str(root / "imagesTr" / f"{stem}.nii.gz"))
        sitk.WriteImage(to_image(label), str(root / "labelsTr" / f"{stem}.nii.gz"))
        training.append({"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz"})
    meta = {"name": name, "description": "synthetic two-class ellipsoids (cdal_core.synthetic)",
            "tensorImageSize": "3D", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": num_volumes, "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
