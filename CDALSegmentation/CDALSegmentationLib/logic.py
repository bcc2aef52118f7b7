"""Qt-free logic of the CDALSegmentation module (desktop Slicer and PyPI slicer-core).

Usage::

    from CDALSegmentationLib.logic import CDALSegmentationLogic
    result = CDALSegmentationLogic().segment(volumeNode, model="hippocampus", samples=5)
    result.segmentationNode, result.uncertaintyNode, result.attentionNode, result.sliceTableNode

``segment`` runs in the calling process (scripts, tests). The GUI uses ``startSegmentation`` (a child process
polled with ``job.poll()``) and ``finishSegmentation(job)``, which creates the nodes on the GUI thread.
Every problem the user can fix raises ``cdal_core.errors.CDALError`` with a one-line message, before any node
is created: a failed or cancelled run leaves the scene as it was.
A 2D image model (card ``input.image_size``, e.g. cxr) takes a single-slice volume (a PNG/TIFF as Slicer loads
it; RGB as a vector volume) and gives the same outputs on that slice's grid.
"""
import json
import os
import sys
import tempfile

import numpy as np

from . import geometry
from .jobs import ProcessJob, pythonModuleCommand, removeTree
from .paths import ensureCoreOnPath, subprocessEnvironment
from .segment_worker import informativeLine, isImageModel

ensureCoreOnPath()
from cdal_core.errors import CancelledError, CDALError  # noqa: E402  (pure Python, no torch)

DEFAULT_MODEL = "hippocampus"
#: node reference from every output node to the volume that was segmented (results follow it, not the selector)
INPUT_VOLUME_ROLE = "CDALSegmentation.inputVolume"
#: attribute marking our output nodes (the input selector hides them)
OUTPUT_ATTRIBUTE = "CDALSegmentation.output"
#: node reference from a slice table to its chart (not an attribute: importing a scene renumbers references only)
PLOT_CHART_ROLE = "CDALSegmentation.plotChart"
CENTRE_ATTRIBUTE = "CDALSegmentation.centre."  # + "left" / "right": "R,A,S" on the volume table
SIDE_NAMES = {1: "left", 2: "right", 3: "unknown"}
REVIEW_DESCRIPTION = {"Check": "'review': this structure's mean uncertainty is far above what the model showed on "
                               "held-out validation scans (model card, quality): check it before use"}

# matplotlib's "inferno" at 17 evenly spaced points (used when Slicer's Inferno colour file is unavailable)
_INFERNO = [(0.001, 0.0, 0.014), (0.042, 0.028, 0.141), (0.129, 0.047, 0.291), (0.238, 0.037, 0.396),
            (0.342, 0.062, 0.429), (0.441, 0.099, 0.432), (0.541, 0.135, 0.415), (0.64, 0.171, 0.381),
            (0.736, 0.216, 0.33), (0.822, 0.275, 0.266), (0.894, 0.353, 0.194), (0.947, 0.449, 0.115),
            (0.978, 0.558, 0.035), (0.988, 0.675, 0.065), (0.975, 0.798, 0.206), (0.948, 0.917, 0.411),
            (0.988, 0.998, 0.645)]
SLICER_INFERNO_ID = "vtkMRMLColorTableNodeFileInferno.txt"
CDAL_INFERNO_TAG = "CDALInferno"


class SegmentationResult(object):
    """Nodes created by one segmentation run (all in the input volume's scene)."""

    def __init__(self):
        self.segmentationNode = None
        self.uncertaintyNode = None
        self.attentionNode = None
        self.sliceTableNode = None
        self.volumeTableNode = None  # per-side volumes
        self.inputVolumeNode = None
        self.report = {}
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
        return [n for n in (self.segmentationNode, self.uncertaintyNode, self.attentionNode, self.sliceTableNode,
                            self.volumeTableNode) if n is not None]


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
        self.voxelStamp = _voxelStamp(volumeNode)
        self.frame = sequenceFrame(volumeNode)  # the item of a sequence (4D series) the proxy volume shows, or None

    def inputChangedSince(self):
        """What changed in the input volume since it was prepared (None when nothing did): a background run's
        results belong to the voxels and grid it was given, not to a volume hardened, resampled or moved to
        another sequence frame meanwhile."""
        node = self.volumeNode
        if node.GetImageData() is None or tuple(node.GetImageData().GetDimensions()) != self.fullDimensions:
            return "its voxels were replaced"
        if not np.allclose(geometry.ijkToRasArray(node), self.ijkToRas, rtol=0, atol=1e-6):
            return "its position or orientation changed (e.g. a hardened transform)"
        if sequenceFrame(node) != self.frame:
            return "its sequence browser shows another frame"
        if _voxelStamp(node) != self.voxelStamp and not self._sameVoxels():
            return "its voxel values changed"
        return None

    def _sameVoxels(self):
        """The segmented voxels (the ROI box of them) compared with the volume's now: a sequence browser re-copies
        its frame into the proxy volume on any change of the browser (even a playback setting, or a scene save),
        which renews the voxel array without changing a value."""
        import SimpleITK as sitk

        now = geometry.volumeArray(self.volumeNode)  # the array the run was exported from (sitkImageFromVolumeNode)
        if self.ijkBox is not None:
            (i0, j0, k0), (i1, j1, k1) = self.ijkBox
            now = now[k0:k1, j0:j1, i0:i1]
        then = sitk.GetArrayViewFromImage(self.image)
        return now.shape == then.shape and np.array_equal(now, then)


