"""Reviewing results on real MRML (no model needed: outputs built from known arrays): per-side segments and
volume table, results bound to the segmented volume, 5.6/5.8 table headers, clipboard text, plot reuse,
our own volumes hidden from the input selector."""
import numpy as np
import pytest
import SimpleITK as sitk

import slicer.util
from CDALSegmentationLib import geometry
from CDALSegmentationLib.logic import (OUTPUT_ATTRIBUTE, _PreparedInput, tableAsTSV, useColumnNamesAsHeaders)

from helpers import volume_from_array

CARD = {"classes": [{"index": 0, "name": "background"}, {"index": 1, "name": "Anterior", "color": [255, 0, 0]},
                    {"index": 2, "name": "Posterior", "color": [0, 0, 255]}], "input": {"image_channels": 1}}
SPACING = (0.5, 1.0, 2.0)  # voxel = 1 mm3


def _case(app, name="A", origin=(10.0, -20.0, 5.0)):
    shape = (10, 12, 20)  # K, J, I
    matrix = np.diag(list(SPACING) + [1.0])
    matrix[:3, 3] = origin
    array = np.random.default_rng(0).normal(50, 5, shape).astype(np.float32)
    volume = volume_from_array(array, matrix, name)
    labels = np.zeros(shape, np.uint8)
    sides = np.zeros(shape, np.uint8)
    labels[2:5, 3:6, 2:6], sides[2:5, 3:6, 2:6] = 1, 2  # right anterior: 36 voxels (image left = subject right)
    labels[5:7, 3:6, 2:6], sides[5:7, 3:6, 2:6] = 2, 2  # right posterior: 24
    labels[2:5, 3:6, 12:18], sides[2:5, 3:6, 12:18] = 1, 1  # left anterior: 54
    uncertainty = np.zeros(shape, np.float32)
    uncertainty[6] = 0.5  # slice 6 is the most uncertain
    uncertainty[labels == 1] += 0.1
    prepared = _PreparedInput(volume, sitk.GetImageFromArray(array), None, "/models/hippocampus", CARD)
    arrays = {"labels": labels, "uncertainty": uncertainty, "attention": uncertainty / 2, "sides": sides}
    report = {"localisation": {"status": "ok", "centres_ras": {"left": [1.0, 2.0, 3.0]}}}
    return volume, prepared, arrays, report


def test_per_side_segments_keep_model_colours_and_volume_table(app, logic):
    volume, prepared, arrays, report = _case(app)
    result = logic.createOutputNodes(prepared, arrays, report)
    segmentation = result.segmentationNode.GetSegmentation()
    segments = dict((segmentation.GetNthSegment(i).GetName(), segmentation.GetNthSegment(i))
                    for i in range(segmentation.GetNumberOfSegments()))
    assert sorted(segments) == ["Left anterior", "Right anterior", "Right posterior"]
    assert np.allclose(segments["Left anterior"].GetColor(), (1, 0, 0))
    assert np.allclose(segments["Right posterior"].GetColor(), (0, 0, 1))
    table = result.volumeTableNode
    assert [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())] == ["left", "right", "right"]
    volumes = slicer.util.arrayFromTableColumn(table, "Volume mm3")
    assert list(volumes) == [54.0, 36.0, 24.0]  # voxels x 1 mm3
    text = tableAsTSV(table)
    assert text.splitlines()[0] == "Side\tStructure\tVoxels\tVolume mm3\tMean uncertainty"
    assert text.splitlines()[1].startswith("left\tAnterior\t54\t54\t")
    # results, not forms: the table views must not let a double-click change what the slice jumps read
    assert table.GetLocked() and result.sliceTableNode.GetLocked()
    # fine-tuning reads the per-side segments back as model classes
    assert np.array_equal(result.labelArray(), arrays["labels"])


def test_side_unknown_gives_plain_class_names(app, logic):
    volume, prepared, arrays, _ = _case(app)
    arrays["sides"] = (arrays["labels"] > 0).astype(np.uint8) * 3
    result = logic.createOutputNodes(prepared, arrays, {})
    segmentation = result.segmentationNode.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["Anterior", "Posterior"]
    assert logic.centreRAS(result.volumeTableNode, "left") is None


def test_results_follow_the_segmented_volume_not_the_selector(app, logic):
    volume, prepared, arrays, report = _case(app, "A")
    other = volume_from_array(np.ones((30, 30, 30), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), "B")
    result = logic.createOutputNodes(prepared, arrays, report)
    for node in result.nodes():
        assert logic.segmentedVolume(node) is volume
    ras = logic.sliceJumpRAS(result.sliceTableNode, 6)
    ijk = np.linalg.inv(geometry.ijkToRasArray(volume)).dot(list(ras) + [1.0])
    assert ijk[2] == pytest.approx(6.0), "jump uses the geometry of the segmented volume"
    assert logic.sliceCenterRAS(other, 6) != ras
    background, foreground = logic.overlayLayers(result.uncertaintyNode, result.attentionNode, True, False)
    assert background is volume and foreground is result.uncertaintyNode
    assert logic.overlayLayers(result.uncertaintyNode, result.attentionNode, False, True)[1] is result.attentionNode
    assert logic.mostUncertainSlice(result.sliceTableNode) == 6
    # the localiser's centre when reported, else the side's centroid; through the volume's parent transform
    assert logic.centreRAS(result.volumeTableNode, "left") == pytest.approx([1.0, 2.0, 3.0])
    right = logic.centreRAS(result.volumeTableNode, "right")
    assert right == pytest.approx(list(geometry.ijkToRasArray(volume).dot([3.5, 4.0, 4.0, 1.0])[:3]))
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert logic.centreRAS(result.volumeTableNode, "left") == pytest.approx([101.0, 2.0, 3.0])


