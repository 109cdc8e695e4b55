"""The held-out evidence: what a policy could have shown, what the logger showed, and what came back.

Each held-out interaction is a unit; its candidates are, first found:
- the ones it logged (``context.candidates`` of the interaction event, each with the logger's
  probability at each position; docs/events.md): a new ranking of them is judged slate by slate,
  under the position-based click model (``estimators.pbm_weight``);
- else the domain's catalogue (docs/importing.md), every item of it: the logger's probability is
  known for the shown item at its slot only, so each shown slot is judged as its own decision,
  pi(item, slot | context) / mu(item, slot | context), as obp defines its estimators;
- else the items it showed, each known at its own position only: the estimate is then that of
  re-ranking the logged slate, biased for a policy that would show other items
  (``candidates_logged`` says how often a unit had more).

The candidate rows of every unit against the catalogue can outgrow memory (a million held-out
rows x a thousand items), so ``Evidence`` keeps the units, the shown rows and the candidate lists
apart and yields the rows a chunk of units at a time (``chunks``); the estimators sum per unit.

Rewards are held-out evidence that never produced a training label: the click for a
recommendation slate (what the position-based click model explains), the domain's delayed
outcome (e.g. ``resolved``) for an assistant response, 0 when it did not come. A shown item whose
propensity is unknown (a log without one, ``propensity: unknown``) has a null propensity; no
importance weight exists for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl

from flywheel_pipeline.catalogue import CATALOGUE_SCHEMA
from flywheel_pipeline.groups import anonymised, slice_name
from flywheel_pipeline.sources import (
    IMPRESSION_KEY,
    INTERACTIONS,
    REVIEW_QUEUE,
    Readable,
    as_source,
)
from flywheel_pipeline.training.base import SERVING_TIME_COLUMNS, Windows, labelled_impressions
from flywheel_pipeline.validation.estimators import PolicyTerms, Positions, pbm_weight

REWARD = {"assistant": "outcome", "recommendation": "clicked"}  # the column of holdout_rows
REWARD_MODEL_KEYS = {"assistant": ["input_text", "item_id"], "recommendation": ["segment", "item_id"]}
REWARD_MODEL_PRIOR = 5.0  # pseudo-observations shrinking a key's attraction to its item's
CHUNK_ROWS = 200_000  # candidate rows scored at once
_LOGGED_CANDIDATE = {"item_id": pl.String, "content": pl.String, "propensities": pl.List(pl.Float64)}
_CANDIDATES_SCHEMA = {"interaction_id": pl.String, "item_id": pl.String, "item_content": pl.String,
                      "mu": pl.List(pl.Float64)}
_EVIDENCE_COLUMNS = ["clicked", "outcome_name", "outcome_value", "audit_review_value"]
_UNIT_FEATURES = ["domain", "user_id", "segment", "context_features", "is_new_user", "input_text"]


def holdout_rows(source: Readable, domain: str, windows: Windows, outcome: str = "") -> pl.DataFrame:
    """Held-out impressions: serving-time columns, the weak label (p_good, label), and the
    held-out evidence: ``clicked``, ``outcome`` (value of the ``outcome`` named, else 0) and
    ``verdict`` (the reviewer's 1/0 where the impression was reviewed at random, the audit;
    null when not reviewed, or reviewed because the label model was unsure: not a random sample)
    with its ``verdict_weight`` (the review queue's design weight of a stratified audit slice, else 1)."""
    rows = labelled_impressions(source, domain, windows.holdout_start, windows.holdout_end,
                                [*SERVING_TIME_COLUMNS, *_EVIDENCE_COLUMNS])
    queued = as_source(source).read(REVIEW_QUEUE, domain, windows.holdout_start, windows.holdout_end)
    if "design_weight" in queued.columns:
        weights = queued.filter(pl.col("selection") == "audit").select(*IMPRESSION_KEY, verdict_weight="design_weight")
        rows = rows.join(weights, on=IMPRESSION_KEY, how="left", maintain_order="left")
    else:
        rows = rows.with_columns(verdict_weight=pl.lit(None, pl.Float64))
    return rows.with_columns(verdict_weight=pl.col("verdict_weight").fill_null(1.0),
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
class Options:
    """Candidate rows of some units: ``frame`` (``unit``, SERVING_FEATURES, ``policy`` and, for
    shown rows, ``position``, ``propensity``, ``reward``, ``verdict``, ``p_good``, ``label``),
    ``mu`` (rows, slate_size): the logger's probability of the row's item at each position (NaN
    where unknown), and ``slots`` (rows, slate_size): 1 at the positions its unit showed, when
    each shown slot is judged as its own decision (None: whole slates)."""

    frame: pl.DataFrame
    mu: np.ndarray
    slots: np.ndarray | None = None

    @property
    def shown(self) -> np.ndarray:
        return self.frame["position"].is_not_null().to_numpy()


@dataclass(frozen=True)
class Evidence:
    """Held-out interactions as ``units`` 0..n-1 (``interaction_id``, serving-time features,
    ``policy``, ``model_version``, ``event_date``),
    their ``shown`` rows, and their candidates: the ``logged`` lists (``unit``, ``item_id``,
    ``item_content``, ``mu``), else the ``catalogue`` (``item_id``, ``item_content``), else the
    shown items. ``slot_decisions``: each shown slot is judged on its own (see the module)."""

    units: pl.DataFrame
    shown: pl.DataFrame
    logged: pl.DataFrame
    catalogue: pl.DataFrame | None
    slate_size: int
    slot_decisions: bool

    @property
    def n_units(self) -> int:
        return self.units.height

    @property
    def candidates_logged(self) -> float:
        """Share of units ranked over more than what they showed (logged candidates or a catalogue)."""
        if not self.n_units:
            return 0.0
        return 1.0 if self.catalogue is not None else self.logged["unit"].n_unique() / self.n_units

    @property
    def propensities_known(self) -> bool:
        """Whether every shown item carries the logger's probability (else no importance weight)."""
        return self.shown["propensity"].null_count() == 0

    def unit_attributes(self) -> pl.DataFrame:
        """One row per unit: is_new_user, segment, policy, and the declared group (null: none)."""
        group = pl.col("group") if "group" in self.units.columns else pl.lit(None, pl.String).alias("group")
        return self.units.select("is_new_user", "segment", "policy", group)

    def explored(self) -> pl.DataFrame:
        """Shown rows of the exploration slice (uniformly random slates): position, reward."""
        return (self.shown.join(self.units.filter(pl.col("policy") == "explore").select("unit"), on="unit")
                .select("position", "reward"))

    def rows_per_unit(self) -> np.ndarray:
        """How many candidate rows each unit has."""
        shown = np.bincount(self.shown["unit"].to_numpy(), minlength=self.n_units)
        if self.catalogue is not None:
            outside = self.shown.join(self.catalogue, on="item_id", how="anti")["unit"].to_numpy()
            shown = self.catalogue.height + np.bincount(outside, minlength=self.n_units)
        logged = np.bincount(self.logged["unit"].to_numpy(), minlength=self.n_units)
        return np.where(logged > 0, logged, shown)

    def chunks(self, max_rows: int = CHUNK_ROWS) -> Iterator[Options]:
        """The candidate rows, whole units at a time, about ``max_rows`` rows each."""
        ends = np.cumsum(self.rows_per_unit())
        first = 0
        while first < self.n_units:
            last = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + max_rows,
                                                      side="right")))
            yield self.options(first, min(last, self.n_units))
            first = last

    def options(self, first: int, last: int) -> Options:
        """The candidate rows of units first..last-1, in a total order (unit, position, item_id:
        item_id breaks the ties of unshown candidates), so per-unit sums, and the bootstrap, come
        out the same whatever order the warehouse returned the rows in."""
        in_range = pl.col("unit").is_between(first, last - 1)
        units, shown = self.units.filter(in_range), self.shown.filter(in_range)
        logged = self.logged.filter(in_range)
        rest = units.select("unit").join(logged.select("unit").unique(), on="unit", how="anti")
        candidates = [logged, *self._unlogged(rest, shown)]
        frame = (pl.concat(candidates, how="diagonal_relaxed")
                 .join(shown.drop("item_content"), on=["unit", "item_id"], how="left")
                 .join(units, on="unit")
                 .sort("unit", "position", "item_id", nulls_last=True))
        size = self.slate_size
        at_shown = pl.concat_list([pl.when(pl.col("position") == j).then(pl.col("propensity").fill_null(np.nan))
                                   .otherwise(0.0) for j in range(size)])
        mu = frame.select(pl.coalesce(pl.col("mu").list.head(size), at_shown).list.to_array(size))
        return Options(frame.drop("mu"), mu.to_series().to_numpy().reshape(-1, size).astype(float),
                       self._slots(frame, shown) if self.slot_decisions else None)

    def _unlogged(self, units: pl.DataFrame, shown: pl.DataFrame) -> list[pl.DataFrame]:
        """Candidates of units without a logged list: the catalogue (and any shown item it lacks),
        else their shown items."""
        mine = shown.join(units, on="unit", how="semi").select("unit", "item_id", "item_content")
        if self.catalogue is None:
            return [mine]
        return [units.join(self.catalogue, how="cross"), mine.join(self.catalogue, on="item_id", how="anti")]

    def _slots(self, frame: pl.DataFrame, shown: pl.DataFrame) -> np.ndarray:
        """(rows, slate_size): 1 where the row's unit showed something."""
        showed = (shown.select("unit", "position").with_columns(one=pl.lit(1.0))
                  .pivot(on="position", index="unit", values="one", aggregate_function="first"))
        columns = [(pl.col(str(j)).fill_null(0.0) if str(j) in showed.columns else pl.lit(0.0)).alias(str(j))
                   for j in range(self.slate_size)]
        return frame.select("unit").join(showed, on="unit", how="left", maintain_order="left").select(columns).to_numpy()


