"""One measure per trap over polars frames: each returns the trap's Finding.

The frames (``audit.py`` reads them from the warehouse; tests build them by hand):

``training`` / ``holdout``: impressions of the window, serving-time columns (``training.base``) with
``p_good`` (null: unlabelled), ``audit_review_value`` (a random human review's verdict),
``clicked`` and ``outcome_value`` (the impression's click, its last outcome), ``candidates`` (how
many candidates its interaction logged; null: none), ``interaction_delivered`` (the batch day the interaction arrived) and ``evidence_delivered`` (the
first batch day one of its signals or outcomes arrived: what its label was made from).
``outcomes``: one row per delayed outcome (or, for a click-maturity domain, click) of the windows'
interactions: ``name, event_date`` (the interaction's day), ``served_at, delay_s`` (what the event
claims), ``delivered`` (its batch day). ``activity``: the days each user interacted, ``user_id,
event_date``, through the last day of the data.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
from croniter import croniter

from flywheel_pipeline.config import DomainConfig, HealthSettings
from flywheel_pipeline.health import Finding
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.training.recommendation import RecommendationTrainer, examination_curve

CADENCE_DAYS = {"daily": 1, "weekly": 7, "monthly": 30, "quarterly": 91}
MIN_TRAFFIC_SHARE = 0.05  # survivorship, vocal_minority: smaller cohorts and segments are too thin to judge
FLOOR_TOLERANCE = 0.2  # exposure_bias: how far below exploration's own chance a logged propensity may fall
MIN_CLICKS = 50  # engagement: fewer clicks of the clickiest items are too thin to judge their outcomes
MIN_ITEM_IMPRESSIONS = 20  # engagement: an item shown less has no click rate to rank it by
HEAD_SHARE = 0.1  # popularity: the share of a day's shown items, most shown first, that is its head
CLICKIEST_SHARE = 0.1  # engagement: the share of items, by click rate, whose outcomes per click are judged
TOP_ITEMS = 10
# survivorship: what a cohort's coverage counts, and its measures' names
COVERAGE_OF = {"labels": "coverage", "reactions": "reaction_coverage"}
# leakage: serving columns judged alone besides the numeric context features
SERVING_NUMERIC = ("position", "propensity", "slate_size", "is_new_user")
EXPLANATIONS = {
    "exposure_bias": "The model only learns about what it chose to show, and where: without random "
                     "exploration and position correction its own choices look best.",
    "survivorship": "Labels come from users who stayed and reacted: a cohort that leaves or stays "
                    "silent is unheard, and the model drifts toward those who remain.",
    "label_delay": "Days whose outcomes have not arrived yet look bad: training on them teaches "
                   "the model that recent traffic failed.",
    "leakage": "A feature known only after the label, or held-out rows in training, makes the "
               "model look better offline than it can be when serving.",
    "self_consumption": "Labels only on the model's own choices, with no exploration or random "
                        "human review, let the loop confirm itself.",
    "diversity": "Each version trained on the last one's exposure narrows what is shown, until a "
                 "few items take all the traffic.",
    "vocal_minority": "The users who react are not the users who don't: when one group's reactions "
                      "make most of the labels, the model learns to please that group.",
    "popularity": "Items gain reactions because they were shown, not because they are good: the "
                  "model learns their exposure and shows them more.",
    "engagement": "Clicks are not the outcome that matters: a model that learns what draws clicks "
                  "(clickbait) looks better while the outcomes get worse.",
}


def exposure_bias(training: pl.DataFrame, settings: HealthSettings, shape: str,
                  served: pl.DataFrame | None = None) -> Finding:
    """Exploration share and ESS of the IPS weights (over the impressions whose propensity was
    logged; null: unknown); explored impressions of ``served`` (default: the training window's;
    the audit passes both windows, since validation weighs the held-out ones) logged as rarer than
    exploration alone made them; for a recommendation domain the examination curve and the good
    rate by position, raw and weighted as the trainer weighs."""
    exploration = _share(training["policy"] == "explore")
    known = _share(training["propensity"].is_not_null())
    weights = 1 / training.filter(pl.col("propensity") > 0)["propensity"].to_numpy()
    ess = float(weights.sum() ** 2 / (weights**2).sum()) if len(weights) else 0.0
    below = _below_exploration_floor(training if served is None else served)
    measures = {"exploration_share": exploration, "ips_ess": ess,
                "ips_ess_share": ess / len(weights) if len(weights) else math.nan,
                "propensity_known_share": known, "explored_below_floor_share": below}
    tables, problems, least = {}, [], settings.min_exploration_share
    if exploration < least:
        problems.append(f"exploration share {exploration:.1%} < {least:.1%}")
    if below > settings.max_below_floor_share:
        problems.append(f"{below:.1%} of explored impressions are logged as less likely than exploration alone "
                        f"made them (exploration share / candidates) > {settings.max_below_floor_share:.0%}: "
                        "the logged propensities are not the serving policy's")
    if shape == "recommendation":
        by_position = _position_correction(training.filter(pl.col("p_good").is_not_null()))
        tables["by_position"] = by_position
        estimated = by_position["theta"].is_not_null().any()
        measures["examination_estimated"] = float(estimated)
        for row in by_position.iter_rows(named=True):
            for name in ("theta", "raw_rate", "weighted_rate"):
                measures[f"{name}@{row['position']}"] = _float(row[name])
        for name in ("raw", "weighted"):
            measures[f"position_gap_{name}"] = _gap(by_position[f"{name}_rate"])
        if not estimated:
            problems.append("the examination curve cannot be estimated "
                            "(too few explored impressions)")
    judged = (f"exploration share {exploration:.1%} (min {least:.1%}), "
              f"IPS ESS {ess:.0f} of {len(weights)}")
    if known < 1:
        judged += f" (propensities logged for {known:.0%} of impressions)"
    if "position_gap_raw" in measures:
        judged += (f", good rate lowest vs top slot {measures['position_gap_raw']:.0%} lower raw, "
                   f"{measures['position_gap_weighted']:.0%} as the trainer weighs")
    return _finding("exposure_bias", problems, judged, measures, tables)


def _below_exploration_floor(served: pl.DataFrame) -> float:
    """Share of the explored impressions (of interactions that logged their candidates) whose logged
    propensity is below (1 - FLOOR_TOLERANCE) of exploration's own chance of showing any candidate
    there: the exploration share of ``served``'s impressions (from the log itself, over the whole
    window: a day's share is too noisy at low traffic) over the candidates; NaN without such
    impressions. A uniformly random slate shows each candidate at
    each position with at least that chance, whatever the champion does, so a propensity below it
    was computed for another policy (a stale exploration share, a wrong position)."""
    explored = served.with_columns(
        floor=(1 - FLOOR_TOLERANCE) * (pl.col("policy") == "explore").mean() / pl.col("candidates"),
    ).filter((pl.col("policy") == "explore") & pl.col("propensity").is_not_null() & (pl.col("candidates") > 0))
    return _share(explored["propensity"] < explored["floor"])


def _position_correction(labelled: pl.DataFrame) -> pl.DataFrame:
    """position, theta (null when not estimated), explored impressions' good rate, and every
    impression's good rate raw and weighted as the trainer weighs."""
    trainer = RecommendationTrainer()
    curve = examination_curve(labelled, trainer.min_exploration_rows, 1 / trainer.max_ips_weight)
    weighted, _ = trainer.weigh(labelled)
    good = (pl.col("p_good") >= 0.5).cast(pl.Float64)
    return (
        weighted.group_by("position")
        .agg(impressions=pl.len(), explore_rate=good.filter(pl.col("policy") == "explore").mean(),
             raw_rate=good.mean(),
             weighted_rate=(good * pl.col("weight")).sum() / pl.col("weight").sum())
        .with_columns(theta=pl.col("position").replace_strict(curve, default=None,
                                                              return_dtype=pl.Float64))
        .select("position", "impressions", "theta", "explore_rate", "raw_rate", "weighted_rate")
        .sort("position")
    )


