"""Turn a training run's model into a shipped model: Resources/Models/<name>/ with a complete model card.

    python tools/ship_model.py runs/hippocampus/model hippocampus --data ../shared/data/Task04_Hippocampus \
        --recipe "cdal train --config configs/hippocampus.json --data ../shared/data/Task04_Hippocampus --out runs/hippocampus" \
        [--validation docs/results/hippocampus_T2_K5.json --cases configs/hippocampus_val.txt] [--overwrite]

Adds histogram-standardisation landmarks learned from the run's training split when a 3D card has none (runs
started before landmarks existed), the exact recipe, and the validation report (means and stds per class).
2D models (card ``input.image_size``: cxr, monuseg) ship the same way with ``--data`` their images/ + masks/
folder; their report's per-image fields are kept.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.data import Normalisation, read_msd_cases, split_cases  # noqa: E402
from cdal_core.model_io import CARD_NAME, atomic_write_bytes, json_bytes, load_model, shipped_models_dir  # noqa: E402
from cdal_core.trainer import _landmarks  # noqa: E402


def validation_block(report_path: str, cases: str = None) -> dict:
    """The card's validation entry from an evaluation report (JSON)."""
    report = json.loads(Path(report_path).read_text())
    block = {k: report[k] for k in ("per_class", "uncertainty", "volumes", "seconds_per_volume",
                                    "images", "seconds_per_image", "image_size", "window", "hd95_unit",
                                    "steps", "samples", "precision", "early_exit") if k in report}
    block["cases"] = cases or "see training.data.validation_cases"
    return block


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("name")
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--validation", default=None, help="evaluation report (JSON) to copy into the card")
    p.add_argument("--cases", default=None, help="the case list that report was measured on (recorded in the card)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    src = Path(args.model)
    load_model(src)  # refuse to ship anything that does not load
    dst = shipped_models_dir() / args.name
    if dst.exists() and not args.overwrite:
        sys.exit(f"{dst} exists: pass --overwrite to replace it")
    tmp = dst.with_name("." + dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    card = json.loads((tmp / CARD_NAME).read_text())
    card["name"] = args.name
    norm = Normalisation.from_dict(card["normalisation"])
    is_2d = bool(card.get("input", {}).get("image_size"))  # 2D models normalise min-max: no landmarks
    if norm.landmarks is None and not is_2d:
        cfg = card["training"]["config"]
        cases, _ = read_msd_cases(args.data)
        train_cases, _ = split_cases(cases, cfg["val_fraction"], cfg["seed"], cfg.get("val_cases"))
        norm.landmarks = _landmarks(train_cases, norm)
        card["normalisation"] = norm.to_dict()
        card["normalisation"]["note"] = "landmarks learned from the training split after training (inference only)"
    card["training"]["recipe"] = args.recipe
    if args.validation:
        card["validation"] = validation_block(args.validation, args.cases)
    atomic_write_bytes(tmp / CARD_NAME, json_bytes(card))
    load_model(tmp)
    if dst.exists():  # swap by renames: a crash in between leaves the old model whole (beside), never half of it
        old = dst.with_name("." + dst.name + ".replaced")
        if old.exists():
            shutil.rmtree(old)
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)
    print(f"shipped {dst}")
    if "quality" not in card and not is_2d:
        print("no review limits in the card (cdal_core.quality): evaluate held-out scans with a replica of this "
              "recipe, then run tools/set_review_limits.py --report ... --card " + str(dst / CARD_NAME))


if __name__ == "__main__":
    main()
