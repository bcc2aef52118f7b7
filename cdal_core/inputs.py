"""Scans as clinics and researchers keep them: files (NIfTI, NRRD, MHA) and DICOM series folders, read with
nothing silent.

- A truncated or corrupt compressed file is an error (SimpleITK alone reads a cut .nii.gz as zeros).
- NaN/inf voxels (SimpleITK's NIfTI reader turns NaN into 0 without a word) become background with a warning
  that says how many; a scan that is mostly NaN is refused.
- A singular or non-orthonormal orientation is refused; a NIfTI without any orientation (qform and sform codes
  0) is read with a warning that left and right cannot be trusted.
- Slices thicker than ``MAX_SLICE_MM`` are refused unless the caller allows them (then a warning names them).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .data import PNG_SUFFIXES, VOLUME_SUFFIXES, dataset_subfolder_hint, stem_of
from .errors import CDALError

MAX_SLICE_MM = 2.0           # the model was trained at 1 mm; beyond ~2 mm a hippocampus spans too few slices
MAX_NONFINITE_FRACTION = 0.01
# read_scan tags each image with its file, so that checks which only see the image (segment_scan) can name it
SOURCE_KEY = "cdal:source"
COMPLEX_PIXELS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


@dataclass
class ScanInput:
    """One thing to segment: a file or a folder holding one DICOM series; ``stem`` names its outputs."""

    path: Path
    stem: str
    dicom: bool = False


@dataclass
class Scan:
    image: sitk.Image
    warnings: List[str] = field(default_factory=list)


def list_inputs(path: Path) -> List[ScanInput]:
    """A file, a folder of files, a DICOM series folder, or a folder of DICOM series folders."""
    path = Path(path)
    if not path.exists():
        raise CDALError(f"{path}: not found: check the --input path")
    if path.is_file():
        return [ScanInput(path, stem_of(path))]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
                   and not p.name.startswith("."))  # not macOS "._x.nii.gz" resource forks
    if files:
        return [ScanInput(p, stem_of(p)) for p in files]
    if _dicom_series(path):
        return [ScanInput(path, path.name, dicom=True)]
    series = [ScanInput(d, d.name, dicom=True) for d in sorted(path.iterdir()) if d.is_dir() and _dicom_series(d)]
    if series:
        return series
    raise CDALError(f"{path}: holds no .nii.gz/.nii/.nrrd/.mha volumes and no DICOM series: give a volume file, a "
                    "folder of them, a folder holding one DICOM series, or a folder of such folders (2D models: "
                    f"PNG/JPEG/TIFF images, or a folder with images/){dataset_subfolder_hint(path)}")


def read_scan(item: ScanInput, allow_thick_slices: bool = False, thin_slices_expected: bool = True) -> Scan:
    """Read, verify and sanitise one input (see the module docstring). ``thin_slices_expected``: the model was
    trained on ~1 mm 3D T1 scans (the hippocampus models) and thicker slices are refused or warned about; a
    user's own model, trained on whatever spacing its data had, skips that check."""
    scan = _read_dicom(item.path) if item.dicom else _read_file(item.path)
    if thin_slices_expected:
        check_slice_thickness(scan, item.path, allow_thick_slices)
    scan.image.SetMetaData(SOURCE_KEY, str(item.path))
    return scan


def source_name(image: sitk.Image, default: str = "input") -> str:
    """The file ``read_scan`` read ``image`` from, else ``default``: what messages about it start with."""
    return image.GetMetaData(SOURCE_KEY) if image.HasMetaDataKey(SOURCE_KEY) else default


def check_real_valued(image: sitk.Image, name) -> None:
    """Complex voxels (raw MR phase/magnitude data) have no intensity order to normalise or segment."""
    if image.GetPixelID() in COMPLEX_PIXELS:
        raise CDALError(f"{name}: holds complex-valued voxels ({image.GetPixelIDTypeAsString()}): take the "
                        "magnitude first (e.g. numpy.abs, or fslcomplex -realabs) and save it as a real-valued image")


