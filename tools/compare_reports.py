"""Paired comparison of two ``cdal evaluate --json`` reports on the same cases.

    python tools/compare_reports.py BASELINE.json CANDIDATE.json [--json OUT]

For every class, prints the mean Dice of each report with its standard error and the paired difference
(candidate - baseline, per case) with its standard error, which is what decides between two models scored on
the same cases: the per-case spread shared by both models cancels in the difference.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List


def _per_case(report: Dict) -> Dict[str, Dict[str, float]]:
    rows = report.get("per_volume") or report.get("per_image") or report.get("per_case")
    if not rows:
        raise SystemExit("the report has no per-case rows (per_volume / per_image): re-run cdal evaluate --json")
    return {row["case"]: row for row in rows}


def is_number(value) -> bool:
    """A score, not a missing one: reports write an undefined metric as null (older ones as NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def finite_or_null(value):
    """``value`` with NaN (e.g. the standard error of a single case) written as None: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def mean_se(values: List[float]):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compare(baseline: Dict, candidate: Dict) -> Dict:
    """Per class: baseline and candidate mean Dice ± s.e. and the paired difference ± s.e. (all in %)."""
    a, b = _per_case(baseline), _per_case(candidate)
    cases = sorted(set(a) & set(b))
    if len(cases) != len(a) or len(cases) != len(b):
        raise SystemExit(f"the reports cover different cases ({len(a)} and {len(b)}, {len(cases)} shared): "
                         "evaluate both on the same --cases list")
    keys = sorted(k for k in a[cases[0]] if k.endswith("_dice") and k in b[cases[0]])
    out = {"cases": len(cases)}
    for key in keys:
        scored = [c for c in cases if is_number(a[c][key]) and is_number(b[c][key])]
        x = [100 * a[c][key] for c in scored]
        y = [100 * b[c][key] for c in scored]
        if not scored:
            continue
        (mx, sx), (my, sy) = mean_se(x), mean_se(y)
        md, sd = mean_se([q - p for p, q in zip(x, y)])
        if len(scored) < len(cases):  # a class absent from both reference and prediction has no Dice
            out.setdefault("cases_without_a_score", {})[key] = len(cases) - len(scored)
        out[key] = {"baseline": round(mx, 2), "baseline_se": round(sx, 2), "candidate": round(my, 2),
                    "candidate_se": round(sy, 2), "paired_diff": round(md, 2), "paired_se": round(sd, 2)}
        folds = sorted({a[c]["fold"] for c in scored}) if all("fold" in a[c] for c in scored) else []
        if len(folds) > 1:  # pooled cross-validations: one model per fold, so folds also differ by training noise
            by_fold = [mean_se([100 * (b[c][key] - a[c][key]) for c in scored if a[c]["fold"] == k])[0]
                       for k in folds]
            out[key].update(paired_by_fold=[round(d, 2) for d in by_fold],
                            paired_se_folds=round(mean_se(by_fold)[1], 2))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    result = compare(json.loads(args.baseline.read_text()), json.loads(args.candidate.read_text()))
    print(f"{result['cases']} cases, candidate {args.candidate} - baseline {args.baseline}")
    for key, r in result.items():
        if key.endswith("_dice"):
            print(f"  {key:22s} {r['baseline']:6.2f} ± {r['baseline_se']:.2f} -> {r['candidate']:6.2f} ± "
                  f"{r['candidate_se']:.2f}   paired {r['paired_diff']:+.2f} ± {r['paired_se']:.2f}"
                  + (f" (cases) ± {r['paired_se_folds']:.2f} (folds); by fold "
                     + ", ".join(f"{d:+.2f}" for d in r["paired_by_fold"]) if "paired_by_fold" in r else ""))
    for key, n in result.get("cases_without_a_score", {}).items():
        print(f"  {key}: {n} case(s) without a score in either report left out of its comparison")
    if args.json:
        args.json.write_text(json.dumps(finite_or_null(result), indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
