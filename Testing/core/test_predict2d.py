"""The 2D path (issue 16): PNG/JPEG/TIFF images in, label PNG + heat maps + float TIFFs out, same size as the input;
patch training and overlapping-window inference; evaluation of images/ + masks/ folders.

Two tiny models (grey and RGB) are trained for two steps on synthetic discs: useless for accuracy, but complete
2D model folders with ``image_size`` 64 and 32x32 windows, so every input larger than 32 pixels is slid over.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image

from core_settings import TINY_CONFIG

from cdal_core.cli import main


def _discs(rng, shape, rgb):
    """A noisy image with 1-3 bright discs and its 0/255 mask; RGB images are tinted per channel (H&E-like)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros(shape, bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(4, 9)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    grey = 60 + 120 * mask + rng.normal(0, 15, shape)
    image = np.stack([grey, 0.6 * grey + 40, 0.8 * grey + 20], -1) if rgb else grey
    return np.clip(image, 0, 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(path))
    return path


def _dataset(root, rgb, n=6, shape=(72, 80)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(5 if rgb else 4)
    for i in range(n):
        image, mask = _discs(rng, shape, rgb)
        _write(root / "images" / f"img{i}.png", image)
        _write(root / "masks" / f"img{i}.png", mask)
    return root


def _train(tmp_path_factory, data, channels):
    from cdal_core.config import TrainConfig
    from cdal_core.trainer import train
    cfg = dict(TINY_CONFIG, train_size=[32, 32], image_size=[64, 64], num_steps=2, val_samples=1,
               network=dict(TINY_CONFIG["network"], image_channels=channels))
    out = tmp_path_factory.mktemp(f"run2d_{channels}")
    return train(str(data), str(out), TrainConfig.from_dict(cfg), max_steps=2, device="cpu")


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch):
    """One thread count for every run: equal seeds then give bit-equal maps (the count changes the float
    summation order, and by default it follows the cores other processes leave free)."""
    monkeypatch.setenv("CDAL_THREADS", "1")


@pytest.fixture(scope="module")
def grey_data(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("grey2d"), rgb=False)


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory, grey_data):
    return _train(tmp_path_factory, grey_data, 1)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    return _train(tmp_path_factory, _dataset(tmp_path_factory.mktemp("rgb2d"), rgb=True), 3)


def run(*args):
    return main([str(a) for a in args])


def assert_error(code, capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cdal: error:"), err
    for w in words:
        assert w.lower() in err[0].lower(), err[0]


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("rgb, shape", [(False, (70, 90)), (True, (100, 120))])
def test_predict_outputs_have_the_input_size(request, tmp_path, rgb, shape):
    model = request.getfixturevalue("rgb_model" if rgb else "grey_model")
    image, _ = _discs(np.random.default_rng(1), shape, rgb)
    src = _write(tmp_path / "tile.png", image)
    assert run("predict", "--model", model, "--input", src, "--output", tmp_path / "out", "--samples", 2) == 0
    seg = _read(tmp_path / "out" / "tile_seg.png")
    assert seg.shape == shape and seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 255}
    for kind in ("uncertainty", "attention"):
        heat = _read(tmp_path / "out" / f"tile_{kind}.png")
        assert heat.shape == shape + (3,) and heat.dtype == np.uint8
        values = _read(tmp_path / "out" / f"tile_{kind}.tif")
        assert values.shape == shape and values.dtype == np.float32 and np.isfinite(values).all()
        assert values.min() >= 0
    assert not list((tmp_path / "out").glob(".tmp-*"))  # atomic writes leave no partial files


def test_card_records_patch_training(grey_model):
    card = json.loads((grey_model / "model.json").read_text())
    assert card["input"]["image_size"] == [64, 64] and card["input"]["train_size"] == [32, 32]
    assert card["normalisation"]["method"] == "min-max"  # what predict2d does, not the 3D percentiles


def test_random_patches_cut_the_same_window_from_image_and_label():
    from cdal_core.trainer import random_patches
    images = np.random.rand(3, 2, 20, 30).astype(np.float32)
    labels = (images[:, 0] > 0.5).astype(np.uint8)
    out_i, out_l = random_patches(images, labels, (8, 10), np.random.default_rng(0))
    assert out_i.shape == (3, 2, 8, 10) and out_l.shape == (3, 8, 10)
    assert np.array_equal(out_l, (out_i[:, 0] > 0.5).astype(np.uint8))
    assert not np.array_equal(out_i[0], images[0, :, :8, :10]) or not np.array_equal(out_i[1], images[1, :, :8, :10])


