"""CDAL Segmentation: 3D Slicer module for fast MRI segmentation with uncertainty (cDAL).

The widget is a thin GUI over the Qt-free ``CDALSegmentationLib`` (also tested with PyPI's slicer-core).
Heavy work runs in child processes polled by a qt.QTimer; MRML is only touched on the GUI thread.
Python 3.9 compatible (no ``X | Y`` types, no ``match``).
"""
import logging
import os
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

from CDALSegmentationLib.paths import ensureCoreOnPath  # noqa: E402

ensureCoreOnPath()  # source tree (<repo>/cdal_core) or installed next to this file

from CDALSegmentationLib import logic as libLogic  # noqa: E402
from CDALSegmentationLib.jobs import formatDuration  # noqa: E402
from cdal_core.errors import CDALError  # noqa: E402

DEVICES = ["auto", "cpu", "cuda"]  # order of the device combo boxes
REQUIRED_PACKAGES = [("torch", None), ("monai", "monai"), ("safetensors", "safetensors"), ("tqdm", "tqdm")]


#
# Module
#
class CDALSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CDAL Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CDALSegmentation developers"]
        self.parent.helpText = (
            "Segment MRI with cDAL (conditional diffusion with discriminator attention) in seconds, and review "
            "where the result is uncertain: per-voxel ensemble variance and discriminator attention overlays, plus "
            "an uncertainty-per-slice table that jumps to a slice when clicked. Correct results in Segment Editor "
            "and fine-tune the model on them from the Fine-tune section (runs on your GPU in the background).")
        self.parent.acknowledgementText = (
            "Based on Zbinden et al., cDAL (conditional diffusion with discriminator attention). The hippocampus "
            "model was trained on the Medical Segmentation Decathlon Task04 (CC-BY-SA 4.0).")


#
# Parameter node
#
@parameterNodeWrapper
class CDALSegmentationParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    model: str = libLogic.DEFAULT_MODEL
    steps: Annotated[int, WithinRange(0, 16)] = 0
    samples: Annotated[int, WithinRange(1, 32)] = 5
    seed: Annotated[int, WithinRange(-1, 2147483647)] = -1
    device: str = "auto"
    showUncertainty: bool = True
    showAttention: bool = False
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    segmentation: vtkMRMLSegmentationNode
    uncertainty: vtkMRMLScalarVolumeNode
    attention: vtkMRMLScalarVolumeNode
    sliceTable: vtkMRMLTableNode
    fineTuneSteps: Annotated[int, WithinRange(1, 100000)] = 300
    fineTuneMinutes: Annotated[float, WithinRange(0.0, 1440.0)] = 30.0
    fineTuneDevice: str = "auto"
    fineTuneName: str = ""


