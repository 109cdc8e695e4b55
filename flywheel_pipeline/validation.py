"""Validation: the candidate against the champion on the same held-out rows, and the gate.

Every metric is computed per slice (all, new_users, returning_users, segment_<s>) with paired
bootstrap intervals: interactions are resampled (seeded), and candidate, champion and their
difference are measured on the same resamples.

- ``auc``: AUC of the scores against the held-out labels (p_good >= 0.5), each impression weighted
  by its label confidence |2 p_good - 1|. The assistant's primary metric: its logs hold one
  response per interaction, so a model is judged on scoring good responses above bad ones.
- ``ips``, ``snips``, ``ess``: the off-policy value of the model's top pick. The logs tell only the
  reward (p_good) of the item shown at position 0, so an interaction counts only when the model
  picks that item, weighted by 1 / its logged propensity; a reward is never carried over to an
  item the logs did not show there. The model picks among the items *logged* for the request
  (ties split evenly): the logged slate (recommendation), or the responses logged for the same
  normalised query in the held-out window (assistant). Requests with one logged choice are left
  out.

  What this estimates: where the set of choices does not depend on what the logger showed (an
  assistant query whose responses all appear in the logs), IPS is unbiased and SNIPS consistent
  for the model's top-1 policy. A recommendation slate holds 5 of ~20 candidates, picked by the
  logger, so there it is the value of the model *re-ranking the logged slate*, with the logged
  (marginal) propensity: biased as an estimate of the model serving on its own (it credits the
  best of a slate the logger chose), but candidate and champion are measured alike, which is what
  the gate compares. SNIPS, the recommendation's primary metric, keeps the estimate a mean reward;
  ``ess`` = (sum w)^2 / sum w^2 says how many samples the estimate is worth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import duckdb
import mlflow
import numpy as np
import polars as pl

from flywheel_pipeline.config import FlywheelConfig, Gate
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import SERVING_FEATURES, Scorer, baseline_scorer
from flywheel_pipeline.training.base import Windows, ensure_experiment, impressions

PRIMARY_METRIC = {"assistant": "auc", "recommendation": "snips"}
N_BOOTSTRAP = 200
BOOTSTRAP_SEED = 0
MIN_SLICE_SAMPLES = 50  # a smaller slice is reported, not gated
CI_LEVEL = 0.95


@dataclass(frozen=True)
class MetricComparison:
    """Candidate, champion and candidate - champion, each with a bootstrap interval."""

    candidate: float
    champion: float
    difference: float
    candidate_ci: tuple[float, float]
    champion_ci: tuple[float, float]
    difference_ci: tuple[float, float]


@dataclass(frozen=True)
class SliceResult:
    name: str
    n_samples: int  # units behind the primary metric: impressions (auc) or interactions (ope)
    n_interactions: int
    metrics: dict[str, MetricComparison]


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]
    ungated_slices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationReport:
    domain: str
    primary_metric: str
    windows: Windows
    candidate_model_uri: str
    champion_model_uri: str | None  # None: compared with the domain's baseline scorer
    slices: list[SliceResult]  # the first one is the whole domain ("all")
    decision: GateDecision | None = None
    run_id: str | None = None

    @property
    def overall(self) -> SliceResult:
        return self.slices[0]

    def metrics(self) -> dict[str, float]:
        """Flat ``<slice>/<metric>/<candidate|champion|difference>`` values."""
        flat: dict[str, float] = {}
        for result in self.slices:
            flat[f"{result.name}/n_samples"] = float(result.n_samples)
            for metric, comparison in result.metrics.items():
                for role in ("candidate", "champion", "difference"):
                    flat[f"{result.name}/{metric}/{role}"] = getattr(comparison, role)
        return flat

    def metadata(self) -> dict[str, Any]:
        """The headline figures, rounded (Dagster asset metadata; ``markdown()`` has every slice)."""
        primary = self.overall.metrics[self.primary_metric]
        headline = {
            "gate": self.outcome,
            "gate_reasons": "; ".join(self.decision.reasons) if self.decision else "",
            "primary_metric": self.primary_metric,
            "candidate": _round(primary.candidate),
            "champion": _round(primary.champion),
            "difference": _round(primary.difference),
            "difference_ci": f"[{primary.difference_ci[0]:+.4f}, {primary.difference_ci[1]:+.4f}]",
            "n_samples": self.overall.n_samples,
        }
        if "ess" in self.overall.metrics:
            headline["ess_candidate"] = _round(self.overall.metrics["ess"].candidate, 1)
        return {
            **headline,
            "champion_model": self.champion_model_uri or "baseline",
            "held_out": f"{self.windows.holdout_start}..{self.windows.holdout_end}",
            "validation_run_id": self.run_id or "",
        }

    @property
    def outcome(self) -> str:
        return "passed" if self.decision and self.decision.passed else "failed"

    def lineage(self) -> dict[str, Any]:
        """Registry tags: the validation run and the held-out evidence the gate saw."""
        primary = self.overall.metrics[self.primary_metric]
        return {
            "validation.run_id": self.run_id or "",
            "validation.champion_model_uri": self.champion_model_uri or "baseline",
            "validation.primary_metric": self.primary_metric,
            "validation.difference": round(primary.difference, 4),
            "validation.n_samples": self.overall.n_samples,
        }

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def markdown(self) -> str:
        verdict = self.outcome
        reasons = self.decision.reasons if self.decision else []
        lines = [
            f"# Validation of {self.candidate_model_uri} ({self.domain})",
            f"- champion: {self.champion_model_uri or 'baseline'}",
            f"- held-out: {self.windows.holdout_start} to {self.windows.holdout_end}",
            f"- gate: **{verdict}**",
            *(f"  - {reason}" for reason in reasons),
            "",
            f"| slice | n | {self.primary_metric} candidate | champion | difference (95% CI) |",
            "|---|---|---|---|---|",
        ]
        for result in self.slices:
            m = result.metrics[self.primary_metric]
            low, high = m.difference_ci
            lines.append(
                f"| {result.name} | {result.n_samples} | {m.candidate:.4f} | {m.champion:.4f} "
                f"| {m.difference:+.4f} ({low:+.4f}, {high:+.4f}) |"
            )
        return "\n".join(lines) + "\n"


def holdout_rows(con: duckdb.DuckDBPyConnection, domain: str, windows: Windows) -> pl.DataFrame:
    """Held-out impressions (serving-time columns, p_good/label; null when unlabelled).

    Read from the held-out days only, which ``Windows`` keeps after every training day.
    """
    return impressions(con, domain, windows.holdout_start, windows.holdout_end)


# --- estimators: every one takes counts (B, n), how often each unit is in each resample ------


def weighted_auc(scores: np.ndarray, good: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of ``weights`` (B, n); tied scores count half. NaN without both classes."""
    order = np.argsort(scores, kind="stable")
    scores, good, weights = scores[order], good[order].astype(bool), weights[:, order]
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    positive = np.add.reduceat(weights * good, starts, axis=1)
    negative = np.add.reduceat(weights * ~good, starts, axis=1)
    negative_below = np.cumsum(negative, axis=1) - negative
    pairs = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            pairs > 0, (positive * (negative_below + 0.5 * negative)).sum(axis=1) / pairs, np.nan
        )


