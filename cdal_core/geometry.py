"""Bring any 3D image into the model's grid (orientation + spacing) and map results back exactly.

Axis-aligned inputs (any permutation or flip of the axes) are re-oriented without interpolation, so a flipped or
permuted copy of a scan gives the same segmentation voxel for voxel. Oblique or differently spaced inputs are
resampled into an axis-aligned grid of the model's spacing that covers the input, and results are resampled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set

import numpy as np
import SimpleITK as sitk

_AXIS_TOLERANCE = 1e-4
_SPACING_TOLERANCE = 0.02  # relative; closer than this is treated as the model's spacing


def in_plane_axes(slice_axis: int) -> List[int]:
    """The volume (array) axes of a slice cut along ``slice_axis``, in the slice's own (row, column) order: an
    in-plane ``flip_axis`` of 0 or 1 names the volume axis at that index."""
    return [a for a in range(3) if a != slice_axis]


def mirrored_volume_axes(augmentation: Optional[Dict], slice_axis: int) -> Set[int]:
    """The volume axes that ``augmentation`` mirrors for slices cut along ``slice_axis``: its in-plane
    ``flip_axis`` (both in-plane axes with ``dihedral``) and, with ``flip_across_slices``, the slicing axis itself
    (reversed context slices)."""
    settings = augmentation or {}
    mirrored = set(in_plane_axes(slice_axis)) if settings.get("dihedral") else set()
    if settings.get("flip_axis") is not None:
        mirrored.add(in_plane_axes(slice_axis)[int(settings["flip_axis"])])
    if settings.get("flip_across_slices"):
        mirrored.add(slice_axis)
    return mirrored


def is_axis_aligned(image: sitk.Image) -> bool:
    d = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
    return bool(np.all((d < _AXIS_TOLERANCE) | (d > 1 - _AXIS_TOLERANCE)))


def orientation_code(image: sitk.Image) -> str:
    """ITK orientation code (e.g. "RAS", "LPS") of the closest axis-aligned orientation."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


@dataclass
class ModelGrid:
    """Where the model sees images: an ITK orientation code and an optional spacing in mm (x, y, z)."""

    orientation: str = "RAS"
    spacing: Optional[Sequence[float]] = None


class GridMapping:
    """Maps one input image to the model grid (``to_model``) and arrays on that grid back (``to_input``)."""

    def __init__(self, image: sitk.Image, grid: ModelGrid, fill: float = 0.0):
        """``fill``: value for model-grid voxels outside the input (resampling only), e.g. its dark level."""
        self.input = image
        self.fill = float(fill)
        self.grid = grid
        self.resampled = False
        self.notes = []
        aligned = is_axis_aligned(image)
        if aligned:
            model_image = sitk.DICOMOrient(image, grid.orientation)
        else:
            self.notes.append("oblique image: resampled into the model's axis-aligned grid")
            model_image = image
        target_spacing = np.asarray(grid.spacing if grid.spacing is not None else model_image.GetSpacing(), float)
        spacing_off = np.any(np.abs(np.asarray(model_image.GetSpacing()) / target_spacing - 1) > _SPACING_TOLERANCE)
        if not aligned or spacing_off:
            if spacing_off:
                self.notes.append("spacing {} mm resampled to the model's {} mm".format(
                    _fmt(model_image.GetSpacing()), _fmt(target_spacing)))
            model_image = self._resample_to_grid(image, target_spacing)
            self.resampled = True
        self.model_image = model_image

    def _resample_to_grid(self, image: sitk.Image, spacing: np.ndarray) -> sitk.Image:
        """Linear resampling onto an axis-aligned grid in the model orientation covering the input's extent."""
        reference = sitk.DICOMOrient(sitk.Image([2, 2, 2], sitk.sitkUInt8), self.grid.orientation)
        direction = np.asarray(reference.GetDirection()).reshape(3, 3)
        corners = []
        size = np.asarray(image.GetSize())
        for corner in np.ndindex(2, 2, 2):
            index = (np.asarray(corner) * (size - 1)).tolist()
            corners.append(image.TransformContinuousIndexToPhysicalPoint(index))
        # Express the corners in the new grid's axes, and span them.
        local = np.asarray(corners) @ direction
        lo, hi = local.min(axis=0), local.max(axis=0)
        new_size = np.maximum(np.round((hi - lo) / spacing).astype(int) + 1, 1)
        origin = direction @ lo
        return sitk.Resample(image, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear,
                             origin.tolist(), spacing.tolist(), direction.flatten().tolist(), self.fill,
                             sitk.sitkFloat32)

    def model_array(self) -> np.ndarray:
        """The image on the model grid as float32, array order (z, y, x)."""
        return sitk.GetArrayFromImage(self.model_image).astype(np.float32)

    def to_input(self, array: np.ndarray, interpolator=sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
        """An array on the model grid (z, y, x) -> an image with exactly the input's geometry."""
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.model_image)
        if self.resampled:
            out = sitk.Resample(image, self.input, sitk.Transform(), interpolator, default, image.GetPixelID())
        else:
            out = sitk.DICOMOrient(image, orientation_code(self.input))
        out.CopyInformation(self.input)  # exact, bit-for-bit geometry of the input
        return out


def _fmt(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)
