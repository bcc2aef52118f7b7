"""Segmentation and uncertainty metrics, per volume, with MONAI's implementations where they exist.

Segmentation (per class, background excluded): Dice, IoU, precision, recall, HD95 (mm). Uncertainty: voxel
AUROC of the variance as a detector of wrong voxels, Spearman correlation between per-slice mean uncertainty
and per-slice error rate, and expected calibration error (ECE) of the mean class probabilities.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import torch
from monai.metrics import (compute_confusion_matrix_metric, compute_dice, compute_hausdorff_distance,
                           compute_iou, compute_roc_auc, get_confusion_matrix)
from monai.networks.utils import one_hot

SEG_KEYS = ("dice", "iou", "precision", "recall", "hd95")


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                         spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Dict[int, Dict[str, float]]:
    """Per-class metrics for one volume. ``pred``/``truth``: integer label arrays of equal shape.

    ``spacing`` is given in array-axis order. Empty prediction and empty truth count as a perfect match;
    HD95 is NaN when only one of them is empty.
    """
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_classes)
    t = one_hot(torch.as_tensor(truth, dtype=torch.long)[None, None], num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p, t, include_background=False, ignore_empty=False)[0]
    cm = get_confusion_matrix(p, t, include_background=False)
    precision = compute_confusion_matrix_metric("precision", cm)[0]
    recall = compute_confusion_matrix_metric("recall", cm)[0]
    hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95,
                                    spacing=[float(s) for s in spacing])[0]
    out = {}
    for i, c in enumerate(range(1, num_classes)):
        has_p, has_t = bool(p[0, c].any()), bool(t[0, c].any())
        both_empty = not has_p and not has_t
        out[c] = {
            "dice": float(dice[i]),
            "iou": float(iou[i]),
            "precision": 1.0 if both_empty else (float(precision[i]) if has_p else 0.0),
            "recall": 1.0 if both_empty else (float(recall[i]) if has_t else 0.0),
            "hd95": 0.0 if both_empty else (float(hd[i]) if has_p and has_t else float("nan")),
        }
    return out


def error_auroc(variance: np.ndarray, error: np.ndarray) -> float:
    """AUROC of the uncertainty as a detector of wrong voxels/pixels (NaN when all or none are wrong)."""
    if not error.any() or error.all():
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(variance.ravel(), dtype=torch.float32),
                                 torch.as_tensor(error.ravel(), dtype=torch.float32)))


def uncertainty_metrics(variance: np.ndarray, probabilities: np.ndarray, pred: np.ndarray, truth: np.ndarray,
                        slice_axis: int = 0, bins: int = 15) -> Dict[str, float]:
    """Uncertainty quality for one volume. ``probabilities``: (C, ...) mean class probabilities."""
    error = (pred != truth)
    auroc = error_auroc(variance, error)
    axes = tuple(a for a in range(variance.ndim) if a != slice_axis)
    spearman = spearman_correlation(variance.mean(axis=axes), error.mean(axis=axes))
    confidence = probabilities.max(axis=0)
    return {"auroc": auroc, "spearman_slice": spearman, "ece": expected_calibration_error(confidence, ~error, bins)}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; NaN when either side is constant (correlation undefined)."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)| over equal-width confidence bins."""
    conf, corr = confidence.ravel().astype(np.float64), correct.ravel().astype(np.float64)
    idx = np.clip((conf * bins).astype(int), 0, bins - 1)
    total = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    corr_sum = np.bincount(idx, weights=corr, minlength=bins)
    nonzero = total > 0
    return float(np.sum(np.abs(corr_sum[nonzero] - conf_sum[nonzero])) / max(len(conf), 1))


def summarise(per_volume: List[Dict[int, Dict[str, float]]], class_names: Sequence[str]) -> Dict[str, Dict]:
    """Mean and std over volumes per class -> {"<name>": {"dice": mean, ..., "dice_std": std, ...}}."""
    out = {}
    for c in range(1, len(class_names)):
        row = {}
        for key in SEG_KEYS:
            vals = np.array([v[c][key] for v in per_volume], dtype=float)
            vals = vals[np.isfinite(vals)]
            row[key] = float(vals.mean()) if len(vals) else float("nan")
            row[key + "_std"] = float(vals.std()) if len(vals) else float("nan")
        out[class_names[c]] = row
    return out


def nanmean(values) -> float:
    vals = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return float(vals.mean()) if len(vals) else float("nan")
