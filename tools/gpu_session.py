"""One lent GPU session, prepared here and run there in a single command (issues 15, 16, 17).

A lent GPU machine has torch but neither SimpleITK nor our data, and what travels is capped at 64 MiB, so:

1. ``prepare`` (here): read each dataset once with the project's own loaders and store what training needs
   in compact bundles (.npz): hippocampus volumes on the model grid, scaled to [0, 1] (uint16) with each
   scan's histogram landmarks, so every fold re-derives its own standardisation exactly as ``load_volume``
   would; 2D images resized to the config's image size (uint8) with their masks.
2. ``session`` (there): a short benchmark alone on the GPU (training slices/s in bf16 and fp32, the batch
   pipeline alone, sampling volumes/s), then all trainings at once, each for the same wall-clock budget with a
   cosine learning rate over that budget, then the generators and discriminators (fp16, to fit the transfer
   cap) packed into a few tar files.
3. ``unpack`` (here): rebuild fp32 model folders under ``runs/gpu/<run>/model``.

Lesson of the first session (docs/RESULTS.md): a training step is launch-bound (3,000 kernel launches, 0.12 s
at batch 128 alone on an H100), and 12 processes time-slicing one GPU got 830 steps each in 7 minutes, far too
few. Run 2-4 at ``--batch 512`` instead, e.g. ``--runs cv0,all0,all1 --batch 512``.

What travels: at most 64 MiB of tracked and untracked-not-ignored files plus the carried paths, and the shipped
weights alone are now over that. Trainings from bundles need none of them, so untrack them for the call and put them
back afterwards (session 14):

    echo 'Resources/Models/*/*.safetensors' >> .git/info/exclude; git rm --cached -q Resources/Models/*/*.safetensors
    # device run: carry [".whl", ".gpu/hippocampus.npz"] (the MONAI wheel, the bundle)
    git reset -q; sed -i '/safetensors/d' .git/info/exclude

Session 14 (one H200): ``--runs sag_cv0,sag_all --batch 256 --budget-s 530 --bench-steps 0`` gave 2,984 steps x 256
per run in 474 s (6.3 steps/s each, two runs sharing the GPU). Session 17 (one H200): ``--runs cv0,cv1,cv2,cv3
--batch 256 --budget-s 530 --bench-steps 0`` gave 2,202-2,231 steps x 256 per run in 468 s (4.7 steps/s each,
4,840 slices/s together), then ``--runs cv0_ft,cv1_ft,cv2_ft,cv3_ft --budget-s 240 --init-root .gpu/s17/init``
(after ``pack-init cv0=runs/gpu17/cv0/model ...``) 814-826 more steps each. Session 19 (one H200): ``--runs
r1_cv0,r2_cv0,r3_cv0,h5_cv0,h5_all --batch 128 --budget-s 515 --init-root .gpu/s19/init`` (after ``pack-init
s7=runs/s7 member5_cv0=runs/member5_cv0/model member5_all=runs/member5_all/model``) gave 2,273-2,336 steps x 128
in 458 s (5.0 steps/s each, 3,200 slices/s together), then six runs of ``--budget-s 250`` 827-850 more steps each.

Runs (hippocampus recipe: ``configs/hippocampus_gpu.json``):
- ``cv0``..``cv3``: fold k of ``configs/hippocampus_folds.json`` held out (fold 0 is the old validation list),
  for a 4-fold cross-validated estimate over all 195 volumes;
- ``f0s1``, ``f0s2``: two more seeds with fold 0 held out, so that a 3-generator ensemble of this recipe can
  be compared, paired, with the shipped 3-generator ensemble on the same 49 volumes;
- ``all0``..``all3``: all 195 volumes, the members that ship;
- ``sag_cv0``, ``sag_all``, ``cor_cv0``, ``cor_all``: members slicing sagittally / coronally (session 12 / 15), to
  join the axial ensemble with their own axis;
- ``cxr``, ``monuseg``: the 2D models, their validation lists held out;
- ``FINETUNE_RUNS``: warm restarts of shipped (or earlier restarted) models. Their starting points travel as fp16
  copies made by ``pack-init NAME=MODEL_FOLDER ... --dest .gpu/sN/init`` and are passed as ``--init-root``.
  Session 10 ran ``--runs h1_cv0,h3_cv0,h1_all,monuseg_ft2,cxr128_ft2 --budget-s 540`` (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _without_simpleitk() -> None:
    """The GPU machine has no SimpleITK (its wheel alone is over the transfer cap). Training from bundles never
    calls it, but cdal_core imports it at module level: give those imports an empty module that fails loudly
    if anything does call it. Used only by this device script, never by the package."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        stub = types.ModuleType("SimpleITK")

        def missing(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(f"SimpleITK_{name}_unavailable", (), {})
        stub.__getattr__ = missing
        sys.modules["SimpleITK"] = stub


HIPPO_RUNS = {**{f"cv{k}": dict(seed=100 + k, exclude_fold=k) for k in range(4)},
              "f0s1": dict(seed=110, exclude_fold=0), "f0s2": dict(seed=111, exclude_fold=0),
              **{f"all{k}": dict(seed=200 + k, exclude_fold=None) for k in range(4)},
              # session 12: sagittal members (configs/hippocampus_sagittal_mirror_cv0.json's slicing), to join the axial
              # ensemble with their own axis (tools/add_member.py records it)
              "sag_cv0": dict(seed=120, exclude_fold=0, view="sagittal"),
              "sag_all": dict(seed=220, exclude_fold=None, view="sagittal"),
              # session 15: coronal members (configs/hippocampus_coronal_nodice_cv0.json's slicing and loss)
              "cor_cv0": dict(seed=130, exclude_fold=0, view="coronal"),
              "cor_all": dict(seed=230, exclude_fold=None, view="coronal")}
# What a member slicing another way changes in the axial recipe (its augmentation settings are merged in).
VIEWS = {
    # array axis 2: slices are (Z, Y); no in-plane flips, since each swaps anterior and posterior or up and down,
    # but the left-right mirror of the head, which reverses the context slices (session 13: without it the member
    # learnt one side only, see configs/hippocampus_sagittal_mirror_cv0.json)
    "sagittal": dict(slice_axis=2, train_size=[48, 56], augmentation=dict(flip_axis=None, flip_across_slices=True)),
    # array axis 1: slices are (Z, X), so in-plane flip_axis 1 is the left-right mirror; without the soft-Dice
    # term, with which every coronal run collapsed onto the background by step 800 (session 14)
    "coronal": dict(slice_axis=1, train_size=[48, 40], dice_weight=0.0,
                    augmentation=dict(flip_axis=1, flip_across_slices=False)),
}
TWO_D_RUNS = {"cxr": dict(seed=0, config="configs/cxr_gpu.json", val="configs/cxr_val.txt"),
              "cxr128": dict(seed=0, config="configs/cxr.json", val="configs/cxr_val.txt"),
              "monuseg": dict(seed=0, config="configs/monuseg_gpu.json", val="configs/monuseg_val.txt")}
# Warm restarts of shipped models (session 9): ``base`` names the run whose data, held-out cases and config they
# use; ``init`` the shipped model they start from (under ``--init-root``, Resources/Models by default; its network
# and normalisation are kept, as `cdal finetune` does), ``member`` which of an ensemble's generators (0 = the primary, trained with the stored discriminator),
# ``lr_scale`` the peak learning rate against the config's, ``batch`` the batch size, ``all_data`` trains on the
# base's held-out cases too.
FINETUNE_RUNS_PAIRS = {
    # session 25: the CXR augmentation lead (+0.13 ± 0.13 from two 1,500-step CPU pairs) at GPU length: each shipped
    # generator restarted twice, the two identical but for the augmentation (``augmentation``: a config whose
    # augmentation replaces the base's)
    # (from ``cxr_s26``, the model shipped until session 26, trained without the validation images: session 27's
    # refit has seen them; pack it with ``pack-init cxr_s26=f7b0f38:Resources/Models/cxr`` and pass ``--init-root``)
    **{f"cxr_g{m + 1}_{arm}": dict(base="cxr128", init="cxr_s26", member=m, seed=25, batch=32,
                                   source="Resources/Models/cxr at git f7b0f38 (shipped in sessions 12-26)",
                                   **({"augmentation": "configs/cxr_ft_strongaug.json"} if arm == "strongaug" else {}))
       for m in range(2) for arm in ("control", "strongaug")},
    # session 26: histology augmentation for MoNuSeg (the 8 flips and quarter turns, an H&E stain jitter), the
    # shipped generator restarted twice, identical but for the augmentation
    # (from ``monuseg_s27``, the model shipped until session 27, trained without the validation tiles: session 28's
    # refit has seen them; pack it with ``pack-init monuseg_s27=f325ee2:Resources/Models/monuseg``)
    **{f"monuseg_{arm}": dict(base="monuseg", init="monuseg_s27", seed=26,
                              source="Resources/Models/monuseg at git f325ee2 (shipped in sessions 10-27)",
                              **({"augmentation": "configs/monuseg_ft_histaug.json"} if arm == "histaug" else {}))
       for arm in ("control", "histaug")},
}
FINETUNE_RUNS = {
    "monuseg_ft": dict(base="monuseg", init="monuseg", seed=1),
    "cxr128_ft": dict(base="cxr128", init="cxr", seed=1, batch=32),
    **{f"h{m + 1}_{split}": dict(base="cv0" if split == "cv0" else "all0", init="hippocampus",
                                 member=m, seed=300 + m, lr_scale=0.625)
       for m in range(3) for split in ("cv0", "all")},
    # session 10: second restarts from session 9's (``source`` says where the init model came from)
    "monuseg_ft2": dict(base="monuseg", init="monuseg_ft", seed=2, source="runs/gpu9/monuseg_ft (session 9)"),
    "cxr128_ft2": dict(base="cxr128", init="cxr128_ft", seed=2, batch=32, source="runs/gpu9/cxr128_ft (session 9)"),
    # session 17: longer training, checked by 4-fold cross-validation: each fold model trained from scratch (cv0..cv3)
    # goes on with its own fold held out and half the peak learning rate (with a new discriminator: session 17's
    # fold models were packed without theirs)
    **{f"cv{k}_ft": dict(base=f"cv{k}", init=f"cv{k}", seed=400 + k, lr_scale=0.5,
                         source=f"runs/gpu17/cv{k} (session 17, from scratch)") for k in range(4)},
    # session 19: the fold-0 replicas of the shipped restarts, re-made (sessions 9-10's h1_cv0..h3_cv0 were lost),
    # started from the session-7 ensemble packed as ``s7`` (its generators trained with fold 0 held out)
    **{f"r{m + 1}_cv0": dict(base="cv0", init="s7", member=m, seed=300 + m, lr_scale=0.625,
                             source="runs/s7 (the session-7 ensemble, fold 0 held out)") for m in range(3)},
    # session 19: an all-data fifth start for the fourth member's place: session 18's CPU member (seed 4, 3,600
    # steps x 32, no selection) restarted like the others, with its fold-0 twin to decide it
    "h5_cv0": dict(base="cv0", init="member5_cv0", seed=304, lr_scale=0.625,
                   source="runs/member5_cv0/model (session 18, CPU, 3,600 steps x 32, fold 0 held out)"),
    "h5_all": dict(base="all0", init="member5_all", seed=304, lr_scale=0.625,
                   source="runs/member5_all/model (session 18, CPU, 3,600 steps x 32, all 195 volumes)"),
    # session 19, second call: do more steps help the restarted members? The fold-0 replicas go on at half their
    # learning rate (as session 17's cvk_ft did), and so do the shipped restarts (all data), to ship if fold 0 says so
    **{f"r{m + 1}_cv0_ft": dict(base="cv0", init=f"r{m + 1}_cv0", seed=310 + m, lr_scale=0.3125,
                                source=f"runs/gpu19/r{m + 1}_cv0 (session 19)") for m in range(3)},
    **{f"h{m + 1}_all_ft": dict(base="all0", init="hippocampus", member=m, seed=310 + m, lr_scale=0.3125,
                                source="Resources/Models/hippocampus (session 18's shipped ensemble)") for m in range(3)},
    **FINETUNE_RUNS_PAIRS,
    # session 27: the shipped 2D models trained on the validation images too (``all_data``: nothing held out), each
    # arm of the pairs above once its pair has decided; CXR's strong arm is the recipe session 27 refit on the CPU
    **{f"cxr_g{m + 1}_{arm}_all": dict(FINETUNE_RUNS_PAIRS[f"cxr_g{m + 1}_{arm}"], seed=27, all_data=True)
       for m in range(2) for arm in ("control", "strongaug")},
    **{f"monuseg_{arm}_all": dict(FINETUNE_RUNS_PAIRS[f"monuseg_{arm}"], seed=27, all_data=True)
       for arm in ("control", "histaug")},
}
# a shipped model's primary keeps D for its attention maps; each run is packed in its own tar (< 16 MiB cap)
# (session 17: the fold models keep theirs too, so a later restart goes on with the discriminator it trained with)
WITH_DISCRIMINATOR = {"all0", "cxr", "cxr128", "monuseg", "monuseg_ft", "cxr128_ft", "monuseg_ft2", "cxr128_ft2",
                      "cxr_g1_control", "cxr_g1_strongaug", "monuseg_control", "monuseg_histaug",
                      "cxr_g1_control_all", "cxr_g1_strongaug_all", "monuseg_control_all", "monuseg_histaug_all",
                      "h1_all", "h1_cv0", "r1_cv0", "r1_cv0_ft", "h1_all_ft", *(f"cv{k}" for k in range(4)), *(f"cv{k}_ft" for k in range(4))}


# the folder under ../shared/data each bundle is made from (prepare reads it there; cards record it, so that
# `cdal evaluate` can tell which cases of that folder a model trained on)
BUNDLE_SOURCES = {"hippocampus.npz": "Task04_Hippocampus", "cxr.npz": "CXR", "cxr128.npz": "CXR",
                  "monuseg.npz": "MoNuSeg/train"}


# --- prepare (here) -------------------------------------------------------------------------------------------

def make_folds(names: List[str], val_names: List[str], seed: int = 0) -> List[List[str]]:
    """Fold 0 is the old validation list; the rest is split into three by a seeded permutation."""
    rest = [n for n in names if n not in set(val_names)]
    order = np.random.default_rng(seed).permutation(len(rest))
    return [sorted(val_names)] + [sorted(rest[i] for i in order[k::3]) for k in range(3)]


def bundle_msd(data_dir: Path, cfg, out_file: Path) -> List[str]:
    """An MSD folder as ``load_volume`` reads it for ``cfg``'s grid, scaled to [0, 1] without landmarks (uint16),
    with each scan's landmark percentiles, so that any split can re-derive its standardisation. Returns the names."""
    import SimpleITK as sitk
    from cdal_core.data import LANDMARK_PERCENTILES, Normalisation, load_volume, read_image, read_msd_cases
    from cdal_core.geometry import ModelGrid
    cases, labels = read_msd_cases(data_dir)
    base = Normalisation(cfg.normalisation["lower"], cfg.normalisation["upper"])  # no landmarks: scale only
    grid = ModelGrid(cfg.orientation, cfg.spacing)
    num_classes = max(len(labels), 2)
    arrays, pcts, spacings = {}, [], []
    for i, case in enumerate(cases):
        vol = load_volume(case, grid, base, num_classes, 1)
        raw = sitk.GetArrayFromImage(read_image(case.image))
        pcts.append(np.percentile(base.scale(raw, base.fit(raw)), LANDMARK_PERCENTILES))
        arrays[f"image{i}"] = np.round(vol.image * 65535).astype(np.uint16)
        arrays[f"label{i}"] = vol.label.astype(np.uint8)
        spacings.append(vol.spacing)
    names = [c.name for c in cases]
    np.savez_compressed(out_file, names=np.array(names), landmark_pcts=np.array(pcts),
                        spacings=np.array(spacings), class_names=np.array([labels[k] for k in sorted(labels)]),
                        **arrays)
    return names


def bundle_2d(run: str, data: Path, out: Path) -> None:
    """A 2D data set resized to the run's config, as ``load_png_case`` reads it (uint8 images and masks)."""
    from cdal_core.config import TrainConfig
    from cdal_core.data import load_png_case, read_png_pairs
    c2 = TrainConfig.load(str(ROOT / TWO_D_RUNS[run]["config"]))
    size = c2.image_size or c2.train_size
    pairs = read_png_pairs(data / BUNDLE_SOURCES[f"{run}.npz"])
    vols = [load_png_case(p, size, c2.network["image_channels"]) for p in pairs]
    np.savez_compressed(out / f"{run}.npz", names=np.array([p.name for p in pairs]),
                        images=np.stack([np.round(v.image * 255).astype(np.uint8) for v in vols]),
                        labels=np.stack([v.label.astype(np.uint8) for v in vols]))


def prepare(data: Path, out: Path, only: Optional[List[str]] = None) -> None:
    from cdal_core.config import TrainConfig
    from cdal_core.data import read_case_list
    out.mkdir(parents=True, exist_ok=True)
    if only:
        for run in only:
            bundle_2d(run, data, out)
        return
    cfg = TrainConfig.load(str(ROOT / "configs/hippocampus_gpu.json"))
    names = bundle_msd(data / BUNDLE_SOURCES["hippocampus.npz"], cfg, out / "hippocampus.npz")
    folds = make_folds(names, read_case_list(ROOT / "configs/hippocampus_val.txt"))
    (ROOT / "configs/hippocampus_folds.json").write_text(json.dumps(
        {"comment": "4 folds over the 195 shared volumes: fold 0 is configs/hippocampus_val.txt, the other 146 "
                    "split in three by numpy.random.default_rng(0).permutation (tools/gpu_session.py make_folds)",
         "folds": folds}, indent=1) + "\n")
    for run in TWO_D_RUNS:
        bundle_2d(run, data, out)
    for f in sorted(out.glob("*.npz")):
        print(f"{f.name}: {f.stat().st_size / 2**20:.1f} MiB")


def model_from_git(commit: str, folder: str, out: Path) -> Path:
    """The model folder ``folder`` (e.g. Resources/Models/cxr) as git holds it at ``commit``, written to ``out``:
    a shipped model that has since been replaced."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(ROOT), *args], check=True, stdout=subprocess.PIPE).stdout
    names = git("ls-tree", "--name-only", f"{commit}:{folder}").decode().split()
    if "model.json" not in names:
        raise SystemExit(f"{folder} at {commit} holds no model card (model.json)")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "model.json" or name.endswith(".safetensors"):
            (out / name).write_bytes(git("show", f"{commit}:{folder}/{name}"))
    return out


def pack_init(models: List[str], dest: Path) -> None:
    """fp16 copies of model folders (``name=path``, ``name=COMMIT:FOLDER`` for a model as git held it, or a
    shipped name) under ``dest/<name>``: the warm restarts' starting points, at half the bytes of the 64 MiB that
    may travel to the GPU machine."""
    import tempfile
    from cdal_core.model_io import resolve_model
    for spec in models:
        name, _, path = spec.partition("=")
        commit, from_git, folder = path.partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            as_git = from_git and not Path(path).exists()  # not a folder whose path has a colon (C:\\...)
            src = model_from_git(commit, folder, Path(tmp) / name) if as_git else resolve_model(path or name)
            pack_half(src, dest / name)
            print(f"{name}: {sum(f.stat().st_size for f in (dest / name).iterdir()) / 2**20:.1f} MiB from {spec}")


def pack_half(src: Path, out: Path) -> None:
    """The model folder ``src`` copied to ``out`` with its weights in fp16."""
    from safetensors.torch import load_file, save_file
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_bytes((src / "model.json").read_bytes())
    for weights in sorted(src.glob("*.safetensors")):
        save_file({k: v.half().contiguous() for k, v in load_file(str(weights)).items()}, str(out / weights.name))


# --- training from a bundle (there) ---------------------------------------------------------------------------

def bundle_trainer_class():
    from cdal_core.data import Normalisation, SliceBank, Volume
    from cdal_core.trainer import Trainer

    class BundleTrainer(Trainer):
        """Trainer whose data come from a bundle made by ``prepare``; ``exclude`` names the held-out cases.
        The learning rate follows a cosine over a wall-clock budget (set by ``start_clock``)."""

        def __init__(self, bundle: Path, out: Path, cfg, exclude: List[str], member: int = 0, **kw):
            self.bundle, self.exclude, self.t_start, self.budget = Path(bundle), set(exclude), None, None
            # ``member``: which generator of an init ensemble to start from (the discriminator is the primary's)
            super().__init__(str(bundle), str(out), cfg, init_generator=member, **kw)

        def _load_data(self, data_dir: str) -> None:
            cfg, net = self.cfg, self.net_cfg
            b = np.load(self.bundle)
            names = [str(n) for n in b["names"]]
            keep = [i for i, n in enumerate(names) if n not in self.exclude]
            self.is_2d = "images" in b.files
            if self.is_2d:
                if self.init is None:  # a warm start keeps its model's class names (e.g. Lungs, Nuclei)
                    self.class_names = ["Background", "Foreground"]
                size = cfg.image_size or cfg.train_size
                volumes = [Volume(names[i], b["images"][i].astype(np.float32) / 255, b["labels"][i].astype(np.int64),
                                  (1.0, 1.0, 1.0)) for i in keep]
                self.views = [(0, size)]
            else:
                if self.init is None:
                    self.class_names = [str(c).capitalize() if str(c).islower() else str(c) for c in b["class_names"]]
                pcts = b["landmark_pcts"]
                if self.init is None:  # a warm start keeps its model's standardisation, as `cdal finetune` does
                    landmarks = [round(float(v), 5) for v in np.mean(pcts[keep], 0)]
                    self.norm = Normalisation(self.norm.lower, self.norm.upper, landmarks)
                volumes = [Volume(names[i], self.norm.standardise(b[f"image{i}"].astype(np.float32) / 65535, pcts[i]),
                                  b[f"label{i}"].astype(np.int64), tuple(b["spacings"][i])) for i in keep]
                self.views = cfg.views
            self.banks = [SliceBank(volumes, axis, net.context_slices, size) for axis, size in self.views]
            self.val_cases, self.val_volumes = [], None
            self.data_summary = {"folder": self.bundle.name, "source_folder": BUNDLE_SOURCES.get(self.bundle.name),
                                 "train_cases": len(keep),
                                 "held_out_cases": sorted(self.exclude),
                                 "train_slices": sum(len(bk) for bk in self.banks),
                                 "slices_with_foreground": round(self.banks[0].foreground_fraction(), 3)}

        def start_clock(self, budget_s: float) -> None:
            self.t_start, self.budget = time.time(), budget_s

        def learning_rate_factor(self, step: int) -> float:
            if self.t_start is None:
                return 1.0
            progress = min((time.time() - self.t_start) / self.budget, 1.0)
            floor = self.cfg.lr_min_fraction
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return BundleTrainer


def run_config(run: str):
    """(config, held-out case names) of a run; warm restarts scale the learning rates and batch as specified."""
    if run in FINETUNE_RUNS:
        spec = FINETUNE_RUNS[run]
        cfg, exclude = run_config(spec["base"])
        cfg.seed = spec["seed"]
        cfg.lr_g, cfg.lr_d = cfg.lr_g * spec.get("lr_scale", 1.0), cfg.lr_d * spec.get("lr_scale", 1.0)
        cfg.batch_size = spec.get("batch", cfg.batch_size)
        if "augmentation" in spec:
            from cdal_core.config import TrainConfig
            cfg.augmentation = TrainConfig.load(str(ROOT / spec["augmentation"])).augmentation
        if cfg.augmentation is not None:  # on the GPU; the per-slice MONAI loop would feed it too slowly
            cfg.augmentation = dict(cfg.augmentation, backend="batched")
        return cfg, ([] if spec.get("all_data") else exclude)
    from cdal_core.config import TrainConfig
    if run in TWO_D_RUNS:
        cfg = TrainConfig.load(str(ROOT / TWO_D_RUNS[run]["config"]))
        cfg.seed = TWO_D_RUNS[run]["seed"]
        exclude = [ln.strip() for ln in (ROOT / TWO_D_RUNS[run]["val"]).read_text().splitlines()
                   if ln.strip() and not ln.startswith("#")]
    else:
        cfg = TrainConfig.load(str(ROOT / "configs/hippocampus_gpu.json"))
        spec = HIPPO_RUNS[run]
        cfg.seed = spec["seed"]
        folds = json.loads((ROOT / "configs/hippocampus_folds.json").read_text())["folds"]
        exclude = folds[spec["exclude_fold"]] if spec["exclude_fold"] is not None else []
        for key, value in VIEWS.get(spec.get("view"), {}).items():
            setattr(cfg, key, dict(cfg.augmentation or {}, **value) if key == "augmentation" else copy.deepcopy(value))
    cfg.lr_schedule, cfg.val_cases, cfg.val_fraction = "cosine", None, 0.0
    cfg.val_every = cfg.checkpoint_every = 10**9
    return cfg, exclude


def bundle_of(run: str, bundles: Path) -> Path:
    if run in FINETUNE_RUNS:
        return bundle_of(FINETUNE_RUNS[run]["base"], bundles)
    return bundles / (f"{run}.npz" if run in TWO_D_RUNS else "hippocampus.npz")


def init_folder(run: str, init_root: Optional[Path] = None) -> Path:
    """The model a warm restart starts from: its ``init`` under ``init_root`` (Resources/Models by default)."""
    return (init_root or ROOT / "Resources/Models") / FINETUNE_RUNS[run]["init"]


def make_trainer(run: str, bundles: Path, out: Path, device: str, batch: Optional[int] = None,
                 init_root: Optional[Path] = None):
    cfg, exclude = run_config(run)
    if batch:
        cfg.batch_size = batch
    spec = FINETUNE_RUNS.get(run, {})
    init = str(init_folder(run, init_root)) if "init" in spec else None
    return bundle_trainer_class()(bundle_of(run, bundles), out / run, cfg, exclude, member=spec.get("member", 0),
                                  device=device, json_progress=True, init_model=init)


def train_one(run: str, bundles: Path, out: Path, until: float, device: str, batch: Optional[int] = None,
              init_root: Optional[Path] = None) -> None:
    import torch
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    trainer = make_trainer(run, bundles, out, device, batch, init_root)
    cfg = trainer.cfg
    budget = until - time.time()
    trainer.start_clock(budget)
    trainer.G.train(), trainer.D.train()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # the session's last call: save what there is
    t0 = time.time()
    while time.time() < until and not stop:
        stats = trainer.train_step()
        if trainer.step % 100 == 0:
            rate = trainer.step / (time.time() - t0)
            trainer._log({"event": "progress", "step": trainer.step, "steps_per_second": round(rate, 2),
                          "lr_factor": round(trainer.learning_rate_factor(trainer.step), 4),
                          **{k: round(v, 5) for k, v in stats.items()}})
            trainer._watch_for_collapse(stats["fg_found"])  # a note in its log; the run goes on
    trainer.seconds = time.time() - t0
    card = trainer.card({"note": "trained from a bundle for a fixed wall-clock budget; see training"})
    card["training"]["schedule"] = f"cosine learning rate over {budget:.0f} s of wall clock (tools/gpu_session.py)"
    card["training"]["batch_size"] = cfg.batch_size
    if run in FINETUNE_RUNS:
        spec = FINETUNE_RUNS[run]
        card["training"]["warm_start"] = {"model": spec.get("source", f"Resources/Models/{spec['init']}"),
                                          "generator": spec.get("member", 0) + 1,
                                          "lr_g": cfg.lr_g, "lr_d": cfg.lr_d}
    half = {f"generator.{k}": v.detach().half().cpu().contiguous() for k, v in trainer.G_ema.state_dict().items()}
    if run in WITH_DISCRIMINATOR:
        half.update({f"discriminator.{k}": v.detach().half().cpu().contiguous()
                     for k, v in trainer.D.state_dict().items()})
    save_file(half, str(out / run / "weights16.safetensors"))
    (out / run / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({"run": run, "steps": trainer.step, "seconds": round(trainer.seconds, 1)}), flush=True)


# --- benchmark (there, alone on the GPU) ----------------------------------------------------------------------

BENCH_PRECISIONS = {"bf16", "fp32", "bf16+compile", "fp32+compile"}

def benchmark(bundles: Path, device: str, steps: int = 30, batch: Optional[int] = None,
              precisions: str = "bf16,fp32") -> Dict:
    import torch
    cfg, _ = run_config("all0")
    cfg.batch_size = batch or cfg.batch_size
    out: Dict = {"torch": torch.__version__}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    import tempfile
    tokens = [t.strip() for t in precisions.split(",") if t.strip()]
    unknown = sorted(set(tokens) - BENCH_PRECISIONS)
    if unknown:
        raise SystemExit(f"unknown benchmark precision {unknown}: use {sorted(BENCH_PRECISIONS)}")
    for token in tokens:  # "+compile": the generator under torch.compile
        amp, cfg.compile_generator = token.startswith("bf16"), token.endswith("+compile")
        cfg.amp = amp
        warm_up = 5 if not cfg.compile_generator else 10  # compiling happens in the first steps, not timed
        with tempfile.TemporaryDirectory() as tmp:
            tr = bundle_trainer_class()(bundle_of("all0", bundles), Path(tmp) / "b", cfg, [], device=device,
                                        json_progress=True)
            t0 = time.perf_counter()
            for _ in range(warm_up):
                tr.train_step()
            _sync(device)
            warm_sec = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.train_step()
            _sync(device)
            sec = (time.perf_counter() - t0) / steps
            t0 = time.perf_counter()
            for s in range(steps):
                tr._batch(s)
            _sync(device)
            data_sec = (time.perf_counter() - t0) / steps
            key = token.replace("+", "_")
            out[f"train_{key}"] = {"batch": cfg.batch_size, "seconds_per_step": round(sec, 4),
                                   "slices_per_s": round(cfg.batch_size / sec, 1),
                                   "data_pipeline_slices_per_s": round(cfg.batch_size / data_sec, 1),
                                   "warm_up_seconds": round(warm_sec, 1)}
            if not cfg.compile_generator:
                out[f"sample_{key}"] = _sampling_rate(tr, device, amp)
    return out


def step_study(bundles: Path, device: str, batches: List[int], steps: int = 20) -> Dict:
    """Where a training step's time goes on this device: slices/s with the diffusion noise drawn on the CPU
    (as before) or on the device, at several batch sizes, plus the torch profiler's top operators."""
    import tempfile
    import torch
    cfg, _ = run_config("all0")
    out: Dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    for batch in batches:
        cfg.batch_size = batch
        with tempfile.TemporaryDirectory() as tmp:
            tr = bundle_trainer_class()(bundle_of("all0", bundles), Path(tmp) / "b", cfg, [], device=device,
                                        json_progress=True)
            for device_noise in (False, True):
                tr.device_noise = device_noise and device == "cuda"
                for _ in range(3):
                    tr.train_step()
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    tr.train_step()
                _sync(device)
                sec = (time.perf_counter() - t0) / steps
                out[f"batch{batch}_{'device' if device_noise else 'cpu'}_noise"] = {
                    "seconds_per_step": round(sec, 4), "slices_per_s": round(batch / sec, 1)}
            if batch == batches[0]:
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(5):
                        tr.train_step()
                    _sync(device)
                av = prof.key_averages()
                out["profile_by_cpu"] = av.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
                if device == "cuda":
                    out["profile_by_cuda"] = av.table(sort_by="self_cuda_time_total", row_limit=12,
                                                      max_name_column_width=40)
                out["kernel_launches_per_step"] = sum(e.count for e in av if e.key.startswith("cudaLaunchKernel")) / 5
    return out


def precision_ab(bundles: Path, device: str, steps: int, out_path: Path) -> Dict:
    """bf16 against fp32 training, same seed and data (fold 0 held out), ``steps`` steps each; then a cheap proxy
    of accuracy on fold 0: per-class voxel Dice of one T = 2 sample per slice of the EMA generator."""
    import tempfile
    import torch
    from cdal_core.data import slice_stack
    from cdal_core.sampler import sample
    from cdal_core.schedule import DiffusionSchedule
    out: Dict = {}
    b = np.load(bundle_of("cv0", bundles))
    folds = json.loads((ROOT / "configs/hippocampus_folds.json").read_text())["folds"]
    names = [str(n) for n in b["names"]]
    held = [names.index(n) for n in folds[0]]
    for amp in (True, False):
        cfg, exclude = run_config("cv0")
        cfg.amp = amp
        with tempfile.TemporaryDirectory() as tmp:
            tr = bundle_trainer_class()(bundle_of("cv0", bundles), Path(tmp) / "b", cfg, exclude, device=device,
                                        json_progress=True)
            t0 = time.time()
            while tr.step < steps:
                stats = tr.train_step()
            _sync(device)
            G = tr.G_ema.eval()
            inter, total = np.zeros(3), np.zeros(3)
            for i in held:
                vol = tr.norm.standardise(b[f"image{i}"].astype(np.float32) / 65535, b["landmark_pcts"][i])
                lab = torch.from_numpy(b[f"label{i}"].astype(np.int64))
                stack = torch.from_numpy(np.ascontiguousarray(slice_stack(vol, 0, 1))).to(device) * 2 - 1
                h, w = stack.shape[-2:]
                ph, pw = (-h) % 8, (-w) % 8
                stack = torch.nn.functional.pad(stack, (0, pw, 0, ph), value=-1.0)
                with torch.no_grad():
                    res = sample(G, stack, DiffusionSchedule(cfg.num_steps), num_samples=1,
                                 rng=torch.Generator().manual_seed(0))
                pred = res.labels[..., :h, :w].cpu()
                for c in (1, 2):
                    inter[c] += float(((pred == c) & (lab == c)).sum())
                    total[c] += float((pred == c).sum() + (lab == c).sum())
            key = "bf16" if amp else "fp32"
            out[key] = {"steps": tr.step, "seconds": round(time.time() - t0, 1), "last_mse": round(stats["mse"], 4),
                        "proxy_dice_anterior": round(200 * inter[1] / max(total[1], 1), 2),
                        "proxy_dice_posterior": round(200 * inter[2] / max(total[2], 1), 2)}
            out_path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _sampling_rate(tr, device: str, amp: bool) -> Dict:
    """Volumes/s of the network part of inference (cdal_core.sampler.sample): a 36-slice hippocampus stack,
    T = 2 x 5 samples in one batch, one generator."""
    import torch
    from contextlib import nullcontext
    from cdal_core.sampler import sample
    from cdal_core.schedule import DiffusionSchedule
    G = tr.G_ema.eval()
    sched = DiffusionSchedule(2)
    images = torch.rand(36, 2 * tr.net_cfg.context_slices + 1, *tr.cfg.train_size, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device == "cuda") else nullcontext()

    def one_volume():
        with torch.no_grad(), ctx:
            return sample(G, images, sched, num_samples=5, rng=torch.Generator().manual_seed(0))
    one_volume()
    _sync(device)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        one_volume()
    _sync(device)
    sec = (time.perf_counter() - t0) / reps
    return {"volumes_per_s": round(1 / sec, 1), "seconds_per_volume": round(sec, 5), "slices": 36, "samples": 5}


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


# --- the session (there) ----------------------------------------------------------------------------------------

def check_inits(runs: List[str], init_root: Optional[Path] = None) -> None:
    """Refuse, before any device time is spent, runs whose starting model is not under the init root."""
    missing = sorted({FINETUNE_RUNS[r]["init"] for r in runs
                      if r in FINETUNE_RUNS and not (init_folder(r, init_root) / "model.json").is_file()})
    if missing:
        raise SystemExit(f"{init_root or ROOT / 'Resources/Models'} holds no {', '.join(missing)}: pack them there first (pack-init NAME=... "
                         "--dest DIR, then --init-root DIR; every run of a session reads the same root)")


def session(bundles: Path, out: Path, budget_s: float, device: str, runs: List[str], bench_steps: int,
            batch: Optional[int] = None, bench_batch: Optional[int] = None, bench_precisions: str = "bf16,fp32",
            init_root: Optional[Path] = None) -> None:
    check_inits(runs, init_root)
    start = time.time()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"cdal_gpu_runs_{int(start)}"  # never resume a stale run
    work.mkdir(parents=True, exist_ok=True)
    log = open(out / "session.log", "a")

    def say(msg):
        line = f"[{time.time() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()
    say(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                       capture_output=True, text=True).stdout.strip() if device == "cuda" else "cpu")
    if bench_steps:
        try:
            bench = subprocess.run([sys.executable, __file__, "bench", "--bundles", str(bundles), "--device", device,
                                    "--steps", str(bench_steps), "--precisions", bench_precisions]
                                   + (["--batch", str(bench_batch)] if bench_batch else []),
                                   capture_output=True, text=True,
                                   timeout=max(60.0, 0.2 * budget_s))
            (out / "bench.json").write_text(bench.stdout[-4000:] or "{}")
            say(f"bench rc={bench.returncode}: {bench.stdout.strip()[-600:]} {bench.stderr.strip()[-800:]}")
        except subprocess.TimeoutExpired:
            say("bench timed out")
    until = start + budget_s - 40  # leave time to pack
    procs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for run in runs:
        procs[run] = subprocess.Popen([sys.executable, __file__, "train", run, "--bundles", str(bundles),
                                       "--work", str(work), "--until", str(until), "--device", device]
                                      + (["--batch", str(batch)] if batch else [])
                                      + (["--init-root", str(init_root)] if init_root else []),
                                      stdout=open(work / f"{run}.out", "w"), stderr=subprocess.STDOUT, env=env)
    say(f"started {len(procs)} trainings until +{until - start:.0f}s")
    for run, p in procs.items():
        try:
            p.wait(timeout=max(1.0, until + 25 - time.time()))
        except subprocess.TimeoutExpired:
            p.terminate()  # train_one saves on SIGTERM after its current step
            try:
                p.wait(timeout=12)
            except subprocess.TimeoutExpired:
                p.kill()
        say(f"{run}: rc={p.returncode} {(work / f'{run}.out').read_text()[-300:].strip()}")
    for run in runs:
        with tarfile.open(out / f"{run}.tar", "w") as tar:
            for name in ("weights16.safetensors", "card.json", "log.jsonl"):
                if (work / run / name).exists():
                    tar.add(work / run / name, arcname=f"{run}/{name}")
            if (work / f"{run}.out").exists():
                tar.add(work / f"{run}.out", arcname=f"{run}/stdout.txt")
    say("packed: " + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(out.glob("*.tar"))))


