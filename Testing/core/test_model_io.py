import json
import shutil

import pytest
import torch

from cdal_core.errors import CDALError
from cdal_core.model_io import load_model, resolve_model, save_model
from cdal_core.sampler import sample


def _outputs(model):
    img = torch.randn(2, model.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    return sample(model.generator, img, model.schedule(), 2, torch.Generator().manual_seed(1)).probabilities


def test_round_trip_gives_identical_predictions(tiny_model, tmp_path):
    model = load_model(tiny_model)
    copy = save_model(tmp_path / "copy", model.card, model.generator, model.discriminator)
    again = load_model(copy)
    assert again.card == model.card
    assert torch.equal(_outputs(model), _outputs(again))
    assert again.discriminator is not None


def test_card_describes_the_model(tiny_model):
    card = json.loads((tiny_model / "model.json").read_text())
    assert [c["name"] for c in card["classes"]] == ["Background", "Anterior", "Posterior"]
    assert card["num_steps"] == 2 and card["input"]["slice_axis"] == 0 and card["input"]["orientation"] == "RAS"
    assert card["training"]["steps"] == 3 and "validation" in card
    assert all(len(c["color"]) == 3 for c in card["classes"])


def test_weights_are_not_pickled(tiny_model):
    assert (tiny_model / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors JSON header


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.json").unlink(), "model.json missing"),
    (lambda d: (d / "model.json").write_text("{oops"), "corrupt"),
    (lambda d: (d / "model.json").write_text(json.dumps({**json.loads((d / "model.json").read_text()),
                                                          "format_version": 99})), "version 99"),
    (lambda d: (d / "model.safetensors").unlink(), "missing"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]), "corrupt"),
    (lambda d: (d / "model.json").write_text(json.dumps({**json.loads((d / "model.json").read_text()),
                                                          "network": {**json.loads((d / "model.json").read_text())
                                                                      ["network"], "base_channels": 12}})),
     "do not match"),
])
def test_broken_models_give_one_clear_error(tiny_model, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    damage(broken)
    with pytest.raises(CDALError, match=message):
        load_model(broken)


def test_models_by_name(tiny_model, tmp_path, monkeypatch):
    shutil.copytree(tiny_model, tmp_path / "shipped" / "mymodel")
    monkeypatch.setenv("CDAL_SHIPPED_MODELS", str(tmp_path / "shipped"))
    monkeypatch.setenv("CDAL_USER_MODELS", str(tmp_path / "user"))
    assert resolve_model("mymodel") == tmp_path / "shipped" / "mymodel"
    with pytest.raises(CDALError, match="mymodel"):  # the message lists what exists
        resolve_model("other")
