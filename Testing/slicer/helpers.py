"""Helpers for the slicer-core tests: building volume nodes from arrays/SimpleITK and comparing label maps."""
import numpy as np
import SimpleITK as sitk

import slicer
import slicer.util
from CDALSegmentationLib import geometry


def volume_from_sitk(image, name, scene=None):
    """A vtkMRMLScalarVolumeNode (or vector volume for multi-component images) with the image's geometry."""
    scene = scene or slicer.mrmlScene
    vector = image.GetNumberOfComponentsPerPixel() > 1
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", name)
    geometry.setIjkToRasFromArray(node, geometry.ijkToRasFromSitk(image))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(sitk.GetArrayFromImage(image)))
    node.CreateDefaultDisplayNodes()
    return node


def volume_from_array(array, ijk_to_ras, name, scene=None):
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    geometry.setIjkToRasFromArray(node, ijk_to_ras)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def permute_flip(array_kji, ijk_to_ras, perm, flips):
    """Store the same physical image with permuted/flipped voxel axes.

    ``perm[n]`` = old IJK axis that becomes new axis n, ``flips[n]`` reverses new axis n.
    Returns (new_array_kji, new_ijk_to_ras, inverse) where ``inverse(new_kji) -> old_kji``.
    """
    a_ijk = np.transpose(array_kji, (2, 1, 0))
    old_dims = a_ijk.shape
    b_ijk = np.transpose(a_ijk, perm)
    for n, f in enumerate(flips):
        if f:
            b_ijk = np.flip(b_ijk, axis=n)
    P = np.zeros((4, 4))
    P[3, 3] = 1.0
    for n in range(3):
        if flips[n]:
            P[perm[n], n] = -1.0
            P[perm[n], 3] = old_dims[perm[n]] - 1
        else:
            P[perm[n], n] = 1.0
    new_matrix = np.asarray(ijk_to_ras).dot(P)
    inverse_perm = np.argsort(perm)

    def inverse(new_kji):
        c = np.transpose(new_kji, (2, 1, 0))
        for n, f in enumerate(flips):
            if f:
                c = np.flip(c, axis=n)
        return np.ascontiguousarray(np.transpose(np.transpose(c, inverse_perm), (2, 1, 0)))

    return np.ascontiguousarray(np.transpose(b_ijk, (2, 1, 0))), new_matrix, inverse


def rotation(axis, degrees):
    axis = np.asarray(axis, dtype=float)
    axis /= np.linalg.norm(axis)
    a = np.radians(degrees)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K.dot(K)


def oblique_copy(image, degrees=15.0, axis=(1.0, 1.0, 0.3)):
    """Resample an image onto an oblique grid (same spacing) that covers it: the same physical image, stored
    with a rotated direction matrix (linear interpolation, nearest-value extrapolation at the corners)."""
    R = rotation(axis, degrees)
    direction = R.dot(np.array(image.GetDirection()).reshape(3, 3))
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    # bounding box of the input in the rotated frame
    corners = []
    for c in np.ndindex(2, 2, 2):
        idx = [(size[d] - 1) * c[d] for d in range(3)]
        corners.append(np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx])))
    local = np.array([direction.T.dot(p) for p in corners])
    low, high = local.min(axis=0), local.max(axis=0)
    new_size = [int(np.ceil((high[d] - low[d]) / spacing[d])) + 1 for d in range(3)]
    origin = direction.dot(low)
    ref = sitk.Image(new_size, image.GetPixelID())
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetDirection([float(v) for v in direction.flatten()])
    ref.SetOrigin([float(v) for v in origin])
    # Corners outside the original field of view get the nearest edge value (a scanner acquiring obliquely would
    # have real tissue there); zero padding would also change cdal_core's percentile normalisation.
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, image.GetPixelID(), True)


def labels_to_grid(labels_kji, source_node, target_node):
    """Nearest-neighbour map of a label array from one volume node's grid onto another's."""
    src_img = geometry.imageFromArrayAndMatrix(labels_kji.astype(np.uint8), geometry.ijkToRasArray(source_node))
    dims = target_node.GetImageData().GetDimensions()
    ref = geometry.imageFromArrayAndMatrix(np.zeros((dims[2], dims[1], dims[0]), np.uint8),
                                           geometry.ijkToRasArray(target_node))
    out = sitk.Resample(src_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out)


def dice(a, b, index=None):
    if index is None:
        a, b = a > 0, b > 0
    else:
        a, b = a == index, b == index
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def scene_snapshot(scene):
    """(ID, class, name, MTime-independent) summary of every node, to check a failed run changed nothing."""
    out = []
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        out.append((n.GetID(), n.GetClassName(), n.GetName()))
    return out
