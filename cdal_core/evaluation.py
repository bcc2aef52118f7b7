"""Evaluate a model on labelled cases: the whole inference pipeline per volume, metrics per volume, then means."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .data import Case, read_image
from .errors import CDALError
from .inference import resolve_device, resolve_precision, segment_image
from .metrics import nanmean, segmentation_metrics, summarise, uncertainty_metrics
from .model_io import LoadedModel


def evaluate_cases(model: LoadedModel, cases: Sequence[Case], steps: Optional[int] = None, samples: int = 5,
                   seed: Optional[int] = 0, device: str = "cpu", with_uncertainty: bool = True,
                   on_volume: Optional[Callable[[int, int, str], None]] = None, precision: str = "auto",
                   early_exit: bool = True) -> Dict:
    """Segment every case and compare with its label on the input grid (the user's geometry).

    Returns ``{"per_class": {name: {dice, iou, precision, recall, hd95, *_std}}, "uncertainty": {...},
    "volumes": N, "seconds_per_volume": s, "per_volume": [...], "precision": "float32" or "bfloat16",
    "early_exit": bool}``;
    metrics are fractions, HD95 in mm.
    """
    names = model.class_names
    dtype = resolve_precision(precision, resolve_device(device))  # also refuses a bad name before any work
    per_volume, unc, rows, seconds = [], [], [], []
    for i, case in enumerate(cases):
        if on_volume is not None:
            on_volume(i, len(cases), case.name)
        image = read_image(case.image)
        result = segment_image(image, model, steps=steps, samples=samples,
                               seed=None if seed is None else seed + i, device=device, with_attention=False,
                               precision=precision, early_exit=early_exit)
        seconds.append(result.seconds)
        truth_img = read_image(case.label)
        truth = sitk.GetArrayFromImage(truth_img).astype(np.int64)
        if truth.shape != sitk.GetArrayViewFromImage(image).shape:
            raise CDALError(f"{case.label}: label size differs from its image: the pair does not match")
        if truth.min() < 0 or truth.max() >= len(names):
            raise CDALError(f"{case.label}: has label values outside the model's classes 0..{len(names) - 1}")
        pred = sitk.GetArrayFromImage(result.labels).astype(np.int64)
        spacing = tuple(reversed(image.GetSpacing()))  # array order (z, y, x)
        m = segmentation_metrics(pred, truth, len(names), spacing)
        per_volume.append(m)
        slice_axis = _input_slice_axis(image, model)
        if with_uncertainty:
            unc.append(uncertainty_metrics(sitk.GetArrayFromImage(result.uncertainty), result.probabilities,
                                           pred, truth, slice_axis=slice_axis))
        rows.append({"case": case.name, "seconds": result.seconds,
                     **{f"{names[c]}_dice": m[c]["dice"] for c in m}})
    report = {
        "per_class": summarise(per_volume, names),
        "volumes": len(cases),
        "seconds_per_volume": float(np.mean(seconds)) if seconds else float("nan"),
        "per_volume": rows,
        "precision": str(dtype).replace("torch.", ""),
        "early_exit": bool(early_exit),
    }
    if with_uncertainty:
        report["uncertainty"] = {k: nanmean(u[k] for u in unc) for k in ("auroc", "spearman_slice", "ece")}
    return report


def _input_slice_axis(image: sitk.Image, model: LoadedModel) -> int:
    """Which array axis of the *input* corresponds to the model's slicing axis (for per-slice statistics)."""
    mapping_dir = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
    ref = sitk.DICOMOrient(sitk.Image([2, 2, 2], sitk.sitkUInt8), model.grid.orientation)
    ref_dir = np.asarray(ref.GetDirection()).reshape(3, 3)
    # model array axis a (z,y,x order) is ITK axis 2 - a; its world direction is a column of ref_dir
    world = ref_dir[:, 2 - model.slice_axis]
    itk_axis = int(np.argmax(np.abs(mapping_dir.T @ world)))
    return 2 - itk_axis


def mean_foreground_dice(report: Dict) -> float:
    return nanmean(v["dice"] for v in report["per_class"].values())


def format_table(report: Dict) -> str:
    keys = ("dice", "iou", "precision", "recall", "hd95")
    lines = [f"{'class':<14}" + "".join(f"{k:>16}" for k in keys)]
    for name, row in report["per_class"].items():
        cells = []
        for k in keys:
            if k == "hd95":
                cells.append(f"{row[k]:7.2f} ± {row[k + '_std']:5.2f}".rjust(16))
            else:
                cells.append(f"{100 * row[k]:6.2f} ± {100 * row[k + '_std']:5.2f}".rjust(16))
        lines.append(f"{name:<14}" + "".join(cells))
    if "uncertainty" in report:
        u = report["uncertainty"]
        lines.append(f"uncertainty: voxel AUROC {u['auroc']:.3f}, slice Spearman {u['spearman_slice']:.3f}, "
                     f"ECE {u['ece']:.4f}")
    lines.append(f"{report['volumes']} volumes, {report['seconds_per_volume']:.2f} s per volume")
    return "\n".join(lines)
