"""2D images (PNG, JPEG, TIFF; grey X-rays, RGB histology): ``cdal predict`` and ``cdal evaluate``.

One image goes: read ``(H, W[, ch])`` -> check channels and intensities -> resize to the card's
``input.image_size`` (area averaging, as training did) -> min-max to [0, 1] -> overlapping ``input.train_size``
windows (MONAI's sliding-window inference, gaussian blending), each sampled by ``sampler.sample`` (T steps, K
samples) -> mean probabilities, variance and discriminator attention at ``image_size`` -> bilinear back to
``(H, W)`` -> labels = argmax. A model trained on whole images (``image_size`` = ``train_size``) sees one window.

Outputs per input ``<stem>``, all ``(H, W)`` like the input, written together as one set:
``_seg.png`` (uint8 labels; 0/255 for a binary model), ``_uncertainty.png`` / ``_attention.png`` (colour heat
maps) and ``_uncertainty.tif`` / ``_attention.tif`` (float32 values).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .data import PNG_SUFFIXES, VOLUME_SUFFIXES, _resize2d, check_intensities, read_image, read_png_pairs, stem_of
from .errors import CDALError
from .model_io import LoadedModel

WINDOW_OVERLAP = 0.5      # fraction of a window shared with its neighbour (MoNuSeg 512 / 256: 3 x 3 windows)
WINDOW_BATCH = 4          # windows sampled together (x K samples each)
OUTPUT_FILES = ("seg.png", "uncertainty.png", "uncertainty.tif", "attention.png", "attention.tif")


@dataclass
class ImageResult:
    """One image's outputs on the input's pixel grid."""

    labels: np.ndarray               # (H, W) uint8 class indices
    probabilities: np.ndarray        # (C, H, W) float32 mean class probabilities over the K samples
    uncertainty: np.ndarray          # (H, W) float32 variance across samples, summed over classes
    attention: Optional[np.ndarray]  # (H, W) float32 in [0, 1], or None
    seconds: float = 0.0


# -- inputs ------------------------------------------------------------------------------------------------

def model_sizes(model: LoadedModel) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(image_size, window size) from the card: images are resized to the first, windows are the second."""
    inp = model.card["input"]
    if "image_size" not in inp:
        raise CDALError(f"model '{model.card.get('name', model.path)}' was trained on 3D volumes, not on 2D images "
                        "(its card has no input.image_size): use a 2D model such as cxr, or train one with "
                        "cdal train --data <folder with images/ and masks/>")
    window = tuple(int(v) for v in inp["train_size"])
    image = tuple(int(v) for v in inp.get("image_size") or window)
    return image, window


def read_image_2d(path: Path, image_channels: int) -> np.ndarray:
    """A 2D image file -> ``(image_channels, H, W)`` float32 raw intensities; refuses what the model cannot read.

    A grey image stored as RGB (three equal channels) counts as grey; an alpha channel is dropped."""
    return image_array_2d(read_image(path), image_channels, str(path))


#: an image is resized to the model's working size (e.g. 128 x 128): a strip or a thumbnail would be invented
MIN_IMAGE_SIDE = 16


def image_array_2d(image: sitk.Image, image_channels: int, name: str) -> np.ndarray:
    """A 2D SimpleITK image, or a 3D one of a single slice (how 3D Slicer holds a PNG/TIFF) -> ``(image_channels,
    H, W)`` float32, with ``read_image_2d``'s rules; ``name`` starts its messages."""
    size = image.GetSize()
    if image.GetDimension() == 3 and size[2] == 1:
        image = image[:, :, 0]
    if image.GetDimension() != 2:
        raise CDALError(f"{name}: has {image.GetDimension()} dimensions (size {size}), expected one 2D image: "
                        "save a single page/frame, or give 3D volumes as .nii.gz/.nrrd/.mha")
    width, height = image.GetSize()[:2]
    if min(width, height) < MIN_IMAGE_SIDE:
        raise CDALError(f"{name}: is {width} x {height} pixels, too small to segment (each side needs at least "
                        f"{MIN_IMAGE_SIDE} pixels): give the whole image, not a strip or a thumbnail")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array = array[..., None] if array.ndim == 2 else array               # (H, W, ch)
    channels = array.shape[-1]
    colour = channels >= 3 and not (np.array_equal(array[..., 0], array[..., 1])
                                    and np.array_equal(array[..., 0], array[..., 2]))
    if image_channels == 1:
        if colour:
            raise CDALError(f"{name}: is an RGB colour image but the model expects greyscale (1 channel): "
                            "convert it to greyscale first, or use a model trained on RGB images (e.g. monuseg)")
        array = array[..., :1]
    elif image_channels == 3:
        if channels < 3:
            raise CDALError(f"{name}: is a greyscale image but the model expects RGB (3 channels): "
                            "give the colour image, or use a model trained on grey images (e.g. cxr)")
        array = array[..., :3]
    else:
        raise CDALError(f"the model expects {image_channels} channels per pixel: 2D images have 1 (grey) or 3 (RGB)")
    check_intensities(array, name)
    return np.ascontiguousarray(np.moveaxis(array, -1, 0))


