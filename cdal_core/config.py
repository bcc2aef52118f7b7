"""Training configuration: JSON files whose keys override these defaults (unknown keys are an error)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .data import read_case_list
from .errors import CDALError


# settings that must be above zero (a zero or negative value fails deep inside training, or trains nothing)
POSITIVE_SETTINGS = ("batch_size", "max_steps", "lr_g", "lr_d", "train_num_steps", "num_steps", "checkpoint_every",
                     "log_every", "val_every", "r1_every", "base_channels", "latent_dim", "disc_channels",
                     "num_classes", "image_channels", "num_res_blocks")


def trained_image_size(model_input: Dict[str, Any]) -> Optional[List[int]]:
    """The size a 2D model's images were resized to in training, from its card's ``input``: ``train_image_size``
    where it segments at another size, else ``image_size``; None for a volume model."""
    if not model_input.get("image_size"):
        return None
    return list(model_input.get("train_image_size") or model_input["image_size"])


def check_setting_types(defaults: Any, settings: Dict[str, Any], what: str) -> None:
    """Refuse a setting whose JSON type differs from its default's (a number given as text, a list as a number)
    and non-positive sizes, with the setting's name, before it fails somewhere inside training."""
    for key, value in settings.items():
        default = getattr(defaults, key, None)
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple))
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise CDALError(f"{what} {key} is {value!r} but must be a {_kind(default)} like {_json(default)}: "
                            "fix it in the config")
        if key in POSITIVE_SETTINGS and isinstance(value, (int, float)) and value <= 0:
            raise CDALError(f"{what} {key} is {value!r} but must be above 0: fix it in the config")


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true/false value"
    if isinstance(default, int):
        return "whole number"
    if isinstance(default, float):
        return "number"
    if isinstance(default, (list, tuple)):
        return "list"
    return "text"


def _json(default: Any) -> str:
    return json.dumps(list(default) if isinstance(default, tuple) else default)


# the keys augment.build_augmentation / BatchAugmentation and data.Normalisation read
AUGMENTATION_KEYS = {"affine_probability", "backend", "dihedral", "flip_across_slices", "flip_axis", "probability",
                     "rotate_degrees", "scale", "stain_jitter", "translate"}
NORMALISATION_KEYS = {"lower", "upper", "standardise", "landmarks"}


