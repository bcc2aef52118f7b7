"""Does a left-right flip for some of the 5 samples help, at the same cost? (issue 15, test-time augmentation)

For each validation volume: the default (5 samples over the 3 generators: 2 + 2 + 1) against the same 5 samples
split 3 on the scan + 2 on its left-right mirror (flipped back), i.e. the same generator allocation (2 + 2 + 1)
with two of the samples seeing the mirror. Prints per-class Dice of both and the paired difference with its
standard error over volumes (the comparison that decides; volumes are the unit of noise).

    python benchmarks/tta_experiment.py [--cases configs/hippocampus_val.txt] [--out docs/results/tta_flip.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.data import read_case_list, read_msd_cases, select_cases  # noqa: E402
from cdal_core.inference import segment_image  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402


def dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    p, t = pred == c, truth == c
    return 2.0 * float((p & t).sum()) / max(float(p.sum() + t.sum()), 1.0)


def mirrored(image: sitk.Image) -> sitk.Image:
    """The RAS-oriented scan mirrored left-right in its array, geometry unchanged (the model sees a mirror)."""
    array = sitk.GetArrayFromImage(image)[:, :, ::-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.CopyInformation(image)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="hippocampus")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus"))
    p.add_argument("--cases", default=str(ROOT / "configs" / "hippocampus_val.txt"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "tta_flip.json"))
    args = p.parse_args()
    model = load_model(args.model, with_discriminator=False)
    cases, _ = read_msd_cases(args.data)
    cases = select_cases(cases, read_case_list(args.cases), args.cases, args.data)
    names = model.class_names
    rows, start = [], time.time()
    for case in cases:
        image = sitk.DICOMOrient(sitk.ReadImage(str(case.image)), "RAS")
        truth = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(case.label)), "RAS"))
        plain = segment_image(image, model, samples=5, seed=0, with_attention=False).probabilities
        part = segment_image(image, model, samples=3, seed=0, with_attention=False).probabilities
        mirror = segment_image(mirrored(image), model, samples=2, seed=1, with_attention=False).probabilities
        pooled = (3 * part + 2 * mirror[..., ::-1]) / 5
        row = {"case": case.name}
        for c in range(1, len(names)):
            row[f"{names[c]} plain"] = dice(plain.argmax(0), truth, c)
            row[f"{names[c]} flip"] = dice(pooled.argmax(0), truth, c)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    summary = {"volumes": len(rows), "seconds": round(time.time() - start, 1), "per_class": {}}
    for c in range(1, len(names)):
        a = np.array([r[f"{names[c]} plain"] for r in rows])
        b = np.array([r[f"{names[c]} flip"] for r in rows])
        d = b - a
        summary["per_class"][names[c]] = {"plain": round(100 * a.mean(), 2), "flip": round(100 * b.mean(), 2),
                                          "paired_diff": round(100 * d.mean(), 3),
                                          "paired_se": round(100 * d.std(ddof=1) / np.sqrt(len(d)), 3)}
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
