"""Segment a scan as a user hands it over: a crop, a whole brain (located automatically) or a user's ROI.

``segment_scan`` is what ``cdal predict`` and the Slicer module run. It decides where the model looks:
- a user ROI (RAS box, mm) wins: that box is segmented;
- a scan much larger than the model's crops (a brain or a head) of a model whose card names template regions
  (the hippocampus model does) is registered to a brain template and one box per side is segmented
  (``localise.py``), then results are put back on the scan's grid;
- anything else (an MSD-like crop) is segmented whole.
Outputs always lie on the input grid; ``sides`` tells for each labelled voxel which side it belongs to, and the
report gives per-side, per-class volumes computed from exactly those label maps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .data import check_volume
from .errors import CDALError
from .inference import VolumeResult, check_takes_volumes, parallel_map, resolve_device, segment_image
from .inputs import check_real_valued, source_name
from .localise import Region, dip_degrees, locate, needs_localisation, region_specs
from .model_io import LoadedModel
from .quality import mark_for_review

ProgressFn = Callable[[float, str], None]
SIDE_CODES = {"left": 1, "right": 2, "unknown": 3}
LOCALISE_MODES = ("auto", "on", "off")
# A located side whose segmentation is smaller than this (mm³) is not a hippocampus (adult: 2,000-6,500):
# the box was put in the wrong place, so the result is refused rather than reported.
MIN_SIDE_MM3 = 700.0


@dataclass
class ScanResult:
    labels: sitk.Image                   # UInt8, the model's label values, input geometry
    uncertainty: sitk.Image              # Float32 variance across samples
    attention: Optional[sitk.Image]      # Float32 in [0, 1]
    sides: sitk.Image                    # UInt8: 1 left, 2 right, 3 side unknown, on labelled voxels; 0 elsewhere
    report: Dict
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0


def parse_roi(text: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """'R1,A1,S1,R2,A2,S2' (two opposite corners, RAS mm, as Slicer shows them) -> two corners."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 6 or not np.all(np.isfinite(values)):
        raise CDALError(f"--roi '{text}': expected six numbers R1,A1,S1,R2,A2,S2 (two opposite corners in RAS mm, "
                        "as Slicer's ROI shows them)")
    return tuple(values[:3]), tuple(values[3:])


def segment_scan(image: sitk.Image, model: LoadedModel, roi=None, localise: str = "auto",
                 steps: Optional[int] = None, samples: int = 5, seed: Optional[int] = None, device: str = "cpu",
                 precision: str = "auto", early_exit: bool = True,
                 progress: Optional[ProgressFn] = None, mirror: Optional[bool] = None,
                 name: Optional[str] = None, step_pooling: Optional[str] = None,
                 with_attention: bool = True) -> ScanResult:
    """Segment one 3D scan. ``roi``: two RAS corners (mm) or None. ``localise``: 'auto' (locate when the scan is
    a brain rather than a crop), 'on' (always) or 'off' (segment the whole scan as it is). ``mirror``: see
    ``segment_image``, as are ``step_pooling`` and ``with_attention`` (False: no attention map, ``attention`` is
    None). ``name`` starts error messages (default: the file ``inputs.read_scan`` read)."""
    start = time.perf_counter()
    if localise not in LOCALISE_MODES:
        raise CDALError(f"unknown localisation mode '{localise}': use auto, on or off")
    name = name or source_name(image)
    check_takes_volumes(model, name)
    check_real_valued(image, name)
    check_volume(image, model.config.image_channels, name=name)
    run = dict(steps=steps, samples=samples, seed=seed, device=device, precision=precision, early_exit=early_exit,
               mirror=mirror, name=name, step_pooling=step_pooling, with_attention=with_attention)
    specs = region_specs(model.card)
    if roi is not None:
        result = _segment_roi(image, model, roi, run, progress)
    elif specs and (localise == "on" or (localise == "auto" and needs_localisation(image))):
        result = _segment_located(image, model, specs, run, progress)
    else:
        whole = segment_image(image, model, progress=progress, **run)
        sides = _side_map(sitk.GetArrayViewFromImage(whole.labels), "unknown")
        result = _assemble(image, model, sitk.GetArrayFromImage(whole.labels), sitk.GetArrayFromImage(whole.uncertainty),
                           None if whole.attention is None else sitk.GetArrayFromImage(whole.attention), sides,
                           {"method": "none (segmented whole)", "status": "not needed"}, whole.notes,
                           step_pooling)
    result.seconds = time.perf_counter() - start
    result.report["seconds"] = round(result.seconds, 2)
    return result


