"""Qt-free logic of the CDALSegmentation module (desktop Slicer and PyPI slicer-core).

Usage::

    from CDALSegmentationLib.logic import CDALSegmentationLogic
    result = CDALSegmentationLogic().segment(volumeNode, model="hippocampus", samples=5)
    result.segmentationNode, result.uncertaintyNode, result.attentionNode, result.sliceTableNode

``segment`` runs in the calling process (scripts, tests). The GUI uses ``startSegmentation`` (a child process
polled with ``job.poll()``) and ``finishSegmentation(job)``, which creates the nodes on the GUI thread.
Every problem the user can fix raises ``cdal_core.errors.CDALError`` with a one-line message, before any node
is created: a failed or cancelled run leaves the scene as it was.
"""
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np

from . import geometry
from .jobs import RUNNING, ProcessJob, pythonModuleCommand
from .paths import ensureCoreOnPath, subprocessEnvironment

ensureCoreOnPath()
from cdal_core.errors import CancelledError, CDALError  # noqa: E402  (pure Python, no torch)

DEFAULT_MODEL = "hippocampus"
#: Volumes with more voxels than this are refused without an ROI (the user is offered to place one).
MAX_VOXELS_WITHOUT_ROI = 40 * 1000 * 1000

# matplotlib's "inferno" at 17 evenly spaced points (used when Slicer's Inferno colour file is unavailable)
_INFERNO = [(0.001, 0.0, 0.014), (0.042, 0.028, 0.141), (0.129, 0.047, 0.291), (0.238, 0.037, 0.396),
            (0.342, 0.062, 0.429), (0.441, 0.099, 0.432), (0.541, 0.135, 0.415), (0.64, 0.171, 0.381),
            (0.736, 0.216, 0.33), (0.822, 0.275, 0.266), (0.894, 0.353, 0.194), (0.947, 0.449, 0.115),
            (0.978, 0.558, 0.035), (0.988, 0.675, 0.065), (0.975, 0.798, 0.206), (0.948, 0.917, 0.411),
            (0.988, 0.998, 0.645)]
SLICER_INFERNO_ID = "vtkMRMLColorTableNodeFileInferno.txt"
CDAL_INFERNO_TAG = "CDALInferno"


class VolumeTooLargeError(CDALError):
    """The volume is too large to segment whole: the GUI offers to place an ROI."""


class SegmentationResult(object):
    """Nodes created by one segmentation run (all in the input volume's scene)."""

    def __init__(self):
        self.segmentationNode = None
        self.uncertaintyNode = None
        self.attentionNode = None
        self.sliceTableNode = None
        self.inputVolumeNode = None
        self.modelName = ""
        self.seconds = 0.0
        self.notes = []  # type: List[str]
        self.ijkBox = None
        self.card = None

    def labelArray(self):
        """(K, J, I) uint8 class-index array of the segmentation in the input volume's grid."""
        from .finetune import labelArrayForPair

        return labelArrayForPair(self.inputVolumeNode, self.segmentationNode, self.card)[0]

    def nodes(self):
        return [n for n in (self.segmentationNode, self.uncertaintyNode, self.attentionNode, self.sliceTableNode)
                if n is not None]


class _PreparedInput(object):
    """Everything a run needs, computed (and validated) before anything touches the scene."""

    def __init__(self, volumeNode, image, ijkBox, modelPath, card):
        self.volumeNode = volumeNode
        self.image = image  # SimpleITK image (cropped to the ROI box when one is given)
        self.ijkBox = ijkBox  # ((i0, j0, k0), (i1, j1, k1)) or None for the whole volume
        self.modelPath = modelPath
        self.card = card
        self.fullDimensions = tuple(volumeNode.GetImageData().GetDimensions())  # (I, J, K)
        self.ijkToRas = geometry.ijkToRasArray(volumeNode)
        self.volumeID = volumeNode.GetID()
        self.volumeName = volumeNode.GetName()


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def shippedModelsDir():
    return os.environ.get("CDAL_SHIPPED_MODELS") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(_coreFile()))), "Resources", "Models")


