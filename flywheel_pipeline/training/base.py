"""Fine-tune: the time windows, the training set, the trainer interface and the MLflow run.

Point-in-time: the training set is read with serving-time columns and labels only (never the
reaction columns the labels were derived from), and a trainer's ``fit`` sees only
SERVING_FEATURES + ``p_good`` + ``weight``. Every fitted scorer is logged through the one pyfunc
wrapper, FlywheelScorerModel, so any domain's model loads with ``mlflow.pyfunc.load_model``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from importlib.metadata import version
from typing import Any, ClassVar, Protocol

import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow.models import infer_signature
from scipy import sparse
from sklearn.feature_extraction import FeatureHasher
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss, roc_auc_score

from flywheel_pipeline.config import DomainConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import SERVING_FEATURE_DEFAULTS, SERVING_FEATURES
from flywheel_pipeline.sources import IMPRESSION_KEY, IMPRESSIONS, LABELS, Readable, as_source

# marts.fct_impressions columns known when the model chose (docs/warehouse.md).
SERVING_TIME_COLUMNS = [
    "domain",
    "event_date",
    "interaction_id",
    "item_id",
    "position",
    "propensity",
    "policy",
    "model_version",
    "served_at",
    "user_id",
    "session_id",
    "is_new_user",
    "segment",
    "context_features",
    "input_text",
    "item_content",
    "slate_size",
]
LABEL_COLUMNS = ["p_good", "label"]
# A training run's metrics shown on their own in Dagster (the rest in a table).
HEADLINE_METRICS = ("label_coverage", "exploration_share", "self_consumption_share", "internal_check_auc",
                    "training_auc")
DAGSTER_RUN_TAG = "flywheel.dagster_run_id"  # the Dagster run whose process holds the MLflow run
INTERNAL_SPLIT_SHARE = 0.2  # most recent share of the training rows kept for the internal check
# Pinned to this environment; the models also need flywheel_pipeline importable where they load.
MODEL_PIP_REQUIREMENTS = [
    f"{name}=={version(name)}"
    for name in ("mlflow", "scikit-learn", "numpy", "pandas", "scipy", "cloudpickle")
]


@dataclass(frozen=True)
class Windows:
    """Training days strictly before held-out days; every bound is inclusive."""

    train_start: date
    train_end: date
    holdout_start: date
    holdout_end: date

    def __post_init__(self) -> None:
        if not self.train_start <= self.train_end < self.holdout_start <= self.holdout_end:
            raise ValueError(f"windows must be ordered train < held-out, got {self}")

    def params(self) -> dict[str, str]:
        return {name: day.isoformat() for name, day in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Windows:
        """The windows ``params()`` wrote (MLflow params, Dagster metadata)."""
        return cls(*(date.fromisoformat(str(params[name])) for name in cls.__dataclass_fields__))


def split_windows(
    as_of: date, domain_config: DomainConfig, mature_until: date | None = None
) -> Windows:
    """Held-out = the last ``holdout_days`` up to ``as_of``; training = the ``lookback_days``
    before it, never after ``mature_until`` (days whose delayed labels may still be arriving)."""
    holdout_start = as_of - timedelta(days=domain_config.holdout_days - 1)
    train_start = holdout_start - timedelta(days=domain_config.lookback_days)
    train_end = holdout_start - timedelta(days=1)
    if mature_until is not None:
        train_end = min(train_end, mature_until)
    if train_end < train_start:
        raise ValueError(f"no mature training day: mature_until {mature_until} < {train_start}")
    return Windows(train_start, train_end, holdout_start, as_of)


def impressions(source: Readable, domain: str, start: date, end: date) -> pl.DataFrame:
    """Impressions of [start, end] with their labels (null p_good when unlabelled), serving-time
    columns only, in serving order."""
    return labelled_impressions(source, domain, start, end, SERVING_TIME_COLUMNS)


def labelled_impressions(source: Readable, domain: str, start: date, end: date,
                         columns: list[str]) -> pl.DataFrame:
    """``columns`` of the impressions of [start, end] with their labels' ``p_good`` and ``label``
    (null where unlabelled), in serving order."""
    source = as_source(source)
    shown = source.read(IMPRESSIONS, domain, start, end, columns)
    labels = source.read(LABELS, domain, start, end, [*IMPRESSION_KEY, *LABEL_COLUMNS])
    if labels.is_empty():  # none yet (or no table): every impression unlabelled
        labels = pl.DataFrame(schema={**shown.select(IMPRESSION_KEY).schema, "p_good": pl.Float64,
                                      "label": pl.Boolean})
    return shown.join(labels, on=IMPRESSION_KEY, how="left").sort("served_at", "interaction_id", "position")


def context_features(text: str | None) -> dict[str, float]:
    """A row's ``context_features`` (JSON object of name -> number) as a dict; {} for none."""
    return {name: float(value) for name, value in json.loads(text).items()} if text else {}