def test_outputs_are_hidden_from_the_input_selector_and_plot_is_reused(app, logic):
    volume, prepared, arrays, report = _case(app)
    result = logic.createOutputNodes(prepared, arrays, report)
    hidden = logic.outputVolumeIDs(app.scene)
    assert sorted(hidden) == sorted([result.uncertaintyNode.GetID(), result.attentionNode.GetID()])
    assert volume.GetID() not in hidden and result.uncertaintyNode.GetAttribute(OUTPUT_ATTRIBUTE)
    chart = logic.slicePlot(result.sliceTableNode)
    assert logic.slicePlot(result.sliceTableNode) is chart
    assert app.scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 1
    app.scene.RemoveNode(chart)  # the user deleted it: a new one is made
    assert logic.slicePlot(result.sliceTableNode) is not None


def test_results_are_filed_under_the_input_study(app, logic):
    """A DICOM series sits under its patient and study: the results go there too (Data module), so that deleting or
    exporting the study takes them along. An input at the top level leaves its results at the top level."""
    volume, prepared, arrays, report = _case(app)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "MR brain 2026")
    hierarchy.CreateItem(study, volume)
    result = logic.createOutputNodes(prepared, arrays, report)
    chart = logic.slicePlot(result.sliceTableNode)
    filed = result.nodes() + [chart, chart.GetNthPlotSeriesNode(0)]
    assert len(filed) == 7
    for node in filed:
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study, node.GetName()

    loose, prepared, arrays, report = _case(app, name="B")
    result = logic.createOutputNodes(prepared, arrays, report)
    for node in result.nodes():
        item = hierarchy.GetItemByDataNode(node)
        assert not item or hierarchy.GetItemParent(item) == hierarchy.GetSceneItemID(), node.GetName()


def test_plot_of_an_imported_scene_is_its_own_chart(app, logic, tmp_path):
    """A saved scene added to one that already has a chart: node IDs clash and MRML renumbers the imported nodes.
    'Show plot' on the imported table must show the imported chart, not this session's."""
    saved = slicer.vtkMRMLScene()
    older = saved.AddNewNodeByClass("vtkMRMLTableNode", "older scan slice uncertainty")
    olderChart = logic.slicePlot(older)
    saved.SetURL(str(tmp_path / "older.mrml"))
    saved.Commit()
    current = app.scene.AddNewNodeByClass("vtkMRMLTableNode", "current scan slice uncertainty")
    currentChart = logic.slicePlot(current)
    url = app.scene.GetURL()
    app.scene.SetURL(str(tmp_path / "older.mrml"))
    try:
        assert app.scene.Import()
    finally:
        app.scene.SetURL(url)
    imported = app.scene.GetFirstNodeByName("older scan slice uncertainty")
    assert imported is not None and imported is not current
    chart = logic.slicePlot(imported)
    assert chart is not currentChart and chart.GetName() == olderChart.GetName()
    assert logic.slicePlot(current) is currentChart


class _Slicer56Table(object):
    """A real table node seen through Slicer 5.6's API (no SetUseColumnTitleAsColumnHeader)."""

    def __init__(self, node):
        self.node = node

    def SetUseColumnNameAsColumnHeader(self, on):
        self.node.SetUseColumnTitleAsColumnHeader(on)  # what 5.6's method does
        self.called = on


def test_table_headers_on_slicer_58_and_56(app):
    node = app.scene.AddNewNodeByClass("vtkMRMLTableNode")
    assert useColumnNamesAsHeaders(node) == "SetUseColumnTitleAsColumnHeader"
    assert node.GetUseColumnTitleAsColumnHeader()
    old = _Slicer56Table(app.scene.AddNewNodeByClass("vtkMRMLTableNode"))
    assert useColumnNamesAsHeaders(old) == "SetUseColumnNameAsColumnHeader" and old.called is True


def test_structures_above_the_cards_review_limit_are_marked_in_the_table(app, logic):
    volume, prepared, arrays, report = _case(app)
    card = dict(CARD, quality={"review_uncertainty_above": {"Anterior": 0.05, "Posterior": 0.5}})
    prepared = _PreparedInput(volume, prepared.image, None, "/models/hippocampus", card)
    table = logic.createOutputNodes(prepared, arrays, report).volumeTableNode
    text = tableAsTSV(table).splitlines()
    assert text[0] == "Side\tStructure\tVoxels\tVolume mm3\tMean uncertainty\tCheck"
    # anterior 0.1 > 0.05 on both sides; right posterior 0.25 (half of it in the 0.5 slice) < 0.5
    assert [line.split("\t")[-1] if line.count("\t") == 5 else "" for line in text[1:]] == ["review", "review", ""]

    # where the segmentation's report already decided (cdal_core.quality on the same map), the table follows it
    report = dict(report, structures=[{"side": "left", "name": "Anterior", "review": False},
                                      {"side": "right", "name": "Posterior", "review": True}])
    table = logic.createOutputNodes(prepared, arrays, report).volumeTableNode
    assert [line.split("\t")[-1] if line.count("\t") == 5 else "" for line in tableAsTSV(table).splitlines()[1:]] == \
        ["", "review", "review"]
