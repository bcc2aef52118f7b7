"""Test-time left-right mirror for volumes: which models may use it, and that mirrored samples map back."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cdal_core.cli import main
from cdal_core.errors import CDALError
from cdal_core.inference import _segment_array, _segment_view, segment_image
from cdal_core.model_io import load_model, lr_array_axis, trained_mirrored


def test_left_right_axis_of_each_orientation_code():
    assert lr_array_axis("RAS") == 2 and lr_array_axis("LPS") == 2   # (Z, Y, X) arrays: X is left-right
    assert lr_array_axis("ARS") == 1 and lr_array_axis("SAL") == 0
    assert lr_array_axis("") is None and lr_array_axis("RLS") is None


def test_an_ensemble_is_mirror_trained_only_when_every_generator_is():
    # (which flips mirror a head for which slicing: test_model_io's learns_left_right_mirror test)
    good = {"slice_axis": 0, "augmentation": {"flip_axis": 1}}
    card = {"input": {"orientation": "RAS"}, "training": {"config": good}, "members": [{"training": {"config": good}}]}
    assert trained_mirrored(card)
    card["members"].append({"training": {"config": dict(good, augmentation=None)}})
    assert not trained_mirrored(card)


@pytest.fixture()
def mirror_model(tiny_model, tmp_path):
    """The tiny model with a card that says it was trained on mirrored slices (its weights are not: the tests
    below need only that the card allows the mirror)."""
    folder = tmp_path / "mirror_model"
    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "model.json").read_text())
    card["training"]["config"]["augmentation"] = {"flip_axis": 1}
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_mirrored_samples_are_mapped_back_onto_the_scan(mirror_model):
    model = load_model(str(mirror_model), with_discriminator=False)
    array = np.random.default_rng(0).random((6, 40, 32)).astype(np.float32)
    array[:, :, :8] += 1.0  # not symmetric: a sample left mirrored would show it
    schedule = model.schedule(None)
    got = _segment_array(array, model, None, 2, 7, torch.device("cpu"), None, False, None, None, mirror_axis=2)
    rng = torch.Generator().manual_seed(7)  # the same draws, in the same order: plain run, then mirrored run
    plain = _segment_view(array, 0, model, model.generator, schedule, 1, rng, torch.device("cpu"), None, False,
                          None)
    mirrored = _segment_view(np.ascontiguousarray(array[:, :, ::-1]), 0, model, model.generator, schedule, 1, rng,
                             torch.device("cpu"), None, False, None)
    expected = (plain[0] + mirrored[0][..., ::-1]) / 2
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    assert not np.allclose(got[0], (plain[0] + mirrored[0]) / 2, atol=1e-4)  # left as mirrored, it would differ
    # one sample: only the plain run draws, so the mirror changes nothing
    alone = _segment_array(array, model, None, 1, 7, torch.device("cpu"), None, False, None, None, mirror_axis=2)
    np.testing.assert_allclose(alone[0], plain[0], atol=1e-6)


def test_the_mirror_follows_the_card_and_the_command_line(mirror_model, synthetic_dir, tmp_path):
    image = sitk.ReadImage(str(next((synthetic_dir / "imagesTr").glob("*.nii.gz"))))
    model = load_model(str(mirror_model), with_discriminator=False)
    off = segment_image(image, model, samples=2, seed=0, precision="fp32")
    on = segment_image(image, model, samples=2, seed=0, precision="fp32", mirror=True)
    assert not np.allclose(off.probabilities, on.probabilities)
    card = json.loads((mirror_model / "model.json").read_text())
    card["input"]["test_time_mirror"] = True
    (mirror_model / "model.json").write_text(json.dumps(card))
    model = load_model(str(mirror_model), with_discriminator=False)
    np.testing.assert_array_equal(segment_image(image, model, samples=2, seed=0, precision="fp32").probabilities,
                                  on.probabilities)
    args = ["evaluate", "--model", str(mirror_model), "--data", str(synthetic_dir), "--samples", "2", "--json"]
    assert main(args + [str(tmp_path / "auto.json")]) == 0
    assert main(args + [str(tmp_path / "off.json"), "--symmetries", "off"]) == 0
    assert json.loads((tmp_path / "auto.json").read_text())["mirror"] is True
    assert json.loads((tmp_path / "off.json").read_text())["mirror"] is False


def test_a_grid_without_a_left_right_axis_cannot_be_mirrored(mirror_model):
    card = json.loads((mirror_model / "model.json").read_text())
    card["input"]["orientation"] = "XYZ"
    (mirror_model / "model.json").write_text(json.dumps(card))
    model = load_model(str(mirror_model), with_discriminator=False)
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 48, 40)).astype(np.float32))
    with pytest.raises(CDALError, match="no left-right axis"):
        segment_image(image, model, samples=2, mirror=True)


def test_a_model_trained_on_mirrored_slices_takes_the_mirror_by_default(synthetic_dir, tiny_model, tmp_path):
    from cdal_core.config import TrainConfig
    from cdal_core.trainer import train
    from core_settings import TINY_CONFIG
    assert "test_time_mirror" not in json.loads((tiny_model / "model.json").read_text())["input"]  # no flips
    config = TrainConfig.from_dict({**TINY_CONFIG, "augmentation": {"flip_axis": 1}})
    card = json.loads((train(str(synthetic_dir), str(tmp_path), config, max_steps=1, device="cpu")
                       / "model.json").read_text())
    assert card["input"]["test_time_mirror"] is True