# -- the three ways -----------------------------------------------------------------------------------------
def _segment_located(image, model, specs, run, progress) -> ScanResult:
    _report(progress, 0.0, "locating the hippocampi (registration to a brain template)")
    loc = locate(image, specs)
    if loc.status != "ok":
        raise CDALError("could not locate the hippocampi reliably ({}): place an ROI around each hippocampus by "
                        "hand (--roi R1,A1,S1,R2,A2,S2 in RAS mm, or an ROI node in Slicer) and segment again"
                        .format("; ".join(loc.reasons)))
    shape = sitk.GetArrayViewFromImage(image).shape
    labels, sides = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    uncertainty = np.zeros(shape, np.float32)
    attention = np.zeros(shape, np.float32) if run["with_attention"] else None
    fill = float(np.percentile(sitk.GetArrayViewFromImage(image)[::3, ::3, ::3], 0.5))  # dark level; a sample will do
    _report(progress, 0.08, "turning the boxes to the hippocampi's long axes")
    with parallel_map(len(loc.regions), resolve_device(run["device"])) as (_, mapped):
        loc.regions = list(mapped(lambda region: _turned_to_dip(region, image, fill, model, run), loc.regions))
    removed = {}
    crops = [region.crop(image, fill=fill) for region in loc.regions]
    for region, crop, res in zip(loc.regions, crops, _segment_sides(loc.regions, crops, model, run, progress)):
        probs, removed[region.side] = _largest_component(res.probabilities, float(np.prod(crop.GetSpacing())))
        box, lab, unc, att = _to_scan(image, region, crop, probs, res)
        lab = _largest_component_labels(lab)  # resampling back can split off a few boundary voxels
        mine = lab > 0
        labels[box][mine] = lab[mine]
        sides[box][mine] = SIDE_CODES[region.side]
        uncertainty[box] = np.maximum(uncertainty[box], unc)
        if att is not None:  # None under with_attention=False, where attention is None too
            attention[box] = np.maximum(attention[box], att)
    info = {**loc.to_dict(), "removed_islands_mm3": {k: round(v, 1) for k, v in removed.items()}}
    result = _assemble(image, model, labels, uncertainty, attention, sides, info, [], run["step_pooling"])
    _check_sides(result.report, [r.side for r in loc.regions])
    return result


def _turned_to_dip(region: Region, image: sitk.Image, fill: float, model: LoadedModel, run: Dict) -> Region:
    """The box turned about left-right so that the structure in it dips as in the crops the model learnt from
    (``RegionSpec.dip_deg``). A quick look (one step, one sample: about a tenth of the full run) finds it; the
    model segments worse when the dip differs (docs/RESULTS.md, "Session 16")."""
    if region.dip_deg is None:
        return region
    quick = segment_image(region.crop(image, fill=fill), model, steps=1, samples=1, seed=run["seed"],
                          device=run["device"], precision=run["precision"], with_attention=False)
    found = dip_degrees(sitk.GetArrayViewFromImage(quick.labels) > 0)
    return region if found is None else region.turned_to_dip(found)


def _segment_sides(regions, crops, model, run, progress) -> List[VolumeResult]:
    """Each side's crop segmented, both at once on a CPU with two free cores (``inference.parallel_map``: the
    same results as one after the other, each side having its own seed-driven noise), in ``regions`` order.
    Progress is the two sides' mean, reported under a lock (the callback may not be thread-safe)."""
    done, lock = [0.0] * len(crops), threading.Lock()

    def side(i: int) -> VolumeResult:
        def sub(fraction, message):
            with lock:
                done[i] = fraction
                progress(0.1 + 0.85 * sum(done) / len(done), f"{regions[i].side} hippocampus: {message}")
        return segment_image(crops[i], model, progress=sub if progress is not None else None, **run)

    with parallel_map(len(crops), resolve_device(run["device"])) as (_, mapped):
        return list(mapped(side, range(len(crops))))


def _segment_roi(image, model, roi, run, progress) -> ScanResult:
    start, size = _roi_index_box(image, roi)
    crop = sitk.RegionOfInterest(image, size, start)
    res = segment_image(crop, model, progress=progress, **run)
    shape = sitk.GetArrayViewFromImage(image).shape
    box = tuple(slice(s, s + n) for s, n in zip(start[::-1], size[::-1]))
    labels, uncertainty = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    attention = np.zeros(shape, np.float32) if res.attention is not None else None
    labels[box] = sitk.GetArrayViewFromImage(res.labels)
    uncertainty[box] = sitk.GetArrayViewFromImage(res.uncertainty)
    if attention is not None:
        attention[box] = sitk.GetArrayViewFromImage(res.attention)
    info = {"method": "user ROI", "status": "roi", "roi_ras": [list(roi[0]), list(roi[1])],
            "roi_index_box": {"start": list(start), "size": list(size)}}
    return _assemble(image, model, labels, uncertainty, attention, _side_map(labels, "unknown"), info, res.notes,
                     run["step_pooling"])