def check_slice_thickness(scan: Scan, name, allow: bool) -> None:
    if scan.image.GetDimension() != 3:
        return  # check_volume explains dimensionality
    thickest = max(scan.image.GetSpacing())
    if thickest <= MAX_SLICE_MM:
        return
    message = (f"{name}: voxels are {_fmt(scan.image.GetSpacing())} mm, slices {thickest:.1f} mm thick; this model "
               f"was trained on ~1 mm 3D T1 scans and needs <= {MAX_SLICE_MM:g} mm")
    if not allow:
        raise CDALError(message + ": use a 3D T1 series (MPRAGE/SPGR, ~1 mm), or pass --allow-thick-slices to "
                                  "segment it anyway (results will be coarse)")
    scan.warnings.append(message + ": segmented anyway (--allow-thick-slices), expect coarse results")


# -- files --------------------------------------------------------------------------------------------------
def _read_file(path: Path) -> Scan:
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if nifti:
        header, raw = _nifti_raw(path)  # reads every byte: a cut file fails here
    elif path.name.lower().endswith(".gz"):
        verify_gzip(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        text = str(exc)
        if "orthonormal" in text or "direction" in text.lower():
            raise CDALError(f"{path}: its header's orientation matrix is singular or not a rotation (no valid "
                            "qform/sform), so the scan has no geometry to put results on: fix the header (e.g. "
                            "re-export from the scanner or with dcm2niix)")
        raise unreadable(path, text)
    check_real_valued(image, path)
    scan = Scan(image)
    if nifti:
        _check_nifti(path, scan, header, raw)
    scan.image, replaced = replace_nonfinite(scan.image, name=str(path))
    if replaced:
        scan.warnings.append(replaced)
    return scan


def unreadable(path: Path, text: str) -> CDALError:
    """Why ITK could not read an existing file, worded for its extension."""
    name = path.name.lower()
    if not name.endswith(VOLUME_SUFFIXES + PNG_SUFFIXES):
        suffix = "".join(path.suffixes[-2:]) if name.endswith(".gz") else path.suffix
        return CDALError(f"{path}: {suffix or 'a file without extension'} is not a supported format: save 3D volumes "
                         "as .nii.gz/.nrrd/.mha, or 2D images as PNG/JPEG/TIFF")
    formats = "PNG/JPEG/TIFF image" if name.endswith(PNG_SUFFIXES) else ".nii.gz/.nrrd/.mha volume"
    if _png_colour_type(path) == 4:  # ITK has no pixel type for grey + alpha ("Unknown PixelType ... (1)")
        return CDALError(f"{path}: is a grey PNG with a transparency (alpha) channel, which cannot be read: save it "
                         "without transparency (plain greyscale), or as RGB/RGBA")
    if "No such file or directory" in text and path.is_file():  # ITK's stale errno for data that end early
        return CDALError(f"{path}: is truncated or damaged (its data end early): copy or download it again")
    first = text.strip().splitlines()[-1][:200] if text.strip() else "unknown error"
    return CDALError(f"{path}: cannot be read as an image ({first}): is it a complete {formats}?")


def _png_colour_type(path: Path) -> Optional[int]:
    """A PNG's colour type from its header (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[25]


#: what reading a cut or damaged gzip stream raises
GZIP_ERRORS = (EOFError, OSError, zlib.error)


def read_whole_gzip(path: Path) -> None:
    """Decompress the whole stream, checking its CRC and length; raises one of ``GZIP_ERRORS`` if it is cut."""
    with gzip.open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def verify_gzip(path: Path) -> None:
    """A cut or damaged download is an error, not zeros (ITK reads past the cut as zeros)."""
    try:
        read_whole_gzip(path)
    except GZIP_ERRORS as exc:
        raise CDALError(f"{path}: the compressed file is truncated or corrupt ({exc}): copy or download it again")


def _nifti_raw(path: Path):
    """The NIfTI header and its whole data array (nibabel), or a clear error for a cut or damaged file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    try:
        img = nib.load(str(path))
        return img.header, np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError, ImageFileError) as exc:
        raise CDALError(f"{path}: cannot be read, the file is truncated or corrupt ({str(exc)[:120]}): copy or "
                       "download it again")


