"""When to ask the user to review a result: a structure's mean uncertainty against held-out validation scans.

The ensemble's variance is low and steady on scans like the training data and rises when the input is not:
on the 49 held-out validation volumes of hippocampus fold 0 a structure's mean uncertainty never exceeded
0.043, the ICBM152 template gives 0.016-0.025, and the same template with its contrast inverted (T2-like) gives
0.15-0.21 while the model still returns plausible-looking volumes (docs/RESULTS.md, *Review flags*). A model card
may hold ``"quality": {"review_uncertainty_above": {class name: limit}, ...}``; a structure above its limit is
marked for review, with a note that says why. Cards without the block mark nothing.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

# The limit is this many times the highest mean uncertainty any structure reached on the held-out scans.
REVIEW_FACTOR = 2.0


def card_step_pooling(card: Dict) -> str:
    """A card's default pooling of each sample's step predictions (``sampling.step_pooling``; Algorithm 2's
    ``last`` for cards that do not say). Here, in a module without torch, so that Slicer's GUI can read it."""
    return str((card.get("sampling") or {}).get("step_pooling", "last"))


def review_limits(card: Dict, step_pooling: Optional[str] = None) -> Dict[str, float]:
    """{class name: mean-uncertainty limit} from the card for a run that pooled its steps this way (None: the
    card's ``sampling.step_pooling``); empty when the card has none for that pooling. Pooling the steps lowers the
    variance (by about a third on the hippocampus), so limits measured with one pooling do not fit another: the
    block's ``step_pooling`` says which its limits were measured with (``last`` when it does not say), and
    ``other_poolings`` may hold limits for others."""
    quality = card.get("quality") or {}
    run = step_pooling or card_step_pooling(card)
    if run == quality.get("step_pooling", "last"):
        limits = quality.get("review_uncertainty_above") or {}
    else:  # {pooling: a block like this one}
        limits = ((quality.get("other_poolings") or {}).get(run) or {}).get("review_uncertainty_above") or {}
    return {str(k): float(v) for k, v in limits.items() if v is not None}


def needs_review(class_name: str, mean_uncertainty: Optional[float], limits: Dict[str, float]) -> bool:
    limit = limits.get(class_name)
    return limit is not None and mean_uncertainty is not None and mean_uncertainty > limit


def mark_for_review(rows: List[Dict], card: Dict, step_pooling: Optional[str] = None) -> List[str]:
    """Sets ``row["review"]`` on each structure row (``name``, ``mean_uncertainty``, optional ``side``) and
    returns the notes to show the user: one per flagged structure, or one for all when every structure is
    flagged (then the scan itself is the likely cause). ``step_pooling``: see ``review_limits``."""
    limits = review_limits(card, step_pooling)
    if not limits:
        return []
    flagged = []
    for row in rows:
        row["review"] = needs_review(row["name"], row.get("mean_uncertainty"), limits)
        if row["review"]:
            flagged.append(row)
    if not flagged:
        return []
    reference = (card.get("quality") or {}).get("reference", "held-out validation scans")
    if len(flagged) == len(rows) and len(rows) > 1:
        return [f"review the whole result: every structure is far more uncertain (mean uncertainty "
                f"{_range(flagged)}) than on {reference}. Check that the image is what the model was trained on "
                f"({card.get('description', 'see its card')}) and that the region is right."]
    return [f"review {_label(row)}: mean uncertainty {row['mean_uncertainty']:.3f}, above {limits[row['name']]:.3f} "
            f"({REVIEW_FACTOR:g}x the highest on {reference})" for row in flagged]


def limits_from_validation(values: Dict[str, Sequence[float]]) -> Dict[str, float]:
    """{class: per-scan mean uncertainties on held-out scans} -> the card's limits."""
    return {name: round(REVIEW_FACTOR * max(v), 4) for name, v in values.items() if len(v)}


def _label(row: Dict) -> str:
    side = row.get("side")
    return f"{side} {row['name']}" if side and side != "unknown" else row["name"]


def _range(rows: Sequence[Dict]) -> str:
    values = [r["mean_uncertainty"] for r in rows]
    return f"{min(values):.3f}" if len(set(values)) == 1 else f"{min(values):.3f}-{max(values):.3f}"
