"""Bad models and inputs get one clear CDALError line (naming the file and the fix), never a traceback or a
silently wrong result: cards that name too few classes, NaN weights, 2D models given volumes (and folders that
mix both), scans too small for the network, complex voxels, empty results, unreadable files, junk files."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file, save_file

from cdal_core.cli import main
from cdal_core.errors import CDALError
from cdal_core.inputs import ScanInput, list_inputs, read_scan
from cdal_core.model_io import load_model
from cdal_core.scan import format_report, segment_scan
from core_settings import ROOT


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch):
    monkeypatch.setenv("CDAL_THREADS", "1")


def _copy(model_dir, to, edit_card=None):
    shutil.copytree(model_dir, to)
    if edit_card is not None:
        card = json.loads((to / "model.json").read_text())
        edit_card(card)
        (to / "model.json").write_text(json.dumps(card))
    return to


def _as_2d(card):
    """The tiny model's card made a 2D image model's (as cxr's: ``input.image_size``)."""
    card["name"] = "flat"
    card["input"]["image_size"] = list(card["input"]["train_size"])


def _volume(shape_zyx=(30, 40, 36), spacing=(1.0, 1.0, 1.0), seed=0):
    image = sitk.GetImageFromArray(np.random.default_rng(seed).normal(100, 20, shape_zyx).astype(np.float32))
    image.SetSpacing(spacing)
    return image


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cdal: error:")]
    assert len(err) == 1, err
    return err[0]


# -- models -------------------------------------------------------------------------------------------------

def test_a_card_naming_fewer_classes_than_the_network_outputs_is_refused(tiny_model, tmp_path):
    broken = _copy(tiny_model, tmp_path / "classes", lambda card: card["classes"].pop())
    outputs = json.loads((tiny_model / "model.json").read_text())["network"]["num_classes"]
    with pytest.raises(CDALError, match=f"lists {outputs - 1} classes but its network outputs {outputs}"):
        load_model(broken)


def _set(path, value):
    def edit(card):
        keys = path.split(".")
        target = card
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


@pytest.mark.parametrize("path, value, words", [
    ("network.base_channels", "sixteen", "network.base_channels is 'sixteen'"),
    ("network.dropout", "none", "network.dropout"),
    ("classes", ["bg", "lung"], "must each be an entry like"),
    ("num_steps", "two", "num_steps is 'two'"),
    ("input", [], "input is list")])
def test_a_hand_edited_card_is_refused_in_one_line_at_load(tiny_model, tmp_path, path, value, words):
    """Such cards gave TypeError tracebacks deep in the network or the report, or a message about another field."""
    broken = _copy(tiny_model, tmp_path / "edited", _set(path, value))
    with pytest.raises(CDALError, match=words.replace("(", r"\(").replace("[", r"\[")) as info:
        load_model(broken)
    assert "model.json" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_at_load(tiny_model, tmp_path, bad):
    broken = _copy(tiny_model, tmp_path / "nanw")
    tensors = load_file(str(broken / "model.safetensors"))
    name = next(k for k in sorted(tensors) if k.startswith("generator.") and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = bad
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "cdal"})
    with pytest.raises(CDALError, match=r"model.safetensors: weights contain NaN/inf .*damaged; re-download"):
        load_model(broken)


# -- 2D models and volumes ----------------------------------------------------------------------------------

def test_a_2d_model_refuses_a_volume_naming_the_file(tiny_model, tmp_path):
    flat = load_model(_copy(tiny_model, tmp_path / "flat", _as_2d))
    path = _write(_volume(), tmp_path / "head.nii.gz")
    scan = read_scan(ScanInput(path, "head"))
    with pytest.raises(CDALError, match=f"^{path}: a 3D volume, but flat is a 2D model"):
        segment_scan(scan.image, flat, samples=1, steps=1, seed=0)


def _mixed_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write(sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 255, (48, 40)).astype(np.uint8)),
           folder / "thumb.png")
    _write(_volume(), folder / "scan.nii.gz")
    return folder


