"""Does the whole-head box show the model hippocampi the way it learnt them? (session 16)

Three measurements, written to one JSON:
1. ``msd``: the dip of the hippocampus' long axis below the axial plane in MSD Task04's labels (the training data).
2. ``heads``: the same dip of the model's own segmentation in the whole-head boxes of ``../shared/data/T1w_heads``,
   for each box pitch in ``--head-pitches`` (0 = template-aligned, the default before session 16).
3. ``fold0``: labelled. Each held-out crop is turned about its left-right axis so that its hippocampus dips as in
   the real heads' template-aligned boxes (drawn from N(mean, sd) of measurement 2 at pitch 0), then segmented
   with and without the box pitch correction; probabilities are mapped back to the crop's own grid and scored
   against its labels (paired, ± the standard error of the per-case difference). ``adaptive`` is what
   ``segment_scan`` does: a quick look in the default box measures the dip, then the box turns to MSD's dip.

    python benchmarks/box_pitch_check.py --model runs/s7 --out docs/results/session16_box_pitch.json

``--model`` should not have trained on fold 0 (``configs/hippocampus_val.txt``) for step 3 to mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cdal_core.inference import segment_image  # noqa: E402
from cdal_core.localise import HIPPOCAMPUS_PITCH_DEG, MSD_DIP_DEG, dip_degrees, locate  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def msd_dips(cases: Sequence[str]) -> List[float]:
    folder = DATA / "Task04_Hippocampus" / "labelsTr"
    # MSD crops are 1 mm and stored RAS-like (LPS direction diag(-1, -1, 1)): arrays are (S, A, R) as in a box
    return [dip_degrees(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{c}.nii.gz"))) > 0) for c in cases]


def head_dips(model, pitches: Sequence[float]) -> List[Dict]:
    rows = []
    for path in sorted((DATA / "T1w_heads").glob("*.nii.gz")):
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        fill = float(np.percentile(sitk.GetArrayViewFromImage(image)[::3, ::3, ::3], 0.5))
        for region in locate(image).regions:
            for pitch in pitches:
                crop = dataclasses.replace(region, pitch_deg=pitch).crop(image, fill=fill)
                res = segment_image(crop, model, samples=5, seed=0, with_attention=False)
                labels = sitk.GetArrayFromImage(res.labels)
                rows.append({"scan": path.name, "side": region.side, "box_pitch": pitch,
                             "dip_in_box": round(dip_degrees(labels > 0), 2),
                             "voxels": int((labels > 0).sum()),
                             "mean_variance": float(sitk.GetArrayViewFromImage(res.uncertainty)[labels > 0].mean())})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def turned(image: sitk.Image, degrees: float) -> sitk.Euler3DTransform:
    """Turn about the crop's centre and left-right axis; negative makes the hippocampus dip more."""
    t = sitk.Euler3DTransform()
    t.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    t.SetRotation(np.deg2rad(degrees), 0.0, 0.0)
    return t


def probabilities_back(model, moved: sitk.Image, grid: sitk.Image,
                       transform: Optional[sitk.Transform]) -> np.ndarray:
    """Segment ``moved`` (``grid``'s image resampled through ``transform``, or ``grid``'s own when None) and
    map its class probabilities back onto ``grid``: (C, Z, Y, X), -1 where the moved image had no data."""
    res = segment_image(moved, model, samples=5, seed=0, with_attention=False)
    if transform is None:
        return np.stack(res.probabilities)
    back = []
    for probs in res.probabilities:
        p = sitk.GetImageFromArray(probs)
        p.CopyInformation(grid)
        back.append(sitk.GetArrayFromImage(sitk.Resample(p, grid, transform.GetInverse(), sitk.sitkLinear, -1.0)))
    return np.stack(back)


