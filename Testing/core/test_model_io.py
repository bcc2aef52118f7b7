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


def _constant_generator(model, cls):
    """A generator of the model's network whose x0 is the one-hot map of ``cls`` everywhere."""
    from cdal_core.networks import Generator
    g = Generator(model.config)
    with torch.no_grad():
        g.out_conv.weight.zero_()
        g.out_conv.bias.fill_(-5.0)
        g.out_conv.bias[cls] = 5.0
    return g


def test_ensemble_members_share_the_samples(tiny_model, synthetic_dir, tmp_path):
    """An ensemble's samples are spread over its generators in turn (5 = 3 + 2); one sample is the primary's."""
    import SimpleITK as sitk
    from cdal_core.inference import segment_image
    from cdal_core.model_io import save_member
    base = load_model(tiny_model)
    card = dict(base.card, quality={"review_uncertainty_above": {"Anterior": 0.1}})
    ensemble = save_model(tmp_path / "ensemble", card, _constant_generator(base, 1), base.discriminator)
    entry = save_member(ensemble, _constant_generator(base, 0), {"note": "always background"})
    assert entry["weights"] == "member1.safetensors"
    model = load_model(ensemble)
    saved = json.loads((ensemble / "model.json").read_text())
    assert len(model.generators) == 2 and saved["members"] == [entry]
    assert "quality" not in saved  # review limits were measured on other weights
    image = sitk.ReadImage(str(next((synthetic_dir / "imagesTr").glob("*.nii.gz"))))
    for samples, anterior in ((1, 1.0), (2, 0.5), (5, 0.6)):
        result = segment_image(image, model, samples=samples, seed=0, with_attention=False)
        assert result.probabilities[1].min() == pytest.approx(anterior, abs=1e-3)
        assert result.probabilities[1].max() == pytest.approx(anterior, abs=1e-3)
        variance = sitk.GetArrayFromImage(result.uncertainty)   # between members: sum over C of p(1-p)
        assert variance.max() == pytest.approx(2 * anterior * (1 - anterior), abs=1e-3)


def test_a_member_replaced_keeps_its_place_and_its_share_of_the_samples(tiny_model, synthetic_dir, tmp_path):
    """``replace``: the new generator takes member N's position (so its samples), the old weights file goes, and
    a member number the ensemble does not have is refused before anything is written."""
    import SimpleITK as sitk
    from cdal_core.inference import segment_image
    from cdal_core.model_io import save_member
    base = load_model(tiny_model)
    ensemble = save_model(tmp_path / "ensemble", base.card, _constant_generator(base, 1), base.discriminator)
    save_member(ensemble, _constant_generator(base, 0), {"note": "background"})
    save_member(ensemble, _constant_generator(base, 1), {"note": "anterior"})
    entry = save_member(ensemble, _constant_generator(base, 2), {"note": "posterior"}, replace=1)
    saved = json.loads((ensemble / "model.json").read_text())
    assert [m["note"] for m in saved["members"]] == ["posterior", "anterior"]
    assert entry["weights"] == "member3.safetensors" and not (ensemble / "member1.safetensors").exists()
    image = sitk.ReadImage(str(next((synthetic_dir / "imagesTr").glob("*.nii.gz"))))
    # 2 samples: the primary's and the first member's; appended last, the new one would draw none
    result = segment_image(image, load_model(ensemble), samples=2, seed=0, with_attention=False, early_exit=False)
    assert result.probabilities[2].min() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(CDALError, match="no member 3 to replace"):
        save_member(ensemble, _constant_generator(base, 0), replace=3)
    assert sorted(p.name for p in ensemble.glob("member*")) == ["member2.safetensors", "member3.safetensors"]


def test_members_skip_slices_the_primary_found_surely_background(tiny_model, synthetic_dir, tmp_path):
    """Early exit across members: where the primary's first step is surely background, the others' samples
    are not drawn and the primary's stand in for them; with every step run, the members count again."""
    import SimpleITK as sitk
    from cdal_core.inference import segment_image
    from cdal_core.model_io import save_member
    base = load_model(tiny_model)
    ensemble = save_model(tmp_path / "ensemble", base.card, _constant_generator(base, 0), base.discriminator)
    save_member(ensemble, _constant_generator(base, 1))
    model = load_model(ensemble)
    assert model.default_steps >= 2
    calls = []
    model.members[0].mapping.register_forward_pre_hook(lambda mod, args: calls.append(1))
    model.members[0].encoder.register_forward_pre_hook(lambda mod, args: calls.append(1))
    image = sitk.ReadImage(str(next((synthetic_dir / "imagesTr").glob("*.nii.gz"))))
    fast = segment_image(image, model, samples=5, seed=0)
    assert fast.probabilities[1].max() == pytest.approx(0.0, abs=1e-3) and not calls
    assert sitk.GetArrayFromImage(fast.uncertainty).max() == pytest.approx(0.0, abs=1e-3)
    assert fast.attention is not None     # the skipped runs take the first run's attention too
    full = segment_image(image, model, samples=5, seed=0, early_exit=False)
    assert full.probabilities[1].min() == pytest.approx(0.4, abs=1e-3) and calls