#
# Dependencies (installed only after the user agrees)
#
def missingPackages():
    import importlib.util

    return [name for name, _ in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def ensureDependencies(askConfirmation=True):
    """True when torch/MONAI/safetensors import; otherwise offer to install them (PyTorchUtils for torch)."""
    missing = missingPackages()
    if not missing:
        return True
    message = ("CDAL Segmentation needs these Python packages: %s.\n\nPyTorch is installed with the PyTorch "
               "extension (it picks the build matching your GPU/CUDA); the others with pip. This downloads up to a "
               "few GB and can take several minutes.\n\nInstall now?" % ", ".join(missing))
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(message, "CDAL Segmentation: install packages"):
        return False
    with slicer.util.tryWithErrorDisplay("Installing Python packages failed.", waitCursor=True):
        if "torch" in missing:
            try:
                import PyTorchUtils  # from the PyTorch extension (declared as extension dependency)
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if not torchLogic.torchInstalled():
                    torchLogic.installTorch(askConfirmation=False)
            else:
                slicer.util.pip_install("torch")
        others = [pipName for name, pipName in REQUIRED_PACKAGES if pipName and name in missing]
        if others:
            slicer.util.pip_install(" ".join(others))
    still = missingPackages()
    if still:
        slicer.util.errorDisplay("Could not install: %s. Restart Slicer and try again, or install them from the "
                                 "Python console with slicer.util.pip_install()." % ", ".join(still))
        return False
    return True


#
# Widget
#
class CDALSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmentationJob = None
        self._fineTuneJob = None
        self._extraModelFolders = []
        self._updatingModels = False
        self._lastOverlayState = None

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CDALSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CDALSegmentationLogic()
        self.logic.core.baseEnvironment = slicer.util.startupEnvironment()

        self.ui.progressBar.setVisible(False)
        self.ui.fineTuneProgressBar.setVisible(False)
        self.ui.sliceTableView.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.sliceTableView.setSelectionMode(qt.QAbstractItemView.SingleSelection)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelFolder)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.fineTuneDeviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", self.onShowUncertaintyToggled)
        self.ui.showAttentionCheckBox.connect("toggled(bool)", self.onShowAttentionToggled)
        self.ui.sliceTableView.connect("clicked(QModelIndex)", self.onSliceTableClicked)
        self.ui.mostUncertainButton.connect("clicked(bool)", self.onJumpToMostUncertain)
        self.ui.plotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTuneButton)
        self.ui.trainingListWidget.connect("itemChanged(QListWidgetItem*)", lambda item: self.updateButtons())

        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self.onTimer)
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(300)
        self._refreshTimer.connect("timeout()", self.refreshTrainingList)

        self.refreshModels()
        self.initializeParameterNode()
        self.refreshTrainingList()

    def cleanup(self):
        for job in (self._segmentationJob, self._fineTuneJob):
            if job is not None and job.running:
                job.cancel()
        if self._segmentationJob is not None:
            self._segmentationJob.cleanup()
        self.timer.stop()
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self):
        self.initializeParameterNode()
        self.refreshModels()
        self.refreshTrainingList()

    def exit(self):
        self._disconnectParameterNode()

    # ---- parameter node ------------------------------------------------------------------------------------
    def onSceneStartClose(self, caller, event):
        if self._segmentationJob is not None and self._segmentationJob.running:
            self._segmentationJob.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneNodesChanged(self, caller, event):
        self._refreshTimer.start()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def _disconnectParameterNode(self):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def setParameterNode(self, inputParameterNode):
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self._syncCombosFromParameterNode()
        self.updateButtons()

    def onParameterNodeModified(self, caller=None, event=None):
        self.updateButtons()
        table = self._parameterNode.sliceTable if self._parameterNode else None
        if self.ui.sliceTableView.mrmlTableNode() is not table:
            self.ui.sliceTableView.setMRMLTableNode(table)
        if self._overlayState() != self._lastOverlayState:
            self.updateOverlays()  # overlay toggles / opacity / result nodes changed (GUI writes the parameters)

    def _syncCombosFromParameterNode(self):
        p = self._parameterNode
        self._selectModelInCombo(p.model)
        for combo, value in ((self.ui.deviceComboBox, p.device), (self.ui.fineTuneDeviceComboBox, p.fineTuneDevice)):
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = DEVICES.index(value) if value in DEVICES else 0
            combo.blockSignals(wasBlocked)

    def onDeviceChanged(self, index):
        if self._parameterNode:
            self._parameterNode.device = DEVICES[max(0, self.ui.deviceComboBox.currentIndex)]
            self._parameterNode.fineTuneDevice = DEVICES[max(0, self.ui.fineTuneDeviceComboBox.currentIndex)]

    def updateButtons(self):
        p = self._parameterNode
        segRunning = self._segmentationJob is not None and self._segmentationJob.running
        ftRunning = self._fineTuneJob is not None and self._fineTuneJob.running
        if segRunning:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running segmentation (nothing is added to the scene)."
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = "Segment"
            hasInput = bool(p and p.inputVolume)
            hasModel = self.ui.modelComboBox.currentIndex >= 0 and bool(self.currentModelPath())
            self.ui.applyButton.enabled = hasInput and hasModel
            self.ui.applyButton.toolTip = ("Segment the input volume." if hasInput and hasModel else
                                           "Select an input volume and a model first.")
        hasTable = bool(p and p.sliceTable)
        self.ui.mostUncertainButton.enabled = hasTable
        self.ui.plotButton.enabled = hasTable
        if ftRunning:
            self.ui.fineTuneButton.text = "Cancel fine-tuning"
            self.ui.fineTuneButton.enabled = True
        else:
            self.ui.fineTuneButton.text = "Fine-tune"
            self.ui.fineTuneButton.enabled = bool(self.checkedTrainingPairs()) and bool(self.currentModelPath())

    # ---- models ---------------------------------------------------------------------------------------------
    def refreshModels(self):
        """Fill the model combo box: shipped, fine-tuned (per-user) and loaded folders."""
        combo = self.ui.modelComboBox
        current = self.currentModelPath()
        self._updatingModels = True
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            entries = []
            for name, path in sorted(libLogic.listModels().items()):
                kind = libLogic.modelKind(path)
                label = name if kind == "shipped" else "%s (fine-tuned)" % name
                entries.append((0 if kind == "shipped" else 1, label, path))
            for path in self._extraModelFolders:
                entries.append((2, "%s (folder)" % os.path.basename(path.rstrip("/\\")), path))
            for _, label, path in sorted(entries):
                combo.addItem(label, path)
                combo.setItemData(combo.count - 1, path, qt.Qt.ToolTipRole)
        finally:
            combo.blockSignals(wasBlocked)
            self._updatingModels = False
        target = current or (self._parameterNode.model if self._parameterNode else libLogic.DEFAULT_MODEL)
        self._selectModelInCombo(target)
        self.updateButtons()

    def _selectModelInCombo(self, nameOrPath):
        combo = self.ui.modelComboBox
        index = -1
        for i in range(combo.count):
            path = combo.itemData(i)
            if path == nameOrPath or os.path.basename(str(path).rstrip("/\\")) == nameOrPath:
                index = i
                break
        if index < 0 and combo.count > 0:
            index = 0
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)
        self.updateButtons()
        if not combo.count:
            self.ui.statusLabel.text = ("No model installed: use 'Load model folder...' or reinstall the extension "
                                        "(models are looked up in %s and %s)."
                                        % (libLogic.shippedModelsDir(), libLogic.userModelsDir()))

    def currentModelPath(self):
        combo = self.ui.modelComboBox
        if combo.currentIndex < 0:
            return ""
        return combo.itemData(combo.currentIndex) or ""

    def onModelChanged(self, index):
        if self._updatingModels or not self._parameterNode:
            return
        path = self.currentModelPath()
        kind = libLogic.modelKind(path) if path else ""
        self._parameterNode.model = os.path.basename(path.rstrip("/\\")) if kind in ("shipped", "user") else path
        self.updateButtons()

    def onLoadModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a cDAL model folder")
        if not folder:
            return
        try:
            libLogic.readModelCard(libLogic.resolveModelPath(folder))
        except CDALError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        if folder not in self._extraModelFolders:
            self._extraModelFolders.append(folder)
        self.refreshModels()
        self._selectModelInCombo(folder)
        self.onModelChanged(self.ui.modelComboBox.currentIndex)

    # ---- segmentation ---------------------------------------------------------------------------------------
    def onApplyButton(self):
        if self._segmentationJob is not None and self._segmentationJob.running:
            self._segmentationJob.cancel()
            self._finishSegmentationJob()
            return
        if not ensureDependencies():
            return
        p = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
                try:
                    self._segmentationJob = self.logic.startSegmentation(
                        p.inputVolume, model=self.currentModelPath(), roiNode=p.roi, samples=p.samples,
                        steps=p.steps or None, seed=None if p.seed < 0 else p.seed,
                        device=DEVICES[max(0, self.ui.deviceComboBox.currentIndex)])
                except libLogic.VolumeTooLargeError as exc:
                    self.offerROI(str(exc))
                    return
                except CDALError as exc:
                    slicer.util.errorDisplay(str(exc), windowTitle="CDAL Segmentation")
                    return
        finally:
            self.updateButtons()
        if self._segmentationJob is None:
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = "Starting..."
        self.timer.start()
        self.updateButtons()

    def offerROI(self, message):
        p = self._parameterNode
        if p.roi is not None:
            slicer.util.errorDisplay(message, windowTitle="CDAL Segmentation")
            return
        if not slicer.util.confirmYesNoDisplay(message + "\n\nPlace an ROI box now? Move it around the structure, "
                                               "then click Segment again.", windowTitle="CDAL Segmentation"):
            return
        volume = p.inputVolume
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode",
                                                 slicer.mrmlScene.GenerateUniqueName("CDAL ROI"))
        roi.SetCenter([(bounds[0] + bounds[1]) / 2.0, (bounds[2] + bounds[3]) / 2.0, (bounds[4] + bounds[5]) / 2.0])
        roi.SetSize([(bounds[1] - bounds[0]) / 3.0, (bounds[3] - bounds[2]) / 3.0, (bounds[5] - bounds[4]) / 3.0])
        p.roi = roi
        self.ui.statusLabel.text = "Adjust the ROI box in the views, then click Segment."

    def onTimer(self):
        for job, bar, label in ((self._segmentationJob, self.ui.progressBar, self.ui.statusLabel),
                                (self._fineTuneJob, self.ui.fineTuneProgressBar, self.ui.fineTuneStatusLabel)):
            if job is None or not job.running:
                continue
            job.poll()
            bar.value = int(round(100 * job.fraction))
            label.text = job.statusText()
            if job.finished:
                if job is self._segmentationJob:
                    self._finishSegmentationJob()
                else:
                    self._finishFineTuneJob()
        if not any(j is not None and j.running for j in (self._segmentationJob, self._fineTuneJob)):
            self.timer.stop()

    def _finishSegmentationJob(self):
        job = self._segmentationJob
        self.ui.progressBar.setVisible(False)
        try:
            if job.state == "done":
                with slicer.util.tryWithErrorDisplay("Could not create the results.", waitCursor=True):
                    try:
                        result = self.logic.finishSegmentation(job)
                    except CDALError as exc:
                        slicer.util.errorDisplay(str(exc), windowTitle="CDAL Segmentation")
                        result = None
                    if result is not None:
                        self.showResult(result)
                        self.ui.statusLabel.text = "Done in %s (%s)." % (
                            formatDuration(job.elapsedSeconds()), result.modelName)
            elif job.state == "failed":
                self.ui.statusLabel.text = "Failed: %s" % job.error
                slicer.util.errorDisplay("Segmentation failed: %s" % job.error, windowTitle="CDAL Segmentation",
                                         detailedText="\n".join(job.logLines[-40:]))
            else:
                self.ui.statusLabel.text = "Cancelled - nothing was added to the scene."
        finally:
            job.cleanup()
            self._segmentationJob = None
            self.updateButtons()

    def showResult(self, result):
        p = self._parameterNode
        p.segmentation = result.segmentationNode
        p.uncertainty = result.uncertaintyNode
        p.attention = result.attentionNode
        p.sliceTable = result.sliceTableNode
        self.ui.sliceTableView.setMRMLTableNode(result.sliceTableNode)
        result.segmentationNode.CreateClosedSurfaceRepresentation()
        self.updateOverlays(fit=True)

    # ---- overlays and per-slice review ----------------------------------------------------------------------
    def onShowUncertaintyToggled(self, checked):
        # one foreground layer: the two maps are exclusive (the overlay itself updates on parameter change)
        if checked and self.ui.showAttentionCheckBox.checked:
            self.ui.showAttentionCheckBox.checked = False

    def onShowAttentionToggled(self, checked):
        if checked and self.ui.showUncertaintyCheckBox.checked:
            self.ui.showUncertaintyCheckBox.checked = False

    def _overlayState(self):
        p = self._parameterNode
        if not p:
            return None
        ids = [n.GetID() if n else None for n in (p.inputVolume, p.uncertainty, p.attention)]
        return (p.showUncertainty, p.showAttention, round(p.overlayOpacity, 3), tuple(ids))

    def updateOverlays(self, fit=False):
        p = self._parameterNode
        self._lastOverlayState = self._overlayState()
        if not p or not p.inputVolume or not (p.uncertainty or p.attention):
            return
        foreground = None
        if p.showUncertainty and p.uncertainty:
            foreground = p.uncertainty
        elif p.showAttention and p.attention:
            foreground = p.attention
        slicer.util.setSliceViewerLayers(background=p.inputVolume, foreground=foreground,
                                         foregroundOpacity=p.overlayOpacity, fit=fit)

    def onSliceTableClicked(self, index):
        p = self._parameterNode
        if not p or not p.inputVolume or not index.isValid():
            return
        try:
            k = int(float(index.sibling(index.row(), 0).data()))
        except (TypeError, ValueError):
            return
        self.jumpToSlice(k)

    def jumpToSlice(self, k):
        ras = self.logic.sliceCenterRAS(self._parameterNode.inputVolume, k)
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)
        self.ui.statusLabel.text = "Slice %d" % k

    def onJumpToMostUncertain(self):
        table = self._parameterNode.sliceTable
        if table is None:
            return
        mean = slicer.util.arrayFromTableColumn(table, "Mean uncertainty")
        slices = slicer.util.arrayFromTableColumn(table, "Slice")
        if len(mean):
            self.jumpToSlice(int(slices[int(mean.argmax())]))

    def onShowPlot(self):
        table = self._parameterNode.sliceTable
        if table is None:
            return
        chart = self.logic.createSliceUncertaintyPlot(table)
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    # ---- fine-tuning ----------------------------------------------------------------------------------------
    def refreshTrainingList(self):
        listWidget = self.ui.trainingListWidget
        checked = set(self._checkedSegmentationIDs())
        wasBlocked = listWidget.blockSignals(True)
        listWidget.clear()
        for volume, seg in self.logic.trainingPairs(slicer.mrmlScene):
            item = qt.QListWidgetItem("%s  (on %s)" % (seg.GetName(), volume.GetName()))
            item.setData(qt.Qt.UserRole, seg.GetID())
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if seg.GetID() in checked else qt.Qt.Unchecked)
            listWidget.addItem(item)
        listWidget.blockSignals(wasBlocked)
        self.updateButtons()

    def _checkedSegmentationIDs(self):
        ids = []
        listWidget = self.ui.trainingListWidget
        for i in range(listWidget.count):
            item = listWidget.item(i)
            if item.checkState() == qt.Qt.Checked:
                ids.append(item.data(qt.Qt.UserRole))
        return ids

    def checkedTrainingPairs(self):
        ids = set(self._checkedSegmentationIDs())
        return [(v, s) for v, s in self.logic.trainingPairs(slicer.mrmlScene) if s.GetID() in ids]

    def onFineTuneButton(self):
        if self._fineTuneJob is not None and self._fineTuneJob.running:
            if slicer.util.confirmYesNoDisplay("Stop fine-tuning? The partly trained model is discarded."):
                self._fineTuneJob.cancel()
                self._finishFineTuneJob()
            return
        if not ensureDependencies():
            return
        p = self._parameterNode
        device = DEVICES[max(0, self.ui.fineTuneDeviceComboBox.currentIndex)]
        try:
            from CDALSegmentationLib.finetune import fineTuneDevice

            with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
                try:
                    resolved, warning = fineTuneDevice(device)
                    if warning and not slicer.util.confirmOkCancelDisplay(warning + ".\n\nContinue on the CPU?",
                                                                          windowTitle="CDAL fine-tuning"):
                        return
                    self._fineTuneJob = self.logic.startFineTune(
                        self.checkedTrainingPairs(), baseModel=self.currentModelPath(),
                        newModelName=p.fineTuneName or None, maxSteps=p.fineTuneSteps,
                        maxMinutes=p.fineTuneMinutes or None, device=resolved)
                except CDALError as exc:
                    slicer.util.errorDisplay(str(exc), windowTitle="CDAL fine-tuning")
                    return
        finally:
            self.updateButtons()
        if self._fineTuneJob is None:
            return
        others = [w for w in self._fineTuneJob.warnings if "CPU" not in w]
        self.ui.fineTuneStatusLabel.text = "Starting...%s" % (("\n" + "\n".join(others)) if others else "")
        self.ui.fineTuneProgressBar.value = 0
        self.ui.fineTuneProgressBar.setVisible(True)
        self.timer.start()
        self.updateButtons()

    def _finishFineTuneJob(self):
        job = self._fineTuneJob
        self.ui.fineTuneProgressBar.setVisible(False)
        try:
            if job.state == "done" and job.modelPath:
                self.refreshModels()
                name = os.path.basename(job.modelPath)
                self.ui.fineTuneStatusLabel.text = "Fine-tuned model '%s' saved in %s (%s)." % (
                    name, os.path.dirname(job.modelPath), formatDuration(job.elapsedSeconds()))
                if slicer.util.confirmYesNoDisplay("Fine-tuning finished. Use the new model '%s' now?" % name,
                                                   windowTitle="CDAL fine-tuning"):
                    self._selectModelInCombo(job.modelPath)
                    self.onModelChanged(self.ui.modelComboBox.currentIndex)
            elif job.state == "failed":
                self.ui.fineTuneStatusLabel.text = "Failed: %s" % job.error
                slicer.util.errorDisplay("Fine-tuning failed: %s" % job.error, windowTitle="CDAL fine-tuning",
                                         detailedText="\n".join(job.logLines[-60:]))
            else:
                self.ui.fineTuneStatusLabel.text = "Fine-tuning cancelled; no model was added."
        finally:
            self._fineTuneJob = None
            self.updateButtons()


