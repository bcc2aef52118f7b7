"""Find the left and right hippocampus in a whole-brain or whole-head T1 MRI, in any orientation.

How: an affine registration (SimpleITK: moments initialiser, Mattes mutual information, three resolution
levels) of a 3 mm copy of the scan to the skull-stripped ICBM152 2009a template shipped in
``Resources/Templates``. The template-space box around each hippocampus (``RegionSpec``) is then carried into
the scan by the rigid part of that affine, so the crop the model sees is 1 mm, axis-aligned with the template's
head (the way MSD crops are) and at the scan's own scale: volumes measured in it are the subject's.

Coordinates: SimpleITK works in LPS; everything this module reports is RAS (as Slicer and the MNI space are).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CDALError

# Shipped next to the models (Resources/), where the extension build and the source tree both put it.
TEMPLATE = Path(__file__).resolve().parent.parent / "Resources" / "Templates" / "icbm152_brain_3mm.nii.gz"
REGISTRATION_MM = 3.0
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)

# A registration this poor, or this far from a plausible head, is not trusted (see docs/RESULTS.md,
# "Whole-brain localisation": real scans score -0.55 to -0.65, the template itself -1.06; a scan of
# something else or a failed optimisation scores above -0.3).
MAX_METRIC = -0.35
SCALE_RANGE = (0.7, 1.4)        # singular values of the affine (head size relative to the template)


@dataclass
class RegionSpec:
    """A box in template (MNI, RAS mm) space: where one structure lies, and the crop the model wants."""

    side: str
    centre_mni: Tuple[float, float, float]
    size_mm: Tuple[float, float, float]
    pitch_deg: float = 0.0   # the box turned about the left-right axis, nose up (+) or down (-)
    dip_deg: Optional[float] = None  # turn the box per scan so that the structure dips this much (None: never)


# MSD Task04's crops keep their scanners' axes, where the hippocampus' long axis dips -23.6 +- 7.0 degrees below
# the axial plane (195 labels); in template-aligned boxes of real heads it dips -34.4 +- 3.4 (16 sides), and
# fold-0 crops shown 14 degrees steeper lose 2.4 Dice. So the box starts 11 degrees nose-down, and a quick look
# (scan._turned_to_dip) turns it the rest of the way for each scan (docs/RESULTS.md, "Session 16").
HIPPOCAMPUS_PITCH_DEG = -11.0
MSD_DIP_DEG = -23.6             # that dip in MSD's crops: where a box is turned to (``Region.turned_to_dip``)
MAX_PITCH_DEG = 25.0            # a box never turns further than this from template-aligned


def hippocampus_regions(size_mm: Sequence[float] = (40.0, 56.0, 40.0),
                        pitch_deg: float = HIPPOCAMPUS_PITCH_DEG) -> List[RegionSpec]:
    """Both hippocampi in ICBM152 2009a (centres checked on the template itself, docs/RESULTS.md). The box is
    a little larger than MSD Task04's crops (about 35 x 50 x 35 mm) to absorb registration error."""
    size = tuple(float(s) for s in size_mm)
    return [RegionSpec("left", (-26.0, -23.0, -13.0), size, pitch_deg, MSD_DIP_DEG),
            RegionSpec("right", (26.0, -23.0, -13.0), size, pitch_deg, MSD_DIP_DEG)]


