"""Multi-view models (one network, several slicing axes) and the bf16 / fp32 inference precision."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cdal_core.config import TrainConfig
from cdal_core.errors import CDALError
from cdal_core.inference import cpu_has_native_bf16, pool_views, resolve_precision, segment_image
from cdal_core.model_io import load_model
from cdal_core.trainer import Trainer, _view_augmentation

from core_settings import SHARED_DATA, TINY_CONFIG

TWO_VIEWS = {**TINY_CONFIG, "extra_views": [{"axis": 2, "size": [40, 48]}]}


def test_flip_follows_the_volume_axis_into_each_view():
    aug = {"flip_axis": 1, "rotate_degrees": 10}
    # primary view slices along axis 0: its in-plane axis 1 is volume axis 2 (left-right)
    assert _view_augmentation(aug, 0, 0) == aug
    assert _view_augmentation(aug, 0, 1)["flip_axis"] == 1          # axis-1 slices are (0, 2): volume 2 is 1
    sagittal = _view_augmentation(aug, 0, 2)                        # axis-2 slices cut across left-right:
    assert sagittal["flip_axis"] is None and sagittal["flip_across_slices"]  # the mirror reverses their context
    assert sagittal["rotate_degrees"] == 10
    # and back: a sagittal primary's mirror (reversed context) is an in-plane flip of axial and coronal slices
    across = {"flip_axis": None, "flip_across_slices": True}
    assert _view_augmentation(across, 2, 0) == {"flip_axis": 1}
    assert _view_augmentation(across, 2, 1) == {"flip_axis": 1}


def test_bad_views_are_refused():
    for views in ([{"axis": 0, "size": [40, 48]}], [{"axis": 3, "size": [40, 48]}], [{"axis": 2}]):
        with pytest.raises(CDALError, match="axis|axes"):
            TrainConfig.from_dict({**TINY_CONFIG, "extra_views": views})


def test_views_take_turns_and_reach_the_card(synthetic_dir, tmp_path):
    trainer = Trainer(str(synthetic_dir), str(tmp_path / "run"), TrainConfig.from_dict(TWO_VIEWS), device="cpu")
    shapes = [tuple(trainer._batch(step)[0].shape[-2:]) for step in range(4)]
    assert shapes == [(48, 40), (40, 48), (48, 40), (40, 48)]
    model = load_model(trainer.fit(max_steps=2))
    assert model.slice_axes == [0, 2]
    assert json.loads((model.path / "model.json").read_text())["input"]["extra_views"] == [{"axis": 2, "size": [40, 48]}]


def test_pooled_views_equal_statistics_over_all_samples():
    rng = np.random.default_rng(0)
    samples = rng.dirichlet(np.ones(3), size=(5, 4, 6)).transpose(0, 3, 1, 2)   # (K=5, C=3, 4, 6)
    groups = [samples[:3], samples[3:]]
    views = [(len(g), (g.mean(0), g.var(0).sum(0), g.mean(0)[0])) for g in groups]
    probs, variance, attention = pool_views(views)
    np.testing.assert_allclose(probs, samples.mean(0), atol=1e-6)
    np.testing.assert_allclose(variance, samples.var(0).sum(0), atol=1e-6)
    np.testing.assert_allclose(attention, samples.mean(0)[0], atol=1e-6)


def test_multiview_model_segments_with_fewer_samples_than_views(synthetic_dir, tmp_path):
    model = load_model(Trainer(str(synthetic_dir), str(tmp_path / "run"), TrainConfig.from_dict(TWO_VIEWS),
                               device="cpu").fit(max_steps=1))
    image = sitk.ReadImage(str(next((synthetic_dir / "imagesTr").glob("*.nii.gz"))))
    one = segment_image(image, model, samples=1, seed=0)
    assert float(sitk.GetArrayFromImage(one.uncertainty).max()) == 0.0   # one sample: nothing to disagree
    two = segment_image(image, model, samples=2, seed=0)                    # two samples: they disagree
    assert float(sitk.GetArrayFromImage(two.uncertainty).max()) > 0.0
    assert two.labels.GetSize() == image.GetSize()


def test_precision_names():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(CDALError, match="precision"):
        resolve_precision("fp8", cpu)


@pytest.mark.skipif(not (SHARED_DATA / "Task04_Hippocampus").is_dir(), reason="../shared/data is absent")
def test_bf16_matches_fp32_on_a_real_volume():
    model = load_model("hippocampus")
    image = sitk.ReadImage(str(sorted((SHARED_DATA / "Task04_Hippocampus" / "imagesTr").glob("hippo*.nii.gz"))[0]))
    full = segment_image(image, model, samples=5, seed=0, precision="fp32")
    half = segment_image(image, model, samples=5, seed=0, precision="bf16")
    assert np.abs(full.probabilities - half.probabilities).max() < 0.1
    agree = np.mean(sitk.GetArrayFromImage(full.labels) == sitk.GetArrayFromImage(half.labels))
    assert agree > 0.995, agree
    assert half.probabilities.dtype == np.float32
    u_full, u_half = (sitk.GetArrayFromImage(r.uncertainty).ravel() for r in (full, half))
    assert np.corrcoef(u_full, u_half)[0, 1] > 0.95
    # the output layer stays float32: confident voxels keep distinct small variances instead of bf16 ties at 0
    assert np.mean(u_half == 0) <= np.mean(u_full == 0) + 0.01
