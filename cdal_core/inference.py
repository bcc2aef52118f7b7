"""Whole-volume inference: any 3D image -> model grid -> slices -> batched sampling -> outputs on the input grid.

Outputs keep the input's exact size, spacing, origin and direction: labels (UInt8), uncertainty (Float32,
variance across samples) and attention (Float32 in [0, 1], the discriminator's |feature mean| scaled by its
99th percentile over the volume).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .data import check_volume, pad_to, round_up, slice_stack
from .errors import CDALError
from .geometry import GridMapping
from .inputs import check_real_valued, source_name
from .model_io import LoadedModel, trained_mirrored
from .sampler import sample

ProgressFn = Callable[[float, str], None]


@dataclass
class VolumeResult:
    labels: sitk.Image
    uncertainty: sitk.Image
    attention: Optional[sitk.Image]
    probabilities: np.ndarray            # (C, Z, Y, X) on the input grid (SimpleITK array order)
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present else CPU; 'cuda' without a GPU is an error with the fix."""
    device = (device or "auto").lower()
    if device in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") or device == "gpu":
        if not torch.cuda.is_available():
            raise CDALError("--device cuda was requested but no CUDA GPU is available: use --device cpu "
                            "(or install a CUDA build of torch on a machine with an NVIDIA GPU)")
        return torch.device("cuda" if device == "gpu" else device)
    if device == "cpu":
        return torch.device("cpu")
    raise CDALError(f"unknown device '{device}': use auto, cpu or cuda")


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    AMX: 1.6x faster at the same Dice and uncertainty, see docs/RESULTS.md), else float32."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise CDALError(f"unknown precision '{precision}': use auto, fp32 or bf16")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: no probe, stay with float32
        return False


def _running_elsewhere() -> int:
    """Threads of other processes running or runnable right now: the kernel's count of runnable tasks
    (/proc/loadavg) less this process's own running threads. 0 where /proc is absent."""
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:
                continue
        return max(0, runnable - max(own, 1))
    except (OSError, ValueError, IndexError):
        return 0


def cpu_threads(cores: Optional[int] = None) -> int:
    """Threads for the next CPU run: the cores left free by other processes (at least 1). torch's OpenMP
    threads spin at every barrier, so a thread that shares its core with another busy process stalls all the
    others: on a 2-core AMD EPYC with one other busy process, 2 threads took 12-15 s per hippocampus volume
    where 1 thread took 4.6 s (docs/RESULTS.md, "Performance on CPUs without bf16"). ``CDAL_THREADS`` (or
    ``OMP_NUM_THREADS``) in the environment fixes the count instead."""
    fixed = os.environ.get("CDAL_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if fixed:
        try:
            return max(1, int(fixed))
        except ValueError:
            pass
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, cores - _busy_cores()))


LOOK_INTERVAL_S = 0.001


def _busy_cores() -> int:
    """The median of three looks at ``_running_elsewhere``, a millisecond apart: back-to-back looks all caught
    the same passing kernel thread, which halved a 2-core run in about 2 % of the calls on an idle machine
    (0.1 % with the looks apart); a process that keeps a core busy is seen by every look."""
    looks = []
    for i in range(3):
        if i:
            time.sleep(LOOK_INTERVAL_S)
        looks.append(_running_elsewhere())
    return sorted(looks)[1]


# False: leave torch's thread count as the caller set it (the benchmark's fixed-thread rows)
ADAPT_THREADS = True

MAX_STEPS = 16  # cDAL is a few-step sampler; benchmarks raise this to emulate 100-step diffusion
# A slice whose K first-step predictions put every pixel's foreground probability below this stops there
# (sampler.sample's early_exit): about 30 % of hippocampus slices, at unchanged Dice (docs/RESULTS.md).
EARLY_EXIT = 0.05


# Independent runs on the CPU (the volumes of a folder, the two sides of a whole brain, the images of a 2D
# folder) go a few at a time, each on its own thread(s): a network this small scales poorly over intra-op
# threads (2 threads on one volume: 1.66 s per hippocampus crop; 2 volumes at once on 1 thread each: 1.33 s,
# same labels; AMD EPYC AVX2, docs/RESULTS.md). At most this many at once (``CDAL_PARALLEL_VOLUMES`` in the
# environment changes it; 1 = one at a time), to bound memory on many-core machines with whole-brain scans.
MAX_PARALLEL_VOLUMES = 4


