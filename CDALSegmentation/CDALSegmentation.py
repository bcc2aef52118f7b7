"""CDAL Segmentation: 3D Slicer module for fast MRI segmentation with uncertainty (cDAL).

This file only declares the module; the widget, logic, parameters, dependency installation and job handling
live in the CDALSegmentationLib package (the logic is Qt-free and tested with PyPI's slicer-core).
Python 3.9 compatible (Slicer 5.6/5.8).
"""
import os
import sys

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, \
    ScriptedLoadableModuleWidget

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

from CDALSegmentationLib.paths import ensureCoreOnPath  # noqa: E402

ensureCoreOnPath()  # source tree (<repo>/cdal_core) or installed next to this file

from CDALSegmentationLib.widget import CDALSegmentationLogic, CDALSegmentationWidgetMixin  # noqa: E402,F401

LIB_SUBMODULES = ["paths", "geometry", "jobs", "qt_process", "segment_worker", "finetune", "finetune_worker",
                  "logic", "dependencies", "job_panel", "parameters", "widget"]


class CDALSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CDAL Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CDALSegmentation developers"]
        self.parent.helpText = (
            "Segment MRI with cDAL (conditional diffusion with discriminator attention) in seconds, and review "
            "where the result is uncertain: per-voxel ensemble variance and discriminator attention overlays, an "
            "uncertainty-per-slice table that jumps to a slice when clicked, and volumes per side. A whole-brain "
            "volume is localised automatically; an ROI restricts the search. Correct results in Segment Editor "
            "and fine-tune the model on them from the Fine-tune section (runs in the background).")
        self.parent.acknowledgementText = (
            "Based on Zbinden et al., cDAL (conditional diffusion with discriminator attention). The hippocampus "
            "model was trained on the Medical Segmentation Decathlon Task04 (CC-BY-SA 4.0).")


class CDALSegmentationWidget(ScriptedLoadableModuleWidget, CDALSegmentationWidgetMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CDALSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.setupWidget(uiWidget)

    def cleanup(self):
        self.cleanupWidget()

    def enter(self):
        self.initializeParameterNode()
        self.refreshModels()
        self.refreshTrainingList()

    def exit(self):
        self.setParameterNode(None)

    def onReload(self):
        # reload the Lib package too (Slicer's Reload only re-reads this file)
        import importlib

        for name in LIB_SUBMODULES:
            module = sys.modules.get("CDALSegmentationLib." + name)
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)


class CDALSegmentationTest(ScriptedLoadableModuleTest):
    """The "Reload and Test" hook: runs Testing/desktop/desktop_tests.py of the source tree (logic on real MRML,
    the background job over qt.QProcess, and the widget); Testing/run_tests.py runs the same tests."""

    def runTest(self):
        import unittest

        # ctest runs this module from the build tree (SlicerMacroPythonTesting.cmake's --additional-module-paths),
        # so CMakeLists.txt names the source tree in CDAL_SOURCE_DIR
        root = os.environ.get("CDAL_SOURCE_DIR") or os.path.dirname(_MODULE_DIR)
        testing = os.path.join(root, "Testing", "desktop")
        if not os.path.isfile(os.path.join(testing, "desktop_tests.py")):
            # under ctest (--testing) a test that finds nothing to run must fail, not pass
            self.assertFalse(slicer.app.testingEnabled(),
                             "Testing/desktop/desktop_tests.py is not under %s: set CDAL_SOURCE_DIR to the source "
                             "tree" % root)
            self.delayDisplay("The desktop tests ship with the source tree only (Testing/desktop).")
            return
        if testing not in sys.path:
            sys.path.insert(0, testing)
        import desktop_tests

        suite = unittest.defaultTestLoader.loadTestsFromModule(desktop_tests)
        result = unittest.TextTestRunner(verbosity=2).run(suite)
        self.assertTrue(result.wasSuccessful(), "desktop tests failed")
        # skipped tests count as run: every one skipped (no torch, no model installed) must not read as a pass
        self.assertLess(len(result.skipped), result.testsRun, "every desktop test was skipped (%s)"
                        % (result.skipped[0][1] if result.skipped else ""))
