"""Would a foreground threshold other than 0.5 help a shipped 2D model? (issue 16)

The label of a two-class model is its mean foreground probability over the K samples taken at 0.5. Where a model
over- or under-segments (MoNuSeg: recall 84 against precision 78), another cut-off may score a higher Dice. The
cut-off is chosen on the model's *training* images (the validation images never decide it) and then scored on the
validation images, paired with 0.5 on the same probability maps, with the standard error over images.

Probability maps are cached (float16 .npz per image) so that the sweep can be rerun for free:

    python benchmarks/threshold_experiment_2d.py --model monuseg --data ../shared/data/MoNuSeg/train \
        --val-cases configs/monuseg_val.txt --cache runs/thresholds/monuseg --out docs/results/threshold_monuseg.json

Seeds are those of ``cdal evaluate`` for the validation images (seed + index in the case list), so the 0.5 row
reproduces the shipped evaluation.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.data import read_case_list, read_png_pairs, select_cases  # noqa: E402
from cdal_core.evaluation import cases_trained_on  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.predict2d import read_image_2d, read_mask_2d, segment_image_2d  # noqa: E402

THRESHOLDS = np.round(np.arange(0.30, 0.701, 0.025), 3)


def foreground_probability(model, case, seed: int, cache: Path) -> np.ndarray:
    """The model's mean foreground probability (H, W) at the image's pixels, cached."""
    path = cache / f"{case.name}.npz"
    if path.exists():
        return np.load(path)["p"].astype(np.float32)
    array = read_image_2d(case.image, model.config.image_channels)
    result = segment_image_2d(array, model, seed=seed, with_attention=False)
    p = result.probabilities[1]
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, p=p.astype(np.float16))
    tmp.replace(path)
    return p


def train_and_val(data: str, val_cases: str, card: dict):
    """(training cases, validation cases) of an images/ + masks/ folder; the validation cases in their list's order,
    so that seed + index gives the seeds ``cdal evaluate`` uses (also for the other 2D experiments). Refused when
    the model of ``card`` trained on validation cases (a refit such as session 27's ``cxr``): its scores there would
    not be held-out."""
    cases = read_png_pairs(data)
    val = select_cases(cases, read_case_list(val_cases), val_cases, data)
    val_names = {c.name for c in val}
    seen, folder = cases_trained_on(card, data, sorted(val_names))
    if seen:
        raise SystemExit(f"the model trained on {len(seen)} of the {len(val)} validation cases ({folder}): score a "
                         "model trained without them (e.g. its version before the refit: tools/gpu_session.py pack-init "
                         "NAME=COMMIT:Resources/Models/<name> --dest DIR)")
    return [c for c in cases if c.name not in val_names], val


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (0 when both are empty)."""
    return 2.0 * float((pred & truth).sum()) / max(float(pred.sum() + truth.sum()), 1.0)


def dice_at(p: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice of ``p > t`` against ``truth`` for every t."""
    t = truth.astype(bool)
    return np.array([dice(p > th, t) for th in thresholds])


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
    if len(model.class_names) != 2:
        sys.exit("this experiment is for two-class models")
    train, val = train_and_val(args.data, args.val_cases, model.card)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    def scores(subset, seeds):
        rows = []
        for case, seed in zip(subset, seeds):
            p = foreground_probability(model, case, seed, cache)
            truth = read_mask_2d(case.label, p.shape, 2)
            rows.append(dice_at(p, truth, THRESHOLDS))
            print(f"{case.name}: Dice at 0.5 {100 * rows[-1][THRESHOLDS == 0.5][0]:.2f}", flush=True)
        return np.array(rows)

    val_dice = scores(val, [args.seed + i for i in range(len(val))])
    train_dice = scores(train, [args.seed + 1000 + i for i in range(len(train))])
    best = int(np.argmax(train_dice.mean(0)))
    half = int(np.flatnonzero(THRESHOLDS == 0.5)[0])
    diff = val_dice[:, best] - val_dice[:, half]
    report = {
        "model": args.model, "train_images": len(train), "val_images": len(val),
        "thresholds": THRESHOLDS.tolist(),
        "train_mean_dice": (100 * train_dice.mean(0)).round(3).tolist(),
        "val_mean_dice": (100 * val_dice.mean(0)).round(3).tolist(),
        "chosen_on_train": float(THRESHOLDS[best]),
        "val_dice_at_0.5": round(100 * float(val_dice[:, half].mean()), 3),
        "val_dice_at_chosen": round(100 * float(val_dice[:, best].mean()), 3),
        "paired_difference": round(100 * float(diff.mean()), 3),
        "paired_standard_error": round(100 * float(diff.std(ddof=1) / np.sqrt(len(diff))), 3) if len(diff) > 1 else None,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