def read_mask_2d(path: Path, shape: Tuple[int, int], num_classes: int) -> np.ndarray:
    """A mask file -> ``(H, W)`` int64 class indices. Binary models take 0/255 or 0/1; others 0..C-1."""
    image = read_image(path)
    mask = sitk.GetArrayFromImage(image)
    if mask.ndim == 3 and image.GetNumberOfComponentsPerPixel() > 1:
        if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, min(mask.shape[-1], 3))):
            raise CDALError(f"{path}: is a colour mask: save masks as single-channel label images (0/255)")
        mask = mask[..., 0]
    if mask.shape != tuple(shape):
        raise CDALError(f"{path}: mask size {mask.shape[::-1]} differs from its image's {tuple(shape)[::-1]} "
                        "(width x height): the pair does not match")
    values = np.unique(mask)
    if num_classes == 2:
        if set(values.tolist()) <= {0, 255}:
            return (mask == 255).astype(np.int64)
        if set(values.tolist()) <= {0, 1}:
            return mask.astype(np.int64)
        raise CDALError(f"{path}: has mask values {_few(values)}: a binary mask must hold 0/255 or 0/1 only "
                        "(save it losslessly as PNG, not JPEG, and threshold it)")
    if not set(values.tolist()) <= set(range(num_classes)):
        raise CDALError(f"{path}: has mask values {_few(values)} but the model has classes 0..{num_classes - 1}: "
                        "remap the labels")
    return mask.astype(np.int64)


def _few(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:6].tolist())
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"


def prepare_image(array: np.ndarray, size: Tuple[int, int], context_slices: int = 0) -> np.ndarray:
    """``(ch, H, W)`` raw -> ``(ch * (2c+1), h, w)`` in [0, 1] at ``size``, as ``data.load_png_case`` trains:
    area resize, then min-max over the whole image. A single image repeats as its own context slices."""
    resized = _resize2d(np.moveaxis(array, 0, -1), size, linear=True)    # (h, w, ch)
    resized = (resized - resized.min()) / max(float(resized.max() - resized.min()), 1e-6)
    image = np.moveaxis(resized, -1, 0).astype(np.float32)
    return np.tile(image, (2 * context_slices + 1, 1, 1))


def list_images(path: Path) -> List[Path]:
    """A 2D image file, a folder of them, or a folder with images/ -> the image files, sorted, then any 3D
    volumes in that folder (``predict_images`` refuses each by name rather than skipping it unseen). Dot-files
    (macOS ``._x.png`` resource forks) are not images."""
    if not path.exists():
        raise CDALError(f"{path}: not found: check the --input path")
    if path.is_file():
        return [path]
    folder = path / "images" if (path / "images").is_dir() else path
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.name.lower().endswith(PNG_SUFFIXES)]
    if not images:
        raise CDALError(f"{folder}: holds no .png/.jpg/.tif images")
    return images + [p for p in files if is_volume(p)]


def is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def refuse_3d_model(model: LoadedModel, inputs: Sequence[Path]) -> None:
    """A 3D model cannot segment images; in a folder that mixes both, name what would be refused."""
    if model.is_2d:
        return
    volumes = [p.name for p in inputs if is_volume(p)]
    if not volumes:
        model_sizes(model)  # raises its one-line refusal
    images = [p.name for p in inputs if not is_volume(p)]
    raise CDALError(f"{inputs[0].parent}: holds 2D images ({_names(images)}) beside 3D volumes ({_names(volumes)}), "
                    f"and {model.title} was trained on 3D volumes, not on 2D images: nothing was segmented; put the "
                    "volumes in a folder of their own and give that folder")


