"""2D images in Slicer (issue 16): a PNG/TIFF loaded as one slice (grey: scalar volume, RGB: vector volume)
segments with a 2D model; outputs lie on the image's single-slice grid; wrong pairings are refused.

Nodes are built as desktop Slicer's PNG reader builds them (ITK: one slice, I x J x 1, LPS identity direction);
slicer-core has no PNG reader, so the pixels come through SimpleITK. The grey model is the shipped ``cxr``; the
RGB model is the shipped ``monuseg`` when present, else a tiny untrained 3-channel model trained here.
"""
import csv
import os

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer.util
from cdal_core.errors import CDALError
from CDALSegmentationLib import geometry
from CDALSegmentationLib.logic import listModels, readModelCard

from helpers import scene_snapshot, volume_from_array, volume_from_sitk

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CXR_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "CXR")
CXR_IMAGE = "CHNCXR_0603_1"  # a Shenzhen image from configs/cxr_val.txt
RUN = dict(samples=3, steps=2, seed=0, device="cpu")
SPACING, ORIGIN = (0.4, 0.4, 1.0), (12.0, -30.0, 5.0)  # LPS, as ITK would read a TIFF with a resolution


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch):
    """One thread count for the module's run and the direct one: equal seeds then give equal maps (the count
    changes the float summation order and by default follows the cores other processes leave free)."""
    monkeypatch.setenv("CDAL_THREADS", "1")


@pytest.fixture(scope="module")
def cxr_model():
    path = os.path.join(REPO, "Resources", "Models", "cxr")
    if not os.path.isfile(os.path.join(path, "model.json")):
        pytest.skip("the shipped cxr model is not here")
    return path


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """A 3-channel 2D model: the shipped monuseg, else two training steps of a tiny one on synthetic RGB discs."""
    shipped = os.path.join(REPO, "Resources", "Models", "monuseg")
    if os.path.isfile(os.path.join(shipped, "model.json")):
        return shipped
    from cdal_core.config import TrainConfig
    from cdal_core.trainer import train

    data = tmp_path_factory.mktemp("rgb2d")
    for folder in ("images", "masks"):
        (data / folder).mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        image, mask = _rgb_discs(rng, (48, 56))
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(data / "images" / ("t%d.png" % i)))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(data / "masks" / ("t%d.png" % i)))
    config = {"network": {"base_channels": 8, "channel_mults": [1, 2], "latent_dim": 8, "time_dim": 16,
                          "disc_channels": 8, "disc_mults": [1, 2], "attention_block": 0, "mapping_layers": 1,
                          "image_channels": 3},
              "batch_size": 4, "train_size": [32, 32], "image_size": [64, 64], "num_steps": 2, "val_every": 1000,
              "val_max_volumes": 1, "val_samples": 1, "checkpoint_every": 1000, "log_every": 1, "augmentation": None}
    out = tmp_path_factory.mktemp("rgb2d-run")
    return str(train(str(data), str(out), TrainConfig.from_dict(config), max_steps=2, device="cpu"))