# -- helpers ------------------------------------------------------------------------------------------------
def _roi_index_box(image: sitk.Image, roi) -> Tuple[List[int], List[int]]:
    """The index box of ``image`` covering an RAS box (clipped to the image), or a clear error."""
    lo, hi = np.minimum(roi[0], roi[1]), np.maximum(roi[0], roi[1])
    corners = [np.array([c[0], c[1], c[2]]) for c in np.array(np.meshgrid(*zip(lo, hi))).T.reshape(-1, 3)]
    index = np.array([image.TransformPhysicalPointToContinuousIndex((-p[0], -p[1], p[2])) for p in corners])
    first = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    last = np.minimum(np.ceil(index.max(axis=0)).astype(int), np.asarray(image.GetSize()) - 1)
    size = last - first + 1
    if np.any(size < 1):
        raise CDALError("the ROI {} .. {} (RAS mm) does not overlap the image: give corners inside the scan"
                        .format(_fmt(lo), _fmt(hi)))
    if np.sum(size >= 8) < 3:
        raise CDALError("the ROI covers only {} voxels of the image: make it larger (at least 8 voxels a side)"
                        .format("x".join(str(int(s)) for s in size)))
    return [int(v) for v in first], [int(v) for v in size]


# A piece cut off the hippocampus by a one-voxel gap is still the hippocampus when it is large: on sub-03 of the
# shared T1 scans one model's head (669 mm³, all anterior) lay 2 voxels from the body and was dropped as an
# island. Small or farther islands (amygdala, choroid plexus; 7-109 voxels here) are still removed.
ISLAND_GAP_VOXELS = 2.0      # centre-to-centre distance to the largest component: one empty voxel between
ISLAND_MIN_FRACTION = 0.1    # of the largest component's size


def _outside_largest_component(labels: np.ndarray) -> np.ndarray:
    """Foreground voxels of ``labels`` (Z, Y, X) outside its largest face-connected foreground component, except
    components at least ``ISLAND_MIN_FRACTION`` of its size within ``ISLAND_GAP_VOXELS`` of it."""
    components_img = sitk.RelabelComponent(sitk.ConnectedComponent(
        sitk.GetImageFromArray((labels > 0).astype(np.uint8))))  # 1 = the largest
    components = sitk.GetArrayFromImage(components_img)
    count = int(components.max())
    if count <= 1:
        return components > 1
    distance = sitk.SignedMaurerDistanceMap(components_img == 1, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=False)
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(distance, components_img)
    main = stats.GetCount(1)
    keep = [k for k in range(2, count + 1)
            if stats.GetMinimum(k) <= ISLAND_GAP_VOXELS + 1e-3 and stats.GetCount(k) >= ISLAND_MIN_FRACTION * main]
    return (components > 1) & ~np.isin(components, keep)


def _largest_component(probs: np.ndarray, voxel_mm3: float) -> Tuple[np.ndarray, float]:
    """Keep the largest connected foreground component of a located box: the hippocampus is one structure, and
    anything detached from it in the box (amygdala, choroid plexus) is not it. Returns the edited probabilities
    (C, Z, Y, X) and the removed volume (mm³)."""
    drop = _outside_largest_component(probs.argmax(axis=0))
    if not drop.any():
        return probs, 0.0
    probs = probs.copy()
    probs[1:, drop] = 0.0
    probs[0, drop] = 1.0
    return probs, float(drop.sum()) * voxel_mm3


def _largest_component_labels(labels: np.ndarray) -> np.ndarray:
    """Labels (Z, Y, X) with everything outside the largest face-connected foreground component set to 0."""
    return np.where(_outside_largest_component(labels), 0, labels).astype(labels.dtype)


def _to_scan(image: sitk.Image, region: Region, crop: sitk.Image, probs: np.ndarray, res):
    """Crop-grid results -> the part of the scan's grid the box covers: (box slices, labels, variance, attention).
    Probabilities are interpolated and the labels are their argmax, as on a plain input."""
    reference, box = _covering_subgrid(image, crop, region.to_scan)
    to_crop = region.to_scan.GetInverse()

    def back(array: np.ndarray, default: float) -> np.ndarray:
        moved = sitk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
        moved.CopyInformation(crop)
        return sitk.GetArrayFromImage(sitk.Resample(moved, reference, to_crop, sitk.sitkLinear, default))

    scan_probs = np.stack([back(p, 1.0 if c == 0 else 0.0) for c, p in enumerate(probs)])
    labels = scan_probs.argmax(axis=0).astype(np.uint8)
    variance = back(sitk.GetArrayViewFromImage(res.uncertainty), 0.0)
    attention = back(sitk.GetArrayViewFromImage(res.attention), 0.0) if res.attention is not None else None
    return box, labels, variance, attention


