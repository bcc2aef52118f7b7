"""tools/compare_reports.py (paired differences), tools/cross_validation.py (pooled folds), tools/add_member.py."""

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


def _card(landmarks, upper=99.5):
    return {"normalisation": {"method": "percentile+histogram-standardisation", "lower": 0.5, "upper": upper,
                              "landmarks": landmarks}}


def test_a_member_adopts_landmarks_that_differ_within_the_tolerance_and_records_its_own():
    card, adopted = load_tool("add_member").adopt_normalisation(_card([0.1, 0.5, 0.9]), _card([0.102, 0.499, 0.9]))
    assert card["normalisation"]["landmarks"] == [0.1, 0.5, 0.9]
    assert adopted == {"trained_with_landmarks": [0.102, 0.499, 0.9], "max_landmark_difference": 0.002}


@pytest.mark.parametrize("member, why", [(_card([0.1, 0.55, 0.9]), "differ by up to 0.05"),
                                         (_card([0.1, 0.5, 0.9], upper=99.0), "upper differ"),
                                         (_card([0.1, 0.5]), "number of landmarks")])
def test_a_member_with_another_intensity_scale_is_refused(member, why):
    with pytest.raises(SystemExit, match=why):
        load_tool("add_member").adopt_normalisation(_card([0.1, 0.5, 0.9]), member)


def _fold_report(cases, dice):
    return {"per_volume": [{"case": c, "Anterior_dice": d} for c, d in zip(cases, dice)],
            "uncertainty": {"auroc": 0.9}}


def test_cross_validation_pools_every_case_once_and_keeps_the_fold_means():
    folds = [["a", "b"], ["c", "d"]]
    pooled = load_tool("cross_validation").pool([_fold_report(folds[0], [0.80, 0.90]),
                                                 _fold_report(folds[1], [0.60, 0.70])], folds)
    s = pooled["summary"]["Anterior_dice"]
    assert [r["case"] for r in pooled["per_volume"]] == ["a", "b", "c", "d"]
    assert s["mean"] == pytest.approx(75.0) and s["fold_means"] == [85.0, 65.0]
    assert s["se_folds"] == pytest.approx(10.0)  # sd of (85, 65) over sqrt(2)
    # the pooled report pairs with another recipe's, case by case
    other = load_tool("cross_validation").pool([_fold_report(folds[0], [0.81, 0.91]),
                                                _fold_report(folds[1], [0.61, 0.71])], folds)
    assert load_tool("compare_reports").compare(pooled, other)["Anterior_dice"]["paired_diff"] == pytest.approx(1.0)


@pytest.mark.parametrize("reports, why", [
    ([_fold_report(["a", "b"], [0.8, 0.9]), _fold_report(["b", "c"], [0.8, 0.9])], "more than one fold"),
    ([_fold_report(["a", "b"], [0.8, 0.9]), _fold_report(["c"], [0.8])], "does not cover fold 1"),
    ([_fold_report(["a", "b"], [0.8, 0.9])], "1 reports for 2 folds")])
def test_cross_validation_refuses_reports_that_do_not_match_the_folds(reports, why):
    with pytest.raises(SystemExit, match=why):
        load_tool("cross_validation").pool(reports, [["a", "b"], ["c", "d"]])


def test_pooled_recipes_are_also_compared_fold_by_fold():
    folds = [["a", "b"], ["c", "d"]]
    cv = load_tool("cross_validation")
    base = cv.pool([_fold_report(folds[0], [0.80, 0.90]), _fold_report(folds[1], [0.60, 0.70])], folds)
    # the new recipe gains 3 points in fold 0 and nothing in fold 1: one lucky run, not a steady gain
    cand = cv.pool([_fold_report(folds[0], [0.83, 0.93]), _fold_report(folds[1], [0.60, 0.70])], folds)
    r = load_tool("compare_reports").compare(base, cand)["Anterior_dice"]
    assert r["paired_by_fold"] == [3.0, 0.0]
    assert r["paired_se_folds"] == pytest.approx(1.5)
    assert r["paired_se"] < r["paired_se_folds"]  # the per-case s.e. misses the run-to-run spread


def test_cases_without_a_score_are_left_out_of_the_pairing_and_counted():
    base = _report([0.70, None, 0.90, float("nan")])
    cand = _report([0.72, 0.85, 0.92, 0.50])
    r = load_tool("compare_reports").compare(base, cand)
    assert r["Anterior_dice"]["paired_diff"] == pytest.approx(2.0)  # only c0 and c2 have both scores
    assert r["cases_without_a_score"] == {"Anterior_dice": 2}


def test_pooled_folds_skip_missing_scores_and_write_strict_json(tmp_path):
    cv = load_tool("cross_validation")
    folds = [["a", "b"], ["c"]]
    reports = [_fold_report(folds[0], [0.80, None]), _fold_report(folds[1], [0.60])]
    reports[1]["uncertainty"] = {"auroc": None}
    pooled = cv.pool(reports, folds)
    s = pooled["summary"]
    assert s["Anterior_dice"]["fold_means"] == [80.0, 60.0]
    assert s["uncertainty_fold_mean"] == {"auroc": 0.9}
    paths = []
    for k, r in enumerate(reports):
        paths.append(tmp_path / f"f{k}.json")
        paths[-1].write_text(__import__("json").dumps(r))
    cv.main([str(p) for p in paths] + ["--json", str(tmp_path / "pooled.json")])
    text = (tmp_path / "pooled.json").read_text()
    assert "NaN" not in text and __import__("json").loads(text)["per_volume"][1]["Anterior_dice"] is None
    # one scored case in one fold: both standard errors are undefined, written as null; a class no case scores
    # is left out rather than dividing by zero
    lone = [{"per_volume": [{"case": "a", "Anterior_dice": 0.8, "Posterior_dice": None}]}]
    (tmp_path / "lone.json").write_text(__import__("json").dumps(lone[0]))
    cv.main([str(tmp_path / "lone.json"), "--json", str(tmp_path / "lone_pooled.json")])
    summary = __import__("json").loads((tmp_path / "lone_pooled.json").read_text())["summary"]
    assert summary["Anterior_dice"]["se_cases"] is None and summary["Anterior_dice"]["se_folds"] is None
    assert "Posterior_dice" not in summary
