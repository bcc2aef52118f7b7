"""Review flags (cdal_core.quality): a structure whose mean uncertainty is far above what the model showed on
held-out scans is marked, with a note that says why; a scan where every structure is marked gets one note
that points at the scan itself."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdal_core.quality import limits_from_validation, mark_for_review, review_limits

CARD = {"description": "hippocampus on T1 MRI", "quality": {"review_uncertainty_above": {"A": 0.1, "P": 0.2},
                                                             "reference": "49 held-out scans"}}


def _rows(a, p, side="left"):
    return [{"side": side, "name": "A", "mean_uncertainty": a}, {"side": side, "name": "P", "mean_uncertainty": p}]


def test_only_structures_above_their_limit_are_marked():
    rows = _rows(0.15, 0.15)
    notes = mark_for_review(rows, CARD)
    assert [r["review"] for r in rows] == [True, False]
    assert len(notes) == 1 and "left A" in notes[0] and "0.150" in notes[0] and "49 held-out scans" in notes[0]
    rows = _rows(0.05, None)  # a class that was not segmented is not reviewed
    assert mark_for_review(rows, CARD) == [] and not any(r["review"] for r in rows)


def test_every_structure_marked_points_at_the_scan():
    notes = mark_for_review(_rows(0.3, 0.4) + _rows(0.5, 0.6, "right"), CARD)
    assert len(notes) == 1 and "every structure" in notes[0] and "0.300-0.600" in notes[0]
    assert "T1 MRI" in notes[0]


def test_a_card_without_limits_marks_nothing():
    rows = _rows(9.0, 9.0)
    assert mark_for_review(rows, {"description": "x"}) == [] and "review" not in rows[0]


def test_limits_follow_the_step_pooling_they_were_measured_with():
    # pooling the steps lowers the variance by about a third (session 23): limits of one pooling misfit another
    card = {"sampling": {"step_pooling": "mean"},
            "quality": {"review_uncertainty_above": {"A": 0.06}, "step_pooling": "mean",
                        "other_poolings": {"last": {"review_uncertainty_above": {"A": 0.1}}}}}
    assert review_limits(card) == {"A": 0.06} and review_limits(card, "mean") == {"A": 0.06}
    assert review_limits(card, "last") == {"A": 0.1}
    assert review_limits(card, "linear") == {}  # never measured: no flags rather than wrong ones
    rows = _rows(0.08, None)
    assert mark_for_review(rows, card, "last") == [] and mark_for_review(rows, card) != []
    old_card = {"quality": {"review_uncertainty_above": {"A": 0.1}}}  # before session 23: Algorithm 2's
    assert review_limits(old_card) == {"A": 0.1} and review_limits(old_card, "mean") == {}


def test_limits_are_twice_the_highest_held_out_value():
    assert limits_from_validation({"A": [0.01, 0.04, 0.02], "P": []}) == {"A": 0.08}


def test_set_review_limits_writes_the_card_from_an_evaluation_report(tmp_path):
    report = {"per_class": {"A": {}, "P": {}},
              "per_volume": [{"case": "x", "A_mean_uncertainty": 0.02, "P_mean_uncertainty": 0.03},
                             {"case": "y", "A_mean_uncertainty": 0.04, "P_mean_uncertainty": None}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    (tmp_path / "model.json").write_text(json.dumps({"name": "m"}))
    tool = Path(__file__).resolve().parents[2] / "tools" / "set_review_limits.py"
    subprocess.run([sys.executable, str(tool), "--report", str(tmp_path / "r.json"), "--card",
                    str(tmp_path / "model.json"), "--reference", "2 scans"], check=True, capture_output=True)
    quality = json.loads((tmp_path / "model.json").read_text())["quality"]
    assert (tmp_path / "model.json").stat().st_mode & 0o044 == 0o044  # readable by all, like any model file
    assert quality["review_uncertainty_above"] == {"A": 0.08, "P": 0.06}
    assert quality["per_class"]["A"] == {"scans": 2, "median": 0.03, "max": 0.04} and quality["reference"] == "2 scans"
    assert quality["step_pooling"] == "last" and "other_poolings" not in quality
    report["step_pooling"] = "mean"  # the same scans again, each sample pooling its steps: Algorithm 2's stay
    for row in report["per_volume"]:
        row["A_mean_uncertainty"] /= 2
    (tmp_path / "r.json").write_text(json.dumps(report))
    subprocess.run([sys.executable, str(tool), "--report", str(tmp_path / "r.json"), "--card",
                    str(tmp_path / "model.json"), "--reference", "2 scans, pooled"], check=True, capture_output=True)
    quality = json.loads((tmp_path / "model.json").read_text())["quality"]
    assert quality["review_uncertainty_above"]["A"] == 0.04 and quality["step_pooling"] == "mean"
    assert quality["other_poolings"]["last"]["review_uncertainty_above"] == {"A": 0.08, "P": 0.06}


def test_evaluate_reports_how_the_flags_fall_on_labelled_volumes(tiny_model, synthetic_dir):
    """A researcher with labels can check the flags on their own scans: per class, how many volumes were marked
    and the Dice of the marked and of the other volumes."""
    from cdal_core.data import read_msd_cases
    from cdal_core.evaluation import evaluate_cases, format_table
    from cdal_core.model_io import load_model
    model = load_model(tiny_model)
    cases, _ = read_msd_cases(synthetic_dir)
    plain = evaluate_cases(model, cases[:3], samples=2, device="cpu")
    assert "review" not in plain                                  # no limits in the card: nothing to report
    values = sorted(r["Anterior_mean_uncertainty"] for r in plain["per_volume"])
    model.card["quality"] = {"review_uncertainty_above": {"Anterior": (values[0] + values[1]) / 2}}
    report = evaluate_cases(model, cases[:3], samples=2, device="cpu")
    review = report["review"]["Anterior"]
    marked = [r for r in report["per_volume"] if r["Anterior_mean_uncertainty"] > review["limit"]]
    assert review["marked"] == len(marked) == 2 and "Posterior" in report["review"]
    assert review["dice_marked"] == pytest.approx(sum(r["Anterior_dice"] for r in marked) / 2)
    assert "review flags, Anterior: 2 of 3 volumes marked (Dice" in format_table(report)