#
# Logic (thin wrapper: the work is done by the Qt-free CDALSegmentationLib.logic.CDALSegmentationLogic)
#
class CDALSegmentationLogic(ScriptedLoadableModuleLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = libLogic.CDALSegmentationLogic()

    def getParameterNode(self):
        return CDALSegmentationParameterNode(super().getParameterNode())

    def __getattr__(self, name):
        # segment, startSegmentation, finishSegmentation, trainingPairs, startFineTune, sliceCenterRAS, ...
        core = self.__dict__.get("core")
        if core is None:
            raise AttributeError(name)
        return getattr(core, name)


#
# Tests (desktop Slicer: run from the Reload & Test button or Testing/run_tests.py)
#
class CDALSegmentationTest(ScriptedLoadableModuleTest):
    """Module tests inside desktop Slicer: logic on real MRML, the background job, and the widget."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_segment_geometry()
        self.setUp()
        self.test_bad_inputs()
        self.setUp()
        self.test_widget_segment_and_cancel()

    # helpers
    def _model(self):
        models = libLogic.listModels()
        if libLogic.DEFAULT_MODEL in models:
            return libLogic.DEFAULT_MODEL
        if models:
            return sorted(models)[0]
        self.skipTest("no cDAL model installed")

    def _volume(self, name="CDAL test volume"):
        import numpy as np

        z, y, x = np.mgrid[0:24, 0:40, 0:32].astype(np.float32)
        blob = ((x - 16) / 7.0) ** 2 + ((y - 20) / 11.0) ** 2 + ((z - 12) / 6.0) ** 2 < 1.0
        array = (np.random.default_rng(0).normal(40, 5, blob.shape) + 100 * blob).astype(np.float32)
        ijkToRAS = np.array([[-1.2, 0, 0, 10], [0, 0.9, 0.1, -5], [0, -0.1, 0.9, 3], [0, 0, 0, 1]])
        node = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name=name)
        return node

    def test_logic_segment_geometry(self):
        import numpy as np

        if missingPackages():
            self.skipTest("missing packages: %s" % missingPackages())
        self.delayDisplay("Segmenting a synthetic volume with the logic")
        volume = self._volume()
        logic = CDALSegmentationLogic()
        result = logic.segment(volume, model=self._model(), samples=2, steps=1, seed=0)
        m = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m)
        for node in (result.uncertaintyNode, result.attentionNode):
            n = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(n)
            self.assertTrue(all(m.GetElement(r, c) == n.GetElement(r, c) for r in range(4) for c in range(4)))
            self.assertEqual(node.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertEqual(result.sliceTableNode.GetNumberOfRows(), volume.GetImageData().GetDimensions()[2])
        unc = slicer.util.arrayFromVolume(result.uncertaintyNode)
        mean = slicer.util.arrayFromTableColumn(result.sliceTableNode, "Mean uncertainty")
        self.assertTrue(np.allclose(mean, unc.reshape(unc.shape[0], -1).mean(1), rtol=1e-5, atol=1e-12))
        card = libLogic.readModelCard(libLogic.resolveModelPath(self._model()))
        names = [c[1] for c in libLogic.foregroundClasses(card)]
        seg = result.segmentationNode.GetSegmentation()
        self.assertEqual([seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())], names)
        self.delayDisplay("Logic test passed")

    def test_bad_inputs(self):
        if missingPackages():
            self.skipTest("missing packages: %s" % missingPackages())
        logic = CDALSegmentationLogic()
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(CDALError):
            logic.segment(None, model=self._model())
        volume = self._volume()
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(CDALError):
            logic.segment(volume, model="no-such-model")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Bad-input test passed")

    def test_widget_segment_and_cancel(self):
        import time

        if missingPackages():
            self.skipTest("missing packages: %s" % missingPackages())
        volume = self._volume()
        slicer.util.selectModule("CDALSegmentation")
        widget = slicer.modules.cdalsegmentation.widgetRepresentation().self()
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.samples = 2
        widget._parameterNode.steps = 1
        widget._parameterNode.seed = 0
        widget.refreshModels()
        widget._selectModelInCombo(self._model())
        self.assertTrue(widget.ui.applyButton.enabled)

        # start and cancel: the button toggles, nothing is added
        count = slicer.mrmlScene.GetNumberOfNodes()
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        slicer.app.processEvents()
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Segment")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

        # full run through the GUI (background process + timer)
        widget.ui.applyButton.click()
        deadline = time.time() + 300
        while widget._segmentationJob is not None and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNone(widget._segmentationJob, "segmentation did not finish in time")
        p = widget._parameterNode
        self.assertIsNotNone(p.segmentation)
        self.assertIsNotNone(p.uncertainty)
        self.assertIsNotNone(p.sliceTable)
        layout = slicer.app.layoutManager()
        composite = layout.sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), p.uncertainty.GetID())
        # clicking a table row jumps to the slice
        widget.jumpToSlice(3)
        widget.onJumpToMostUncertain()
        self.delayDisplay("Widget test passed")