def assemble(rows: pl.DataFrame, candidates: pl.DataFrame, reward: str,
             catalogue: pl.DataFrame | None = None, slot_decisions: bool = False) -> Evidence:
    """Evidence from held-out impressions (``holdout_rows``), ``logged_candidates`` and the
    domain's ``catalogue`` (None: it has none); ``reward`` names the column of ``rows`` that is the
    reward; ``slot_decisions``: judge each shown slot as its own decision (the log has no slates,
    or its propensities are per slot)."""
    slate_size = int(rows["position"].max()) + 1 if rows.height else 1
    units = (rows.unique("interaction_id", keep="first", maintain_order=True)
             .select("interaction_id", *_UNIT_FEATURES, "policy",
                     *(c for c in ("model_version", "event_date") if c in rows.columns))  # the monitor's
             .with_row_index("unit"))
    unit_of = units.select("interaction_id", "unit")
    shown = (rows.join(unit_of, on="interaction_id")
             .select("unit", "item_id", "item_content", "position", "propensity",
                     pl.col(reward).cast(pl.Float64).alias("reward"), pl.col("verdict").cast(pl.Float64),
                     "verdict_weight" if "verdict_weight" in rows.columns else pl.lit(1.0).alias("verdict_weight"),
                     "p_good", "label")
             .sort("unit", "position"))
    logged = (_usable(candidates, rows, slate_size).join(unit_of, on="interaction_id")
              .select("unit", "item_id", "item_content", "mu"))
    if catalogue is not None:
        catalogue = catalogue.select(*CATALOGUE_SCHEMA).unique("item_id", keep="first").sort("item_id")
    return Evidence(units, shown, logged, catalogue, slate_size, slot_decisions)


