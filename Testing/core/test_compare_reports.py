"""tools/compare_reports.py: the paired difference of two evaluation reports and its standard error."""

import pytest

from core_settings import load_tool


def _report(dice):
    return {"per_volume": [{"case": f"c{i}", "Anterior_dice": d} for i, d in enumerate(dice)]}


def test_paired_difference_cancels_the_spread_shared_by_both_models():
    base = [0.70, 0.80, 0.90, 0.60]
    better = [d + 0.01 + e for d, e in zip(base, (0.001, -0.001, 0.001, -0.001))]
    r = load_tool("compare_reports").compare(_report(base), _report(better))["Anterior_dice"]
    assert r["paired_diff"] == pytest.approx(1.0, abs=0.01)
    assert r["paired_se"] < 0.1 < r["baseline_se"]  # the case-to-case spread is gone from the difference
    assert r["candidate"] - r["baseline"] == pytest.approx(1.0, abs=0.01)


def test_reports_on_different_cases_are_refused():
    with pytest.raises(SystemExit, match="different cases"):
        load_tool("compare_reports").compare(_report([0.8, 0.9]), _report([0.8, 0.9, 0.7]))
