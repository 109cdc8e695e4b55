"""Declared groups of users (flywheel.yaml ``groups``, docs/fairness.md): the group of each
held-out interaction, for evaluation only (validation's slices, the gate's protected groups);
never a model's feature.

``reweight`` is the corrective lever: each group's training rows weigh (1 / groups) / its share of
the weight, so every group counts alike in the fit, however few rows it has (a minority that
reacts rarely is not drowned by the majority); rows of no declared group keep their weight.

A group is the interaction's ``segment`` (a serving-time context field), or the group a file maps
its user to (``users_file``: CSV with a header, columns ``user_id`` and ``group``).

A group's name becomes slice names, MLflow metric keys and report text, which hold no users' text
(docs/privacy.md): a declared group (a protected one, or one of the users file, which the operator
wrote) keeps its name; any other value the product sent is named by its hash (``anonymous``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import polars as pl

from flywheel_pipeline.config import Groups

GROUP_SLICE = "group_"  # validation's slice of a group: group_<name>
MAX_GROUP_WEIGHT = 10.0  # the most a group's rows are up-weighted by ``reweight`` (and 1/10 the least)


def slice_name(group: str) -> str:
    """The validation slice of ``group`` (a name ``assign`` gave; characters outside [A-Za-z0-9_.-] as ``_``)."""
    return GROUP_SLICE + re.sub(r"[^\w.-]", "_", group)


def anonymous(value: str) -> str:
    """What names an undeclared value the product sent: ``hash-`` and 10 hex digits of its SHA-256."""
    return "hash-" + hashlib.sha256(value.encode()).hexdigest()[:10]


def anonymised(values: pl.Expr, declared: list[str]) -> pl.Expr:
    """``values`` with each one not ``declared`` replaced by its ``anonymous`` name (null stays null)."""
    return values.map_batches(lambda column: column.replace_strict(
        {value: value if value in declared else anonymous(value) for value in column.drop_nulls().unique()},
        default=None, return_dtype=pl.String), return_dtype=pl.String)


def declared_segments(settings: Groups | None) -> list[str]:
    """The segment values the domain declares (its protected groups, when groups come from the segment):
    the only ones shown by name."""
    return list(settings.protected) if settings is not None and settings.field == "segment" else []


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
    """``units`` (with ``user_id`` and ``segment``) with a ``group`` column, each unit's group's name:
    declared ones as they are, the segment's other values ``anonymous``; null where none is known."""
    if settings is None:
        return units.with_columns(group=pl.lit(None, pl.String))
    if settings.field is not None:
        return units.with_columns(group=anonymised(pl.col(settings.field), settings.protected))
    mapping = user_groups(settings.users_file)
    return units.join(mapping, on="user_id", how="left", maintain_order="left")


def balance(rows: pl.DataFrame, settings: Groups | None) -> tuple[pl.DataFrame, dict[str, float]]:
    """Training rows (with ``weight``) and, per declared group, its share of the labelled rows
    (``group_labels/<group>``) and of their weight (``group_share/<group>``). With
    ``settings.reweight``, the weights multiplied per group so each group holds an equal share of
    the total (``group_weight/<group>``: the factor, clipped to [1/MAX_GROUP_WEIGHT,
    MAX_GROUP_WEIGHT]); else unchanged."""
    if settings is None:
        return rows, {}
    grouped = assign(rows, settings)
    shares = (grouped.filter(pl.col("group").is_not_null()).group_by("group")
              .agg(labels=pl.len(), share=pl.col("weight").sum()).sort("group")
              .with_columns(labels=pl.col("labels") / grouped.height, share=pl.col("share") / pl.col("share").sum()))
    metrics = {}
    for group, labels, share in shares.iter_rows():
        metrics[f"group_labels/{group}"], metrics[f"group_share/{group}"] = labels, share
    if not settings.reweight or shares.height < 2:
        return rows, metrics
    factors = shares.with_columns(factor=(1 / (shares.height * pl.col("share")))
                                  .clip(1 / MAX_GROUP_WEIGHT, MAX_GROUP_WEIGHT))
    weighted = (grouped.join(factors.select("group", "factor"), on="group", how="left", maintain_order="left")
                .with_columns(weight=pl.col("weight") * pl.col("factor").fill_null(1.0))
                .select(rows.columns))
    for group, factor in factors.select("group", "factor").iter_rows():
        metrics[f"group_weight/{group}"] = factor
    return weighted, metrics
