"""Model directories: ``model.json`` (the model card) + ``model.safetensors`` (weights; loading never unpickles).

An ensemble adds further generators, one safetensors file each, listed in the card's ``members``
(``[{"weights": "member1.safetensors", ...}]``); they share the first one's network, grid and normalisation,
and inference spreads its samples over all of them. A member trained on slices along other array axes than the
model's (e.g. sagittal beside axial) says so in its entry (``"slice_axes": [2]``), so its errors differ from the
others' and the ensemble gains from views as well as from seeds.

A model is named by a path or by the name of a shipped model (``Resources/Models/<name>/``) or of a user model
(``~/.cdal/models/<name>/``, or ``$CDAL_USER_MODELS``), e.g. ``--model hippocampus``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import MODEL_FORMAT, MODEL_FORMAT_VERSION, __version__
from .data import Normalisation
from .errors import CDALError
from .geometry import ModelGrid, mirrored_volume_axes
from .networks import Discriminator, Generator, NetworkConfig
from .schedule import DiffusionSchedule

CARD_NAME, WEIGHTS_NAME = "model.json", "model.safetensors"
DEFAULT_COLOURS = [(0, 0, 0), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
                   (128, 174, 128), (220, 245, 20), (183, 156, 220)]


def shipped_models_dir() -> Path:
    return Path(os.environ.get("CDAL_SHIPPED_MODELS", Path(__file__).resolve().parent.parent / "Resources" / "Models"))


def user_models_dir() -> Path:
    return Path(os.environ.get("CDAL_USER_MODELS", Path.home() / ".cdal" / "models"))


def list_models() -> Dict[str, Path]:
    """Shipped and user models by name (a user model of the same name wins)."""
    found: Dict[str, Path] = {}
    for root in (shipped_models_dir(), user_models_dir()):
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if (d / CARD_NAME).exists():
                    found[d.name] = d
    return found


def resolve_model(name_or_path: os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    models = list_models()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    names = ", ".join(models) or "none installed"
    raise CDALError(f"model '{name_or_path}' not found: give a model folder (with {CARD_NAME}) "
                    f"or a model name ({names})")


@dataclass
class LoadedModel:
    """A model ready to run: networks in eval mode plus everything the card says about inputs and classes."""

    path: Optional[Path]
    card: Dict
    config: NetworkConfig
    generator: Generator
    discriminator: Optional[Discriminator]
    members: List[Generator] = field(default_factory=list)   # further generators of an ensemble

    @property
    def generators(self) -> List[Generator]:
        """Every generator, the primary (the one that was trained with ``discriminator``) first."""
        return [self.generator] + self.members

    @property
    def class_names(self):
        return [c["name"] for c in self.card["classes"]]

    @property
    def title(self) -> str:
        """What messages call the model: its card's name, else its folder's."""
        return self.card.get("name") or (self.path.name if self.path else "this model")

    @property
    def is_2d(self) -> bool:
        """Trained on 2D images (PNG/JPEG/TIFF): its card has ``input.image_size`` (``predict2d.model_sizes``)."""
        return "image_size" in self.card.get("input", {})

    @property
    def grid(self) -> ModelGrid:
        inp = self.card["input"]
        return ModelGrid(inp.get("orientation", "RAS"), inp.get("spacing"))

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation.from_dict(self.card.get("normalisation", {}))

    @property
    def slice_axis(self) -> int:
        return int(self.card["input"].get("slice_axis", 0))

    @property
    def slice_axes(self) -> List[int]:
        """Every array axis the primary generator slices along (multi-view models), its first axis first."""
        return card_slice_axes(self.card)

    @property
    def runs(self) -> List[Tuple[Generator, int]]:
        """(generator, array axis) pairs that inference spreads its samples over: each generator along each
        axis it was trained on (a member's own ``slice_axes`` where its card entry has them), the primary's
        slicing first."""
        pairs = [(self.generator, axis) for axis in self.slice_axes]
        for member, entry in zip(self.members, self.card.get("members", [])):
            pairs += [(member, int(axis)) for axis in entry.get("slice_axes") or self.slice_axes]
        return pairs

    @property
    def mirror_axis(self) -> Optional[int]:
        """The model grid's left-right array axis (the axis test-time mirroring flips), or None."""
        return lr_array_axis(self.grid.orientation)

    @property
    def test_time_mirror(self) -> bool:
        """The card's default: part of the samples see the scan's left-right mirror (``input.test_time_mirror``)."""
        return bool(self.card.get("input", {}).get("test_time_mirror", False))

    @property
    def step_pooling(self) -> str:
        """The card's default pooling of the steps' x0 predictions (``sampling.step_pooling``; Algorithm 2's
        ``last`` for cards that do not say)."""
        from .quality import card_step_pooling
        return card_step_pooling(self.card)

    def step_weights(self, steps: Optional[int] = None, pooling: Optional[str] = None) -> Optional[List[float]]:
        """``sample``'s ``step_weights`` for ``steps`` (default: the card's) under ``pooling`` (default: the
        card's)."""
        from .sampler import step_pooling_weights
        return step_pooling_weights(pooling or self.step_pooling, steps or self.default_steps)

    @property
    def uses_latent(self) -> bool:
        """False for a model trained with z = 0 (the paper's "without latent" ablation): sample it the same way."""
        return uses_latent(self.card)

    @property
    def default_steps(self) -> int:
        return int(self.card.get("num_steps", 2))

    def schedule(self, steps: Optional[int] = None) -> DiffusionSchedule:
        sched = self.card.get("schedule", {})
        return DiffusionSchedule(steps or self.default_steps, sched.get("beta_min", 0.1), sched.get("beta_max", 20.0))

    def to(self, device: torch.device) -> "LoadedModel":
        device = torch.device(device)
        first = next(self.generator.parameters())
        if first.device.type == device.type and (device.index is None or first.device.index == device.index):
            return self  # already there: never touch the parameters (volumes may be segmented concurrently)
        for generator in self.generators:
            generator.to(device)
        if self.discriminator is not None:
            self.discriminator.to(device)
        return self


def make_card(name: str, config: NetworkConfig, class_names, *, num_steps: int, train_num_steps: int,
              grid: ModelGrid, slice_axis: int, train_size, normalisation: Normalisation,
              modality: str = "MRI", description: str = "", extra_views: Sequence[Dict] = (), **extra) -> Dict:
    classes = [{"index": i, "name": n, "color": list(DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)])}
               for i, n in enumerate(class_names)]
    card = {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "cdal_version": __version__,
        "name": name, "description": description, "classes": classes,
        "num_steps": num_steps, "train_num_steps": train_num_steps, "samples": 5,
        "schedule": {"beta_min": 0.1, "beta_max": 20.0, "time_input": "t/T"},
        "network": config.to_dict(),
        "input": {"modality": modality, "image_channels": config.image_channels,
                  "context_slices": config.context_slices, "orientation": grid.orientation,
                  "spacing": list(grid.spacing) if grid.spacing is not None else None,
                  "slice_axis": slice_axis, "train_size": list(train_size),
                  "size_multiple": config.size_multiple, "extra_views": [dict(v) for v in extra_views]},
        "normalisation": normalisation.to_dict(),
    }
    card.update(extra)
    return card