def _most_parallel() -> int:
    try:
        return max(1, int(os.environ.get("CDAL_PARALLEL_VOLUMES", MAX_PARALLEL_VOLUMES)))
    except ValueError:
        return MAX_PARALLEL_VOLUMES


@contextmanager
def parallel_runs(num_runs: int, device: torch.device) -> Iterator[int]:
    """How many of ``num_runs`` independent runs to do at once, with torch's (process-wide) thread count split
    between them while they run, and no per-call adaptation meanwhile (one run must not change the count under
    another); restored after. The free cores are looked at once (``cpu_threads``) and decide both. 1, and
    nothing changed, on a GPU, for a single run, or inside another parallel section."""
    global ADAPT_THREADS
    if device.type != "cpu" or num_runs < 2 or not ADAPT_THREADS:
        yield 1
        return
    threads = torch.get_num_threads()
    free = cpu_threads(threads)
    workers = max(1, min(_most_parallel(), num_runs, free))
    if workers == 1:
        yield 1
        return
    ADAPT_THREADS = False
    torch.set_num_threads(max(1, free // workers))
    try:
        yield workers
    finally:
        ADAPT_THREADS = True  # it was True to get here
        torch.set_num_threads(threads)


@contextmanager
def parallel_map(num_runs: int, device: torch.device) -> Iterator[Tuple[int, Callable]]:
    """``(workers, map)`` for ``num_runs`` independent runs (``parallel_runs``): the pool's ordered map when
    several run at once, the built-in ``map`` on the caller's own thread otherwise (a progress callback that
    touches a GUI then stays on its thread)."""
    with parallel_runs(num_runs, device) as workers:
        if workers == 1:
            yield 1, map
            return
        with ThreadPoolExecutor(workers) as pool:
            yield workers, pool.map


@contextmanager
def adapted_threads(device: torch.device):
    """torch's thread count set to ``cpu_threads`` for one CPU run and restored after it: the count is a
    process-wide setting, and a training run that validates through here must keep its own (resuming is
    bit-exact only when every step runs with the same number of threads)."""
    if device.type != "cpu" or not ADAPT_THREADS:
        yield
        return
    previous = torch.get_num_threads()  # the caller's budget (restored below, so never an adapted count)
    torch.set_num_threads(cpu_threads(previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def segment_image(image: sitk.Image, model: LoadedModel, steps: Optional[int] = None, samples: int = 5,
                  seed: Optional[int] = None, device: str = "cpu", batch_slices: Optional[int] = None,
                  with_attention: bool = True, progress: Optional[ProgressFn] = None,
                  precision: str = "auto", early_exit: bool = True,
                  mirror: Optional[bool] = None, name: Optional[str] = None,
                  step_pooling: Optional[str] = None) -> VolumeResult:
    """Segment one 3D volume. ``progress(fraction, message)`` may raise CancelledError to stop.

    ``precision``: the networks' arithmetic, 'auto' (bf16 where the hardware has it), 'fp32' or 'bf16';
    sampling statistics and outputs are float32 either way. ``early_exit``: slices that are surely
    background after the first step skip the others (``EARLY_EXIT``); False runs every step everywhere.
    ``mirror``: part of the samples see the scan's left-right mirror, mapped back (None: the card's
    ``input.test_time_mirror``); True needs a model trained on mirrored slices (``trained_mirrored``).
    ``name`` starts error messages (default: the file ``inputs.read_scan`` read the image from).
    ``step_pooling``: how each sample pools its steps' x0 predictions (``sampler.STEP_POOLING``; None: the card's
    ``sampling.step_pooling``)."""
    start = time.perf_counter()
    if samples < 1:
        raise CDALError(f"samples must be >= 1, got {samples}")
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise CDALError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    name = name or source_name(image)
    check_takes_volumes(model, name)
    check_real_valued(image, name)
    check_volume(image, model.config.image_channels, name=name)
    mirror_axis = mirror_axis_for(model, mirror)
    step_weights = step_weights_for(model, steps, step_pooling)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model.to(dev)
    norm = model.normalisation
    params = norm.fit(sitk.GetArrayViewFromImage(image))
    mapping = GridMapping(image, model.grid, fill=params.lo)  # outside the scan: its dark level, not 0
    check_grid_size(mapping, model, with_attention, name)
    array = norm.apply(mapping.model_array(), params)
    with adapted_threads(dev), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        probs, variance, attention = _segment_array(array, model, steps, samples, seed, dev, batch_slices,
                                                    with_attention, progress,
                                                    EARLY_EXIT if early_exit else None, mirror_axis, step_weights)
    # Back to the input grid: probabilities are interpolated, then the labels are their argmax.
    prob_in = np.stack([sitk.GetArrayFromImage(mapping.to_input(p)) for p in probs])
    if mapping.resampled:
        prob_in[0][prob_in.sum(axis=0) <= 1e-6] = 1.0  # outside the model grid: background
    labels = sitk.GetImageFromArray(prob_in.argmax(axis=0).astype(np.uint8))
    labels.CopyInformation(image)
    unc = mapping.to_input(variance.astype(np.float32))
    att = mapping.to_input(_scale_attention(attention)) if attention is not None else None
    return VolumeResult(labels, unc, att, prob_in.astype(np.float32), time.perf_counter() - start,
                        list(mapping.notes))


def step_weights_for(model: LoadedModel, steps: Optional[int], pooling: Optional[str]) -> Optional[List[float]]:
    """``sample``'s step weights for this model, ``steps`` and ``pooling`` (None: the card's); a name that is not a
    pooling is refused before any work."""
    try:
        return model.step_weights(steps, pooling)
    except ValueError as err:
        raise CDALError(f"{err}: name one of them in the model card's sampling.step_pooling, or pass "
                        "--step-pooling") from None


def check_takes_volumes(model: LoadedModel, name: str) -> None:
    """A 2D model run on a volume would segment its slices as if they were X-rays or tiles: refuse it."""
    if model.is_2d:
        raise CDALError(f"{name}: a 3D volume, but {model.title} is a 2D model (PNG/JPEG/TIFF images): give it 2D "
                        "images, or segment volumes with a 3D model such as hippocampus")


AXIS_NAMES = {"R": "left-right", "L": "left-right", "A": "front-back", "P": "front-back", "S": "up-down",
              "I": "up-down"}


def min_slice_size(model: LoadedModel, with_attention: bool = True) -> int:
    """Fewest model-grid voxels a slice needs along each of its axes: slices are padded to the generator's size
    multiple, and every discriminator block halves them (one voxel cannot be halved)."""
    cfg = model.config
    need = 2 ** len(cfg.disc_mults) if with_attention and model.discriminator is not None else 1
    return max(1, need - cfg.size_multiple + 1)


def check_grid_size(mapping: GridMapping, model: LoadedModel, with_attention: bool, name: str) -> None:
    """Refuse a scan too small on the model grid (tiny, or its header's voxels far too small) before the
    networks fail on it."""
    least = min_slice_size(model, with_attention)
    size, spacing = mapping.model_image.GetSize(), mapping.model_image.GetSpacing()  # (x, y, z)
    in_plane = {2 - a for _, slicing in model.runs for a in range(3) if a != slicing}  # array axis -> ITK axis
    short = sorted(i for i in in_plane if size[i] < least)
    if not short:
        return
    code = str(mapping.grid.orientation).upper()
    axes = " and ".join(AXIS_NAMES.get(code[i:i + 1], f"array {2 - i}") for i in short)
    extent = " x ".join(f"{n * d:.3g}" for n, d in zip(size, spacing))
    raise CDALError(f"{name}: too small for this model: on its {_fmt(spacing)} mm grid the scan spans {extent} mm "
                    f"({_fmt(size)} voxels), but the model needs at least {least} voxels "
                    f"({least * min(spacing[i] for i in short):.3g} mm) {axes}: give a larger scan or crop, and "
                    f"check that the header's voxel size ({_fmt(mapping.input.GetSpacing())} mm) is right")


def _fmt(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)


MIRROR_OFF = "--symmetries off, or \"test_time_mirror\": false under \"input\" in its model.json"


def mirror_axis_for(model: LoadedModel, mirror: Optional[bool]) -> Optional[int]:
    """The array axis test-time mirroring flips on the model grid (``mirror``: None = the card's default), or
    None when it is off. Refuses a mirror the model cannot take."""
    if not (model.test_time_mirror if mirror is None else mirror):
        return None
    if model.mirror_axis is None:
        raise CDALError(f"the model grid's orientation '{model.grid.orientation}' names no left-right axis to "
                        f"mirror: segment without the mirror ({MIRROR_OFF})")
    if not trained_mirrored(model.card):
        raise CDALError("this model was not trained on left-right mirrored slices (a generator's training config "
                        f"has no left-right flip), so its classes may differ by side: segment without the mirror "
                        f"({MIRROR_OFF})")
    return model.mirror_axis


def split_evenly(total: int, parts: int) -> List[int]:
    """``total`` samples over ``parts`` runs, the first ones taking the remainder: 5 over 3 -> [2, 2, 1]."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _segment_array(array: np.ndarray, model: LoadedModel, steps: Optional[int], samples: int,
                   seed: Optional[int], device: torch.device, batch_slices: Optional[int],
                   with_attention: bool, progress: Optional[ProgressFn], early_exit: Optional[float] = None,
                   mirror_axis: Optional[int] = None, step_weights: Optional[List[float]] = None):
    """Normalised (Z, Y, X) array on the model grid -> probabilities (C, Z, Y, X), variance, attention.

    The ``samples`` are spread over every (generator, slicing axis) pair of the model (``model.runs``), in turn:
    an ensemble of 2 generators draws 3 + 2 of 5 samples, a model with 2 views likewise, and one sample comes
    from the primary generator alone. With ``mirror_axis``, every pair is also run on the array mirrored along
    that axis, after all the plain ones (one generator: 3 samples on the scan, 2 on its mirror), and the result
    is mirrored back. The mean and the variance are those of all samples pooled, so disagreement between members,
    views or mirror images counts as uncertainty. Attention comes from the primary's discriminator for all of
    them. Slices the first run stopped early on (surely background) are not sampled again by the other runs
    along the same axis: the first run's samples stand for them there.
    """
    runs = [(generator, axis, False) for generator, axis in model.runs]
    if mirror_axis is not None:
        runs += [(generator, axis, True) for generator, axis, _ in runs]
    counts = split_evenly(samples, len(runs))
    schedule = model.schedule(steps)
    rng = torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**31))
    views, primary = [], None
    for i, ((generator, axis, mirrored), k) in enumerate(zip(runs, counts)):
        if k == 0:
            continue
        view_progress = None
        if progress is not None:
            view_progress = (lambda f, msg, i=i: progress((i + f) / len(runs), msg))
        # Later members skip the slices the first run found surely background (early exit): there the
        # first run's samples stand in for theirs. Only along the first run's axis, where slices coincide.
        skip = primary[3] if primary is not None and axis == model.slice_axis else None
        if mirrored:  # the same run on the mirror image; its slices, and which to skip, mirrored along with it
            own_skip = skip[::-1].copy() if skip is not None and axis == mirror_axis else skip
            view = _segment_view(np.ascontiguousarray(np.flip(array, mirror_axis)), axis, model, generator,
                                 schedule, k, rng, device, batch_slices, with_attention, view_progress,
                                 early_exit, own_skip, step_weights)
            view = _mirrored_back(view, mirror_axis, axis)
        else:
            view = _segment_view(array, axis, model, generator, schedule, k, rng, device, batch_slices,
                                 with_attention, view_progress, early_exit, skip, step_weights)
        if skip is not None and skip.any():
            view = _fill_slices(view, primary, axis, skip)
        if primary is None:
            primary = view
        views.append((k, view[:3]))
    if progress is not None:
        progress(1.0, "done")
    return pool_views(views)


def _mirrored_back(view, mirror_axis: int, slice_axis: int):
    """A view segmented on the mirror image (``_segment_view``'s outputs) mapped back onto the scan."""
    probs, variance, attention, early = view
    back = lambda a, axis: np.ascontiguousarray(np.flip(a, axis))  # noqa: E731
    return (back(probs, mirror_axis + 1), back(variance, mirror_axis),
            None if attention is None else back(attention, mirror_axis),
            back(early, 0) if slice_axis == mirror_axis else early)


def pool_views(views):
    """[(k, (mean probabilities (C, ...), variance summed over C (...), attention or None))] -> the mean,
    variance and attention of all ``sum(k)`` samples pooled: within-view variances plus the spread of the
    view means around the overall mean."""
    total = sum(k for k, _ in views)
    probs = sum(k * v[0] for k, v in views) / total
    variance = sum(k * (v[1] + ((v[0] - probs) ** 2).sum(axis=0)) for k, v in views) / total
    attention = None
    if all(v[2] is not None for _, v in views):
        attention = (sum(k * v[2] for k, v in views) / total).astype(np.float32)
    return probs.astype(np.float32), variance.astype(np.float32), attention


def _fill_slices(view, source, axis: int, slices: np.ndarray):
    """``view`` (fresh arrays from ``_segment_view``, filled in place) with the slices marked in ``slices``
    (along array ``axis``) taken from ``source``."""
    probs, variance, attention, early = view
    at = (slice(None),) * axis + (slices,)
    probs[(slice(None),) + at] = source[0][(slice(None),) + at]
    variance[at] = source[1][at]
    if source[2] is not None:  # a run that skipped every slice has no attention of its own
        attention = attention if attention is not None else np.zeros_like(source[2])
        attention[at] = source[2][at]
    return probs, variance, attention, early


def _segment_view(array: np.ndarray, axis: int, model: LoadedModel, generator, schedule, samples: int,
                  rng: torch.Generator, device: torch.device, batch_slices: Optional[int], with_attention: bool,
                  progress: Optional[ProgressFn], early_exit: Optional[float] = None,
                  skip: Optional[np.ndarray] = None, step_weights: Optional[List[float]] = None):
    """Slices along one ``axis`` -> batched sampling -> probabilities (C, Z, Y, X), variance, attention and the
    (S,) mask of slices that stopped early. Slices marked in ``skip`` are not sampled (left at zero)."""
    cfg = model.config
    stack = slice_stack(array, axis, cfg.context_slices)              # (S, 2c+1, H, W)
    todo = np.flatnonzero(~skip) if skip is not None else np.arange(len(stack))
    stack = stack[todo]
    h, w = stack.shape[-2:]
    m = cfg.size_multiple
    stack, crop = pad_to(stack, (round_up(h, m), round_up(w, m)))
    images = torch.from_numpy(np.ascontiguousarray(stack)).mul_(2).sub_(1).to(device)
    n = images.shape[0]
    per_batch = batch_slices or _auto_batch(images.shape[-2:], samples, cfg.num_classes)
    disc = model.discriminator if with_attention else None
    outs_p, outs_v, outs_a, outs_e = [], [], [], []
    for first in range(0, n, per_batch):
        if progress is not None:
            progress(first / n, f"slices {first + 1}-{min(first + per_batch, n)} of {n}")
        out = sample(generator, images[first:first + per_batch], schedule, samples, rng, disc,
                     use_latent=model.uses_latent, early_exit=early_exit, step_weights=step_weights)
        outs_p.append(out.probabilities[..., crop[0], crop[1]].float().cpu())
        outs_v.append(out.variance[..., crop[0], crop[1]].float().cpu())
        if out.attention is not None:
            outs_a.append(out.attention[..., crop[0], crop[1]].float().cpu())
        outs_e.append(out.early.cpu())
    total = len(skip) if skip is not None else n

    def gather(parts, shape):  # sampled slices -> all S slices, the skipped ones zero
        done = torch.cat(parts).numpy() if parts else np.zeros((0,) + shape, np.float32)
        if n == total:
            return done
        full = np.zeros((total,) + shape, done.dtype)
        full[todo] = done
        return full

    probs = np.moveaxis(gather(outs_p, (cfg.num_classes, h, w)), 1, 0)  # (C, S, H, W)
    probs = np.stack([np.moveaxis(p, 0, axis) for p in probs])       # (C, Z, Y, X)
    variance = np.moveaxis(gather(outs_v, (h, w)), 0, axis)
    attention = np.moveaxis(gather(outs_a, (h, w)), 0, axis) if outs_a else None
    return probs, variance, attention, gather(outs_e, ()).astype(bool)


def _auto_batch(hw, samples: int, classes: int, budget_pixels: int = 6_000_000) -> int:
    """Slices per batch so that slices x samples x pixels stays within a memory-friendly budget."""
    return max(1, budget_pixels // max(1, samples * hw[0] * hw[1]))


def _scale_attention(attention: np.ndarray) -> np.ndarray:
    top = float(np.percentile(attention, 99)) if attention.size else 0.0
    return np.clip(attention / top, 0, 1).astype(np.float32) if top > 0 else np.zeros_like(attention, np.float32)