def crossed(features: dict[str, float], with_key: str) -> dict[str, float]:
    """Each numeric feature alone and crossed with ``with_key`` (e.g. ``i=<item>``), at its value:
    how much that feature says about this item in particular."""
    return {**{f"f={name}": value for name, value in features.items()},
            **{f"f={name}|{with_key}": value for name, value in features.items()}}


class FittedScorer(Protocol):
    """A fitted model: satisfies scoring.Scorer (one score per candidate row)."""

    def predict(self, candidates: pd.DataFrame) -> np.ndarray: ...


class Trainer(Protocol):
    """One per domain shape and kind (training.TRAINERS)."""

    name: str
    pip_requirements: list[str]  # what its logged model needs where it loads

    def params(self) -> dict[str, Any]:
        """Hyper-parameters, logged with the run."""
        ...

    def weigh(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, float]]:
        """Add the ``weight`` column to labelled serving-time rows; return it with diagnostics."""
        ...

    def fit(self, train: pl.DataFrame) -> FittedScorer:
        """Fit on SERVING_FEATURES + ``p_good`` + ``weight``."""
        ...


Featurize = Callable[[pd.DataFrame], list[dict[str, float]]]


@dataclass
class HashedLogisticScorer:
    """Logistic regression (SGD, log loss) on hashed features. Each distinct key is featurised
    once, and only the hashed columns seen in training are kept (small to pickle, fast to fit)."""

    featurize: Featurize
    key_columns: list[str]
    n_features: int
    columns: np.ndarray | None = None
    model: SGDClassifier | None = None

    def hashed(self, rows: pd.DataFrame) -> sparse.csr_matrix:
        codes = rows.groupby(self.key_columns, dropna=False, sort=False).ngroup().to_numpy()
        first_rows = np.unique(codes, return_index=True)[1]
        hasher = FeatureHasher(n_features=self.n_features, input_type="dict")
        return hasher.transform(self.featurize(rows.iloc[first_rows]))[codes]

    def fit(self, train: pl.DataFrame, alpha: float, max_iter: int) -> HashedLogisticScorer:
        frame = train.to_pandas()
        good = (frame["p_good"] >= 0.5).to_numpy()
        if good.all() or not good.any():
            raise ValueError("training labels hold one class only")
        features = self.hashed(frame)
        self.columns = np.unique(features.indices)
        self.model = SGDClassifier(
            loss="log_loss", alpha=alpha, max_iter=max_iter, tol=1e-3, random_state=0
        )
        self.model.fit(features[:, self.columns], good, sample_weight=frame["weight"].to_numpy())
        return self

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        """P(good) for each candidate row."""
        if candidates.empty:
            return np.zeros(0)
        return self.model.predict_proba(self.hashed(candidates)[:, self.columns])[:, 1]


@dataclass(frozen=True)
class HashedLogisticTrainer:
    """What the domain trainers share: a HashedLogisticScorer fitted on their features. A
    subclass names its ``featurize`` (a staticmethod), ``key_columns``, ``weighting`` and ``weigh``."""

    name: str
    n_features: int = 2**18
    alpha: float = 1e-4  # L2 strength
    max_iter: int = 100  # epochs

    featurize: ClassVar[Featurize]
    key_columns: ClassVar[list[str]]
    weighting: ClassVar[str]  # how ``weigh`` weights a row, in words
    pip_requirements: ClassVar[list[str]] = MODEL_PIP_REQUIREMENTS

    def params(self) -> dict[str, Any]:
        return {**asdict(self), "weight": self.weighting}

    def fit(self, train: pl.DataFrame) -> HashedLogisticScorer:
        scorer = HashedLogisticScorer(self.featurize, self.key_columns, self.n_features)
        return scorer.fit(train, alpha=self.alpha, max_iter=self.max_iter)


