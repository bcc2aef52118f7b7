"""tools/gpu_session.py: training from a data bundle sees exactly the data a normal run sees."""

import json

import numpy as np
import pytest
import torch

from cdal_core.config import TrainConfig
from cdal_core.synthetic import make_msd_dataset
from cdal_core.trainer import Trainer

from core_settings import ROOT, TINY_CONFIG, load_tool


def test_bundle_trainer_sees_the_slices_and_standardisation_of_a_normal_run(tmp_path):
    gs = load_tool("gpu_session")
    data = make_msd_dataset(tmp_path / "msd", num_volumes=5, seed=3)
    held_out = ["case_001", "case_003"]
    cfg = TrainConfig.from_dict(dict(TINY_CONFIG, val_cases=held_out, val_max_volumes=0))
    names = gs.bundle_msd(data, cfg, tmp_path / "bundle.npz")
    assert set(held_out) < set(names)
    normal = Trainer(str(data), str(tmp_path / "normal"), cfg, device="cpu")
    bundled = gs.bundle_trainer_class()(tmp_path / "bundle.npz", tmp_path / "bundled", cfg, held_out, device="cpu")
    assert bundled.norm.landmarks == pytest.approx(normal.norm.landmarks, abs=1e-5)
    assert bundled.class_names == normal.class_names
    a, b = normal.banks[0], bundled.banks[0]
    assert a.images.shape == b.images.shape and np.array_equal(a.labels, b.labels)
    assert np.abs(a.images - b.images).max() < 1e-4  # uint16 storage
    assert bundled.data_summary["train_cases"] == len(names) - len(held_out)


def test_sagittal_runs_slice_as_the_cpu_sagittal_member_does():
    import json
    gs = load_tool("gpu_session")
    cpu = json.loads((ROOT / "configs" / "hippocampus_sagittal_mirror_cv0.json").read_text())
    cfg, held_out = gs.run_config("sag_cv0")
    assert (cfg.slice_axis, cfg.train_size) == (cpu["slice_axis"], cpu["train_size"]) == (2, [48, 56])
    assert cfg.augmentation["flip_axis"] is None and cpu["augmentation"]["flip_axis"] is None
    # the left-right mirror of a head reverses a sagittal model's context slices: both sides are learnt
    assert cfg.augmentation["flip_across_slices"] is True and cpu["augmentation"]["flip_across_slices"] is True
    assert cfg.views == [(2, [48, 56])]
    folds = json.loads((ROOT / "configs" / "hippocampus_folds.json").read_text())["folds"]
    assert held_out == folds[0] and gs.run_config("sag_all")[1] == []
    axial, _ = gs.run_config("cv0")
    assert axial.slice_axis == 0 and axial.augmentation["flip_axis"] == 1
    assert not axial.augmentation.get("flip_across_slices")


def test_coronal_runs_slice_and_learn_as_the_cpu_coronal_member_does():
    import json
    from cdal_core.geometry import mirrored_volume_axes
    gs = load_tool("gpu_session")
    cpu = json.loads((ROOT / "configs" / "hippocampus_coronal_nodice_cv0.json").read_text())
    cfg, held_out = gs.run_config("cor_cv0")
    assert (cfg.slice_axis, cfg.train_size) == (cpu["slice_axis"], cpu["train_size"]) == (1, [48, 40])
    # without the soft-Dice term every coronal run so far stayed healthy; with it, all four collapsed
    assert cfg.dice_weight == cpu["dice_weight"] == 0.0 and gs.run_config("cv0")[0].dice_weight > 0
    # both mirror the left-right axis of the RAS grid (array axis 2), as the axial runs do
    assert mirrored_volume_axes(cfg.augmentation, 1) == mirrored_volume_axes(cpu["augmentation"], 1) == {2}
    assert mirrored_volume_axes(gs.run_config("cv0")[0].augmentation, 0) == {2}
    folds = json.loads((ROOT / "configs" / "hippocampus_folds.json").read_text())["folds"]
    assert held_out == folds[0] and gs.run_config("cor_all")[1] == []


def test_compile_generator_runs_the_generators_training_passes_through_torch_compile(tmp_path, monkeypatch):
    """The flag is wired: both generator passes of a step go through the compiled module, which shares the
    generator's parameters (checkpoints and EMA see the trained weights). Compiling for real takes minutes on
    a CPU (3 tiny steps gave the same losses to 1e-6 as eager, 213 s); the GPU benchmark measures it
    (``gpu_session.py bench --precisions bf16,bf16+compile``)."""
    import torch
    compiled = []

    def fake_compile(module):
        calls = []
        compiled.append(calls)

        def wrapper(*args):
            calls.append(len(args))
            return module(*args)
        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    data = make_msd_dataset(tmp_path / "msd", num_volumes=3, seed=3)
    trainer = Trainer(str(data), str(tmp_path / "run"), TrainConfig.from_dict(dict(TINY_CONFIG, compile_generator=True)),
                      device="cpu")
    before = [p.detach().clone() for p in trainer.G.parameters()]
    trainer.train_step()
    assert compiled == [[4, 4]]                    # the no-grad fake pass and the attention-weighted pass
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.G.parameters()))
    plain = Trainer(str(data), str(tmp_path / "plain"), TrainConfig.from_dict(TINY_CONFIG), device="cpu")
    assert plain.G_step is plain.G and len(compiled) == 1