@dataclass
class Region:
    """One located box: ``to_scan`` maps crop (template-aligned) LPS points to the scan's LPS points."""

    side: str
    to_scan: sitk.Transform
    centre_lps: np.ndarray          # the box centre in crop space (= template space)
    size_mm: Tuple[float, float, float]
    pitch_deg: float = 0.0          # the box's axes turned about template left-right (RegionSpec.pitch_deg)
    dip_deg: Optional[float] = None  # RegionSpec.dip_deg

    def turned_to_dip(self, found_dip: float) -> "Region":
        """This box turned so that a structure found dipping ``found_dip`` degrees in it dips ``dip_deg``."""
        if self.dip_deg is None:
            return self
        pitch = float(np.clip(self.pitch_deg + found_dip - self.dip_deg, -MAX_PITCH_DEG, MAX_PITCH_DEG))
        return dataclasses.replace(self, pitch_deg=round(pitch, 1))

    @property
    def centre_ras(self) -> List[float]:
        return (_LPS @ np.asarray(self.to_scan.TransformPoint(self.centre_lps.tolist()))).round(2).tolist()

    def crop_reference(self, spacing: float = 1.0) -> sitk.Image:
        """The crop's grid: ``spacing`` mm, RAS-oriented in template space (turned by ``pitch_deg`` about the
        left-right axis), centred on the box."""
        size = [int(round(s / spacing)) for s in self.size_mm]
        ref = sitk.Image(size, sitk.sitkUInt8)
        ref.SetSpacing([spacing] * 3)
        axes = _LPS @ _pitch(self.pitch_deg)  # the box's R, A, S axes, written in LPS
        ref.SetDirection(axes.flatten().tolist())
        half = (np.asarray(size) - 1) / 2.0 * spacing
        ref.SetOrigin((self.centre_lps - axes @ half).tolist())
        return ref

    def crop(self, image: sitk.Image, spacing: float = 1.0, fill: float = 0.0) -> sitk.Image:
        """The scan resampled (linear) into this box: the image the model segments."""
        return sitk.Resample(image, self.crop_reference(spacing), self.to_scan, sitk.sitkLinear, fill,
                             sitk.sitkFloat32)


@dataclass
class Localisation:
    regions: List[Region]
    metric: float
    scales: List[float]
    seconds: float
    status: str = "ok"                      # "ok" or "doubtful"
    reasons: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return {"method": "affine registration to ICBM152 2009a (3 mm, Mattes MI)", "status": self.status,
                "reasons": list(self.reasons), "metric": round(self.metric, 4),
                "scales": [round(s, 3) for s in self.scales], "seconds": round(self.seconds, 2),
                "box_pitch_deg": {r.side: r.pitch_deg for r in self.regions},
                "centres_ras": {r.side: r.centre_ras for r in self.regions}}


def needs_localisation(image, crop_mm: Sequence[float] = (45.0, 60.0, 50.0)) -> bool:
    """True when the scan is much larger than one hippocampus crop (two of its extents exceed twice the
    largest MSD crop's), i.e. a brain or a head rather than a crop. ``image``: an sitk.Image, or an
    ImageFileReader after ``ReadImageInformation`` (the header alone answers)."""
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    return int(np.sum(extent > 2 * max(crop_mm))) >= 2


def locate(image: sitk.Image, specs: Optional[List[RegionSpec]] = None) -> Localisation:
    """Register ``image`` (3D, scalar) to the template and place each region in it."""
    start = time.perf_counter()
    specs = specs or hippocampus_regions()
    fixed = _template()
    moving = _normalise(_downsample(image, REGISTRATION_MM))
    affine, metric = _register(fixed, moving)
    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    singular = np.linalg.svd(matrix, compute_uv=False)
    loc = Localisation([], float(metric), sorted(singular.tolist()), 0.0)
    if np.linalg.det(matrix) <= 0:
        raise CDALError("localisation failed: the scan matched the template only as a mirror image (is the "
                        "file's left/right orientation wrong?): check the header, or place an ROI by hand "
                        "(--roi, or an ROI node in Slicer)")
    if metric > MAX_METRIC:
        loc.reasons.append(f"weak image match (mutual information {metric:.2f}, real brains give about -0.6)")
    if singular.min() < SCALE_RANGE[0] or singular.max() > SCALE_RANGE[1]:
        loc.reasons.append("implausible head size (scaled {:.2f}-{:.2f}x against the template)".format(
            singular.min(), singular.max()))
    rotation = _nearest_rotation(matrix)
    for spec in specs:
        centre = _LPS @ np.asarray(spec.centre_mni, float)
        # rigid map: crop point q -> A c + t + R (q - c), with the full affine only choosing the centre
        rigid = sitk.AffineTransform(3)
        rigid.SetMatrix(rotation.flatten().tolist())
        rigid.SetCenter(centre.tolist())
        rigid.SetTranslation((np.asarray(affine.TransformPoint(centre.tolist())) - centre).tolist())
        loc.regions.append(Region(spec.side, rigid, centre, spec.size_mm, spec.pitch_deg, spec.dip_deg))
    loc.status = "doubtful" if loc.reasons else "ok"
    loc.seconds = time.perf_counter() - start
    return loc