class FlywheelScorerModel(mlflow.pyfunc.PythonModel):
    """The one pyfunc every domain's model is logged as: SERVING_FEATURES in, scores out."""

    def __init__(self, scorer: FittedScorer) -> None:
        self.scorer = scorer

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """Scores; a serving feature the input lacks gets its default (MLflow drops the inputs a
        model's signature predates, e.g. ``context_features`` for a model logged before it)."""
        missing = {name: value for name, value in SERVING_FEATURE_DEFAULTS.items() if name not in model_input}
        return np.asarray(self.scorer.predict(model_input.assign(**missing)[SERVING_FEATURES]), dtype=float)


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced; ``model_uri`` loads with ``mlflow.pyfunc.load_model``."""

    domain: str
    run_id: str
    model_uri: str
    model_id: str
    windows: Windows
    n_rows: int
    n_labelled: int
    metrics: dict[str, float]
    params: dict[str, Any]

    @classmethod
    def logged(cls, client: mlflow.MlflowClient, model_uri: str) -> TrainingResult:
        """The result of an earlier training run, read back from MLflow by its model's URI."""
        model = client.get_logged_model(model_uri.removeprefix("models:/"))
        run = client.get_run(model.source_run_id)
        params = run.data.params
        return cls(
            domain=params["domain"],
            run_id=run.info.run_id,
            model_uri=model_uri,
            model_id=model.model_id,
            windows=Windows.from_params(params),
            n_rows=int(params["n_impressions"]),
            n_labelled=int(params["n_labelled"]),
            metrics=dict(run.data.metrics),
            params=dict(params),
        )

    @property
    def mature_until(self) -> date | None:
        """The last day the training run believed mature (None: no delay to measure it from)."""
        day = self.params.get("mature_until", "none")
        return None if day == "none" else date.fromisoformat(str(day))

    def metadata(self) -> dict[str, Any]:
        """Dagster asset metadata: the headline figures rounded (plotted across materializations);
        every metric is in ``metrics_markdown()``."""
        headline = {name: round(self.metrics[name], 4) for name in HEADLINE_METRICS if name in self.metrics}
        return {
            "domain": self.domain,
            "training_run_id": self.run_id,
            "model_uri": self.model_uri,
            "n_rows": self.n_rows,
            "n_labelled": self.n_labelled,
            **self.windows.params(),
            "mature_until": self.params.get("mature_until", "none"),
            **headline,
        }

    def metrics_markdown(self) -> str:
        """Every metric of the run as a Markdown table, 4 significant digits."""
        rows = "\n".join(f"| {name} | {_shown(value)} |" for name, value in sorted(self.metrics.items()))
        return "| metric | value |\n|---|---|\n" + rows

    def lineage(self) -> dict[str, Any]:
        """Registry tags: where the candidate came from (run, windows, data sources)."""
        return {
            "training.run_id": self.run_id,
            **{f"training.{name}": day for name, day in self.windows.params().items()},
            "training.mature_until": self.params.get("mature_until", "none"),
            "training.n_impressions": self.n_rows,
            "training.n_labelled": self.n_labelled,
            "training.label_model_version": self.params.get("label_model_version", ""),
            **{name: value for name, value in self.params.items() if name.startswith("training.")},
            **{
                f"training.{name}": round(self.metrics[name], 4)
                for name in ("exploration_share", "self_consumption_share", "label_coverage")
                if name in self.metrics
            },
        }


def _shown(value: float) -> str:
    """A metric as a person reads it: 4 significant digits, n/a for a missing one."""
    return "n/a" if not np.isfinite(value) else f"{value:.4g}"


def label_model_versions(source: Readable, domain: str, start: date, end: date) -> str:
    """The label model version(s) behind the labels of [start, end], comma-separated."""
    labels = as_source(source).read(LABELS, domain, start, end, ["label_model_version", "p_good"])
    return ",".join(sorted(labels.filter(pl.col("p_good").is_not_null())["label_model_version"].unique()))


def training_set(rows: pl.DataFrame) -> pl.DataFrame:
    """Labelled rows only (p_good null when every labeling function abstained)."""
    return rows.filter(pl.col("p_good").is_not_null())


def policy_metrics(train: pl.DataFrame) -> dict[str, float]:
    """Where the training rows came from: the exploration slice vs the model's own choices."""
    return {
        "exploration_share": train.filter(pl.col("policy") == "explore").height / train.height,
        "self_consumption_share": (
            train.filter(pl.col("policy") == "champion").height / train.height
        ),
    }


def fit_with_internal_check(
    trainer: Trainer, weighted: pl.DataFrame
) -> tuple[FittedScorer, dict[str, float]]:
    """Fit on the earlier rows, score the most recent ones, then refit on everything."""
    cutoff = weighted["served_at"].sort()[int(weighted.height * (1 - INTERNAL_SPLIT_SHARE))]
    earlier = weighted.filter(pl.col("served_at") < cutoff)
    later = weighted.filter(pl.col("served_at") >= cutoff)
    metrics = {"n_internal_fit": float(earlier.height), "n_internal_check": float(later.height)}
    try:
        check_scorer = trainer.fit(_fit_columns(earlier))
    except ValueError:  # too little or one-class early data: report, do not fail the run
        metrics.update(internal_check_auc=np.nan, internal_check_log_loss=np.nan)
    else:
        metrics.update(_fit_quality(check_scorer, later, "internal_check"))
    started = time.perf_counter()
    scorer = trainer.fit(_fit_columns(weighted))
    metrics["fit_seconds"] = time.perf_counter() - started
    metrics.update(_fit_quality(scorer, weighted, "training"))
    return scorer, metrics