def _gap(rates: pl.Series) -> float:
    """How much lower the lowest slot's rate is than the top slot's; NaN without a top rate."""
    top = rates[0] if len(rates) else None
    return float(1 - rates[-1] / top) if top else math.nan


def survivorship(
    training: pl.DataFrame, activity: pl.DataFrame, settings: HealthSettings
) -> Finding:
    """Coverage of new vs returning users, churned vs staying ones and each segment, each against
    the coverage of the rest of its traffic: by labels, and by reactions (a signal or outcome came
    back). Reactions matter on their own: a label can come from missing evidence (a slate nobody
    clicked), so a cohort whose reactions never arrive can look labelled, and all bad."""
    cohorts = _cohorts(training, activity, settings.churn_days)
    table = pl.concat([_coverage(cohorts, dimension, of) for of in COVERAGE_OF
                       for dimension in ("user", "churn", "segment")],
                      how="vertical_relaxed").sort("of", "dimension", "cohort")
    measures = {f"{COVERAGE_OF[row['of']]}@{row['cohort']}": row["coverage"]
                for row in table.iter_rows(named=True)}
    judged = table.filter((pl.col("traffic_share") >= MIN_TRAFFIC_SHARE)
                          & pl.col("ratio").is_not_nan())
    worst = judged.sort("ratio").row(0, named=True) if judged.height else None
    measures["coverage@all"] = _share(cohorts["labels"])
    measures["reaction_coverage@all"] = _share(cohorts["reactions"])
    measures["min_coverage_ratio"] = worst["ratio"] if worst else math.nan
    threshold = settings.min_cohort_coverage_ratio
    problems = [
        f"{row['cohort']} ({row['traffic_share']:.0%} of traffic) has {row['coverage']:.1%} "
        f"{row['of']} vs {row['rest_coverage']:.1%} for the rest (ratio {row['ratio']:.2f} < "
        f"{threshold})"
        for row in judged.filter(pl.col("ratio") < threshold).iter_rows(named=True)
    ]
    judged_line = (f"lowest coverage ratio {worst['ratio']:.2f} ({worst['cohort']}, {worst['of']}) "
                   f"vs min {threshold}" if worst else "no cohort large enough to judge")
    return _finding("survivorship", problems, judged_line, measures, {"coverage": table})