def make_readable(path: os.PathLike) -> None:
    """mkstemp creates 0600 files; give the final file the permissions a plain open() would (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def finite_or_none(value):
    """``value`` with every NaN or infinite float (also inside dicts, lists and numpy scalars) replaced by None:
    strict JSON has no NaN, and a report's reader (jq, JavaScript, pandas with a schema) rejects a bare ``NaN``.
    None reads as "no value" (a metric undefined for that case, e.g. a Spearman over constant values)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_bytes(obj, indent: int = 2) -> bytes:
    """``obj`` as strict JSON (non-finite numbers written as null), newline-terminated, for reports and cards."""
    return (json.dumps(finite_or_none(obj), indent=indent, allow_nan=False) + "\n").encode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(directory: os.PathLike, card: Dict, generator: Generator,
               discriminator: Optional[Discriminator] = None) -> Path:
    """Write weights and card as a pair: both under temporary names first, then renamed one right after the
    other, so a reader never sees a half-written file, and a crash while writing leaves the previous pair (a
    model/ folder re-exported at every better validation) rather than new weights under the old card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _tensors("generator", generator)
    if discriminator is not None:
        tensors.update(_tensors("discriminator", discriminator))
    staged = []
    try:
        weights_tmp = _staging_path(directory / WEIGHTS_NAME)
        staged.append(weights_tmp)
        save_file(tensors, weights_tmp, metadata={"format": MODEL_FORMAT})
        card_tmp = _staging_path(directory / CARD_NAME)
        staged.append(card_tmp)
        Path(card_tmp).write_bytes(json_bytes(card))
        for tmp in staged:
            make_readable(tmp)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(card_tmp, directory / CARD_NAME)
    except BaseException:
        for tmp in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    return directory


def _staging_path(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.stem, suffix=".tmp")
    os.close(fd)
    return tmp


def _tensors(prefix: str, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}


def _write_weights(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """safetensors file written atomically (temporary file in the same folder, then renamed)."""
    tmp = _staging_path(path)
    try:
        save_file(tensors, tmp, metadata={"format": MODEL_FORMAT})
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_member(directory: os.PathLike, generator: Generator, info: Optional[Dict] = None,
                replace: Optional[int] = None) -> Dict:
    """Add ``generator`` to the model in ``directory`` as a further ensemble member: its weights file first,
    then the card that lists it (each written atomically). ``info`` (e.g. its training summary) goes into the
    card's entry. Returns that entry.

    ``replace`` = N puts it in the place of member N (1 = the first after the primary) instead: same position,
    so the same share of the samples. Its weights get a file name no entry uses, the card switches to it, and
    only then is the old file removed, so the folder never lists weights that are not there."""
    directory = Path(directory)
    card = read_card(directory)
    if NetworkConfig.from_dict(card["network"]).to_dict() != generator.cfg.to_dict():
        raise CDALError(f"{directory}: the new member's network differs from the model's: members must share it")
    members = list(card.get("members", []))
    if replace is not None and not 1 <= replace <= len(members):
        raise CDALError(f"{directory} has {len(members)} member(s) besides its primary generator, so there is no "
                        f"member {replace} to replace: pick one from 1 to {len(members)}")
    taken = {m["weights"] for m in members}
    number = len(members) + 1
    while f"member{number}.safetensors" in taken:
        number += 1
    entry = {"weights": f"member{number}.safetensors", **(info or {})}
    _write_weights(directory / entry["weights"], _tensors("generator", generator))
    if replace is None:
        card["members"] = members + [entry]
    else:
        old = members[replace - 1]["weights"]
        card["members"] = members[:replace - 1] + [entry] + members[replace:]
    card.pop("quality", None)  # review limits belong to the weights they were measured with (cdal_core.quality)
    atomic_write_bytes(directory / CARD_NAME, json_bytes(card))
    if replace is not None:
        (directory / old).unlink(missing_ok=True)
    return entry


def uses_latent(card: Dict) -> bool:
    """Whether the generator of ``card`` was trained with a random latent z (cards before the switch: yes)."""
    return bool(card.get("training", {}).get("config", {}).get("use_latent", True))


SLICING_KEYS = ("slice_axis", "extra_views", "train_size")   # how a model cuts the volume into slices
# input keys a member need not share: its slicing (recorded in its entry) and what the ensemble's own card decides
# for inference (2D test-time symmetries, the volumes' left-right mirror)
MEMBER_FREE_INPUT_KEYS = SLICING_KEYS + ("test_time_symmetries", "test_time_mirror")


def lr_array_axis(orientation: str) -> Optional[int]:
    """The axis of a (Z, Y, X) array on a grid of this orientation code ('RAS', 'LPS', ...) along which left and
    right lie (2 - the position of R or L in the code), or None when the code names neither or both."""
    side = [i for i, letter in enumerate(str(orientation).upper()) if letter in "RL"]
    return 2 - side[0] if len(side) == 1 else None


def trained_mirrored(card: Dict) -> bool:
    """Every generator of the model of ``card`` was trained on left-right mirrored heads too
    (``learns_left_right_mirror``), so it may be shown a scan's mirror image at test time."""
    members = [{"input": card.get("input", {}), "training": m.get("training", {})} for m in card.get("members") or []]
    return all(learns_left_right_mirror(c) is True for c in [card] + members)