def _names(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# -- segmentation ------------------------------------------------------------------------------------------

# Test-time symmetries of images with no preferred orientation (tissue): (flip W, flip H, transpose), identity first
DIHEDRAL = [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
            (True, True, False), (True, False, True), (False, True, True), (True, True, True)]


def _to_view(image: torch.Tensor, view) -> torch.Tensor:
    flip_w, flip_h, transpose = view
    image = image.transpose(-1, -2) if transpose else image
    image = image.flip(-2) if flip_h else image
    return image.flip(-1) if flip_w else image


def _from_view(maps: Optional[np.ndarray], view) -> Optional[np.ndarray]:
    """Undo ``_to_view`` on ``(..., h, w)`` numpy maps."""
    if maps is None:
        return None
    flip_w, flip_h, transpose = view
    maps = maps[..., ::-1] if flip_w else maps
    maps = maps[..., ::-1, :] if flip_h else maps
    return np.ascontiguousarray(np.swapaxes(maps, -1, -2) if transpose else maps)


def sample_plan(samples: int, num_generators: int, symmetries: int) -> List[Tuple[int, int, int]]:
    """How K samples are spread: ``(generator index, symmetry index, count)``. Generators take contiguous shares
    (as in 3D); sample i takes symmetry i mod S, counted across the generators, so K = 5 with 8 symmetries sees 5
    of them at the cost of 5 samples, one generator or several."""
    from .inference import split_evenly
    plan, first = [], 0
    for g, k in enumerate(split_evenly(samples, num_generators)):
        counts = [0] * symmetries
        for i in range(first, first + k):
            counts[i % symmetries] += 1
        plan += [(g, s, n) for s, n in enumerate(counts) if n]
        first += k
    return plan


def segment_image_2d(array: np.ndarray, model: LoadedModel, steps: Optional[int] = None, samples: int = 5,
                     seed: Optional[int] = 0, device: str = "cpu", precision: str = "auto",
                     early_exit: bool = True, with_attention: bool = True,
                     symmetries: Optional[bool] = None,
                     output_size: Optional[Tuple[int, int]] = None,
                     step_pooling: Optional[str] = None,
                     progress: Optional[Callable[[float], None]] = None) -> ImageResult:
    """``(ch, H, W)`` raw image -> labels, probabilities, uncertainty and attention at ``(H, W)`` (or at
    ``output_size``: the card's ``image_size`` gives the maps at the model's working resolution).

    The K samples are spread over the generators of an ensemble and pooled (``inference.pool_views``).
    ``symmetries`` (default: the card's ``input.test_time_symmetries``, for images with no preferred orientation
    such as tissue) also spreads them over flips and transposes of the image, mapped back before pooling: the same
    cost, and the uncertainty then includes disagreement between orientations. ``step_pooling``: see
    ``inference.segment_image``. ``progress(fraction of samples done)`` is called after each generator and
    orientation (a whole MoNuSeg tile takes tens of seconds on a laptop CPU)."""
    from .inference import (EARLY_EXIT, MAX_STEPS, _scale_attention, adapted_threads, pool_views, resolve_device,
                            resolve_precision, step_weights_for)
    start = time.perf_counter()
    if samples < 1:
        raise CDALError(f"samples must be >= 1, got {samples}")
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise CDALError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    step_weights = step_weights_for(model, steps, step_pooling)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model.to(dev)
    image_size, window = model_sizes(model)
    height, width = output_size or array.shape[-2:]
    image = torch.from_numpy(prepare_image(array, image_size, model.config.context_slices))[None]
    image = image.mul_(2).sub_(1).to(dev)                                 # (1, in_ch, h, w) in [-1, 1]
    schedule = model.schedule(steps)
    rng = torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**31))
    if symmetries is None:
        symmetries = bool(model.card.get("input", {}).get("test_time_symmetries", False))
    orientations = DIHEDRAL if symmetries else DIHEDRAL[:1]
    views = []
    with adapted_threads(dev), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for g, o, k in sample_plan(samples, len(model.generators), len(orientations)):
            maps = _sliding_window(_to_view(image, orientations[o]), model, model.generators[g], schedule, k, rng,
                                   window, with_attention, EARLY_EXIT if early_exit else None, step_weights)
            views.append((k, tuple(_from_view(m, orientations[o]) for m in maps)))
            if progress is not None:
                progress(sum(n for n, _ in views) / samples)
    probs, variance, attention = pool_views(views)
    # back to the input's pixels: interpolate the probabilities, then argmax
    probs = _resize_maps(probs, (height, width))
    variance = _resize_maps(variance[None], (height, width))[0]
    if attention is not None:
        attention = _scale_attention(_resize_maps(attention[None], (height, width))[0])
    return ImageResult(probs.argmax(axis=0).astype(np.uint8), probs, variance, attention,
                       time.perf_counter() - start)


