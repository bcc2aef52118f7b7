"""Add a trained generator to a shipped model as a further ensemble member.

    python tools/add_member.py hippocampus runs/hippocampus_member2/model \
        --recipe "cdal train --config configs/hippocampus_member2.json --data ../shared/data/Task04_Hippocampus --out runs/hippocampus_member2"

The member must have been trained for the same input, classes and network (`model_io.member_mismatch`); its
generator is written as `member<N>.safetensors` next to the model's weights and listed, with its training
summary and recipe, in the card's `members`. The shipped folder is replaced only once the result loads.
"""

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.model_io import load_model, member_mismatch, resolve_model, save_member  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="the ensemble to extend (name or folder)")
    p.add_argument("member", help="model folder of the new member (a run's model/)")
    p.add_argument("--recipe", required=True, help="the command that trained the member")
    args = p.parse_args()
    dst = resolve_model(args.model)
    base, member = load_model(dst), load_model(args.member)
    why = member_mismatch(base.card, member.card)
    if why:
        sys.exit(f"{args.member} cannot join {dst}: {why}")
    if member.members:
        sys.exit(f"{args.member} is itself an ensemble: add its members one by one")
    training = member.card.get("training", {})
    info = {"training": {k: training[k] for k in ("steps", "wall_seconds", "hardware", "seed", "torch", "config")
                         if k in training},
            "recipe": args.recipe, "selection": member.card.get("validation", {}).get("per_class")}
    tmp = dst.with_name("." + dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dst, tmp)
    entry = save_member(tmp, member.generator, info)
    load_model(tmp)  # refuse to ship anything that does not load
    old = dst.with_name("." + dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old)
    print(f"{dst}: added {entry['weights']} ({len(base.generators) + 1} generators)")


if __name__ == "__main__":
    main()