@dataclass
class TrainConfig:
    name: str = "model"
    description: str = ""
    modality: str = "MRI"
    seed: int = 0
    network: Dict[str, Any] = field(default_factory=dict)     # NetworkConfig overrides
    train_num_steps: int = 4          # T used to draw training times (its t/T grid contains T = 2's)
    num_steps: int = 2                # default T at inference
    batch_size: int = 16
    max_steps: int = 2000
    lr_g: float = 5e-4                # the reference's 1.6e-4 / 1.25e-4 suit batch 128 on a GPU
    lr_d: float = 2e-4
    lr_schedule: str = "constant"     # or "cosine": decays to lr_min_fraction over the config's max_steps
    lr_min_fraction: float = 0.05
    adam_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    ema_decay: float = 0.999
    r1_gamma: float = 1.0
    r1_every: int = 10
    use_attention: bool = True        # ablation switch: x0 * A_D before re-noising
    use_latent: bool = True           # ablation switch: z = 0 everywhere
    adv_weight: float = 0.0           # adversarial generator term (off in the reference code)
    dice_weight: float = 0.5          # soft Dice term on the predicted x0 (0 = the reference's MSE only)
    boundary_weight: float = 0.0      # extra MSE weight on pixels next to a label change (0 = plain MSE)
    orientation: str = "RAS"
    spacing: Optional[List[float]] = None
    slice_axis: int = 0
    train_size: List[int] = field(default_factory=lambda: [64, 48])
    # 2D datasets: resize every image to this (H, W) and train on random train_size patches of it; inference
    # resizes to it and runs overlapping train_size windows (MoNuSeg: [512, 512] with 256 patches, as the
    # paper). None: resize whole images to train_size.
    image_size: Optional[List[int]] = None
    # Multi-view: further array axes to slice along, each with its training size. One network learns every
    # view; inference spreads its samples over the views (see inference._segment_array).
    extra_views: List[Dict[str, Any]] = field(default_factory=list)   # [{"axis": 2, "size": [40, 56]}]
    normalisation: Dict[str, Any] = field(default_factory=lambda: {"lower": 0.5, "upper": 99.5, "standardise": True})
    augmentation: Optional[Dict[str, Any]] = field(default_factory=dict)  # None disables
    val_fraction: float = 0.2
    val_cases: Optional[List[str]] = None   # explicit validation names (or a path to a .txt, relative to config)
    val_every: int = 250
    val_max_volumes: int = 12
    val_samples: int = 5
    checkpoint_every: int = 100
    log_every: int = 10
    amp: bool = True                  # bf16 autocast on CUDA and on CPUs with native bf16 (trainer.training_in_bf16)
    # torch.compile the generator's training passes (fuses its many small norm/activation kernels; a GPU
    # step is bound by them). The discriminator stays eager: R1 needs a double backward, which compile lacks.
    compile_generator: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"comment"})
        if unknown:
            raise CDALError(f"unknown training settings {unknown}: check the spelling (known: {sorted(known)})")
        if d.get("lr_schedule", "constant") not in ("constant", "cosine"):
            raise CDALError(f"lr_schedule {d['lr_schedule']!r} is not known: use \"constant\" or \"cosine\"")
        check_setting_types(cls(), d, "training setting")
        if not isinstance(d.get("network", {}), dict):
            raise CDALError("training setting network must be an object of network settings, e.g. "
                            "{\"base_channels\": 16}")
        from .networks import NetworkConfig
        net = d.get("network", {})
        unknown_net = sorted(set(net) - {f.name for f in fields(NetworkConfig)})
        if unknown_net:
            raise CDALError(f"unknown network settings {unknown_net}: check the spelling")
        check_setting_types(NetworkConfig(), net, "network setting")
        for key, allowed in (("augmentation", AUGMENTATION_KEYS), ("normalisation", NORMALISATION_KEYS)):
            inner = d.get(key)
            if inner is None:
                continue
            if not isinstance(inner, dict):
                raise CDALError(f"training setting {key} must be an object, e.g. {{\"{sorted(allowed)[0]}\": ...}}")
            typos = sorted(set(inner) - allowed - {"comment"})
            if typos:  # a misspelt key would silently keep its default (e.g. "standardize" for "standardise")
                raise CDALError(f"unknown {key} settings {typos}: check the spelling (known: {sorted(allowed)})")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.check_views()
        cfg.check_augmentation()
        return cfg

    @property
    def views(self) -> List[Tuple[int, List[int]]]:
        """(array axis, training slice size) of every view, the primary (slice_axis) first."""
        return [(int(self.slice_axis), list(self.train_size))] + \
            [(int(v["axis"]), list(v["size"])) for v in self.extra_views]

    def check_views(self) -> None:
        for v in self.extra_views:
            if not isinstance(v, dict) or set(v) != {"axis", "size"} or len(v["size"]) != 2:
                raise CDALError(f"extra_views entry {v!r} must look like {{\"axis\": 2, \"size\": [40, 56]}}")
        axes = [a for a, _ in self.views]
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise CDALError(f"slice axes {axes} must be distinct array axes 0, 1 or 2")

    def check_augmentation(self, network: Optional[Any] = None) -> None:
        """The histology augmentations need what they act on: square slices for ``dihedral``, RGB images and the
        batched backend for ``stain_jitter``. ``network``: the NetworkConfig the run will train (a fine-tune keeps
        its model's, which the config need not name); without it, what the config's ``network`` says."""
        aug = self.augmentation or {}
        if not isinstance(aug.get("dihedral", False), bool):
            raise CDALError(f"augmentation dihedral must be true or false, got {aug['dihedral']!r}")
        jitter = aug.get("stain_jitter", 0.0)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= 0.5:
            raise CDALError(f"augmentation stain_jitter must be a number from 0 to 0.5 (e.g. 0.05), got {jitter!r}")
        if aug.get("dihedral"):
            if self.extra_views:  # each view would turn a plane that holds the other views' slicing axes
                raise CDALError("augmentation dihedral is for 2D images and single-view models: drop it or "
                                "extra_views")
            if self.train_size[0] != self.train_size[1]:
                raise CDALError(f"augmentation dihedral turns slices by quarter turns, which needs square slices; "
                                f"train_size is {list(self.train_size)}: make it square or drop dihedral")
        if jitter > 0:
            if network is not None:
                channels, context = network.image_channels, network.context_slices
            elif "image_channels" in self.network or "context_slices" in self.network:
                channels = int(self.network.get("image_channels", 1))
                context = int(self.network.get("context_slices", 0))
            else:  # a fine-tune config that does not name the network: checked again on the model's
                channels, context = 3, 0
            if channels != 3 or context != 0:  # one RGB image per slice; context slices' channels would be mixed up
                raise CDALError(f"augmentation stain_jitter changes H&E stain densities, which needs one RGB image "
                                f"per slice, but the network takes {channels} image channel(s) with {context} context "
                                f"slice(s) either side: drop stain_jitter")
            if aug.get("backend", "monai") != "batched":
                raise CDALError("augmentation stain_jitter runs only in the batched augmentation: set "
                                "\"backend\": \"batched\"")

    @classmethod
    def for_finetuning(cls, card: Dict[str, Any]) -> "TrainConfig":
        """Defaults of ``cdal finetune`` without --config: a short run at half the default learning rates that
        slices the way the model was trained (axis, slice size, extra views from the card)."""
        inp = card.get("input", {})
        cfg = cls()
        cfg.lr_g, cfg.lr_d, cfg.max_steps = cfg.lr_g / 2, cfg.lr_d / 2, 200
        cfg.slice_axis = int(inp.get("slice_axis", cfg.slice_axis))
        cfg.train_size = list(inp.get("train_size", cfg.train_size))
        cfg.image_size = trained_image_size(inp)
        cfg.extra_views = [dict(v) for v in inp.get("extra_views", [])]
        cfg.check_views()
        return cfg

    @classmethod
    def load(cls, path: Optional[str]) -> "TrainConfig":
        if path is None:
            return cls()
        p = Path(path)
        if not p.exists():
            raise CDALError(f"{p}: config file not found: check the path")
        try:
            d = json.loads(p.read_text())
        except ValueError as exc:
            raise CDALError(f"{p}: is not valid JSON ({exc})")
        cfg = cls.from_dict(d)
        if isinstance(cfg.val_cases, str):
            list_path = (p.parent / cfg.val_cases)
            if not list_path.exists():
                raise CDALError(f"{list_path}: validation list not found (named by {p})")
            cfg.val_cases = read_case_list(list_path)
            cfg.val_cases_source = f"{list_path} (val_cases in {p})"
        return cfg