def _sliding_window(image: torch.Tensor, model: LoadedModel, generator, schedule, samples: int,
                    rng: torch.Generator, window: Tuple[int, int], with_attention: bool,
                    early_exit: Optional[float], step_weights: Optional[Sequence[float]] = None):
    """(1, in_ch, h, w) in [-1, 1] -> mean probabilities (C, h, w), variance (h, w), attention (h, w) or None,
    numpy float32, from overlapping ``window`` patches blended with gaussian weights."""
    from monai.inferers import sliding_window_inference
    from .sampler import sample
    disc = model.discriminator if with_attention else None

    def predictor(patches: torch.Tensor):  # (B, in_ch, wh, ww) -> (B, C, ...), (B, 1, ...)[, (B, 1, ...)]
        out = sample(generator, patches, schedule, samples, rng, disc, use_latent=model.uses_latent,
                     early_exit=early_exit, step_weights=step_weights)
        maps = (out.probabilities.float(), out.variance.float()[:, None])
        return maps + ((out.attention.float()[:, None],) if out.attention is not None else ())

    with torch.inference_mode():
        outs = sliding_window_inference(image, list(window), WINDOW_BATCH, predictor, overlap=WINDOW_OVERLAP,
                                        mode="gaussian", padding_mode="constant", cval=-1.0)
    outs = [torch.as_tensor(o)[0].float().cpu().numpy() for o in outs]
    return outs[0], outs[1][0], (outs[2][0] if len(outs) > 2 else None)


def _resize_maps(maps: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(N, h, w) float maps -> (N, H, W), bilinear."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.astype(np.float32)
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps, np.float32))[None], size=tuple(size),
                      mode="bilinear", align_corners=False)
    return t[0].numpy()


# -- outputs -----------------------------------------------------------------------------------------------