def test_large_image_is_slid_over_in_overlapping_windows(grey_model, monkeypatch):
    import cdal_core.sampler as sampler
    from cdal_core.model_io import load_model
    from cdal_core.predict2d import segment_image_2d
    seen, real = [], sampler.sample

    def recording(generator, images, *a, **k):
        seen.append(tuple(images.shape))
        return real(generator, images, *a, **k)

    monkeypatch.setattr(sampler, "sample", recording)
    image, _ = _discs(np.random.default_rng(2), (150, 200), False)
    result = segment_image_2d(image[None].astype(np.float32), load_model(grey_model), samples=2, seed=0,
                              precision="fp32")
    assert all(s[-2:] == (32, 32) for s in seen)          # windows of the training patch size...
    assert sum(s[0] for s in seen) == 9                    # ...3 x 3 of them over the 64 x 64 resized image
    assert result.labels.shape == (150, 200) and result.probabilities.shape == (2, 150, 200)
    assert np.allclose(result.probabilities.sum(axis=0), 1, atol=1e-4)  # every pixel covered by some window
    working = segment_image_2d(image[None].astype(np.float32), load_model(grey_model), samples=2, seed=0,
                               precision="fp32", output_size=(64, 64))     # the model's own grid, not resized
    assert working.probabilities.shape == (2, 64, 64) and working.uncertainty.shape == (64, 64)
    back = F.interpolate(torch.from_numpy(working.probabilities)[None], size=(150, 200), mode="bilinear",
                         align_corners=False)[0].numpy()
    assert np.allclose(back, result.probabilities, atol=1e-5)


def test_symmetries_map_back_exactly():
    from cdal_core.predict2d import DIHEDRAL, _from_view, _to_view
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5)
    seen = set()
    for view in DIHEDRAL:
        turned = _to_view(image, view)
        seen.add(tuple(turned.flatten().tolist()))
        assert np.array_equal(_from_view(turned[0].numpy(), view), image[0].numpy())
    assert len(seen) == 8  # eight distinct orientations


def test_samples_are_spread_over_generators_then_symmetries():
    from cdal_core.predict2d import sample_plan
    assert sample_plan(5, 1, 1) == [(0, 0, 5)]                                  # the plain path, unchanged
    assert sample_plan(5, 1, 8) == [(0, s, 1) for s in range(5)]
    assert sample_plan(5, 3, 1) == [(0, 0, 2), (1, 0, 2), (2, 0, 1)]
    plan = sample_plan(10, 2, 8)
    assert sum(n for *_, n in plan) == 10 and {g for g, *_ in plan} == {0, 1}
    # an ensemble's generators take different orientations: 3 + 2 samples see five, not three
    assert sample_plan(5, 2, 8) == [(0, 0, 1), (0, 1, 1), (0, 2, 1), (1, 3, 1), (1, 4, 1)]
    assert sample_plan(10, 2, 8) == [(0, s, 1) for s in range(5)] + [(1, s, 1) for s in (0, 1, 5, 6, 7)]