def _cohorts(training: pl.DataFrame, activity: pl.DataFrame, churn_days: int) -> pl.DataFrame:
    """Per impression: labelled, reacted to, user (new/returning), churn (churned/stayed, null
    when too recent to judge) and segment cohorts."""
    last_day = activity["event_date"].max()
    returns = (
        activity.select("user_id", pl.col("event_date").alias("returned_on"))
        .unique().sort("returned_on")
    )
    visits = (
        training.select("user_id", "event_date").unique().sort("event_date")
        .join_asof(returns, left_on="event_date", right_on="returned_on", by="user_id",
                   strategy="forward", allow_exact_matches=False, check_sortedness=False)
    )
    churned = (pl.col("returned_on").is_null()
               | (pl.col("returned_on") > pl.col("event_date") + timedelta(days=churn_days)))
    judgeable = pl.col("event_date") <= pl.lit(last_day) - timedelta(days=churn_days)
    return training.join(visits, on=["user_id", "event_date"], how="left").select(
        labels=pl.col("p_good").is_not_null(),
        reactions=pl.col("evidence_delivered").is_not_null(),
        user=pl.when(pl.col("is_new_user")).then(pl.lit("new")).otherwise(pl.lit("returning")),
        churn=pl.when(judgeable).then(
            pl.when(churned).then(pl.lit("churned")).otherwise(pl.lit("stayed"))),
        segment=pl.lit("segment=") + pl.col("segment").fill_null("none"),
    )