def card_slice_axes(card: Dict) -> List[int]:
    """Every array axis the model of ``card`` slices along, the primary first."""
    inp = card.get("input", {})
    return [int(inp.get("slice_axis", 0))] + [int(v["axis"]) for v in inp.get("extra_views") or []]


def member_mismatch(card: Dict, other: Dict) -> Optional[str]:
    """Why a model with card ``other`` cannot join the ensemble of ``card`` (None when it can): members must
    see the same input (grid, normalisation; the slicing axes may differ: ``member_slice_axes``), predict the
    same classes and sample the same way."""
    def normalisation(c: Dict) -> Dict:
        return {k: v for k, v in c.get("normalisation", {}).items() if k != "note"}

    def names(c: Dict) -> List[str]:
        return [k["name"] for k in c.get("classes", [])]

    def inputs(c: Dict) -> Dict:
        return {k: v for k, v in c.get("input", {}).items() if k not in MEMBER_FREE_INPUT_KEYS}

    for part, get in (("network", lambda c: c.get("network")), ("input", inputs),
                      ("normalisation", normalisation), ("classes", names),
                      ("schedule", lambda c: (c.get("schedule"), c.get("train_num_steps"))),
                      ("use of the latent z", uses_latent)):
        if get(card) != get(other):
            if part == "classes":  # the one a user most often meets (a run names its classes after the data)
                return (f"its classes differ ({', '.join(names(other))} against the model's "
                        f"{', '.join(names(card))}): give the member's model.json the model's class names if "
                        "they mean the same labels")
            return f"its {part} differs"
    return None


