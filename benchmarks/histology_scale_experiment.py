"""Does a histology tile of another size than the training tiles need a fixed scale, not a fixed size? (issue 16)

The MoNuSeg model trained on 1000 x 1000 tiles resized to 512 x 512, so its nuclei are seen at 0.512 model pixels
per image pixel. ``predict2d`` resizes *every* image to the card's ``image_size``: a pathologist's 500 x 500
crop at the same magnification is then blown up 2x, and a 2000 x 2000 field shrunk 2x, so the nuclei are not the
size the model learnt. The windows are cut from the resized image with overlap, so any working size is possible.

This script cuts crops of the 6 validation tiles at the same magnification (the 4 quadrants of 500 x 500 of each
tile, and the centre 750 x 750) and segments each two ways, paired, with ``cdal evaluate``'s settings (T = 4,
K = 5, the card's test-time symmetries, seed = index):
  - size: resized to the card's ``image_size`` (what predict2d does now),
  - scale: resized by 512 / 1000, rounded to a multiple of 8 (the training scale).
The full 1000 x 1000 tiles give the same working size both ways and are the reference.

    python benchmarks/histology_scale_experiment.py --model monuseg --data ../shared/data/MoNuSeg/train \
        --val-cases configs/monuseg_val.txt --out docs/results/session28_histology_scale.json

Rule (written before the run): the scale arm becomes predict2d's behaviour for histology models if on the
500 x 500 crops it gains >= +0.5 Dice and more than 2 paired standard errors; otherwise reported only.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.predict2d import read_image_2d, read_mask_2d, segment_image_2d  # noqa: E402
from threshold_experiment_2d import dice, train_and_val  # noqa: E402

TRAINING_SCALE = 512 / 1000   # model pixels per image pixel of the MoNuSeg training tiles


def crops(height: int, width: int):
    """(name, (top, left, size)): the four 500 x 500 quadrants and the centre 750 x 750."""
    half = min(height, width) // 2
    out = [(f"q{i}", (top, left, half)) for i, (top, left) in
           enumerate([(0, 0), (0, half), (half, 0), (half, half)])]
    c = 3 * min(height, width) // 4
    return out + [("centre750", ((height - c) // 2, (width - c) // 2, c))]


def segment_at(model, array: np.ndarray, working: int, seed: int) -> np.ndarray:
    saved = model.card["input"]["image_size"]
    model.card["input"]["image_size"] = [working, working]
    try:
        return segment_image_2d(array, model, seed=seed, with_attention=False).labels
    finally:
        model.card["input"]["image_size"] = saved


def paired(a, b):
    d = np.asarray(b) - np.asarray(a)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="monuseg")
    ap.add_argument("--data", required=True)
    ap.add_argument("--val-cases", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = load_model(args.model)
    _, val = train_and_val(args.data, args.val_cases, model.card)
    size = int(model.card["input"]["image_size"][0])
    rows = []
    for index, case in enumerate(val):
        image = read_image_2d(case.image, model.config.image_channels)
        mask = read_mask_2d(case.label, image.shape[-2:], 2).astype(bool)
        for name, (top, left, side) in [("full", (0, 0, min(image.shape[-2:])))] + crops(*image.shape[-2:]):
            img, ref = image[:, top:top + side, left:left + side], mask[top:top + side, left:left + side]
            scaled = max(8, int(round(side * TRAINING_SCALE / 8)) * 8)
            row = {"case": case.name, "crop": name, "side": side, "working_size": size, "working_scaled": scaled}
            row["dice_size"] = dice(segment_at(model, img, size, index) > 0, ref)
            row["dice_scale"] = row["dice_size"] if scaled == size else dice(segment_at(model, img, scaled, index) > 0, ref)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for group, keep in [("full", lambda r: r["crop"] == "full"), ("quadrants500", lambda r: r["crop"][0] == "q"),
                        ("centre750", lambda r: r["crop"] == "centre750")]:
        sel = [r for r in rows if keep(r)]
        a, b = [r["dice_size"] for r in sel], [r["dice_scale"] for r in sel]
        gain, se = paired(a, b)
        summary[group] = {"n": len(sel), "dice_size": float(np.mean(a)), "dice_scale": float(np.mean(b)),
                          "paired_gain": gain, "paired_se": se}
    report = {"model": args.model, "training_scale": TRAINING_SCALE, "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