def dip_degrees(mask: np.ndarray, min_voxels: int = 200) -> Optional[float]:
    """How far the long axis of ``mask`` ((S, A, R) array of a box on an isotropic grid) dips below the axial
    plane, in degrees (negative: its anterior end is lower); None when there is too little to tell."""
    points = np.argwhere(mask).astype(float)
    if len(points) < min_voxels:
        return None
    _, _, vt = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)
    superior, anterior = vt[0][0], vt[0][1]
    return float(np.degrees(np.arctan2(superior * np.sign(anterior or 1.0), abs(anterior))))


def _pitch(degrees: float) -> np.ndarray:
    """Rotation about the RAS x (left-right) axis by ``degrees``: positive turns anterior towards superior."""
    a = np.deg2rad(degrees)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])


def _template() -> sitk.Image:
    if not TEMPLATE.exists():
        raise CDALError(f"{TEMPLATE}: the localisation template is missing from this install: reinstall (it ships in Resources/Templates)")
    return sitk.ReadImage(str(TEMPLATE), sitk.sitkFloat32)


def _downsample(image: sitk.Image, mm: float) -> sitk.Image:
    """Block-average to about ``mm`` per voxel (cheap, and it smooths as it shrinks)."""
    factors = [max(1, int(round(mm / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)


def _normalise(image: sitk.Image) -> sitk.Image:
    """[0, 1] from the 1st-99th percentile of the non-background voxels (skull-stripped scans are mostly 0)."""
    array = sitk.GetArrayViewFromImage(image)
    body = array[array > np.percentile(array, 20)] if array.size else array
    lo, hi = np.percentile(body if body.size else array, [1, 99])
    return sitk.Clamp((image - float(lo)) / max(float(hi - lo), 1e-6), sitk.sitkFloat32, 0.0, 1.0)


# Head poses tried before the affine refinement (degrees about the L-R, then the A-P and S-I axes): a head
# tilted forward by 30 degrees sits outside what a moments start followed by gradient descent recovers.
# Searched in two stages (pitch first, the commonest tilt; then roll x yaw around it): 13 metric evaluations.
PITCHES = (-40, -20, 0, 20, 40)
ROLLS_YAWS = [(r, y) for r in (-20, 0, 20) for y in (-20, 0, 20)]
SEARCH_MM = 6.0


def _register(fixed: sitk.Image, moving: sitk.Image) -> Tuple[sitk.AffineTransform, float]:
    """Affine ``fixed`` (template) -> ``moving`` (scan) point map, and the final Mattes MI (lower = better).

    A coarse pose search (at ``SEARCH_MM``, the metric evaluated only) picks the starting rotation,
    then a three-level affine registration refines it."""
    start = _best_pose(fixed, moving)
    initial = sitk.AffineTransform(3)
    initial.SetCenter(start.GetCenter())
    initial.SetMatrix(start.GetMatrix())
    initial.SetTranslation(start.GetTranslation())
    reg = _method(0.1)  # 31k samples at 3 mm: 0.5 mm from 0.25, in two thirds of the time
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 100, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0.5])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=True)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:  # e.g. too few samples overlap: nothing brain-like where the template is
        raise CDALError("localisation failed: the scan could not be matched to a brain template ({}): check that "
                        "it is a T1 MRI of the head, or place an ROI by hand (--roi, or an ROI node in Slicer)"
                        .format(str(exc).strip().splitlines()[-1][:120]))
    return sitk.AffineTransform(initial), float(reg.GetMetricValue())


def _method(sampling: float) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed=1)  # fixed seed: the same scan always gives the same boxes
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _best_pose(fixed: sitk.Image, moving: sitk.Image) -> sitk.Euler3DTransform:
    """The rigid start (centres of mass matched, a rotation from ``PITCHES`` x ``ROLLS_YAWS``) with the best
    metric on ``SEARCH_MM`` copies."""
    factor = max(1, int(round(SEARCH_MM / REGISTRATION_MM)))
    small_fixed, small_moving = sitk.BinShrink(fixed, [factor] * 3), sitk.BinShrink(moving, [factor] * 3)
    centred = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    reg = _method(0.5)

    def score(pose):
        candidate = sitk.Euler3DTransform(centred)
        candidate.SetRotation(*np.deg2rad(pose))
        reg.SetInitialTransform(candidate)
        try:  # the upright pose wins ties
            return reg.MetricEvaluate(small_fixed, small_moving) + (0.0 if pose == (0, 0, 0) else 1e-3), candidate
        except RuntimeError:  # this pose leaves too little overlap
            return np.inf, candidate

    pitch = min(PITCHES, key=lambda p: score((p, 0, 0))[0])
    poses = [(pitch, r, y) for r, y in ROLLS_YAWS]
    return min((score(pose) for pose in poses), key=lambda scored: scored[0])[1]


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation closest to ``matrix`` (polar decomposition): the affine's pose without its scaling."""
    u, _, vt = np.linalg.svd(matrix)
    return u @ vt