def test_symmetries_follow_the_card_and_the_command_line(grey_model, grey_data, tmp_path, monkeypatch):
    import shutil
    import cdal_core.predict2d as p2d
    from cdal_core.model_io import load_model
    image = p2d.read_image_2d(grey_data / "images" / "img0.png", 1)
    model = load_model(grey_model)
    plain = p2d.segment_image_2d(image, model, samples=4, seed=0, precision="fp32")
    done = []
    turned = p2d.segment_image_2d(image, model, samples=4, seed=0, precision="fp32", symmetries=True,
                                  progress=done.append)
    assert done == [0.25, 0.5, 0.75, 1.0], "a progress report after each orientation (Slicer's bar)"
    assert turned.labels.shape == plain.labels.shape
    assert not np.allclose(turned.probabilities, plain.probabilities)  # other orientations were sampled
    # a card that asks for them gets them by default
    tissue = tmp_path / "tissue"
    shutil.copytree(grey_model, tissue)
    card = json.loads((tissue / "model.json").read_text())
    card["input"]["test_time_symmetries"] = True
    (tissue / "model.json").write_text(json.dumps(card))
    default = p2d.segment_image_2d(image, load_model(tissue), samples=4, seed=0, precision="fp32")
    assert np.array_equal(default.probabilities, turned.probabilities)
    assert run("evaluate", "--model", tissue, "--data", grey_data, "--samples", 2, "--symmetries", "off",
               "--json", tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["symmetries"] is False


def test_volume_mirror_is_refused_for_a_model_never_shown_mirrored_slices(tiny_model, synthetic_dir, capsys):
    # the tiny model trained without augmentation: its classes might differ by side, so no mirror for it
    assert_error(run("evaluate", "--model", tiny_model, "--data", synthetic_dir, "--symmetries", "on"), capsys,
                 "not trained on left-right mirrored", "--symmetries off")


def test_predict_is_seeded(grey_model, grey_data, tmp_path):
    src = grey_data / "images" / "img0.png"
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run("predict", "--model", grey_model, "--input", src, "--output", tmp_path / name, "--samples", 2,
            "--seed", seed)
    read = lambda n: _read(tmp_path / n / "img0_uncertainty.tif")
    assert np.array_equal(read("a"), read("b")) and not np.array_equal(read("a"), read("c"))


@pytest.mark.parametrize("model_name, rgb, words", [
    ("grey_model", True, ["RGB", "greyscale", "convert"]),
    ("rgb_model", False, ["greyscale", "RGB", "colour image"]),
])
def test_wrong_channels_are_refused(request, tmp_path, capsys, model_name, rgb, words):
    image, _ = _discs(np.random.default_rng(3), (40, 40), rgb)
    src = _write(tmp_path / "x.png", image)
    model = request.getfixturevalue(model_name)
    capsys.readouterr()  # a fixture trained just now printed its progress
    assert_error(run("predict", "--model", model, "--input", src, "--output", tmp_path / "out"), capsys, *words)
    assert not list((tmp_path / "out").glob("*_seg.png")) if (tmp_path / "out").exists() else True


def test_grey_image_saved_as_rgb_counts_as_grey(grey_model, tmp_path):
    image, _ = _discs(np.random.default_rng(3), (40, 48), False)
    src = _write(tmp_path / "x.png", np.repeat(image[..., None], 3, axis=-1))
    assert run("predict", "--model", grey_model, "--input", src, "--output", tmp_path / "out", "--samples", 1) == 0


@pytest.mark.parametrize("make, words", [
    (lambda: np.full((40, 40), 7, np.uint8), ["constant"]),
    (lambda: np.where(np.random.rand(40, 40) > 0.9, np.nan, 1.0).astype(np.float32), ["NaN"]),
])
def test_bad_images_get_one_line_and_exit_2(grey_model, tmp_path, capsys, make, words):
    src = _write(tmp_path / "bad.tif", make())
    assert_error(run("predict", "--model", grey_model, "--input", src, "--output", tmp_path / "out"),
                 capsys, *words)


def test_no_overwrite_without_the_flag(grey_model, grey_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0_attention.tif").write_bytes(b"precious")
    src = grey_data / "images" / "img0.png"
    assert_error(run("predict", "--model", grey_model, "--input", src, "--output", out), capsys,
                 "img0_attention.tif", "already exists", "--overwrite")
    assert (out / "img0_attention.tif").read_bytes() == b"precious"
    assert run("predict", "--model", grey_model, "--input", src, "--output", out, "--overwrite",
               "--samples", 1) == 0
    assert (out / "img0_attention.tif").read_bytes() != b"precious"


def test_the_input_folder_is_not_an_output_folder(grey_model, grey_data, tmp_path, capsys):
    import shutil
    images = tmp_path / "images"
    shutil.copytree(grey_data / "images", images)
    before = sorted(p.name for p in images.iterdir())
    assert_error(run("predict", "--model", grey_model, "--input", images, "--output", images, "--overwrite"), capsys,
                 "is the folder the inputs are read from", "choose another folder")
    assert sorted(p.name for p in images.iterdir()) == before
    # a dataset folder (images/ + masks/) read from images/: images/ is an input folder too
    dataset = tmp_path / "dataset"
    shutil.copytree(grey_data, dataset)
    assert_error(run("predict", "--model", grey_model, "--input", dataset, "--output", dataset / "images"), capsys,
                 "is the folder the inputs are read from", "images-cdal")
    assert sorted(p.name for p in (dataset / "images").iterdir()) == before


def test_no_attention_writes_three_outputs_with_the_same_labels(grey_model, grey_data, tmp_path, capsys):
    src = grey_data / "images" / "img0.png"
    full, lean = tmp_path / "full", tmp_path / "lean"
    for out, extra in ((full, []), (lean, ["--no-attention"])):
        assert run("predict", "--model", grey_model, "--input", src, "--output", out, "--samples", 2,
                   "--seed", 1, *extra) == 0
    assert sorted(p.name for p in lean.iterdir()) == ["img0_seg.png", "img0_uncertainty.png",
                                                       "img0_uncertainty.tif"]
    for name in ("img0_seg.png", "img0_uncertainty.tif"):
        assert np.array_equal(_read(full / name), _read(lean / name))
    capsys.readouterr()
    assert run("predict", "--model", grey_model, "--input", src, "--output", full, "--samples", 2, "--seed", 1,
               "--no-attention", "--overwrite") == 0
    assert not list(full.glob("*_attention.*"))
    assert "img0_attention.png, img0_attention.tif of an earlier run removed" in capsys.readouterr().out


def test_two_images_with_one_stem_are_refused_before_either_is_written(grey_model, grey_data, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(grey_data / "images" / "img0.png", folder / "a.png")
    Image.open(grey_data / "images" / "img1.png").save(folder / "a.tif")
    assert_error(run("predict", "--model", grey_model, "--input", folder, "--output", tmp_path / "out"), capsys,
                 "both write a_seg.png", "rename one")
    assert not (tmp_path / "out").exists()


def test_evaluate_json_has_per_class_dice_and_iou(grey_model, grey_data, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert run("evaluate", "--model", grey_model, "--data", grey_data, "--samples", 2, "--json", report_path) == 0
    assert "Foreground" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    row = report["per_class"]["Foreground"]
    for key in ("dice", "iou", "dice_std", "iou_std", "precision", "recall"):
        assert 0.0 <= row[key] <= 1.0
    assert report["images"] == 6 and len(report["per_image"]) == 6
    assert {"Foreground_dice", "Foreground_iou"} <= set(report["per_image"][0])
    assert set(report["uncertainty"]) == {"auroc", "ece", "spearman_image"}


def test_evaluate_names_the_cases_the_model_trained_on(grey_model, grey_data, tmp_path, capsys):
    """Scores on training images are not held-out scores: the report lists them (by the card's training folder
    and held-out lists) and a note says so; the model's own validation images alone get no note."""
    from cdal_core.model_io import read_card
    held_out = read_card(Path(grey_model))["training"]["data"]["validation_cases"]
    assert 0 < len(held_out) < 6
    report_path = tmp_path / "report.json"
    assert run("evaluate", "--model", grey_model, "--data", grey_data, "--samples", 1, "--json", report_path) == 0
    trained = sorted(f"img{i}" for i in range(6) if f"img{i}" not in held_out)
    assert json.loads(report_path.read_text())["trained_on_cases"] == trained
    assert f"note: the model trained on {len(trained)} of these 6 cases" in capsys.readouterr().err
    listed = tmp_path / "held_out.txt"
    listed.write_text("\n".join(held_out) + "\n")
    assert run("evaluate", "--model", grey_model, "--data", grey_data, "--cases", listed, "--samples", 1,
               "--json", tmp_path / "held_out.json") == 0
    assert "trained_on_cases" not in json.loads((tmp_path / "held_out.json").read_text())
    assert "note:" not in capsys.readouterr().err


def test_evaluate_scores_a_perfect_prediction_as_one(grey_model, grey_data, monkeypatch):
    """The metric plumbing: masks read as 0/255 compare against labels 0/1 at the input's pixels."""
    import cdal_core.predict2d as p2d
    from cdal_core.data import read_png_pairs
    from cdal_core.model_io import load_model
    real = p2d.segment_image_2d
    cases = read_png_pairs(grey_data)

    def oracle(array, model, **kw):
        out = real(array, model, **kw)
        # read without read_mask_2d, which the evaluation itself uses: a bug there must not cancel out
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[oracle.i].label))) == 255
        assert truth.shape == array.shape[-2:] and 0 < truth.mean() < 1
        oracle.i += 1
        out.labels = truth.astype(np.uint8)
        return out

    oracle.i = 0
    monkeypatch.setattr(p2d, "segment_image_2d", oracle)
    report = p2d.evaluate_pairs(load_model(grey_model), cases, samples=1)
    assert report["per_class"]["Foreground"]["dice"] == pytest.approx(1.0)
    assert report["per_class"]["Foreground"]["iou"] == pytest.approx(1.0)


@pytest.mark.parametrize("values, words", [([0, 128, 255], ["0/255 or 0/1", "128"]), ([0, 2], ["0/255"])])
def test_masks_with_other_values_are_refused(grey_model, grey_data, tmp_path, capsys, values, words):
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    image = _read(grey_data / "images" / "img0.png")
    _write(data / "images" / "a.png", image)
    mask = np.full(image.shape, values[0], np.uint8)
    for i, v in enumerate(values[1:]):
        mask[i * 5:(i + 1) * 5] = v
    _write(data / "masks" / "a.png", mask)
    assert_error(run("evaluate", "--model", grey_model, "--data", data, "--samples", 1), capsys, *words)


def test_cli_end_to_end_on_a_folder_with_images(grey_model, grey_data, tmp_path):
    """As a user runs it: a folder holding images/ goes to the 2D path."""
    proc = subprocess.run([sys.executable, "-m", "cdal_core.cli", "predict", "--model", str(grey_model),
                           "--input", str(grey_data), "--output", str(tmp_path / "o"), "--samples", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "o").glob("*_seg.png"))) == 6


