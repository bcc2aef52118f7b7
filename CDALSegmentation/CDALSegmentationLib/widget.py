"""The module's GUI: a thin layer over the Qt-free logic (desktop Slicer only: qt, slicer.util, parameter node).

Segment and Fine-tune each run a child process (qt.QProcess) shown by one JobPanel; results, jumps and overlays
follow the volume that was segmented (a node reference on every output), never the input selector.
"""
import contextlib
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
from slicer.util import VTKObservationMixin

from . import logic as libLogic
from .dependencies import slicerInstaller
from .job_panel import JobPanel
from .jobs import formatDuration
from .parameters import CDALSegmentationParameterNode
from .qt_process import QtProcessRunner
from cdal_core.errors import CDALError

TITLE = "CDAL Segmentation"


def showError(exc):
    """One message box for an exception caught in a slot: a CDALError is the user's to fix and says how, so it
    comes alone; anything else is unexpected, so its traceback goes under "Show Details" for a bug report."""
    if isinstance(exc, CDALError):
        slicer.util.errorDisplay(str(exc), windowTitle=TITLE)
        return
    import traceback

    slicer.util.errorDisplay("%s: %s" % (type(exc).__name__, exc), windowTitle=TITLE,
                             detailedText=traceback.format_exc())


class CDALSegmentationLogic(ScriptedLoadableModuleLogic, libLogic.CDALSegmentationLogic):
    """Slicer's logic base (parameter node) + the Qt-free logic, running children on qt.QProcess."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        libLogic.CDALSegmentationLogic.__init__(self, runnerFactory=QtProcessRunner)
        self.baseEnvironment = slicer.util.startupEnvironment()

    def getParameterNode(self):
        return CDALSegmentationParameterNode(super().getParameterNode())


@contextlib.contextmanager
def waitCursor():
    """Wait cursor for work only: restored before any dialog opens."""
    slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    finally:
        slicer.app.restoreOverrideCursor()


class CDALSegmentationWidgetMixin(VTKObservationMixin):
    """Everything of the module widget except ScriptedLoadableModuleWidget itself (see CDALSegmentation.py)."""

    def setupWidget(self, uiWidget):
        VTKObservationMixin.__init__(self)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CDALSegmentationLogic()
        self._parameterNode = self._guiTag = self._overlayState = None
        self._extraModelFolders = []
        self._modelSummaries = {}  # model folder -> (line, tooltip) from its card, read when the list is filled
        self.installer = slicerInstaller(onBusyChanged=lambda busy: self.updateButtons())
        self.segmentPanel = JobPanel(self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel, "Segment",
                                     onFinished=self.onSegmentationFinished, onChanged=self.updateButtons)
        self.fineTunePanel = JobPanel(self.ui.fineTuneButton, self.ui.fineTuneProgressBar,
                                      self.ui.fineTuneStatusLabel, "Fine-tune", "Cancel fine-tuning",
                                      onFinished=self.onFineTuneFinished, onChanged=self.updateButtons)
        for view in (self.ui.sliceTableView, self.ui.volumeTableView):
            view.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
            view.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        self._sceneTimer = qt.QTimer()  # coalesces bursts of node added/removed events
        self._sceneTimer.setSingleShot(True)
        self._sceneTimer.setInterval(300)
        self._sceneTimer.connect("timeout()", self.onSceneNodesChanged)
        self._connectSignals()
        self.refreshModels()
        self.initializeParameterNode()
        self.onSceneNodesChanged()

    def _connectSignals(self):
        scene = slicer.mrmlScene
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(scene, scene.NodeAddedEvent, lambda caller, event: self._sceneTimer.start())
        self.addObserver(scene, scene.NodeRemovedEvent, lambda caller, event: self._sceneTimer.start())
        for button, slot in ((self.ui.applyButton, self.onApplyButton), (self.ui.loadModelButton, self.onLoadModel),
                             (self.ui.mostUncertainButton, self.onJumpToMostUncertain),
                             (self.ui.plotButton, self.onShowPlot), (self.ui.fineTuneButton, self.onFineTuneButton),
                             (self.ui.copyVolumesButton, self.onCopyVolumes),
                             (self.ui.jumpLeftButton, lambda: self.jumpToSide("left")),
                             (self.ui.jumpRightButton, lambda: self.jumpToSide("right"))):
            button.connect("clicked()", slot)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", lambda on: self._exclusive(on, "showAttention"))
        self.ui.showAttentionCheckBox.connect("toggled(bool)", lambda on: self._exclusive(on, "showUncertainty"))
        self.ui.sliceTableView.connect("clicked(QModelIndex)", self.onSliceTableClicked)
        self.ui.trainingListWidget.connect("itemChanged(QListWidgetItem*)", lambda item: self.updateButtons())

    def cleanupWidget(self):
        self.segmentPanel.abort()
        self.fineTunePanel.abort()
        self._sceneTimer.stop()
        self.setParameterNode(None)  # removes the parameter node's observer and GUI connection
        self.removeObservers()  # then the scene observers, once

    # ---- scene and parameter node ------------------------------------------------------------------------
    def onSceneStartClose(self, caller, event):
        self.segmentPanel.abort()  # kill the child, remove its temp folder, hide the progress bar
        self.fineTunePanel.abort()
        self.setParameterNode(None)
        self._overlayState = None  # it holds the closing scene's volumes: let them go now

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            hidden = set(self.logic.outputVolumeIDs(slicer.mrmlScene))
            volumes = [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if v.GetID() not in hidden and not v.IsA("vtkMRMLLabelMapVolumeNode")]
            if volumes:
                self._parameterNode.inputVolume = volumes[0]

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            if self._guiTag is not None:
                self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode, self._guiTag = parameterNode, None
        if parameterNode is None:  # e.g. the scene closes: its tables go with it
            self.ui.sliceTableView.setMRMLTableNode(None)
            self.ui.volumeTableView.setMRMLTableNode(None)
        else:
            # connectGui returns no tag in Slicer 5.8 (Slicer PR #8667), so its widgets could never be
            # disconnected: each enter() would stack another connection, and a stale combo-box connector resets
            # the device choice. connectParametersToGui does the same mapping and returns the tag.
            self._guiTag = parameterNode.connectParametersToGui(self._parameterWidgets())
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.selectModel(parameterNode.model)
            self.onParameterNodeModified()
        self.updateButtons()

    def _parameterWidgets(self):
        """{parameter name: widget} for every widget of the .ui that names a parameter (as connectGui finds them)."""
        widgets = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                widgets[name] = widget
        return widgets

    def onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        for view, table in ((self.ui.sliceTableView, p.sliceTable), (self.ui.volumeTableView, p.volumeTable)):
            if view.mrmlTableNode() != table:  # setting it rebuilds the whole table model; not on every slider step
                view.setMRMLTableNode(table)
        self.updateOverlays()
        self.updateButtons()

    def onSceneNodesChanged(self):
        self.ui.inputSelector.sortFilterProxyModel().hiddenNodeIDs = self.logic.outputVolumeIDs(slicer.mrmlScene)
        self.refreshTrainingList()

    def updateButtons(self):
        p, busy = self._parameterNode, self.installer.busy
        segmenting = self.segmentPanel.running
        self.ui.applyButton.enabled = segmenting or (not busy and bool(p and p.inputVolume and self.currentModel()))
        self.ui.inputSelector.enabled = not segmenting  # results belong to the volume being segmented
        self.ui.roiSelector.enabled = not segmenting
        slices = p.sliceTable.GetNumberOfRows() if p and p.sliceTable else 0
        for button in (self.ui.mostUncertainButton, self.ui.plotButton):
            button.enabled = slices > 1  # a 2D image's one row has nothing to rank or plot
        self.ui.copyVolumesButton.enabled = bool(p and p.volumeTable)
        for side, button in (("left", self.ui.jumpLeftButton), ("right", self.ui.jumpRightButton)):
            button.enabled = bool(p and self.logic.centreRAS(p.volumeTable, side))
        self.ui.fineTuneButton.enabled = self.fineTunePanel.running or (
            not busy and bool(self.checkedTrainingPairs()) and bool(self.currentModel()))

    # ---- models ------------------------------------------------------------------------------------------
    def refreshModels(self):
        combo, current = self.ui.modelComboBox, self.currentModel()
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self._modelSummaries = {}
        for label, path in libLogic.modelEntries(self._extraModelFolders):
            self._modelSummaries[path] = libLogic.modelSummary(path)
            combo.addItem(label, path)
            combo.setItemData(combo.count - 1, self._modelSummaries[path][1], qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        self.selectModel(current or (self._parameterNode.model if self._parameterNode else libLogic.DEFAULT_MODEL))
        if not combo.count:
            self.ui.statusLabel.text = "No model installed: use 'Load model folder...' (looked in %s and %s)." % (
                libLogic.shippedModelsDir(), libLogic.userModelsDir())

    def selectModel(self, nameOrPath):
        combo = self.ui.modelComboBox
        paths = [combo.itemData(i) for i in range(combo.count)]
        matches = [i for i, path in enumerate(paths) if nameOrPath in (path, libLogic.modelParameterValue(path))]
        default = [i for i, path in enumerate(paths) if libLogic.modelParameterValue(path) == libLogic.DEFAULT_MODEL]
        wasBlocked = combo.blockSignals(True)
        # a scene saved elsewhere may name a model not installed here: fall back to the default model, not to
        # whichever sorts first (cxr), and say so
        combo.currentIndex = (matches or default or [0 if paths else -1])[0]
        combo.blockSignals(wasBlocked)
        self.showModelSummary()
        if nameOrPath and not matches and paths:
            self.ui.statusLabel.text = "Model '%s' is not installed here: using %s." % (
                nameOrPath, combo.currentText)

    def showModelSummary(self):
        line, tooltip = self._modelSummaries.get(self.currentModel(), ("", ""))
        self.ui.modelInfoLabel.text = line
        self.ui.modelInfoLabel.toolTip = tooltip

    def currentModel(self):
        combo = self.ui.modelComboBox
        return (combo.itemData(combo.currentIndex) or "") if combo.currentIndex >= 0 else ""

    def onModelChanged(self, index):
        if self._parameterNode is not None and self.currentModel():
            self._parameterNode.model = libLogic.modelParameterValue(self.currentModel())
        self.showModelSummary()
        self.updateButtons()

    def onLoadModel(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a cDAL model folder")
        if not folder:
            return
        try:
            libLogic.readModelCard(libLogic.resolveModelPath(folder))
        except CDALError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=TITLE)
            return
        if folder not in self._extraModelFolders:
            self._extraModelFolders.append(folder)
        self.refreshModels()
        self.selectModel(folder)
        self.onModelChanged(self.ui.modelComboBox.currentIndex)

    # ---- segmentation ------------------------------------------------------------------------------------
    def _startJob(self, panel, start):
        """Install what is missing, then start a job (wait cursor only while starting; errors after it)."""
        if self.installer.busy:
            return
        try:
            if not self.installer.ensure():  # pip / PyTorchUtils raise on a failed install
                return
            with waitCursor():
                job = start()
        except Exception as exc:  # CDALError: the user's to fix; anything else is shown too, not only logged
            showError(exc)
            return
        panel.start(job)

    def onApplyButton(self):
        if self.segmentPanel.running:
            self.segmentPanel.cancel()
            return
        p = self._parameterNode
        self._startJob(self.segmentPanel, lambda: self.logic.startSegmentation(
            p.inputVolume, model=self.currentModel(), roiNode=p.roi, samples=p.samples, steps=p.steps or None,
            seed=None if p.seed < 0 else p.seed, device=p.device.value))

    def onSegmentationFinished(self, job):
        if job.state == "failed":
            slicer.util.errorDisplay("Segmentation failed: %s" % job.error, windowTitle=TITLE,
                                     detailedText="\n".join(job.logLines[-40:]))
        if job.state != "done":
            self.ui.statusLabel.text = job.statusText() + " - nothing was added to the scene."
            return
        try:
            with waitCursor():
                result = self.logic.finishSegmentation(job)
        except Exception as exc:  # CDALError: the user's to fix; anything else (e.g. MemoryError) is shown too
            self.ui.statusLabel.text = "Failed - nothing was added to the scene."
            showError(exc)
            return
        self.showResult(result)
        self.ui.statusLabel.text = "Done in %s (%s) on %s.%s" % (
            formatDuration(job.elapsedSeconds()), result.modelName, job.volumeNode.GetName(),
            "".join("\n" + note for note in result.notes))

    def showResult(self, result):
        p = self._parameterNode or self.logic.getParameterNode()  # the module may have been left while it ran
        with slicer.util.NodeModify(p):
            p.segmentation, p.uncertainty, p.attention = (result.segmentationNode, result.uncertaintyNode,
                                                          result.attentionNode)
            p.sliceTable, p.volumeTable = result.sliceTableNode, result.volumeTableNode
        result.segmentationNode.CreateClosedSurfaceRepresentation()
        self.updateOverlays(fit=True)

    # ---- review ------------------------------------------------------------------------------------------
    def _exclusive(self, checked, other):
        if checked and self._parameterNode is not None:
            setattr(self._parameterNode, other, False)  # one foreground layer: the two maps are exclusive

    def updateOverlays(self, fit=False):
        p = self._parameterNode or self.logic.getParameterNode()
        background, foreground = self.logic.overlayLayers(p.uncertainty, p.attention, p.showUncertainty,
                                                          p.showAttention)
        state = (background, foreground, round(p.overlayOpacity, 3))
        if state == self._overlayState and not fit:
            return  # another parameter changed: leave the user's view alone
        self._overlayState = state
        if background is not None:
            slicer.util.setSliceViewerLayers(background=background, foreground=foreground,
                                             foregroundOpacity=p.overlayOpacity, fit=fit)

    def jumpTo(self, where, what):
        """``where()`` gives the RAS point (or None: nothing to jump to). A result whose volume was deleted
        since cannot be jumped in: the status line says so instead of a silent click."""
        try:
            ras = where()
        except CDALError as exc:
            self.ui.statusLabel.text = str(exc)
            return
        if ras is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)
            self.ui.statusLabel.text = what

    def onSliceTableClicked(self, index):
        table = self._parameterNode.sliceTable if self._parameterNode else None
        if table is None or not index.isValid():
            return
        k = int(float(index.sibling(index.row(), 0).data()))
        self.jumpTo(lambda: self.logic.sliceJumpRAS(table, k), "Slice %d" % k)

    def onJumpToMostUncertain(self):
        table = self._parameterNode.sliceTable
        k = self.logic.mostUncertainSlice(table)
        if k is not None:
            self.jumpTo(lambda: self.logic.sliceJumpRAS(table, k), "Most uncertain slice: %d" % k)

    def jumpToSide(self, side):
        self.jumpTo(lambda: self.logic.centreRAS(self._parameterNode.volumeTable, side),
                    "%s hippocampus" % side.capitalize())

    def onShowPlot(self):
        slicer.modules.plots.logic().ShowChartInLayout(self.logic.slicePlot(self._parameterNode.sliceTable))

    def onCopyVolumes(self):
        qt.QApplication.clipboard().setText(libLogic.tableAsTSV(self._parameterNode.volumeTable))
        self.ui.statusLabel.text = "Volume table copied (tab-separated)."

    # ---- fine-tuning -------------------------------------------------------------------------------------
    def refreshTrainingList(self):
        listWidget, checked = self.ui.trainingListWidget, set(self._checkedSegmentationIDs())
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
        items = [self.ui.trainingListWidget.item(i) for i in range(self.ui.trainingListWidget.count)]
        return [item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked]

    def checkedTrainingPairs(self):
        ids = set(self._checkedSegmentationIDs())
        return [(v, s) for v, s in self.logic.trainingPairs(slicer.mrmlScene) if s.GetID() in ids]

    def onFineTuneButton(self):
        if self.fineTunePanel.running:
            if slicer.util.confirmYesNoDisplay("Stop fine-tuning? The partly trained model is discarded."):
                self.fineTunePanel.cancel()
            return
        p = self._parameterNode
        self._startJob(self.fineTunePanel, lambda: self.logic.startFineTune(
            self.checkedTrainingPairs(), baseModel=self.currentModel(), newModelName=p.fineTuneName or None,
            maxSteps=p.fineTuneSteps, maxMinutes=p.fineTuneMinutes or None, device=p.fineTuneDevice.value,
            keepData=p.keepTrainingData))

    def onFineTuneFinished(self, job):
        warnings = "".join("\n" + w for w in job.warnings)
        if job.state == "failed":
            slicer.util.errorDisplay("Fine-tuning failed: %s" % job.error, windowTitle=TITLE,
                                     detailedText="\n".join(job.logLines[-60:]))
        if job.state != "done" or not job.modelPath:
            self.ui.fineTuneStatusLabel.text = job.statusText() + " - no model was added." + warnings
            return
        name = os.path.basename(job.modelPath)
        self.refreshModels()
        self.ui.fineTuneStatusLabel.text = "Fine-tuned model '%s' saved in %s (%s).%s" % (
            name, os.path.dirname(job.modelPath), formatDuration(job.elapsedSeconds()), warnings)
        if slicer.util.confirmYesNoDisplay("Fine-tuning finished. Use the new model '%s' now?" % name,
                                           windowTitle=TITLE):
            self.selectModel(job.modelPath)
            self.onModelChanged(self.ui.modelComboBox.currentIndex)
