"""Labeling: weak labels for impressions from users' reactions and delayed outcomes.

``functions`` holds the labeling functions (LFs), ``model`` the label models that combine their
votes (Dawid-Skene, and majority vote as the baseline), ``analysis`` the statistics that say how
far to trust the result, ``safety`` the checks before labels are written (dependent sources,
majority-vote fallback, calibration on reviews; docs/labeling.md), and ``stage`` what the Dagster
assets call: ``label_partitions`` and ``maturity_cutoff``.
"""

from flywheel_pipeline.labeling.analysis import label_delays, lf_summary, mature_until
from flywheel_pipeline.labeling.functions import (
    ABSTAIN,
    BAD,
    GOOD,
    LABELING_FUNCTIONS,
    LabelingFunction,
    apply_lfs,
    labeling_function,
)
from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote
from flywheel_pipeline.labeling.stage import LabelingReport, label_partitions, maturity_cutoff

__all__ = [
    "ABSTAIN",
    "BAD",
    "GOOD",
    "LABELING_FUNCTIONS",
    "DawidSkene",
    "LabelingFunction",
    "LabelingReport",
    "MajorityVote",
    "apply_lfs",
    "label_delays",
    "label_partitions",
    "labeling_function",
    "lf_summary",
    "mature_until",
    "maturity_cutoff",
]