def test_cxr_augmentation_pair_differs_only_in_its_augmentation():
    """Session 25's CXR lead at GPU length: the two arms of a pair share everything but the augmentation, the
    control keeps the shipped recipe's and the test arm takes configs/cxr_ft_strongaug.json's."""
    gs = load_tool("gpu_session")
    control, held_out = gs.run_config("cxr_g2_control")
    strong, held_out_strong = gs.run_config("cxr_g2_strongaug")
    strong_cfg = json.loads((ROOT / "configs/cxr_ft_strongaug.json").read_text())["augmentation"]
    shipped_cfg = json.loads((ROOT / "configs/cxr.json").read_text())["augmentation"]
    assert strong.augmentation == dict(strong_cfg, backend="batched")
    assert control.augmentation == dict(shipped_cfg, backend="batched")
    assert held_out == held_out_strong and len(held_out) == 26
    a, b = control.to_dict(), strong.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"augmentation"}
    assert gs.FINETUNE_RUNS["cxr_g2_strongaug"]["member"] == 1 and strong.batch_size == 32


def test_monuseg_histology_augmentation_pair_differs_only_in_its_augmentation():
    """Session 26: the control arm keeps the MoNuSeg recipe's augmentation; the test arm adds the quarter turns and
    the stain jitter of configs/monuseg_ft_histaug.json; both keep their discriminator for the attention map."""
    gs = load_tool("gpu_session")
    control, held_out = gs.run_config("monuseg_control")
    histaug, held_out_histaug = gs.run_config("monuseg_histaug")
    shipped_cfg = json.loads((ROOT / "configs/monuseg_gpu.json").read_text())["augmentation"]
    assert control.augmentation == dict(shipped_cfg, backend="batched")
    assert histaug.augmentation == dict(shipped_cfg, backend="batched", dihedral=True, stain_jitter=0.05)
    assert held_out == held_out_histaug and len(held_out) == 6
    a, b = control.to_dict(), histaug.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"augmentation"}
    assert {"monuseg_control", "monuseg_histaug"} <= gs.WITH_DISCRIMINATOR


def test_all_data_refits_hold_nothing_out_and_keep_their_pairs_recipe():
    """Session 27: each arm of the 2D pairs has an all-data twin for shipping, which trains on the validation
    images too and otherwise keeps its arm's recipe (a new seed); the primaries keep their discriminator."""
    gs = load_tool("gpu_session")
    for arm in ("cxr_g1_strongaug", "cxr_g2_control", "monuseg_histaug", "monuseg_control"):
        paired, held_out = gs.run_config(arm)
        refit, nothing = gs.run_config(arm + "_all")
        assert held_out and nothing == []
        a, b = paired.to_dict(), refit.to_dict()
        assert {k for k in a if a[k] != b[k]} == {"seed"} and refit.seed == 27
        assert gs.FINETUNE_RUNS[arm + "_all"].get("member", 0) == gs.FINETUNE_RUNS[arm].get("member", 0)
    assert {"cxr_g1_strongaug_all", "monuseg_histaug_all"} <= gs.WITH_DISCRIMINATOR
    assert "cxr_g2_strongaug_all" not in gs.WITH_DISCRIMINATOR


def test_cxr_pairs_start_from_the_model_shipped_before_the_refit(tmp_path):
    """Session 27's refit trained on the 26 validation images, so the CXR pairs (scored on them) start from the
    model shipped until then, which pack-init takes from git; the packed copy is that model in fp16."""
    import subprocess
    gs = load_tool("gpu_session")
    assert {gs.FINETUNE_RUNS[f"cxr_g{m}_{arm}"]["init"] for m in (1, 2) for arm in ("control", "strongaug")} \
        == {"cxr_s26"}
    assert gs.FINETUNE_RUNS["cxr_g1_strongaug_all"]["init"] == "cxr_s26"
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "f7b0f38:Resources/Models/cxr/model.json"],
                      stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("this checkout does not hold commit f7b0f38 (a shallow clone)")
    from safetensors.torch import load_file
    from cdal_core.model_io import load_model
    with pytest.raises(SystemExit, match="holds no cxr_s26"):
        gs.check_inits(["monuseg_control", "cxr_g1_control"])   # not shipped: refused before any device time
    gs.pack_init(["cxr_s26=f7b0f38:Resources/Models/cxr"], tmp_path)
    gs.check_inits(["cxr_g1_control", "cxr_g2_strongaug_all"], tmp_path)
    packed = load_model(tmp_path / "cxr_s26")
    assert packed.card["training"]["data"]["train_cases"] == 103 and len(packed.generators) == 2
    assert all(v.dtype == torch.float16 for v in load_file(str(tmp_path / "cxr_s26" / "model.safetensors")).values())
    with pytest.raises(SystemExit, match="no model card"):
        gs.model_from_git("f7b0f38", "configs", tmp_path / "nothing")


def test_monuseg_pairs_start_from_the_model_shipped_before_the_refit(tmp_path):
    """Session 28's refit trained on the 6 validation tiles, so the MoNuSeg pair (scored on them) and its all-data
    twins start from the model shipped until then, packed from git."""
    import subprocess
    gs = load_tool("gpu_session")
    assert {gs.FINETUNE_RUNS[f"monuseg_{arm}{all_}"]["init"] for arm in ("control", "histaug")
            for all_ in ("", "_all")} == {"monuseg_s27"}
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "f325ee2:Resources/Models/monuseg/model.json"],
                      stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("this checkout does not hold commit f325ee2 (a shallow clone)")
    from cdal_core.model_io import load_model
    with pytest.raises(SystemExit, match="holds no monuseg_s27"):
        gs.check_inits(["monuseg_histaug"])
    gs.pack_init(["monuseg_s27=f325ee2:Resources/Models/monuseg"], tmp_path)
    gs.check_inits(["monuseg_control", "monuseg_histaug_all"], tmp_path)
    packed = load_model(tmp_path / "monuseg_s27")
    assert packed.card["training"]["data"]["train_cases"] == 24 and packed.card["input"]["test_time_symmetries"]