def member_slice_axes(card: Dict, other: Dict) -> Optional[List[int]]:
    """The axes a member with card ``other`` slices along, where they differ from the model's (else None):
    what its entry in ``card["members"]`` must record."""
    axes = card_slice_axes(other)
    return None if axes == card_slice_axes(card) else axes


def learns_left_right_mirror(card: Dict) -> Optional[bool]:
    """Whether the generator of ``card`` was trained on left-right mirrored heads too (None where its card cannot
    say: no training config, or a grid with no left-right axis). On the model grid the left-right axis is array
    axis 2 - (position of R or L in the orientation code). Slicing across it, only ``flip_across_slices`` (reversed
    context slices) mirrors; slicing along another axis, an in-plane ``flip_axis`` that is the left-right axis.
    A generator without it learns the side most training crops come from (session 13's sagittal member)."""
    config = card.get("training", {}).get("config")
    left_right = lr_array_axis(str(card.get("input", {}).get("orientation", "")))
    if not isinstance(config, dict) or left_right is None:
        return None
    return left_right in mirrored_volume_axes(config.get("augmentation"), int(config.get("slice_axis", 0)))


def read_card(directory: Path) -> Dict:
    card_path = directory / CARD_NAME
    if not card_path.exists():
        raise CDALError(f"{directory}: not a cDAL model folder ({CARD_NAME} missing): "
                        "point to the folder that holds model.json and model.safetensors")
    try:
        card = json.loads(card_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CDALError(f"{card_path}: is corrupt ({exc.__class__.__name__}): re-download or re-export the model")
    if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
        raise CDALError(f"{card_path}: is not a cDAL model card (format is not '{MODEL_FORMAT}')")
    version = card.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise CDALError(f"{card_path}: model format version {version} is not supported by cdal_core {__version__} "
                        f"(needs {MODEL_FORMAT_VERSION}): update CDALSegmentation or use a matching model")
    return card


def load_model(name_or_path: os.PathLike, device: str = "cpu", with_discriminator: bool = True) -> LoadedModel:
    """Load a model folder or named model; every failure is a one-line CDALError saying how to fix it."""
    directory = resolve_model(name_or_path)
    card = read_card(directory)
    try:
        config = NetworkConfig.from_dict(card["network"])
        for key in ("classes", "input"):
            card[key]  # noqa: B018 - presence check
        if not isinstance(card["input"], dict):
            raise ValueError(f"input is {type(card['input']).__name__}, expected an object")
        for key in ("num_steps", "train_num_steps", "samples"):
            if key in card and type(card[key]) is not int:
                raise ValueError(f"{key} is {card[key]!r}, expected a whole number")
    except (KeyError, TypeError, ValueError) as exc:
        raise CDALError(f"{directory / CARD_NAME}: incomplete or incompatible model card ({exc}): "
                        "re-export the model with this version of cdal")
    _check_classes(directory / CARD_NAME, card, config)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise CDALError(f"{directory}: {WEIGHTS_NAME} is missing: the model folder is incomplete")
    tensors = _read_weights(weights)
    generator = _load_generator(tensors, weights, config)
    discriminator = None
    if with_discriminator and any(k.startswith("discriminator.") for k in tensors):
        discriminator = Discriminator(config)
        _load_part(discriminator, tensors, "discriminator", weights)
    members = [_load_member(directory, entry, config) for entry in card.get("members", [])]
    if discriminator is not None:  # channels-last like the generators: contiguous, its pooling was 3-5x slower
        discriminator = discriminator.eval().to(memory_format=torch.channels_last)
    model = LoadedModel(directory, card, config, generator, discriminator, members)
    return model.to(torch.device(device))


def _check_classes(card_path: Path, card: Dict, config: NetworkConfig) -> None:
    """The card must name every class the network outputs: an unnamed label would be written to the label map
    but left out of the report and the volume table."""
    classes = card["classes"]
    if isinstance(classes, list) and not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                             and type(c.get("index")) is int for c in classes):
        raise CDALError(f"{card_path}: its classes must each be an entry like {{\"index\": 1, \"name\": "
                        "\"Lungs\"}} (background first): fix the card, or use the model.json that came with these "
                        "weights")
    if not isinstance(classes, list) or len(classes) != config.num_classes:
        count = len(classes) if isinstance(classes, list) else "no"
        raise CDALError(f"{card_path}: lists {count} classes but its network outputs {config.num_classes} "
                        "(network.num_classes): give the card one class entry per network output (background "
                        "first), or use the model.json that came with these weights")