def sequenceFrame(volumeNode):
    """The 1-based item number a sequence browser shows in ``volumeNode`` (a 4D series' proxy volume), else None:
    the proxy's voxels change with the browser, so results must say which frame they came from."""
    scene = volumeNode.GetScene()
    if scene is None:
        return None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if browser.IsProxyNodeID(volumeNode.GetID()):
            return browser.GetSelectedItemNumber() + 1
    return None


def _voxelStamp(volumeNode):
    """Which voxel array the volume holds, and its modification time: both change when the voxels are edited or
    replaced (Crop/Resample in place, slicer.util.arrayFromVolumeModified, a sequence browser's re-copy); a
    changed stamp is then confirmed by comparing the voxels (``_PreparedInput._sameVoxels``)."""
    imageData = volumeNode.GetImageData()
    scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
    if scalars is None:
        return None
    # the C++ objects' addresses: a Python wrapper's id() changes whenever VTK re-wraps the same object
    return (imageData.GetAddressAsString("vtkImageData"), imageData.GetMTime(),
            scalars.GetAddressAsString("vtkDataArray"), scalars.GetMTime())


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


def modelEntries(extraFolders=()):
    """[(label, path)] for the model list: shipped first, then fine-tuned (per-user), then loaded folders."""
    entries = []
    for name, path in listModels().items():
        shipped = modelKind(path) == "shipped"
        entries.append((0 if shipped else 1, name if shipped else "%s (fine-tuned)" % name, path))
    for path in extraFolders:
        entries.append((2, "%s (folder)" % os.path.basename(str(path).rstrip("/\\")), str(path)))
    return [(label, path) for _, label, path in sorted(entries)]


def modelParameterValue(path):
    """What the parameter node stores for a model: its name when installed, else its folder."""
    return os.path.basename(path.rstrip("/\\")) if modelKind(path) in ("shipped", "user") else path


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


def modelNames(imageModels, channels=None):
    """Installed models that are (or are not) 2D image models, optionally of one channel count: for hints."""
    names = []
    for name, path in listModels().items():
        try:
            card = readModelCard(path)
        except CDALError:
            continue
        if isImageModel(card) == imageModels and channels in (None, int(card["input"].get("image_channels", 1))):
            names.append(name)
    return names


def modelSummary(modelPath):
    # type: (str) -> Tuple[str, str]
    """(one line, tooltip) that tell a user what a model is before they run it: its sampling, ensemble size and
    validation Dice per class (± the standard error over the validation cases), and the Dice to expect on new
    scans where the card has a cross-validated estimate, read from its card. A card that cannot be read gives its
    error as both."""
    try:
        card = readModelCard(modelPath)
    except CDALError as exc:
        return str(exc), str(exc)
    generators = 1 + len(card.get("members") or [])
    from cdal_core.quality import card_step_pooling  # pure Python: no torch in the GUI process

    notes = []
    if card_step_pooling(card) != "last":
        notes.append("every step's prediction pooled")
    if card.get("input", {}).get("test_time_mirror"):
        notes.append("some on the left-right mirror")
    line = "%s%d denoising steps x %d samples%s" % (
        "%d generators, " % generators if generators > 1 else "", int(card.get("num_steps", 2)),
        int(card.get("samples", 5)), " (%s)" % "; ".join(notes) if notes else "")
    validation = card.get("validation") or {}
    count = validation.get("images") or validation.get("volumes")
    scores = []
    for name, row in (validation.get("per_class") or {}).items():
        if isinstance(row, dict) and row.get("dice") is not None:
            spread = row.get("dice_std")  # over the cases, ddof 0: the standard error divides by sqrt(n - 1)
            stderr = ""
            if spread is not None and count and count > 1:
                stderr = " ± %.1f" % (100.0 * spread / (count - 1) ** 0.5)
            scores.append("%s %.1f%s" % (name, 100.0 * row["dice"], stderr))
    if scores:
        line += "; validation Dice %s (%s %s)" % (", ".join(scores), count or "?",
                                                   "images" if validation.get("images") else "volumes")
    else:
        line += "; no validation recorded in its card"
    estimate = validation.get("estimate") or {}
    expected = ["%s %.1f ± %.1f" % (name, 100.0 * row["dice"], 100.0 * row["se"])
                for name, row in (estimate.get("per_class") or {}).items()
                if isinstance(row, dict) and row.get("dice") is not None and row.get("se") is not None]
    if expected:  # a cross-validated estimate says what to expect on new scans better than one split does
        line += "; expected on new scans %s (%s)" % (", ".join(expected), estimate.get("basis", "estimate"))
    tooltip = "\n".join(part for part in (card.get("description"), line, validation.get("note"),
                                           estimate.get("note")) if part)
    return line, tooltip


def _namesHint(names):
    return " (%s)" % ", ".join(names) if names else ""


