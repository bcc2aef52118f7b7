"""Write a model card's review limits (``cdal_core.quality``) from an evaluation report on held-out scans.

    python tools/set_review_limits.py --report docs/results/review_reference_hippocampus.json \
        --card Resources/Models/hippocampus/model.json --reference "49 held-out validation scans (fold 0)"

The report is ``cdal evaluate --json`` on scans the shipped weights (or a replica of their recipe) never trained
on; each class's limit is ``quality.REVIEW_FACTOR`` times the highest per-scan mean uncertainty inside that class.
The card keeps the limits, the reference it names, the per-class median and maximum they came from, and the step
pooling the report was made with; limits the card had for another pooling move to ``other_poolings``.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdal_core.model_io import atomic_write_bytes, json_bytes  # noqa: E402
from cdal_core.quality import REVIEW_FACTOR, limits_from_validation  # noqa: E402


def class_values(report: dict) -> dict:
    """{class: [per-scan mean uncertainty inside the class]} from a report's per-volume (or per-image) rows."""
    rows = report.get("per_volume") or report.get("per_image") or []
    values = {}
    for name in report["per_class"]:
        found = [r[f"{name}_mean_uncertainty"] for r in rows if r.get(f"{name}_mean_uncertainty") is not None]
        if not found:
            raise SystemExit(f"the report has no {name}_mean_uncertainty per scan: re-run cdal evaluate with this "
                             "version of cdal_core")
        values[name] = found
    return values


def quality_block(report: dict, reference: str, source: str) -> dict:
    values = class_values(report)
    return {"review_uncertainty_above": limits_from_validation(values), "factor": REVIEW_FACTOR,
            "reference": reference, "source": source, "step_pooling": report.get("step_pooling", "last"),
            "per_class": {k: {"scans": len(v), "median": round(float(statistics.median(v)), 5),
                              "max": round(max(v), 5)} for k, v in values.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", required=True)
    p.add_argument("--card", required=True)
    p.add_argument("--reference", required=True, help="what the scans were, as the user will read it")
    args = p.parse_args()
    card_path = Path(args.card)
    card = json.loads(card_path.read_text())
    report = json.loads(Path(args.report).read_text())
    old = card.get("quality") or {}
    card["quality"] = new = quality_block(report, args.reference, os.path.relpath(args.report, ROOT))
    others = {k: v for k, v in (old.get("other_poolings") or {}).items() if k != new["step_pooling"]}
    if old.get("review_uncertainty_above") and old.get("step_pooling", "last") != new["step_pooling"]:
        others[old.get("step_pooling", "last")] = {k: v for k, v in old.items() if k != "other_poolings"}
    if others:
        new["other_poolings"] = others
    atomic_write_bytes(card_path, json_bytes(card))
    print(json.dumps(card["quality"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
