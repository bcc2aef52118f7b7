"""Tests that need desktop 3D Slicer (Qt, the module widget, qt.QProcess). Run by Testing/run_tests.py inside
Slicer (``Slicer --no-splash --python-script Testing/run_tests.py``) or by the module's "Reload and Test".
Not collected by pytest (file name): plain Python has no ``qt``."""
import time
import unittest

import numpy as np
import slicer

from CDALSegmentationLib import logic as libLogic
from CDALSegmentationLib.dependencies import missingPackages


def _volume(name="CDAL test volume"):
    z, y, x = np.mgrid[0:24, 0:40, 0:32].astype(np.float32)
    blob = ((x - 16) / 7.0) ** 2 + ((y - 20) / 11.0) ** 2 + ((z - 12) / 6.0) ** 2 < 1.0
    array = (np.random.default_rng(0).normal(40, 5, blob.shape) + 100 * blob).astype(np.float32)
    ijkToRAS = np.array([[-1.2, 0, 0, 10], [0, 0.9, 0.1, -5], [0, -0.1, 0.9, 3], [0, 0, 0, 1]])
    return slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name=name)


def _waitFor(condition, seconds=300):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        slicer.app.processEvents()
        time.sleep(0.05)
    return condition()


class CDALSegmentationDesktopTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        if missingPackages():
            self.skipTest("missing packages: %s" % missingPackages())
        models = libLogic.listModels()
        if not models:
            self.skipTest("no cDAL model installed")
        self.model = libLogic.DEFAULT_MODEL if libLogic.DEFAULT_MODEL in models else sorted(models)[0]
        slicer.util.selectModule("CDALSegmentation")
        self.widget = slicer.modules.cdalsegmentation.widgetRepresentation().self()

    def _configure(self, volume, model=None):
        p = self.widget._parameterNode
        p.inputVolume, p.samples, p.steps, p.seed = volume, 2, 1, 0
        self.widget.refreshModels()
        self.widget.selectModel(model or self.model)

    def test_selected_model_is_summarised_under_the_list(self):
        self._configure(_volume())
        self.assertEqual(self.widget.ui.modelInfoLabel.text, libLogic.modelSummary(self.widget.currentModel())[0])
        self.assertIn("denoising steps", self.widget.ui.modelInfoLabel.text)

    def test_segment_over_qprocess_results_follow_the_segmented_volume(self):
        volume, other = _volume("A"), _volume("B")
        self._configure(volume)
        self.widget.ui.applyButton.click()
        self.assertFalse(self.widget.ui.inputSelector.enabled, "input selector must be locked during a run")
        self.assertTrue(_waitFor(lambda: not self.widget.segmentPanel.running), "segmentation did not finish")
        p = self.widget._parameterNode
        self.assertIsNotNone(p.uncertainty)
        self.assertIsNotNone(p.volumeTable)
        p.inputVolume = other
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.widget.updateOverlays()
        self.assertEqual(composite.GetBackgroundVolumeID(), volume.GetID())
        self.assertEqual(composite.GetForegroundVolumeID(), p.uncertainty.GetID())
        self.widget.onJumpToMostUncertain()
        self.widget.onShowPlot()
        self.widget.onShowPlot()
        self.assertEqual(slicer.mrmlScene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems(), 1)
        self.widget.onCopyVolumes()
        import qt

        self.assertTrue(qt.QApplication.clipboard().text().startswith("Side\tStructure"))

    def test_cancel_and_scene_close_leave_nothing_behind(self):
        import os

        self._configure(_volume())
        count = slicer.mrmlScene.GetNumberOfNodes()
        self.widget.ui.applyButton.click()
        self.assertEqual(self.widget.ui.applyButton.text, "Cancel")
        self.widget.ui.applyButton.click()  # at once: the second click of a double-click, not a cancel
        self.assertEqual(self.widget.ui.applyButton.text, "Cancel")
        from CDALSegmentationLib.job_panel import CANCEL_GRACE_SECONDS
        slicer.util.delayDisplay("waiting past the double-click window", int(1000 * CANCEL_GRACE_SECONDS) + 200)
        started = time.time()
        self.widget.ui.applyButton.click()
        self.assertLess(time.time() - started, 1.0, "Cancel blocked the GUI")
        self.assertEqual(self.widget.ui.applyButton.text, "Segment")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.widget.ui.applyButton.click()
        job = self.widget.segmentPanel.job
        slicer.mrmlScene.Clear()  # StartCloseEvent mid-run
        self.assertFalse(self.widget.ui.progressBar.visible)
        self.assertFalse(os.path.exists(job.workDir))
        self.assertEqual(job.state, "cancelled")

    def test_leaving_and_coming_back_keeps_the_choices(self):
        """Each visit connects the widgets anew; the last visit's connection must be gone by then, or its
        combo-box connector resets "Device" to Auto when the new one refills the list (Slicer 5.8's connectGui
        returns no tag to disconnect with)."""
        from CDALSegmentationLib.parameters import Device

        self._configure(_volume())
        self.widget.ui.deviceComboBox.currentIndex = self.widget.ui.deviceComboBox.findText(Device.CPU.label())
        self.assertEqual(self.widget._parameterNode.device, Device.CPU)
        for _ in range(3):
            slicer.util.selectModule("Data")
            slicer.util.selectModule("CDALSegmentation")
        self.assertEqual(self.widget._parameterNode.device, Device.CPU)
        self.assertEqual(self.widget.ui.deviceComboBox.currentText, Device.CPU.label())
        tables = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode")
        self.widget._parameterNode.sliceTable = tables
        slicer.mrmlScene.StartState(slicer.mrmlScene.BatchProcessState)  # as loading a scene or DICOM does
        slicer.mrmlScene.EndState(slicer.mrmlScene.BatchProcessState)
        self.assertIs(self.widget.ui.sliceTableView.mrmlTableNode(), tables)

    def _loadPng(self, pixels, name):
        """A PNG read by Slicer's own reader (one slice; RGB becomes a vector volume)."""
        import os
        import tempfile

        import SimpleITK as sitk

        path = os.path.join(tempfile.mkdtemp(prefix="cdal-png-"), name + ".png")
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3), path)
        return slicer.util.loadVolume(path, {"singleFile": True, "name": name})

    def test_png_segments_with_a_2d_model_and_rgb_is_offered_then_refused(self):
        if "cxr" not in libLogic.listModels():
            self.skipTest("the cxr model is not installed")
        yy, xx = np.mgrid[:96, :120]
        lungs = sum(((yy - 48) / 33.0) ** 2 + ((xx - cx) / 21.0) ** 2 <= 1 for cx in (36, 84))
        grey = self._loadPng((200 - 120 * lungs).astype(np.uint8), "chest")
        self.assertEqual(grey.GetImageData().GetDimensions(), (120, 96, 1))
        self._configure(grey, "cxr")
        self.widget.ui.applyButton.click()
        self.assertTrue(_waitFor(lambda: not self.widget.segmentPanel.running), "segmentation did not finish")
        p = self.widget._parameterNode
        self.assertIsNotNone(p.segmentation)
        self.assertEqual(p.uncertainty.GetImageData().GetDimensions(), (120, 96, 1))
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetBackgroundVolumeID(), grey.GetID())
        rgb = self._loadPng(np.stack([lungs * 200, lungs * 50, 90 + 0 * lungs], -1).astype(np.uint8), "tile")
        self.assertTrue(rgb.IsA("vtkMRMLVectorVolumeNode"))
        self.widget.ui.inputSelector.setCurrentNode(rgb)
        self.assertEqual(self.widget.ui.inputSelector.currentNode(), rgb, "RGB images must be offered as inputs")
        self.assertEqual(p.inputVolume, rgb)
        with self.assertRaises(libLogic.CDALError):
            self.widget.logic.prepareInput(rgb, model="cxr")
