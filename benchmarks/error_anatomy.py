"""Where does a hippocampus model's Dice go: the outer boundary, or the head/body split? (issue 15)

Segments a case list (T = 2, K = 5, fp32, the card's pooling unless ``--step-pooling``) and splits the error in two:

- the outer boundary: Dice of the whole hippocampus (anterior + posterior against background);
- the split: Dice per class once the predicted hippocampus takes the reference's classes wherever both say
  hippocampus (a perfect split of the same outline), and once a plane is fitted to split it (logistic regression on
  voxel coordinates): to the reference's classes (how planar the reference's split is) and to the model's own
  (whether the model's split is a plane in the wrong place, or a ragged one);
- bias: the share of the overlap called anterior by the model and by the reference, and the predicted against the
  reference volume of the whole hippocampus;
- whether the uncertainty sees each part: Spearman over volumes of the mean variance inside the predicted
  hippocampus (what the review flags use) with the outline's and the split's Dice loss.

    python benchmarks/error_anatomy.py --model runs/s7 --data ../shared/data/Task04_Hippocampus \\
        --cases configs/hippocampus_val.txt --json docs/results/session24_error_anatomy_s7.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.data import read_case_list, read_label_map, read_msd_cases, select_cases  # noqa: E402
from cdal_core.evaluation import _read_case_image  # noqa: E402
from cdal_core.inference import segment_image  # noqa: E402
from cdal_core.metrics import spearman_correlation  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def plane_split(classes: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``region`` split in two by the plane that best separates class 1 from class 2 of ``classes`` on it
    (logistic regression on standardised voxel coordinates, a few Newton steps); 0 outside ``region``."""
    idx = np.argwhere(region).astype(np.float64)
    x = np.hstack([(idx - idx.mean(0)) / (idx.std(0) + 1e-6), np.ones((len(idx), 1))])
    y = (classes[region] == 1).astype(np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(25):
        p = 1 / (1 + np.exp(-x @ w))
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-3 * np.eye(len(w))
        w -= np.linalg.solve(hessian, x.T @ (p - y) + 1e-3 * w)
    out = np.zeros_like(classes)
    out[region] = np.where(x @ w > 0, 1, 2)
    return out


def anatomy(pred: np.ndarray, truth: np.ndarray) -> dict:
    both = (pred > 0) & (truth > 0)
    perfect = pred.copy()
    perfect[both] = truth[both]
    to_truth = plane_split(np.where(truth > 0, truth, pred), pred > 0)
    to_pred = plane_split(pred, pred > 0)
    row = {"whole": dice(pred > 0, truth > 0)}
    for name, labels in (("model", pred), ("perfect_split", perfect), ("plane_fit_to_reference", to_truth),
                         ("plane_fit_to_model", to_pred)):
        row[name] = [dice(labels == c, truth == c) for c in (1, 2)]
    row["anterior_share"] = {"model": float((pred[both] == 1).mean()), "reference": float((truth[both] == 1).mean())}
    row["volume_ratio"] = float((pred > 0).sum() / max((truth > 0).sum(), 1))
    return row


def mean_se(values) -> list:
    v = np.asarray(values, np.float64)
    return [round(float(v.mean()), 4), round(float(v.std(ddof=1) / np.sqrt(len(v))), 4)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--cases", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-pooling", default=None)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    model = load_model(args.model)
    cases, _ = read_msd_cases(args.data)
    cases = select_cases(cases, read_case_list(args.cases), args.cases, args.data)
    rows = []
    for case in cases:
        image, _ = _read_case_image(case.image, model.config.image_channels)
        truth = read_label_map(case.label, image, 3)
        result = segment_image(image, model, seed=args.seed, precision="fp32", with_attention=False,
                               step_pooling=args.step_pooling)
        labels = sitk.GetArrayFromImage(result.labels).astype(np.uint8)
        variance = sitk.GetArrayFromImage(result.uncertainty)
        rows.append({"case": case.name, **anatomy(labels, truth),
                     "mean_uncertainty": float(variance[labels > 0].mean()) if (labels > 0).any() else 0.0})
    summary = {"whole": mean_se([r["whole"] for r in rows])}
    for key in ("model", "perfect_split", "plane_fit_to_reference", "plane_fit_to_model"):
        summary[key] = {c: mean_se([r[key][i] for r in rows]) for i, c in enumerate(("Anterior", "Posterior"))}
    summary["plane_fit_to_model_minus_model"] = {
        c: mean_se([r["plane_fit_to_model"][i] - r["model"][i] for r in rows])
        for i, c in enumerate(("Anterior", "Posterior"))}
    summary["anterior_share_model_minus_reference"] = mean_se(
        [r["anterior_share"]["model"] - r["anterior_share"]["reference"] for r in rows])
    summary["anterior_share_abs_difference"] = mean_se(
        [abs(r["anterior_share"]["model"] - r["anterior_share"]["reference"]) for r in rows])
    summary["volume_ratio"] = mean_se([r["volume_ratio"] for r in rows])
    uncertainty = [r["mean_uncertainty"] for r in rows]
    summary["spearman_mean_uncertainty_with"] = {
        "outline_loss": round(spearman_correlation(uncertainty, [1 - r["whole"] for r in rows]), 3),
        "split_loss": round(spearman_correlation(uncertainty, [np.mean(r["perfect_split"]) - np.mean(r["model"])
                                                               for r in rows]), 3)}
    report = {"model": args.model, "cases": args.cases, "seed": args.seed, "step_pooling": args.step_pooling,
              "summary": summary, "per_volume": rows}
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