def _fit_columns(weighted: pl.DataFrame) -> pl.DataFrame:
    return weighted.select([*SERVING_FEATURES, "p_good", "weight"])


def _fit_quality(scorer: FittedScorer, rows: pl.DataFrame, prefix: str) -> dict[str, float]:
    """Weighted log loss and AUC of P(good) against the hard labels."""
    frame = rows.to_pandas()
    good = (frame["p_good"] >= 0.5).to_numpy()
    weight = frame["weight"].to_numpy()
    if frame.empty or weight.sum() == 0 or good.all() or not good.any():
        return {f"{prefix}_auc": np.nan, f"{prefix}_log_loss": np.nan}
    scores = np.clip(scorer.predict(frame[SERVING_FEATURES]), 1e-6, 1 - 1e-6)
    return {
        f"{prefix}_auc": float(roc_auc_score(good, scores, sample_weight=weight)),
        f"{prefix}_log_loss": float(log_loss(good, scores, sample_weight=weight, labels=[0, 1])),
    }


def input_example(domain: str, train: pd.DataFrame, rows: int = 2) -> pd.DataFrame:
    """The serving features with the training set's types but made-up values: what MLflow keeps
    as the model's input example (no user's row leaves the warehouse in an artifact)."""
    made_up = {}
    for name in SERVING_FEATURES:
        dtype = train[name].dtype
        if name == "context_features":
            values = ['{"example": 0.5}'] * rows
        elif pd.api.types.is_bool_dtype(dtype):
            values = [index % 2 == 0 for index in range(rows)]
        elif pd.api.types.is_numeric_dtype(dtype):
            values = [0] * rows
        else:
            values = [domain if name == "domain" else f"example {name} {index}" for index in range(rows)]
        made_up[name] = pd.Series(values, dtype=dtype)
    return pd.DataFrame(made_up)


def ensure_experiment(home: Home, domain: str) -> str:
    """The id of the domain's experiment (``flywheel-<domain>``, artifacts at the home's
    ``mlflow_artifact_uri``), created on first use; points this process's MLflow at the home."""
    home.ensure()
    mlflow.set_tracking_uri(home.mlflow_tracking_uri)
    name = f"flywheel-{domain}"
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=home.mlflow_artifact_uri)


def close_abandoned_runs(home: Home, domain: str, in_progress: Callable[[str], bool]) -> list[str]:
    """Mark FAILED the domain's MLflow runs left RUNNING by a process that died before it could end
    them: those whose Dagster run (DAGSTER_RUN_TAG; none: unknown) is not ``in_progress``. Returns
    their ids."""
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    running = client.search_runs([ensure_experiment(home, domain)], "attributes.status = 'RUNNING'")
    abandoned = [run.info.run_id for run in running if not in_progress(run.data.tags.get(DAGSTER_RUN_TAG, ""))]
    for run_id in abandoned:
        client.set_terminated(run_id, status="FAILED")
    return abandoned


def log_training_run(
    home: Home,
    domain: str,
    windows: Windows,
    trainer: Trainer,
    scorer: FittedScorer,
    train: pl.DataFrame,
    params: dict[str, Any],
    metrics: dict[str, float],
    dagster_run_id: str | None = None,
) -> tuple[str, mlflow.models.model.ModelInfo]:
    """One MLflow run: params, metrics, the training dataset and the pyfunc model; tagged with the
    Dagster run that trains, when there is one."""
    frame = _fit_columns(train).to_pandas()
    with mlflow.start_run(
        experiment_id=ensure_experiment(home, domain),
        run_name=f"train-{windows.holdout_end}",
        tags={"flywheel.domain": domain, "flywheel.stage": "training",
              **({DAGSTER_RUN_TAG: dagster_run_id} if dagster_run_id else {})},
    ) as run:
        mlflow.log_params({**params, **{f"trainer.{k}": v for k, v in trainer.params().items()}})
        dataset = mlflow.data.from_pandas(
            frame,
            name=f"{domain}-train-{windows.train_start}-{windows.train_end}",
            targets="p_good",
        )
        mlflow.log_input(dataset, context="training")
        info = log_model(domain, trainer, scorer, frame)
        mlflow.log_metrics(metrics, model_id=info.model_id, dataset=dataset)
    return run.info.run_id, info


def log_model(domain: str, trainer: Trainer, scorer: FittedScorer,
              frame: pd.DataFrame) -> mlflow.models.model.ModelInfo:
    """Log ``scorer`` into the active run as the one pyfunc (FlywheelScorerModel), with a made-up
    input example of ``frame``'s serving features and the trainer's requirements."""
    example = input_example(domain, frame)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=FlywheelScorerModel(scorer),
        signature=infer_signature(example, scorer.predict(example)),
        input_example=example,
        pip_requirements=trainer.pip_requirements,
    )