def userModelsDir():
    """Per-user model folder (``cdal_core.model_io.user_models_dir()``: ~/.cdal/models or $CDAL_USER_MODELS)."""
    modelIO = _loadedModelIO()
    if modelIO is not None:
        return str(modelIO.user_models_dir())
    # same rule as cdal_core.model_io, without importing torch into the GUI process
    return os.environ.get("CDAL_USER_MODELS") or os.path.join(os.path.expanduser("~"), ".cdal", "models")


def _loadedModelIO():
    """``cdal_core.model_io`` if it is already imported (it imports torch, which the GUI avoids loading)."""
    return sys.modules.get("cdal_core.model_io")


def _coreFile():
    import cdal_core

    return cdal_core.__file__


def listModels():
    # type: () -> Dict[str, str]
    """Available models by name -> folder (shipped and per-user; a user model of the same name wins)."""
    modelIO = _loadedModelIO()
    if modelIO is not None:
        return dict((name, str(path)) for name, path in modelIO.list_models().items())
    found = {}  # same rules as cdal_core.model_io.list_models, without importing torch
    for root in (shippedModelsDir(), userModelsDir()):
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if os.path.isfile(os.path.join(root, name, "model.json")):
                    found[name] = os.path.join(root, name)
    return found


def modelKind(path):
    # type: (str) -> str
    """"shipped", "user" or "folder" for a model path."""
    path = os.path.abspath(str(path))
    for kind, root in (("user", userModelsDir()), ("shipped", shippedModelsDir())):
        root = os.path.abspath(root)
        if path.startswith(root + os.sep):
            return kind
    return "folder"


def resolveModelPath(model):
    # type: (object) -> str
    """A model name (shipped or user), a model folder, or a LoadedModel -> model folder. Raises CDALError."""
    if model is None or (isinstance(model, str) and not model.strip()):
        raise CDALError("no model selected: choose a model (e.g. hippocampus) or load a model folder")
    if hasattr(model, "card") and hasattr(model, "path"):
        return str(model.path)
    text = os.path.expanduser(str(model))
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "model.json")):
            raise CDALError("%s: not a cDAL model folder (model.json missing): choose the folder that holds "
                            "model.json and model.safetensors" % text)
        return os.path.abspath(text)
    models = listModels()
    if text in models:
        return models[text]
    raise CDALError("model '%s' not found: choose one of: %s, or load a model folder"
                    % (text, ", ".join(sorted(models)) or "none installed"))


def readModelCard(modelPath):
    # type: (str) -> Dict
    """The model card (model.json) as a dict, checked for what the module needs. Raises CDALError."""
    cardPath = os.path.join(modelPath, "model.json")
    try:
        with open(cardPath) as f:
            card = json.load(f)
    except (IOError, OSError, ValueError) as exc:
        raise CDALError("%s: cannot be read (%s): re-download or re-export the model"
                        % (cardPath, exc.__class__.__name__))
    classes = card.get("classes") if isinstance(card, dict) else None
    if not isinstance(classes, list) or len(classes) < 2 or not isinstance(card.get("input"), dict):
        raise CDALError("%s: incomplete model card (needs 'classes' and 'input'): re-export the model" % cardPath)
    return card


def foregroundClasses(card):
    """[(index, name, (r, g, b) in 0..1)] for every class except background (index 0)."""
    out = []
    for c in sorted(card["classes"], key=lambda c: int(c["index"])):
        index = int(c["index"])
        if index == 0:
            continue
        color = c.get("color") or [128, 128, 128]
        out.append((index, str(c.get("name", "Class %d" % index)), tuple(float(v) / 255.0 for v in color[:3])))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the logic
