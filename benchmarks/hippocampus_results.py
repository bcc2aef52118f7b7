"""Validation table for the shipped hippocampus model: T in {2, 4} x samples in {1, 5, 10}.

Usage: python benchmarks/hippocampus_results.py [--model hippocampus] [--data ../shared/data/Task04_Hippocampus]
           [--cases configs/hippocampus_val.txt] [--settings 2x5,2x1,2x10,4x5] [--out docs/results]
Writes one JSON report per setting and prints a markdown table (Dice/IoU/precision/recall in %, HD95 in mm).
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.data import read_case_list, read_msd_cases, select_cases  # noqa: E402
from cdal_core.evaluation import evaluate_cases  # noqa: E402
from cdal_core.model_io import load_model  # noqa: E402


def markdown_row(setting: str, report: dict) -> str:
    cells = [setting]
    for name, row in report["per_class"].items():
        cells.append(f"{name}: {100 * row['dice']:.2f} ± {100 * row['dice_std']:.2f} / "
                     f"{100 * row['iou']:.2f} / {100 * row['precision']:.2f} / {100 * row['recall']:.2f} / "
                     f"{row['hd95']:.2f}")
    u = report.get("uncertainty", {})
    cells.append(f"{u.get('auroc', float('nan')):.3f} / {u.get('spearman_slice', float('nan')):.3f} / "
                 f"{u.get('ece', float('nan')):.4f}")
    cells.append(f"{report['seconds_per_volume']:.2f}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="hippocampus")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus"))
    p.add_argument("--cases", default=str(ROOT / "configs" / "hippocampus_val.txt"))
    p.add_argument("--settings", default="2x5,2x1,2x10,4x5,4x1,4x10")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (see cdal_core.inference)")
    p.add_argument("--full-sampling", action="store_true", help="every step on every slice (no early exit)")
    p.add_argument("--tag", default="", help="suffix of the report names, e.g. _fp32")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (vary it to see how much the noise moves Dice)")
    args = p.parse_args()
    model = load_model(args.model, device=args.device, with_discriminator=False)
    cases, _ = read_msd_cases(args.data)
    cases = select_cases(cases, read_case_list(args.cases), args.cases, args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| T x K | per class: Dice ± std / IoU / precision / recall / HD95 (mm) | AUROC / Spearman / ECE | s/vol |")
    print("|---|---|---|---|")
    for setting in args.settings.split(","):
        steps, samples = (int(v) for v in setting.split("x"))
        t0 = time.time()
        report = evaluate_cases(model, cases, steps=steps, samples=samples, seed=args.seed, device=args.device,
                                precision=args.precision, early_exit=not args.full_sampling)
        report.update({"steps": steps, "samples": samples, "seed": args.seed, "model": str(model.path), "wall_seconds": time.time() - t0})
        (out / f"hippocampus_T{steps}_K{samples}{args.tag}.json").write_text(json.dumps(report, indent=1))
        print(markdown_row(f"T={steps}, K={samples}", report), flush=True)


if __name__ == "__main__":
    main()
