"""CDALSegmentationLogic.segment with real MRML (slicer-core): outputs, geometry, overlays, per-slice table."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
import slicer.util
import vtk
from CDALSegmentationLib import geometry
from CDALSegmentationLib.logic import CDALSegmentationLogic, foregroundClasses, readModelCard

from helpers import (dice, labels_to_grid, oblique_copy, permute_flip, scene_snapshot, volume_from_array,
                     volume_from_sitk)
from slicer_harness import load_volume

FAST = dict(samples=2, steps=1, seed=7)


def _synthetic_case(synthetic_data, index=0):
    return os.path.join(str(synthetic_data), "imagesTr", "case_%03d.nii.gz" % index)


def _anisotropic_oblique_node(synthetic_data, name="Input"):
    """The synthetic case with anisotropic spacing, a non-zero origin and an oblique direction."""
    image = sitk.ReadImage(_synthetic_case(synthetic_data))
    image.SetSpacing((0.9, 1.1, 1.6))
    image.SetOrigin((12.5, -40.0, 7.25))
    from helpers import rotation

    image.SetDirection([float(v) for v in rotation((0.2, 1.0, 0.5), 11.0).flatten()])
    return volume_from_sitk(image, name)


def test_outputs_have_input_geometry_names_and_colours(app, logic, tiny_model, synthetic_data, vtk_errors):
    volume = _anisotropic_oblique_node(synthetic_data)
    before = scene_snapshot(app.scene)
    result = logic.segment(volume, model=tiny_model, **FAST)

    dims = volume.GetImageData().GetDimensions()
    matrix = geometry.ijkToRasArray(volume)
    for node in (result.uncertaintyNode, result.attentionNode):
        assert node.IsA("vtkMRMLScalarVolumeNode")
        assert node.GetScene() is app.scene
        assert node.GetImageData().GetDimensions() == dims
        assert np.array_equal(geometry.ijkToRasArray(node), matrix), "overlay IJK-to-RAS differs from the input"
    unc = slicer.util.arrayFromVolume(result.uncertaintyNode)
    att = slicer.util.arrayFromVolume(result.attentionNode)
    assert unc.dtype == np.float32 and np.all(unc >= 0) and np.isfinite(unc).all()
    assert att.min() >= 0.0 and att.max() <= 1.0

    card = readModelCard(tiny_model)
    classes = foregroundClasses(card)
    segmentation = result.segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(classes)
    for i, (index, name, color) in enumerate(classes):
        segment = segmentation.GetNthSegment(i)
        assert segment.GetName() == name
        assert np.allclose(segment.GetColor(), color)
    # the segmentation's reference geometry is the input volume and its labelmap lies exactly on the input grid
    labels = result.labelArray()
    assert labels.shape == (dims[2], dims[1], dims[0])
    assert result.segmentationNode.GetNodeReference(
        result.segmentationNode.GetReferenceImageGeometryReferenceRole()) is volume

    # new nodes only, unique names, nothing removed or renamed
    after = scene_snapshot(app.scene)
    assert after[:len(before)] == before
    names = [n[2] for n in after]
    assert len(set(n.GetName() for n in result.nodes())) == 5
    # a second run never overwrites the first one's nodes
    first_ids = [n.GetID() for n in result.nodes()]
    first_unc = unc.copy()
    second = logic.segment(volume, model=tiny_model, **FAST)
    assert not set(first_ids) & set(n.GetID() for n in second.nodes())
    assert all(app.scene.GetNodeByID(i) is not None for i in first_ids)
    assert np.array_equal(slicer.util.arrayFromVolume(result.uncertaintyNode), first_unc)
    all_names = [app.scene.GetNthNode(i).GetName() for i in range(app.scene.GetNumberOfNodes())]
    for node in second.nodes():
        assert all_names.count(node.GetName()) == 1, node.GetName()
    assert not vtk_errors.messages, vtk_errors.messages
    del names


def test_overlay_display_inferno_low_values_transparent(app, logic, tiny_model, synthetic_data):
    volume = load_volume(_synthetic_case(synthetic_data), name="case0")
    result = logic.segment(volume, model=tiny_model, **FAST)
    for node in (result.uncertaintyNode, result.attentionNode):
        display = node.GetDisplayNode()
        color = display.GetColorNode()
        assert color is not None and "nferno" in (color.GetName() + color.GetID())
        assert not display.GetAutoWindowLevel()
        assert display.GetApplyThreshold() and display.GetLowerThreshold() > 0.0
    att = result.attentionNode.GetDisplayNode()
    assert att.GetWindow() == pytest.approx(1.0) and att.GetLevel() == pytest.approx(0.5)
    # one colour table for all runs
    again = logic.segment(volume, model=tiny_model, **FAST)
    assert app.scene.GetNodesByClassByName("vtkMRMLColorTableNode", "CDAL Inferno").GetNumberOfItems() == 1
    assert again.uncertaintyNode.GetDisplayNode().GetColorNodeID() == color.GetID()


def test_slice_table_consistent_with_uncertainty_volume(app, logic, tiny_model, synthetic_data):
    volume = load_volume(_synthetic_case(synthetic_data, 1), name="case1")
    result = logic.segment(volume, model=tiny_model, **FAST)
    table = result.sliceTableNode
    unc = slicer.util.arrayFromVolume(result.uncertaintyNode).astype(np.float64)
    labels = result.labelArray()
    K = unc.shape[0]
    assert table.GetNumberOfRows() == K
    assert np.array_equal(slicer.util.arrayFromTableColumn(table, "Slice"), np.arange(K))
    assert np.allclose(slicer.util.arrayFromTableColumn(table, "Mean uncertainty"), unc.reshape(K, -1).mean(1),
                       rtol=1e-6, atol=1e-12)
    assert np.allclose(slicer.util.arrayFromTableColumn(table, "Max uncertainty"), unc.reshape(K, -1).max(1),
                       rtol=1e-6, atol=1e-12)
    for index, name, _ in foregroundClasses(result.card):
        counts = slicer.util.arrayFromTableColumn(table, "%s voxels" % name)
        assert np.array_equal(counts, (labels == index).reshape(K, -1).sum(1)), name
    # jump target of a row lies on that slice
    ras = logic.sliceCenterRAS(volume, K // 2)
    ijk = np.linalg.inv(geometry.ijkToRasArray(volume)).dot(list(ras) + [1.0])
    assert ijk[2] == pytest.approx(K // 2)
    chart = logic.slicePlot(table)
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    assert logic.slicePlot(table) is chart, "'Show plot' must reuse its chart"


def test_same_physical_image_permuted_flipped_and_oblique(app, logic, tiny_model, synthetic_data):
    image = sitk.ReadImage(_synthetic_case(synthetic_data, 2))
    image.SetSpacing((1.0, 1.0, 1.0))
    base = volume_from_sitk(image, "base")
    base_labels = logic.segment(base, model=tiny_model, **FAST).labelArray()
    assert base_labels.any(), "tiny model found nothing; the comparison would be vacuous"

    # permuted + flipped voxel axes (exact re-indexing, LPS/RAS-like flips): identical segmentation expected
    array = slicer.util.arrayFromVolume(base)
    for perm, flips in (((0, 1, 2), (True, True, False)), ((2, 0, 1), (False, True, True))):
        new_array, new_matrix, inverse = permute_flip(array, geometry.ijkToRasArray(base), perm, flips)
        node = volume_from_array(new_array, new_matrix, "permuted")
        labels = logic.segment(node, model=tiny_model, **FAST).labelArray()
        back = inverse(labels)
        assert back.shape == base_labels.shape
        # the model grid is the same, and so are the seeds: voxel for voxel the same labels
        assert np.array_equal(back, base_labels), (perm, flips, float((back == base_labels).mean()))

    # oblique storage of the same physical image (resampled): the same structures after mapping back
    node = volume_from_sitk(oblique_copy(image, degrees=12.0), "oblique")
    labels = logic.segment(node, model=tiny_model, **FAST).labelArray()
    back = labels_to_grid(labels, node, base)
    assert dice(back, base_labels) > 0.6, dice(back, base_labels)


def test_roi_crops_and_pastes_back(app, logic, tiny_model, synthetic_data):
    volume = load_volume(_synthetic_case(synthetic_data), name="roi-input")
    dims = volume.GetImageData().GetDimensions()
    matrix = geometry.ijkToRasArray(volume)
    lo = np.array([4, 6, 5])
    hi = np.array([dims[0] - 6, dims[1] - 8, dims[2] - 4])
    center = matrix.dot(list((lo + hi - 1) / 2.0) + [1.0])[:3]
    size = np.abs(matrix[:3, :3]).dot(hi - lo)
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(*center)
    roi.SetSize(*size)
    result = logic.segment(volume, model=tiny_model, roiNode=roi, **FAST)
    (i0, j0, k0), (i1, j1, k1) = result.ijkBox
    assert (i0, j0, k0) == tuple(lo) and (i1, j1, k1) == tuple(hi)
    unc = slicer.util.arrayFromVolume(result.uncertaintyNode)
    assert unc.shape == (dims[2], dims[1], dims[0])
    assert np.array_equal(geometry.ijkToRasArray(result.uncertaintyNode), matrix)
    outside = np.ones(unc.shape, bool)
    outside[k0:k1, j0:j1, i0:i1] = False
    assert not unc[outside].any()
    assert not result.labelArray()[outside].any()
    assert unc[~outside].any()


def test_background_job_matches_in_process(app, logic, tiny_model, synthetic_data):
    volume = load_volume(_synthetic_case(synthetic_data), name="job-input")
    direct = logic.segment(volume, model=tiny_model, device="cpu", **FAST)
    job = logic.startSegmentation(volume, model=tiny_model, device="cpu", **FAST)
    try:
        before = scene_snapshot(app.scene)
        seen = []
        state = job.wait(timeout=180, callback=lambda j: seen.append(j.statusText()))
        assert state == "done", (job.error, job.stderrLines[-5:])
        assert scene_snapshot(app.scene) == before, "the job must not touch the scene before finishSegmentation"
        result = logic.finishSegmentation(job)
    finally:
        job.cleanup()
    assert np.array_equal(result.labelArray(), direct.labelArray())
    assert np.allclose(slicer.util.arrayFromVolume(result.uncertaintyNode),
                       slicer.util.arrayFromVolume(direct.uncertaintyNode), atol=1e-6)
    assert any("%" in s for s in seen)
    assert not os.path.exists(job.workDir)


def test_ras_nifti_and_lps_nrrd_files_and_parent_transform(app, logic, tiny_model, synthetic_data, tmp_path):
    """The same image written as NIfTI (RAS on disk) and NRRD (LPS header) loads with the same geometry through
    MRML storage nodes and segments identically; outputs follow the input's parent transform."""
    source = sitk.ReadImage(_synthetic_case(synthetic_data))
    source.SetDirection([float(v) for v in np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]]).flatten()])
    source.SetOrigin((-3.0, 14.0, 22.0))
    nii, nrrd = str(tmp_path / "img.nii.gz"), str(tmp_path / "img.nrrd")
    sitk.WriteImage(source, nii)
    sitk.WriteImage(source, nrrd)
    assert "left-posterior-superior" in open(nrrd, "rb").read(2000).decode("latin-1")
    a = load_volume(nii, name="from nifti")
    b = load_volume(nrrd, name="from nrrd")
    assert np.allclose(geometry.ijkToRasArray(a), geometry.ijkToRasArray(b), atol=1e-5)
    assert np.allclose(geometry.ijkToRasArray(a), geometry.ijkToRasFromSitk(source), atol=1e-5)
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    moved = vtk.vtkMatrix4x4()
    moved.SetElement(0, 3, 50.0)  # a registered scan: 50 mm to the right, not hardened
    moved.SetElement(2, 3, -7.0)
    transform.SetMatrixTransformToParent(moved)
    b.SetAndObserveTransformNodeID(transform.GetID())
    la = logic.segment(a, model=tiny_model, **FAST)
    lb = logic.segment(b, model=tiny_model, **FAST)
    assert np.array_equal(la.labelArray(), lb.labelArray())
    for node in (lb.segmentationNode, lb.uncertaintyNode, lb.attentionNode):
        assert node.GetTransformNodeID() == transform.GetID()
    # Segment Editor edits on the segmentation's stored reference geometry, which lives in the segmentation's own
    # (here: transformed) frame, so it must be the volume's local grid, not the grid moved once more by the transform
    segmentation = lb.segmentationNode.GetSegmentation()
    stored = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    matrix, extent = vtk.vtkMatrix4x4(), [0] * 6
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(stored, matrix, extent)
    storedIjkToRas = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(storedIjkToRas, geometry.ijkToRasArray(b), atol=1e-5), storedIjkToRas


