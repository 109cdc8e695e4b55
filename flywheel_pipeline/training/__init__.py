"""Fine-tune: one trainer per domain shape behind one interface, one MLflow run per candidate."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

from flywheel_pipeline import groups
from flywheel_pipeline.config import (
    DomainConfig,
    FlywheelConfig,
    HashedTrainerSettings,
    InProcessSettings,
    PipesTrainerSettings,
    TransformerTrainerSettings,
)
from flywheel_pipeline.home import Home
from flywheel_pipeline.sources import Readable
from flywheel_pipeline.training.assistant import AssistantTrainer
from flywheel_pipeline.training.base import (
    FittedScorer,
    FlywheelScorerModel,
    Trainer,
    TrainingResult,
    Windows,
    fit_with_internal_check,
    impressions,
    label_model_versions,
    log_training_run,
    policy_metrics,
    split_windows,
    training_set,
)
from flywheel_pipeline.training.pipes import PipesLaunch, train_elsewhere
from flywheel_pipeline.training.recommendation import (
    HashedRecommendationTrainer,
    RecommendationTrainer,
)

__all__ = [
    "TRAINERS",
    "AssistantTrainer",
    "FittedScorer",
    "FlywheelScorerModel",
    "RecommendationTrainer",
    "Trainer",
    "TrainingResult",
    "Windows",
    "split_windows",
    "train_candidate",
    "trainer_for",
]

def _transformer(settings: TransformerTrainerSettings) -> Trainer:
    # imported when chosen: it needs the optional extra flywheel[transformers] (torch)
    from flywheel_pipeline.training.transformer import TransformerTrainer

    return TransformerTrainer(settings)


# Every trainer that fits in a process, by domain shape and flywheel.yaml's `trainer.kind`: what
# trainer_for builds and benchmarks/trainers.py compares. (`pipes` runs one of these, or any
# command, out of process: training/pipes.py.)
TRAINERS: dict[str, dict[str, Callable[[InProcessSettings], Trainer]]] = {
    "assistant": {"hashed": lambda settings: AssistantTrainer(), "transformer": _transformer},
    "recommendation": {"hashed": lambda settings: HashedRecommendationTrainer(),
                       "embeddings": lambda settings: RecommendationTrainer()},
}


def trainer_for(domain_config: DomainConfig, settings: InProcessSettings | None = None) -> Trainer:
    """The in-process trainer of the domain's shape that ``settings`` name (default: the domain's
    ``trainer``; for a pipes trainer, what it ``fits``)."""
    settings = settings or domain_config.trainer
    if isinstance(settings, PipesTrainerSettings):
        settings = settings.fits
    return TRAINERS[domain_config.shape][settings.kind](settings)


def train_candidate(
    source: Readable,
    home: Home,
    config: FlywheelConfig,
    domain: str,
    as_of: date,
    mature_until: date | None = None,
    dagster_run_id: str | None = None,
    launch: PipesLaunch | None = None,
) -> TrainingResult:
    """Fit a candidate on the domain's training window and log it as one MLflow run (tagged with
    the Dagster run that trains, when there is one). ``source``: where it reads the impressions and
    their labels (flywheel_pipeline.sources). A pipes trainer runs where ``launch`` sends it, its
    training set weighted here by the shape's hashed trainer's rules."""
    domain_config = config.domain(domain)
    settings = domain_config.trainer
    elsewhere = isinstance(settings, PipesTrainerSettings)
    if elsewhere and launch is None:
        raise ValueError(f"{domain}: trainer pipes runs through a Dagster Pipes client: materialize "
                         f"{domain}/candidate_model (its resource pipes_trainer launches it)")
    windows = split_windows(as_of, domain_config, mature_until)
    rows = impressions(source, domain, windows.train_start, windows.train_end)
    train = training_set(rows)
    if train.is_empty():
        raise ValueError(f"{domain}: no labelled impressions in {windows.params()}")
    # a transformer fitted elsewhere weighs as its shape's hashed trainer does (no torch needed here)
    transformer_elsewhere = elsewhere and domain_config.trainer.fits.kind == "transformer"
    trainer = trainer_for(domain_config, HashedTrainerSettings() if transformer_elsewhere else None)
    weighted, weighting_metrics = trainer.weigh(train)
    weighted, group_metrics = groups.balance(weighted, domain_config.groups)
    metrics = {
        "label_coverage": train.height / rows.height,
        **policy_metrics(train),
        **weighting_metrics,
        **group_metrics,
    }
    params = {
        "domain": domain,
        "shape": domain_config.shape,
        "as_of": as_of.isoformat(),
        "mature_until": mature_until.isoformat() if mature_until else "none",
        "lookback_days": domain_config.lookback_days,
        "holdout_days": domain_config.holdout_days,
        **windows.params(),
        "n_impressions": rows.height,
        "n_labelled": train.height,
        "n_interactions": train["interaction_id"].n_unique(),
        "label_model_version": label_model_versions(
            source, domain, windows.train_start, windows.train_end
        ),
    }
    if elsewhere:
        fit = train_elsewhere(home, domain, domain_config.shape, windows, settings, weighted, params, launch,
                              dagster_run_id)
        run_id, model_uri, model_id = fit.run_id, fit.model_uri, fit.model_id
        metrics.update(fit.metrics)
        params.update(fit.lineage)
    else:
        scorer, fit_metrics = fit_with_internal_check(trainer, weighted)
        metrics.update(fit_metrics)
        params.update({"training.trainer": trainer.name, "training.compute": "in process"})
        run_id, model = log_training_run(
            home, domain, windows, trainer, scorer, weighted, params, metrics, dagster_run_id
        )
        model_uri, model_id = model.model_uri, model.model_id
    return TrainingResult(
        domain=domain,
        run_id=run_id,
        model_uri=model_uri,
        model_id=model_id,
        windows=windows,
        n_rows=rows.height,
        n_labelled=train.height,
        metrics=metrics,
        params=params,
    )
