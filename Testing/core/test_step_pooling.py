"""Pooling each sample's x0 predictions over the denoising steps: the card's default, the CLI's override, and
refusals of a pooling that does not exist."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cdal_core.cli import main
from cdal_core.errors import CDALError
from cdal_core.inference import segment_image
from cdal_core.model_io import load_model
from cdal_core.sampler import STEP_POOLING, step_pooling_weights
from cdal_core.trainer import VOLUME_STEP_POOLING


def _with_pooling(tiny_model, tmp_path, pooling):
    folder = tmp_path / f"pooling_{pooling}"
    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "model.json").read_text())
    card["sampling"] = {"step_pooling": pooling}
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def _volume():
    image = sitk.GetImageFromArray(np.random.default_rng(3).random((6, 40, 32)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    return image


def test_weights_of_each_pooling():
    assert step_pooling_weights("last", 3) is None
    assert step_pooling_weights("mean", 2) == [1.0, 1.0]
    assert step_pooling_weights("linear", 4) == [4.0, 3.0, 2.0, 1.0]  # from step T down to 1
    with pytest.raises(ValueError, match="last, mean, linear"):
        step_pooling_weights("median", 2)


def test_the_cli_offers_exactly_the_samplers_poolings(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "{auto," + ",".join(STEP_POOLING) + "}" in capsys.readouterr().out


def test_a_trained_volume_model_pools_its_steps(synthetic_dir, tiny_config_file, tmp_path):
    from cdal_core.config import TrainConfig
    from cdal_core.trainer import train
    model = train(str(synthetic_dir), str(tmp_path / "run"), TrainConfig.load(str(tiny_config_file)), max_steps=1,
                  device="cpu")
    assert load_model(str(model)).step_pooling == VOLUME_STEP_POOLING != "last"


def test_the_cards_pooling_is_the_default_and_an_argument_overrides_it(tiny_model, tmp_path):
    plain = load_model(str(tiny_model))
    pooled = load_model(str(_with_pooling(tiny_model, tmp_path, "mean")))
    assert plain.step_pooling == "last" and pooled.step_pooling == "mean"
    image = _volume()
    run = dict(samples=2, seed=0, with_attention=False, early_exit=False)
    last = segment_image(image, plain, **run).probabilities
    mean = segment_image(image, pooled, **run).probabilities
    assert not np.allclose(last, mean, atol=1e-4)
    np.testing.assert_array_equal(segment_image(image, pooled, step_pooling="last", **run).probabilities, last)
    np.testing.assert_array_equal(segment_image(image, plain, step_pooling="mean", **run).probabilities, mean)


def test_an_unknown_pooling_is_refused_before_any_work(tiny_model, tmp_path, synthetic_dir, capsys, monkeypatch):
    import cdal_core.inference as inference
    sampled = []
    monkeypatch.setattr(inference, "sample", lambda *a, **k: sampled.append(1))
    bad = load_model(str(_with_pooling(tiny_model, tmp_path, "median")))
    with pytest.raises(CDALError, match="step pooling must be one of last, mean, linear.*step_pooling"):
        segment_image(_volume(), bad)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(bad.path), "--data", str(synthetic_dir), "--json", str(out)]) != 0
    assert "step pooling must be one of" in capsys.readouterr().err and not out.exists()
    assert sampled == []  # no slice was sampled before the refusal


def test_evaluate_reports_the_pooling_it_used(tiny_model, synthetic_dir, tmp_path):
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(synthetic_dir), "--json", str(out),
                 "--step-pooling", "linear", "--samples", "2"]) == 0
    assert json.loads(out.read_text())["step_pooling"] == "linear"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(synthetic_dir), "--json", str(out),
                 "--overwrite", "--samples", "2"]) == 0
    assert json.loads(out.read_text())["step_pooling"] == "last"  # the card's (conftest)
