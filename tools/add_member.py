"""Add a trained generator to a shipped model as a further ensemble member.

    python tools/add_member.py hippocampus runs/hippocampus_member2/model \
        --recipe "cdal train --config configs/hippocampus_member2.json --data ../shared/data/Task04_Hippocampus --out runs/hippocampus_member2"

The member must have been trained for the same input, classes and network (`model_io.member_mismatch`); it may
slice along other axes than the model (e.g. a sagittal member beside axial ones), which its entry then records
(`slice_axes`) so that inference cuts the volume its way. Its generator is written as `member<N>.safetensors`
next to the model's weights and listed, with its training summary and recipe, in the card's `members`. The
shipped folder is replaced only once the result loads. `--replace N` puts the new generator in the place of member N
(its share of the samples kept) instead of adding one. `--validation REPORT.json` replaces the card's validation
block with the ensemble's own evaluation.

`--adopt-normalisation` lets a member trained on a different case set (e.g. all 195 volumes where the model's
landmarks are the mean over 146) join with the model's intensity landmarks, when they differ by at most
`LANDMARK_TOLERANCE`; its entry records the landmarks it was trained with. Check the effect first (session 14:
the fold-0 twin evaluated with the other set's landmarks moved Dice by -0.01 / -0.02).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # ship_model, also when imported as a module (tests)

from cdal_core.model_io import (CARD_NAME, atomic_write_bytes, json_bytes, learns_left_right_mirror,  # noqa: E402
                                load_model,
                                member_mismatch, member_slice_axes, resolve_model, save_member, trained_mirrored)
from ship_model import validation_block  # noqa: E402

# intensity landmarks are on the [0, 1] scale of the lower..upper percentiles; 0.01 is 1 % of that range
LANDMARK_TOLERANCE = 0.01


def adopt_normalisation(base_card: Dict, member_card: Dict,
                        tolerance: float = LANDMARK_TOLERANCE) -> Tuple[Dict, Dict]:
    """A copy of ``member_card`` with the model's normalisation, and a record of the landmarks it replaced. Only
    the histogram landmarks may differ, each by at most ``tolerance``: anything else is another input."""
    ours, theirs = base_card.get("normalisation", {}), member_card.get("normalisation", {})
    others = sorted(k for k in set(ours) | set(theirs)
                    if k not in ("landmarks", "note") and ours.get(k) != theirs.get(k))
    if others:
        raise SystemExit(f"cannot adopt the model's normalisation: the member's {', '.join(others)} differ(s)")
    mine, trained = ours.get("landmarks") or [], theirs.get("landmarks") or []
    if len(mine) != len(trained):
        raise SystemExit("cannot adopt the model's normalisation: the member has a different number of landmarks")
    gap = max((abs(a - b) for a, b in zip(mine, trained)), default=0.0)
    if gap > tolerance:
        raise SystemExit(f"cannot adopt the model's normalisation: landmarks differ by up to {gap:.4f} "
                         f"(> {tolerance}); the member would see differently scaled images. Retrain it with the "
                         "model's case set")
    return (dict(member_card, normalisation=dict(ours)),
            {"trained_with_landmarks": trained, "max_landmark_difference": round(gap, 5)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="the ensemble to extend (name or folder)")
    p.add_argument("member", help="model folder of the new member (a run's model/)")
    p.add_argument("--recipe", required=True, help="the command that trained the member")
    p.add_argument("--validation", default=None, help="evaluation report (JSON) of the resulting ensemble")
    p.add_argument("--cases", default=None, help="the case list that report was measured on")
    p.add_argument("--one-sided", action="store_true",
                   help="accept a member trained without left-right mirrors (checked on both sides yourself)")
    p.add_argument("--replace", type=int, default=None, metavar="N",
                   help="put the member in the place of member N (1 = the first after the primary), keeping its "
                        "share of the samples, instead of adding it")
    p.add_argument("--adopt-normalisation", action="store_true",
                   help="let a member whose intensity landmarks differ slightly (another case set) use the model's")
    args = p.parse_args()
    dst = resolve_model(args.model)
    base, member = load_model(dst), load_model(args.member)
    member_card, adopted = (adopt_normalisation(base.card, member.card) if args.adopt_normalisation
                            else (member.card, None))
    why = member_mismatch(base.card, member_card)
    if why:
        sys.exit(f"{args.member} cannot join {dst}: {why}")
    if member.members:
        sys.exit(f"{args.member} is itself an ensemble: add its members one by one")
    if args.replace is not None and not 1 <= args.replace <= len(base.members):
        sys.exit(f"{dst} has {len(base.members)} member(s) besides its primary generator, so there is no member "
                 f"{args.replace} to replace: pick one from 1 to {len(base.members)}")
    if learns_left_right_mirror(base.card) and learns_left_right_mirror(member.card) is False and not args.one_sided:
        sys.exit(f"{args.member} never saw a left-right mirrored head (its augmentation has no left-right flip; "
                 "slicing sagittally that is \"flip_across_slices\": true) while the model does: it would be "
                 "biased towards one side. Retrain it with the mirror, or pass --one-sided after checking both sides")
    training = member.card.get("training", {})
    keep = ("steps", "wall_seconds", "hardware", "seed", "torch", "config", "batch_size", "schedule", "warm_start",
            "init_model", "init_generator", "data", "weights_transport")
    info = {"training": {k: training[k] for k in keep if k in training},
            "recipe": args.recipe, "selection": member.card.get("validation", {}).get("per_class")}
    axes = member_slice_axes(base.card, member.card)
    if axes is not None:
        info["slice_axes"] = axes
    if adopted:
        info["normalisation_adopted"] = adopted
    tmp = dst.with_name("." + dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dst, tmp)
    entry = save_member(tmp, member.generator, info, replace=args.replace)
    card = json.loads((tmp / CARD_NAME).read_text())
    if args.validation:
        card["validation"] = validation_block(args.validation, args.cases)
    if card.get("input", {}).get("test_time_mirror") and not trained_mirrored(card):
        card["input"]["test_time_mirror"] = False  # a one-sided member must not be shown the mirror image
        print(f"{dst}: test-time mirror turned off ({args.member} never saw a mirrored head)")
    atomic_write_bytes(tmp / CARD_NAME, json_bytes(card))
    load_model(tmp)  # refuse to ship anything that does not load
    old = dst.with_name("." + dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old)
    what = f"member {args.replace} replaced by" if args.replace else "added"
    print(f"{dst}: {what} {entry['weights']} ({len(load_model(dst).generators)} generators)")


if __name__ == "__main__":
    main()