def test_training_batches_are_patches_and_repeat_exactly(grey_data, tmp_path):
    """Patch training draws train_size windows of the image_size image, the same ones for the same step (so a
    resumed run continues exactly)."""
    from cdal_core.config import TrainConfig
    from cdal_core.trainer import Trainer
    cfg = TrainConfig.from_dict(dict(TINY_CONFIG, train_size=[32, 32], image_size=[64, 64]))
    trainer = Trainer(str(grey_data), str(tmp_path / "run"), cfg, device="cpu")
    assert trainer.banks[0].images.shape[-2:] == (64, 64)
    (a, x0_a, t_a, _), (b, x0_b, _, _) = trainer._batch(7), trainer._batch(7)
    assert a.shape == (4, 1, 32, 32) and x0_a.shape == (4, 2, 32, 32)
    assert torch.equal(a, b) and torch.equal(x0_a, x0_b)
    assert not torch.equal(a, trainer._batch(8)[0])


def test_shipped_cxr_model_segments_a_chest_xray():
    """The shipped model (two generators) loads by name and finds the lungs of a Shenzhen image. (The image is in
    configs/cxr_val.txt, which the shipped weights trained on since session 27's refit; the recipe scores 94.9 on
    average over those 26 images when they are held out.)"""
    from core_settings import SHARED_DATA
    from cdal_core.model_io import list_models, load_model
    from cdal_core.metrics import segmentation_metrics
    from cdal_core.predict2d import read_image_2d, read_mask_2d, segment_image_2d
    data = SHARED_DATA / "CXR"
    if "cxr" not in list_models() or not (data / "images" / "CHNCXR_0603_1.png").exists():
        pytest.skip("shipped 'cxr' model or the CXR data not here")
    model = load_model("cxr")
    assert model.card["input"]["image_size"] == [128, 128] and model.class_names == ["Background", "Lungs"]
    assert len(model.generators) == 2
    array = read_image_2d(data / "images" / "CHNCXR_0603_1.png", 1)
    truth = read_mask_2d(data / "masks" / "CHNCXR_0603_1.png", array.shape[-2:], 2)
    result = segment_image_2d(array, model, seed=0, precision="fp32", with_attention=False)
    assert segmentation_metrics(result.labels.astype(np.int64), truth, 2, (1.0, 1.0))[1]["dice"] > 0.88