def _coverage(cohorts: pl.DataFrame, dimension: str, of: str) -> pl.DataFrame:
    """of, dimension, cohort, impressions, traffic_share, coverage (share with ``of``: labels or
    reactions), rest_coverage, ratio."""
    rows = cohorts.filter(pl.col(dimension).is_not_null())
    total, total_covered = rows.height, int(rows[of].sum())
    return (
        rows.group_by(pl.col(dimension).alias("cohort"))
        .agg(impressions=pl.len(), covered=pl.col(of).sum())
        .with_columns(
            of=pl.lit(of),
            dimension=pl.lit(dimension),
            traffic_share=pl.col("impressions") / total,
            coverage=pl.col("covered") / pl.col("impressions"),
            rest_coverage=(total_covered - pl.col("covered")) / (total - pl.col("impressions")),
        )
        .with_columns(ratio=(pl.col("coverage") / pl.col("rest_coverage")).fill_null(math.nan))
        .select("of", "dimension", "cohort", "impressions", "traffic_share", "coverage",
                "rest_coverage", "ratio")
    )


def label_delay(outcomes: pl.DataFrame, windows: Windows, domain_config: DomainConfig) -> Finding:
    """Outcome delays by delivery (end of the batch day minus serving) and as claimed, against
    the windows and the cadence; the share of training days still immature by delivery."""
    delivered_h = (pl.col("delivered").cast(pl.Datetime("us")) + timedelta(days=1)
                   - pl.col("served_at")).dt.total_seconds() / 3600
    quantiles = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    claimed_h = pl.col("delay_s") / 3600
    table = (
        outcomes.group_by("name")
        .agg(outcomes=pl.len(),
             **{f"delivery_{k}_h": delivered_h.quantile(q) for k, q in quantiles.items()},
             **{f"claimed_{k}_h": claimed_h.quantile(q) for k, q in quantiles.items()})
        .sort("name")
    )
    measures = {f"{column}@{row['name']}": _float(row[column])
                for row in table.iter_rows(named=True) for column in table.columns[2:]}
    maturity = domain_config.label_maturity
    lags = outcomes.filter(pl.col("name") == maturity.outcome).select(
        (pl.col("delivered") - pl.col("event_date")).dt.total_days())
    cadence = cadence_days(domain_config.cadence)
    measures |= {"cadence_days": cadence, "lookback_days": float(domain_config.lookback_days),
                 "holdout_days": float(domain_config.holdout_days)}
    if not lags.height:
        return _finding("label_delay", [], f"no {maturity.outcome} outcome arrived: no delay to "
                        "judge", measures, {"delays": table})
    wait = int(np.quantile(lags.to_series().to_numpy(), maturity.quantile, method="higher"))
    days = pl.date_range(windows.train_start, windows.train_end, eager=True)
    immature = int((days + timedelta(days=wait) > windows.holdout_end).sum())
    share = immature / len(days)
    measures |= {"delivery_wait_days": float(wait), "immature_days": float(immature),
                 "immature_share": share}
    most = domain_config.health.max_immature_share
    judged = (f"{immature} of {len(days)} training days ({share:.0%}) younger than the "
              f"{maturity.quantile:.0%} delivery delay of {maturity.outcome} ({wait} d; holdout "
              f"{domain_config.holdout_days} d, cadence {cadence:.0f} d), max {most:.0%}")
    problems = [judged] if share > most else []
    understated = _understated_days(table, maturity.outcome)
    measures["understated_delay_days"] = understated
    if understated > domain_config.health.max_understated_delay_days:
        problems.append(f"{maturity.outcome} outcomes arrive a median {understated:.1f} d later than "
                        f"their timestamps say: the maturity cutoff, which believes the timestamps, "
                        f"calls days mature too soon")
    return _finding("label_delay", problems, judged, measures, {"delays": table})


def _understated_days(delays: pl.DataFrame, outcome: str) -> float:
    """How much later than claimed the median outcome arrives, less the day a batch can hold it."""
    row = delays.filter(pl.col("name") == outcome)
    if not row.height:
        return math.nan
    return max(0.0, (row["delivery_p50_h"][0] - row["claimed_p50_h"][0]) / 24 - 1)


def cadence_days(cadence: str) -> float:
    """Days between cycles: the named cadences', or a cron's mean gap over its next ten runs."""
    if cadence in CADENCE_DAYS:
        return float(CADENCE_DAYS[cadence])
    runs = croniter(cadence, datetime(2026, 1, 1))
    times = [runs.get_next(datetime) for _ in range(11)]
    return (times[-1] - times[0]).total_seconds() / 86400 / 10