def _rgb_discs(rng, shape):
    """An H&E-like tinted RGB image with bright discs, and its 0/255 mask."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = np.zeros(shape, bool)
    for _ in range(3):
        cy, cx, r = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.integers(4, 9)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    grey = 60 + 120 * mask + rng.normal(0, 15, shape)
    image = np.stack([grey, 0.6 * grey + 40, 0.8 * grey + 20], -1)
    return np.clip(image, 0, 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def _slice_node(pixels, name):
    """A (H, W) or (H, W, 3) image as Slicer holds a loaded PNG/TIFF: one slice, a vector volume for RGB."""
    image = sitk.JoinSeries(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3))  # size (W, H, 1)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    return volume_from_sitk(image, name)


def _chest_xray():
    """(pixels, lung fraction from the data manifest) of a held-out CXR, or a synthetic chest and None."""
    path = os.path.join(CXR_DATA, "images", CXR_IMAGE + ".png")
    if not os.path.isfile(path):
        yy, xx = np.mgrid[:160, :200]
        lungs = sum(((yy - 80) / 55.0) ** 2 + ((xx - cx) / 35.0) ** 2 <= 1 for cx in (60, 140))
        return (200 - 120 * lungs + np.random.default_rng(0).normal(0, 8, yy.shape)).clip(0, 255).astype(np.uint8), None
    with open(os.path.join(CXR_DATA, "manifest.csv")) as f:
        fraction = [float(row["lung_frac"]) for row in csv.DictReader(f) if row["name"] == CXR_IMAGE + ".png"][0]
    return sitk.GetArrayFromImage(sitk.ReadImage(path)), fraction


def _direct_2d(pixels, model_path):
    """What ``cdal predict`` computes for the same pixels (predict2d on the array, no Slicer)."""
    from cdal_core.model_io import load_model
    from cdal_core.predict2d import image_array_2d, segment_image_2d

    model = load_model(model_path, device="cpu")
    array = image_array_2d(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3), model.config.image_channels,
                           "direct")
    return segment_image_2d(array, model, steps=RUN["steps"], samples=RUN["samples"], seed=RUN["seed"], device="cpu")


def _assert_on_input_grid(result, volume):
    """Every output has the input's single-slice grid, so overlays line up with it in the slice views."""
    dims = volume.GetImageData().GetDimensions()
    matrix = geometry.ijkToRasArray(volume)
    for node in (result.uncertaintyNode, result.attentionNode):
        assert node.GetImageData().GetDimensions() == dims
        assert np.allclose(geometry.ijkToRasArray(node), matrix)
    segmentation = result.segmentationNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        labelmap = segmentation.GetNthSegment(i).GetRepresentation("Binary labelmap")
        imageToWorld = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(imageToWorld)
        assert np.allclose([[imageToWorld.GetElement(r, c) for c in range(4)] for r in range(4)], matrix)
        extent = labelmap.GetExtent()
        assert extent[4] == extent[5] == 0, "the labelmap must stay on the image's only slice"
    assert result.labelArray().shape == (dims[2], dims[1], dims[0])


