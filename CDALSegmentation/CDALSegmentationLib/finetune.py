"""Fine-tuning from the scene (Qt-free): export (volume, segmentation) pairs to an MSD-style folder, run
``python -m cdal_core.cli finetune ... --json-progress`` in a child process, follow its progress, cancel it
(process tree killed), and register the result as a per-user model (``cdal_core.model_io.user_models_dir()``,
never the install folder) so that it appears in the model list.
"""
import json
import os
import re
import shutil
import time

import numpy as np

from . import geometry
from .jobs import ProcessJob, pythonModuleCommand, removeTree
from .segment_worker import isImageModel
from .paths import ensureCoreOnPath, subprocessEnvironment

ensureCoreOnPath()
from cdal_core.data import check_intensities  # noqa: E402  (numpy + SimpleITK, no torch)
from cdal_core.errors import CDALError  # noqa: E402
from cdal_core.localise import TrainingCrop, region_specs, training_crops  # noqa: E402


def safeName(text):
    # type: (str) -> str
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text).strip()).strip("-.")
    return name or "model"


def trainingPairsInScene(scene):
    """[(volumeNode, segmentationNode)] for every segmentation whose reference geometry is an image volume."""
    pairs = []
    for segNode in _nodesByClass(scene, "vtkMRMLSegmentationNode"):
        role = segNode.GetReferenceImageGeometryReferenceRole()
        volume = segNode.GetNodeReference(role)
        if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            pairs.append((volume, segNode))
    return pairs


def _nodesByClass(scene, className):
    nodes = []
    collection = scene.GetNodesByClass(className)
    for i in range(collection.GetNumberOfItems()):
        nodes.append(collection.GetItemAsObject(i))
    return nodes


def labelArrayForPair(volumeNode, segmentationNode, card, overlaps=None):
    """(K, J, I) uint8 label array in the volume's grid, classes matched by segment name (case-insensitive).

    Returns (array, matchedClassNames). Raises CDALError when no segment matches a model class. Voxels in the
    segments of two classes go to the later class; ``overlaps`` (a list) gets a line naming each such segment.
    """
    import slicer.util

    segmentation = segmentationNode.GetSegmentation()
    byName = {}  # class name -> segment IDs ("Anterior", "Left anterior", "Right anterior" all count)
    for i in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(i).GetName().strip().lower()
        for prefix in ("left ", "right "):
            if name.startswith(prefix):
                name = name[len(prefix):].strip()
        byName.setdefault(name, []).append(segmentation.GetNthSegmentID(i))
    dims = volumeNode.GetImageData().GetDimensions()
    labels = np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8)
    matched = []
    for c in sorted(card["classes"], key=lambda c: int(c["index"])):
        index, name = int(c["index"]), str(c["name"])
        if index == 0:
            continue
        segmentIds = byName.get(name.strip().lower())
        if not segmentIds:
            continue
        for segmentId in segmentIds:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            if mask is None or tuple(mask.shape) != labels.shape:
                raise CDALError("segment '%s' of %s could not be resampled onto %s: check the segmentation's "
                                "geometry" % (name, segmentationNode.GetName(), volumeNode.GetName()))
            overlap = (mask > 0) & (labels != 0) & (labels != index)
            if overlaps is not None and overlap.any():
                overlaps.append("%s: segment '%s' overlaps another class's segment in %d voxels (trained as %s "
                                "there): remove the overlap in Segment Editor if that is wrong"
                                % (segmentationNode.GetName(), name, int(np.count_nonzero(overlap)), name))
            labels[mask > 0] = index
        matched.append(name)
    if not matched:
        names = [c["name"] for c in card["classes"] if int(c["index"]) != 0]
        have = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        raise CDALError("segmentation %s has no segment named like the model's classes (%s; it has %s): rename the "
                        "segments in Segment Editor" % (segmentationNode.GetName(), ", ".join(names),
                                                        ", ".join(have) or "no segments"))
    return labels, matched