def class_scores(found: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> Dict[int, Tuple[float, float]]:
    """Label 1 (anterior) and 2 (posterior): Dice and found / true voxel ratio, counted on ``valid`` voxels."""
    scores = {}
    for label in (1, 2):
        a, b = (found == label) & valid, (labels == label) & valid
        scores[label] = (float(2 * np.sum(a & b) / max(a.sum() + b.sum(), 1)), float(a.sum() / max(b.sum(), 1)))
    return scores


def scored_turned(model, image: sitk.Image, labels: np.ndarray, degrees: float) -> Dict[str, float]:
    """Segment the crop turned by ``degrees``, map the probabilities back, Dice per class on the valid part."""
    t = turned(image, degrees)
    back = probabilities_back(model, sitk.Resample(image, image, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32), image, t)
    scores = class_scores(back.argmax(axis=0), labels, back[0] >= 0)
    return {"anterior": scores[1][0], "posterior": scores[2][0]}


def paired(rows: List[Dict], a: str, b: str, name: str) -> str:
    d = np.array([r[b][name] - r[a][name] for r in rows]) * 100
    return f"{np.mean(d):+.2f} ± {np.std(d, ddof=1) / np.sqrt(len(d)):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--head-pitches", default=f"0,{HIPPOCAMPUS_PITCH_DEG:g}")
    parser.add_argument("--corrections", default=f"{HIPPOCAMPUS_PITCH_DEG:g}")
    args = parser.parse_args()
    model = load_model(args.model)
    images = DATA / "Task04_Hippocampus" / "imagesTr"
    every = sorted(p.name[:-7] for p in images.glob("*.nii.gz"))
    fold0 = [c for c in (REPO / "configs" / "hippocampus_val.txt").read_text().split() if not c.startswith("#")
             and c.startswith("hippocampus_")]
    msd = msd_dips(every)
    heads = head_dips(model, [float(v) for v in args.head_pitches.split(",")])
    at_zero = np.array([r["dip_in_box"] for r in heads if r["box_pitch"] == 0.0])
    rng = np.random.default_rng(1)
    corrections = [float(v) for v in args.corrections.split(",")]
    rows = []
    for case in fold0:
        image = sitk.ReadImage(str(images / f"{case}.nii.gz"), sitk.sitkFloat32)
        label_image = sitk.ReadImage(str(images.parent / "labelsTr" / f"{case}.nii.gz"))
        labels = sitk.GetArrayFromImage(label_image)
        native = dip_degrees(labels > 0)
        target = float(rng.normal(at_zero.mean(), at_zero.std()))
        row = {"case": case, "native_dip": native, "dip_in_box": target,
               "template_aligned": scored_turned(model, image, labels, target - native)}
        for c in corrections:
            row[f"pitch {c:g}"] = scored_turned(model, image, labels, target - c - native)
        # as segment_scan does: a quick look at the default box finds the dip, then the box turns to MSD's
        first = target - HIPPOCAMPUS_PITCH_DEG - native
        quick = segment_image(sitk.Resample(image, image, turned(image, first), sitk.sitkLinear, 0.0, sitk.sitkFloat32),
                              model, steps=1, samples=1, seed=0, with_attention=False)
        found = dip_degrees(sitk.GetArrayViewFromImage(quick.labels) > 0)
        row["quick_dip"] = found
        row["adaptive"] = scored_turned(model, image, labels, first + MSD_DIP_DEG - found)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "model": args.model,
        "msd_dip": {"mean": float(np.mean(msd)), "sd": float(np.std(msd)), "n": len(msd)},
        "heads_dip_at_pitch_0": {"mean": float(at_zero.mean()), "sd": float(at_zero.std()), "n": int(at_zero.size)},
        "fold0": {name: {"template_aligned": float(np.mean([r["template_aligned"][name] for r in rows])) * 100,
                         **{arm: float(np.mean([r[arm][name] for r in rows])) * 100
                            for arm in [f"pitch {c:g}" for c in corrections] + ["adaptive"]},
                         **{f"paired {arm}": paired(rows, "template_aligned", arm, name)
                            for arm in [f"pitch {c:g}" for c in corrections] + ["adaptive"]},
                         f"paired adaptive - pitch {corrections[0]:g}": paired(rows, f"pitch {corrections[0]:g}",
                                                                              "adaptive", name)}
                  for name in ("anterior", "posterior")},
        "heads": heads, "cases": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("msd_dip", "heads_dip_at_pitch_0", "fold0")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