def _usable(candidates: pl.DataFrame, rows: pl.DataFrame, slate_size: int) -> pl.DataFrame:
    """Logged candidates of held-out interactions whose list is whole: a propensity for every
    position, and every shown item among them (else the interaction falls back)."""
    shown = rows.select("interaction_id", "item_id")
    logged = candidates.join(shown.select("interaction_id").unique(maintain_order=True), on="interaction_id",
                             how="semi", maintain_order="left")
    short = logged.filter(pl.col("mu").list.len() < slate_size).select("interaction_id")
    missing = shown.join(logged, on=["interaction_id", "item_id"], how="anti").select("interaction_id")
    return logged.join(pl.concat([short, missing]).unique(maintain_order=True), on="interaction_id", how="anti",
                       maintain_order="left")


@dataclass(frozen=True)
class RewardModel:
    """rho_hat(key, item): the attraction (reward per examination) of a key, shrunk to its item's
    and the item's to the overall, one table per fold of units; cross-fitted, so a unit's own
    reward never fits the model used on it (what keeps the doubly robust estimate unbiased)."""

    keys: list[str]
    folds: list[tuple[float, pl.DataFrame, pl.DataFrame]]  # per fold: overall, item table, key table

    def predict(self, options: Options) -> np.ndarray:
        """rho_hat of every candidate row."""
        frame = options.frame.with_row_index("row").with_columns(fold=pl.col("unit") % len(self.folds))
        rho = np.zeros(frame.height)
        for fold, (overall, item, key) in enumerate(self.folds):
            mine = frame.filter(pl.col("fold") == fold)
            predicted = (mine.select("row", "item_id", *[k for k in self.keys if k != "item_id"])
                         .join(item, on="item_id", how="left").join(key, on=self.keys, how="left")
                         .select("row", pl.coalesce("rho_key", "rho_item", pl.lit(overall))))
            rho[predicted["row"].to_numpy()] = predicted[:, 1].to_numpy()
        return rho