def test_shipped_monuseg_model_finds_nuclei_on_a_whole_validation_tile():
    """The RGB model loads by name and segments a whole 1000x1000 tile through the sliding windows (one sample of
    two steps here to keep the test short). Since session 28 the shipped model has trained on this tile too."""
    from core_settings import SHARED_DATA
    from cdal_core.model_io import list_models, load_model
    from cdal_core.predict2d import read_image_2d, read_mask_2d, segment_image_2d
    tile = "TCGA-21-5786-01Z-00-DX1.png"   # in configs/monuseg_val.txt
    data = SHARED_DATA / "MoNuSeg" / "train"
    if "monuseg" not in list_models() or not (data / "images" / tile).exists():
        pytest.skip("shipped 'monuseg' model or the MoNuSeg data not here")
    model = load_model("monuseg")
    assert model.config.image_channels == 3 and model.class_names == ["Background", "Nuclei"]
    array = read_image_2d(data / "images" / tile, 3)
    truth = read_mask_2d(data / "masks" / tile, array.shape[-2:], 2) > 0
    result = segment_image_2d(array, model, steps=2, samples=1, seed=0, precision="fp32", with_attention=False)
    assert result.labels.shape == truth.shape == (1000, 1000)
    found = result.labels > 0
    assert 200 * (found & truth).sum() / (found.sum() + truth.sum()) > 65


def test_a_3d_model_is_refused_on_images(tiny_model, grey_data, tmp_path, capsys):
    assert_error(run("predict", "--model", tiny_model, "--input", grey_data / "images" / "img0.png", "--output",
                     tmp_path / "out"), capsys, "3D volumes", "2D model")
    assert not (tmp_path / "out").exists()