def test_a_2d_model_on_a_folder_mixing_images_and_volumes_refuses_the_volume_by_name(tiny_model, tmp_path, capsys):
    flat = _copy(tiny_model, tmp_path / "flat", _as_2d)
    folder = _mixed_folder(tmp_path)
    code = main(["predict", "--model", str(flat), "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--samples", "1", "--steps", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert f"cdal: error: {folder / 'scan.nii.gz'}: a 3D volume, but flat is a 2D model" in captured.err
    assert "1 of 2 inputs were not segmented (scan.nii.gz" in captured.err
    assert (tmp_path / "out" / "thumb_seg.png").exists()   # the image is still segmented


def test_a_3d_model_on_a_folder_mixing_images_and_volumes_names_both(tiny_model, tmp_path, capsys):
    folder = _mixed_folder(tmp_path)
    code = main(["predict", "--model", str(tiny_model), "--input", str(folder), "--output", str(tmp_path / "out")])
    line = _one_error_line(capsys)
    assert code == 2 and "thumb.png" in line and "scan.nii.gz" in line and "nothing was segmented" in line
    assert not (tmp_path / "out").exists()


def test_dot_files_in_image_folders_are_not_images(tmp_path):
    from cdal_core.predict2d import list_images
    (tmp_path / "images").mkdir()
    _write(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), tmp_path / "images" / "x.png")
    (tmp_path / "images" / "._x.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    assert list_images(tmp_path) == [tmp_path / "images" / "x.png"]


# -- scans the network cannot take --------------------------------------------------------------------------

@pytest.mark.parametrize("shape_zyx, spacing, short", [
    ((30, 40, 2), (1.0, 1.0, 1.0), "left-right"),                  # a sliver, 2 voxels wide
    ((3, 2, 2), (1.0, 1.0, 1.0), "left-right and front-back"),     # tiny
    ((30, 40, 36), (0.03, 0.03, 1.0), "left-right and front-back"),  # 0.03 mm pixels: 2 x 2 voxels on a 1 mm grid
])
def test_a_scan_too_small_for_the_network_is_refused(tiny_model, tmp_path, shape_zyx, spacing, short):
    path = _write(_volume(shape_zyx, spacing), tmp_path / "small.nii.gz")
    scan = read_scan(ScanInput(path, "small"))
    with pytest.raises(CDALError, match=f"^{path}: too small for this model: .* at least 3 voxels .*mm\\) {short}:"):
        segment_scan(scan.image, load_model(tiny_model), samples=1, steps=1, seed=0)


def test_the_smallest_scan_the_network_takes_is_segmented_and_one_voxel_less_is_refused(tiny_model):
    model = load_model(tiny_model)
    result = segment_scan(_volume((30, 3, 3)), model, samples=1, steps=1, seed=0)
    assert sitk.GetArrayViewFromImage(result.labels).shape == (30, 3, 3)
    with pytest.raises(CDALError, match=r"^input: too small for this model: .*\(3x2x30 voxels\)"):
        segment_scan(_volume((30, 2, 3)), model, samples=1, steps=1, seed=0)


def test_complex_voxels_are_refused(tiny_model, tmp_path):
    import nibabel as nib
    values = np.random.default_rng(2).normal(size=(36, 40, 30)) * (1 + 1j)
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(values.astype(np.complex64), np.eye(4)), str(path))
    with pytest.raises(CDALError, match=f"^{path}: holds complex-valued voxels .*take the magnitude first"):
        read_scan(ScanInput(path, "complex"))
    image = sitk.ReadImage(str(path))   # handed over directly, as the Slicer module does
    with pytest.raises(CDALError, match="complex-valued voxels"):
        segment_scan(image, load_model(tiny_model), samples=1, steps=1, seed=0)


# -- results ------------------------------------------------------------------------------------------------

def test_an_empty_result_carries_a_note_and_one_warning_line(tiny_model):
    from cdal_core.scan import _assemble, _side_map
    model, image = load_model(tiny_model), _volume((20, 24, 22), (0.3, 0.3, 0.3))
    labels, zeros = np.zeros((20, 24, 22), np.uint8), np.zeros((20, 24, 22), np.float32)
    result = _assemble(image, model, labels, zeros, None, _side_map(labels, "unknown"), {}, [])
    assert result.report["structures"] == []
    assert len(result.report["review"]) == 1 and result.report["review"][0].startswith("nothing was found")
    assert "0.3x0.3x0.3 mm" in result.report["review"][0] and result.notes == result.report["review"]
    warnings = [line for line in format_report(result.report).splitlines() if line.startswith("cdal: warning:")]
    assert warnings == ["cdal: warning: " + result.report["review"][0]]
    labels[10, 12, 11] = 1
    found = _assemble(image, model, labels, zeros, None, _side_map(labels, "unknown"), {}, [])
    assert not any("nothing was found" in note for note in found.report["review"])


# -- unreadable files and folders ---------------------------------------------------------------------------

def test_an_npy_file_is_named_as_an_unsupported_format(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 4, 4), np.float32))
    with pytest.raises(CDALError, match=r"\.npy is not a supported format: save 3D volumes as .nii.gz"):
        read_scan(ScanInput(path, "x"))


