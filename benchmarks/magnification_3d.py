"""Does the hippocampus model segment better when its slices are magnified at test time? (issue 15)

Session 28 saw the MoNuSeg model score +0.83 +/- 0.25 Dice on its 6 held-out tiles when they were shown 1.25x
larger than in training (640 against 512 pixels). The hippocampus is small too: about 35 x 15 voxels in an axial
slice at the model's 1 mm. Here the model's grid is changed at test time only: the card's ``input.spacing``
becomes 0.8 x 0.8 mm in-plane (x, y; slices stay 1 mm apart, so the context slices keep their distance), the
crop is resampled onto it (``geometry.GridMapping``, linear) and the probabilities go back to the crop's own grid,
where ``cdal evaluate`` scores them as usual. One magnification, fixed before the run.

The model is the session-7 ensemble (git a0a7bd4, three generators trained on 146 volumes with fold 0 held out),
scored on fold 0's 49 volumes (``configs/hippocampus_val.txt``), T = 2, K = 5, fp32, seed 0, paired per volume
(``tools/compare_reports.py``):

    python benchmarks/magnification_3d.py --model runs/s7 --spacing 0.8,0.8,1.0 --out-dir runs/s28/mag3d

Rule (written before the run): a lead for the cross-validation (fold models, a GPU session) if the mean of the two
classes' Dice gains >= +0.30 with more than 2 paired standard errors on fold 0, at its cost in time (reported);
otherwise reported only. Fold 0 is the easy fold (session 17), so fold 0 alone never ships a change.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def with_spacing(model: Path, spacing, dest: Path) -> Path:
    """A copy of ``model`` whose card puts its grid at ``spacing`` (mm, x y z)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model, dest)
    card_path = dest / "model.json"
    card = json.loads(card_path.read_text())
    card["input"]["spacing"] = list(spacing)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return dest


def evaluate(model: Path, data: str, cases: str, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "cdal_core.cli", "evaluate", "--model", str(model), "--data", data,
                    "--cases", cases, "--precision", "fp32", "--json", str(out), "--overwrite"], check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--spacing", default="0.8,0.8,1.0")
    ap.add_argument("--data", default="../shared/data/Task04_Hippocampus")
    ap.add_argument("--cases", default="configs/hippocampus_val.txt")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spacing = [float(v) for v in args.spacing.split(",")]
    magnified = with_spacing(Path(args.model), spacing, out / "model_magnified")
    evaluate(Path(args.model), args.data, args.cases, out / "plain.json")
    evaluate(magnified, args.data, args.cases, out / "magnified.json")
    subprocess.run([sys.executable, "tools/compare_reports.py", str(out / "plain.json"), str(out / "magnified.json"),
                    "--json", str(out / "paired.json")], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
