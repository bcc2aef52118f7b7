"""Algorithm 1: adversarial training of the time-step discriminator and attention-guided generator training.

Every step draws its batch, augmentation and noise from RNGs seeded by (seed, step), and a checkpoint holds the
networks, optimisers, EMA and step: re-running the same command after a stop continues the very same run.
Runs on CPU (bf16 autocast where the CPU computes bf16 natively), one CUDA GPU (bf16 autocast) or several GPUs
under ``torchrun`` (data parallel, gradients all-reduced).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
from .augment import BatchAugmentation, augment_batch, build_augmentation
from .config import TrainConfig, trained_image_size
from .data import (Normalisation, SliceBank, load_png_case, load_volume, read_msd_cases, read_png_pairs,
                   round_up, split_cases)
from .errors import CDALError
from .evaluation import evaluate_cases, mean_foreground_dice
from .geometry import ModelGrid, in_plane_axes, mirrored_volume_axes
from .inference import resolve_device
from .model_io import LoadedModel, atomic_write_bytes, learns_left_right_mirror, load_model, make_card, save_model
from .networks import Discriminator, Generator, NetworkConfig, attention_map, normalise_attention
from .schedule import DiffusionSchedule

CHECKPOINT = "checkpoint.pt"
# the share of the labelled voxels the centre crop to train_size must keep (below: refused), should keep
# (below: a note); MSD Task04's crops keep 100 % along all three axes
MIN_LABELS_KEPT, MIN_LABELS_KEPT_NOTE = 0.5, 0.95
PLAIN_PROGRESS_LINES = 50  # lines a run prints when its progress goes to a log file rather than a terminal
# what data.load_png_case and predict2d.prepare_image do to a 2D image (the percentile settings do not apply)
NORMALISATION_2D = {"method": "min-max", "lower": 0.0, "upper": 100.0,
                    "note": "2D: min-max over the whole image after resizing to input.image_size"}


class Trainer:
    def __init__(self, data_dir: str, out_dir: str, config: TrainConfig, device: str = "auto",
                 init_model: Optional[str] = None, json_progress: bool = False, init_generator: int = 0):
        """``init_model`` starts the run from an existing model (fine-tuning); ``init_generator`` picks which of
        an ensemble's generators (0 = the primary, the one trained with the stored discriminator)."""
        self.out = Path(out_dir)
        self.cfg = config
        self.json_progress = json_progress
        self.rank, self.world = _init_distributed()
        self.device = resolve_device(device) if self.world == 1 else torch.device(f"cuda:{self.rank}")
        self.init_model = init_model
        self.init_generator = init_generator
        self.data_dir = data_dir
        self.data_notes: List[str] = []  # what the data check wants the user to know
        self.device_noise = self.device.type == "cuda"
        self.bf16 = training_in_bf16(config.amp, self.device)
        self.net_cfg, self.class_names, self.grid, self.norm = self._model_settings(data_dir)
        config.check_augmentation(self.net_cfg)  # again, on the network it trains: a fine-tune keeps its model's
        self._check_run_dir()  # a folder holding another run is refused before the data loads
        self._load_data(data_dir)
        self._prepare_run_dir()  # after settings and data are known to fit: a refused run writes nothing
        for note in self.data_notes:  # logged once the run folder exists
            self._emit({"event": "note", "message": note})
        if self.init is not None and self.init.members:
            self._emit({"event": "note", "message": f"{self.init_model} is an ensemble of "
                        f"{len(self.init.generators)} generators: fine-tuning starts from generator "
                        f"{init_generator + 1}, and the result is a single-generator model"})
        torch.manual_seed(config.seed)
        self.G = Generator(self.net_cfg).to(self.device)
        self.D = Discriminator(self.net_cfg).to(self.device)
        if self.init:
            self.G.load_state_dict(self.init.generators[init_generator].state_dict())
            if self.init.discriminator is not None:
                self.D.load_state_dict(self.init.discriminator.state_dict())
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.G_step = torch.compile(self.G) if config.compile_generator else self.G  # same parameters
        betas = tuple(config.adam_betas)
        fused = self.device.type == "cuda"  # one kernel per step instead of several per parameter tensor
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=config.lr_g, betas=betas, fused=fused)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=config.lr_d, betas=betas, fused=fused)
        self.schedule = DiffusionSchedule(config.train_num_steps)
        self.augments = [build_augmentation(_view_augmentation(config.augmentation, self.views[0][0], axis))
                         if config.augmentation is not None else None for axis, _ in self.views]
        self.step, self.best, self.best_step, self.seconds = 0, -1.0, -1, 0.0
        self.history: List[Dict] = []
        self._fg_found: List[float] = []  # the last logged values (_watch_for_collapse)
        self._collapse_said = False
        self._pending_validation = False  # stopped while validating: the resumed run validates this step first
        self._resume()

    # -- setup ---------------------------------------------------------------------------------------------
    def _run_record(self) -> Dict:
        mine = {"config": self.cfg.to_dict(), "init_model": str(self.init_model) if self.init_model else None,
                "data": str(Path(self.data_dir).resolve())}
        if self.init_generator:  # absent for the primary, so runs saved before this setting resume
            mine["init_generator"] = self.init_generator
        return mine

    def _check_run_dir(self) -> None:
        """Refuses an ``out`` folder that holds a different run (the same one resumes)."""
        saved = self.out / "config.json"
        if not saved.exists():
            if (self.out / "model").exists():  # a model this run did not make (its record would be beside it)
                raise CDALError(f"{self.out / 'model'}: already holds a model that no run in {self.out} made, and "
                                "training would replace it: use a new --out folder")
            return
        try:
            prev = json.loads(saved.read_text())
        except ValueError:
            prev = None
        if not isinstance(prev, dict) or not isinstance(prev.get("config"), dict):
            raise CDALError(f"{saved}: is not the record of a cdal run (cdal train writes one in its --out folder): "
                            "use a new --out folder")
        mine = self._run_record()
        # a setting the saved run predates had its default value there
        a, b = {**TrainConfig().to_dict(), **prev["config"]}, dict(mine["config"])
        a.pop("max_steps", None), b.pop("max_steps", None)
        if a != b or prev.get("init_model") != mine["init_model"] or \
                prev.get("init_generator", 0) != self.init_generator:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise CDALError(f"{self.out}: holds a run with different settings ({', '.join(diff) or 'model'}): "
                            "use a new --out folder, or the same config to resume")
        if prev.get("data") not in (None, mine["data"]):  # runs saved before this record resume as before
            raise CDALError(f"{self.out}: holds a run on other data ({prev['data']}): resume it with that --data, "
                            "or use a new --out folder")

    def _prepare_run_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            atomic_write_bytes(self.out / "config.json", (json.dumps(self._run_record(), indent=2) + "\n").encode())

    def _model_settings(self, data_dir: str):
        cfg = self.cfg
        self.init = load_model(self.init_model, device="cpu") if self.init_model else None
        if self.init:  # fine-tuning keeps the model's network, grid, normalisation, classes and slicing axis
            if cfg.slice_axis != self.init.slice_axis:
                raise CDALError(f"the model slices along array axis {self.init.slice_axis} but the config says "
                                f"slice_axis {cfg.slice_axis}: set \"slice_axis\": {self.init.slice_axis} in the config")
            if not 0 <= self.init_generator < len(self.init.generators):
                raise CDALError(f"{self.init_model} has {len(self.init.generators)} generator(s), so there is no "
                                f"generator {self.init_generator + 1}: pick one from 1 to {len(self.init.generators)}")
            if cfg.image_size is None:  # 2D: resize images as the model trained
                cfg.image_size = trained_image_size(self.init.card.get("input", {}))
            return (self.init.config, self.init.class_names, self.init.grid, self.init.normalisation)
        net = NetworkConfig.from_dict(cfg.network) if cfg.network else NetworkConfig()
        grid = ModelGrid(cfg.orientation, cfg.spacing)
        return net, None, grid, Normalisation.from_dict(cfg.normalisation)

    def _load_data(self, data_dir: str) -> None:
        cfg, net = self.cfg, self.net_cfg
        root = Path(data_dir)
        self.is_2d = (root / "images").is_dir() and not (root / "imagesTr").is_dir()
        if self.is_2d:
            cases, labels = read_png_pairs(root), {0: "Background", 1: "Foreground"}
        else:
            cases, labels = read_msd_cases(root)
        names = [labels[i].capitalize() if labels[i].islower() else labels[i] for i in sorted(labels)] if labels \
            else None
        if names is None and not self.is_2d and self.init is None:  # no dataset.json: count the classes
            names = _classes_in_label_maps(cases)
            self.data_notes.append(f"{root}: has no dataset.json: {len(names) - 1} foreground class(es) found in the "
                                   f"label maps ({', '.join(names[1:])}); add a dataset.json to name them")
        if self.class_names is None:
            self.class_names = names or [f"Class {i}" for i in range(net.num_classes)]
            if names and len(names) != net.num_classes:
                net.num_classes = len(names)
        elif names and len(names) != len(self.class_names):
            raise CDALError(f"{root}: has {len(names)} label classes but the model has {len(self.class_names)} "
                            f"({', '.join(self.class_names)}): relabel the data to the model's classes")
        for declared in {c.classes for c in cases if c.classes is not None}:
            declared.check(self.class_names)  # now, not at the first validation after minutes of training
        train_cases, self.val_cases = split_cases(cases, cfg.val_fraction, cfg.seed, cfg.val_cases,
                                                  getattr(cfg, "val_cases_source", "val_cases in the config"))
        if not train_cases:
            raise CDALError(f"{root}: no training cases left after the validation split: add data")
        if not self.is_2d:
            self._refuse_whole_heads(cases, root)
        if not self.is_2d and self.init is None and cfg.normalisation.get("standardise", True):
            self.norm = Normalisation(self.norm.lower, self.norm.upper, _landmarks(train_cases, self.norm))
        all_val = [c.name for c in self.val_cases]
        self.val_cases = self.val_cases[: cfg.val_max_volumes] if not self.is_2d else self.val_cases
        n_cls = net.num_classes
        # 2D: whole images at image_size (train_size when unset); _batch cuts train_size patches from them
        image_size = cfg.image_size or cfg.train_size
        if self.is_2d and any(i < t for i, t in zip(image_size, cfg.train_size)):
            raise CDALError(f"image_size {image_size} is smaller than train_size {cfg.train_size}: "
                            "patches are cut from the resized image, make image_size at least train_size")
        loader = (lambda c: load_png_case(c, image_size, net.image_channels)) if self.is_2d else \
            (lambda c: load_volume(c, self.grid, self.norm, n_cls, net.image_channels))
        # on a terminal only: in a log or a pipe the bar's remains would run into a refused case's error line
        with tqdm(train_cases, desc="loading", disable=self._quiet() or not sys.stderr.isatty(), leave=False) as bar:
            volumes = [loader(c) for c in bar]
        if self.is_2d and cfg.extra_views:
            raise CDALError(f"{root}: 2D images have one view only: remove extra_views from the config")
        self.views = [(0, image_size)] if self.is_2d else cfg.views
        self.banks = [SliceBank(volumes, axis, net.context_slices, size) for axis, size in self.views]
        if not any(np.any(v.label) for v in volumes):
            raise CDALError(f"{root}: none of the {len(volumes)} training labels marks any structure (every label "
                            "is background), so there is nothing to learn: check that the labels/masks are the "
                            "right files and hold the structures")
        self._check_crops_keep_the_labels(volumes, root)
        self.val_volumes = [loader(c) for c in self.val_cases] if self.is_2d else None
        self.data_summary = {"folder": str(root.resolve()), "train_cases": len(train_cases),
                             "validation_cases": all_val,
                             "model_selection_cases": [c.name for c in self.val_cases],
                             "train_slices": sum(len(b) for b in self.banks),
                             "slices_with_foreground": round(self.banks[0].foreground_fraction(), 3)}

    def _check_crops_keep_the_labels(self, volumes, root: Path) -> None:
        """Slices are centre-cropped to ``train_size``: slices larger than that lose their edges, and labels
        there are never trained on (a lesion off-centre in 200 x 200 slices, with 64 x 48: none at all)."""
        for (axis, size), bank in zip(self.views, self.banks):
            if bank.labels_kept >= MIN_LABELS_KEPT_NOTE:
                continue
            largest = np.max([np.moveaxis(v.label, axis, 0).shape[1:] for v in volumes], axis=0)
            fits = [round_up(int(n), 8) for n in largest]
            message = (f"{root}: slices along array axis {axis} are up to {largest[0]} x {largest[1]} voxels on the "
                       f"model grid, and the centre crop to train_size {list(size)} keeps only "
                       f"{100 * bank.labels_kept:.0f} % of the labelled voxels")
            if bank.labels_kept < MIN_LABELS_KEPT:
                raise CDALError(message + f": set \"train_size\": {fits} in the config, or crop the volumes around "
                                          "the structure first")
            self.data_notes.append(message + f" (\"train_size\": {fits} would keep them all)")

    def _refuse_whole_heads(self, cases, root: Path) -> None:
        """A model that segments template boxes (``localise.region_specs``: the hippocampus models) learns from
        crops; a whole head would be centre-cropped to ``train_size`` and show it no hippocampus at all."""
        import SimpleITK as sitk
        from .localise import needs_localisation, region_specs
        card = self.init.card if self.init is not None else {"classes": [{"name": n} for n in self.class_names]}
        if not region_specs(card):
            return
        for case in cases:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(case.image))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                continue  # unreadable: load_volume words that
            if needs_localisation(reader):
                extent = "x".join(f"{n * s:.0f}" for n, s in zip(reader.GetSize(), reader.GetSpacing()))
                model = self.init_model or "hippocampus"  # the shipped model's boxes suit a model trained anew
                raise CDALError(f"{case.image}: is a whole head or brain ({extent} mm), but this model learns from "
                                "crops around each hippocampus: cut them first with cdal crop --model "
                                f"{model} --data {root} --out {root.name}-crops, then train on that folder")

    def _quiet(self) -> bool:
        return self.json_progress or self.rank != 0 or not sys.stderr.isatty() and os.environ.get("CI") == "true"

    def _plain_progress(self) -> bool:
        """Progress goes to a log file (``nohup ... > run.log``), not a terminal: a redrawn bar would fill it with
        thousands of carriage-return frames, so it gets one readable line every ``PLAIN_PROGRESS_LINES``-th of
        the run instead."""
        return not self._quiet() and not sys.stderr.isatty()

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
            raise CDALError(f"{path}: checkpoint is corrupt ({exc.__class__.__name__}): delete it to restart "
                            "the run, or restore a backup")
        try:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.G_ema.load_state_dict(state["G_ema"])
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
        except (RuntimeError, KeyError, ValueError) as exc:  # e.g. other data gave the network another class count
            raise CDALError(f"{path}: this checkpoint does not fit the run being started ({str(exc).splitlines()[0]}): "
                            "resume with the same --data and config, or use a new --out folder") from None
        self.step, self.best, self.best_step = int(state["step"]), float(state["best"]), int(state["best_step"])
        self.seconds = float(state["seconds"])
        self.history = json.loads(state["history"])
        self._pending_validation = bool(state.get("pending_validation", False))
        self._emit({"event": "resumed", "step": self.step})

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "step": self.step,
                 "best": self.best, "best_step": self.best_step, "seconds": self.seconds,
                 "history": json.dumps(self.history), "pending_validation": self._pending_validation}
        tmp = self.out / (CHECKPOINT + ".tmp")
        try:
            torch.save(state, tmp)
        except BaseException:  # a full disk: leave no partial file taking the space (the last checkpoint stays)
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.out / CHECKPOINT)

    def card(self, scores: Optional[Dict] = None) -> Dict:
        cfg = self.cfg
        hardware = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        hardware += ", bf16 autocast" if self.bf16 else ", fp32"
        card = make_card(
            cfg.name, self.net_cfg, self.class_names, num_steps=cfg.num_steps,
            train_num_steps=cfg.train_num_steps, grid=self.grid, slice_axis=cfg.slice_axis,
            train_size=cfg.train_size, normalisation=self.norm, modality=cfg.modality,
            extra_views=[{"axis": a, "size": list(sz)} for a, sz in self.views[1:]],
            description=cfg.description,
            training={"steps": self.step, "wall_seconds": round(self.seconds, 1), "hardware": hardware,
                      "world_size": self.world, "seed": cfg.seed, "init_model": str(self.init_model or ""),
                      **({"init_generator": self.init_generator + 1} if self.init_model else {}),
                      "data": self.data_summary, "config": cfg.to_dict(), "torch": torch.__version__,
                      "cdal_version": __version__},
            validation=scores or {})
        if self.is_2d:  # predict2d resizes inputs to this and slides train_size windows over it
            trained_at = list(cfg.image_size or cfg.train_size)
            card["input"]["image_size"] = trained_at
            start = self.init.card.get("input", {}) if self.init else {}
            if start.get("train_image_size") == trained_at:  # a start model segmented at another size keeps it
                card["input"]["image_size"] = list(start["image_size"])
                card["input"]["train_image_size"] = trained_at
            card["normalisation"] = dict(NORMALISATION_2D)
            if self._orientation_free():  # samples spread over flips and transposes (predict2d)
                card["input"]["test_time_symmetries"] = True
        else:
            # each sample pools its steps' predictions: free, and on the hippocampus (fold 0, session 23) three
            # generators gained +0.10-0.14 / +0.13-0.68 Dice; the 2D models did not gain: they keep Algorithm 2
            card["sampling"] = {"step_pooling": VOLUME_STEP_POOLING}
        if not self.is_2d and learns_left_right_mirror(card):
            # one generator that learnt left and right alike: 2 of its 5 samples see the scan's mirror (4-fold
            # cross-validation, session 17: +0.20 / +0.22 Dice on the hippocampus at the same cost)
            card["input"]["test_time_mirror"] = True
        return card

    def _orientation_free(self) -> bool:
        """Whether the 2D model sees images with no preferred orientation: its start model's card said so (a
        fine-tune of monuseg keeps what it was measured with), or it trained on all 8 flips and quarter turns."""
        started = bool(self.init and self.init.card.get("input", {}).get("test_time_symmetries"))
        return started or bool((self.cfg.augmentation or {}).get("dihedral"))

    # -- one step ------------------------------------------------------------------------------------------
    def _batch(self, step: int):
        rng = np.random.default_rng([self.cfg.seed, step, self.rank])
        view = step % len(self.banks)  # views take turns, one whole batch each (their slice sizes differ)
        bank, augment = self.banks[view], self.augments[view]
        idx = rng.integers(0, len(bank), self.cfg.batch_size)
        images, labels = bank.images[idx], bank.labels[idx]
        if self.is_2d and tuple(images.shape[-2:]) != tuple(self.cfg.train_size):  # 2D patch training
            images, labels = random_patches(images, labels, self.cfg.train_size,
                                            np.random.default_rng([self.cfg.seed, step, self.rank, 1]))
        seed = int(rng.integers(0, 2**31))
        batched = isinstance(augment, BatchAugmentation)
        if augment is not None and not batched:
            images, labels = augment_batch(augment, images, labels, seed)
        x_img = torch.from_numpy(images).to(self.device)
        lab = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        if batched:  # on the training device, the whole batch at once
            x_img, lab = augment(x_img, lab, torch.Generator().manual_seed(seed))
        x_img = x_img.mul_(2).sub_(1)  # a fresh batch (fancy-indexed copy or augmentation output)
        x0 = F.one_hot(lab, self.net_cfg.num_classes).permute(0, 3, 1, 2).float() * 2 - 1
        t = torch.from_numpy(rng.integers(1, self.schedule.num_steps + 1, self.cfg.batch_size)).to(self.device)
        # diffusion noise and z: drawn on the GPU there (CPU draws of whole batches cost more than the networks'
        # small kernels); on a CPU the same draws as ever, so CPU runs resume bit-exactly
        noise = torch.Generator(device=self.device if self.device_noise else "cpu")
        noise.manual_seed(int(rng.integers(0, 2**62)))
        return x_img, x0, t, noise

    def _z(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if not self.cfg.use_latent:
            return torch.zeros(n, self.net_cfg.latent_dim, device=self.device)
        return torch.randn(n, self.net_cfg.latent_dim, generator=gen, device=gen.device).to(self.device)

    def learning_rate_factor(self, step: int) -> float:
        """Multiplier of lr_g / lr_d at ``step``: a pure function of the step, so resuming stays exact."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(step / max(cfg.max_steps, 1), 1.0)
        return cfg.lr_min_fraction + (1 - cfg.lr_min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    def train_step(self) -> Dict[str, float]:
        cfg, sched = self.cfg, self.schedule
        factor = self.learning_rate_factor(self.step)
        for opt, base in ((self.opt_g, cfg.lr_g), (self.opt_d, cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * factor
        image, x0, t, gen = self._batch(self.step)
        tau = sched.time(t)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        # Discriminator: real pair vs a pair whose x_{t-1} is sampled from the generator's x0 prediction.
        x_prev, x_t = sched.q_pair(x0, t, generator=gen)
        r1 = cfg.r1_gamma > 0 and self.step % cfg.r1_every == 0
        x_t.requires_grad_(r1)
        self.opt_d.zero_grad(set_to_none=True)
        with autocast:
            d_real, feats = self.D(x_prev, x_t, tau, image, return_features=True)
        loss_d = F.softplus(-d_real.float()).mean()
        if r1:
            grad, = torch.autograd.grad(d_real.float().sum(), x_t, create_graph=True)
            loss_d = loss_d + cfg.r1_gamma / 2 * cfg.r1_every * grad.pow(2).flatten(1).sum(1).mean()
        with torch.no_grad(), autocast:
            x0_fake = self.G_step(x_t.detach(), tau, self._z(len(t), gen), image).float()
            x_prev_fake = sched.posterior_sample(x0_fake, x_t.detach(), t, generator=gen)
        with autocast:
            d_fake = self.D(x_prev_fake, x_t.detach(), tau, image)
        loss_d = loss_d + F.softplus(d_fake.float()).mean()
        loss_d.backward()
        self._sync_grads(self.D)
        self.opt_d.step()
        # Generator: the clean label weighted by D's attention on the real pair, re-noised with fresh noise.
        x0_in = x0
        if cfg.use_attention:
            att = attention_map([f.detach().float() for f in feats], self.net_cfg.attention_block, x0.shape[-2:])
            x0_in = x0 * normalise_attention(att)
        x_t_att = sched.q_sample(x0_in, t, generator=gen)
        self.opt_g.zero_grad(set_to_none=True)
        with autocast:
            x0_pred = self.G_step(x_t_att, tau, self._z(len(t), gen), image).float()
        loss_mse = F.mse_loss(x0_pred, x0)
        loss_g = loss_mse
        if cfg.boundary_weight > 0:
            weight = 1 + cfg.boundary_weight * label_boundaries(x0)
            loss_g = ((x0_pred - x0) ** 2 * weight).mean() / weight.mean()
        if cfg.dice_weight > 0:
            loss_g = loss_g + cfg.dice_weight * _soft_dice_loss(x0_pred, x0)
        if cfg.adv_weight > 0:
            x_prev_pred = sched.posterior_sample(x0_pred, x_t_att, t, generator=gen)
            with autocast:
                loss_g = loss_g + cfg.adv_weight * F.softplus(-self.D(x_prev_pred, x_t_att, tau, image).float()).mean()
        loss_g.backward()
        self._sync_grads(self.G)
        self.opt_g.step()
        with torch.no_grad():
            ema, live = list(self.G_ema.parameters()), list(self.G.parameters())
            # EMA warm-up: early on, an average dominated by the random init would hide all progress
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(ema, live, 1 - decay)
            for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
                b_ema.copy_(b)
        self.step += 1
        stats = {"loss_d": loss_d, "loss_g": loss_g, "mse": loss_mse, "d_real": d_real.mean(), "d_fake": d_fake.mean(),
                 "fg_found": _foreground_found(x0_pred.detach(), x0, t)}
        values = torch.stack([v.detach().float() for v in stats.values()]).tolist()  # one device sync for all
        return dict(zip(stats, values))

    def _sync_grads(self, module: torch.nn.Module) -> None:
        if self.world == 1:
            return
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> Optional[Dict]:
        """Dice of the EMA generator on the validation cases (T = num_steps, val_samples samples)."""
        if self.rank != 0 or not self.val_cases:
            return None
        model = LoadedModel(None, self.card(), self.net_cfg, self.G_ema, None)
        if self.is_2d:
            report = _evaluate_2d(model, self.val_volumes, self.cfg)
        else:
            report = evaluate_cases(model, self.val_cases, steps=self.cfg.num_steps, samples=self.cfg.val_samples,
                                    seed=0, device=str(self.device), with_uncertainty=False)
        report.pop("per_volume", None)
        report["mean_dice"] = mean_foreground_dice(report)
        report["step"] = self.step
        return report

    def _has_model(self) -> bool:
        """A whole exported model: its card is renamed into place last (``save_model``), so a folder that a kill
        left empty, or with weights only, is exported again."""
        return (self.out / "model" / "model.json").is_file()

    def export_model(self, scores: Optional[Dict]) -> Path:
        return save_model(self.out / "model", self.card(scores), self.G_ema, self.D)

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, max_steps: Optional[int] = None, max_minutes: Optional[float] = None) -> Path:
        cfg = self.cfg
        target = int(max_steps if max_steps is not None else cfg.max_steps)
        if self.step >= target:
            if not self._has_model():  # first, so "done" is said only once the model is there
                self.export_model(self._validated(self.validate()))
            self._emit({"event": "done", "step": self.step, "model": str(self.out / "model"),
                        "message": f"already trained to step {self.step}"})
            return self.out / "model"
        deadline = time.time() + 60 * max_minutes if max_minutes else None
        stopper = _StopBetweenSteps()
        restore = stopper.install()
        plain = self._plain_progress()
        plain_every = max(cfg.log_every, (target // PLAIN_PROGRESS_LINES) // cfg.log_every * cfg.log_every)
        bar = tqdm(total=target, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=self._quiet() or plain)
        self.G.train(), self.D.train()
        last_val = -1
        t_run, first_step = time.time(), self.step
        try:
            if self._pending_validation:  # the last run was stopped while validating this step
                self._validate_and_keep_best()
                last_val = self.step
            while self.step < target:
                t0 = time.time()
                with stopper.deferring():
                    stats = self.train_step()
                self.seconds += time.time() - t0
                if stopper.requested:
                    raise KeyboardInterrupt
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == target:
                    rate = (self.step - first_step) / max(time.time() - t_run, 1e-6)
                    rec = {"event": "progress", "step": self.step, "max_steps": target,
                           "eta_seconds": round((target - self.step) / max(rate, 1e-9), 1),
                           "steps_per_second": round(rate, 3), **{k: round(v, 5) for k, v in stats.items()}}
                    self._log(rec)
                    bar.set_postfix(mse=f"{stats['mse']:.4f}", d=f"{stats['loss_d']:.3f}")
                    if plain and (self.step % plain_every == 0 or self.step == target):
                        print(f"step {self.step}/{target}: {rate:.2f} steps/s, "
                              f"{_hours_minutes(rec['eta_seconds'])} to go, mse {stats['mse']:.4f}, "
                              f"d {stats['loss_d']:.3f}", file=sys.stderr, flush=True)
                    self._watch_for_collapse(stats["fg_found"])
                if self.step % cfg.val_every == 0:
                    self._pending_validation = True
                    self._validate_and_keep_best()
                    last_val = self.step
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if deadline and time.time() > deadline:
                    self._emit({"event": "time_limit", "step": self.step})
                    break
        except KeyboardInterrupt:
            self._emit({"event": "interrupted", "step": self.step})
            if not stopper.in_step:  # a second signal inside a step: keep the last checkpoint, whole steps only
                self.save_checkpoint()
            raise
        finally:
            bar.close()
            restore()
        if last_val != self.step:
            self._validate_and_keep_best()
        self.save_checkpoint()
        self._emit({"event": "done", "step": self.step, "model": str(self.out / "model"), "best_step": self.best_step,
                    "best_mean_dice": self.best})
        return self.out / "model"

    def _watch_for_collapse(self, fg_found: float) -> None:
        """Say once, clearly, when the generator has stopped finding foreground in noisy inputs for a while: such
        a run has never recovered (session 14: all four coronal hippocampus runs, foreground logits stuck near -8)."""
        recent = self._fg_found = (self._fg_found + [fg_found])[-COLLAPSE_WINDOW:]
        if self.step < COLLAPSE_AFTER_STEPS or len(recent) < COLLAPSE_WINDOW or self._collapse_said or \
                max(recent) >= COLLAPSE_FOUND_BELOW:
            return
        self._collapse_said = True
        self._emit({"event": "note", "step": self.step, "message": (
            f"training has collapsed onto the background: over the last {COLLAPSE_WINDOW} logged steps the generator "
            f"found at most {100 * max(recent):.1f} % of the labelled pixels in noisy inputs. Such runs have not "
            "recovered: stop it (Ctrl+C) and change the recipe before a new run (\"dice_weight\": 0 cured the coronal "
            "hippocampus runs)")})

    def _validated(self, report: Optional[Dict]) -> Dict:
        return report or {"note": "no validation cases"}

    def _validate_and_keep_best(self) -> None:
        report = self.validate()
        self._pending_validation = False  # done: the checkpoint written with a new best must not ask for it again
        if self.rank != 0:
            return
        if report is None:  # nothing to validate on: the latest weights are the model
            self.export_model({"note": "no validation cases"})
            return
        self.history.append({"step": self.step, "mean_dice": report["mean_dice"]})
        self._log({"event": "validation", **{k: v for k, v in report.items() if k != "per_class"},
                   "per_class_dice": {k: round(v["dice"], 4) for k, v in report["per_class"].items()}})
        if report["mean_dice"] > self.best or not self._has_model():
            self.best, self.best_step = report["mean_dice"], self.step
            self.export_model(report)
            # the checkpoint must know this best at once: resumed from an older one after a hard kill, a later,
            # worse validation would replace model/ with a worse model
            self.save_checkpoint()

    def _log(self, rec: Dict) -> None:
        if self.rank != 0:
            return
        rec = {"time": round(time.time(), 1), **rec}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.json_progress:
            print(json.dumps(rec), flush=True)
        elif rec.get("event") == "validation":
            tqdm.write(f"step {rec['step']}: validation Dice {rec['per_class_dice']}")

    def _emit(self, rec: Dict) -> None:
        self._log(rec)
        if not self.json_progress and self.rank == 0 and rec.get("event") in ("resumed", "done", "time_limit", "note"):
            tqdm.write(", ".join(f"{k}={v}" for k, v in rec.items()))


def _view_augmentation(settings: Optional[Dict], primary_axis: int, axis: int) -> Optional[Dict]:
    """The augmentation of the view slicing along ``axis``: it mirrors the same volume axes as the primary view's.
    A mirrored axis that lies in this view's plane becomes its ``flip_axis``; one this view slices across becomes
    ``flip_across_slices`` (reversed context slices), e.g. the left-right mirror of axial slices for a sagittal
    view."""
    if settings is None or axis == primary_axis:
        return settings
    mirrored = mirrored_volume_axes(settings, primary_axis)
    flips = [i for i, a in enumerate(in_plane_axes(axis)) if a in mirrored]
    view = {**settings, "flip_axis": flips[0] if flips else None}
    view.pop("flip_across_slices", None)
    if axis in mirrored:
        view["flip_across_slices"] = True
    return view


def _landmarks(cases, norm: Normalisation) -> List[float]:
    """Histogram-standardisation landmarks: mean intensity percentiles of the training scans."""
    import SimpleITK as sitk
    from .data import read_image
    scaled = []
    for case in cases:
        array = sitk.GetArrayFromImage(read_image(case.image))  # a copy: a view would outlive its image
        scaled.append(norm.scale(array, norm.fit(array)))
    return Normalisation.learn_landmarks(scaled)


def random_patches(images: np.ndarray, labels: np.ndarray, size, rng: np.random.Generator):
    """One random ``size`` crop per sample: images (B, C, H, W), labels (B, H, W) -> (B, C, h, w), (B, h, w).
    Its own RNG stream (seed, step, rank, 1), so runs without patches draw exactly what they drew before."""
    h, w = size
    tops = rng.integers(0, images.shape[-2] - h + 1, len(images))
    lefts = rng.integers(0, images.shape[-1] - w + 1, len(images))
    rows = tops[:, None] + np.arange(h)[None]                     # (B, h)
    cols = lefts[:, None] + np.arange(w)[None]                    # (B, w)
    b = np.arange(len(images))[:, None, None]
    patch_labels = labels[b, rows[:, :, None], cols[:, None, :]]
    patch_images = images[b, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (B, h, w, C)
    return np.ascontiguousarray(np.moveaxis(patch_images, -1, 1)), np.ascontiguousarray(patch_labels)


def label_boundaries(x0: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) one-hot * 2 - 1 -> (B, 1, H, W) 1.0 where the 3x3 neighbourhood holds another class
    (both sides of every edge, including the anterior/posterior interface), else 0."""
    neighbourhood_max = F.max_pool2d(x0, 3, stride=1, padding=1)
    return ((neighbourhood_max - x0).amax(dim=1, keepdim=True) > 0).to(x0.dtype)


# collapse watch: after this many steps, a window of logged steps that all found under this fraction of the
# labelled pixels (a healthy hippocampus run finds 0.8 by step 800; the collapsed coronal one found 0)
COLLAPSE_AFTER_STEPS, COLLAPSE_WINDOW, COLLAPSE_FOUND_BELOW = 1000, 10, 0.05


def _foreground_found(x0_pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Predicted foreground pixels over labelled ones, on the batch items noised beyond t = 1 (1 where they hold
    no foreground). Near 0 means collapse: the generator only copies the label through the nearly clean input
    and has not learnt to find it in the image."""
    noisy = t > 1
    truth = (x0[noisy].argmax(1) > 0).sum()
    found = (x0_pred[noisy].argmax(1) > 0).sum()
    return torch.where(truth > 0, found / truth.clamp_min(1), torch.ones((), device=x0.device))


def _soft_dice_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    p, g = (x0_pred + 1) / 2, (x0 + 1) / 2
    inter = (p * g)[:, 1:].sum(dim=(2, 3))
    denom = (p + g)[:, 1:].sum(dim=(2, 3))
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


def _evaluate_2d(model: LoadedModel, volumes, cfg: TrainConfig) -> Dict:
    """Validation for 2D datasets: each image is a one-slice volume sampled directly."""
    from .metrics import segmentation_metrics, summarise
    from .sampler import sample
    per = []
    rng = torch.Generator().manual_seed(0)
    dev = next(model.generator.parameters()).device
    for vol in volumes:
        img = vol.image[0]
        img = np.moveaxis(img, -1, 0) if img.ndim == 3 else img[None]
        out = sample(model.generator, torch.from_numpy(img[None] * 2 - 1).float().to(dev), model.schedule(),
                     cfg.val_samples, rng, use_latent=model.uses_latent)
        per.append(segmentation_metrics(out.labels[0].cpu().numpy()[None], vol.label, model.config.num_classes))
    return {"per_class": summarise(per, model.class_names), "volumes": len(volumes), "seconds_per_volume": 0.0}


VOLUME_STEP_POOLING = "mean"  # what cards of volume models trained here say (sampler.STEP_POOLING)


def training_in_bf16(amp: bool, device: torch.device) -> bool:
    """bf16 autocast for the networks' passes (losses, optimisers and EMA stay float32): on CUDA, and on CPUs
    that compute bf16 natively (AVX512-BF16 or AMX; 1.39x the steps per second of fp32 for the hippocampus
    recipe on 2 cores of an AMD EPYC Zen 4, docs/RESULTS.md session 21). Other CPUs train in fp32, as does
    ``"amp": false``."""
    from .inference import cpu_has_native_bf16
    if not amp:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def _init_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if not torch.cuda.is_available():
            raise CDALError("torchrun with several processes needs CUDA GPUs: run without torchrun on CPU")
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank() if world > 1 else 0), world


def _classes_in_label_maps(cases) -> List[str]:
    """Class names for labels 0..max over the label maps (a dataset without dataset.json): a config's default
    class count would add empty classes that score a perfect Dice, or refuse a fourth label value."""
    import SimpleITK as sitk
    highest = 0
    for case in cases:
        try:
            highest = max(highest, int(np.max(sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))))))
        except (RuntimeError, ValueError, TypeError):
            continue  # unreadable, missing or not integer: load_volume's checks word it
    return ["Background"] + [f"Class {i}" for i in range(1, max(highest, 1) + 1)]


def _hours_minutes(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class _StopBetweenSteps:
    """Ctrl-C (SIGINT) and SIGTERM stop a run between training steps, so its checkpoint resumes exactly.

    A signal inside a step lets the step finish first: stopped halfway, D and its optimiser would be saved one
    update ahead of G and the step counter. A second signal stops at once, without a checkpoint (the last one
    stays). Elsewhere (validation, logging) a signal raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.in_step = False
        self.requested = False

    def install(self):
        def handler(signum, frame):
            if self.in_step and not self.requested:
                self.requested = True
                print("cdal: stopping after this training step (again to stop at once)", file=sys.stderr, flush=True)
                return
            raise KeyboardInterrupt
        try:
            previous = [(sig, signal.signal(sig, handler)) for sig in (signal.SIGINT, signal.SIGTERM)]
        except ValueError:  # not the main thread: signals go elsewhere
            return lambda: None
        return lambda: [signal.signal(sig, old) for sig, old in previous]

    @contextmanager
    def deferring(self):
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False


def train(data_dir: str, out_dir: str, config: TrainConfig, max_steps: Optional[int] = None,
          max_minutes: Optional[float] = None, device: str = "auto", init_model: Optional[str] = None,
          json_progress: bool = False, init_generator: int = 0) -> Path:
    trainer = Trainer(data_dir, out_dir, config, device=device, init_model=init_model, json_progress=json_progress,
                      init_generator=init_generator)
    return trainer.fit(max_steps=max_steps, max_minutes=max_minutes)