# ---------------------------------------------------------------------------------------------------------------
class CDALSegmentationLogic(object):
    """Segmentation with uncertainty and attention overlays, per-slice review table, and fine-tuning."""

    def __init__(self, maxVoxelsWithoutROI=MAX_VOXELS_WITHOUT_ROI):
        self.maxVoxelsWithoutROI = maxVoxelsWithoutROI
        #: environment child processes start from (desktop Slicer: slicer.util.startupEnvironment())
        self.baseEnvironment = None
        #: interpreter for child processes (default: PythonSlicer in desktop Slicer, else sys.executable)
        self.python = None
        self._modelCache = {}

    # ---- validation / preparation ----------------------------------------------------------------------------
    def prepareInput(self, volumeNode, model=DEFAULT_MODEL, roiNode=None):
        """Validate the input and export it (cropped to the ROI) as a SimpleITK image. Touches no node."""
        if volumeNode is None:
            raise CDALError("no input volume: load an image and select it as the input volume")
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise CDALError("%s is a %s, not an image volume: select a scalar image volume"
                            % (volumeNode.GetName(), volumeNode.GetClassName()))
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise CDALError("%s is a label map: select the image (MRI) volume instead" % volumeNode.GetName())
        if volumeNode.IsA("vtkMRMLDiffusionTensorVolumeNode") or volumeNode.IsA(
                "vtkMRMLDiffusionWeightedVolumeNode"):
            raise CDALError("%s is a diffusion volume: select a scalar image volume" % volumeNode.GetName())
        if volumeNode.GetScene() is None:
            raise CDALError("%s is not in a scene: add it to the scene first" % volumeNode.GetName())
        imageData = volumeNode.GetImageData()
        if imageData is None or imageData.GetNumberOfPoints() == 0:
            raise CDALError("%s has no image data: load the image again" % volumeNode.GetName())
        dims = imageData.GetDimensions()
        if min(dims) < 2:
            raise CDALError("%s is a 2D image (%s voxels), cDAL needs a 3D volume: load the whole series as one 3D "
                            "volume" % (volumeNode.GetName(), "x".join(str(d) for d in dims)))
        modelPath = resolveModelPath(model)
        card = readModelCard(modelPath)
        channels = int(card["input"].get("image_channels", 1))
        components = imageData.GetNumberOfScalarComponents()
        if components != channels:
            if components in (3, 4) and channels == 1:
                raise CDALError("%s is an RGB/colour volume but model '%s' expects a greyscale image: convert it to "
                                "a scalar volume (Vector to Scalar Volume module) first"
                                % (volumeNode.GetName(), os.path.basename(modelPath)))
            raise CDALError("%s has %d components per voxel but model '%s' expects %d"
                            % (volumeNode.GetName(), components, os.path.basename(modelPath), channels))
        ijkBox = None
        if roiNode is not None:
            try:
                ijkBox = geometry.roiIjkBox(volumeNode, roiNode)
            except ValueError:
                raise CDALError("the volume is under a non-linear transform: harden the transform before using an ROI")
            if ijkBox is None:
                raise CDALError("ROI '%s' does not overlap volume %s: move the ROI onto the image"
                                % (roiNode.GetName(), volumeNode.GetName()))
            boxDims = [h - l for l, h in zip(ijkBox[0], ijkBox[1])]
            if min(boxDims) < 2:
                raise CDALError("ROI '%s' covers only a %s-voxel slab of %s: make the ROI larger"
                                % (roiNode.GetName(), "x".join(str(d) for d in boxDims), volumeNode.GetName()))
            voxels = int(np.prod(boxDims))
            if voxels > self.maxVoxelsWithoutROI:
                raise VolumeTooLargeError("ROI '%s' covers %.0f million voxels (limit %.0f million): make the ROI "
                                          "smaller" % (roiNode.GetName(), voxels / 1e6, self.maxVoxelsWithoutROI / 1e6))
        else:
            voxels = int(np.prod(dims))
            if voxels > self.maxVoxelsWithoutROI:
                raise VolumeTooLargeError("%s has %.0f million voxels, too many to segment whole: place an ROI around "
                                          "the structure and segment that" % (volumeNode.GetName(), voxels / 1e6))
        image = geometry.sitkImageFromVolumeNode(volumeNode, ijkBox)
        self._checkIntensities(image, volumeNode.GetName())
        coreData = sys.modules.get("cdal_core.data")  # full check when cdal_core is loaded (in-process runs)
        if coreData is not None:
            coreData.check_volume(image, channels, name=volumeNode.GetName())
        return _PreparedInput(volumeNode, image, ijkBox, modelPath, card)

    @staticmethod
    def _checkIntensities(image, name):
        import SimpleITK as sitk

        array = sitk.GetArrayViewFromImage(image)
        finite = np.isfinite(array)
        if not finite.all():
            raise CDALError("%s has %d NaN/inf voxels: fix or mask them (e.g. replace with 0) before segmenting"
                            % (name, int(array.size - np.count_nonzero(finite))))
        if float(array.max()) == float(array.min()):
            raise CDALError("%s is constant (every voxel = %g), nothing to segment: check that the right image was "
                            "loaded" % (name, float(array.min())))

    # ---- synchronous run ---------------------------------------------------------------------------------
    def loadModel(self, modelPath, device="cpu"):
        key = (os.path.abspath(modelPath), str(device))
        stamp = os.path.getmtime(os.path.join(modelPath, "model.json"))
        cached = self._modelCache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        from cdal_core.model_io import load_model

        loaded = load_model(modelPath, device=device)
        self._modelCache[key] = (stamp, loaded)
        return loaded

    def segment(self, volumeNode, model=DEFAULT_MODEL, roiNode=None, samples=5, steps=None, seed=None,
                progress=None, device="auto"):
        """Segment ``volumeNode`` in this process and create the output nodes. Returns a SegmentationResult.

        ``progress(fraction, message)`` may raise ``CancelledError`` to stop; nothing is added to the scene then.
        """
        prepared = self.prepareInput(volumeNode, model, roiNode)

        def report(fraction, message):
            if progress is not None:
                progress(float(fraction), message)

        report(0.0, "Loading model")
        from cdal_core.inference import resolve_device, segment_image

        dev = str(resolve_device(device))
        loaded = self.loadModel(prepared.modelPath, dev)
        report(0.05, "Segmenting")
        out = segment_image(prepared.image, loaded, steps=steps, samples=samples, seed=seed, device=dev,
                            progress=lambda f, m: report(0.05 + 0.9 * float(f), m))
        import SimpleITK as sitk

        report(0.96, "Creating nodes")
        arrays = {
            "labels": sitk.GetArrayFromImage(out.labels),
            "uncertainty": sitk.GetArrayFromImage(out.uncertainty).astype(np.float32),
            "attention": None if out.attention is None else sitk.GetArrayFromImage(out.attention).astype(np.float32),
        }
        result = self.createOutputNodes(prepared, arrays)
        result.seconds = float(getattr(out, "seconds", 0.0))
        result.notes = list(getattr(out, "notes", []) or [])
        report(1.0, "Done")
        return result

    # ---- background run (GUI) -----------------------------------------------------------------------------
    def startSegmentation(self, volumeNode, model=DEFAULT_MODEL, roiNode=None, samples=5, steps=None, seed=None,
                          device="auto", python=None):
        """Validate, export the input to a temporary file and start the segmentation child process.

        Returns a SegmentationJob; call ``job.poll()`` regularly, then ``finishSegmentation(job)`` once
        ``job.state == "done"``. ``job.cancel()`` kills the process; ``job.cleanup()`` removes temporary files.
        """
        import SimpleITK as sitk

        prepared = self.prepareInput(volumeNode, model, roiNode)
        workDir = tempfile.mkdtemp(prefix="cdal-segment-")
        inputPath = os.path.join(workDir, "input.nrrd")
        sitk.WriteImage(prepared.image, inputPath, True)
        args = ["--input", inputPath, "--model", prepared.modelPath, "--output-dir", os.path.join(workDir, "out"),
                "--samples", int(samples), "--device", device or "auto"]
        if steps:
            args += ["--steps", int(steps)]
        if seed is not None:
            args += ["--seed", int(seed)]
        command = pythonModuleCommand("CDALSegmentationLib.segment_worker", args, python=python or self.python)
        job = SegmentationJob(command, env=subprocessEnvironment(self.baseEnvironment), prepared=prepared,
                              workDir=workDir)
        job.start()
        return job

    def finishSegmentation(self, job):
        """Create the output nodes from a finished SegmentationJob (GUI thread). Returns a SegmentationResult."""
        import SimpleITK as sitk

        if job.state != "done":
            raise CDALError("segmentation did not finish (%s): %s" % (job.state, job.error or job.message))
        prepared = job.prepared
        scene = prepared.volumeNode.GetScene()
        if scene is None or scene.GetNodeByID(prepared.volumeID) is not prepared.volumeNode:
            raise CDALError("input volume %s was removed while segmenting: load it again and re-run"
                            % prepared.volumeName)
        outDir = os.path.join(job.workDir, "out")
        try:
            arrays = {
                "labels": sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(outDir, "labels.nrrd"))),
                "uncertainty": sitk.GetArrayFromImage(
                    sitk.ReadImage(os.path.join(outDir, "uncertainty.nrrd"))).astype(np.float32),
                "attention": None,
            }
            attentionPath = os.path.join(outDir, "attention.nrrd")
            if os.path.exists(attentionPath):
                arrays["attention"] = sitk.GetArrayFromImage(sitk.ReadImage(attentionPath)).astype(np.float32)
        except RuntimeError as exc:
            raise CDALError("segmentation results could not be read (%s): run again" % str(exc).splitlines()[0])
        result = self.createOutputNodes(prepared, arrays)
        done = [e for e in job.events if e.get("event") == "done"]
        if done:
            result.seconds = float(done[-1].get("seconds", 0.0))
            result.notes = list(done[-1].get("notes", []) or [])
        return result

    # ---- outputs -----------------------------------------------------------------------------------------
    def createOutputNodes(self, prepared, arrays):
        """Paste the (cropped) outputs into full-size arrays and create the nodes. All or nothing."""
        volumeNode = prepared.volumeNode
        scene = volumeNode.GetScene()
        I, J, K = prepared.fullDimensions
        cropShape = tuple(reversed(prepared.image.GetSize()))  # (k, j, i)
        for key in ("labels", "uncertainty", "attention"):
            if arrays.get(key) is not None and tuple(arrays[key].shape) != cropShape:
                raise CDALError("model output %s has shape %s, expected %s: the model or cdal_core is broken"
                                % (key, arrays[key].shape, cropShape))
        full = {}
        for key, dtype in (("labels", np.uint8), ("uncertainty", np.float32), ("attention", np.float32)):
            if arrays.get(key) is None:
                full[key] = None
                continue
            if prepared.ijkBox is None:
                full[key] = np.ascontiguousarray(arrays[key].astype(dtype))
            else:
                (i0, j0, k0), (i1, j1, k1) = prepared.ijkBox
                target = np.zeros((K, J, I), dtype=dtype)
                target[k0:k1, j0:j1, i0:i1] = arrays[key]
                full[key] = target

        base = "%s CDAL" % prepared.volumeName
        classes = foregroundClasses(prepared.card)
        result = SegmentationResult()
        result.inputVolumeNode = volumeNode
        result.modelName = os.path.basename(prepared.modelPath.rstrip("/\\"))
        result.ijkBox = prepared.ijkBox
        result.card = prepared.card
        created = []
        try:
            result.segmentationNode = self._createSegmentationNode(scene, base + " segmentation", volumeNode,
                                                                   prepared.ijkToRas, full["labels"], classes)
            created.append(result.segmentationNode)
            result.uncertaintyNode = self._createScalarNode(scene, base + " uncertainty", volumeNode,
                                                            prepared.ijkToRas, full["uncertainty"])
            created.append(result.uncertaintyNode)
            self.setupOverlayDisplay(result.uncertaintyNode, "uncertainty")
            if full["attention"] is not None:
                result.attentionNode = self._createScalarNode(scene, base + " attention", volumeNode,
                                                              prepared.ijkToRas, full["attention"])
                created.append(result.attentionNode)
                self.setupOverlayDisplay(result.attentionNode, "attention")
            result.sliceTableNode = self._createSliceTable(scene, base + " slice uncertainty", full["labels"],
                                                           full["uncertainty"], classes)
            created.append(result.sliceTableNode)
        except Exception:
            for node in created:
                if node is not None and node.GetScene() is scene:
                    scene.RemoveNode(node)
            raise
        return result

    @staticmethod
    def _uniqueName(scene, name):
        return scene.GenerateUniqueName(name)

    def _createSegmentationNode(self, scene, name, volumeNode, ijkToRas, labels, classes):
        import slicer
        import vtk
        from vtk.util import numpy_support

        segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self._uniqueName(scene, name))
        segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        if volumeNode.GetParentTransformNode() is not None:
            segNode.SetAndObserveTransformNodeID(volumeNode.GetParentTransformNode().GetID())
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        K, J, I = labels.shape
        segmentation = segNode.GetSegmentation()
        for index, className, color in classes:
            image = slicer.vtkOrientedImageData()
            image.SetExtent(0, I - 1, 0, J - 1, 0, K - 1)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            image.SetImageToWorldMatrix(matrix)
            voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
            voxels[:] = (labels == index).astype(np.uint8).ravel()
            image.Modified()
            segmentId = segNode.AddSegmentFromBinaryLabelmapRepresentation(image, className, list(color))
            segment = segmentation.GetSegment(segmentId)
            segment.SetName(className)  # (the ID may differ when the name is taken)
        return segNode

    def _createScalarNode(self, scene, name, volumeNode, ijkToRas, array):
        import slicer.util

        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self._uniqueName(scene, name))
        geometry.setIjkToRasFromArray(node, ijkToRas)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
        if volumeNode.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(volumeNode.GetParentTransformNode().GetID())
        node.CreateDefaultDisplayNodes()
        return node

    def _createSliceTable(self, scene, name, labels, uncertainty, classes):
        import vtk

        stats = self.sliceStatistics(labels, uncertainty, classes)
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", self._uniqueName(scene, name))
        columns = []
        sliceColumn = vtk.vtkIntArray()
        sliceColumn.SetName("Slice")
        columns.append((sliceColumn, stats["Slice"]))
        for key in ("Mean uncertainty", "Max uncertainty"):
            col = vtk.vtkDoubleArray()
            col.SetName(key)
            columns.append((col, stats[key]))
        for _, className, _ in classes:
            col = vtk.vtkIntArray()
            col.SetName("%s voxels" % className)
            columns.append((col, stats["%s voxels" % className]))
        for col, values in columns:
            col.SetNumberOfTuples(len(values))
            for row, value in enumerate(values):
                col.SetValue(row, value.item() if hasattr(value, "item") else value)
            table.AddColumn(col)
        table.SetColumnDescription("Slice", "Slice index K of the input volume (IJK)")
        table.SetColumnDescription("Mean uncertainty", "Mean per-voxel variance across the ensemble in this slice")
        table.SetColumnDescription("Max uncertainty", "Largest per-voxel variance in this slice")
        table.SetUseColumnTitleAsColumnHeader(True) if hasattr(table, "SetUseColumnTitleAsColumnHeader") else None
        return table

    @staticmethod
    def sliceStatistics(labels, uncertainty, classes):
        """Per K-slice statistics: {"Slice", "Mean uncertainty", "Max uncertainty", "<name> voxels"...}."""
        K = labels.shape[0]
        flatUnc = uncertainty.reshape(K, -1).astype(np.float64)
        flatLab = labels.reshape(K, -1)
        stats = {
            "Slice": np.arange(K, dtype=np.int64),
            "Mean uncertainty": flatUnc.mean(axis=1),
            "Max uncertainty": flatUnc.max(axis=1),
        }
        for index, className, _ in classes:
            stats["%s voxels" % className] = (flatLab == index).sum(axis=1).astype(np.int64)
        return stats

    # ---- display -----------------------------------------------------------------------------------------
    def infernoColorNodeID(self, scene):
        """Slicer's Inferno colour table, or an equivalent table created once in this scene."""
        if scene.GetNodeByID(SLICER_INFERNO_ID) is not None:
            return SLICER_INFERNO_ID
        existing = scene.GetSingletonNode(CDAL_INFERNO_TAG, "vtkMRMLColorTableNode")
        if existing is not None:
            return existing.GetID()
        import vtk
        import slicer

        node = slicer.vtkMRMLColorTableNode()
        node.SetName("CDAL Inferno")
        node.SetSingletonTag(CDAL_INFERNO_TAG)
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        points = np.array(_INFERNO)
        xs = np.linspace(0.0, 1.0, len(points))
        for i in range(256):
            t = i / 255.0
            rgb = [float(np.interp(t, xs, points[:, c])) for c in range(3)]
            node.SetColor(i, "", rgb[0], rgb[1], rgb[2], 1.0)
        node.SetHideFromEditors(False)
        scene.AddNode(node)
        return node.GetID()

    def setupOverlayDisplay(self, node, kind):
        """Inferno colour map, fixed window, low values transparent (threshold) - for use as foreground layer."""
        display = node.GetDisplayNode()
        if display is None:
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
        import slicer.util

        array = slicer.util.arrayFromVolume(node)
        if kind == "attention":
            low, high = 0.0, 1.0
            threshold = 0.15
        else:
            high = float(np.percentile(array[array > 0], 99.5)) if np.any(array > 0) else 1.0
            high = max(high, 1e-6)
            low = 0.0
            threshold = 0.1 * high
        display.SetAndObserveColorNodeID(self.infernoColorNodeID(node.GetScene()))
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, high)
        display.AutoThresholdOff()
        display.SetLowerThreshold(threshold)
        display.SetUpperThreshold(max(float(array.max()), high) + 1.0)
        display.ApplyThresholdOn()
        display.SetInterpolate(False) if kind == "uncertainty" else None
        return display

    @staticmethod
    def sliceCenterRAS(volumeNode, k):
        """World RAS of the centre of slice ``k`` (for jumping slice views there)."""
        dims = volumeNode.GetImageData().GetDimensions()
        ijk = [(dims[0] - 1) / 2.0, (dims[1] - 1) / 2.0, float(k), 1.0]
        ras = geometry.ijkToRasArray(volumeNode).dot(ijk)[:3]
        parent = volumeNode.GetParentTransformNode()
        if parent is not None:
            import vtk

            transform = vtk.vtkGeneralTransform()
            parent.GetTransformToWorld(transform)
            ras = transform.TransformPoint(list(ras))
        return [float(v) for v in ras]

    def createSliceUncertaintyPlot(self, tableNode, name=None):
        """A plot chart (mean uncertainty vs slice) for the table; returns the vtkMRMLPlotChartNode."""
        scene = tableNode.GetScene()
        name = name or tableNode.GetName() + " plot"
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", self._uniqueName(scene, name + " mean"))
        series.SetAndObserveTableNodeID(tableNode.GetID())
        series.SetXColumnName("Slice")
        series.SetYColumnName("Mean uncertainty")
        series.SetPlotType(series.PlotTypeScatter)
        series.SetColor(0.95, 0.45, 0.1)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self._uniqueName(scene, name))
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle("Uncertainty per slice")
        chart.SetXAxisTitle("Slice (K)")
        chart.SetYAxisTitle("Mean variance")
        chart.SetLegendVisibility(False) if hasattr(chart, "SetLegendVisibility") else None
        return chart

    # ---- fine-tuning (see finetune.py) ---------------------------------------------------------------------
    def trainingPairs(self, scene):
        """(volume, segmentation) pairs in the scene: every segmentation node with a reference volume."""
        from .finetune import trainingPairsInScene

        return trainingPairsInScene(scene)

    def startFineTune(self, pairs, baseModel=DEFAULT_MODEL, newModelName=None, maxSteps=200, maxMinutes=None,
                      device="auto", workDir=None, python=None, config=None):
        """Start fine-tuning on (volume, segmentation) pairs; see ``finetune.startFineTune``."""
        from .finetune import startFineTune

        return startFineTune(pairs, baseModel=baseModel, newModelName=newModelName, maxSteps=maxSteps,
                             maxMinutes=maxMinutes, device=device, workDir=workDir, python=python or self.python,
                             config=config, baseEnvironment=self.baseEnvironment)


class SegmentationJob(ProcessJob):
    """Segmentation running in a child process; holds the validated input for ``finishSegmentation``."""

    def __init__(self, command, env=None, prepared=None, workDir=None):
        ProcessJob.__init__(self, command, env=env, name="segmentation")
        self.prepared = prepared
        self.workDir = workDir

    def succeeded(self):
        return any(e.get("event") == "done" for e in self.events) and os.path.exists(
            os.path.join(self.workDir, "out", "labels.nrrd"))

    def cleanup(self):
        if self.state == RUNNING:
            self.cancel()
        if self.workDir and os.path.isdir(self.workDir):
            shutil.rmtree(self.workDir, ignore_errors=True)


__all__ = ["CDALSegmentationLogic", "SegmentationResult", "SegmentationJob", "VolumeTooLargeError", "CDALError",
           "CancelledError", "listModels", "resolveModelPath", "readModelCard", "userModelsDir", "modelKind"]
