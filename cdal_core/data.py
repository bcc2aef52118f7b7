"""Reading, checking and normalising images; MSD-style and 2D PNG datasets; 2D slice banks for training.

Array conventions: volumes are numpy ``(Z, Y, X)`` (SimpleITK order) on the model grid; 2D training samples are
``image (in_channels, H, W)`` float32 in [0, 1] and ``label (H, W)`` int64.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CDALError
from .geometry import GridMapping, ModelGrid

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def stem_of(path: Path) -> str:
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES + PNG_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_image(path: os.PathLike) -> sitk.Image:
    """Read a medical image (NIfTI, NRRD, MHA, PNG...) or raise CDALError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise CDALError(f"{path}: file not found: check the path")
    if path.is_dir():
        raise CDALError(f"{path}: is a folder, expected an image file (.nii.gz, .nrrd, .mha)")
    if path.name.lower().endswith(".gz"):
        from .inputs import verify_gzip  # ITK reads a cut .gz stream as zeros: a cut download would train as data
        verify_gzip(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        from .inputs import unreadable  # inputs imports this module
        raise unreadable(path, str(exc)) from None


def check_volume(image: sitk.Image, image_channels: int = 1, name: str = "input") -> None:
    """Reject what the model cannot segment, with a message that says what to do instead."""
    dim = image.GetDimension()
    if dim == 2 or (dim == 3 and min(image.GetSize()) == 1):
        raise CDALError(f"{name}: is a 2D image (size {image.GetSize()}), expected a 3D volume: "
                        "give the whole series as one 3D file")
    if dim != 3:
        raise CDALError(f"{name}: has {dim} dimensions, expected a 3D volume: split 4D series into 3D volumes first")
    channels = image.GetNumberOfComponentsPerPixel()
    if channels != image_channels:
        if channels in (3, 4) and image_channels == 1:
            raise CDALError(f"{name}: is an RGB/colour volume but the model expects greyscale MRI: "
                            "convert it to a scalar (greyscale) volume first")
        raise CDALError(f"{name}: has {channels} channels per voxel, the model expects {image_channels}")
    check_intensities(sitk.GetArrayViewFromImage(image), name)


#: how check_intensities words its refusals: (before what, nothing to what)
INTENSITY_PURPOSES = {"segment": ("before segmenting", "nothing to segment"),
                      "train": ("before training on it", "nothing to learn from")}


def check_intensities(array: np.ndarray, name: str = "input", purpose: str = "segment") -> None:
    """Refuse an empty, non-finite or constant image (``purpose``: a key of ``INTENSITY_PURPOSES``)."""
    before, nothing = INTENSITY_PURPOSES[purpose]
    if array.size == 0:
        raise CDALError(f"{name}: is empty (no voxels): check that the file holds image data")
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise CDALError(f"{name}: has {bad} NaN/inf voxels: fix or mask them (e.g. replace with 0) {before}")
    if float(np.max(array)) == float(np.min(array)):
        raise CDALError(f"{name}: is constant (every voxel = {float(np.min(array)):g}), {nothing}: "
                        "check that the right image was loaded")


LANDMARK_PERCENTILES = np.linspace(5, 95, 19)


@dataclass
class NormalisationParams:
    """What one scan's own voxels say about its intensities (fitted before any resampling)."""

    lo: float
    hi: float
    landmarks: Optional[np.ndarray] = None   # the scan's percentiles after scaling to [0, 1]


@dataclass
class Normalisation:
    """Robust per-volume scaling to [0, 1]: clip to the [lower, upper] percentiles, then, when the model card
    holds ``landmarks`` (mean intensity percentiles of its training scans), a piecewise-linear histogram
    standardisation (Nyul-Udupa) onto them, so that a scan with different contrast (e.g. a smooth template)
    looks like the training data."""

    lower: float = 0.5
    upper: float = 99.5
    landmarks: Optional[List[float]] = None

    def fit(self, array: np.ndarray) -> NormalisationParams:
        lo, hi = np.percentile(array, [self.lower, self.upper])
        if hi <= lo:  # mostly constant with rare outliers: fall back to the full range
            lo, hi = float(array.min()), float(array.max())
        params = NormalisationParams(float(lo), float(hi))
        if self.landmarks is not None:
            params.landmarks = np.percentile(self.scale(array, params), LANDMARK_PERCENTILES)
        return params

    @staticmethod
    def scale(array: np.ndarray, params: NormalisationParams) -> np.ndarray:
        lo, hi = params.lo, params.hi
        return np.clip((np.asarray(array, np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)

    def apply(self, array: np.ndarray, params: NormalisationParams) -> np.ndarray:
        return self.standardise(self.scale(array, params), params.landmarks)

    def standardise(self, scaled: np.ndarray, scan_landmarks: Optional[np.ndarray]) -> np.ndarray:
        """Map an array already scaled to [0, 1] onto the model's landmarks (identity without landmarks)."""
        if self.landmarks is None or scan_landmarks is None:
            return scaled
        src = np.maximum.accumulate(np.r_[0.0, scan_landmarks, 1.0])
        src = src + np.arange(len(src)) * 1e-6  # strictly increasing for interpolation
        return np.interp(scaled, src, np.r_[0.0, self.landmarks, 1.0]).astype(np.float32)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return self.apply(array, self.fit(array))

    @staticmethod
    def learn_landmarks(arrays_01: Sequence[np.ndarray]) -> List[float]:
        """Mean percentiles of training scans already scaled to [0, 1]."""
        return [round(float(v), 5) for v in np.mean([np.percentile(a, LANDMARK_PERCENTILES) for a in arrays_01], 0)]

    def to_dict(self) -> Dict:
        d = {"method": "percentile" if self.landmarks is None else "percentile+histogram-standardisation",
             "lower": self.lower, "upper": self.upper}
        if self.landmarks is not None:
            d["landmark_percentiles"] = LANDMARK_PERCENTILES.tolist()
            d["landmarks"] = list(self.landmarks)
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "Normalisation":
        return cls(lower=float(d.get("lower", 0.5)), upper=float(d.get("upper", 99.5)), landmarks=d.get("landmarks"))


@dataclass(frozen=True)
class DeclaredClasses:
    """The class names a dataset.json gives label values 0..C-1, and which file says so."""

    source: Path
    names: Tuple[str, ...]

    def check(self, model_names: Sequence[str]) -> None:
        """Refuse labels that mean other classes than the model's (background/Background alike)."""
        if [n.strip().lower() for n in self.names] != [n.strip().lower() for n in model_names]:
            raise CDALError(f"{self.source}: its labels name the classes {list(self.names)} but the model's are "
                            f"{list(model_names)}: fix \"labels\" (and the label maps) to the model's classes, "
                            "or use a model trained on these classes")


@dataclass
class Case:
    """One labelled example from a dataset: paths plus its identifier (and its dataset.json's class names)."""

    name: str
    image: Path
    label: Optional[Path]
    classes: Optional[DeclaredClasses] = None


def read_msd_cases(data_dir: os.PathLike, require_labels: bool = True) -> Tuple[List[Case], Dict[int, str]]:
    """Parse an MSD folder (dataset.json + imagesTr/labelsTr) and check that it tells the truth.

    Returns the cases in dataset.json order and the label names ``{index: name}``.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise CDALError(f"{root}: data folder not found: give a folder with dataset.json, imagesTr/ and labelsTr/")
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        return _cases_without_json(root, require_labels)
    try:
        meta = json.loads(meta_path.read_text())
        labels = _label_names(meta["labels"])
        entries = meta.get("training") or []
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CDALError(f"{meta_path}: is not a valid MSD dataset.json ({exc}): it needs 'labels' and 'training'")
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise CDALError(f"{meta_path}: labels must be 0..C-1 with 0 = background, got {sorted(labels)}")
    declared = meta.get("numTraining")
    if declared is not None and int(declared) != len(entries):
        raise CDALError(f"{meta_path}: says numTraining={declared} but lists {len(entries)} cases: fix dataset.json")
    classes = DeclaredClasses(meta_path, tuple(labels[i] for i in sorted(labels)))
    cases, missing = [], []
    for entry in entries:
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        for p in (image, label):
            if p is not None and not p.exists():
                missing.append(str(p.relative_to(root.resolve())) if p.is_relative_to(root.resolve()) else str(p))
        cases.append(Case(stem_of(image), image, label, classes))
    if missing:
        raise CDALError(f"{meta_path}: lists {len(missing)} files that do not exist (first: {missing[0]}): "
                        "fix dataset.json or restore the files")
    if not cases:
        raise CDALError(f"{meta_path}: lists no training cases")
    if require_labels and any(c.label is None for c in cases):
        raise CDALError(f"{meta_path}: some training cases have no label")
    return cases, labels


def _label_names(raw: Dict) -> Dict[int, str]:
    """MSD's {"1": "Anterior"} or nnU-Net v2's {"Anterior": 1} -> {1: "Anterior"}."""
    if all(str(k).strip().isdigit() for k in raw):
        return {int(k): str(v) for k, v in raw.items()}
    return {int(v): str(k) for k, v in raw.items()}  # a value that is not an int: ValueError/TypeError


def _cases_without_json(root: Path, require_labels: bool) -> Tuple[List[Case], Dict[int, str]]:
    images = sorted(p for p in (root / "imagesTr").glob("*") if p.name.endswith(VOLUME_SUFFIXES))
    if not images:
        raise CDALError(f"{root}: no dataset.json and no imagesTr/*.nii.gz: give an MSD-style dataset folder "
                        f"(or, for 2D images, a folder with images/ and masks/){dataset_subfolder_hint(root)}")
    cases = []
    for img in images:
        stem = stem_of(img).removesuffix("_0000")
        lab = next((p for p in (root / "labelsTr").glob(stem + ".*")), None)
        if require_labels and lab is None:
            raise CDALError(f"{img}: has no label in labelsTr/: add it or remove the image")
        cases.append(Case(stem, img, lab))
    return cases, {}


def dataset_subfolder_hint(root: Path) -> str:
    """'; did you mean X?' when a dataset sits one folder down (``MoNuSeg/`` given for ``MoNuSeg/train/``)."""
    try:
        found = sorted(sub for sub in root.iterdir() if sub.is_dir() and (
            (sub / "dataset.json").is_file() or (sub / "imagesTr").is_dir() or (sub / "images").is_dir()))
    except OSError:  # an unreadable folder: the message stands without the hint
        return ""
    return f"; did you mean {found[0]}?" if found else ""


def read_case_list(path: os.PathLike) -> List[str]:
    """Case names from a text file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CDALError(f"{path}: case list {'is a folder' if path.is_dir() else 'not found'}: "
                        "give a text file with one case name per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CDALError(f"{path}: case list cannot be read as text ({exc}): give a text file with one case name "
                        "per line")
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def select_cases(cases: Sequence[Case], names: Sequence[str], source: str, data_dir: str) -> List[Case]:
    """The cases named by ``names`` (read from ``source``), in that order; a name not in ``data_dir`` is an error."""
    if not names:
        raise CDALError(f"{source}: lists no cases: put one case name per line (file stems from {data_dir}), "
                        "or leave the list out to use every case")
    by_name = {c.name: c for c in cases}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise CDALError(f"{source}: names cases not in {data_dir} (first: {missing[0]})")
    return [by_name[n] for n in names]


def split_cases(cases: Sequence[Case], val_fraction: float, seed: int,
                val_names: Optional[Sequence[str]] = None,
                val_source: str = "the validation list") -> Tuple[List[Case], List[Case]]:
    """Fixed train/validation split: an explicit name list, or a seeded random fraction. ``val_source`` says
    where the list came from, for the message when it names cases the data lack."""
    if val_names:
        wanted = set(val_names)
        val = [c for c in cases if c.name in wanted]
        if len(val) != len(wanted):
            missing = sorted(wanted - {c.name for c in val})
            raise CDALError(f"{val_source} names {len(missing)} case(s) not in the data (first: {missing[0]}): "
                            "list your own validation cases there, or remove val_cases from the config (then "
                            "val_fraction picks them)")
        return [c for c in cases if c.name not in wanted], val
    n_val = int(round(len(cases) * val_fraction)) if len(cases) > 1 else 0
    order = np.random.default_rng(seed).permutation(len(cases))
    val_idx = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val_idx], [c for i, c in enumerate(cases) if i in val_idx]


@dataclass
class Volume:
    """A case on the model grid: normalised image (Z, Y, X) or (Z, Y, X, ch) in [0, 1], labels (Z, Y, X)."""

    name: str
    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: Tuple[float, float, float]


def load_volume(case: Case, grid: ModelGrid, norm: Normalisation, num_classes: int,
                image_channels: int = 1) -> Volume:
    """Read, check, move into the model grid and normalise one case (labels by nearest neighbour)."""
    image = read_image(case.image)
    check_volume(image, image_channels, name=str(case.image))
    refuse_hidden_nonfinite(case.image)
    params = norm.fit(sitk.GetArrayViewFromImage(image))
    mapping = GridMapping(image, grid, fill=params.lo)
    array = norm.apply(mapping.model_array(), params)
    label = None
    if case.label is not None:
        lab_img = sitk.GetImageFromArray(read_label_map(case.label, image, num_classes).astype(np.uint8))
        lab_img.CopyInformation(image)
        lab_map = GridMapping(lab_img, grid)
        if mapping.resampled:
            lab_model = sitk.Resample(lab_img, mapping.model_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            label = sitk.GetArrayFromImage(lab_model).astype(np.int64)
        else:
            label = sitk.GetArrayFromImage(lab_map.model_image).astype(np.int64)
    return Volume(case.name, array, label, tuple(mapping.model_image.GetSpacing()))


def refuse_hidden_nonfinite(path: os.PathLike) -> None:
    """A float NIfTI's NaN/inf voxels, which SimpleITK reads as 0 without a word (``cdal predict`` reads NIfTI with
    nibabel and warns): training on them would learn zeros that are not in the scan."""
    name = Path(path).name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib
    try:
        img = nib.load(str(path))
        if img.get_data_dtype().kind != "f":
            return
        data = np.asanyarray(img.dataobj)
    except Exception:  # nibabel is stricter than ITK about some headers; ITK has read this file already
        return
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise CDALError(f"{path}: has {bad} NaN/inf voxels (read as 0 by ITK): replace them (e.g. with the "
                        "background value) or mask them before training on it")


def read_label_map(path: os.PathLike, image: sitk.Image, num_classes: int) -> np.ndarray:
    """The label map of ``image`` as an int64 array (Z, Y, X), or CDALError naming what is wrong with it."""
    lab_img = read_image(path)
    _check_label_layout(lab_img, image, path)
    _check_label_geometry(lab_img, image, path)
    lab = sitk.GetArrayFromImage(lab_img)
    if np.issubdtype(lab.dtype, np.floating) and not np.all(np.isfinite(lab) & (lab == np.round(lab))):
        odd = np.unique(lab[~(np.isfinite(lab) & (lab == np.round(lab)))])
        raise CDALError(f"{path}: label values must be integers 0..{num_classes - 1}, found {_few(odd)}: save the "
                        "label map with integer values (resample labels with nearest neighbour, not linear)")
    values = np.unique(lab)
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        raise CDALError(f"{path}: has label values {_few(outside)} outside the model's classes 0..{num_classes - 1}: "
                        f"remap the labels to 0..{num_classes - 1} (or use a model with more classes)")
    return lab.astype(np.int64)


def _check_label_layout(lab_img: sitk.Image, image: sitk.Image, path) -> None:
    """One integer component per voxel, on as many voxels as the image has."""
    rule = "a label map must be one integer component per voxel on its image's grid"
    if lab_img.GetNumberOfComponentsPerPixel() > 1:
        raise CDALError(f"{path}: is a colour/vector label map ({lab_img.GetNumberOfComponentsPerPixel()} "
                        f"components per voxel): {rule}: save it as a scalar label image (e.g. uint8)")
    if lab_img.GetDimension() > image.GetDimension():
        raise CDALError(f"{path}: is a {lab_img.GetDimension()}D label map (size {lab_img.GetSize()}): {rule}: "
                        f"save one {image.GetDimension()}D label volume")
    if lab_img.GetSize() != image.GetSize():
        raise CDALError(f"{path}: label size {lab_img.GetSize()} differs from its image's {image.GetSize()}: "
                        "the pair does not match: give the label map made for this image")


def _check_label_geometry(lab_img: sitk.Image, image: sitk.Image, path) -> None:
    """Same voxels in space: a shifted or rescaled label map would score the wrong voxels without a word."""
    spacing_ok = np.allclose(lab_img.GetSpacing(), image.GetSpacing(), rtol=1e-3, atol=0)
    origin_ok = np.allclose(lab_img.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-2)
    direction_ok = np.allclose(lab_img.GetDirection(), image.GetDirection(), rtol=0, atol=1e-3)
    if not (spacing_ok and origin_ok and direction_ok):
        turned = "" if direction_ok else ", and its axes point another way"
        raise CDALError(f"{path}: label geometry ({_geometry(lab_img)}) differs from its image's "
                        f"({_geometry(image)}){turned}: resample the label map onto the image (nearest neighbour) "
                        "or fix its header")


def _geometry(image: sitk.Image) -> str:
    fmt = lambda values: ", ".join(f"{v:.4g}" for v in values)  # noqa: E731
    return f"origin ({fmt(image.GetOrigin())}) mm, spacing ({fmt(image.GetSpacing())}) mm"


def _few(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:6].tolist())
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"


def slice_stack(volume: np.ndarray, axis: int, context: int) -> np.ndarray:
    """(Z, Y, X) -> (S, 2*context+1, H, W): every slice along ``axis`` with its neighbours (edges repeated)."""
    moved = np.moveaxis(volume, axis, 0)
    n = moved.shape[0]
    idx = np.clip(np.arange(n)[:, None] + np.arange(-context, context + 1)[None], 0, n - 1)
    return moved[idx]


def unslice(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of taking slices: (S, ..., H, W) with the slice axis first -> volume with it at ``axis``."""
    return np.moveaxis(stack, 0, axis) if stack.ndim == 3 else np.moveaxis(stack, 0, axis + 1)


def pad_to(array: np.ndarray, size: Sequence[int], value: float = 0.0) -> Tuple[np.ndarray, Tuple[slice, slice]]:
    """Centre-pad the last two axes of ``array`` to at least ``size``; return the crop that undoes it."""
    h, w = array.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    pads = [(0, 0)] * (array.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
    out = np.pad(array, pads, mode="constant", constant_values=value)
    return out, (slice(ph // 2, ph // 2 + h), slice(pw // 2, pw // 2 + w))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class SliceBank:
    """All 2D training slices of a set of volumes, padded to one size, held in memory.

    ``images``: (N, in_channels, H, W) float32 in [0, 1]; ``labels``: (N, H, W) uint8.
    """

    def __init__(self, volumes: Sequence[Volume], axis: int, context: int, size: Sequence[int]):
        imgs, labs = [], []
        labelled = kept = 0  # labelled voxels before and after fitting the slices to ``size``
        for vol in volumes:
            stack = slice_stack(vol.image, axis, context)           # (S, 2c+1, H, W[, ch])
            if stack.ndim == 5:                                     # colour: channels next to context
                stack = np.moveaxis(stack, -1, 2).reshape(stack.shape[0], -1, *stack.shape[2:4])
            lab = np.moveaxis(vol.label, axis, 0)
            labelled += int(np.count_nonzero(lab))
            stack, _ = _fit(stack, size)
            lab, _ = _fit(lab, size)
            kept += int(np.count_nonzero(lab))
            imgs.append(stack.astype(np.float32))
            labs.append(lab.astype(np.uint8))
        self.images = np.concatenate(imgs)
        self.labels = np.concatenate(labs)
        # the share of the labels the centre crop to ``size`` keeps: slices larger than it lose their edges
        self.labels_kept = kept / labelled if labelled else 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def foreground_fraction(self) -> float:
        return float(np.mean(self.labels.reshape(len(self), -1).max(axis=1) > 0))


def _fit(array: np.ndarray, size: Sequence[int]) -> Tuple[np.ndarray, None]:
    """Centre-pad then centre-crop the last two axes to exactly ``size``."""
    array, _ = pad_to(array, size)
    h, w = array.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return array[..., top:top + size[0], left:left + size[1]], None


# --- 2D datasets (histology, chest X-ray): images/<name>.png + masks/<name>.png -----------------------------

def read_png_pairs(data_dir: os.PathLike) -> List[Case]:
    root = Path(data_dir)
    images = sorted(p for p in (root / "images").glob("*")  # not macOS "._x.png" resource-fork files
                    if p.suffix.lower() in PNG_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise CDALError(f"{root}: no images/*.png found: a 2D dataset needs images/ and masks/ with matching names")
    cases = []
    for img in images:
        mask = root / "masks" / img.name
        if not mask.exists():
            raise CDALError(f"{img}: has no mask masks/{img.name}: add it or remove the image")
        cases.append(Case(stem_of(img), img, mask))
    return cases


def load_png_case(case: Case, size: Sequence[int], image_channels: int) -> Volume:
    """A 2D pair as a one-slice volume: image (1, H, W[, ch]) in [0, 1], label (1, H, W) with mask>0 -> 1."""
    # the channel rules of `cdal predict`, so that a model trains on what it will be given: grey stored as RGB is
    # grey, alpha is ignored, and grey images cannot train an RGB model (predict would refuse them)
    from .predict2d import image_array_2d, read_mask_2d  # (predict2d imports this module)
    arr = image_array_2d(read_image(case.image), image_channels, str(case.image))   # (ch, H, W)
    arr = arr[0] if image_channels == 1 else np.moveaxis(arr, 0, -1)                # (H, W[, ch])
    mask = read_mask_2d(case.label, arr.shape[:2], num_classes=2)
    arr, mask = _resize2d(arr, size, linear=True), _resize2d(mask.astype(np.float32), size, linear=False)
    check_intensities(arr, str(case.image))
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
    return Volume(case.name, arr[None], (mask > 0).astype(np.int64)[None], (1.0, 1.0, 1.0))


def _resize2d(array: np.ndarray, size: Sequence[int], linear: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    t = torch.from_numpy(np.ascontiguousarray(array))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=tuple(size), mode="area" if linear else "nearest")
    t = t[0].permute(1, 2, 0) if array.ndim == 3 else t[0, 0]
    return t.numpy()
