"""Pool the per-fold ``cdal evaluate --json`` reports of a k-fold cross-validation into one report.

    python tools/cross_validation.py FOLD0.json FOLD1.json ... [--folds configs/hippocampus_folds.json] --json OUT

Each report scores the model that held that fold out, on that fold. The pooled report has every case once
(``per_volume``), so ``tools/compare_reports.py`` compares two pooled recipes case by case. Its summary gives, per
class, the mean Dice over all cases with its standard error (between cases), the fold means, and the standard
error from the spread of the fold means (which also holds the model-to-model spread: each fold has its own model).
``--folds`` checks that the reports cover exactly the folds' cases, each once. Each row keeps its ``fold``, so
``compare_reports`` also gives the paired difference fold by fold: its spread holds the run-to-run noise of
training that the per-case standard error misses (one model per fold and recipe).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_reports, also when imported as a module (tests)
from compare_reports import is_number, finite_or_null, mean_se  # noqa: E402


def _scores(rows: List[Dict], key: str) -> List[float]:
    """The rows' ``key`` in %, leaving out cases without a score (null, or NaN in older reports)."""
    return [100 * row[key] for row in rows if is_number(row[key])]


def _mean_of_numbers(values: List) -> Optional[float]:
    numbers = [v for v in values if is_number(v)]
    return round(sum(numbers) / len(numbers), 4) if numbers else None


def _mean_se_or_none(values: List[float]):
    """``mean_se`` of the scored values; (None, None) when no case has a score."""
    return mean_se(values) if values else (None, None)


def pool(reports: List[Dict], folds: Optional[List[List[str]]] = None) -> Dict:
    """One report from per-fold reports: ``per_volume`` concatenated, ``summary`` per class (Dice in %)."""
    rows = [dict(row, fold=k) for k, report in enumerate(reports) for row in report["per_volume"]]
    cases = [row["case"] for row in rows]
    repeated = sorted({c for c in cases if cases.count(c) > 1})
    if repeated:
        raise SystemExit(f"cases scored in more than one fold report: {repeated[:5]}: give each fold's report once")
    if folds is not None:
        if len(folds) != len(reports):
            raise SystemExit(f"{len(reports)} reports for {len(folds)} folds: give one report per fold, in fold order")
        for k, (names, report) in enumerate(zip(folds, reports)):
            got = {row["case"] for row in report["per_volume"]}
            if got != set(names):
                raise SystemExit(f"report {k + 1} does not cover fold {k} exactly ({len(got - set(names))} cases "
                                 f"outside it, {len(set(names) - got)} missing): evaluate with that fold's case list")
    keys = sorted(k for k in rows[0] if k.endswith("_dice"))
    summary = {"cases": len(rows), "folds": len(reports)}
    for key in keys:
        mean, se = _mean_se_or_none(_scores(rows, key))
        if mean is None:
            continue
        # one entry per fold, in fold order (None: no case of that fold has a score)
        fold_means = [_mean_se_or_none(_scores(report["per_volume"], key))[0] for report in reports]
        scored = [m for m in fold_means if m is not None]
        summary[key] = {"mean": round(mean, 2), "se_cases": round(se, 2),
                        "fold_means": [None if m is None else round(m, 2) for m in fold_means],
                        "se_folds": round(mean_se(scored)[1], 2)}
    uncertainty = [r["uncertainty"] for r in reports if r.get("uncertainty")]
    if len(uncertainty) == len(reports):
        summary["uncertainty_fold_mean"] = {k: _mean_of_numbers([u.get(k) for u in uncertainty])
                                            for k in uncertainty[0]}
    return {"per_volume": rows, "summary": summary, "models": [r.get("model") for r in reports]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="one report per fold, in fold order")
    parser.add_argument("--folds", type=Path, help="JSON with 'folds': lists of case names, to check coverage")
    parser.add_argument("--json", type=Path, help="write the pooled report here")
    args = parser.parse_args(argv)
    folds = json.loads(args.folds.read_text())["folds"] if args.folds else None
    pooled = pool([json.loads(p.read_text()) for p in args.reports], folds)
    s = pooled["summary"]
    print(f"{s['cases']} cases in {s['folds']} folds")
    for key, r in s.items():
        if key.endswith("_dice"):
            print(f"  {key:16s} {r['mean']:6.2f} ± {r['se_cases']:.2f} (cases) ± {r['se_folds']:.2f} (folds); "
                  f"folds {', '.join(f'{m:.2f}' for m in r['fold_means'])}")
    if "uncertainty_fold_mean" in s:
        print("  uncertainty (mean over folds):", s["uncertainty_fold_mean"])
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(finite_or_null(pooled), indent=1, allow_nan=False) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    sys.exit(main())