# --- unpack (here) ------------------------------------------------------------------------------------------------

def unpack(tars: List[Path], dest: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from cdal_core.model_io import save_model
    from cdal_core.networks import Discriminator, Generator, NetworkConfig
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest)
    for card_path in sorted(dest.glob("*/card.json")):
        run_dir = card_path.parent
        card = json.loads(card_path.read_text())
        cfg = NetworkConfig.from_dict(card["network"])
        weights = load_file(str(run_dir / "weights16.safetensors"))
        g = Generator(cfg)
        g.load_state_dict({k[len("generator."):]: v.float() for k, v in weights.items() if k.startswith("generator.")})
        d = None
        if any(k.startswith("discriminator.") for k in weights):
            d = Discriminator(cfg)
            d.load_state_dict({k[len("discriminator."):]: v.float() for k, v in weights.items()
                               if k.startswith("discriminator.")})
        card["training"]["weights_transport"] = "fp16 (transfer cap), stored back as fp32"
        save_model(run_dir / "model", card, g, d)
        print(f"{run_dir.name}: steps {card['training']['steps']}, {card['training']['wall_seconds']} s")
    del torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--only", help="comma-separated 2D runs: remake only their bundles")
    p = sub.add_parser("pack-init")
    p.add_argument("models", nargs="+",
                   help="NAME=MODEL_FOLDER, NAME=COMMIT:MODEL_FOLDER (as git held it), or a shipped model's name")
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("train")
    p.add_argument("run")
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--until", type=float, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int)
    p.add_argument("--init-root", type=Path, help="where the warm restarts' models are (default Resources/Models)")
    p = sub.add_parser("bench")
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int)
    p.add_argument("--precisions", default="bf16,fp32",
                   help="comma-separated: bf16, fp32, bf16+compile (the generator under torch.compile)")
    p = sub.add_parser("study")
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="128,512")
    p.add_argument("--ab-steps", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("session")
    p.add_argument("--bundles", type=Path, default=ROOT / ".gpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", default=",".join(list(HIPPO_RUNS) + list(TWO_D_RUNS)))
    p.add_argument("--bench-steps", type=int, default=30)
    p.add_argument("--batch", type=int, help="batch size of every run (default: each config's)")
    p.add_argument("--bench-batch", type=int, help="batch size of the benchmark (default: the GPU recipe's)")
    p.add_argument("--bench-precisions", default="bf16,fp32",
                   help="comma-separated: bf16, fp32, bf16+compile (the generator under torch.compile)")
    p.add_argument("--init-root", type=Path, help="where the warm restarts' models are (default Resources/Models)")
    p = sub.add_parser("unpack")
    p.add_argument("tars", type=Path, nargs="+")
    p.add_argument("--dest", type=Path, default=ROOT / "runs/gpu")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.data, a.out, a.only.split(",") if a.only else None)
        return
    if a.cmd == "pack-init":
        pack_init(a.models, a.dest)
        return
    if a.cmd == "unpack":
        unpack(a.tars, a.dest)
        return
    _without_simpleitk()
    if a.cmd == "train":
        train_one(a.run, a.bundles, a.work, a.until, a.device, a.batch, a.init_root)
    elif a.cmd == "study":
        if a.ab_steps:
            print(json.dumps(precision_ab(a.bundles, a.device, a.ab_steps, a.out.with_name("precision_ab.json"))),
                  flush=True)
        result = step_study(a.bundles, a.device, [int(b) for b in a.batches.split(",")])
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        for key in ("profile_by_cpu", "profile_by_cuda"):
            print(result.pop(key, ""))
        print(json.dumps(result, indent=1))
    elif a.cmd == "bench":
        print(json.dumps(benchmark(a.bundles, a.device, a.steps, a.batch, a.precisions)), flush=True)
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        session(a.bundles, a.out, a.budget_s, a.device, [r for r in a.runs.split(",") if r], a.bench_steps, a.batch,
                a.bench_batch, a.bench_precisions, a.init_root)


if __name__ == "__main__":
    main()