def test_model_summary_tells_sampling_ensemble_and_dice_with_standard_error(tmp_path):
    from CDALSegmentationLib.logic import modelSummary

    card = {"description": "Two ellipsoids", "classes": [{"index": 0, "name": "Background"},
                                                        {"index": 1, "name": "Left"}, {"index": 2, "name": "Right"}],
            "input": {}, "num_steps": 2, "samples": 5, "members": [{"weights": "member1.safetensors"}],
            "validation": {"volumes": 10, "note": "fold 0",
                           "per_class": {"Left": {"dice": 0.9, "dice_std": 0.03}, "Right": {"dice": 0.8}}}}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(card))
    line, tooltip = modelSummary(str(folder))
    # std 3 points over 10 volumes (ddof 0) -> standard error 3 / sqrt(9) = 1.0; no std -> no ±
    assert line == ("2 generators, 2 denoising steps x 5 samples; validation Dice Left 90.0 ± 1.0, Right 80.0 "
                    "(10 volumes)")
    assert tooltip.splitlines() == ["Two ellipsoids", line, "fold 0"]

    card["validation"]["estimate"] = {"basis": "4-fold cross-validation", "note": "fold 0 is easy",
                                      "per_class": {"Left": {"dice": 0.883, "se": 0.003},
                                                    "Right": {"dice": 0.866, "se": 0.004}}}
    (folder / "model.json").write_text(json.dumps(card))
    line, tooltip = modelSummary(str(folder))
    assert line.endswith("(10 volumes); expected on new scans Left 88.3 ± 0.3, Right 86.6 ± 0.4 "
                         "(4-fold cross-validation)")
    assert tooltip.splitlines()[-1] == "fold 0 is easy"

    del card["validation"], card["members"]
    (folder / "model.json").write_text(json.dumps(card))
    assert modelSummary(str(folder))[0] == "2 denoising steps x 5 samples; no validation recorded in its card"
    card["input"]["test_time_mirror"] = True  # a single generator trained on mirrored heads (cdal finetune)
    (folder / "model.json").write_text(json.dumps(card))
    assert modelSummary(str(folder))[0].startswith("2 denoising steps x 5 samples (some on the left-right mirror);")
    card["sampling"] = {"step_pooling": "mean"}  # cards of volume models cdal trains since session 23
    (folder / "model.json").write_text(json.dumps(card))
    assert modelSummary(str(folder))[0].startswith(
        "2 denoising steps x 5 samples (every step's prediction pooled; some on the left-right mirror);")

    (folder / "model.json").write_text("{not json")
    line, tooltip = modelSummary(str(folder))
    assert "cannot be read" in line and line == tooltip