def reward_model(evidence: Evidence, theta: np.ndarray, keys: list[str], folds: int = 2) -> RewardModel:
    """Fit ``RewardModel`` on the shown rows, each examined theta[position] (1 for slot decisions:
    the slot is given, so its effect is part of the reward)."""
    examination = np.ones_like(theta) if evidence.slot_decisions else theta
    shown = evidence.shown.join(evidence.units.select("unit", *[k for k in keys if k != "item_id"]), on="unit")
    shown = shown.with_columns(
        fold=pl.col("unit") % folds,
        examined=pl.col("position").replace_strict(dict(enumerate(examination.tolist())), default=1.0,
                                                   return_dtype=pl.Float64))
    tables = []
    for fold in range(folds):
        fit = shown.filter(pl.col("fold") != fold)
        overall = fit["reward"].sum() / max(fit["examined"].sum(), 1e-9)
        item = _shrunk(fit, ["item_id"], pl.lit(overall), "rho_item")
        key = _shrunk(fit.join(item, on="item_id", how="left"), keys, pl.col("rho_item"), "rho_key")
        tables.append((float(overall), item, key))
    return RewardModel(keys, tables)


def _shrunk(fit: pl.DataFrame, keys: list[str], prior: pl.Expr, name: str) -> pl.DataFrame:
    return fit.group_by(keys).agg(
        ((pl.col("reward").sum() + REWARD_MODEL_PRIOR * prior.first())
         / (pl.col("examined").sum() + REWARD_MODEL_PRIOR)).alias(name))


