"""Declared groups (flywheel.yaml ``groups``, docs/fairness.md): each held-out interaction's group,
its slice, and the gate's protected groups."""

from __future__ import annotations

import polars as pl
import pytest
from pydantic import ValidationError

from flywheel_pipeline import groups
from flywheel_pipeline.config import Groups
from flywheel_pipeline.health.fairness import fairness
from flywheel_pipeline.validation import gate
from flywheel_pipeline.validation.evidence import slice_masks
from flywheel_pipeline.validation.report import SliceResult
from tests.test_validation import GATE, comparison, report_with

PROTECT_B = Groups(protected=["b"], min_samples=100, max_regression=0.02)


def units(segments: list[str | None], users: list[str] | None = None) -> pl.DataFrame:
    return pl.DataFrame({"user_id": users or [f"u{i}" for i in range(len(segments))], "segment": segments,
                         "is_new_user": [False] * len(segments)}, schema_overrides={"segment": pl.String})


def test_a_group_from_the_segment_is_its_own_slice_and_not_repeated_as_a_segment():
    assigned = groups.assign(units(["a", "b", "b", None]), Groups(protected=["b"]))
    masks = slice_masks(assigned)
    hashed_a = "group_" + groups.anonymous("a")  # a segment's value is named only when declared (protected)
    assert [name for name in masks if name.startswith(("group_", "segment_"))] == ["group_b", hashed_a]
    assert masks["group_b"].tolist() == [False, True, True, False]
    undeclared = slice_masks(groups.assign(units(["a", "b"]), None))
    assert "segment_" + groups.anonymous("a") in undeclared and not any(name.startswith("group_") for name in undeclared)