def test_a_member_slices_along_its_own_axis(tiny_model, synthetic_dir, tmp_path):
    """A sagittal member beside an axial primary sees sagittal slices, and the primary's early exit (axial
    slices) does not stand in for it: its slices are not the primary's."""
    import SimpleITK as sitk
    from cdal_core.inference import segment_image
    from cdal_core.model_io import save_member
    base = load_model(tiny_model)
    ensemble = save_model(tmp_path / "ensemble", base.card, _constant_generator(base, 0), base.discriminator)
    save_member(ensemble, _constant_generator(base, 1), {"slice_axes": [2]})
    model = load_model(ensemble)
    assert [axis for _, axis in model.runs] == [0, 2]
    seen = []
    model.members[0].encoder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
    image = sitk.ReadImage(str(next((synthetic_dir / "imagesTr").glob("*.nii.gz"))))
    result = segment_image(image, model, samples=5, seed=0, with_attention=False)
    z, y, _ = sitk.GetArrayViewFromImage(image).shape
    multiple = model.config.size_multiple
    assert seen and set(seen) == {(-(-z // multiple) * multiple, -(-y // multiple) * multiple)}
    assert result.probabilities[1].min() == pytest.approx(0.4, abs=1e-3)   # 2 of 5 samples, none skipped
    card = json.loads((ensemble / "model.json").read_text())
    card["members"][0]["slice_axes"] = [3]
    (ensemble / "model.json").write_text(json.dumps(card))
    with pytest.raises(CDALError, match="slice_axes"):
        load_model(ensemble)


def test_broken_ensembles_give_one_clear_error(tiny_model, tmp_path):
    from cdal_core.model_io import save_member
    from cdal_core.networks import Generator, NetworkConfig
    base = load_model(tiny_model)
    with pytest.raises(CDALError, match="network differs"):
        save_member(tiny_model, Generator(NetworkConfig(**{**base.config.to_dict(), "base_channels": 4,
                                                           "channel_mults": (1, 2), "disc_mults": (1, 2)})))
    for damage, message in (
            (lambda d: (d / "member1.safetensors").unlink(), "member member1.safetensors is missing"),
            (lambda d: (d / "member1.safetensors").write_bytes(b"junk"), "corrupt"),
            (lambda d: (d / "member1.safetensors").write_bytes((d / "model.safetensors").read_bytes()
                                                             .replace(b"generator.", b"generatoR.")), "do not match"),
            (lambda d: (d / "model.json").write_text(json.dumps({**json.loads((d / "model.json").read_text()),
                                                                 "members": [{"weights": "../x.safetensors"}]})),
             "must name a .safetensors file")):
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(tiny_model, broken)
        save_member(broken, base.generator)
        load_model(broken)
        damage(broken)
        with pytest.raises(CDALError, match=message):
            load_model(broken)


def test_member_mismatch_names_what_differs(tiny_model):
    from cdal_core.model_io import member_mismatch, member_slice_axes
    card = load_model(tiny_model).card
    assert member_mismatch(card, json.loads(json.dumps(card))) is None
    other = json.loads(json.dumps(card))
    other["normalisation"]["note"] = "landmarks added later"            # notes do not matter
    assert member_mismatch(card, other) is None
    other["input"].pop("extra_views")                                    # older cards: no extra views
    assert member_mismatch(card, other) is None
    other["normalisation"]["lower"] = 1.0
    assert member_mismatch(card, other) == "its normalisation differs"
    other = json.loads(json.dumps(card))
    other["input"]["spacing"] = [2.0, 2.0, 2.0]
    assert member_mismatch(card, other) == "its input differs"
    other = json.loads(json.dumps(card))
    other["input"].update(slice_axis=2, train_size=[40, 48])             # another view may join...
    assert member_mismatch(card, other) is None
    assert member_slice_axes(card, other) == [2]                           # ...and its entry says which
    assert member_slice_axes(card, json.loads(json.dumps(card))) is None
    other = json.loads(json.dumps(card))
    other["input"]["test_time_symmetries"] = True                        # the ensemble's card decides that
    assert member_mismatch(card, other) is None
    other = json.loads(json.dumps(card))
    other["training"]["config"]["use_latent"] = False
    assert member_mismatch(card, other) == "its use of the latent z differs"
    other = json.loads(json.dumps(card))                                 # a run names its classes after the data
    other["classes"][1]["name"] = "Foreground"
    why = member_mismatch(card, other)
    assert why.startswith("its classes differ (Background, Foreground, Posterior against the model's Background, "
                          "Anterior, Posterior)")
    assert "model.json" in why


def test_a_model_trained_without_latent_is_sampled_without_it(tiny_model, synthetic_dir, tmp_path):
    """The "without z" ablation must be measured the way it was trained: z = 0 at inference too."""
    import SimpleITK as sitk
    from cdal_core.inference import segment_image
    card = json.loads((tiny_model / "model.json").read_text())
    card["training"]["config"]["use_latent"] = False
    no_z = tmp_path / "no_z"
    shutil.copytree(tiny_model, no_z)
    (no_z / "model.json").write_text(json.dumps(card))
    image = sitk.ReadImage(str(next((synthetic_dir / "imagesTr").glob("*.nii.gz"))))
    for folder, expect_zero in ((tiny_model, False), (no_z, True)):
        model = load_model(folder)
        assert model.uses_latent is not expect_zero
        seen = []
        model.generator.mapping.register_forward_hook(lambda mod, args, out: seen.append(args[0].abs().max().item()))
        segment_image(image, model, samples=2, seed=0)
        assert seen and (max(seen) == 0) is expect_zero


@pytest.mark.parametrize("slice_axis, augmentation, expected", [
    (0, {"flip_axis": 1}, True),                  # axial (Y, X) slices: in-plane axis 1 is X, left-right
    (0, {"flip_axis": 0}, False),                 # ... axis 0 is front-back
    (1, {"flip_axis": 1}, True),                  # coronal (Z, X) slices
    (2, {"flip_axis": None}, False),              # sagittal: no in-plane flip is a left-right mirror
    (2, {"flip_axis": None, "flip_across_slices": True}, True),
    (0, None, False),                             # no augmentation at all
])
def test_learns_left_right_mirror_from_slicing_and_flips(slice_axis, augmentation, expected):
    from cdal_core.model_io import learns_left_right_mirror

    card = {"input": {"orientation": "RAS"},
            "training": {"config": {"slice_axis": slice_axis, "augmentation": augmentation}}}
    assert learns_left_right_mirror(card) is expected
    # on an LPS grid the left-right axis is still array axis 2; a grid code without L/R or no config: unknown
    card["input"]["orientation"] = "LPS"
    assert learns_left_right_mirror(card) is expected
    assert learns_left_right_mirror(dict(card, input={"orientation": "SPA"})) is None  # no left-right letter
    assert learns_left_right_mirror({"input": {"orientation": "RAS"}}) is None


def test_an_interrupted_export_keeps_the_previous_weights_and_card_together(tiny_model, tmp_path, monkeypatch):
    """model/ is re-exported at every better validation: a crash while writing the new pair must leave the old
    pair, never the new weights under the old card."""
    from pathlib import Path
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    before = {name: (folder / name).read_bytes() for name in ("model.json", "model.safetensors")}
    model = load_model(folder)
    card = json.loads(before["model.json"])
    card["description"] = "a newer export"
    real_write = Path.write_bytes

    def interrupted(self, data):
        if self.name.startswith(".model"):  # the card's staging file: the weights are already staged
            raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(folder, card, model.generators[0], model.discriminator)
    monkeypatch.setattr(Path, "write_bytes", real_write)
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in Path(tiny_model).iterdir())
    save_model(folder, card, model.generators[0], model.discriminator)
    assert json.loads((folder / "model.json").read_text())["description"] == "a newer export"


def test_reports_and_cards_are_strict_json_with_undefined_metrics_as_null():
    import json
    import numpy as np
    from cdal_core.model_io import json_bytes

    report = {"spearman": float("nan"), "hd95": [1.5, float("inf")], "auroc": np.float32("nan"), "n": np.int64(3),
              "nested": {"ok": 0.25}}
    text = json_bytes(report).decode()

    def refuse(constant):
        raise ValueError(constant)

    back = json.loads(text, parse_constant=refuse)  # a strict reader: NaN / Infinity would raise here
    assert back == {"spearman": None, "hd95": [1.5, None], "auroc": None, "n": 3, "nested": {"ok": 0.25}}