def shown_weights(options: Options, pi: np.ndarray, positions: Positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate row: the importance weight w of a shown row (0 elsewhere; NaN where the
    logger's probability is unknown), how examined its position is, and how much the row's item
    counts in the policy's value, sum_j v_j pi(item at j).

    Slates: w = sum_j v_j pi(a at j) / sum_j theta_j mu(a at j) (``estimators.pbm_weight``).
    Slot decisions: w = pi(a at k) / mu(a at k) at the shown slot k, each of the unit's shown
    slots counting alike (v = 1 / slots shown) and examined 1 (the slot was given)."""
    shown = options.shown
    position = options.frame["position"].fill_null(0).to_numpy()
    rows = np.arange(len(position))
    if options.slots is None:
        value = pi @ positions.value
        weight = np.where(shown, pbm_weight(pi, options.mu, positions), 0.0)
        return weight, positions.examination[position], value
    share = options.slots / np.maximum(options.slots.sum(axis=1, keepdims=True), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        at_slot = share[rows, position] * pi[rows, position] / options.mu[rows, position]
    return np.where(shown, at_slot, 0.0), np.ones(len(position)), (pi * share).sum(axis=1)


def policy_terms(options: Options, pi: np.ndarray, positions: Positions, rho: np.ndarray,
                 n_units: int) -> PolicyTerms:
    """Per-unit sums for one policy over ``options``'s rows (``estimators.PolicyTerms``); units are
    numbered 0..n_units-1."""
    shown = options.shown
    reward = options.frame["reward"].fill_null(0.0).to_numpy()
    weight, examined, value = shown_weights(options, pi, positions)
    per_unit = _summer(options, n_units)
    return PolicyTerms(
        ips=per_unit(weight * reward),
        weight=per_unit(weight * examined),
        direct=per_unit(rho * value),
        residual=per_unit(np.where(shown, weight * (reward - examined * rho), 0.0)),
    )


def per_unit_labelled(options: Options, pi: np.ndarray, positions: Positions, column: str,
                      n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """sum theta_k w y and sum theta_k w over a unit's shown rows where ``column`` (y) is known:
    the self-normalised value of the policy under that label (gold verdicts, each weighed by its
    ``verdict_weight``, a stratified audit slice's design weight; weak p_good)."""
    label = options.frame[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
    known = options.shown & np.isfinite(label)
    weight, examined, _ = shown_weights(options, pi, positions)
    weight = np.where(known, weight * examined, 0.0)
    if column == "verdict":
        weight = weight * options.frame["verdict_weight"].fill_null(1.0).to_numpy()
    per_unit = _summer(options, n_units)
    return per_unit(np.where(known, weight * np.nan_to_num(label), 0.0)), per_unit(weight)


def per_unit_replay(options: Options, pi: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, sum of pi(a at k) r and of pi(a at k) over the shown (a, k): the replay estimate
    (Li et al. 2011, "Unbiased offline evaluation of contextual-bandit-based news article
    recommendation algorithms", WSDM), unbiased only when the logger chose uniformly at random."""
    shown = options.shown
    position = options.frame["position"].fill_null(0).to_numpy()
    chosen = np.where(shown, pi[np.arange(len(position)), position], 0.0)
    reward = options.frame["reward"].fill_null(0.0).to_numpy()
    per_unit = _summer(options, n_units)
    return per_unit(chosen * reward), per_unit(chosen)


def _summer(options: Options, n_units: int) -> Callable[[np.ndarray], np.ndarray]:
    """Sums of per-row values by unit, over units 0..n_units-1."""
    units = options.frame["unit"].to_numpy()
    return lambda values: np.bincount(units, weights=values, minlength=n_units)


def slice_masks(units: pl.DataFrame) -> dict[str, np.ndarray]:
    """The whole domain, new vs returning users, each segment present (``segment_<hash>``: a
    segment is the product's text, so never a name) and each group present (``groups.slice_name``
    of the name ``groups.assign`` gave) over units; a segment is not repeated as its group's slice."""
    new = units["is_new_user"].fill_null(False).to_numpy()
    masks = {"all": np.ones(units.height, bool), "new_users": new, "returning_users": ~new}
    segments = units.select(anonymised(pl.col("segment"), declared=[])).to_series()
    declared = units["group"]
    # the groups are the segments when each unit's group is its segment: by name (declared) or hashed
    hashed_groups = units.select(pl.when(pl.col("group") == pl.col("segment")).then(segments)
                                 .otherwise(pl.col("group"))).to_series()
    if declared.null_count() < units.height and hashed_groups.equals(segments, null_equal=True):
        segments = pl.Series([None] * units.height, dtype=pl.String)
    for segment in sorted(segments.drop_nulls().unique().to_list()):
        masks["segment_" + segment] = (segments == segment).fill_null(False).to_numpy()
    for group in sorted(declared.drop_nulls().unique().to_list()):
        masks[slice_name(group)] = (declared == group).fill_null(False).to_numpy()
    return masks
