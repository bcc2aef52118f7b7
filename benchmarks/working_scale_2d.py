"""Would the MoNuSeg model segment better at a larger working resolution than it trained at? (issue 16)

The model trained on 1000 x 1000 tiles resized to 512 x 512. Session 28's crop experiment
(``histology_scale_experiment.py``) found the centre 750 x 750 of each validation tile scored 1.35 +/- 0.33 Dice
higher when it was resized to 512 (0.68 model pixels per image pixel) than at the training scale (384, 0.512):
the model may see small nuclei better when they are magnified. That was found on the validation tiles, so here
the working size is chosen on training tiles only and then scored on the validation tiles:

  1. the first ``--train-tiles`` training tiles (sorted by name) are segmented at each ``--sizes`` working size
     (``cdal evaluate``'s settings otherwise: T = 4, K = 5, the card's test-time symmetries, seed = index);
  2. the size with the best mean Dice there is scored on the 6 validation tiles, paired against 512.

    python benchmarks/working_scale_2d.py --model monuseg --data ../shared/data/MoNuSeg/train \
        --val-cases configs/monuseg_val.txt --out docs/results/session28_working_scale.json

Rule (written before the run): the chosen size goes into the card (``input.image_size``) if on the validation
tiles it gains >= +0.30 Dice and more than 2 paired standard errors, with pixel AUROC not lower by more than 0.01;
its cost (pixels: (size / 512)^2) is reported beside it. Otherwise reported only.
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

from cdal_core.metrics import error_auroc  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402
from cdal_core.predict2d import read_image_2d, read_mask_2d, segment_image_2d  # noqa: E402
from threshold_experiment_2d import dice, train_and_val  # noqa: E402


def run_at(model, case, size: int, seed: int):
    """(Dice, pixel AUROC of the uncertainty for errors, seconds) of one tile at working size ``size``."""
    image = read_image_2d(case.image, model.config.image_channels)
    truth = read_mask_2d(case.label, image.shape[-2:], 2).astype(bool)
    saved = model.card["input"]["image_size"]
    model.card["input"]["image_size"] = [size, size]
    try:
        result = segment_image_2d(image, model, seed=seed, with_attention=False)
    finally:
        model.card["input"]["image_size"] = saved
    pred = result.labels > 0
    return dice(pred, truth), error_auroc(result.uncertainty, pred != truth), result.seconds


def paired(a, b):
    d = np.asarray(b) - np.asarray(a)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="monuseg")
    ap.add_argument("--data", required=True)
    ap.add_argument("--val-cases", required=True)
    ap.add_argument("--sizes", default="512,640,768")
    ap.add_argument("--train-tiles", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = load_model(args.model)
    train, val = train_and_val(args.data, args.val_cases, model.card)
    train = sorted(train, key=lambda c: c.name)[: args.train_tiles]
    sizes = [int(s) for s in args.sizes.split(",")]
    report = {"model": args.model, "sizes": sizes, "train_tiles": [c.name for c in train], "train": {}, "val": {}}
    for size in sizes:
        rows = [run_at(model, case, size, i) for i, case in enumerate(train)]
        report["train"][size] = {"dice": [r[0] for r in rows], "mean_dice": float(np.mean([r[0] for r in rows])),
                                 "seconds": float(np.mean([r[2] for r in rows]))}
        print(size, json.dumps(report["train"][size]["mean_dice"]), flush=True)
    chosen = max(sizes, key=lambda s: report["train"][s]["mean_dice"])
    report["chosen"] = chosen
    for size in sorted({512, chosen}):
        rows = [run_at(model, case, size, i) for i, case in enumerate(val)]
        report["val"][size] = {"dice": [r[0] for r in rows], "auroc": [r[1] for r in rows],
                               "mean_dice": float(np.mean([r[0] for r in rows])),
                               "mean_auroc": float(np.mean([r[1] for r in rows])),
                               "seconds": float(np.mean([r[2] for r in rows]))}
    if chosen != 512:
        gain, se = paired(report["val"][512]["dice"], report["val"][chosen]["dice"])
        report["paired_gain"], report["paired_se"] = gain, se
        report["cost_ratio_pixels"] = (chosen / 512) ** 2
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("train", "train_tiles")}, indent=2))


if __name__ == "__main__":
    main()