def test_grey_png_with_cxr_gives_lungs_on_the_input_grid(app, logic, cxr_model, vtk_errors):
    pixels, lung_fraction = _chest_xray()
    volume = _slice_node(pixels, "xray")
    assert volume.GetImageData().GetDimensions() == (pixels.shape[1], pixels.shape[0], 1)
    mine = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "xray CDAL segmentation")  # the user's node
    result = logic.segment(volume, model=cxr_model, **RUN)

    _assert_on_input_grid(result, volume)
    assert result.segmentationNode is not mine and app.scene.GetNodeByID(mine.GetID()) is mine
    assert mine.GetName() == "xray CDAL segmentation" and mine.GetSegmentation().GetNumberOfSegments() == 0
    card = readModelCard(cxr_model)
    segment = result.segmentationNode.GetSegmentation().GetNthSegment(0)
    assert result.segmentationNode.GetSegmentation().GetNumberOfSegments() == 1 and segment.GetName() == "Lungs"
    assert np.allclose(segment.GetColor(), np.array(card["classes"][1]["color"]) / 255.0)
    assert slicer.util.arrayFromTableColumn(result.sliceTableNode, "Slice").tolist() == [0]
    labels = result.labelArray()[0]
    # an image has pixels and a share of the image, not a volume in mm3 (a PNG carries no spacing)
    table = result.volumeTableNode
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == \
        ["Structure", "Pixels", "Image %", "Mean uncertainty"]
    assert slicer.util.arrayFromTableColumn(table, "Pixels").tolist() == [int((labels == 1).sum())]
    assert slicer.util.arrayFromTableColumn(table, "Image %")[0] == pytest.approx(100 * labels.mean(), abs=0.01)
    # the same labels as cdal predict on the same pixels: no flip or transpose on the way through Slicer
    direct = _direct_2d(pixels, cxr_model)
    assert np.array_equal(labels, direct.labels)
    assert np.allclose(slicer.util.arrayFromVolume(result.uncertaintyNode)[0], direct.uncertainty, atol=1e-6)
    assert not vtk_errors.messages, vtk_errors.messages
    if lung_fraction is None:
        pytest.skip("CXR images not here (%s): geometry checked on a synthetic image only" % CXR_DATA)
    # a real chest X-ray (its left lung is opaque): as much lung as its reference mask holds (manifest), and
    # that lung on the image's left, the patient's right
    assert abs(labels.mean() - lung_fraction) < 0.03, (labels.mean(), lung_fraction)
    assert labels[:, : labels.shape[1] // 2].mean() > 0.3


def test_background_job_segments_a_2d_image_like_in_process(app, logic, cxr_model):
    volume = _slice_node(_chest_xray()[0][::2, ::2].copy(), "small xray")
    direct = logic.segment(volume, model=cxr_model, **RUN)
    job = logic.startSegmentation(volume, model=cxr_model, **RUN)
    try:
        assert job.wait(timeout=180) == "done", (job.error, job.stderrLines[-5:])
        result = logic.finishSegmentation(job)
    finally:
        job.cleanup()
    _assert_on_input_grid(result, volume)
    assert result.labelArray().any() and np.array_equal(result.labelArray(), direct.labelArray())
    assert result.segmentationNode.GetName() != direct.segmentationNode.GetName()  # nothing overwritten


def test_rgb_vector_volume_with_rgb_model(app, logic, rgb_model):
    pixels, _ = _rgb_discs(np.random.default_rng(3), (70, 90))
    volume = _slice_node(pixels, "tile")
    assert volume.IsA("vtkMRMLVectorVolumeNode") and volume.GetImageData().GetNumberOfScalarComponents() == 3
    result = logic.segment(volume, model=rgb_model, **RUN)
    _assert_on_input_grid(result, volume)
    direct = _direct_2d(pixels, rgb_model)  # channels reach the model in R, G, B order
    assert np.array_equal(result.labelArray()[0], direct.labels)
    uncertainty = slicer.util.arrayFromVolume(result.uncertaintyNode)[0]
    assert uncertainty.any() and np.allclose(uncertainty, direct.uncertainty, atol=1e-6)


def test_grey_stored_as_rgb_segments_as_grey(app, logic, cxr_model):
    pixels = _chest_xray()[0][::4, ::4].copy()
    grey = logic.segment(_slice_node(pixels, "grey"), model=cxr_model, **RUN)
    as_rgb = logic.segment(_slice_node(np.repeat(pixels[..., None], 3, axis=-1), "grey as rgb"), model=cxr_model,
                           **RUN)
    assert grey.labelArray().any() and np.array_equal(as_rgb.labelArray(), grey.labelArray())


def test_grey_rgba_x_ray_segments_and_exports_as_grey(app, logic, cxr_model, tmp_path):
    """A grey X-ray saved as RGBA (alpha 255) loads as a 4-component vector volume: Segment reads it as grey, and so
    must the fine-tune export (it compared the alpha channel too and called the image colour)."""
    from CDALSegmentationLib import finetune

    pixels = _chest_xray()[0][::4, ::4].copy()
    rgba = np.concatenate([np.repeat(pixels[..., None], 3, axis=-1), np.full(pixels.shape + (1,), 255, pixels.dtype)],
                          axis=-1)
    volume = _slice_node(rgba, "xray rgba")
    assert volume.GetImageData().GetNumberOfScalarComponents() == 4
    result = logic.segment(volume, model=cxr_model, **RUN)
    grey = logic.segment(_slice_node(pixels, "xray grey"), model=cxr_model, **RUN)
    assert np.array_equal(result.labelArray(), grey.labelArray())
    finetune.exportTrainingData([(volume, result.segmentationNode)], str(tmp_path / "data"), readModelCard(cxr_model))
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "data" / "images" / "xray-rgba.tif")))
    assert np.array_equal(exported, pixels)


def test_roi_crops_a_2d_image(app, logic, cxr_model):
    pixels = _chest_xray()[0][::2, ::2].copy()
    volume = _slice_node(pixels, "xray")
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    # (i, j) 20..59 x 10..69, and thin along the slice normal: the single slice is the image's whole depth
    low, high = geometry.ijkToRasArray(volume).dot([19.6, 9.6, 0, 1])[:3], geometry.ijkToRasArray(volume).dot(
        [59.4, 69.4, 0, 1])[:3]
    roi.SetCenter(list((low + high) / 2))
    roi.SetSize(list(np.abs(high - low) + [0, 0, 0.5]))
    result = logic.segment(volume, model=cxr_model, roiNode=roi, **RUN)
    _assert_on_input_grid(result, volume)
    uncertainty = slicer.util.arrayFromVolume(result.uncertaintyNode)[0]
    outside = np.ones(uncertainty.shape, bool)
    outside[10:70, 20:60] = False
    assert uncertainty[~outside].any() and not uncertainty[outside].any()


