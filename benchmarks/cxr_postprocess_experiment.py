"""Does anatomical clean-up of a chest X-ray lung mask help? (issue 16)

Both lungs are two solid regions, so a lung mask should have at most two connected pieces and no holes.
Three clean-ups of the shipped label map (the argmax of the pooled probabilities at the image's pixels), done
with ``scipy.ndimage`` (MONAI's ``KeepLargestConnectedComponent`` needs scikit-image, which cdal does not
install):

- ``largest2``: keep the two largest connected pieces (8-connected);
- ``fill``: fill holes (``binary_fill_holes``);
- ``both``: the first, then the second.

The variant is chosen on the model's *training* images (the validation images never decide it) and then
scored on the validation images, paired with the plain label map, with the standard error over images. It also
counts, per image, the pieces and holes of the plain map, which tells whether there is anything to clean.
Probability maps are cached as in ``threshold_experiment_2d.py`` (same seeds as ``cdal evaluate``)::

    python benchmarks/cxr_postprocess_experiment.py --model cxr --data ../shared/data/CXR \
        --val-cases configs/cxr_val.txt --cache runs/postprocess/cxr --out docs/results/session25_cxr_postprocess.json
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.predict2d import read_mask_2d  # noqa: E402
from threshold_experiment_2d import dice, foreground_probability, train_and_val  # noqa: E402

VARIANTS = ("plain", "largest2", "fill", "both")
EIGHT = np.ones((3, 3), dtype=bool)


def keep_largest(mask: np.ndarray, count: int = 2) -> np.ndarray:
    """(H, W) bool -> the ``count`` largest 8-connected pieces of it."""
    labels, n = ndimage.label(mask, structure=EIGHT)
    if n <= count:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:count] + 1
    return np.isin(labels, keep)


def clean_ups(mask: np.ndarray) -> Dict[str, np.ndarray]:
    """(H, W) bool lung mask -> the mask under each variant (bool, same shape)."""
    two = keep_largest(mask)
    return {"plain": mask, "largest2": two, "fill": ndimage.binary_fill_holes(mask),
            "both": ndimage.binary_fill_holes(two)}


def pieces_and_holes(mask: np.ndarray):
    """Number of 8-connected pieces of ``mask`` and of holes in it (background not connected to the border)."""
    pieces = ndimage.label(mask, structure=EIGHT)[1]
    holes = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)[1]
    return int(pieces), int(holes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="images/ + masks/ folder")
    ap.add_argument("--val-cases", required=True, help="the validation list (never used to choose)")
    ap.add_argument("--cache", required=True, help="folder for the cached probability maps")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = load_model(args.model)
    train, val = train_and_val(args.data, args.val_cases, model.card)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    def scores(subset, seeds):
        rows, counts = [], []
        for case, seed in zip(subset, seeds):
            p = foreground_probability(model, case, seed, cache)
            truth = read_mask_2d(case.label, p.shape, 2).astype(bool)
            masks = clean_ups(p > 0.5)
            rows.append([dice(masks[v], truth) for v in VARIANTS])
            counts.append(pieces_and_holes(masks["plain"]))
            print(f"{case.name}: " + " ".join(f"{v} {100 * d:.2f}" for v, d in zip(VARIANTS, rows[-1]))
                  + f" (pieces {counts[-1][0]}, holes {counts[-1][1]})", flush=True)
        return np.array(rows), np.array(counts)

    val_dice, val_counts = scores(val, [args.seed + i for i in range(len(val))])
    train_dice, train_counts = scores(train, [args.seed + 1000 + i for i in range(len(train))])
    best = int(np.argmax(train_dice.mean(0)))
    paired = {}
    for k, v in enumerate(VARIANTS[1:], start=1):
        diff = 100 * (val_dice[:, k] - val_dice[:, 0])
        paired[v] = {"mean": round(float(diff.mean()), 3),
                     "standard_error": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 3),
                     "images_changed": int((np.abs(diff) > 1e-9).sum())}
    report = {
        "model": args.model, "train_images": len(train), "val_images": len(val), "variants": list(VARIANTS),
        "train_mean_dice": dict(zip(VARIANTS, (100 * train_dice.mean(0)).round(3).tolist())),
        "val_mean_dice": dict(zip(VARIANTS, (100 * val_dice.mean(0)).round(3).tolist())),
        "chosen_on_train": VARIANTS[best],
        "val_paired_against_plain": paired,
        "plain_pieces_per_image": {"val": val_counts[:, 0].tolist(), "train": train_counts[:, 0].tolist()},
        "plain_holes_per_image": {"val": val_counts[:, 1].tolist(), "train": train_counts[:, 1].tolist()},
    }
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("plain_")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