def test_a_users_file_maps_users_to_groups_for_evaluation_only(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("user_id,group\nu0,north\nu2,south\n")
    assigned = groups.assign(units(["a", "a", "b"]), Groups(field=None, users_file=path))
    assert assigned["group"].to_list() == ["north", None, "south"]
    masks = slice_masks(assigned)
    assert "segment_" + groups.anonymous("a") in masks and masks["group_south"].tolist() == [False, False, True]

    path.write_text("user_id,team\nu0,north\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['group'\]"):
        groups.assign(units(["a"]), Groups(field=None, users_file=path))
    path.write_text("user_id,group\nu0,north\nu0,south\n")
    with pytest.raises(ValueError, match=r"lists user\(s\) \['u0'\] more than once"):
        groups.assign(units(["a"]), Groups(field=None, users_file=path))


def test_groups_name_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one source of groups"):
        Groups(field=None)
    with pytest.raises(ValidationError, match="exactly one source of groups"):
        Groups(field="segment", users_file="groups.csv")


def test_an_aggregate_gain_does_not_buy_a_protected_groups_loss():
    """+0.03 overall, but the protected group b drops 0.08 (se 0.02): failed, naming b; the same
    drop in a group nobody protected is only the generic slice test (0.05 margin), which it passes."""
    report = report_with({"all": (2000, 0.03, 0.01), "group_a": (1700, 0.05, 0.01), "group_b": (300, -0.08, 0.02)})
    decision = gate(report, GATE, groups=PROTECT_B)
    assert decision.outcome == "failed"
    [reason] = [r for r in decision.reasons if r.startswith("group_regression")]
    assert "protected group b dr changed -0.0800" in reason and "groups.max_regression 0.02" in reason
    assert gate(report, GATE, groups=Groups(protected=["a"])).outcome == "passed"


def test_a_protected_group_too_small_to_judge_leaves_the_gate_inconclusive():
    report = report_with({"all": (2000, 0.03, 0.01), "group_a": (1950, 0.03, 0.01), "group_b": (50, 0.0, 0.05)})
    decision = gate(report, GATE, groups=PROTECT_B)
    assert decision.outcome == "inconclusive"
    assert decision.reasons == [("group_evidence: protected group b has 50 held-out interactions < "
                                 "groups.min_samples 100; the aggregate cannot vouch for it")]
    absent = gate(report_with({"all": (2000, 0.03, 0.01)}), GATE, groups=Groups(protected=["c"]))
    assert absent.outcome == "inconclusive" and "protected group c has 0 held-out" in absent.reasons[0]


def test_a_protected_group_must_be_shown_within_its_margin_to_pass():
    """-0.005 +- 0.0082: shown within 0.02, passes; -0.01 +- 0.0164: a drop beyond 0.02 is not
    ruled out (nor shown), inconclusive for that group."""
    assert gate(report_with({"all": (2000, 0.03, 0.01), "group_b": (400, -0.005, 0.005)}), GATE, groups=PROTECT_B).passed
    decision = gate(report_with({"all": (2000, 0.03, 0.01), "group_b": (400, -0.01, 0.01)}), GATE, groups=PROTECT_B)
    assert decision.outcome == "inconclusive"
    assert decision.reasons == [("group_uncertain: protected group b dr changed -0.0100 [-0.0264, +0.0064]: a drop "
                                 "beyond groups.max_regression 0.02 is not ruled out")]


def test_the_report_shows_each_groups_share_value_and_the_disparity():
    report = report_with({"all": (2000, 0.03, 0.01)})
    report.slices.extend(SliceResult(name, n, {"dr": comparison(d, 0.01, champion=champion)})
                         for name, n, d, champion in (("group_a", 1500, 0.05, 0.35), ("group_b", 500, -0.03, 0.23)))
    assert report.disparity() == pytest.approx({"candidate": 0.20, "champion": 0.12})  # 0.40 - 0.20, 0.35 - 0.23
    assert report.metrics()["disparity/candidate"] == pytest.approx(0.20)
    text = report.markdown()
    assert "| b | 25.0% |" in text and "| a | 75.0% |" in text
    assert "Disparity (largest - smallest group value): candidate 0.2000, champion 0.1200" in text
    assert "disparity/candidate" not in report_with({"all": (2000, 0.03, 0.01)}).metrics()


def test_reweighting_gives_every_group_the_same_share_of_the_training_weight():
    rows = pl.DataFrame({"user_id": [f"u{i}" for i in range(12)], "segment": ["a"] * 9 + ["b"] * 2 + [None],
                         "weight": [1.0] * 9 + [0.5, 0.5] + [2.0]})
    unchanged, measured = groups.balance(rows, Groups(protected=["a", "b"]))  # off by default: measured only
    assert unchanged.equals(rows)
    assert measured == pytest.approx({"group_labels/a": 9 / 12, "group_share/a": 0.9,
                                      "group_labels/b": 2 / 12, "group_share/b": 0.1})
    balanced, metrics = groups.balance(rows, Groups(protected=["a", "b"], reweight=True))
    assert balanced.columns == rows.columns
    totals = balanced.group_by("segment").agg(pl.col("weight").sum()).sort("segment", nulls_last=True)
    assert totals["weight"].to_list() == pytest.approx([5.0, 5.0, 2.0])  # a and b alike; no group: kept
    assert metrics == pytest.approx({**measured, "group_weight/a": 0.5 / 0.9, "group_weight/b": 5.0})
    undeclared, none = groups.balance(rows, None)
    assert undeclared is rows and none == {}
    tiny = rows.with_columns(weight=pl.when(pl.col("segment") == "b").then(0.01).otherwise(pl.col("weight")))
    assert groups.balance(tiny, Groups(protected=["b"], reweight=True))[1]["group_weight/b"] == groups.MAX_GROUP_WEIGHT


def grouped_report(groups_: dict[str, tuple[float, float, float]], overall: float = 0.03) -> object:
    """A report whose group slices have (champion value, difference, its standard error)."""
    report = report_with({"all": (2000, overall, 0.01)})
    report.slices.extend(SliceResult(f"group_{name}", 500, {"dr": comparison(d, se, champion=champion)})
                         for name, (champion, d, se) in groups_.items())
    return report


def test_the_audit_flags_a_group_left_behind_while_the_aggregate_gains():
    behind = fairness(grouped_report({"a": (0.40, 0.06, 0.01), "b": (0.38, -0.04, 0.01)}), Groups())
    assert behind.flagged and behind.trap == "fairness"
    assert behind.summary.startswith("group b dr -0.0400 (upper bound -0.0236) while the aggregate gained +0.0300")
    assert behind.measures["gain@b"] == pytest.approx(-0.04) and behind.measures["min_group_gain"] == pytest.approx(-0.04)
    # disparity 0.02 -> 0.12: grown by 0.10 > 0.05
    assert "disparity 0.0200 -> 0.1200 (+0.1000 > groups.max_disparity_increase 0.05)" in behind.summary
    fair = fairness(grouped_report({"a": (0.40, 0.03, 0.01), "b": (0.38, 0.02, 0.01)}), Groups())
    assert not fair.flagged and fair.summary == "2 groups, none significantly worse; disparity 0.0200 -> 0.0300"
    # a group worse while the aggregate lost too is the gate's business, not a differential
    assert not fairness(grouped_report({"a": (0.40, -0.02, 0.005), "b": (0.38, -0.01, 0.005)}, overall=-0.02),
                        Groups()).flagged
