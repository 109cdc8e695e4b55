"""The held-out evidence: what the logger could have shown, what it showed, and what came back.

For every held-out interaction the candidates it ranked (``context.candidates`` of the
interaction event, each with the logger's probability at each position; docs/events.md) with
serving-time features, and for the items shown: their position, reward, the audit reviewer's
verdict (gold) and the weak label. An interaction logged without candidates falls back to its
shown items, each known at its own position only: then the estimate is that of re-ranking the
logged slate, biased for a policy that would show other items (``candidates_logged`` says how
often that happened).

Rewards are held-out evidence that never produced a training label: the click for a
recommendation slate (what the position-based click model explains), the domain's delayed
outcome (e.g. ``resolved``) for an assistant response, 0 when it did not come.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from flywheel_pipeline.scoring import SERVING_FEATURES
from flywheel_pipeline.sources import INTERACTIONS, Readable, as_source
from flywheel_pipeline.training.base import SERVING_TIME_COLUMNS, Windows, labelled_impressions
from flywheel_pipeline.validation.estimators import PolicyTerms, Positions, pbm_weight

REWARD = {"assistant": "outcome", "recommendation": "clicked"}  # the column of holdout_rows
REWARD_MODEL_KEYS = {"assistant": ["input_text", "item_id"], "recommendation": ["segment", "item_id"]}
REWARD_MODEL_PRIOR = 5.0  # pseudo-observations shrinking a key's attraction to its item's
_LOGGED_CANDIDATE = {"item_id": pl.String, "content": pl.String, "propensities": pl.List(pl.Float64)}
_CANDIDATES_SCHEMA = {"interaction_id": pl.String, "item_id": pl.String, "item_content": pl.String,
                      "mu": pl.List(pl.Float64)}
_EVIDENCE_COLUMNS = ["clicked", "outcome_name", "outcome_value", "audit_review_value"]
_INTERACTION_FEATURES = ["domain", "user_id", "segment", "context_features", "is_new_user", "input_text",
                         "policy"]


def holdout_rows(source: Readable, domain: str, windows: Windows, outcome: str = "") -> pl.DataFrame:
    """Held-out impressions: serving-time columns, the weak label (p_good, label), and the
    held-out evidence: ``clicked``, ``outcome`` (value of the ``outcome`` named, else 0) and
    ``verdict`` (the reviewer's 1/0 where the impression was reviewed at random, the audit;
    null when not reviewed, or reviewed because the label model was unsure: not a random sample)."""
    rows = labelled_impressions(source, domain, windows.holdout_start, windows.holdout_end,
                                [*SERVING_TIME_COLUMNS, *_EVIDENCE_COLUMNS])
    return rows.with_columns(
        clicked=pl.col("clicked").fill_null(False).cast(pl.Float64),
        outcome=pl.when(pl.col("outcome_name") == outcome).then(pl.col("outcome_value").fill_null(0.0))
        .otherwise(0.0).cast(pl.Float64),
        verdict=pl.col("audit_review_value"),
    ).drop("outcome_name", "outcome_value", "audit_review_value")


def logged_candidates(source: Readable, domain: str, windows: Windows) -> pl.DataFrame:
    """interaction_id, item_id, item_content, mu (the logger's probability per position) of every
    held-out interaction that logged its candidates; empty where none did."""
    interactions = as_source(source).read(INTERACTIONS, domain, windows.holdout_start, windows.holdout_end,
                                          ["interaction_id", "context"])
    if interactions.is_empty():
        return pl.DataFrame(schema=_CANDIDATES_SCHEMA)
    return (
        interactions
        .select("interaction_id", candidates=pl.col("context").str.json_path_match("$.candidates")
                .str.json_decode(dtype=pl.List(pl.Struct(_LOGGED_CANDIDATE))))
        .filter(pl.col("candidates").list.len() > 0)
        .unique("interaction_id", keep="first", maintain_order=True)
        .explode("candidates").unnest("candidates")
        .select("interaction_id", "item_id", item_content="content", mu="propensities")
    )


@dataclass(frozen=True)
class Evidence:
    """Held-out interactions as ``units`` 0..n-1 and one row per candidate in ``options``:
    ``unit``, SERVING_FEATURES, ``mu`` (n_rows, slate_size), ``shown`` rows with ``position``,
    ``reward``, ``verdict`` and ``p_good``."""

    options: pl.DataFrame
    mu: np.ndarray
    slate_size: int
    n_units: int
    candidates_logged: float  # share of interactions whose candidates were logged

    @property
    def shown(self) -> np.ndarray:
        return self.options["position"].is_not_null().to_numpy()

    def unit_attributes(self) -> pl.DataFrame:
        """One row per unit: is_new_user, segment, policy."""
        return (self.options.filter(pl.col("position").is_not_null())
                .group_by("unit", maintain_order=True).agg(pl.col("is_new_user", "segment", "policy").first())
                .sort("unit"))


def assemble(rows: pl.DataFrame, candidates: pl.DataFrame, reward: str) -> Evidence:
    """Evidence from held-out impressions (``holdout_rows``) and ``logged_candidates``; ``reward``
    names the column of ``rows`` that is the reward."""
    slate_size = int(rows["position"].max()) + 1 if rows.height else 1
    shown = rows.select(
        "interaction_id", "item_id", "item_content", "position", "propensity",
        pl.col(reward).cast(pl.Float64).alias("reward"), pl.col("verdict").cast(pl.Float64), "p_good",
        "label",
    )
    context = rows.unique("interaction_id", keep="first", maintain_order=True).select(
        "interaction_id", *_INTERACTION_FEATURES)
    logged = _usable(candidates, shown, slate_size)
    with_candidates = (
        logged.join(context, on="interaction_id")
        .join(shown.drop("item_content"), on=["interaction_id", "item_id"], how="left")
        .with_columns(pl.col("mu").list.head(slate_size).list.to_array(slate_size))
    )
    fallback = shown.join(logged.select("interaction_id").unique(maintain_order=True), on="interaction_id",
                          how="anti", maintain_order="left")
    fallback = fallback.join(context, on="interaction_id").with_columns(
        mu=pl.concat_list([pl.when(pl.col("position") == j).then(pl.col("propensity")).otherwise(0.0)
                           for j in range(slate_size)]).list.to_array(slate_size))
    columns = ["interaction_id", *SERVING_FEATURES, "policy", "position", "reward", "verdict",
               "p_good", "label", "mu"]
    options = pl.concat([with_candidates.select(columns), fallback.select(columns)])
    order = context.select("interaction_id").with_row_index("unit")
    # a total order (item_id breaks the ties of unshown candidates): the per-unit sums, and so the
    # bootstrap, come out the same whatever order the warehouse returned the rows in
    options = options.join(order, on="interaction_id").sort("unit", "position", "item_id", nulls_last=True)
    mu = np.stack(options["mu"].to_numpy()) if options.height else np.zeros((0, slate_size))
    n_units = order.height
    share = logged["interaction_id"].n_unique() / n_units if n_units else 0.0
    return Evidence(options.drop("mu"), mu.reshape(-1, slate_size), slate_size, n_units, share)


def _usable(candidates: pl.DataFrame, shown: pl.DataFrame, slate_size: int) -> pl.DataFrame:
    """Logged candidates of held-out interactions whose list is whole: a propensity for every
    position, and every shown item among them (else the interaction falls back)."""
    logged = candidates.join(shown.select("interaction_id").unique(maintain_order=True), on="interaction_id",
                             how="semi", maintain_order="left")
    short = logged.filter(pl.col("mu").list.len() < slate_size).select("interaction_id")
    missing = shown.join(logged, on=["interaction_id", "item_id"], how="anti").select("interaction_id")
    return logged.join(pl.concat([short, missing]).unique(maintain_order=True), on="interaction_id", how="anti",
                       maintain_order="left")


def reward_model(evidence: Evidence, theta: np.ndarray, keys: list[str], folds: int = 2) -> np.ndarray:
    """rho_hat per candidate row: the attraction (reward per examination) of its key, shrunk to
    its item's and the item's to the overall; cross-fitted, so a unit's own reward never fits
    the model used on it (what keeps the doubly robust estimate unbiased)."""
    options = evidence.options.with_columns(
        fold=pl.col("unit") % folds,
        examined=pl.when(pl.col("position").is_not_null())
        .then(pl.col("position").replace_strict(dict(enumerate(theta.tolist())), default=1.0))
        .otherwise(None),
    )
    rho = np.zeros(options.height)
    for fold in range(folds):
        fit = options.filter((pl.col("fold") != fold) & pl.col("position").is_not_null())
        overall = fit["reward"].sum() / max(fit["examined"].sum(), 1e-9)
        item = _shrunk(fit, ["item_id"], pl.lit(overall), "rho_item")
        key = _shrunk(fit.join(item, on="item_id", how="left"), keys, pl.col("rho_item"), "rho_key")
        predicted = (options.filter(pl.col("fold") == fold).with_row_index("row")
                     .join(item, on="item_id", how="left").join(key, on=keys, how="left")
                     .select("row", pl.coalesce("rho_key", "rho_item", pl.lit(overall)))
                     .sort("row"))
        rho[(options["fold"] == fold).to_numpy()] = predicted[:, 1].to_numpy()
    return rho


def _shrunk(fit: pl.DataFrame, keys: list[str], prior: pl.Expr, name: str) -> pl.DataFrame:
    return fit.group_by(keys).agg(
        ((pl.col("reward").sum() + REWARD_MODEL_PRIOR * prior.first())
         / (pl.col("examined").sum() + REWARD_MODEL_PRIOR)).alias(name))


def policy_terms(evidence: Evidence, pi: np.ndarray, positions: Positions, rho: np.ndarray) -> PolicyTerms:
    """Per-unit sums for one policy (``estimators.PolicyTerms``)."""
    shown = evidence.shown
    units = evidence.options["unit"].to_numpy()
    position = evidence.options["position"].fill_null(0).to_numpy()
    reward = evidence.options["reward"].fill_null(0.0).to_numpy()
    weight = np.where(shown, pbm_weight(pi, evidence.mu, positions), 0.0)
    examined = positions.examination[position]

    def per_unit(values: np.ndarray) -> np.ndarray:
        return np.bincount(units, weights=values, minlength=evidence.n_units)

    return PolicyTerms(
        ips=per_unit(weight * reward),
        weight=per_unit(weight * examined),
        direct=per_unit(rho * (pi @ positions.value)),
        residual=per_unit(np.where(shown, weight * (reward - examined * rho), 0.0)),
    )


def per_unit_labelled(evidence: Evidence, pi: np.ndarray, positions: Positions,
                      column: str) -> tuple[np.ndarray, np.ndarray]:
    """sum theta_k w y and sum theta_k w over a unit's shown rows where ``column`` (y) is known:
    the self-normalised value of the policy under that label (gold verdicts, weak p_good)."""
    label = evidence.options[column].cast(pl.Float64).to_numpy()
    known = evidence.shown & np.isfinite(label)
    position = evidence.options["position"].fill_null(0).to_numpy()
    weight = np.where(known, pbm_weight(pi, evidence.mu, positions)
                      * positions.examination[position], 0.0)
    units = evidence.options["unit"].to_numpy()
    numerator = np.bincount(units, weights=np.where(known, weight * np.nan_to_num(label), 0.0),
                            minlength=evidence.n_units)
    return numerator, np.bincount(units, weights=weight, minlength=evidence.n_units)


def slice_masks(units: pl.DataFrame) -> dict[str, np.ndarray]:
    """The whole domain, new vs returning users, and each segment present (over units)."""
    new = units["is_new_user"].fill_null(False).to_numpy()
    masks = {"all": np.ones(units.height, bool), "new_users": new, "returning_users": ~new}
    segments = units["segment"]
    for segment in sorted(segments.drop_nulls().unique().to_list()):
        masks["segment_" + re.sub(r"[^\w.-]", "_", segment)] = (segments == segment).fill_null(False).to_numpy()
    return masks