def _read_weights(weights: Path) -> Dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CDALError(f"{weights}: is corrupt or truncated ({str(exc)[:80]}): re-download or re-train the model")
    # NaN/inf weights run without error but segment nothing (every label 0): refuse them at load
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CDALError(f"{weights}: weights contain NaN/inf ({name}): the file is damaged; re-download or "
                            "re-train the model")
    return tensors


def _load_member(directory: Path, entry: Dict, config: NetworkConfig) -> Generator:
    name = entry.get("weights") if isinstance(entry, dict) else None
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise CDALError(f"{directory / CARD_NAME}: ensemble member entry {entry!r} must name a .safetensors file "
                        "in the model folder: re-export the model")
    axes = entry.get("slice_axes")
    valid = isinstance(axes, list) and axes and all(type(a) is int and 0 <= a <= 2 for a in axes)
    if axes is not None and not valid:
        raise CDALError(f"{directory / CARD_NAME}: ensemble member {name} has slice_axes {axes!r}; it must list "
                        "array axes 0, 1 or 2: re-export the model")
    weights = directory / name
    if not weights.exists():
        raise CDALError(f"{directory}: ensemble member {name} is missing: the model folder is incomplete, "
                        "copy the whole folder")
    return _load_generator(_read_weights(weights), weights, config)


def _load_generator(tensors: Dict[str, torch.Tensor], source: Path, config: NetworkConfig) -> Generator:
    generator = Generator(config)
    _load_part(generator, tensors, "generator", source)
    # channels-last convolutions run ~20 % faster on CPU (oneDNN) and on GPU; the sampler follows the weights
    return generator.eval().to(memory_format=torch.channels_last)


def _load_part(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0][:120]
        raise CDALError(f"{source}: weights do not match the network in model.json ({detail}): "
                        "the files come from different models or versions")