def exportTrainingData(pairs, outDir, card, cutHeads=True):
    """Write ``dataset.json``, ``imagesTr/`` and ``labelsTr/`` (NIfTI) for the pairs. A whole head becomes one
    crop per labelled hippocampus (``cdal_core.localise.training_crops``: the boxes inference segments), named
    ``<volume>_left`` / ``_right``. ``cutHeads=False`` writes every volume whole (uncompressed ``.nii``), for the
    fine-tuning child to cut (``cutsHeadsInChild``): the registration takes seconds per head, too long for the
    GUI thread. Returns (outDir, warnings)."""
    import SimpleITK as sitk

    if not pairs:
        raise CDALError("no training data: segment a volume (and correct it in Segment Editor) first, then choose "
                        "the segmentations to fine-tune on")
    channels = int(card["input"].get("image_channels", 1))
    if isImageModel(card):
        return _exportImagePairs(pairs, outDir, card, channels)
    os.makedirs(os.path.join(outDir, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(outDir, "labelsTr"), exist_ok=True)
    training = []
    warnings = []
    used = set()
    labelled = 0
    for number, (volumeNode, segNode) in enumerate(pairs):
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise CDALError("segmentation %s has no image volume: set its source volume in Segment Editor"
                            % segNode.GetName())
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != channels:
            raise CDALError("%s has %d components per voxel, the model expects %d: fine-tune on single 3D scalar "
                            "volumes (one frame of a multi-frame series)"
                            % (volumeNode.GetName(), volumeNode.GetImageData().GetNumberOfScalarComponents(),
                               channels))
        labels, matched = labelArrayForPair(volumeNode, segNode, card, overlaps=warnings)
        labelled += bool(labels.any())
        missing = [c["name"] for c in card["classes"] if int(c["index"]) != 0 and c["name"] not in matched]
        if missing:
            warnings.append("%s: no segment for %s (treated as background)" % (segNode.GetName(), ", ".join(missing)))
        if not labels.any():
            warnings.append("%s: all segments are empty" % segNode.GetName())
        stem = safeName(volumeNode.GetName())[:40]
        if stem in used:
            stem = "%s_%03d" % (stem, number)
        used.add(stem)
        image = geometry.sitkImageFromVolumeNode(volumeNode)
        # Segment's checks, by the volume's name: NIfTI export would turn NaN into 0 without a word, and the child
        # would refuse a constant volume by its temporary file name
        check_intensities(sitk.GetArrayViewFromImage(image), volumeNode.GetName(), purpose="train")
        label = sitk.GetImageFromArray(labels)
        label.CopyInformation(image if image.GetNumberOfComponentsPerPixel() == 1 else
                              sitk.VectorIndexSelectionCast(image, 0))
        # a whole head is cut into the boxes inference segments; a crop-sized volume is written as it is
        crops, cropWarnings = training_crops(image, label, card, name=volumeNode.GetName()) \
            if cutHeads and labels.any() else ([TrainingCrop(None, image, label)], [])
        warnings.extend(cropWarnings)
        suffix = ".nii.gz" if cutHeads else ".nii"  # whole heads for the child: temporary, so not compressed
        for crop in crops:
            name = (stem if crop.side is None else "%s_%s" % (stem, crop.side)) + suffix
            sitk.WriteImage(crop.image, os.path.join(outDir, "imagesTr", name), cutHeads)
            sitk.WriteImage(crop.labels, os.path.join(outDir, "labelsTr", name), cutHeads)
            training.append({"image": "./imagesTr/" + name, "label": "./labelsTr/" + name})
    _refuseUnlabelled(labelled, pairs)
    meta = {
        "name": "CDALSegmentation fine-tuning data",
        "description": "exported from 3D Slicer by CDALSegmentation",
        "tensorImageSize": "3D",
        "modality": {"0": str(card["input"].get("modality", "MRI"))},
        "labels": dict((str(int(c["index"])), str(c["name"])) for c in card["classes"]),
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    with open(os.path.join(outDir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return outDir, warnings


def _refuseUnlabelled(labelled, pairs):
    """Segmentations whose segments are all empty teach the model to find nothing: refused before training."""
    if not labelled:
        raise CDALError("every segment of %s is empty, so there is nothing to learn: paint or correct the "
                        "structures in Segment Editor first" % ", ".join(seg.GetName() for _, seg in pairs))


def cutsHeadsInChild(card):
    """True for a volume model with template boxes (the hippocampus models): its fine-tuning child cuts the
    exported volumes into those boxes (``finetune_worker --cut-heads``), whole heads and crops alike."""
    return not isImageModel(card) and bool(region_specs(card))


def _exportImagePairs(pairs, outDir, card, channels):
    """A 2D model trains on ``images/`` + ``masks/`` (``cdal_core.data.read_png_pairs``): each single-slice volume
    as a TIFF (its pixel values kept, 16-bit X-rays included) and its mask as 0/255. Returns (outDir, warnings)."""
    import SimpleITK as sitk

    for folder in ("images", "masks"):
        os.makedirs(os.path.join(outDir, folder), exist_ok=True)
    warnings, used, labelled = [], set(), 0
    for number, (volumeNode, segNode) in enumerate(pairs):
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise CDALError("segmentation %s has no image volume: set its source volume in Segment Editor"
                            % segNode.GetName())
        labels, _ = labelArrayForPair(volumeNode, segNode, card, overlaps=warnings)
        labelled += bool(labels.any())
        if labels.shape[0] != 1:
            raise CDALError("%s has %d slices, but %s is a 2D model: fine-tune it on single images (PNG/TIFF "
                            "loaded in Slicer)" % (volumeNode.GetName(), labels.shape[0], card.get("name", "this")))
        if not labels.any():
            warnings.append("%s: all segments are empty" % segNode.GetName())
        image = geometry.sitkImageFromVolumeNode(volumeNode)
        check_intensities(sitk.GetArrayViewFromImage(image), volumeNode.GetName(), purpose="train")
        pixels = _imagePixels(image, channels, volumeNode.GetName())
        stem = safeName(volumeNode.GetName())[:40]
        if stem in used:
            stem = "%s_%03d" % (stem, number)
        used.add(stem)
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3),
                        os.path.join(outDir, "images", stem + ".tif"))
        mask = (labels[0] > 0).astype(np.uint8) * 255 if len(card["classes"]) == 2 else labels[0]
        sitk.WriteImage(sitk.GetImageFromArray(mask), os.path.join(outDir, "masks", stem + ".tif"))
    _refuseUnlabelled(labelled, pairs)
    return outDir, warnings


def _imagePixels(image, channels, name):
    """(H, W) or (H, W, 3) pixels of a single-slice image; a grey image stored as RGB (equal channels) is grey and
    alpha is ignored, as Segment does (``logic._checkImageChannels``)."""
    import SimpleITK as sitk

    pixels = sitk.GetArrayFromImage(image)[0]
    if pixels.ndim == 3 and channels == 1:
        if not all(np.array_equal(pixels[..., 0], pixels[..., c]) for c in range(1, min(3, pixels.shape[-1]))):
            raise CDALError("%s is a colour image but the model expects greyscale: convert it to greyscale first"
                            % name)
        pixels = pixels[..., 0]
    elif channels == 3 and (pixels.ndim != 3 or pixels.shape[-1] < 3):
        raise CDALError("%s is a greyscale image but the model expects RGB (3 channels)" % name)
    elif channels == 3:
        pixels = pixels[..., :3]
    if pixels.dtype not in (np.uint8, np.uint16):
        pixels = pixels.astype(np.float32)
    return np.ascontiguousarray(pixels)


class FineTuneJob(ProcessJob):
    """``cdal finetune`` in a child process; registers the model in the per-user folder when done."""

    def __init__(self, command, env, runDir, newModelName, baseModelName, numCases, cwd=None, dataDir=None,
                 keepData=False, runnerFactory=None):
        ProcessJob.__init__(self, command, env=env, cwd=cwd, name="fine-tuning", runnerFactory=runnerFactory)
        self.runDir = runDir
        self.dataDir = dataDir  # copies of the patients' images: removed after the run unless keepData
        self.keepData = keepData
        self.device = None  # reported by the child (finetune_worker)
        self.newModelName = newModelName
        self.baseModelName = baseModelName
        self.numCases = numCases
        self.step = 0
        self.maxSteps = None
        self.modelPath = None  # registered model folder once done
        self.warnings = []  # type: List[str]

    def handleEvent(self, event):
        kind = event.get("event")
        if kind == "device":
            self.device = event.get("device")
            if event.get("warning"):
                self.warnings.insert(0, str(event["warning"]))
            self.message = "Fine-tuning on %s" % ("the GPU" if self.device == "cuda" else "the CPU")
        elif kind == "progress":
            self.step = int(event.get("step", self.step))
            if event.get("max_steps"):
                self.maxSteps = int(event["max_steps"])
                self.fraction = min(1.0, float(self.step) / max(1, self.maxSteps))
            self.etaSeconds = event.get("eta_seconds")
            self.message = "Step %d/%s" % (self.step, self.maxSteps or "?")
        elif kind == "validation":
            dice = event.get("mean_dice")
            if dice is not None:
                self.message = "Step %d/%s, validation Dice %.3f" % (self.step, self.maxSteps or "?", float(dice))
        elif kind == "note" and event.get("message"):
            # what the trainer wants the user to know (an ensemble fine-tuned into one generator, a collapse onto
            # the background): shown with the result
            message = str(event["message"])
            if message not in self.warnings:
                self.warnings.append(message)
        elif kind == "cropping":
            self.message = "Cutting the training boxes out of volume %s of %s" % (event.get("case"),
                                                                               event.get("cases"))
        elif kind == "time_limit":
            self.message = "Time limit reached at step %s, saving" % event.get("step")
        elif kind == "error":
            self.error = str(event.get("message", ""))
        elif kind == "done":
            self.message = "Saving model"

    def succeeded(self):
        return self._trainedModelDir() is not None

    def _trainedModelDir(self):
        done = [e for e in self.events if e.get("event") == "done" and e.get("model")]
        candidates = []
        if done:
            path = str(done[-1]["model"])
            if not os.path.isabs(path):
                path = os.path.join(self.cwd or os.getcwd(), path)
            candidates.append(path)
        candidates.append(os.path.join(self.runDir, "model"))
        for path in candidates:
            if os.path.isfile(os.path.join(path, "model.json")):
                return path
        return None

    def removeTrainingData(self):
        """Delete the exported image copies (privacy, disk) unless the user asked to keep them."""
        if self.dataDir and not self.keepData:
            removeTree(self.dataDir)

    def onFailed(self):
        self.removeTrainingData()

    def onCancelled(self):
        self.removeTrainingData()

    def onDone(self):
        self.removeTrainingData()
        try:
            self.modelPath = registerModel(self._trainedModelDir(), self.newModelName, self.baseModelName,
                                           self.numCases)
            self.message = "Fine-tuned model '%s' is ready" % os.path.basename(self.modelPath)
        except (CDALError, OSError) as exc:
            self.state = "failed"
            self.message = "Failed"
            self.error = "could not register the fine-tuned model: %s" % exc


def registerModel(trainedDir, newModelName, baseModelName="", numCases=0):
    """Copy a trained model folder into the per-user model folder under a new, unused name. Returns its path."""
    from .logic import userModelsDir

    root = userModelsDir()
    os.makedirs(root, exist_ok=True)
    name = safeName(newModelName)
    candidate, n = name, 2
    while os.path.exists(os.path.join(root, candidate)):
        candidate = "%s-%d" % (name, n)
        n += 1
    staging = os.path.join(root, "." + candidate + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trainedDir, staging)
    cardPath = os.path.join(staging, "model.json")
    with open(cardPath) as f:
        card = json.load(f)
    card["name"] = candidate
    card["fine_tuned_from"] = baseModelName
    card["fine_tuned_cases"] = int(numCases)
    card["fine_tuned_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(cardPath, "w") as f:
        json.dump(card, f, indent=2)
    target = os.path.join(root, candidate)
    os.rename(staging, target)
    return target


def runsDir():
    from .logic import userModelsDir

    return os.path.join(os.path.dirname(os.path.abspath(userModelsDir())), "runs")


def startFineTune(pairs, baseModel="hippocampus", newModelName=None, maxSteps=200, maxMinutes=None,
                  device="auto", workDir=None, python=None, config=None, baseEnvironment=None, keepData=False,
                  runnerFactory=None):
    """Export the pairs and start the fine-tuning child process. Returns a running FineTuneJob.

    ``job.warnings`` holds export warnings, and the CPU warning once the child reports its device (the
    device is probed in the child, never by importing torch here). The exported images under
    ``<workDir>/data`` are deleted when the run ends unless ``keepData``.
    ``config``: optional dict of training settings passed to ``cdal finetune --config`` (e.g. batch_size).
    """
    from .logic import readModelCard, resolveModelPath

    modelPath = resolveModelPath(baseModel)
    card = readModelCard(modelPath)
    baseName = os.path.basename(modelPath.rstrip("/\\"))
    if not pairs:
        raise CDALError("no training data: choose at least one segmentation (with its volume) to fine-tune on")
    if maxSteps is not None and int(maxSteps) < 1:
        raise CDALError("number of fine-tuning steps must be at least 1")
    newModelName = safeName(newModelName or "%s-finetuned-%s" % (baseName, time.strftime("%Y%m%d-%H%M")))
    if workDir is None:
        workDir = os.path.join(runsDir(), "%s-%s" % (newModelName, time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(workDir, exist_ok=True)
    exportDir = os.path.join(workDir, "data")  # every copy of a patient's image lies under it
    inChild = cutsHeadsInChild(card)
    try:
        _, warnings = exportTrainingData(pairs, os.path.join(exportDir, "volumes") if inChild else exportDir,
                                         card, cutHeads=not inChild)
    except Exception:
        removeTree(exportDir)  # no half-exported patient images
        raise
    runDir = os.path.join(workDir, "run")
    trainDir = os.path.join(exportDir, "crops") if inChild else exportDir
    args = ["--model", modelPath, "--data", trainDir, "--out", runDir, "--device", device or "auto",
            "--json-progress"]
    if inChild:
        args += ["--cut-heads", os.path.join(exportDir, "volumes")]
    if maxSteps:
        args += ["--max-steps", int(maxSteps)]
    if maxMinutes:
        args += ["--max-minutes", float(maxMinutes)]
    if config:
        configPath = os.path.join(workDir, "finetune-config.json")
        with open(configPath, "w") as f:
            json.dump(config, f, indent=1)
        args += ["--config", configPath]
    command = pythonModuleCommand("CDALSegmentationLib.finetune_worker", args, python=python)
    job = FineTuneJob(command, subprocessEnvironment(baseEnvironment), runDir, newModelName, baseName,
                      len(pairs), cwd=workDir, dataDir=exportDir, keepData=keepData, runnerFactory=runnerFactory)
    job.warnings = list(warnings)
    job.start()
    return job
