"""Would an edge-aware upsampling of a 2D model's probabilities help? (issue 16)

A 2D model works at its card's ``input.image_size`` (MoNuSeg: 512x512 for 1000x1000 tiles) and its mean
probabilities go back to the input's pixels bilinearly. Taking the reference masks down and back up the same way
bounds the Dice that the working resolution allows (MoNuSeg 98.49 on the validation tiles, CXR 99.81): small
objects such as nuclei lose more at their borders than lungs do. A guided filter (He et al., 2010) with the
full-resolution image as its guide can move an upsampled border onto the image's own edge.

The filter's radius and regularisation are chosen on the model's *training* images (the validation images never
decide them) and then scored on the validation images, paired with plain bilinear upsampling on the same
working-resolution probabilities, with the standard error over images. Working-resolution maps are cached:

    python benchmarks/guided_upsampling_2d.py --model monuseg --data ../shared/data/MoNuSeg/train \
        --val-cases configs/monuseg_val.txt --cache runs/guided/monuseg --out docs/results/guided_monuseg.json

Seeds are those of ``cdal evaluate`` for the validation images (seed + index in the case list).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cdal_core import predict2d  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.predict2d import _resize_maps, read_image_2d, read_mask_2d  # noqa: E402
from threshold_experiment_2d import dice, train_and_val  # noqa: E402

RADII = (1, 2, 3, 4, 6)                 # in input pixels
EPSILONS = (1e-4, 1e-3, 1e-2)           # guide in [0, 1]


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, H, W) -> the mean over each pixel's (2r+1)^2 window, shrunk at the borders."""
    return F.avg_pool2d(x[None], 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)[0]


def guided_upsample(maps: np.ndarray, image: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """(N, h, w) maps -> (N, H, W): bilinear to the ``(ch, H, W)`` image's pixels, then a guided filter (He et
    al., 2010) with the image (min-max scaled to [0, 1]) as guide, so borders follow the image's edges. With
    ``ch`` = 3 the filter is the colour one (a 3x3 covariance per pixel). ``radius`` 0 keeps plain bilinear."""
    up = torch.from_numpy(_resize_maps(maps, image.shape[-2:])).double()
    if radius <= 0:
        return up.float().numpy()
    guide = torch.from_numpy(np.ascontiguousarray(image, np.float64))
    guide = (guide - guide.min()) / max(float(guide.max() - guide.min()), 1e-6)   # (k, H, W)
    k = guide.shape[0]
    mean_i = _box_mean(guide, radius)                                              # (k, H, W)
    pairs = guide[:, None] * guide[None, :]                                        # (k, k, H, W)
    cov_ii = _box_mean(pairs.reshape(k * k, *guide.shape[1:]), radius).reshape(k, k, *guide.shape[1:])
    cov_ii = cov_ii - mean_i[:, None] * mean_i[None, :] + eps * torch.eye(k, dtype=guide.dtype)[..., None, None]
    out = []
    for p in up:
        mean_p = _box_mean(p[None], radius)[0]
        cov_ip = _box_mean(guide * p, radius) - mean_i * mean_p                     # (k, H, W)
        a = torch.linalg.solve(cov_ii.permute(2, 3, 0, 1), cov_ip.permute(1, 2, 0)[..., None])[..., 0]
        a = a.permute(2, 0, 1)                                                     # (k, H, W)
        b = mean_p - (a * mean_i).sum(0)
        out.append((_box_mean(a, radius) * guide).sum(0) + _box_mean(b[None], radius)[0])
    return torch.stack(out).float().numpy()


def working_probability(model, case, seed: int, cache: Path) -> np.ndarray:
    """The model's mean foreground probability at its working resolution (h, w), cached."""
    path = cache / f"{case.name}.npz"
    if path.exists():
        return np.load(path)["p"].astype(np.float32)
    array = read_image_2d(case.image, model.config.image_channels)
    image_size, _ = predict2d.model_sizes(model)
    result = predict2d.segment_image_2d(array, model, seed=seed, with_attention=False, output_size=image_size)
    p = result.probabilities[1]
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, p=p.astype(np.float16))
    tmp.replace(path)
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="images/ + masks/ folder")
    ap.add_argument("--val-cases", required=True, help="the validation list (never used to choose)")
    ap.add_argument("--cache", required=True, help="folder for the cached probability maps")
    ap.add_argument("--train-images", type=int, default=None, help="choose on the first N training images only")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = load_model(args.model)
    if len(model.class_names) != 2:
        sys.exit("this experiment is for two-class models")
    train, val = train_and_val(args.data, args.val_cases, model.card)
    train = train[:args.train_images]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    settings = [(0, 0.0)] + [(r, e) for r in RADII for e in EPSILONS]   # (0, 0): bilinear, as shipped

    def scores(subset, seeds):
        rows = []
        for case, seed in zip(subset, seeds):
            p = working_probability(model, case, seed, cache)
            image = read_image_2d(case.image, model.config.image_channels)
            truth = read_mask_2d(case.label, image.shape[-2:], 2).astype(bool)
            row = []
            for radius, eps in settings:
                up = guided_upsample(p[None], image, radius, eps)[0]
                row.append(dice(up > 0.5, truth))
            rows.append(row)
            print(f"{case.name}: bilinear {100 * row[0]:.2f}, best {100 * max(row):.2f}", flush=True)
        return np.array(rows)

    train_dice = scores(train, [args.seed + 1000 + i for i in range(len(train))])
    val_dice = scores(val, [args.seed + i for i in range(len(val))])
    best = int(np.argmax(train_dice.mean(0)))
    diff = val_dice[:, best] - val_dice[:, 0]
    report = {
        "model": args.model, "train_images": len(train), "val_images": len(val),
        "settings (radius px, eps)": settings,
        "train_mean_dice": (100 * train_dice.mean(0)).round(3).tolist(),
        "val_mean_dice": (100 * val_dice.mean(0)).round(3).tolist(),
        "chosen_on_train": settings[best],
        "val_dice_bilinear": round(100 * float(val_dice[:, 0].mean()), 3),
        "val_dice_chosen": round(100 * float(val_dice[:, best].mean()), 3),
        "paired_difference": round(100 * float(diff.mean()), 3),
        "paired_standard_error": round(100 * float(diff.std(ddof=1) / np.sqrt(len(diff))), 3) if len(diff) > 1 else None,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