def test_segment_labelmaps_cover_their_structures_not_the_whole_volume(app, logic, tiny_model, synthetic_data):
    """A whole head's hippocampus is a small part of it: each segment's labelmap spans its structure's box (the
    full-size labelmaps took seconds and gigabytes on the GUI thread), and reads back voxel for voxel."""
    volume = load_volume(_synthetic_case(synthetic_data), name="boxes")
    result = logic.segment(volume, model=tiny_model, **FAST)
    labels = result.labelArray()
    assert labels.any()
    k, j, i = np.nonzero(labels)
    box = [i.min(), i.max(), j.min(), j.max(), k.min(), k.max()]
    segmentation = result.segmentationNode.GetSegmentation()
    dims = volume.GetImageData().GetDimensions()
    for n in range(segmentation.GetNumberOfSegments()):
        extent = segmentation.GetNthSegment(n).GetRepresentation("Binary labelmap").GetExtent()
        assert all(extent[2 * a] >= box[2 * a] and extent[2 * a + 1] <= box[2 * a + 1] for a in range(3)), extent
        assert extent != (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    for index in np.unique(labels[labels > 0]):
        name = [c for c in foregroundClasses(result.card) if c[0] == index][0][1]
        segmentId = segmentation.GetSegmentIdBySegmentName(name)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, segmentId, volume)
        assert np.array_equal(mask > 0, labels == index)