def _imageFileName(volumeNode):
    """The file name of a volume read from a 2D image format (PNG, JPEG, TIFF, BMP), else None."""
    from cdal_core.data import PNG_SUFFIXES  # numpy and SimpleITK only: no torch in the GUI process

    storage = volumeNode.GetStorageNode()
    fileName = storage.GetFileName() if storage is not None else None
    if fileName and fileName.lower().endswith(PNG_SUFFIXES):
        return os.path.basename(fileName)
    return None


def _size(dims):
    return "x".join(str(d) for d in dims)


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

    def __init__(self, runnerFactory=None):
        #: process runner for child processes (jobs.py); the widget sets qt_process.QtProcessRunner
        self.runnerFactory = runnerFactory
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
        if (imageData is None or imageData.GetNumberOfPoints() == 0
                or imageData.GetPointData().GetScalars() is None):
            raise CDALError("%s has no image data: load the image again" % volumeNode.GetName())
        self._checkGrid(volumeNode)
        dims = imageData.GetDimensions()
        modelPath = resolveModelPath(model)
        card = readModelCard(modelPath)
        modelName = os.path.basename(modelPath.rstrip("/\\"))
        imageModel = isImageModel(card)
        if imageModel:
            self._checkImageShape(volumeNode, dims, modelName)
        elif min(dims) < 2:
            raise CDALError("%s is a 2D image (%s voxels) but model '%s' segments 3D volumes: load the whole series "
                            "as one 3D volume, or choose a 2D image model%s"
                            % (volumeNode.GetName(), _size(dims), modelName, _namesHint(modelNames(imageModels=True))))
        channels = int(card["input"].get("image_channels", 1))
        components = imageData.GetNumberOfScalarComponents()
        if components != channels and not imageModel:  # image models: _checkImageChannels below
            if components in (3, 4) and channels == 1:
                raise CDALError("%s is an RGB/colour volume but model '%s' expects a greyscale image: convert it to "
                                "a scalar volume (Vector to Scalar Volume module) first"
                                % (volumeNode.GetName(), modelName))
            raise CDALError("%s has %d components per voxel (a multi-frame or vector volume) but model '%s' "
                            "expects %d: select a single 3D scalar volume, e.g. one frame of the series"
                            % (volumeNode.GetName(), components, modelName, channels))
        ijkBox = None
        if roiNode is not None:
            if max(roiNode.GetSize()) <= 0:  # the selector's "Create new ROI" before it is placed in a view
                raise CDALError("ROI '%s' has not been placed yet: place it on the image in a slice view, or clear "
                                "the Region selector to segment without one" % roiNode.GetName())
            try:
                ijkBox = geometry.roiIjkBox(volumeNode, roiNode)
            except ValueError:
                raise CDALError("the volume is under a non-linear transform: harden the transform before using an ROI")
            if ijkBox is None:
                raise CDALError("ROI '%s' does not overlap volume %s: move the ROI onto the image"
                                % (roiNode.GetName(), volumeNode.GetName()))
            boxDims = [h - l for l, h in zip(ijkBox[0], ijkBox[1])]
            # an image's single slice is its whole depth: only its two in-plane axes can be too thin
            croppedDims = [b for b, d in zip(boxDims, dims) if d > 1] if imageModel else boxDims
            if min(croppedDims) < 2:
                raise CDALError("ROI '%s' covers only a %s-voxel slab of %s: make the ROI larger"
                                % (roiNode.GetName(), _size(boxDims), volumeNode.GetName()))
        image = geometry.sitkImageFromVolumeNode(volumeNode, ijkBox)
        self._checkIntensities(image, volumeNode.GetName())
        coreData = sys.modules.get("cdal_core.data")  # full check when cdal_core is loaded (in-process runs)
        if imageModel:
            self._checkImageChannels(image, channels, volumeNode.GetName(), modelName)
        elif coreData is not None:
            coreData.check_volume(image, channels, name=volumeNode.GetName())
        return _PreparedInput(volumeNode, image, ijkBox, modelPath, card)

    @staticmethod
    def _checkGrid(volumeNode):
        """Spacing and directions a grid can have: both come from the file's header or Volume Information edits,
        and a zero spacing or a singular direction matrix would fail deep inside resampling."""
        spacing = volumeNode.GetSpacing()
        if not all(np.isfinite(v) and v > 0 for v in spacing):
            raise CDALError("%s has a voxel spacing of %s mm: every spacing must be positive; set it in Volumes > "
                            "Volume Information, or fix the file's header" % (volumeNode.GetName(),
                                                                               " x ".join("%g" % v for v in spacing)))
        matrix = geometry.ijkToRasArray(volumeNode)
        if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-9 * float(np.prod(spacing)):
            raise CDALError("%s has a degenerate orientation (two of its image axes point the same way): fix the "
                            "directions in Volumes > Volume Information, or reload the image" % volumeNode.GetName())

    @staticmethod
    def _checkImageShape(volumeNode, dims, modelName):
        """A 2D image model takes one slice (I x J x 1: how Slicer loads a PNG/TIFF), never a 3D volume."""
        stackedFrom = _imageFileName(volumeNode)
        if min(dims) > 1 and stackedFrom:
            raise CDALError("%s was loaded as a stack of %d images (from %s) but model '%s' segments one 2D image: "
                            "Slicer reads numbered file names such as 00000001_000.png as a series. Load the image "
                            "again with Add Data > Show Options > Single File ticked (or save one page of a "
                            "multi-page TIFF)" % (volumeNode.GetName(), dims[2], stackedFrom, modelName))
        if min(dims) > 1:
            raise CDALError("%s is a 3D volume (%s voxels) but model '%s' segments 2D images: select a 2D image (a "
                            "PNG/TIFF loaded as one slice), or choose a 3D model%s"
                            % (volumeNode.GetName(), _size(dims), modelName, _namesHint(modelNames(imageModels=False))))
        if dims[2] != 1 or min(dims[:2]) < 2:
            raise CDALError("%s (%s voxels) is not one 2D image in its I-J plane: model '%s' segments 2D images: load "
                            "the image file (PNG/TIFF) itself" % (volumeNode.GetName(), _size(dims), modelName))

    @staticmethod
    def _checkImageChannels(image, channels, name, modelName):
        """The channel rules of ``cdal_core.predict2d.image_array_2d`` (which the worker applies; it imports torch,
        kept out of the GUI process): grey stored as RGB (equal channels) is grey, alpha is ignored."""
        import SimpleITK as sitk

        components = image.GetNumberOfComponentsPerPixel()
        array = sitk.GetArrayViewFromImage(image)
        colour = components >= 3 and not (np.array_equal(array[..., 0], array[..., 1])
                                          and np.array_equal(array[..., 0], array[..., 2]))
        if channels == 1 and colour:
            raise CDALError("%s is an RGB colour image but model '%s' expects a greyscale image: convert it to a "
                            "scalar volume (Vector to Scalar Volume module), or choose an RGB model%s"
                            % (name, modelName, _namesHint(modelNames(imageModels=True, channels=3))))
        if channels == 3 and components < 3:
            raise CDALError("%s is a greyscale image but model '%s' expects an RGB colour image: load the colour "
                            "image, or choose a greyscale model%s"
                            % (name, modelName, _namesHint(modelNames(imageModels=True, channels=1))))
        if channels not in (1, 3):
            raise CDALError("model '%s' expects %d channels per pixel but 2D images have 1 (grey) or 3 (RGB): "
                            "choose another model" % (modelName, channels))

    @staticmethod
    def _checkIntensities(image, name):
        import SimpleITK as sitk
        from cdal_core.data import check_intensities  # numpy + SimpleITK, no torch

        check_intensities(sitk.GetArrayViewFromImage(image), name)

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
        from cdal_core.inference import resolve_device
        from .segment_worker import segmentImage

        dev = str(resolve_device(device))
        loaded = self.loadModel(prepared.modelPath, dev)
        report(0.05, "Segmenting")
        out = segmentImage(prepared.image, loaded, steps=steps, samples=samples, seed=seed, device=dev,
                           progress=lambda f, m: report(0.05 + 0.9 * float(f), m),
                           localise="off" if roiNode is not None else "auto")
        import SimpleITK as sitk

        report(0.96, "Creating nodes")
        arrays = dict((key, None if image is None else sitk.GetArrayFromImage(image)) for key, image in (
            ("labels", out.labels), ("uncertainty", out.uncertainty), ("attention", out.attention),
            ("sides", out.sides)))
        result = self.createOutputNodes(prepared, arrays, out.report)
        result.seconds = out.seconds
        result.notes = out.notes
        report(1.0, "Done")
        return result

    # ---- background run (GUI) -----------------------------------------------------------------------------
    def startSegmentation(self, volumeNode, model=DEFAULT_MODEL, roiNode=None, samples=5, steps=None, seed=None,
                          device="auto", python=None):
        """Validate, export the input to a temporary file and start the segmentation child process.

        Returns a SegmentationJob (its ``prepared.volumeNode`` is the volume the results belong to); once
        ``job.state == "done"`` call ``finishSegmentation(job)``. ``job.cancel()`` kills the process tree at
        once; ``job.cleanup()`` removes the temporary folder.
        """
        import SimpleITK as sitk

        prepared = self.prepareInput(volumeNode, model, roiNode)
        workDir = inputPath = None
        try:
            workDir = tempfile.mkdtemp(prefix="cdal-segment-")
            inputPath = os.path.join(workDir, "input.nrrd")
            sitk.WriteImage(prepared.image, inputPath, False)  # uncompressed: seconds faster for a whole head
        except (OSError, RuntimeError) as exc:  # SimpleITK raises RuntimeError for a full disk
            if workDir:
                removeTree(workDir)
            raise CDALError("could not write a temporary copy of %s for the segmentation (%s): free disk space in "
                            "%s, or point TMPDIR at a disk with room, and run again"
                            % (prepared.volumeName, informativeLine(exc), tempfile.gettempdir()))
        args = ["--input", inputPath, "--model", prepared.modelPath, "--output-dir", os.path.join(workDir, "out"),
                "--samples", int(samples), "--device", device or "auto",
                "--localise", "off" if roiNode is not None else "auto"]  # a user's ROI wins
        if steps:
            args += ["--steps", int(steps)]
        if seed is not None:
            args += ["--seed", int(seed)]
        command = pythonModuleCommand("CDALSegmentationLib.segment_worker", args, python=python or self.python)
        job = SegmentationJob(command, env=subprocessEnvironment(self.baseEnvironment), prepared=prepared,
                              workDir=workDir, runnerFactory=self.runnerFactory)
        job.start()
        return job

    def finishSegmentation(self, job):
        """Create the output nodes from a finished SegmentationJob (GUI thread). Returns a SegmentationResult."""
        from .segment_worker import readOutputs

        if job.state != "done":
            raise CDALError("segmentation did not finish (%s): %s" % (job.state, job.error or job.message))
        prepared = job.prepared
        scene = prepared.volumeNode.GetScene()
        if scene is None or scene.GetNodeByID(prepared.volumeID) is not prepared.volumeNode:
            raise CDALError("input volume %s was removed while segmenting: load it again and re-run"
                            % prepared.volumeName)
        try:
            arrays, report = readOutputs(os.path.join(job.workDir, "out"))
        except (RuntimeError, OSError, ValueError) as exc:
            raise CDALError("segmentation results could not be read (%s): run again" % str(exc).splitlines()[0])
        result = self.createOutputNodes(prepared, arrays, report)
        done = [e for e in job.events if e.get("event") == "done"]
        if done:
            result.seconds = float(done[-1].get("seconds", 0.0))
            result.notes = list(done[-1].get("notes", []) or [])
        return result

    # ---- outputs -----------------------------------------------------------------------------------------
    @staticmethod
    def _pasteIntoFullGrid(prepared, arrays):
        """Outputs of the (cropped) input pasted into arrays of the whole volume's grid."""
        I, J, K = prepared.fullDimensions
        cropShape = tuple(reversed(prepared.image.GetSize()))  # (k, j, i)
        full = {}
        for key, dtype in (("labels", np.uint8), ("uncertainty", np.float32), ("attention", np.float32),
                           ("sides", np.uint8)):
            array = arrays.get(key)
            if array is None:
                full[key] = None
                continue
            if tuple(array.shape) != cropShape:
                raise CDALError("model output %s has shape %s, expected %s: the model or cdal_core is broken"
                                % (key, array.shape, cropShape))
            if prepared.ijkBox is None:
                full[key] = np.ascontiguousarray(array.astype(dtype))
            else:
                (i0, j0, k0), (i1, j1, k1) = prepared.ijkBox
                full[key] = np.zeros((K, J, I), dtype=dtype)
                full[key][k0:k1, j0:j1, i0:i1] = array
        if full["sides"] is None:
            full["sides"] = (full["labels"] > 0).astype(np.uint8) * 3
        return full

    def createOutputNodes(self, prepared, arrays, report=None):
        """Paste the (cropped) outputs into full-size arrays and create the nodes. All or nothing."""
        volumeNode = prepared.volumeNode
        scene = volumeNode.GetScene()
        changed = prepared.inputChangedSince()
        if changed:
            raise CDALError("input volume %s was changed while it was segmented (%s), so the results would not "
                            "match it: nothing was added; segment it again" % (prepared.volumeName, changed))
        full = self._pasteIntoFullGrid(prepared, arrays)
        base = "%s CDAL" % (prepared.volumeName if prepared.frame is None
                            else "%s frame %d" % (prepared.volumeName, prepared.frame))
        classes = foregroundClasses(prepared.card)
        structures = sideStructures(full["labels"], full["sides"], classes)
        result = SegmentationResult()
        result.inputVolumeNode = volumeNode
        result.modelName = os.path.basename(prepared.modelPath.rstrip("/\\"))
        result.ijkBox = prepared.ijkBox
        result.card = prepared.card
        result.report = dict(report or {})
        try:
            result.segmentationNode = self._createSegmentationNode(scene, base + " segmentation", volumeNode,
                                                                   structures)
            result.uncertaintyNode = self._createScalarNode(scene, base + " uncertainty", volumeNode,
                                                            prepared.ijkToRas, full["uncertainty"])
            self.setupOverlayDisplay(result.uncertaintyNode, "uncertainty")
            if full["attention"] is not None:
                result.attentionNode = self._createScalarNode(scene, base + " attention", volumeNode,
                                                              prepared.ijkToRas, full["attention"])
                self.setupOverlayDisplay(result.attentionNode, "attention")
            result.sliceTableNode = self._createSliceTable(scene, base + " slice uncertainty", full["labels"],
                                                           full["uncertainty"], classes)
            result.volumeTableNode = self._createVolumeTable(scene, base + " volumes", structures,
                                                             full["uncertainty"], prepared.ijkToRas, prepared.card,
                                                             result.report)
            centres = sideCentres(result.report, full["sides"], prepared.ijkToRas)
            for side, ras in centres.items():
                result.volumeTableNode.SetAttribute(CENTRE_ATTRIBUTE + side, ",".join("%.4f" % v for v in ras))
            for node in result.nodes():
                node.SetNodeReferenceID(INPUT_VOLUME_ROLE, volumeNode.GetID())
                node.SetAttribute(OUTPUT_ATTRIBUTE, node.GetClassName())
            self._fileBeside(volumeNode, result.nodes())
        except Exception:
            for node in result.nodes():
                if node.GetScene() is scene:
                    scene.RemoveNode(node)
            raise
        return result

    @staticmethod
    def _fileBeside(sourceNode, nodes):
        """Put ``nodes`` where ``sourceNode`` is in the subject hierarchy (a DICOM series' study, a user's folder),
        so that they are listed, exported and deleted with it; a source at the top level leaves them there."""
        import slicer

        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(sourceNode.GetScene())
        sourceItem = hierarchy.GetItemByDataNode(sourceNode) if hierarchy is not None else 0
        parent = hierarchy.GetItemParent(sourceItem) if sourceItem else 0
        if not parent or parent == hierarchy.GetSceneItemID():
            return
        for node in nodes:
            item = hierarchy.GetItemByDataNode(node)  # desktop Slicer makes one for every new data node
            if item:
                hierarchy.SetItemParent(item, parent)
            else:
                hierarchy.CreateItem(parent, node)

    @staticmethod
    def _uniqueName(scene, name):
        return scene.GenerateUniqueName(name)

    def _createSegmentationNode(self, scene, name, volumeNode, structures):
        import slicer
        import vtk
        from vtk.util import numpy_support

        segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self._uniqueName(scene, name))
        segNode.CreateDefaultDisplayNodes()
        # parent first: the reference geometry is stored in the segmentation's own frame, and Slicer multiplies in
        # any linear transform between the volume and the segmentation (so set later, it would apply twice)
        if volumeNode.GetParentTransformNode() is not None:
            segNode.SetAndObserveTransformNodeID(volumeNode.GetParentTransformNode().GetID())
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        segmentation = segNode.GetSegmentation()
        for structure in structures:
            # each labelmap covers only its structure's bounding box (extents are absolute IJK indices, so the
            # grid is the volume's): a whole head's hippocampus is ~0.1 % of it, and full-size copies per segment
            # took seconds and gigabytes on the GUI thread
            (k0, k1), (j0, j1), (i0, i1) = _boundingBox(structure.mask)
            image = slicer.vtkOrientedImageData()
            image.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            image.SetImageToWorldMatrix(matrix)
            voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
            voxels[:] = structure.mask[k0:k1, j0:j1, i0:i1].astype(np.uint8).ravel()
            image.Modified()
            segmentId = segNode.AddSegmentFromBinaryLabelmapRepresentation(image, structure.segmentName,
                                                                          list(structure.color))
            segmentation.GetSegment(segmentId).SetName(structure.segmentName)  # (the ID may differ)
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

    def _createTable(self, scene, name, columns, descriptions=None):
        """A table node from [(name, vtk array class, values)], column names shown as headers."""
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", self._uniqueName(scene, name))
        for columnName, arrayClass, values in columns:
            column = arrayClass()
            column.SetName(columnName)
            column.SetNumberOfTuples(len(values))
            for row, value in enumerate(values):
                column.SetValue(row, value.item() if hasattr(value, "item") else value)
            table.AddColumn(column)
        for columnName, text in (descriptions or {}).items():
            table.SetColumnDescription(columnName, text)
        useColumnNamesAsHeaders(table)
        table.SetLocked(True)  # a result, not a form: an edited cell would mislead the slice jumps and the plot
        return table

    def _createSliceTable(self, scene, name, labels, uncertainty, classes):
        import vtk

        stats = self.sliceStatistics(labels, uncertainty, classes)
        columns = [("Slice", vtk.vtkIntArray, stats["Slice"])]
        columns += [(key, vtk.vtkDoubleArray, stats[key]) for key in ("Mean uncertainty", "Max uncertainty")]
        columns += [("%s voxels" % c, vtk.vtkIntArray, stats["%s voxels" % c]) for _, c, _ in classes]
        return self._createTable(scene, name, columns, {
            "Slice": "Slice index K of the segmented volume (IJK)",
            "Mean uncertainty": "Mean per-voxel variance across the ensemble in this slice",
            "Max uncertainty": "Largest per-voxel variance in this slice"})

    def _createVolumeTable(self, scene, name, structures, uncertainty, ijkToRas, card=None, report=None):
        import vtk

        if uncertainty.shape[0] == 1:  # one slice: a 2D image, where a volume means nothing (PNGs have no spacing)
            return self._createAreaTable(scene, name, structures, uncertainty, card)
        voxelMm3 = abs(float(np.linalg.det(np.asarray(ijkToRas)[:3, :3])))
        rows = [(s.side, s.className, int(s.mask.sum()), float(s.mask.sum()) * voxelMm3,
                 float(uncertainty[s.mask].mean()) if s.mask.any() else 0.0) for s in structures]
        columns = [("Side", vtk.vtkStringArray, [r[0] for r in rows]),
                   ("Structure", vtk.vtkStringArray, [r[1] for r in rows]),
                   ("Voxels", vtk.vtkIntArray, [r[2] for r in rows]),
                   ("Volume mm3", vtk.vtkDoubleArray, [round(r[3], 1) for r in rows]),
                   ("Mean uncertainty", vtk.vtkDoubleArray, [r[4] for r in rows])]
        # the segmentation's own decision where its report has one (the note under the button says the same)
        decided = dict(((r.get("side"), r.get("name")), r.get("review")) for r in (report or {}).get("structures", []))
        review = self._reviewColumn(card, [(r[1], r[4], decided.get((r[0], r[1]))) for r in rows])
        return self._createTable(scene, name, columns + review, dict(
            {"Volume mm3": "Voxel count times voxel volume (mm^3)"}, **(REVIEW_DESCRIPTION if review else {})))

    def _createAreaTable(self, scene, name, structures, uncertainty, card=None):
        import vtk

        total = float(uncertainty.size)
        rows = [(s.className, int(s.mask.sum()), 100.0 * float(s.mask.sum()) / total,
                 float(uncertainty[s.mask].mean()) if s.mask.any() else 0.0) for s in structures]
        columns = [("Structure", vtk.vtkStringArray, [r[0] for r in rows]),
                   ("Pixels", vtk.vtkIntArray, [r[1] for r in rows]),
                   ("Image %", vtk.vtkDoubleArray, [round(r[2], 2) for r in rows]),
                   ("Mean uncertainty", vtk.vtkDoubleArray, [r[3] for r in rows])]
        review = self._reviewColumn(card, [(r[0], r[3], None) for r in rows])
        return self._createTable(scene, name, columns + review, dict(
            {"Image %": "Share of the image's pixels in this structure"}, **(REVIEW_DESCRIPTION if review else {})))

    @staticmethod
    def _reviewColumn(card, rows):
        """A "Check" column ("review" where a structure is more uncertain than the card allows), when the model's
        card has review limits (cdal_core.quality). ``rows``: (class name, mean uncertainty, decision already
        made by the segmentation or None)."""
        import vtk
        from cdal_core.quality import needs_review, review_limits

        limits = review_limits(card or {})
        if not limits:
            return []
        flags = [decided if decided is not None else needs_review(name, value, limits)
                 for name, value, decided in rows]
        return [("Check", vtk.vtkStringArray, ["review" if flag else "" for flag in flags])]

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
        return localToWorld(volumeNode, geometry.ijkToRasArray(volumeNode).dot(
            [(dims[0] - 1) / 2.0, (dims[1] - 1) / 2.0, float(k), 1.0])[:3])

    # ---- review: everything follows the volume that was segmented, not the input selector -------------------
    @staticmethod
    def segmentedVolume(outputNode):
        """The volume an output node (table, overlay, segmentation) was computed from, or None."""
        return outputNode.GetNodeReference(INPUT_VOLUME_ROLE) if outputNode is not None else None

    def sliceJumpRAS(self, sliceTable, k):
        """World RAS of slice ``k`` of the volume ``sliceTable`` belongs to."""
        volume = self.segmentedVolume(sliceTable)
        if volume is None:
            raise CDALError("the volume this table was computed from is gone: segment again")
        return self.sliceCenterRAS(volume, k)

    @staticmethod
    def mostUncertainSlice(sliceTable):
        """Slice index with the largest mean uncertainty (None for an empty table)."""
        import slicer.util

        mean = slicer.util.arrayFromTableColumn(sliceTable, "Mean uncertainty")
        slices = slicer.util.arrayFromTableColumn(sliceTable, "Slice")
        return int(slices[int(np.argmax(mean))]) if len(mean) else None

    def centreRAS(self, volumeTable, side):
        """World RAS of the left/right structure's centre stored with the results, or None."""
        text = volumeTable.GetAttribute(CENTRE_ATTRIBUTE + side) if volumeTable is not None else None
        volume = self.segmentedVolume(volumeTable)
        if not text or volume is None:
            return None
        return localToWorld(volume, [float(v) for v in text.split(",")])

    def overlayLayers(self, uncertaintyNode, attentionNode, showUncertainty, showAttention):
        """(background, foreground) volumes for the slice views: the segmented volume under the chosen map."""
        shown = uncertaintyNode if showUncertainty and uncertaintyNode is not None else (
            attentionNode if showAttention else None)
        background = self.segmentedVolume(uncertaintyNode or attentionNode)
        return background, shown

    @staticmethod
    def outputVolumeIDs(scene):
        """IDs of the volumes this module created (uncertainty, attention): never offered as inputs."""
        ids = []
        nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute(OUTPUT_ATTRIBUTE):
                ids.append(node.GetID())
        return ids

    def slicePlot(self, tableNode):
        """The uncertainty-per-slice chart of a table, created once and reused (vtkMRMLPlotChartNode)."""
        scene = tableNode.GetScene()
        chart = tableNode.GetNodeReference(PLOT_CHART_ROLE)
        if chart is not None:
            return chart
        name = tableNode.GetName() + " plot"
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
        tableNode.SetNodeReferenceID(PLOT_CHART_ROLE, chart.GetID())
        self._fileBeside(tableNode, [series, chart])
        return chart

    # ---- fine-tuning (see finetune.py) ---------------------------------------------------------------------
    def trainingPairs(self, scene):
        """(volume, segmentation) pairs in the scene: every segmentation node with a reference volume."""
        from .finetune import trainingPairsInScene

        return trainingPairsInScene(scene)

    def startFineTune(self, pairs, baseModel=DEFAULT_MODEL, newModelName=None, maxSteps=200, maxMinutes=None,
                      device="auto", workDir=None, python=None, config=None, keepData=False):
        """Start fine-tuning on (volume, segmentation) pairs; see ``finetune.startFineTune``."""
        from .finetune import startFineTune

        return startFineTune(pairs, baseModel=baseModel, newModelName=newModelName, maxSteps=maxSteps,
                             maxMinutes=maxMinutes, device=device, workDir=workDir, python=python or self.python,
                             config=config, baseEnvironment=self.baseEnvironment, keepData=keepData,
                             runnerFactory=self.runnerFactory)