def _check_nifti(path: Path, scan: Scan, header, raw: np.ndarray) -> None:
    """What SimpleITK hides about a NIfTI file: missing orientation and NaN voxels (it reads NaN as 0)."""
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        scan.warnings.append(f"{path}: the header has no orientation (qform and sform codes are 0), so the scan's "
                             "geometry is assumed and left/right cannot be trusted: fix the header if sides matter")
    disagree = _orientations_disagree(header)
    if disagree:
        scan.warnings.append(f"{path}: the header's two orientations disagree (qform {disagree[0]}, sform "
                             f"{disagree[1]}): tools that read the other one will see the scan "
                             "flipped, and left/right may be swapped: fix the header (make qform and sform agree)")
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(raw)
        if bad.any():
            array = sitk.GetArrayFromImage(scan.image)
            array[np.transpose(bad.reshape(bad.shape[:3] + (-1,))[..., 0], (2, 1, 0))] = np.nan
            image = sitk.GetImageFromArray(array, isVector=scan.image.GetNumberOfComponentsPerPixel() > 1)
            image.CopyInformation(scan.image)
            scan.image = image


def _orientations_disagree(header) -> Optional[Tuple[str, str]]:
    """(qform axes, sform axes), e.g. ("RAS", "LAS"), when both are set and point different ways, else None. Readers
    differ in which one they use (nibabel the sform, ITK by its own rules), so such a file has two left/rights."""
    import nibabel as nib
    qform, sform = header.get_qform(coded=True)[0], header.get_sform(coded=True)[0]
    if qform is None or sform is None:
        return None
    try:
        codes = "".join(nib.aff2axcodes(qform)), "".join(nib.aff2axcodes(sform))
    except Exception:  # a degenerate matrix: refused elsewhere
        return None
    return codes if codes[0] != codes[1] else None


def replace_nonfinite(image: sitk.Image, name: str = "input") -> Tuple[sitk.Image, str]:
    """NaN/inf voxels -> the scan's lowest finite value (background), with a warning; mostly-NaN is refused."""
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):
        return image, ""
    finite = np.isfinite(array)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad == 0:
        return image, ""
    if not finite.any() or bad > MAX_NONFINITE_FRACTION * finite.size:
        raise CDALError(f"{name}: {bad} of {finite.size} voxels are NaN/inf: the scan is damaged; re-export it")
    fixed = np.where(finite, array, float(array[finite].min())).astype(array.dtype)
    out = sitk.GetImageFromArray(fixed, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out, f"{name}: {bad} NaN/inf voxels replaced by background ({float(array[finite].min()):g})"


# -- DICOM --------------------------------------------------------------------------------------------------
def _dicom_series(folder: Path) -> List[str]:
    try:
        if not any(p.is_file() for p in folder.iterdir()):
            return []
    except OSError:  # unreadable: not a series we could read either
        return []
    # GDCM prints a multi-line "No Series were found" warning for a folder of other files: a plain no here
    shown = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    except RuntimeError:
        return []
    finally:
        sitk.ProcessObject_SetGlobalWarningDisplay(shown)


def _read_dicom(folder: Path) -> Scan:
    ids = _dicom_series(folder)
    if len(ids) != 1:
        raise CDALError(f"{folder}: holds {len(ids)} DICOM series: give a folder with one series (one folder per "
                        "series, e.g. as dcm2niix or the scanner export sorts them)")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    if len(files) < 2:
        raise CDALError(f"{folder}: the DICOM series has {len(files)} slice: a 3D T1 series has many")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CDALError(f"{folder}: the DICOM series cannot be read ({str(exc).strip().splitlines()[-1][:160]}): "
                        "check that the files are complete")
    check_real_valued(image, folder)
    scan = Scan(image)
    scan.image, replaced = replace_nonfinite(image, name=str(folder))
    if replaced:
        scan.warnings.append(replaced)
    return scan


def _fmt(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)