# Five evenly spaced colours of matplotlib's perceptually uniform maps (matplotlib is not a dependency)
COLORMAPS = {"inferno": [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
             "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]}


def heat_map(values: np.ndarray, vmax: float, colormap: str) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 colours of ``sqrt(values / vmax)`` (the square root shows small values)."""
    scaled = np.sqrt(np.clip(values / max(vmax, 1e-12), 0.0, 1.0))
    anchors = np.asarray(COLORMAPS[colormap], np.float64)
    stops = np.linspace(0.0, 1.0, len(anchors))
    rgb = [np.interp(scaled, stops, anchors[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def output_paths(out_dir: Path, stem: str) -> Dict[str, Path]:
    return {name: out_dir / f"{stem}_{name}" for name in OUTPUT_FILES}


def write_outputs(result: ImageResult, paths: Dict[str, Path], num_classes: int,
                  with_attention: bool = True) -> List[Path]:
    """Label PNG (0/255 when binary, else class indices), heat-map PNGs and float32 TIFFs, written as one set
    (``cli.write_outputs_together``): an interrupt leaves none of them, so a re-run never meets a lone label.
    ``with_attention=False`` leaves out the two attention files. Returns the paths written."""
    from .cli import write_outputs_together
    labels = result.labels * np.uint8(255) if num_classes == 2 else result.labels
    images = {"seg.png": sitk.GetImageFromArray(labels.astype(np.uint8)),
              # largest possible summed variance of C class probabilities: 1 - 1/C
              "uncertainty.png": sitk.GetImageFromArray(heat_map(result.uncertainty, 1 - 1 / num_classes,
                                                                 "inferno"), isVector=True),
              "uncertainty.tif": sitk.GetImageFromArray(result.uncertainty.astype(np.float32))}
    if with_attention:
        attention = result.attention if result.attention is not None else np.zeros_like(result.uncertainty)
        images["attention.png"] = sitk.GetImageFromArray(heat_map(attention, 1.0, "viridis"), isVector=True)
        images["attention.tif"] = sitk.GetImageFromArray(attention.astype(np.float32))
    write_outputs_together([(image, paths[name]) for name, image in images.items()], {})
    return [paths[name] for name in images]


# -- commands ----------------------------------------------------------------------------------------------

def predict_images(args) -> int:
    """``cdal predict`` for 2D images: writes the five outputs of every input (three with ``--no-attention``) into
    ``--output`` (a folder a few images at a time on the CPU, see ``cli.run_each``)."""
    from .cli import (drop_stale, ensure_writable_folder, keep_outputs_apart, run_each, step_pooling_choice,
                      symmetries_choice)
    from .inference import check_takes_volumes, resolve_device
    from .model_io import load_model
    ignored = [flag for flag, used in (("--roi", args.roi), ("--localise", args.localise != "auto"),
                                       ("--allow-thick-slices", args.allow_thick_slices)) if used]
    if ignored:
        raise CDALError(f"{', '.join(ignored)}: only for 3D volumes; a 2D image is segmented whole: crop the image "
                        "itself to segment part of it, and leave these options out")
    inputs = list_images(Path(args.input))
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise CDALError(f"{out_dir}: exists and is not a folder: choose another --output")
    planned = {p: output_paths(out_dir, stem_of(p)) for p in inputs if not is_volume(p)}
    stems = [stem_of(p) for p in planned]
    if len(set(stems)) != len(stems):  # e.g. a.png and a.jpg: the second would replace the first's outputs
        twice = sorted({s for s in stems if stems.count(s) > 1})[0]
        raise CDALError(f"two inputs would both write {twice}_seg.png: rename one, or run them separately")
    outputs = [f for files in planned.values() for f in files.values()]
    keep_outputs_apart(Path(args.input), out_dir, inputs, outputs)
    existing = [str(f) for f in outputs if f.exists()]
    if existing and not args.overwrite:
        raise CDALError(f"{existing[0]} already exists ({len(existing)} outputs would be replaced): "
                        "pass --overwrite or choose another --output")
    device = resolve_device(args.device)
    model = load_model(args.model, device=str(device))
    refuse_3d_model(model, inputs)  # before any output folder appears
    ensure_writable_folder(out_dir, "--output")

    def one(path: Path, progress_bar: bool) -> str:
        if is_volume(path):
            check_takes_volumes(model, str(path))  # a 2D model: refused by name, the images go on
        array = read_image_2d(path, model.config.image_channels)
        result = segment_image_2d(array, model, steps=args.steps, samples=args.samples, seed=args.seed,
                                  device=str(device), precision=args.precision, early_exit=not args.full_sampling,
                                  symmetries=symmetries_choice(args), step_pooling=step_pooling_choice(args),
                                  with_attention=not args.no_attention)
        files = planned[path]
        written = write_outputs(result, files, model.config.num_classes, with_attention=not args.no_attention)
        stale = drop_stale(files.values(), written)
        removed = f" ({', '.join(stale)} of an earlier run removed)" if stale else ""
        return f"{path.name}: {', '.join(f.name for f in written)} in {result.seconds:.2f} s{removed}"

    run_each(inputs, one, device, item_name=lambda path: path.name)
    return 0


def evaluate_images(args) -> int:
    """``cdal evaluate`` for an images/ + masks/ folder: per-class Dice, IoU, precision, recall, HD95 (pixels)
    per image, then mean and std over images, plus uncertainty quality; ``--json`` writes the report."""
    from .data import read_case_list, select_cases
    from .inference import resolve_device
    from .model_io import load_model
    root = Path(args.data)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise CDALError(f"{root}: a 2D evaluation folder needs images/ and masks/ with matching file names")
    cases = read_png_pairs(root)
    if args.cases:
        cases = select_cases(cases, read_case_list(args.cases), args.cases, args.data)
    from .cli import keep_report_apart
    keep_report_apart(args.json, root, cases, args.cases)
    device = resolve_device(args.device)
    model = load_model(args.model, device=str(device))
    model_sizes(model)
    from .cli import finish_evaluation, step_pooling_choice, symmetries_choice
    report = evaluate_pairs(model, cases, steps=args.steps, samples=args.samples, seed=args.seed,
                            device=str(device), precision=args.precision, early_exit=not args.full_sampling,
                            symmetries=symmetries_choice(args), parallel=True,
                            step_pooling=step_pooling_choice(args))
    return finish_evaluation(report, model, args, format_table_2d)


def evaluate_pairs(model: LoadedModel, cases: Sequence, steps: Optional[int] = None, samples: int = 5,
                   seed: Optional[int] = 0, device: str = "cpu", precision: str = "auto",
                   early_exit: bool = True, symmetries: Optional[bool] = None, parallel: bool = False,
                   step_pooling: Optional[str] = None) -> Dict:
    """Segment each case's image and compare with its mask at the input's pixels (``symmetries``,
    ``step_pooling``: see ``segment_image_2d``; ``parallel``: several images at once on the CPU, as
    ``evaluation.evaluate_cases``).

    Returns ``{"per_class": {name: {dice, iou, precision, recall, hd95 (pixels), *_std}}, "uncertainty":
    {"auroc", "ece", "spearman_image"}, "images": N, "seconds_per_image": s, "per_image": [...]}`` (plus
    ``volumes`` / ``seconds_per_volume`` aliases, the keys the 3D tools read); metrics are fractions.
    ``spearman_image``: rank correlation over images of mean uncertainty with error rate."""
    from .inference import parallel_map, resolve_device, resolve_precision, step_weights_for
    from .metrics import (error_auroc, expected_calibration_error, nanmean, segmentation_metrics,
                          spearman_correlation, summarise)
    names = model.class_names
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    step_weights_for(model, steps, step_pooling)  # a bad name refused before any work
    start = time.perf_counter()

    def one(i: int) -> Dict:
        case = cases[i]
        array = read_image_2d(case.image, model.config.image_channels)
        truth = read_mask_2d(case.label, array.shape[-2:], len(names))
        result = segment_image_2d(array, model, steps=steps, samples=samples,
                                  seed=None if seed is None else seed + i, device=device, precision=precision,
                                  early_exit=early_exit, with_attention=False, symmetries=symmetries,
                                  step_pooling=step_pooling)
        pred = result.labels.astype(np.int64)
        error = pred != truth
        m = segmentation_metrics(pred, truth, len(names), (1.0, 1.0))
        empty = [] if truth.any() else [f"{case.label}: marks nothing (every pixel is background), so this image's "
                                        "Dice is 0 or undefined and not meaningful: check the mask or leave the "
                                        "image out"]  # as the 3D path says of an empty label map
        return {"metrics": m, "auroc": error_auroc(result.uncertainty, error), "warnings": empty,
                "ece": expected_calibration_error(result.probabilities.max(axis=0), ~error),
                "mean_uncertainty": float(result.uncertainty.mean()), "error_rate": float(error.mean()),
                "row": {"case": case.name, "seconds": round(result.seconds, 3),
                        **{f"{names[c]}_dice": m[c]["dice"] for c in m}, **{f"{names[c]}_iou": m[c]["iou"] for c in m}}}

    with parallel_map(len(cases) if parallel else 1, dev) as (workers, mapped):
        done = list(mapped(one, range(len(cases))))
    per_image, rows = [d["metrics"] for d in done], [d["row"] for d in done]
    aurocs, eces = [d["auroc"] for d in done], [d["ece"] for d in done]
    mean_unc, error_rate = [d["mean_uncertainty"] for d in done], [d["error_rate"] for d in done]
    seconds = [r["seconds"] for r in rows]
    per_second = float(np.mean(seconds)) if seconds else float("nan")
    image_size, window = model_sizes(model)
    return {"per_class": summarise(per_image, names),
            "uncertainty": {"auroc": nanmean(aurocs), "ece": nanmean(eces),
                            "spearman_image": spearman_correlation(np.array(mean_unc), np.array(error_rate))},
            "images": len(cases), "seconds_per_image": per_second, "per_image": rows,
            "volumes": len(cases), "seconds_per_volume": per_second,
            "image_size": list(image_size), "window": list(window), "hd95_unit": "pixels",
            "precision": str(dtype).replace("torch.", ""), "early_exit": bool(early_exit),
            "symmetries": bool(model.card.get("input", {}).get("test_time_symmetries", False)
                               if symmetries is None else symmetries),
            "step_pooling": step_pooling or model.step_pooling,
            **({"warnings": [w for d in done for w in d["warnings"]]} if any(d["warnings"] for d in done) else {}),
            **({"images_at_once": workers, "volumes_at_once": workers,  # the alias the shared table reads
                "wall_seconds": round(time.perf_counter() - start, 2)} if workers > 1 else {})}


def format_table_2d(report: Dict) -> str:
    """The 3D table (``evaluation.format_table``) worded for images, with the 2D uncertainty metrics."""
    from .evaluation import format_table
    table = format_table({k: v for k, v in report.items() if k != "uncertainty"})
    table = table.replace(" volumes, ", " images, ").replace("per volume", "per image")
    table = table.replace("   hd95", "hd95 px", 1)   # same width: HD95 of 2D images is in pixels
    u = report["uncertainty"]
    return table + (f"\nuncertainty: pixel AUROC {u['auroc']:.3f}, ECE {u['ece']:.4f}, "
                    f"image Spearman {u['spearman_image']:.3f}")