def _covering_subgrid(image: sitk.Image, crop: sitk.Image,
                      to_scan: sitk.Transform) -> Tuple[sitk.Image, Tuple[slice, slice, slice]]:
    """The sub-grid of ``image`` that holds the crop box (its 8 corners mapped into the scan), and its slices in
    array (z, y, x) order: resampling only there keeps a whole-brain run small and fast."""
    size = np.asarray(crop.GetSize())
    corners = [to_scan.TransformPoint(crop.TransformIndexToPhysicalPoint([int(v) for v in c * (size - 1)]))
               for c in np.ndindex(2, 2, 2)]
    index = np.array([image.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    first = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
    last = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, np.asarray(image.GetSize()) - 1)
    if np.any(last < first):
        raise CDALError("a hippocampus box lies outside the scan (is the scan cut off?): place an ROI by hand "
                        "(--roi, or an ROI node in Slicer)")
    reference = sitk.Image([int(v) for v in last - first + 1], sitk.sitkUInt8)
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in first]))
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(first[::-1], last[::-1]))
    return reference, box


def _side_map(labels: np.ndarray, side: str) -> np.ndarray:
    return np.where(labels > 0, SIDE_CODES[side], 0).astype(np.uint8)


def _assemble(image, model, labels, uncertainty, attention, sides, localisation, notes,
              step_pooling: Optional[str] = None) -> ScanResult:
    def as_image(array):
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        return out

    rows = volume_table(labels, sides, uncertainty, model.class_names, float(np.prod(image.GetSpacing())))
    review = mark_for_review(rows, model.card, step_pooling)
    if not labels.any():  # an empty table would pass for a result: say that nothing was found, and what to check
        review.append(_nothing_found(model, image))
    report = {"structures": rows, "localisation": localisation, "notes": list(notes), "review": review}
    return ScanResult(as_image(labels), as_image(uncertainty), None if attention is None else as_image(attention),
                      as_image(sides), report, list(notes) + review)


def _nothing_found(model: LoadedModel, image: sitk.Image) -> str:
    """The note for a result without any labelled voxel."""
    voxel = "x".join(f"{v:.3g}" for v in image.GetSpacing())
    return (f"nothing was found: no voxel was labelled {' or '.join(model.class_names[1:])}; check that the scan "
            f"shows the structure and that its header's voxel size ({voxel} mm) is right")


def volume_table(labels: np.ndarray, sides: np.ndarray, uncertainty: np.ndarray, class_names: Sequence[str],
                 voxel_mm3: float) -> List[Dict]:
    """One row per (side, class) present: volume from the label map itself and mean uncertainty inside it."""
    rows = []
    for side, code in SIDE_CODES.items():
        in_side = sides == code
        if not in_side.any():
            continue
        for c in range(1, len(class_names)):
            mask = in_side & (labels == c)
            n = int(mask.sum())
            rows.append({"side": side, "name": class_names[c], "label": c, "voxels": n,
                         "volume_mm3": round(n * voxel_mm3, 1),
                         "mean_uncertainty": round(float(uncertainty[mask].mean()), 5) if n else None})
    return rows


def _check_sides(report: Dict, sides: Sequence[str]) -> None:
    """A located side with next to nothing segmented means the box missed: refuse instead of reporting it."""
    for side in sides:
        total = sum(r["volume_mm3"] for r in report["structures"] if r["side"] == side)
        if total < MIN_SIDE_MM3:
            raise CDALError(f"the {side} hippocampus was not found where the brain template puts it "
                            f"({total:.0f} mm³ segmented there): localisation probably failed; place an ROI around "
                            "each hippocampus by hand (--roi, or an ROI node in Slicer) and segment again")


def format_report(report: Dict) -> str:
    """The per-side volume table printed by ``cdal predict``."""
    lines = [f"{'side':8s} {'structure':12s} {'volume mm³':>11s} {'mean uncertainty':>17s}  check"]
    for r in report["structures"]:
        unc = "-" if r["mean_uncertainty"] is None else f"{r['mean_uncertainty']:.4f}"
        lines.append(f"{r['side']:8s} {r['name']:12s} {r['volume_mm3']:11.0f} {unc:>17s}  "
                     f"{'REVIEW' if r.get('review') else ''}".rstrip())
    return "\n".join(lines + [f"cdal: warning: {note}" for note in report.get("review", [])])


def _report(progress: Optional[ProgressFn], fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"
