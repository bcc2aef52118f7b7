"""`cdal evaluate` (and training's readers) on bad labelled data: one clear error naming the file and the fix."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from cdal_core.data import Case, Normalisation, load_png_case, load_volume, read_case_list, read_msd_cases
from cdal_core.errors import CDALError
from cdal_core.evaluation import evaluate_cases, format_table
from cdal_core.geometry import ModelGrid
from cdal_core.synthetic import make_volume, to_image

MSD_LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}


def cdal(*args):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "cdal_core.cli", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", env=env, timeout=600)


def error_line(proc) -> str:
    """The one `cdal: error:` message of a failed run (a progress bar may share stderr, nothing else may)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("cdal:") == 1, proc.stderr
    return proc.stderr.split("cdal: error:", 1)[1].strip()


def one_case(root, label=None, image=None, labels=None):
    """An MSD folder with one synthetic case; ``label``/``image`` replace its arrays or images."""
    img, lab = make_volume(np.random.default_rng(5), shape=(20, 28, 24))
    image = image if isinstance(image, sitk.Image) else to_image(img if image is None else image)
    label = label if isinstance(label, sitk.Image) else to_image(lab if label is None else label)
    for sub, item in (("imagesTr", image), ("labelsTr", label)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(item, str(root / sub / "case_000.nii.gz"))
    meta = {"labels": labels or MSD_LABELS, "numTraining": 1,
            "training": [{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def moved(array, origin=None, spacing=None):
    image = to_image(array)
    if origin is not None:
        image.SetOrigin(origin)
    if spacing is not None:
        image.SetSpacing(spacing)
    return image


@pytest.fixture(scope="module")
def model(tiny_model):
    from cdal_core.model_io import load_model
    return load_model(tiny_model)


def evaluate(model, root):
    cases, _ = read_msd_cases(root)
    return evaluate_cases(model, cases, samples=1, device="cpu")


def test_case_list_that_is_missing_is_refused_naming_it(tiny_model, synthetic_dir, tmp_path):
    message = error_line(cdal("evaluate", "--model", tiny_model, "--data", synthetic_dir,
                              "--cases", tmp_path / "nonexist.txt"))
    assert "nonexist.txt" in message and "not found" in message


def test_case_list_with_no_names_is_refused(tiny_model, synthetic_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    message = error_line(cdal("evaluate", "--model", tiny_model, "--data", synthetic_dir, "--cases", empty))
    assert "empty.txt" in message and "lists no cases" in message
    with pytest.raises(CDALError, match="is a folder"):
        read_case_list(tmp_path)


def test_float_labels_are_refused_like_training_does(tiny_model, tmp_path):
    _, lab = make_volume(np.random.default_rng(5), shape=(20, 28, 24))
    root = one_case(tmp_path / "d", label=lab.astype(np.float32) + 0.3)
    message = error_line(cdal("evaluate", "--model", tiny_model, "--data", root, "--samples", 1))
    assert str(root / "labelsTr" / "case_000.nii.gz") in message
    assert "label values must be integers 0..2" in message and "0.3, 1.3, 2.3" in message


@pytest.mark.parametrize("make_label, words", [
    (lambda lab: moved(lab, origin=(5.0, 5.0, 5.0)), ["label geometry", "origin (5, 5, 5)", "origin (0, 0, 0)",
                                                        "resample the label map onto the image"]),
    (lambda lab: moved(lab, spacing=(1.0, 1.0, 1.5)), ["label geometry", "spacing (1, 1, 1.5)", "spacing (1, 1, 1)",
                                                         "resample the label map onto the image"]),
    (lambda lab: sitk.Compose([to_image(lab)] * 3), ["colour", "one integer component per voxel"]),
    (lambda lab: sitk.JoinSeries([to_image(lab)] * 2), ["4D label map", "one integer component per voxel"]),
    (lambda lab: np.where(lab == 2, 5, lab).astype(np.uint8), ["label values [5]", "remap the labels to 0..2"]),
])
def test_label_maps_that_do_not_fit_are_refused(model, tmp_path, make_label, words):
    _, lab = make_volume(np.random.default_rng(5), shape=(20, 28, 24))
    root = one_case(tmp_path, label=make_label(lab))
    with pytest.raises(CDALError) as err:
        evaluate(model, root)
    assert str(root / "labelsTr" / "case_000.nii.gz") in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_label_geometry_within_rounding_and_integral_floats_are_accepted(model, tmp_path):
    _, lab = make_volume(np.random.default_rng(5), shape=(20, 28, 24))
    root = one_case(tmp_path / "ok", label=moved(lab.astype(np.float32), origin=(1e-4, 0.0, 0.0)))
    assert evaluate(model, root)["volumes"] == 1
    shifted = one_case(tmp_path / "shifted", label=moved(lab, origin=(0.0, 0.0, 0.5)))
    with pytest.raises(CDALError, match="label geometry"):
        evaluate(model, shifted)


@pytest.mark.parametrize("cut", ["imagesTr", "labelsTr"])
def test_a_cut_download_is_refused_not_read_as_zeros(model, tmp_path, cut):
    """ITK reads a truncated .nii.gz as zeros past the cut: evaluate would score a half-empty label, and training
    would learn from it. Both read through data.read_image, which now checks the whole compressed stream."""
    root = one_case(tmp_path)
    path = root / cut / "case_000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(CDALError, match="truncated or corrupt") as err:
        evaluate(model, root)
    assert str(path) in str(err.value) and "download it again" in str(err.value)
    with pytest.raises(CDALError, match="truncated or corrupt"):
        load_volume(Case("case_000", root / "imagesTr" / "case_000.nii.gz", root / "labelsTr" / "case_000.nii.gz"),
                    ModelGrid(spacing=(1.0, 1.0, 1.0)), Normalisation(), num_classes=3)


def test_training_reads_labels_with_the_same_checks(tmp_path):
    _, lab = make_volume(np.random.default_rng(5), shape=(20, 28, 24))
    cases, _ = read_msd_cases(one_case(tmp_path, label=moved(lab, origin=(0.0, 3.0, 0.0))))
    with pytest.raises(CDALError, match="label geometry"):
        load_volume(cases[0], ModelGrid(), Normalisation(), num_classes=3)


def test_all_background_label_is_scored_with_a_warning(model, tmp_path):
    _, lab = make_volume(np.random.default_rng(5), shape=(20, 28, 24))
    root = one_case(tmp_path, label=np.zeros_like(lab))
    report = evaluate(model, root)
    assert report["volumes"] == 1 and len(report["warnings"]) == 1
    assert str(root / "labelsTr" / "case_000.nii.gz") in report["warnings"][0]
    assert "no labelled structure" in report["warnings"][0]
    assert "cdal: warning: " + report["warnings"][0] in format_table(report)


@pytest.mark.parametrize("labels, shown", [
    ({"0": "background", "1": "Posterior", "2": "Anterior"}, "['background', 'Posterior', 'Anterior']"),
    ({"0": "background", "1": "a", "2": "b", "3": "c"}, "['background', 'a', 'b', 'c']"),
])
def test_dataset_json_naming_other_classes_is_refused(model, tmp_path, labels, shown):
    root = one_case(tmp_path, labels=labels)
    with pytest.raises(CDALError) as err:
        evaluate(model, root)
    message = str(err.value)
    assert str(root / "dataset.json") in message and shown in message
    assert "['Background', 'Anterior', 'Posterior']" in message


@pytest.mark.parametrize("labels", [{"0": "BACKGROUND", "1": "anterior", "2": "Posterior "},
                                    {"background": 0, "Anterior": 1, "Posterior": 2}])  # nnU-Net v2 style
def test_dataset_json_with_the_model_classes_in_other_spelling_is_accepted(model, tmp_path, labels):
    cases, _ = read_msd_cases(one_case(tmp_path, labels=labels))
    cases[0].classes.check(model.class_names)


def test_image_messages_name_the_file_and_the_problem(model, tmp_path):
    nan = one_case(tmp_path / "nan", image=np.full((20, 28, 24), np.nan, np.float32))
    with pytest.raises(CDALError) as err:
        evaluate(model, nan)
    assert str(nan / "imagesTr" / "case_000.nii.gz") in str(err.value)
    assert "13440 of 13440 voxels are NaN/inf" in str(err.value)
    flat = one_case(tmp_path / "flat", image=sitk.GetImageFromArray(np.random.rand(28, 24).astype(np.float32)),
                    label=sitk.GetImageFromArray(np.zeros((28, 24), np.uint8)))
    with pytest.raises(CDALError) as err:
        evaluate(model, flat)
    assert str(flat / "imagesTr" / "case_000.nii.gz") in str(err.value) and "is a 2D image" in str(err.value)


def _png_pair(root, mask: np.ndarray):
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(1).random((32, 40)) * 255).astype(np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    return Case("a", root / "images" / "a.png", root / "masks" / "a.png")


@pytest.mark.parametrize("mask, words", [
    (np.zeros((30, 40), np.uint8), ["mask size", "differs"]),
    (np.full((32, 40), 5, np.uint8), ["mask values [5]", "0/255 or 0/1"]),
])
def test_2d_training_masks_are_checked_like_evaluate(tmp_path, mask, words):
    case = _png_pair(tmp_path, mask)
    with pytest.raises(CDALError) as err:
        load_png_case(case, (32, 40), 1)
    assert str(case.label) in str(err.value)
    for word in words:
        assert word in str(err.value)
    good = np.zeros((32, 40), np.uint8)
    good[8:20, 10:30] = 255
    volume = load_png_case(_png_pair(tmp_path, good), (32, 40), 1)
    assert volume.label.sum() == 12 * 20 and set(np.unique(volume.label)) == {0, 1}