# ---------------------------------------------------------------------------------------------------------------
# small Qt-free helpers
# ---------------------------------------------------------------------------------------------------------------
class Structure(object):
    """One segment to create: a model class on one side (side "unknown" when not localised)."""

    def __init__(self, classIndex, className, color, side, mask):
        self.classIndex, self.className, self.color, self.side, self.mask = classIndex, className, color, side, mask

    @property
    def segmentName(self):
        """"Left anterior", "Right posterior", or the class name when the side is unknown."""
        if self.side not in ("left", "right"):
            return self.className
        return "%s %s" % (self.side.capitalize(), self.className[:1].lower() + self.className[1:])


def _boundingBox(mask):
    """((k0, k1), (j0, j1), (i0, i1)) half-open bounds of a (K, J, I) mask's voxels; one voxel at the origin for an
    empty mask (a segment with nothing in it)."""
    bounds = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, 1))
    return bounds


def sideStructures(labels, sides, classes):
    """Structures per class and side present (a class found nowhere still gets one, empty, segment)."""
    structures = []
    for index, className, color in classes:
        inClass = labels == index
        present = sorted(set(int(v) for v in np.unique(sides[inClass])) - {0}) if inClass.any() else []
        if not present or present == [3]:
            structures.append(Structure(index, className, color, "unknown", inClass))
            continue
        for code in present:
            structures.append(Structure(index, className, color, SIDE_NAMES.get(code, "unknown"),
                                        inClass & (sides == code)))
    return structures