def test_a_truncated_png_names_image_formats(tmp_path):
    from cdal_core.predict2d import read_image_2d
    path = _write(sitk.GetImageFromArray(np.random.default_rng(3).integers(0, 255, (64, 64)).astype(np.uint8)),
                  tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(CDALError, match=r"PNG/JPEG/TIFF image\?$") as caught:
        read_image_2d(path, 1)
    assert ".nii.gz" not in str(caught.value)


def test_a_truncated_mha_is_called_truncated_not_missing(tmp_path):
    path = tmp_path / "cut.mha"
    sitk.WriteImage(_volume(), str(path), True)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 6 // 10])
    with pytest.raises(CDALError, match="is truncated or damaged") as caught:
        read_scan(ScanInput(path, "cut"))
    assert "No such file" not in str(caught.value)


@pytest.mark.parametrize("files", [[], ["notes.txt"]])
def test_a_folder_without_scans_gives_one_line_without_itk_warnings(tmp_path, capfd, files):
    for name in files:
        (tmp_path / name).write_text("not a scan")
    with pytest.raises(CDALError, match="holds no .nii.gz"):
        list_inputs(tmp_path)
    captured = capfd.readouterr()
    assert "No Series were found" not in captured.err + captured.out


def test_a_folder_of_2d_images_one_level_down_is_named(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(CDALError, match=r"did you mean .*train\?"):
        list_inputs(tmp_path)


def test_config_typos_inside_augmentation_and_normalisation_are_named():
    """A misspelt nested key would silently keep its default: a CT user's "standardize": false would still get
    histogram standardisation."""
    from cdal_core.config import TrainConfig
    for section, key in (("normalisation", "standardize"), ("augmentation", "rotate_degree")):
        with pytest.raises(CDALError, match=f"unknown {section} settings \\['{key}'\\]"):
            TrainConfig.from_dict({section: {key: 1}})
    with pytest.raises(CDALError, match="augmentation must be an object"):
        TrainConfig.from_dict({"augmentation": 5})
    shipped = TrainConfig.load(str(ROOT / "configs" / "cxr.json"))  # every shipped config still loads
    assert shipped.normalisation and TrainConfig.from_dict({"augmentation": None}).augmentation is None


def test_a_config_validation_list_for_other_data_names_the_config(synthetic_dir, tmp_path):
    """The README's `cdal train --config configs/hippocampus.json` on one's own data: the config's val_cases
    list names MSD cases; the message names the config key and file and the fix."""
    from test_cli import assert_clean_error, cdal
    proc = cdal("train", "--data", synthetic_dir, "--out", tmp_path / "run", "--config",
                ROOT / "configs" / "hippocampus.json", "--max-steps", 1, "--device", "cpu", check=False)
    assert_clean_error(proc, "hippocampus_val.txt", "val_cases in", "hippocampus.json", "remove val_cases")


def test_finetuning_on_differently_named_classes_is_refused_before_training(tiny_model, synthetic_dir, tmp_path):
    """Labels that mean other classes (left/right for anterior/posterior) used to train for the whole run and
    then fail at validation, leaving a run folder that could never give a model."""
    from test_cli import assert_clean_error, cdal
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "left", "2": "right"}
    (data / "dataset.json").write_text(json.dumps(meta))
    proc = cdal("finetune", "--model", tiny_model, "--data", data, "--out", tmp_path / "run", "--max-steps", 2,
                "--device", "cpu", check=False)
    assert_clean_error(proc, "dataset.json", "['background', 'left', 'right']", "fix \"labels\"")
    assert not (tmp_path / "run" / "checkpoint.pt").exists(), "nothing was trained"


def test_a_users_own_model_takes_the_slice_thickness_it_was_trained_on(tiny_config_file, tmp_path):
    """The 2 mm limit is the hippocampus models' (trained on ~1 mm T1): a user's lesion model trained on
    0.8 x 0.8 x 3 mm scans segments such a scan, with no false "~1 mm 3D T1" sentence."""
    from test_cli import cdal
    data = tmp_path / "thick"
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        label = np.zeros((12, 60, 60), np.uint8)
        label[4:8, 25:35, 25:35] = 1
        for array, folder in (((rng.normal(100, 10, label.shape) + 80 * label).astype(np.float32), "imagesTr"),
                              (label, "labelsTr")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.8, 3.0))
            sitk.WriteImage(image, str(data / folder / f"c{i}.nii.gz"))
    (data / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "lesion"}, "numTraining": 2,
        "training": [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(2)]}))
    config = json.loads(tiny_config_file.read_text())
    config.update(spacing=[0.8, 0.8, 3.0], train_size=[64, 64])
    (tmp_path / "config.json").write_text(json.dumps(config))
    cdal("train", "--data", data, "--out", tmp_path / "run", "--config", tmp_path / "config.json", "--max-steps", 1,
         "--device", "cpu")
    proc = cdal("predict", "--model", tmp_path / "run" / "model", "--input", data / "imagesTr" / "c0.nii.gz",
                "--output", tmp_path / "out", "--samples", 1, "--device", "cpu")
    assert "1 mm" not in proc.stderr and (tmp_path / "out" / "c0_seg.nii.gz").exists(), proc.stderr