# -- refusals: one line naming the problem and the fix, and the scene as it was ------------------------------
def _refused(app, call, *words):
    before = scene_snapshot(app.scene)
    with pytest.raises(CDALError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert scene_snapshot(app.scene) == before, "a refused run changed the scene"
    return message


def _hippocampus():
    if "hippocampus" not in listModels():
        pytest.skip("the shipped hippocampus model is not here")
    return "hippocampus"


def test_3d_volume_into_2d_model_is_refused(app, logic, cxr_model):
    volume = volume_from_array(np.random.default_rng(0).normal(100, 20, (6, 30, 40)).astype(np.float32),
                               np.eye(4), "mri")
    message = _refused(app, lambda: logic.segment(volume, model=cxr_model), "3D volume", "2D images", "cxr")
    if "hippocampus" in listModels():
        assert "(hippocampus" in message or ", hippocampus" in message, message  # names a 3D model to use


def test_numbered_image_files_loaded_as_a_stack_are_named(app, logic, cxr_model):
    """Slicer reads 00000001_000.png, _001, _002 (a patient's follow-ups, NIH ChestX-ray14 names) as one 3-slice
    volume unless Single File is ticked: the refusal says so and how to reload, not only '3D volume'."""
    volume = volume_from_array(np.random.default_rng(0).normal(100, 20, (3, 30, 40)).astype(np.float32),
                               np.eye(4), "00000001_000")
    storage = app.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName("/data/xrays/00000001_000.png")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    _refused(app, lambda: logic.segment(volume, model=cxr_model), "stack of 3 images", "00000001_000.png",
             "Single File", "cxr")


def test_2d_image_into_3d_model_is_refused(app, logic, cxr_model):
    volume = _slice_node(_chest_xray()[0][::4, ::4].copy(), "xray")
    _refused(app, lambda: logic.segment(volume, model=_hippocampus()), "2D image", "3D volumes", "cxr")


def test_colour_image_into_grey_model_is_refused(app, logic, cxr_model):
    pixels, _ = _rgb_discs(np.random.default_rng(1), (40, 50))
    volume = _slice_node(pixels, "tile")
    _refused(app, lambda: logic.segment(volume, model=cxr_model), "RGB", "greyscale", "'cxr'", "Vector to Scalar")


def test_grey_image_into_rgb_model_is_refused(app, logic, rgb_model):
    pixels = _chest_xray()[0][::4, ::4].copy()
    volume = _slice_node(pixels, "xray")
    _refused(app, lambda: logic.segment(volume, model=rgb_model), "greyscale", "RGB", "cxr")


def test_a_slice_across_the_image_plane_is_refused(app, logic, cxr_model):
    volume = volume_from_array(np.random.default_rng(0).normal(100, 20, (30, 1, 40)).astype(np.float32),
                               np.eye(4), "coronal line")
    _refused(app, lambda: logic.segment(volume, model=cxr_model), "not one 2D image", "cxr")


def test_rgb_model_card_is_a_3_channel_2d_model(rgb_model):
    card = readModelCard(rgb_model)
    assert card["input"]["image_channels"] == 3 and "image_size" in card["input"]


def test_a_corrected_x_ray_fine_tunes_the_2d_model(app, logic, cxr_model, user_models, tmp_path):
    """Segment a chest X-ray, then fine-tune the 2D model on it: the pair is exported as images/ + masks/ (the
    2D training layout; MSD's imagesTr/ would send the trainer down the 3D path, which refuses one slice) and
    the fine-tuned model is registered and segments the image again."""
    from CDALSegmentationLib import finetune
    from CDALSegmentationLib.logic import modelKind

    pixels, _ = _chest_xray()
    volume = _slice_node(pixels, "xray")
    result = logic.segment(volume, model=cxr_model, **RUN)
    pairs = logic.trainingPairs(app.scene)
    assert pairs == [(volume, result.segmentationNode)]
    _, warnings = finetune.exportTrainingData(pairs, str(tmp_path / "data"), readModelCard(cxr_model))
    assert warnings == [] and sorted(os.listdir(str(tmp_path / "data"))) == ["images", "masks"]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "data" / "images" / "xray.tif")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "data" / "masks" / "xray.tif")))
    assert np.array_equal(image, pixels), "the pixels as loaded, not rescaled"
    assert np.array_equal(mask, (result.labelArray()[0] > 0) * 255)
    job = logic.startFineTune(pairs, baseModel=cxr_model, newModelName="my cxr", maxSteps=2, device="cpu",
                              config={"batch_size": 2, "val_samples": 1, "val_max_volumes": 1, "log_every": 1})
    state = job.wait(timeout=300, interval=0.5)
    assert state == "done", (job.error, job.stderrLines[-10:])
    assert modelKind(job.modelPath) == "user" and os.path.basename(job.modelPath).startswith("my-cxr")
    again = logic.segment(volume, model=os.path.basename(job.modelPath), **RUN)
    assert again.labelArray().shape == result.labelArray().shape and again.labelArray().any()