def leakage(training: pl.DataFrame, holdout: pl.DataFrame, settings: HealthSettings) -> Finding:
    """Interactions delivered after their label's evidence, each serving feature's AUC alone
    against the label, and held-out rows found in training."""
    labelled = training.filter(pl.col("p_good").is_not_null())
    comparable = labelled.filter(pl.col("evidence_delivered").is_not_null())
    late = _share(comparable["interaction_delivered"] > comparable["evidence_delivered"])
    aucs = feature_aucs(labelled)
    ids = training["interaction_id"].unique().is_in(holdout["interaction_id"].unique().implode())
    days = ["user_id", "event_date"]
    user_days = training.select(days).unique().join(holdout.select(days).unique(), on=days).height
    measures = {"late_interaction_share": late, "overlap_interactions": float(ids.sum()),
                "overlap_user_days": float(user_days)}
    measures |= {f"auc@{row['feature']}": row["auc"] for row in aucs.iter_rows(named=True)}
    top = aucs.row(0, named=True) if aucs.height else {"feature": "none", "auc": math.nan}
    measures["max_feature_auc"] = top["auc"]
    problems = []
    if top["auc"] > settings.max_feature_auc:
        problems.append(f"feature {top['feature']} alone separates the labels with AUC "
                        f"{top['auc']:.3f} > {settings.max_feature_auc}")
    if late > settings.max_late_feature_share:
        problems.append(f"{late:.1%} of labelled impressions' interactions arrived after their "
                        f"label's evidence > {settings.max_late_feature_share:.0%}: their features "
                        f"may have been made knowing it (top feature {top['feature']}, AUC "
                        f"{top['auc']:.3f})")
    if ids.sum() or user_days:
        problems.append(f"{int(ids.sum())} held-out interactions and {user_days} held-out "
                        "user-days are in the training rows")
    judged = (f"top feature {top['feature']} AUC {top['auc']:.3f} "
              f"(max {settings.max_feature_auc}), "
              f"{late:.1%} of interactions delivered after their evidence "
              f"(max {settings.max_late_feature_share:.0%}), no held-out rows in training")
    return _finding("leakage", problems, judged, measures, {"feature_auc": aucs})


def feature_aucs(labelled: pl.DataFrame) -> pl.DataFrame:
    """feature, auc: each numeric context feature and serving column alone against the label
    (p_good >= 0.5), as max(AUC, 1 - AUC), highest first; constant features are left out."""
    label = (labelled["p_good"] >= 0.5).to_numpy()
    features = {name: labelled[name].cast(pl.Float64).to_numpy()
                for name in SERVING_NUMERIC if name in labelled.columns}
    features |= _context_columns(labelled["context_features"])
    rows = [{"feature": name, "auc": auc} for name, values in features.items()
            if not math.isnan(auc := _auc(values, label))]
    return pl.DataFrame(rows, schema={"feature": pl.String, "auc": pl.Float64}).sort(
        "auc", descending=True)


def _context_columns(context: pl.Series) -> dict[str, np.ndarray]:
    """Each numeric context feature as a column (NaN where a row lacks it); each distinct JSON
    text is parsed once."""
    texts, codes = np.unique(context.fill_null("{}").to_numpy().astype(str), return_inverse=True)
    parsed = [json.loads(text) for text in texts.tolist()]
    names = sorted({name for features in parsed for name in features})
    return {f"context.{name}": np.array([float(f.get(name, math.nan)) for f in parsed])[codes]
            for name in names}


