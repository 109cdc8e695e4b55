"""Declared groups of users (flywheel.yaml ``groups``, docs/fairness.md): the group of each
held-out interaction, for evaluation only (validation's slices, the gate's protected groups);
never a model's feature.

A group is the interaction's ``segment`` (a serving-time context field), or the group a file maps
its user to (``users_file``: CSV with a header, columns ``user_id`` and ``group``).
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from flywheel_pipeline.config import Groups

GROUP_SLICE = "group_"  # validation's slice of a group: group_<name>


def slice_name(group: str) -> str:
    """The validation slice of ``group`` (characters outside [A-Za-z0-9_.-] as ``_``)."""
    return GROUP_SLICE + re.sub(r"[^\w.-]", "_", group)


def user_groups(path: Path) -> pl.DataFrame:
    """user_id, group from ``path``; a clear error for a missing file, column or a user listed twice."""
    if not path.exists():
        raise FileNotFoundError(f"groups.users_file: {path} does not exist")
    frame = pl.read_csv(path, infer_schema=False)
    missing = [column for column in ("user_id", "group") if column not in frame.columns]
    if missing:
        raise ValueError(f"groups.users_file: {path} lacks the column(s) {missing} (its header: {frame.columns})")
    twice = frame.filter(pl.col("user_id").is_duplicated())["user_id"].unique().sort().to_list()
    if twice:
        raise ValueError(f"groups.users_file: {path} lists user(s) {twice[:5]} more than once")
    return frame.select("user_id", "group")


def assign(units: pl.DataFrame, settings: Groups | None) -> pl.DataFrame:
    """``units`` (with ``user_id`` and ``segment``) with a ``group`` column: null where none is known."""
    if settings is None:
        return units.with_columns(group=pl.lit(None, pl.String))
    if settings.field is not None:
        return units.with_columns(group=pl.col(settings.field))
    mapping = user_groups(settings.users_file)
    return units.join(mapping, on="user_id", how="left", maintain_order="left")