def region_specs(card: Dict) -> Optional[List[RegionSpec]]:
    """Template regions the model's card names (``"localisation": {"regions": [...]}``); hippocampus models
    without that field (older cards, fine-tuned copies) get the hippocampus boxes; other models none."""
    spec = card.get("localisation")
    if spec:
        return [RegionSpec(r["side"], tuple(r["centre_mni"]), tuple(r["size_mm"]), float(r.get("pitch_deg", 0.0)),
                           r.get("dip_deg")) for r in spec["regions"]]
    names = [c["name"].lower() for c in card.get("classes", [])]
    return hippocampus_regions() if names[1:] == ["anterior", "posterior"] else None


def expects_thin_slices(card: Dict) -> bool:
    """The models that localise template boxes (the hippocampus models) learnt from ~1 mm 3D T1 scans; a user's
    own model learnt from whatever slices its data had, so no thickness is refused for it."""
    return region_specs(card) is not None


# -- training data from whole scans -------------------------------------------------------------------------
@dataclass
class TrainingCrop:
    side: Optional[str]   # "left" / "right": a located box; None: the scan as it was given
    image: sitk.Image     # Float32 on the box's 1 mm grid (linear), or the scan itself
    labels: sitk.Image    # UInt8 on the same grid (nearest neighbour)


# a box must keep this share of the labelled volume; less, and the labels are said to lie outside the boxes
MIN_LABELS_IN_BOXES = 0.9


def training_crops(image: sitk.Image, labels: sitk.Image, card: Dict,
                   name: str = "scan") -> Tuple[List[TrainingCrop], List[str]]:
    """What to train a volume model on from one labelled scan, so that training sees what inference segments.

    A crop-sized scan (MSD-like) is used whole. A brain or head (``needs_localisation``), for a model with template
    regions, is cut into the boxes inference cuts: located by registration, each turned to the labels' own dip
    (``scan._turned_to_dip`` turns it to the predicted structure's), the image resampled linearly and the labels
    by nearest neighbour. Without this the trainer would centre-crop the whole head and see no hippocampus at all.
    Returns the crops and warnings (a side without labels is skipped; labels outside every box are named)."""
    specs = region_specs(card)
    if not specs or not needs_localisation(image):
        return [TrainingCrop(None, image, labels)], []
    loc = locate(image, specs)
    if loc.status != "ok":
        raise CDALError("{}: could not locate the hippocampi reliably ({}) to cut training crops: crop the scan "
                        "around each hippocampus first (Crop Volume in Slicer), then fine-tune on the crops"
                        .format(name, "; ".join(loc.reasons)))
    fill = float(np.percentile(sitk.GetArrayViewFromImage(image)[::3, ::3, ::3], 0.5))
    crops, warnings, kept_mm3 = [], [], 0.0
    for region in loc.regions:
        box_labels = _labels_in_box(labels, region)
        found = dip_degrees(sitk.GetArrayViewFromImage(box_labels) > 0)
        if found is not None:
            region = region.turned_to_dip(found)
            box_labels = _labels_in_box(labels, region)
        voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(box_labels)))
        if voxels == 0:
            warnings.append(f"{name}: no labels in the {region.side} hippocampus box; that side is not trained on")
            continue
        kept_mm3 += voxels * float(np.prod(box_labels.GetSpacing()))
        crops.append(TrainingCrop(region.side, region.crop(image, fill=fill), box_labels))
    total_mm3 = np.count_nonzero(sitk.GetArrayViewFromImage(labels)) * float(np.prod(labels.GetSpacing()))
    if total_mm3 > 0 and kept_mm3 < MIN_LABELS_IN_BOXES * total_mm3:
        warnings.append(f"{name}: {100 * (1 - kept_mm3 / total_mm3):.0f} % of the labelled volume lies outside the "
                        "boxes the model segments and is not trained on: check that the labels are the hippocampi")
    return crops, warnings


def _labels_in_box(labels: sitk.Image, region: Region) -> sitk.Image:
    return sitk.Resample(labels, region.crop_reference(), region.to_scan, sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)