def _auc(values: np.ndarray, label: np.ndarray) -> float:
    """max(AUC, 1 - AUC) of ``values`` for ``label`` (ties count half); NaN when it cannot tell."""
    known = ~np.isnan(values)
    values, label = values[known], label[known]
    positives, negatives = int(label.sum()), int((~label).sum())
    if not positives or not negatives or np.unique(values).size < 2:
        return math.nan
    ranks = pl.Series(values).rank("average").to_numpy()
    auc = (ranks[label].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    return float(max(auc, 1 - auc))


def self_consumption(training: pl.DataFrame, settings: HealthSettings) -> Finding:
    """Share of training labels on the serving model's own choices (per model version, and from
    flywheel models) vs labels with independent evidence (exploration, random human review).
    Only labels something came back for count: a label made from silence (a slate nobody clicked)
    is no evidence of anything the model did not choose."""
    labelled = training.filter(pl.col("p_good").is_not_null()
                               & (pl.col("evidence_delivered").is_not_null()
                                  | pl.col("audit_review_value").is_not_null()))
    chosen = labelled["policy"] == "champion"
    own = _share(chosen)
    flywheel = _share(chosen & (labelled["model_version"] != "baseline"))
    explored = labelled["policy"] == "explore"
    independent = _share(explored | labelled["audit_review_value"].is_not_null())
    table = (
        labelled.group_by("policy", "model_version").agg(labels=pl.len())
        .with_columns(share=pl.col("labels") / max(labelled.height, 1))
        .sort("policy", "model_version")
    )
    measures = {"self_consumption_share": own, "flywheel_share": flywheel,
                "independent_share": independent}
    measures |= {f"share@{row['model_version']}": row["share"]
                 for row in table.filter(pl.col("policy") == "champion").iter_rows(named=True)}
    judged = (f"{own:.1%} of training labels with a reaction on the champion's own choices (max "
              f"{settings.max_self_consumption_share:.0%}), {independent:.1%} independent "
              f"(min {settings.min_independent_share:.0%})")
    loop = (own > settings.max_self_consumption_share
            and independent < settings.min_independent_share)
    return _finding("self_consumption", [judged] if loop else [], judged, measures,
                    {"by_version": table})


def diversity(impressions: pl.DataFrame, settings: HealthSettings) -> Finding:
    """Per served model version (the champion's impressions): distinct items, catalogue coverage,
    Gini and normalized entropy of exposure, top items' share; judged on the latest version."""
    catalogue = impressions["item_id"].n_unique()
    served = impressions.filter(pl.col("policy") == "champion")
    rows = [
        {"model_version": version, "last_served": group["served_at"].max(),
         **_exposure(group["item_id"].value_counts()["count"].to_numpy(), catalogue)}
        for (version,), group in served.group_by("model_version")
    ]
    table = pl.DataFrame(rows).sort("last_served") if rows else pl.DataFrame()
    measures = {f"{name}@{row['model_version']}": float(row[name])
                for row in table.iter_rows(named=True)
                for name in ("items", "coverage", "gini", "entropy", "top_share")}
    if not rows:
        return _finding("diversity", [], "no impressions served by a model", measures, {})
    current = table.row(-1, named=True)
    measures |= {"catalogue": float(catalogue), "coverage": current["coverage"],
                 "top_share": current["top_share"]}
    problems = []
    if current["coverage"] < settings.min_catalogue_coverage:
        problems.append(f"version {current['model_version']} shows {current['coverage']:.1%} of "
                        f"the catalogue < {settings.min_catalogue_coverage:.0%}")
    if current["top_share"] > settings.max_top_items_share:
        problems.append(f"version {current['model_version']}'s top {TOP_ITEMS} items take "
                        f"{current['top_share']:.1%} of its exposure > "
                        f"{settings.max_top_items_share:.0%}")
    judged = (f"version {current['model_version']} shows {current['coverage']:.1%} of {catalogue} "
              f"items (min {settings.min_catalogue_coverage:.0%}), top {TOP_ITEMS} take "
              f"{current['top_share']:.1%} (max {settings.max_top_items_share:.0%})")
    return _finding("diversity", problems, judged, measures,
                    {"by_version": table.drop("last_served")})


def vocal_minority(training: pl.DataFrame, settings: HealthSettings) -> Finding:
    """Each segment's share of the impressions reacted to (a signal or outcome came back) over its
    share of the impressions (its representation); judged on segments of at least
    MIN_TRAFFIC_SHARE of the traffic."""
    reacted = pl.col("evidence_delivered").is_not_null()
    reactions = max(int(training.select(reacted.sum()).item()), 1)
    table = (
        training.group_by(segment=pl.col("segment").fill_null("none"))
        .agg(impressions=pl.len(), reactions=reacted.sum())
        .with_columns(traffic_share=pl.col("impressions") / max(training.height, 1),
                      reaction_share=pl.col("reactions") / reactions)
        .with_columns(representation=pl.col("reaction_share") / pl.col("traffic_share"))
        .sort("segment")
    )
    judged = table.filter(pl.col("traffic_share") >= MIN_TRAFFIC_SHARE).sort("representation")
    measures = {f"representation@{row['segment']}": row["representation"]
                for row in table.iter_rows(named=True)}
    if not judged.height:
        return _finding("vocal_minority", [], "no segment large enough to judge", measures,
                        {"by_segment": table})
    top = judged.row(-1, named=True)
    measures["max_representation"] = top["representation"]
    most = settings.max_reaction_overrepresentation
    judged_line = (f"segment {top['segment']} has {top['traffic_share']:.1%} of the impressions and "
                   f"{top['reaction_share']:.1%} of those reacted to (representation "
                   f"{top['representation']:.2f}, max {most})")
    problems = [judged_line] if top["representation"] > most else []
    return _finding("vocal_minority", problems, judged_line, measures, {"by_segment": table})


def popularity(training: pl.DataFrame, settings: HealthSettings) -> Finding:
    """Is an item clicked more on the days it is among the most shown (the day's HEAD_SHARE of
    items with the most impressions), whatever its merit? Over the explored impressions (shown at
    random, to anyone, at any position, so merit and position are the same on every day), the
    slope of the click on being in the day's head, with a fixed effect per item (each item's days
    against its own mean), and its z statistic. Honest clicks do not care what else was shown."""
    exposure = training.group_by("event_date", "item_id").agg(shown=pl.len()).with_columns(
        head=pl.col("shown").rank("min", descending=True).over("event_date")
        <= (HEAD_SHARE * pl.len().over("event_date")).round().clip(1))
    explored = (
        training.filter((pl.col("policy") == "explore") & pl.col("clicked").is_not_null())
        .join(exposure, on=["event_date", "item_id"])
        .select("item_id", x=pl.col("head").cast(pl.Float64), y=pl.col("clicked").cast(pl.Float64))
        .filter(pl.len().over("item_id") >= 2)
        .with_columns(pl.col("x", "y") - pl.col("x", "y").mean().over("item_id"))
    )
    slope, z = _fixed_effects_slope(explored)
    measures = {"head_click_lift": slope, "head_click_z": z, "explored_impressions": float(explored.height)}
    most = settings.max_popularity_z
    judged = (f"explored items are clicked {slope:+.3f} more often on the days they are in the head (the "
              f"{HEAD_SHARE:.0%} most shown), within items (z {z:.1f}, max {most}; {explored.height} explored "
              f"impressions)")
    problems = [judged] if z > most else []
    return _finding("popularity", problems, judged, measures, {})


def _fixed_effects_slope(demeaned: pl.DataFrame) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` (both demeaned within items) and its z statistic
    (NaN, NaN when x does not vary)."""
    x, y = demeaned["x"].to_numpy(), demeaned["y"].to_numpy()
    sxx = float((x * x).sum())
    dof = len(x) - demeaned["item_id"].n_unique() - 1
    if sxx <= 0 or dof < 1:
        return math.nan, math.nan
    slope = float((x * y).sum() / sxx)
    error = math.sqrt(float(((y - slope * x) ** 2).sum()) / dof / sxx)
    return slope, slope / error if error else math.nan


def engagement(training: pl.DataFrame, settings: HealthSettings) -> Finding:
    """Outcomes per click of the clickiest items (the CLICKIEST_SHARE of items, with at least
    MIN_ITEM_IMPRESSIONS impressions, of highest click rate) against the other items'. An honest
    click says the item suits the user, so the clickiest items lead to the outcome at least as
    often as the rest; items that draw clicks without outcomes (clickbait) lead to it less."""
    clicked = pl.col("clicked").fill_null(False)
    items = (
        training.filter(pl.col("clicked").is_not_null())
        .group_by("item_id")
        .agg(impressions=pl.len(), clicks=clicked.sum(),
             outcomes=(clicked & (pl.col("outcome_value").fill_null(0) > 0)).sum())
        .filter(pl.col("impressions") >= MIN_ITEM_IMPRESSIONS)
        .with_columns(click_rate=pl.col("clicks") / pl.col("impressions"))
    )
    cut = items["click_rate"].quantile(1 - CLICKIEST_SHARE, "higher") if items.height else None
    table = (
        items.group_by(clickiest=pl.col("click_rate") >= cut)
        .agg(items=pl.len(), impressions=pl.col("impressions").sum(), clicks=pl.col("clicks").sum(),
             outcomes=pl.col("outcomes").sum())
        .with_columns(click_rate=pl.col("clicks") / pl.col("impressions"),
                      outcomes_per_click=pl.col("outcomes") / pl.col("clicks"))
        .sort("clickiest", descending=True)
    )
    rate = {row["clickiest"]: row for row in table.iter_rows(named=True)}
    measures = {f"outcomes_per_click@{'clickiest' if key else 'rest'}": _float(row["outcomes_per_click"])
                for key, row in rate.items()}
    if len(rate) < 2 or rate[True]["clicks"] < MIN_CLICKS or not rate[False]["outcomes"]:
        return _finding("engagement", [], f"too few clicks or outcomes to judge (the clickiest items need "
                        f"{MIN_CLICKS} clicks, the rest an outcome)", measures, {"by_click_rate": table})
    ratio, upper = _ratio_upper_bound(rate[True], rate[False])
    measures |= {"outcome_per_click_ratio": ratio, "outcome_per_click_ratio_upper": upper}
    least = settings.min_outcome_per_click_ratio
    judged = (f"the {rate[True]['items']} clickiest items (click rate {rate[True]['click_rate']:.1%}) lead to an "
              f"outcome on {rate[True]['outcomes_per_click']:.1%} of their clicks, the other "
              f"{rate[False]['items']} on {rate[False]['outcomes_per_click']:.1%} (ratio {ratio:.2f}, 95% upper "
              f"bound {upper:.2f}, min {least})")
    return _finding("engagement", [judged] if upper < least else [], judged, measures,
                    {"by_click_rate": table})


def _ratio_upper_bound(some: dict, others: dict) -> tuple[float, float]:
    """The ratio of two outcomes-per-click rates and its 95% upper bound (delta method on the log
    ratio; ``some``'s rate taken as at least one outcome)."""
    ratio = some["outcomes_per_click"] / others["outcomes_per_click"]
    variance = sum((1 - row["outcomes_per_click"]) / max(row["outcomes"], 1) for row in (some, others))
    return ratio, max(ratio, 1 / some["clicks"] / others["outcomes_per_click"]) * math.exp(1.96 * math.sqrt(variance))


def _exposure(counts: np.ndarray, catalogue: int) -> dict[str, float]:
    """items, coverage, gini (over the whole catalogue, unshown items at 0), entropy (over
    log(catalogue)), top_share of an exposure count per shown item."""
    full = np.sort(np.concatenate([counts, np.zeros(catalogue - len(counts))]))
    shares = counts / counts.sum()
    ranks = np.arange(1, catalogue + 1)
    gini = float(((2 * ranks - catalogue - 1) * full).sum() / (catalogue * full.sum()))
    entropy = -(shares * np.log(shares)).sum() / math.log(catalogue) if catalogue > 1 else 0.0
    return {"impressions": float(counts.sum()), "items": float(len(counts)),
            "coverage": len(counts) / catalogue, "gini": gini, "entropy": float(entropy),
            "top_share": float(np.sort(shares)[::-1][:TOP_ITEMS].sum())}


def _finding(trap: str, problems: list[str], judged: str, measures: dict[str, float],
             tables: dict[str, pl.DataFrame]) -> Finding:
    """Flagged when there is a problem; the summary names the problems, or what was judged."""
    return Finding(trap=trap, flagged=bool(problems), summary="; ".join(problems) or judged,
                   explanation=EXPLANATIONS[trap], measures=measures, tables=tables)


def _share(mask: pl.Series) -> float:
    """Share of true values; NaN for no rows."""
    return float(mask.sum() / mask.len()) if mask.len() else math.nan


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)
