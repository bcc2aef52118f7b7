"""Does a hippocampus model work on both sides of the head? (session 13)

A generator that never saw a left-right mirrored head learns the side its training crops come from (the
session-13 sagittal member: fold-0 Dice 85.2 / 83.6, on the same volumes mirrored 78.4 / 72.7). Two checks:

1. Labelled volumes and their left-right mirror images (voxels flipped along the image axis closest to
   left-right, geometry kept): Dice per class of each, and the paired difference (mirrored - original) ± its
   standard error. A two-sided model does not move.
2. The ICBM152 2009a template, which is left-right symmetric, through the whole-brain path: each structure's
   left and right volumes and their relative difference (the whole-brain test allows 4 %).

    python benchmarks/side_check.py --model runs/sagittal_mirror_cv0/model [--cases configs/hippocampus_val.txt]
        [--max-volumes 12] [--json docs/results/side_check.json]

One thread, T = the card's steps, 5 samples, seed = the case's index (as ``cdal evaluate``).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.data import read_case_list, read_msd_cases, select_cases  # noqa: E402
from cdal_core.inference import segment_image  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402


def left_right_index_axis(image: sitk.Image) -> int:
    """The image index axis (0 = i) whose direction is closest to the physical x (left-right) axis."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[0])))


def mirrored(image: sitk.Image, axis: int) -> sitk.Image:
    """The voxels flipped along index ``axis``, the geometry unchanged: the head's mirror image in place."""
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axis=2 - axis)))
    out.CopyInformation(image)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def mean_se(values):
    values = np.asarray(values, float)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return round(100 * float(values.mean()), 2), round(100 * se, 2)


def mirror_check(model, data: str, cases_file: str, max_volumes: int) -> dict:
    cases = select_cases(read_msd_cases(data)[0], read_case_list(cases_file), cases_file, data)[:max_volumes]
    classes = model.class_names[1:]
    rows = []
    for seed, case in enumerate(cases):
        image, truth = sitk.ReadImage(str(case.image)), sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        axis = left_right_index_axis(image)
        plain = sitk.GetArrayFromImage(segment_image(image, model, seed=seed).labels)
        flipped = segment_image(mirrored(image, axis), model, seed=seed).labels
        back = sitk.GetArrayFromImage(mirrored(flipped, axis))  # compare in the original's voxels
        row = {"case": case.name}
        for index, name in enumerate(classes, start=1):
            row[name] = [dice(plain == index, truth == index), dice(back == index, truth == index)]
        rows.append(row)
        print(case.name, " ".join(f"{n} {100 * row[n][0]:.1f} -> {100 * row[n][1]:.1f}" for n in classes), flush=True)
    summary = {}
    for name in classes:
        original = [r[name][0] for r in rows]
        mirror = [r[name][1] for r in rows]
        summary[name] = {"original": mean_se(original), "mirrored": mean_se(mirror),
                         "paired_difference": mean_se(np.subtract(mirror, original))}
    return {"cases": len(rows), "per_class": summary, "per_case": rows}


def template_check(model) -> dict:
    from cdal_core.demo import template_path
    from cdal_core.scan import segment_scan

    result = segment_scan(sitk.ReadImage(str(template_path())), model, seed=0)
    volumes = {(r["side"], r["name"]): r["volume_mm3"] for r in result.report["structures"]}
    out = {}
    for name in model.class_names[1:]:
        left, right = volumes[("left", name)], volumes[("right", name)]
        out[name] = {"left_mm3": left, "right_mm3": right,
                     "relative_difference": round(abs(left - right) / max((left + right) / 2, 1e-9), 4)}
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="hippocampus")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus"))
    p.add_argument("--cases", default=str(ROOT / "configs" / "hippocampus_val.txt"))
    p.add_argument("--max-volumes", type=int, default=12)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    report = {"model": args.model, "mirror": mirror_check(model, args.data, args.cases, args.max_volumes),
              "icbm152_template": template_check(model)}
    for name, row in report["mirror"]["per_class"].items():
        print(f"{name}: original {row['original'][0]:.2f}, mirrored {row['mirrored'][0]:.2f}, "
              f"paired {row['paired_difference'][0]:+.2f} ± {row['paired_difference'][1]:.2f}")
    for name, row in report["icbm152_template"].items():
        print(f"ICBM152 {name}: left {row['left_mm3']:.0f} mm³, right {row['right_mm3']:.0f} mm³ "
              f"({100 * row['relative_difference']:.1f} % apart)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