def test_ship_model_ships_a_2d_model_with_its_validation(grey_model, grey_data, tmp_path, monkeypatch):
    """tools/ship_model.py on a 2D run: no landmarks are sought in an MSD folder, the per-image report fields
    reach the card, and the shipped model loads by name."""
    from pathlib import Path
    from cdal_core.model_io import load_model
    report = tmp_path / "val.json"
    assert run("evaluate", "--model", grey_model, "--data", grey_data, "--samples", 1, "--json", report) == 0
    shipped = tmp_path / "models"
    env = {**os.environ, "CDAL_SHIPPED_MODELS": str(shipped)}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "tools/ship_model.py"), str(grey_model), "discs",
                           "--data", str(grey_data), "--recipe", "test", "--validation", str(report)],
                          capture_output=True, env=env)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    monkeypatch.setenv("CDAL_SHIPPED_MODELS", str(shipped))
    card = load_model("discs").card
    assert card["validation"]["images"] == 6 and "seconds_per_image" in card["validation"]
    assert card["normalisation"]["method"] == "min-max" and card["training"]["recipe"] == "test"
    again = subprocess.run([sys.executable, str(root / "tools/ship_model.py"), str(grey_model), "discs",
                            "--data", str(grey_data), "--recipe", "test 2", "--overwrite"], capture_output=True, env=env)
    assert again.returncode == 0, again.stderr.decode("utf-8", "replace")
    assert sorted(p.name for p in shipped.iterdir()) == ["discs"], "the replaced model is swapped out, not left"
    assert load_model("discs").card["training"]["recipe"] == "test 2"


def test_a_folder_of_images_in_parallel_matches_one_at_a_time(grey_model, grey_data, tmp_path):
    """Several images at once (one thread each) write what one at a time writes, in input order; a bad image
    gets its own error line and costs the others nothing."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _write(folder / f"img{i}.png", _read(grey_data / "images" / f"img{i}.png"))
    _write(folder / "zblank.png", np.full((40, 40), 9, np.uint8))  # constant
    outputs = {}
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}"
        proc = subprocess.run([sys.executable, "-m", "cdal_core.cli", "predict", "--model", str(grey_model),
                               "--input", str(folder), "--output", str(out), "--samples", "2"],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "CDAL_THREADS": threads})
        assert proc.returncode == 2 and "1 of 4 inputs were not segmented (zblank.png" in proc.stderr, proc.stderr
        assert [ln.split(":")[0] for ln in proc.stdout.splitlines()] == [f"img{i}.png" for i in range(3)]
        outputs[threads] = {f.name: _read(f) for f in out.glob("img*")}
    assert len(outputs["1"]) == 15 and outputs["1"].keys() == outputs["2"].keys()
    for name, array in outputs["1"].items():
        assert np.array_equal(array, outputs["2"][name]), name


def test_evaluate_images_in_parallel_scores_what_one_at_a_time_scores(grey_model, grey_data, monkeypatch):
    from cdal_core.data import read_png_pairs
    from cdal_core.model_io import load_model
    from cdal_core.predict2d import evaluate_pairs
    model, cases = load_model(grey_model), read_png_pairs(grey_data)[:3]
    monkeypatch.setenv("CDAL_THREADS", "2")
    serial = evaluate_pairs(model, cases, samples=2)
    both = evaluate_pairs(model, cases, samples=2, parallel=True)
    assert both["images_at_once"] == 2 and "images_at_once" not in serial
    assert [r["case"] for r in both["per_image"]] == [c.name for c in cases]
    for a, b in zip(serial["per_image"], both["per_image"]):
        assert a["Foreground_dice"] == pytest.approx(b["Foreground_dice"], abs=1e-3)
    assert serial["uncertainty"]["auroc"] == pytest.approx(both["uncertainty"]["auroc"], abs=1e-3)


def test_an_interrupted_write_leaves_none_of_the_image_outputs(tmp_path, monkeypatch):
    """The five outputs of one image are a set: Ctrl-C while writing the third leaves no lone label PNG, which
    would otherwise make the re-run refuse (without --overwrite) or mix two runs' outputs."""
    from cdal_core import predict2d
    result = predict2d.ImageResult(labels=np.zeros((8, 8), np.uint8), probabilities=np.zeros((2, 8, 8), np.float32),
                                   uncertainty=np.zeros((8, 8), np.float32), attention=None)
    paths = predict2d.output_paths(tmp_path, "a")
    real_write, calls = sitk.WriteImage, []

    def interrupted(image, path, *rest):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(image, path, *rest)

    monkeypatch.setattr(sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict2d.write_outputs(result, paths, num_classes=2)
    assert len(calls) == 3 and sorted(os.listdir(tmp_path)) == []
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    predict2d.write_outputs(result, paths, num_classes=2)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths.values())


