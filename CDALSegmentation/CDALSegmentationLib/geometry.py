"""MRML volume <-> SimpleITK image conversion and IJK-box helpers.

Conventions: MRML IJK-to-RAS = [direction columns * spacing | origin] in RAS. SimpleITK uses LPS, so origin
and direction rows flip the first two axes. ``slicer.util.arrayFromVolume`` returns (K, J, I) arrays, the same
order as ``SimpleITK.GetArrayFromImage``.
"""

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijkToRasArray(volumeNode):
    """4x4 numpy IJK-to-RAS matrix of a volume node (local coordinates, parent transforms not applied)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def setIjkToRasFromArray(volumeNode, matrix):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r][c]))
    volumeNode.SetIJKToRASMatrix(m)


def spacingDirectionOrigin(ijkToRas):
    """Split an IJK-to-RAS matrix into spacing (3,), direction (3x3, columns) and origin (3,) in RAS."""
    ijkToRas = np.asarray(ijkToRas, dtype=float)
    columns = ijkToRas[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("degenerate IJK-to-RAS matrix")
    direction = columns / spacing
    return spacing, direction, ijkToRas[:3, 3].copy()


def volumeArray(volumeNode):
    """Voxel array (K, J, I) or (K, J, I, C) of a volume node (a copy)."""
    import slicer.util

    return np.array(slicer.util.arrayFromVolume(volumeNode))


def imageFromArrayAndMatrix(array, ijkToRas, isVector=False):
    """SimpleITK image from a (K, J, I[, C]) array and an RAS IJK-to-RAS matrix."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=isVector)
    spacing, direction, origin = spacingDirectionOrigin(ijkToRas)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in LPS_TO_RAS.dot(origin)])
    image.SetDirection([float(v) for v in LPS_TO_RAS.dot(direction).flatten()])
    return image


def sitkImageFromVolumeNode(volumeNode, ijkBox=None):
    """SimpleITK image (LPS) of a scalar or vector volume node, optionally cropped to an IJK box.

    ``ijkBox`` is ((i0, j0, k0), (i1, j1, k1)) with exclusive upper bounds.
    """
    array = volumeArray(volumeNode)
    ijkToRas = ijkToRasArray(volumeNode)
    if ijkBox is not None:
        (i0, j0, k0), (i1, j1, k1) = ijkBox
        array = array[k0:k1, j0:j1, i0:i1]
        ijkToRas = ijkToRas.copy()
        ijkToRas[:3, 3] = ijkToRas.dot([i0, j0, k0, 1.0])[:3]
    isVector = array.ndim == 4
    return imageFromArrayAndMatrix(array, ijkToRas, isVector=isVector)


def ijkToRasFromSitk(image):
    """RAS IJK-to-RAS matrix of a SimpleITK image."""
    spacing = np.array(image.GetSpacing(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.array(image.GetOrigin(), dtype=float)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS.dot(direction) * spacing
    m[:3, 3] = LPS_TO_RAS.dot(origin)
    return m


def roiIjkBox(volumeNode, roiNode, margin=0):
    # type: (object, object, int) -> Optional[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]
    """IJK box (exclusive upper bound) of the volume covering a markups ROI; None if they do not overlap.

    Uses the 8 corners of the (possibly rotated) ROI box in world coordinates, maps them into the volume's
    IJK space (through the volume's parent transform when it is linear), and clamps to the volume extent.
    """
    import vtk

    dims = volumeNode.GetImageData().GetDimensions()
    corners = roiCornersWorld(roiNode)
    worldToLocal = np.eye(4)
    parent = volumeNode.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError("non-linear transform")
        m = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformFromWorld(m)
        worldToLocal = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    rasToIjk = np.linalg.inv(ijkToRasArray(volumeNode))
    ijk = np.array([rasToIjk.dot(worldToLocal.dot(list(c) + [1.0]))[:3] for c in corners])
    # voxel centres at integer ijk: voxel n covers [n-0.5, n+0.5]
    low = np.floor(ijk.min(axis=0) + 0.5).astype(int) - margin
    high = np.ceil(ijk.max(axis=0) - 0.5).astype(int) + 1 + margin
    low = np.maximum(low, 0)
    high = np.minimum(high, dims)
    if np.any(high <= low):
        return None
    return (tuple(int(v) for v in low), tuple(int(v) for v in high))


def roiCornersWorld(roiNode):
    """The 8 corners of a vtkMRMLMarkupsROINode box in world (RAS) coordinates."""
    size = list(roiNode.GetSize())
    # object frame: ROI axes, origin at the ROI centre (includes the ROI's parent transforms)
    objectToWorld = roiNode.GetObjectToWorldMatrix()
    m = np.array([[objectToWorld.GetElement(r, c) for c in range(4)] for r in range(4)])
    corners = []
    for dx in (-0.5, 0.5):
        for dy in (-0.5, 0.5):
            for dz in (-0.5, 0.5):
                p = np.array([dx * size[0], dy * size[1], dz * size[2], 1.0])
                corners.append(m.dot(p)[:3])
    return corners