def ips(
    target: np.ndarray, propensity: np.ndarray, reward: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Inverse propensity scoring: mean of target/propensity * reward."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts @ (target / propensity * reward) / counts.sum(axis=1)


def snips(
    target: np.ndarray, propensity: np.ndarray, reward: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Self-normalised IPS: the importance-weighted mean reward."""
    weight = target / propensity
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts @ (weight * reward) / (counts @ weight)


def effective_sample_size(
    target: np.ndarray, propensity: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """(sum w)^2 / sum w^2 for importance weights w = target / propensity."""
    weight = target / propensity
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ weight) ** 2 / (counts @ weight**2)


def bootstrap_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Row 0: the sample itself (all ones); rows 1..n_resamples: resampling with replacement."""
    if n == 0:
        return np.zeros((n_resamples + 1, 0))
    resamples = rng.multinomial(n, np.full(n, 1 / n), size=n_resamples)
    return np.vstack([np.ones((1, n)), resamples])


def compare(candidate: np.ndarray, champion: np.ndarray) -> MetricComparison:
    """Point estimates from row 0, percentile intervals from the resamples."""
    difference = candidate - champion
    tail = 100 * (1 - CI_LEVEL) / 2

    def interval(values: np.ndarray) -> tuple[float, float]:
        if np.isnan(values[1:]).all():
            return (np.nan, np.nan)
        low, high = np.nanpercentile(values[1:], [tail, 100 - tail])
        return (float(low), float(high))

    return MetricComparison(
        float(candidate[0]),
        float(champion[0]),
        float(difference[0]),
        interval(candidate),
        interval(champion),
        interval(difference),
    )


# --- held-out evidence --------------------------------------------------------------------


def choices(rows: pl.DataFrame, shape: str) -> pl.DataFrame:
    """What each request could have been given, from the logs: the logged slate (recommendation)
    or every response logged for the same normalised query (assistant). Shown items keep their
    position, propensity and label; alternatives that were not shown have null ones."""
    if shape != "assistant":
        return rows
    keyed = rows.with_columns(
        query_key=pl.col("input_text")
        .str.to_lowercase()
        .str.extract_all(r"[a-z0-9']+")
        .list.unique()
        .list.sort()
        .list.join(" ")
    )
    responses = keyed.select("query_key", "item_id", "item_content").unique()
    shown = ["interaction_id", "item_id", "position", "propensity", "p_good", "label"]
    requests = keyed.drop("item_id", "item_content", "position", "propensity", "p_good", "label")
    return (
        requests.unique("interaction_id")
        .join(responses, on="query_key")
        .join(keyed.select(shown), on=["interaction_id", "item_id"], how="left")
        .drop("query_key")
    )


def target_probability(score: pl.Expr) -> pl.Expr:
    """A deterministic top-1 policy per interaction; tied top scores share the probability."""
    is_top = (score == score.max().over("interaction_id")).cast(pl.Float64)
    return is_top / is_top.sum().over("interaction_id")


def scored_choices(
    rows: pl.DataFrame, shape: str, candidate: Scorer, champion: Scorer
) -> pl.DataFrame:
    """Choices with both models' scores and top-1 probabilities."""
    options = choices(rows, shape)
    features = options.select(SERVING_FEATURES).to_pandas()
    return options.with_columns(
        score_candidate=pl.Series(np.asarray(candidate.predict(features), dtype=float)),
        score_champion=pl.Series(np.asarray(champion.predict(features), dtype=float)),
    ).with_columns(
        pi_candidate=target_probability(pl.col("score_candidate")),
        pi_champion=target_probability(pl.col("score_champion")),
        n_choices=pl.len().over("interaction_id"),
    )


def slice_masks(rows: pl.DataFrame) -> dict[str, pl.Expr]:
    """The whole domain, new vs returning users, and each segment present."""
    masks = {
        "all": pl.lit(True),
        "new_users": pl.col("is_new_user"),
        "returning_users": ~pl.col("is_new_user"),
    }
    for segment in sorted(rows["segment"].drop_nulls().unique().to_list()):
        masks["segment_" + re.sub(r"[^\w.-]", "_", segment)] = pl.col("segment") == segment
    return masks


def slice_result(
    name: str,
    labelled: pl.DataFrame,
    top_slots: pl.DataFrame,
    primary: str,
    rng: np.random.Generator,
    n_resamples: int,
) -> SliceResult:
    """Every metric on one slice: ``labelled`` shown impressions (auc) and ``top_slots``, the
    labelled position-0 impressions with a choice (off-policy). Candidate and champion are
    measured on the same resampled interactions."""
    units = pl.concat([labelled["interaction_id"], top_slots["interaction_id"]]).unique()
    code = {interaction: i for i, interaction in enumerate(units.to_list())}
    counts = bootstrap_counts(len(code), n_resamples, rng)
    row_counts = counts[:, [code[i] for i in labelled["interaction_id"].to_list()]]
    unit_counts = counts[:, [code[i] for i in top_slots["interaction_id"].to_list()]]

    good = labelled["label"].to_numpy()
    confidence = np.abs(2 * labelled["p_good"].to_numpy() - 1) * row_counts
    propensity, reward = top_slots["propensity"].to_numpy(), top_slots["p_good"].to_numpy()

    def both(metric: Callable[[str], np.ndarray]) -> MetricComparison:
        return compare(metric("candidate"), metric("champion"))

    def target(role: str) -> np.ndarray:
        return top_slots[f"pi_{role}"].to_numpy()

    metrics = {
        "auc": both(lambda r: weighted_auc(labelled[f"score_{r}"].to_numpy(), good, confidence)),
        "ips": both(lambda r: ips(target(r), propensity, reward, unit_counts)),
        "snips": both(lambda r: snips(target(r), propensity, reward, unit_counts)),
        "ess": both(lambda r: effective_sample_size(target(r), propensity, unit_counts)),
    }
    n_samples = labelled.height if primary == "auc" else top_slots.height
    return SliceResult(name, n_samples, len(code), metrics)


def compare_on_holdout(
    rows: pl.DataFrame,
    shape: str,
    candidate: Scorer,
    champion: Scorer,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> list[SliceResult]:
    """Candidate and champion scored on the same held-out rows, every metric on every slice."""
    scored = scored_choices(rows, shape, candidate, champion)
    labelled = scored.filter(pl.col("position").is_not_null() & pl.col("p_good").is_not_null())
    top_slots = labelled.filter((pl.col("position") == 0) & (pl.col("n_choices") > 1))
    rng = np.random.default_rng(seed)
    primary = PRIMARY_METRIC[shape]
    return [
        slice_result(name, labelled.filter(mask), top_slots.filter(mask), primary, rng, n_resamples)
        for name, mask in slice_masks(rows).items()
    ]


def _round(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


# --- the gate -------------------------------------------------------------------------------


def gate(
    report: ValidationReport, gate_config: Gate, min_slice_samples: int = MIN_SLICE_SAMPLES
) -> GateDecision:
    """Pass only with enough held-out samples, enough improvement on the primary metric, and no
    gated slice regressing by more than ``max_slice_regression``. Every failure is named."""
    metric = report.primary_metric
    overall = report.overall
    reasons, ungated = [], []
    if overall.n_samples < gate_config.min_samples:
        reasons.append(
            f"too_few_samples: {overall.n_samples} held-out samples < min_samples "
            f"{gate_config.min_samples}"
        )
    improvement = overall.metrics[metric].difference
    if np.isnan(improvement):
        reasons.append(f"undefined_metric: {metric} cannot be computed on the held-out rows")
    elif improvement < gate_config.min_improvement:
        reasons.append(
            f"improvement_below_minimum: {metric} candidate - champion = {improvement:+.4f} "
            f"< min_improvement {gate_config.min_improvement}"
        )
    for result in report.slices[1:]:
        regression = -result.metrics[metric].difference
        if result.n_samples < min_slice_samples or np.isnan(regression):
            ungated.append(f"{result.name} ({result.n_samples} samples)")
        elif regression > gate_config.max_slice_regression:
            reasons.append(
                f"slice_regression: slice {result.name} {metric} dropped {regression:.4f} "
                f"> max_slice_regression {gate_config.max_slice_regression}"
            )
    return GateDecision(passed=not reasons, reasons=reasons, ungated_slices=ungated)


# --- the whole validation step -------------------------------------------------------------


def validate_candidate(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    config: FlywheelConfig,
    domain: str,
    candidate_model_uri: str,
    champion_model_uri: str | None,
    windows: Windows,
) -> ValidationReport:
    """Score candidate and champion (or the baseline) on the held-out window, gate, and log the
    report as an MLflow run in the domain's experiment."""
    domain_config = config.domain(domain)
    mlflow.set_tracking_uri(home.mlflow_tracking_uri)
    candidate = mlflow.pyfunc.load_model(candidate_model_uri)
    champion = (
        mlflow.pyfunc.load_model(champion_model_uri)
        if champion_model_uri
        else baseline_scorer(domain_config.shape)
    )
    rows = holdout_rows(con, domain, windows)
    report = ValidationReport(
        domain=domain,
        primary_metric=PRIMARY_METRIC[domain_config.shape],
        windows=windows,
        candidate_model_uri=candidate_model_uri,
        champion_model_uri=champion_model_uri,
        slices=compare_on_holdout(rows, domain_config.shape, candidate, champion),
    )
    report = replace(report, decision=gate(report, domain_config.gate))
    return replace(report, run_id=log_validation_run(home, report))


def log_validation_run(home: Home, report: ValidationReport) -> str:
    """A run tagged with the candidate's training run: metrics per slice, the decision as tags,
    the report as JSON and markdown artifacts."""
    candidate_run_id = mlflow.models.get_model_info(report.candidate_model_uri).run_id
    decision = report.decision
    with mlflow.start_run(
        experiment_id=ensure_experiment(home, report.domain),
        run_name=f"validate-{report.windows.holdout_start}",
        tags={
            "flywheel.domain": report.domain,
            "flywheel.stage": "validation",
            "flywheel.candidate_run_id": candidate_run_id or "",
            "flywheel.candidate_model_uri": report.candidate_model_uri,
            "flywheel.champion_model_uri": report.champion_model_uri or "baseline",
            "flywheel.gate.passed": str(decision.passed).lower(),
            "flywheel.gate.reasons": "; ".join(decision.reasons) or "none",
        },
    ) as run:
        mlflow.log_params(
            {
                "primary_metric": report.primary_metric,
                "n_bootstrap": N_BOOTSTRAP,
                **report.windows.params(),
            }
        )
        mlflow.log_metrics(report.metrics())
        mlflow.log_dict(report.to_dict(), "validation/report.json")
        mlflow.log_text(report.markdown(), "validation/report.md")
    return run.info.run_id