def test_a_trained_2d_model_keeps_the_last_steps_prediction(grey_model):
    # pooling every step's x0 did not help the 2D models (CXR -0.06 +- 0.03 Dice, session 23): Algorithm 2 stays
    from cdal_core.model_io import load_model
    assert load_model(str(grey_model)).step_pooling == "last"


def test_a_finetune_keeps_its_models_test_time_symmetries_and_dihedral_training_sets_them(rgb_model, grey_model,
                                                                                           tmp_path):
    """Fine-tuning monuseg used to write a card without ``test_time_symmetries``, so the new model was sampled in
    one orientation only (-1.35 Dice on the validation tiles, session 10); a model trained on all 8 flips and
    quarter turns has no preferred orientation either."""
    import json
    import shutil
    from cdal_core.config import TrainConfig
    from cdal_core.model_io import read_card
    from cdal_core.trainer import train
    assert "test_time_symmetries" not in read_card(grey_model)["input"]
    start = tmp_path / "start"
    shutil.copytree(rgb_model, start)
    card = json.loads((start / "model.json").read_text())
    card["input"]["test_time_symmetries"] = True
    (start / "model.json").write_text(json.dumps(card))
    data = _dataset(tmp_path / "rgb", rgb=True, n=3)
    cfg = dict(TINY_CONFIG, train_size=[32, 32], image_size=[64, 64], num_steps=2, val_fraction=0.0)
    tuned = train(str(data), str(tmp_path / "tuned"), TrainConfig.from_dict(cfg), max_steps=1, device="cpu",
                  init_model=str(start))
    assert read_card(tuned)["input"]["test_time_symmetries"] is True
    plain = train(str(data), str(tmp_path / "plain"), TrainConfig.from_dict(cfg), max_steps=1, device="cpu",
                  init_model=str(rgb_model))
    assert "test_time_symmetries" not in read_card(plain)["input"]
    dihedral = dict(cfg, network=dict(TINY_CONFIG["network"], image_channels=3),
                    augmentation={"probability": 0.0, "affine_probability": 0.0, "dihedral": True})
    turned = train(str(data), str(tmp_path / "turned"), TrainConfig.from_dict(dihedral), max_steps=1, device="cpu")
    assert read_card(turned)["input"]["test_time_symmetries"] is True


def test_a_config_free_finetune_trains_at_the_models_training_size_and_keeps_its_working_size(rgb_model, tmp_path):
    """``cdal finetune`` without --config used to cut patches from images resized to the patch size (a MoNuSeg tile
    at 256 instead of 512). It now resizes them as the model trained (``input.train_image_size``, else
    ``image_size``), and a model segmented at another size than it trained keeps that size."""
    import json
    import shutil
    from cdal_core.config import TrainConfig
    from cdal_core.model_io import read_card
    from cdal_core.trainer import train
    data = _dataset(tmp_path / "rgb", rgb=True, n=3)
    plain = TrainConfig.for_finetuning(read_card(rgb_model))
    assert plain.image_size == [64, 64] and plain.train_size == [32, 32]
    start = tmp_path / "start"
    shutil.copytree(rgb_model, start)
    card = json.loads((start / "model.json").read_text())
    card["input"].update(image_size=[80, 80], train_image_size=[64, 64])
    (start / "model.json").write_text(json.dumps(card))
    cfg = TrainConfig.for_finetuning(card)
    assert cfg.image_size == [64, 64]
    cfg.val_fraction = 0.0
    tuned = read_card(train(str(data), str(tmp_path / "tuned"), cfg, max_steps=1, device="cpu",
                            init_model=str(start)))
    assert tuned["input"]["image_size"] == [80, 80] and tuned["input"]["train_image_size"] == [64, 64]
    given = TrainConfig.from_dict(dict(TINY_CONFIG, train_size=[32, 32], val_fraction=0.0))  # a --config without it
    assert given.image_size is None
    from_config = read_card(train(str(data), str(tmp_path / "given"), given, max_steps=1, device="cpu",
                                  init_model=str(start)))
    assert from_config["input"]["image_size"] == [80, 80] and from_config["input"]["train_image_size"] == [64, 64]
    other = TrainConfig.for_finetuning(card)
    other.image_size, other.val_fraction = [48, 48], 0.0   # trained at another size: the start's 80 says nothing
    retrained = read_card(train(str(data), str(tmp_path / "other"), other, max_steps=1, device="cpu",
                                init_model=str(start)))
    assert retrained["input"]["image_size"] == [48, 48] and "train_image_size" not in retrained["input"]