def sideCentres(report, sides, ijkToRas):
    """{"left"/"right": [R, A, S]} in the volume's local RAS: the localiser's centres when it reported
    them, else the centroid of the labelled voxels of that side."""
    centres = {}
    reported = ((report or {}).get("localisation") or {}).get("centres_ras") or {}
    for code, side in ((1, "left"), (2, "right")):
        if reported.get(side):
            centres[side] = [float(v) for v in reported[side]]
        elif sides is not None and np.any(sides == code):
            k, j, i = np.nonzero(sides == code)
            centres[side] = [float(v) for v in np.asarray(ijkToRas).dot([i.mean(), j.mean(), k.mean(), 1.0])[:3]]
    return centres


def localToWorld(volumeNode, ras):
    """A point in the volume's local RAS through its parent transform (if any) into world RAS."""
    parent = volumeNode.GetParentTransformNode()
    if parent is not None:
        import vtk

        transform = vtk.vtkGeneralTransform()
        parent.GetTransformToWorld(transform)
        ras = transform.TransformPoint([float(v) for v in ras])
    return [float(v) for v in ras]


def useColumnNamesAsHeaders(table):
    """Show column names as the table view's headers: Slicer 5.8+ ``SetUseColumnTitleAsColumnHeader``,
    5.6 ``SetUseColumnNameAsColumnHeader`` (without it 5.6 shows A/B/C and the names as row 0)."""
    for method in ("SetUseColumnTitleAsColumnHeader", "SetUseColumnNameAsColumnHeader"):
        if hasattr(table, method):
            getattr(table, method)(True)
            return method
    return None


