"""Evaluate a model on labelled cases: the whole inference pipeline per volume, metrics per volume, then means."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .data import Case, check_volume, read_label_map, stem_of
from .inference import (mirror_axis_for, parallel_map, resolve_device, resolve_precision, segment_image,
                        step_weights_for)
from .inputs import ScanInput, read_scan
from .localise import expects_thin_slices
from .metrics import nanmean, segmentation_metrics, summarise, uncertainty_metrics
from .model_io import LoadedModel
from .quality import needs_review, review_limits


def evaluate_cases(model: LoadedModel, cases: Sequence[Case], steps: Optional[int] = None, samples: int = 5,
                   seed: Optional[int] = 0, device: str = "cpu", with_uncertainty: bool = True,
                   on_volume: Optional[Callable[[int, int, str], None]] = None, precision: str = "auto",
                   early_exit: bool = True, parallel: bool = False, mirror: Optional[bool] = None,
                   step_pooling: Optional[str] = None) -> Dict:
    """Segment every case and compare with its label on the input grid (the user's geometry).

    ``parallel``: segment several volumes at once on the CPU (``inference.parallel_map``; same results up to
    float rounding); ``seconds_per_volume`` is then each volume's own time while it shared the cores, and
    ``volumes_at_once`` and ``wall_seconds`` say so. ``on_volume(i, n, name)`` is called, in order, as case i
    is done.

    Returns ``{"per_class": {name: {dice, iou, precision, recall, hd95, *_std}}, "uncertainty": {...},
    "volumes": N, "seconds_per_volume": s, "per_volume": [...], "precision": "float32" or "bfloat16",
    "early_exit": bool, "mirror": bool}``, plus ``"warnings": [...]`` when a case needs a word (e.g. a label map
    with no structure); metrics are fractions, HD95 in mm. ``mirror``: see ``segment_image``.
    """
    names = model.class_names
    for declared in {c.classes for c in cases if c.classes is not None}:
        declared.check(names)  # a dataset.json whose labels mean other classes: refused before any work
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)  # also refuses a bad name before any work
    mirror = mirror_axis_for(model, mirror) is not None  # the card's default resolved, a bad request refused
    step_weights_for(model, steps, step_pooling)  # likewise
    start = time.perf_counter()

    def one(i: int):
        return _evaluate_case(model, cases[i], names, steps, samples, None if seed is None else seed + i, device,
                              with_uncertainty, precision, early_exit, mirror, step_pooling)

    per_volume, unc, rows, warnings = [], [], [], []
    with parallel_map(len(cases) if parallel else 1, dev) as (workers, mapped):
        for i, (m, u, row, notes) in enumerate(mapped(one, range(len(cases)))):
            if on_volume is not None:
                on_volume(i, len(cases), cases[i].name)
            per_volume.append(m)
            unc.append(u)
            rows.append(row)
            warnings.extend(notes)
    seconds = [r["seconds"] for r in rows]
    report = {
        "per_class": summarise(per_volume, names),
        "volumes": len(cases),
        "seconds_per_volume": float(np.mean(seconds)) if seconds else float("nan"),
        "per_volume": rows,
        "precision": str(dtype).replace("torch.", ""),
        "early_exit": bool(early_exit),
        "mirror": mirror,
        "step_pooling": step_pooling or model.step_pooling,
    }
    if warnings:
        report["warnings"] = warnings
    if workers > 1:
        report.update(volumes_at_once=workers, wall_seconds=round(time.perf_counter() - start, 2))
    if with_uncertainty:
        report["uncertainty"] = {k: nanmean(u[k] for u in unc) for k in ("auroc", "spearman_slice", "ece")}
        review = review_summary(rows, names[1:], model.card, step_pooling)
        if review:
            report["review"] = review
    return report


def review_summary(rows: Sequence[Dict], class_names: Sequence[str], card: Dict,
                   step_pooling: Optional[str] = None) -> Optional[Dict]:
    """How the card's review flags (``cdal_core.quality``) fall on labelled volumes: per class, how many were
    marked and the mean Dice of the marked and of the other volumes. None when the card has no limits (for this
    ``step_pooling``)."""
    limits = review_limits(card, step_pooling)
    if not limits:
        return None
    out = {}
    for name in class_names:
        marked = [needs_review(name, r.get(f"{name}_mean_uncertainty"), limits) for r in rows]
        dice = [r.get(f"{name}_dice") for r in rows]
        means = [nanmean(d for d, m in zip(dice, marked) if m == side) for side in (True, False)]
        out[name] = {"limit": limits.get(name), "marked": int(sum(marked)),
                     "dice_marked": None if np.isnan(means[0]) else means[0],  # None: no volume in that group
                     "dice_not_marked": None if np.isnan(means[1]) else means[1]}
    return out


def _evaluate_case(model: LoadedModel, case: Case, names, steps, samples, seed, device, with_uncertainty: bool,
                   precision: str, early_exit: bool, mirror: Optional[bool] = None,
                   step_pooling: Optional[str] = None):
    """One case: (segmentation metrics, uncertainty metrics or None, per-volume row, warnings)."""
    image, warnings = _read_case_image(case.image, model.config.image_channels,
                                       thin_slices_expected=expects_thin_slices(model.card))
    truth = read_label_map(case.label, image, len(names))  # checked before the slow part
    if not truth.any():
        warnings.append(f"{case.label}: has no labelled structure (every voxel is background), so this case's "
                        "Dice is 0 or undefined and not meaningful: check the label map or leave the case out")
    result = segment_image(image, model, steps=steps, samples=samples, seed=seed, device=device,
                           with_attention=False, precision=precision, early_exit=early_exit, mirror=mirror,
                           step_pooling=step_pooling)
    pred = sitk.GetArrayFromImage(result.labels).astype(np.int64)
    spacing = tuple(reversed(image.GetSpacing()))  # array order (z, y, x)
    m = segmentation_metrics(pred, truth, len(names), spacing)
    u = None
    row = {"case": case.name, "seconds": result.seconds, **{f"{names[c]}_dice": m[c]["dice"] for c in m}}
    if with_uncertainty:
        variance = sitk.GetArrayFromImage(result.uncertainty)
        u = uncertainty_metrics(variance, result.probabilities, pred, truth, slice_axis=_input_slice_axis(image, model))
        # what the model's review limits are set from (cdal_core.quality)
        row.update({f"{names[c]}_mean_uncertainty": float(variance[pred == c].mean()) if (pred == c).any() else None
                    for c in m})
    return m, u, row, warnings


def _read_case_image(path: Path, image_channels: int,
                     thin_slices_expected: bool = True) -> Tuple[sitk.Image, List[str]]:
    """Read and check an image as ``cdal predict`` does, naming the file: a damaged file or a mostly NaN/inf scan
    is refused (SimpleITK alone reads NaN as 0); a few NaN/inf voxels become background with a warning."""
    scan = read_scan(ScanInput(Path(path), stem_of(path)), allow_thick_slices=True,  # evaluate scores any spacing
                     thin_slices_expected=thin_slices_expected)
    check_volume(scan.image, image_channels, name=str(path))
    return scan.image, list(scan.warnings)


def _input_slice_axis(image: sitk.Image, model: LoadedModel) -> int:
    """Which array axis of the *input* corresponds to the model's slicing axis (for per-slice statistics)."""
    mapping_dir = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
    ref = sitk.DICOMOrient(sitk.Image([2, 2, 2], sitk.sitkUInt8), model.grid.orientation)
    ref_dir = np.asarray(ref.GetDirection()).reshape(3, 3)
    # model array axis a (z,y,x order) is ITK axis 2 - a; its world direction is a column of ref_dir
    world = ref_dir[:, 2 - model.slice_axis]
    itk_axis = int(np.argmax(np.abs(mapping_dir.T @ world)))
    return 2 - itk_axis


HELD_OUT_KEYS = ("validation_cases", "model_selection_cases", "held_out_cases")
# a folder with one of these names is told apart by its parent too (MoNuSeg/train is not any train/)
GENERIC_FOLDER_NAMES = {"train", "training", "test", "val", "validation", "data", "images", "imagestr"}


def _path_parts(path: str) -> List[str]:
    return [part.lower() for part in re.split(r"[\\/]", str(path)) if part]


def same_data_folder(recorded: str, data_folder: str, relative: bool = False) -> bool:
    """Whether a card's training folder names ``data_folder``: by its name (and its parent's, for a generic name
    such as ``train``), not by its whole path, so that a model trained on another machine is recognised. A
    ``relative`` record (a GPU bundle's source under the shared data) must match in all its parts."""
    mine, theirs = _path_parts(str(Path(data_folder).resolve())), _path_parts(recorded)
    if not theirs:
        return False
    n = len(theirs) if relative else (2 if theirs[-1] in GENERIC_FOLDER_NAMES else 1)
    return len(mine) >= n and mine[-n:] == theirs[-n:]


def cases_trained_on(card: Dict, data_folder: str, case_names: Sequence[str]) -> Tuple[List[str], str]:
    """The names among ``case_names`` that a generator of the model trained on, by its card, and that training
    folder. A generator trained on ``data_folder`` (``same_data_folder``; a GPU bundle's card names the folder it
    was made from in ``source_folder``) saw every case of it outside its held-out lists; a card without those
    lists says nothing (empty answer)."""
    trainings = [card.get("training") or {}] + [m.get("training") or {} for m in card.get("members") or []]
    seen, folder = set(), ""
    for training in trainings:
        data = training.get("data")
        if not isinstance(data, dict):
            continue
        source = data.get("source_folder")
        recorded = source or data.get("folder")
        if not recorded or not same_data_folder(str(recorded), data_folder, relative=bool(source)):
            continue
        lists = [data[k] for k in HELD_OUT_KEYS if isinstance(data.get(k), list)]
        if not lists:
            continue
        held_out = set().union(*lists)
        seen.update(n for n in case_names if n not in held_out)
        folder = str(recorded)
    return [n for n in case_names if n in seen], folder


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
    for name, r in report.get("review", {}).items():
        line = f"review flags, {name}: {r['marked']} of {report['volumes']} volumes marked"
        if r["marked"]:
            groups = [(r["dice_marked"], "marked"), (r["dice_not_marked"], "not marked")]
            line += " (Dice " + ", ".join(f"{100 * d:.2f} {what}" for d, what in groups if d is not None) + ")"
        lines.append(line)
    line = f"{report['volumes']} volumes, {report['seconds_per_volume']:.2f} s per volume"
    if report.get("volumes_at_once", 1) > 1:  # each volume's own time was spent sharing the cores
        line += (f" ({report['volumes_at_once']} at a time: {report['wall_seconds'] / report['volumes']:.2f} s "
                 "per volume of wall clock)")
    lines.append(line)
    return "\n".join(lines + [f"cdal: warning: {w}" for w in report.get("warnings", [])])  # as scan.format_report