def test_evaluate_json_is_strict_where_a_metric_is_undefined(grey_model, grey_data, tmp_path):
    """One image has no image-level rank correlation: the report writes null there, not a bare NaN that strict
    JSON readers (jq, JavaScript) reject."""
    one = tmp_path / "one.txt"
    one.write_text("img0\n")
    report_path = tmp_path / "report.json"
    assert run("evaluate", "--model", grey_model, "--data", grey_data, "--cases", one, "--samples", 1,
               "--json", report_path) == 0
    text = report_path.read_text()

    def refuse(constant):
        raise AssertionError(f"{constant} in the report")

    report = json.loads(text, parse_constant=refuse)
    assert report["images"] == 1 and report["uncertainty"]["spearman_image"] is None


def test_evaluate_never_writes_its_report_over_a_mask(grey_model, grey_data, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(grey_data, data)
    mask = data / "masks" / "img1.png"
    before = mask.read_bytes()
    assert_error(run("evaluate", "--model", grey_model, "--data", data, "--json", mask, "--overwrite"), capsys,
                 "would replace", "which this evaluation reads")
    assert mask.read_bytes() == before


def _grey_alpha_png(path, size=20):
    """A grey + alpha PNG (colour type 4), written by hand: what some tools save for a grey X-ray with a mask."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"".join(bytes([(x * 12) % 256, 255]) for x in range(size)) for _ in range(size))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_a_grey_png_with_transparency_is_named_not_called_incomplete(grey_model, tmp_path, capsys):
    image = _grey_alpha_png(tmp_path / "xray.png")
    assert_error(run("predict", "--model", grey_model, "--input", image, "--output", tmp_path / "out"), capsys,
                 "grey PNG with a transparency", "without transparency")


def test_a_strip_or_thumbnail_is_too_small_to_segment(grey_model, tmp_path, capsys):
    strip = tmp_path / "strip.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(512, dtype=np.uint8)[None] // 2), str(strip))
    assert_error(run("predict", "--model", grey_model, "--input", strip, "--output", tmp_path / "out"), capsys,
                 "512 x 1 pixels", "too small")
    assert not (tmp_path / "out" / "strip_seg.png").exists()


@pytest.mark.parametrize("flag", [["--roi", "1,2,3,4,5,6"], ["--localise", "off"], ["--allow-thick-slices"]])
def test_3d_only_options_are_refused_for_2d_images_not_ignored(grey_model, grey_data, tmp_path, capsys, flag):
    assert_error(run("predict", "--model", grey_model, "--input", grey_data / "images" / "img0.png", "--output",
                     tmp_path / "out", *flag), capsys, flag[0], "only for 3D volumes")
    assert not (tmp_path / "out").exists()


def test_a_volume_given_to_a_2d_model_leaves_no_output_folder(grey_model, synthetic_dir, tmp_path, capsys):
    assert_error(run("predict", "--model", grey_model, "--input", synthetic_dir / "imagesTr" / "case_000.nii.gz",
                     "--output", tmp_path / "out"), capsys, "is a 2D model")
    assert not (tmp_path / "out").exists()


def test_training_takes_images_by_the_channel_rules_predict_will_apply(grey_data, tmp_path_factory, tmp_path):
    """An RGB model fine-tuned on grey images trained (grey was repeated to RGB), then `cdal predict` refused
    every image it trained on; a grey image saved as RGB was refused for a grey model that predict accepts."""
    from cdal_core.errors import CDALError
    with pytest.raises(CDALError, match="greyscale image but the model expects RGB"):
        _train(tmp_path_factory, grey_data, 3)
    stored_rgb = tmp_path / "stored_rgb"
    shutil.copytree(grey_data, stored_rgb)
    for path in (stored_rgb / "images").glob("*.png"):
        grey = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        _write(path, np.repeat(grey[..., None], 3, axis=-1))
    assert (Path(_train(tmp_path_factory, stored_rgb, 1)) / "model.json").exists()


def test_evaluate_warns_of_a_mask_that_marks_nothing(grey_model, grey_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(grey_data, data)
    _write(data / "masks" / "img2.png", np.zeros((72, 80), np.uint8))
    report_path = tmp_path / "r.json"
    assert run("evaluate", "--model", grey_model, "--data", data, "--samples", 1, "--json", report_path) == 0
    assert "img2.png: marks nothing" in capsys.readouterr().out
    assert any("img2.png: marks nothing" in w for w in json.loads(report_path.read_text())["warnings"])
