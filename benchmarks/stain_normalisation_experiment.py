"""Would stain normalisation at test time help the shipped MoNuSeg model? (issue 16)

H&E tiles from different hospitals and organs differ in stain colour, the usual domain shift in histology.
Reinhard et al. (2001) colour transfer maps each tile's mean and spread in the decorrelated lαβ colour space onto
target values; here the targets are the means over the model's 24 *training* tiles, so a validation tile is moved
towards the colours the model was trained on. The model itself is unchanged (it was trained without
normalisation); this asks only whether normalising what it is shown at test time helps.

Scored on the validation tiles (``cdal evaluate``'s settings: the card's T, K = 5, its test-time symmetries, seed
0 + index), paired with the plain tiles::

    python benchmarks/stain_normalisation_experiment.py --model monuseg --data ../shared/data/MoNuSeg/train \
        --val-cases configs/monuseg_val.txt --json docs/results/session25_monuseg_reinhard.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cdal_core.predict2d as p2d  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402
from threshold_experiment_2d import train_and_val  # noqa: E402

RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
LOG_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in 0..255 -> (3, H, W) Reinhard lαβ."""
    lms = np.einsum("ij,jhw->ihw", RGB_TO_LMS, rgb.astype(np.float64) + 1.0)
    return np.einsum("ij,jhw->ihw", LOG_LMS_TO_LAB, np.log10(lms))


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    lms = 10.0 ** np.einsum("ij,jhw->ihw", np.linalg.inv(LOG_LMS_TO_LAB), lab)
    return np.einsum("ij,jhw->ihw", np.linalg.inv(RGB_TO_LMS), lms) - 1.0


def lab_statistics(rgb: np.ndarray):
    lab = rgb_to_lab(rgb).reshape(3, -1)
    return lab.mean(1), lab.std(1)


def reinhard(rgb: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB -> the same tile with its lαβ mean and spread moved to the targets, as float32 in 0..255."""
    lab = rgb_to_lab(rgb)
    mean, std = lab.reshape(3, -1).mean(1), lab.reshape(3, -1).std(1)
    lab = (lab - mean[:, None, None]) / (std[:, None, None] + 1e-8) * target_std[:, None, None] \
        + target_mean[:, None, None]
    return np.clip(lab_to_rgb(lab), 0, 255).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="images/ + masks/ folder")
    ap.add_argument("--val-cases", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--score-training-tiles", action="store_true",
                    help="score the training tiles instead (in-sample: does normalising hurt where the model fits?)")
    args = ap.parse_args()
    model = load_model(args.model)
    train, val = train_and_val(args.data, args.val_cases, model.card)
    stats = [lab_statistics(p2d.read_image_2d(c.image, 3)) for c in train]
    target_mean = np.mean([m for m, _ in stats], axis=0)
    target_std = np.mean([s for _, s in stats], axis=0)
    round_trip = lab_to_rgb(rgb_to_lab(p2d.read_image_2d(val[0].image, 3)))
    assert np.abs(round_trip - p2d.read_image_2d(val[0].image, 3)).max() < 1e-3, "lαβ round trip is broken"

    scored = train if args.score_training_tiles else val
    plain = p2d.evaluate_pairs(model, scored, precision="fp32")
    real_read = p2d.read_image_2d
    p2d.read_image_2d = lambda path, channels: reinhard(real_read(path, channels), target_mean, target_std)
    normalised = p2d.evaluate_pairs(model, scored, precision="fp32")
    p2d.read_image_2d = real_read
    cls = model.class_names[1]
    a = np.array([r[f"{cls}_dice"] for r in plain["per_image"]])
    b = np.array([r[f"{cls}_dice"] for r in normalised["per_image"]])
    diff = 100 * (b - a)
    report = {"model": args.model, "train_tiles": len(train), "val_tiles": len(val),
              "scored": "training tiles (in-sample)" if args.score_training_tiles else "validation tiles",
              "target_lab_mean": target_mean.round(4).tolist(), "target_lab_std": target_std.round(4).tolist(),
              "plain": plain["per_class"][cls], "reinhard": normalised["per_class"][cls],
              "uncertainty": {"plain": plain["uncertainty"], "reinhard": normalised["uncertainty"]},
              "per_tile": [{"case": r["case"], "plain": round(100 * x, 2), "reinhard": round(100 * y, 2)}
                           for r, x, y in zip(plain["per_image"], a, b)],
              "paired_difference": round(float(diff.mean()), 3),
              "paired_standard_error": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 3)}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