def tableAsTSV(table):
    """The table as tab-separated text with a header row (for the clipboard)."""
    vtkTable = table.GetTable()
    columns = [vtkTable.GetColumn(c) for c in range(vtkTable.GetNumberOfColumns())]
    rows = ["\t".join(column.GetName() for column in columns)]
    for r in range(vtkTable.GetNumberOfRows()):
        rows.append("\t".join(_cellText(column.GetVariantValue(r)) for column in columns))
    return "\n".join(rows) + "\n"


def _cellText(variant):
    if variant.IsNumeric() and not variant.IsChar():
        value = variant.ToDouble()
        return ("%d" % value) if value == int(value) else ("%.6g" % value)
    return variant.ToString()


class SegmentationJob(ProcessJob):
    """Segmentation running in a child process; holds the validated input for ``finishSegmentation``."""

    def __init__(self, command, env=None, prepared=None, workDir=None, runnerFactory=None):
        ProcessJob.__init__(self, command, env=env, name="segmentation", runnerFactory=runnerFactory)
        self.prepared = prepared
        self.workDir = workDir

    @property
    def volumeNode(self):
        """The volume being segmented: results, jumps and overlays belong to it."""
        return self.prepared.volumeNode if self.prepared is not None else None

    def succeeded(self):
        return any(e.get("event") == "done" for e in self.events) and os.path.exists(
            os.path.join(self.workDir, "out", "labels.nrrd"))

    def cleanup(self):
        self.cancel()
        removeTree(self.workDir)  # the input's copy lies here


__all__ = ["CDALSegmentationLogic", "SegmentationResult", "SegmentationJob", "CDALError", "CancelledError",
           "listModels", "resolveModelPath", "readModelCard", "userModelsDir", "modelKind", "tableAsTSV",
           "useColumnNamesAsHeaders"]
