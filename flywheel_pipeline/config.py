"""The one configuration file (flywheel.yaml): domains, cadence, windows, gates, automation.

Loaded and validated with pydantic; a bad file raises ConfigError naming the offending key,
e.g. ``domains.assistant.gate.min_samples: Input should be greater than 0``.
"""

from __future__ import annotations

import os
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import yaml
from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flywheel_pipeline.events import CLICK_MATURITY, CONSENT_STATES, MATURITY_OUTCOMES, POLICIES
from flywheel_pipeline.signatures import SignatureError, public_key

CONFIG_ENV = "FLYWHEEL_CONFIG"
PROFILE_ENV = "FLYWHEEL_PROFILE"  # overrides flywheel.yaml's `profile`
POSTGRES_SCHEME = "postgresql+psycopg2"  # SQLAlchemy's name for the driver dagster-postgres installs
Profile = Literal["embedded", "production"]
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "flywheel.yaml"
AUTO_APPROVER = "flywheel:auto"  # the pipeline's own identity: it approves auto domains' candidates

CADENCE_CRONS = {
    "daily": "0 3 * * *",
    "weekly": "0 3 * * 1",
    "monthly": "0 3 1 * *",
    "quarterly": "0 3 1 1,4,7,10 *",
}


class ConfigError(ValueError):
    """flywheel.yaml is missing, unreadable, or has a bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelMaturity(_Strict):
    outcome: str = Field(min_length=1, description="the delayed outcome the domain waits for "
                                                   "(`click`: a click-only domain waits for its clicks)")
    quantile: float = Field(0.9, gt=0, lt=1, description="delay quantile a day must be older than")

    @field_validator("outcome")
    @classmethod
    def _known_outcome(cls, value: str) -> str:
        if value not in MATURITY_OUTCOMES:
            raise ValueError(f"must be an outcome the event contract knows, one of {list(MATURITY_OUTCOMES)} "
                             f"(docs/events.md), got {value!r}")
        return value


class Gate(_Strict):
    """When a candidate is promoted (docs/validation.md: the three outcomes, setting margins)."""

    min_improvement: float = Field(0.0, description="the primary difference's lower bound must clear this")
    non_inferiority_margin: float | None = Field(
        None, ge=0, description="instead of min_improvement: promote what is no worse than this")
    max_slice_regression: float = Field(0.05, ge=0)
    min_samples: int = Field(200, gt=0)
    min_ess: float = Field(50.0, gt=0, description="effective sample size below which the gate "
                                                    "is inconclusive")


# a bandit log's timestamp_format keywords (or a strftime pattern), and its declaration of a logger
# whose probabilities were not logged
TIMESTAMP_FORMATS = ("iso", "epoch_s", "epoch_ms")
UNKNOWN_PROPENSITY = "unknown"


def _separator(value: str) -> str:
    """A text file's field separator, as written in YAML."""
    if not value or any(c in value for c in ('"', "\\", "\n", "\r")):
        raise ValueError(f'must be one or more characters other than a quote, a backslash or a line end, e.g. '
                         f'",", "\\t" (in double quotes: a tab) or "::" (MovieLens-1M), got {value!r}')
    return value


class BanditLog(_Strict):
    """The columns of a logged bandit feedback file, one row per slot shown, and how to read it
    (docs/importing.md)."""

    separator: str = Field(",", description="a CSV's field separator (\"\\t\": TSV; \"::\": MovieLens-1M)")
    header: bool = Field(True, description="the CSV's first line names its columns; false: `columns` names them")
    columns: list[str] | None = Field(None, description="the columns of a CSV without a header line, in order")
    timestamp: str = Field(min_length=1, description="when the slate was served")
    timestamp_format: str = Field("iso", description="iso (naive: UTC), epoch_s, epoch_ms, or a strftime "
                                                     "pattern (naive: UTC)")
    item: str = Field(min_length=1, description="the item shown")
    position: str | None = Field(None, min_length=1, description="the slot it was shown in; without it "
                                                                 "every row is shown at the top slot")
    position_base: Literal[0, 1] | None = Field(None, description="the top slot's number in the log: 0 or 1 "
                                                                  "(no default; required with position)")
    reward: str = Field(min_length=1, description="the reward: a click signal when > 0, or at least "
                                                  "reward_threshold")
    reward_threshold: float | None = Field(None, description="a reward at or above it is a click (explicit "
                                                             "ratings); without it a reward > 0 is")
    rating_scale: tuple[float, float] | None = Field(None, description="[min, max] of an explicit rating: "
                                                     "each row also becomes a rating signal, rescaled to 1..5")
    propensity: str = Field(None, min_length=1, validate_default=True, description=(
        "the logging policy's probability of this item in this slot, in (0, 1]; `unknown`: not logged"))
    policy: Literal[POLICIES] = Field(description="what logged it: explore for a uniformly random logger, "
                                                  "champion for the production policy (no default)")
    request: str | None = Field(None, description="rows sharing it form one slate; without it each "
                                                  "row is its own interaction")
    user: str | None = Field(None, description="pseudonymous user ids; without it each slate is its "
                                               "own anonymous user")
    session: str | None = Field(None, description="session ids; without it each slate is its own session")
    consent: str | None = Field(None, description="a column of granted/denied per row, over importing.consent")
    input: str | None = Field(None, description="the query; without it the input is empty (a feed)")
    content: str | None = Field(None, description="the item's title; without it the item id")
    context: list[str] = Field(default_factory=list, description="serving-time columns: strings go to "
                               "context, numbers to context.features")
    model_version: str = Field("baseline", min_length=1, description="what served the logged slates")

    _a_separator = field_validator("separator")(lambda value: _separator(value))

    @field_validator("columns")
    @classmethod
    def _headerless_only(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if info.data.get("header", True) != (value is None):
            raise ValueError("names the columns of a file without a header line: declare it with "
                             "`header: false`, and only then")
        if value is not None and (not all(name.strip() for name in value) or len(set(value)) < len(value)):
            raise ValueError(f"each column a distinct, non-blank name, got {value}")
        return value

    @field_validator("timestamp_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in TIMESTAMP_FORMATS and "%" not in value:
            raise ValueError(f"must be one of {list(TIMESTAMP_FORMATS)} or a strftime pattern "
                             f"(e.g. '%d/%m/%Y %H:%M'), got {value!r}")
        return value

    @field_validator("rating_scale")
    @classmethod
    def _a_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"must be [min, max] with min < max, got {list(value)}")
        return value

    @field_validator("propensity", mode="before")
    @classmethod
    def _declared(cls, value: object) -> object:
        if value is None:
            raise ValueError(f"missing: declare the column of the logger's probabilities, or "
                             f"`{UNKNOWN_PROPENSITY}` when they were not logged (no importance-weighted "
                             f"estimate is then possible)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BanditLog:
        if self.position is not None and self.position_base is None:
            raise ValueError("position_base: missing; the top slot's number in the log, 0 or 1 "
                             "(a wrong base loses the examination curve)")
        if self.position is None and self.request is not None:
            raise ValueError(f"position: missing; rows sharing request {self.request!r} form a slate, "
                             f"whose slots it gives")
        if self.header is False and self.columns is None:
            raise ValueError("columns: missing; a file without a header line (header: false) needs its "
                             "columns named, in order")
        low, high = self.rating_scale or (None, None)
        if low is not None and self.reward_threshold is not None and not low <= self.reward_threshold <= high:
            raise ValueError(f"reward_threshold: {self.reward_threshold} lies outside rating_scale "
                             f"[{low}, {high}]")
        named = [c for c in (self.timestamp, self.item, self.position, self.reward, self.propensity_column,
                             self.request, self.user, self.session, self.consent, self.input, self.content)
                 if c is not None]
        twice = sorted({c for c in named + self.context if (named + self.context).count(c) > 1})
        if twice:
            raise ValueError(f"each column maps to one field; used more than once: {twice}")
        return self

    @property
    def propensity_column(self) -> str | None:
        """The propensity column; None when the logger's probabilities are unknown."""
        return None if self.propensity == UNKNOWN_PROPENSITY else self.propensity


class CatalogueFile(_Strict):
    """A file of the items a policy may choose from, one row per item (CSV, TSV or Parquet)."""

    file: Path = Field(description="the catalogue's path (relative: to the folder flywheel runs in)")
    item: str = Field(min_length=1, description="the column of item ids, as the log names its items")
    content: str | None = Field(None, description="the item's text (a title); without it the item id")
    separator: str = Field(",", description="a text file's field separator (\"\\t\": TSV; \"::\": "
                                                          "MovieLens-1M's movies.dat)")
    header: bool = Field(True, description="the first line names the columns; false: `columns` names them")
    columns: list[str] | None = Field(None, description="the columns of a file without a header line, in order")

    _a_separator = field_validator("separator")(lambda value: _separator(value))

    @model_validator(mode="after")
    def _named_columns(self) -> CatalogueFile:
        if self.header != (self.columns is None):
            raise ValueError("columns: names the columns of a file without a header line: declare it with "
                             "`header: false`, and only then")
        return self


class Importing(_Strict):
    """How `flywheel import` maps files into this domain (docs/importing.md)."""

    consent: Literal[CONSENT_STATES] = Field(
        description="may imported interactions be used for training: the source does not say, so the "
                    "domain declares it (no default)")
    bandit_log: BanditLog | None = Field(None, description="the column mapping of `flywheel import bandit`")
    catalogue: Literal["log"] | CatalogueFile | None = Field(
        None, description="the candidates of every interaction whose log names only what was shown: `log` "
                          "(every item the domain's log shows) or a file of items (docs/importing.md)")


# The four levels of automation, by what people still do (docs/operations.md: who does what):
#   off        people run every cycle and approve every deployment; nothing runs on its own
#   semi       data and evaluation run on their own (accumulate, label, monitor); people decide
#              training and deployment
#   oversight  training and evaluation run on schedule; people approve each deployment
#   full       the pipeline deploys what passes every gate and rolls back what regresses live;
#              people act when alerts fire
AUTOMATION_LEVELS = ("off", "semi", "oversight", "full")
LEGACY_AUTOMATION = {"manual": "oversight", "auto": "full"}  # the names flywheel.yaml used before the levels
Automation = Literal["off", "semi", "oversight", "full"]


def _public_key(line: str) -> str:
    try:
        public_key(line)
    except SignatureError as error:
        raise ValueError(str(error)) from None
    return line


PublicKey = Annotated[str, AfterValidator(_public_key)]  # a line of an OpenSSH .pub file


class Groups(_Strict):
    """Groups of users whose value is measured per model version, and those the gate protects
    (docs/fairness.md). A group comes from the interaction's ``segment`` (a serving-time context
    field), or from a file that maps user ids to groups for evaluation only: never a feature."""

    field: Literal["segment"] | None = Field("segment", description="the context field naming each "
                                             "interaction's group; null: the users file says it")
    users_file: Path | None = Field(None, description="CSV of user_id,group (a header line), read by validation "
                                    "and the audit only; relative: to the folder flywheel runs in")
    protected: list[str] = Field(default_factory=list, description="groups that must not regress: each needs "
                                 "min_samples held-out interactions for a decision, and a drop beyond "
                                 "max_regression fails the gate")
    min_samples: int = Field(100, gt=0, description="held-out interactions a protected group needs before "
                             "the gate decides (with fewer it is inconclusive for that group)")
    min_reviews: int = Field(0, ge=0, description="review.daily_budget's audit slice is stratified: each protected "
                             "group gets at least this many of its impressions a day (its share otherwise), "
                             "weighted back in validation; 0: a plain uniform slice")
    max_regression: float = Field(0.02, ge=0, description="a protected group's drop of the primary value "
                                  "beyond this (significant, Holm-corrected) fails the gate")
    reweight: bool = Field(False, description="training weighs each group's rows so every group counts alike "
                           "(the corrective lever; docs/fairness.md)")
    max_disparity_increase: float = Field(0.05, ge=0, description="the audit's fairness check flags a candidate "
                                          "whose disparity between groups exceeds the champion's by more than this")

    @model_validator(mode="after")
    def _one_source(self) -> Groups:
        if (self.field is None) == (self.users_file is None):
            raise ValueError("name exactly one source of groups: field (e.g. segment) or users_file "
                             "(set field: null to use the file)")
        return self


class Monitor(_Strict):
    """How the deployed champion is watched on the traffic it serves (docs/monitoring.md)."""

    false_alarm_rate: float = Field(0.05, gt=0, lt=0.5, description="the chance a champion no worse than "
                                    "its reference is ever declared regressed, however long it is watched "
                                    "(the confidence sequence's alpha)")
    regression_margin: float = Field(0.0, ge=0, description="a regression is a drop of the primary value "
                                     "beyond this")
    planned_days: int = Field(3, gt=0, description="the days of traffic the confidence sequence is tightest "
                                                   "at (it stays valid at every day)")
    max_days: int = Field(28, gt=0, description="days after a deployment the monitor keeps watching")
    holdback: float = Field(0.2, ge=0, le=0.5, description="share of requests the version a new champion "
                            "replaced keeps serving, at random, for holdback_days after the deployment "
                            "(0: none; the comparison then rests on the exploration slice)")
    holdback_days: int = Field(7, gt=0, description="days the holdback lasts after a first deployment")


class Drift(_Strict):
    """Input drift between the champion's training window and recent traffic (docs/monitoring.md)."""

    recent_days: int = Field(3, gt=0, description="the recent traffic compared with the training window")
    max_psi: float = Field(0.2, gt=0, description="population stability index of a serving feature beyond "
                                                  "which the inputs drifted (0.1 small, 0.25 large)")
    max_new_item_share: float = Field(0.2, ge=0, le=1, description="share of recent candidates (or, where "
                                      "none are logged, impressions) of items the training window never "
                                      "offered or showed beyond which the items drifted")
    triggers_cycle: bool = Field(True, description="drift beyond a threshold launches an off-cadence cycle "
                                                   "(the drift sensor)")


class Serving(_Strict):
    """How a model's scores become what users see; validation judges a model as it would serve."""

    ranking: Literal["top_k", "epsilon_greedy"] = Field(
        "top_k", description="top_k: the highest scores, in order; epsilon_greedy: that ranking, or with "
                             "probability epsilon a uniformly random slate of the candidates")
    epsilon: float = Field(0.1, gt=0, lt=1, description="epsilon_greedy's share of random slates")


class LabelModelSettings(_Strict):
    """The label model's safety checks (flywheel_pipeline/labeling/safety.py)."""

    min_gold_rows: int = Field(50, gt=0, description="reviews needed before they can overrule the "
                               "label model (majority-vote fallback) or calibrate it")
    significance: float = Field(0.05, gt=0, lt=1, description="level of the tests on reviews: majority "
                                "vote replaces the label model, or calibration is applied, only when "
                                "significantly better")
    calibration: Literal["isotonic", "platt", "off"] = Field(
        "isotonic", description="calibration map of p_good fitted on reviews, kept only where it "
                             "lowers the held-out Brier score")
    dependency_min_shared_information: float = Field(
        0.5, gt=0, le=1, description="two LFs of different sources are reported as dependent when, "
                                     "given the class, their votes share at least this share of "
                                     "their information (a copy: 1)")


class ReviewQueue(_Strict):
    """What the review_queue asset asks people to judge each day (docs/importing.md: Label Studio and
    Argilla): a random audit slice, and the impressions the label model is least sure of."""

    daily_budget: int = Field(0, ge=0, le=10_000, description="impressions queued per day partition; "
                              "0: no queue")
    audit_fraction: float = Field(0.2, ge=0, le=1, description="share of the budget drawn uniformly at "
                                  "random (the audit slice, gold for validation); the rest by uncertainty")


class TrainingSets(_Strict):
    """What the assistant shape's training sets keep (docs/training_sets.md)."""

    sft_min_p_good: float = Field(0.9, gt=0.5, le=1, description="an SFT response's P(good) is at least this")
    chosen_min_p_good: float = Field(0.7, gt=0.5, le=1, description="a regenerated or reformulated "
                                     "pair's chosen response has P(good) at least this")
    rejected_max_p_good: float = Field(0.3, ge=0, lt=0.5, description="and its rejected response at most this")
    reformulation_within_s: int = Field(600, gt=0, description="a reformulation's follow-up is the session's "
                                        "next interaction, served at most this long after the reformulated one")


class HashedTrainerSettings(_Strict):
    """An assistant's default: logistic regression on hashed features, fitted from scratch each cycle."""

    kind: Literal["hashed"] = "hashed"


class EmbeddingsTrainerSettings(_Strict):
    """A recommendation domain's default: the hashed features plus user, segment and item embeddings
    (logistic matrix factorisation, training/embeddings.py), fitted from scratch each cycle."""

    kind: Literal["embeddings"] = "embeddings"


class TransformerTrainerSettings(_Strict):
    """An assistant's pre-trained sentence encoder (all-MiniLM-L6-v2, the optional extra
    flywheel[transformers]) with a scoring head, fine-tuned each cycle (docs/training.md)."""

    kind: Literal["transformer"] = "transformer"
    epochs: int = Field(10, ge=1, le=100, description="passes over the training examples")
    max_length: int = Field(32, ge=4, le=256, description="tokens kept of a query or a response")
    tune_layers: int = Field(0, ge=0, le=6, description="top encoder layers fine-tuned with the head "
                                                        "(0: the head alone, on frozen embeddings)")
    max_examples: int = Field(3000, ge=10, description="distinct (query, response) pairs fitted, those "
                                                        "with the most label weight")
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(2e-5, gt=0, lt=1, description="the encoder layers' (the head's: 50 times it)")
    threads: int = Field(2, ge=1, le=64, description="CPU threads torch may use")


TRAINING_SET_KINDS = ("impressions", "sft_dataset", "preference_dataset")


class PipesTrainerSettings(_Strict):
    """A fine-tune that runs outside the asset's process through Dagster Pipes (docs/training.md):
    locally a subprocess; a Kubernetes pod, Databricks or a hosted API where the Pipes client says."""

    kind: Literal["pipes"] = "pipes"
    command: list[str] | None = Field(None, min_length=1, description="the external trainer's command "
                                      "(it opens Dagster Pipes); default: flywheel's own worker, which fits `fits`")
    fits: HashedTrainerSettings | EmbeddingsTrainerSettings | TransformerTrainerSettings = Field(
        discriminator="kind", description="what the default worker fits out of process (default: the "
                                          "domain shape's default trainer)")
    training_set: Literal[TRAINING_SET_KINDS] = Field(
        "impressions", description="what the trainer receives: the weighted labelled impressions, or an "
                                   "assistant's sft_dataset or preference_dataset export (docs/training_sets.md)")

    @field_validator("fits", mode="before")
    @classmethod
    def _named(cls, value: object) -> object:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _worker_reads_impressions(self) -> PipesTrainerSettings:
        if self.command is None and self.training_set != "impressions":
            raise ValueError(f"training_set {self.training_set!r} needs a `command` that fine-tunes on it "
                             f"(e.g. a TRL script): flywheel's own worker fits scorers on impressions")
        return self


InProcessSettings = HashedTrainerSettings | EmbeddingsTrainerSettings | TransformerTrainerSettings
TrainerSettings = Annotated[InProcessSettings | PipesTrainerSettings, Field(discriminator="kind")]
IN_PROCESS_SHAPES = {"hashed": ("assistant", "recommendation"), "embeddings": ("recommendation",),
                     "transformer": ("assistant",)}
DEFAULT_TRAINERS = {"assistant": HashedTrainerSettings(), "recommendation": EmbeddingsTrainerSettings()}


# The traps the health audit judges (flywheel_pipeline.health), by the names its checks, its
# measures and the simulator's --trap switches carry; ``HealthSettings.blocking`` lists some.
TRAPS = ("exposure_bias", "survivorship", "label_delay", "leakage", "self_consumption", "diversity",
         "vocal_minority", "popularity", "engagement")


class HealthSettings(_Strict):
    """The flywheel_health audit's thresholds (docs/health.md): a check warns when its trap is
    flagged, and blocks registration when the trap is listed in ``blocking``."""

    blocking: list[Literal[TRAPS]] = Field(default_factory=list, description="traps whose flag stops "
                                           "the candidate's registration (the others warn)")
    min_exploration_share: float = Field(0.02, ge=0, le=1, description="exposure_bias: share of the "
                                         "training window's impressions served at random")
    max_below_floor_share: float = Field(0.05, ge=0, le=1, description="exposure_bias: share of explored "
                                         "impressions logged as less likely than exploration alone made them "
                                         "(a stale exploration share or a wrong position; healthy runs: 0)")
    churn_days: int = Field(7, gt=0, description="survivorship: a user not seen again this many days "
                            "after an impression counts as churned for it")
    min_cohort_coverage_ratio: float = Field(0.8, gt=0, le=1, description="survivorship: a cohort's or "
                                             "segment's (>= 5% of traffic) label coverage over the rest's "
                                             "(healthy simulated runs: 0.96-1.0)")
    max_immature_share: float = Field(0.05, ge=0, le=1, description="label_delay: share of training days "
                                      "younger than the maturity quantile of the outcome's delivery delay "
                                      "(batches land at day's end: one day in 28 is rounding, not a trap)")
    max_understated_delay_days: float = Field(2.0, ge=0, description="label_delay: how much later than "
                                              "their timestamps say outcomes may arrive (median, beyond "
                                              "the day a batch holds them) before the maturity cutoff "
                                              "is called fooled")
    max_feature_auc: float = Field(0.95, gt=0.5, le=1, description="leakage: a single serving-time "
                                   "feature that separates the labels this well was likely made after them")
    max_late_feature_share: float = Field(0.05, ge=0, le=1, description="leakage: share of labelled "
                                          "interactions delivered after their label's evidence (signals, "
                                          "outcomes): their features may have been made after the label")
    max_self_consumption_share: float = Field(0.95, gt=0, le=1, description="self_consumption: share of "
                                              "training labels on the serving model's own choices")
    min_independent_share: float = Field(0.01, ge=0, le=1, description="self_consumption: share of "
                                         "training labels with evidence the model did not choose "
                                         "(exploration, random human review)")
    min_catalogue_coverage: float = Field(0.2, ge=0, le=1, description="diversity: share of the "
                                          "catalogue a version shows at all")
    max_top_items_share: float = Field(0.5, gt=0, le=1, description="diversity: share of a version's "
                                       "exposure taken by its top 10 items")
    max_reaction_overrepresentation: float = Field(1.5, gt=1, description="vocal_minority: a segment's (>= 5% "
                                                   "of traffic) share of the impressions reacted to over its "
                                                   "share of the impressions (healthy simulated runs: 1.0)")
    max_popularity_z: float = Field(3.0, gt=0, description="popularity: z statistic of how much more an explored "
                                    "item is clicked on the days it is among the most shown, within items "
                                    "(healthy simulated runs: about -1 to 1)")
    min_outcome_per_click_ratio: float = Field(0.8, gt=0, description="engagement: outcomes per click of the "
                                               "tenth of items with the highest click rate over the other items' "
                                               "(its 95% upper bound; healthy simulated runs: 1.1-1.2)")


class DomainConfig(_Strict):
    shape: Literal["assistant", "recommendation"]
    cadence: str
    lookback_days: int = Field(gt=0)
    holdout_days: int = Field(gt=0)
    exploration_share: float = Field(0.1, ge=0, le=1, description="share of traffic the logger serves "
                                     "uniformly at random: 0 a pure on-policy logger, 1 a fully random one")
    input: Literal["required", "optional"] | None = Field(
        None, description="optional: an empty input is valid (a feed has no query); default optional "
                          "for a recommendation domain, required for an assistant")
    audit_share: float = Field(0.02, ge=0, lt=1, description="share of interactions routed to "
                               "human review (gold labels, `label` events)")
    label_maturity: LabelMaturity
    review: ReviewQueue = ReviewQueue()
    gate: Gate = Gate()
    serving: Serving = Field(Serving(), description="how a model's scores become a slate (docs/validation.md)")
    label_model: LabelModelSettings = LabelModelSettings()
    automation: Automation = Field("oversight", description="off | semi | oversight | full (the names "
                                   "manual and auto, from before the levels, mean oversight and full)")
    approvers: list[str] = Field(default_factory=list)
    groups: Groups | None = Field(None, description="groups of users measured per version and protected by "
                                  "the gate (docs/fairness.md)")
    monitor: Monitor = Field(Monitor(), description="the deployed champion, watched on its traffic")
    drift: Drift = Field(Drift(), description="input drift since the champion's training window")
    retention_days: int = Field(365, gt=0, description="days of events (rows and landing batches) kept; "
                                "the retention job deletes older ones (docs/privacy.md)")
    importing: Importing | None = Field(None, description="how `flywheel import` maps files into this "
                                        "domain (docs/importing.md)")
    training_sets: TrainingSets = Field(TrainingSets(), description="an assistant domain's SFT and "
                                        "preference datasets (docs/training_sets.md)")
    trainer: TrainerSettings = Field(description="what fine-tunes the domain's candidates: hashed, embeddings "
                                     "(recommendation), transformer (assistant) or pipes; default: hashed for an "
                                     "assistant, embeddings for a recommendation domain (docs/training.md)")
    health: HealthSettings = Field(HealthSettings(), description="the flywheel_health audit's thresholds "
                                   "and which traps block registration (docs/health.md)")

    @field_validator("cadence")
    @classmethod
    def _known_cadence(cls, value: str) -> str:
        if value in CADENCE_CRONS or (len(value.split()) == 5 and croniter.is_valid(value)):
            return value
        raise ValueError(f"must be one of {sorted(CADENCE_CRONS)} or a 5-field cron, got {value!r}")

    @field_validator("holdout_days")
    @classmethod
    def _holdout_within_lookback(cls, value: int, info: ValidationInfo) -> int:
        lookback = info.data.get("lookback_days")
        if lookback is not None and value > lookback:
            raise ValueError(f"{value} held-out days exceed lookback_days ({lookback}): "
                             f"the candidate would be judged on more days than it learnt from")
        return value

    @field_validator("automation", mode="before")
    @classmethod
    def _legacy_level(cls, value: object) -> object:
        return LEGACY_AUTOMATION.get(value, value) if isinstance(value, str) else value

    @field_validator("approvers")
    @classmethod
    def _someone_approves(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("automation") != "full" and not value:
            raise ValueError(f"a domain at automation {info.data.get('automation')!r} needs at least one approver "
                             f"(a person approves its deployments; or automation: full)")
        for name in value:
            if not name.strip() or name == AUTO_APPROVER:
                raise ValueError(f"{name!r} cannot be an approver: a person's non-blank name, not "
                                 f"{AUTO_APPROVER!r} (the pipeline's own identity)")
        return value

    @model_validator(mode="after")
    def _retention_covers_the_windows(self) -> DomainConfig:
        if self.retention_days < self.lookback_days + self.holdout_days:
            raise ValueError(f"retention_days ({self.retention_days}) must be at least lookback_days + "
                             f"holdout_days ({self.lookback_days + self.holdout_days}): training and "
                             f"validation read that far back")
        return self

    @model_validator(mode="after")
    def _clicks_where_items_are_clicked(self) -> DomainConfig:
        if self.label_maturity.outcome == CLICK_MATURITY and self.shape != "recommendation":
            raise ValueError(f"label_maturity.outcome {CLICK_MATURITY!r} needs shape recommendation: "
                             f"an {self.shape}'s responses are not clicked")
        return self

    @model_validator(mode="after")
    def _training_sets_of_an_assistant(self) -> DomainConfig:
        if self.shape != "assistant" and self.training_sets != TrainingSets():
            raise ValueError(f"training_sets: only an assistant domain exports training sets "
                             f"(this one's shape is {self.shape})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _shape_default_trainer(cls, data: object) -> object:
        """No trainer (or a pipes trainer that fits none) named: the shape's default."""
        if not isinstance(data, dict) or data.get("shape") not in DEFAULT_TRAINERS:
            return data
        default = DEFAULT_TRAINERS[data["shape"]].kind
        trainer = data.get("trainer", default)
        trainer = {"kind": trainer} if isinstance(trainer, str) else trainer
        if isinstance(trainer, dict) and trainer.get("kind") == "pipes":
            trainer = {"fits": default, **trainer}
        return {**data, "trainer": trainer}

    @model_validator(mode="after")
    def _trainer_fits_the_shape(self) -> DomainConfig:
        trainer = self.trainer.fits if isinstance(self.trainer, PipesTrainerSettings) else self.trainer
        if self.shape not in IN_PROCESS_SHAPES[trainer.kind]:
            fitting = [kind for kind, shapes in IN_PROCESS_SHAPES.items() if self.shape in shapes]
            raise ValueError(f"trainer: {trainer.kind} fits {' and '.join(IN_PROCESS_SHAPES[trainer.kind])} "
                             f"domains; this domain's shape is {self.shape}: use {' or '.join(fitting)}")
        if isinstance(self.trainer, PipesTrainerSettings) and self.trainer.training_set != "impressions" \
                and self.shape != "assistant":
            raise ValueError(f"trainer.training_set: {self.trainer.training_set} is exported by assistant "
                             f"domains only (this one's shape is {self.shape})")
        return self

    @property
    def input_optional(self) -> bool:
        """Whether an interaction with an empty input is kept (quality filtering, its check)."""
        return (self.input or ("optional" if self.shape == "recommendation" else "required")) == "optional"

    @property
    def cron(self) -> str:
        return CADENCE_CRONS.get(self.cadence, self.cadence)


class WarehouseSettings(_Strict):
    memory_limit: str = Field(
        "2GB",
        pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$",
        description="DuckDB's memory_limit for the pipeline's stages and dbt; past it DuckDB spills to disk",
    )
    dbt_threads: int = Field(
        1, ge=1, le=64,
        description="how many models or tests dbt builds at once (dbt's threads); each query already "
                    "uses every core, so more only helps a machine with cores and memory to spare",
    )
    engine: Literal["duckdb", "spark"] = Field(
        "duckdb",
        description="duckdb: a DuckDB file per domain in the home; spark: partitioned Parquet tables under "
                    "warehouse.root, dbt building on Spark (docs/deploying.md: The distributed profile)",
    )
    root: str | None = Field(
        None, description="engine spark: where the tables live, s3://bucket/prefix (or a folder); "
                          "<root>/<schema>.db/<table>/domain=<d>/event_date=<day>/")
    spark_root: str | None = Field(
        None, description="engine spark: the same place as Spark names it; default root with s3:// read "
                          "as s3a:// (hadoop-aws); a path where the bucket is mounted (s3fs)")
    endpoint_url: str | None = Field(
        None, pattern=r"^https?://", description="engine spark: an S3-compatible store's endpoint "
                                                 "(MinIO, moto...); default AWS's")

    @model_validator(mode="after")
    def _spark_has_a_root(self) -> WarehouseSettings:
        if self.engine == "spark" and not self.root:
            raise ValueError("root: engine spark keeps its tables under a root (s3://bucket/prefix or a folder)")
        if self.root and urlsplit(self.root).scheme not in ("", "s3", "file"):
            raise ValueError(f"root: s3://bucket/prefix or a folder, got {self.root!r}")
        if self.engine == "duckdb" and (self.root or self.spark_root or self.endpoint_url):
            raise ValueError("engine: root, spark_root and endpoint_url are for engine spark")
        return self


class LandingSettings(_Strict):
    """What a landing batch may hold before accumulation quarantines it (docs/events.md: Delivery)."""

    max_line_bytes: int = Field(
        1_048_576, ge=1024, le=16 * 1_048_576,
        description="a longer line is quarantined (line_too_long), never read whole; the reader buffers "
                    "16 times this per thread")
    min_daily_traffic_share: float = Field(
        0.2, gt=0, lt=1, description="a day whose accepted interactions fall below this share of the "
                                     "domain's median day is flagged (the daily_traffic check)")
    duplicate_horizon_days: int | None = Field(
        None, ge=0, description="an event id already kept on another day is a duplicate_event_id when that "
                                "day lies within this many days of the run's days; null: on any day (a run "
                                "then reads every event id of its domain: docs/deploying.md)")


class DaemonSettings(_Strict):
    """How the Dagster daemon drives the flywheel (schedules, sensors)."""

    schedules: Literal["stopped", "running"] = Field(
        "stopped",
        description="default status of each domain's cadence schedule: stopped until a person turns it "
                    "on (UI > Automation, or `dagster schedule start`), or running as soon as the daemon starts",
    )
    approval_sensor_seconds: int = Field(10, ge=5, description="how often the approval sensor looks")
    late_label_sensor_seconds: int = Field(300, ge=5, description="how often the late-label sensor looks")
    registry_watch_seconds: int = Field(30, ge=5, description="how often the registry watch compares each "
                                        "domain's aliases with the signed deployment log")


def redacted(url: str) -> str:
    """``url`` with its password replaced by ***, fit for an error message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


class ProductionSettings(_Strict):
    """The production profile (docs/deploying.md): the Dagster instance and MLflow's tracking store
    and registry in PostgreSQL, MLflow's artifacts where ``mlflow_artifacts`` says."""

    postgres_url_env: str = Field(
        "FLYWHEEL_POSTGRES_URL", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable that holds postgresql+psycopg2://user:password@host:port/database "
                    "(the Dagster instance's database); the file never holds the URL itself")
    mlflow_database: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the database on the same server for MLflow's tracking store and registry, created "
                    "on first use when the role may; default: <the URL's database>_mlflow")
    mlflow_artifacts: str | None = Field(
        None, min_length=1, description="where MLflow keeps models and other artifacts: a URI (s3://, "
                                        "gs://, file://) or a path (relative: under the home); "
                                        "default <home>/mlflow/artifacts")

    def postgres_url(self) -> str:
        """The Dagster instance's database, from the environment variable ``postgres_url_env``."""
        url = os.environ.get(self.postgres_url_env, "")
        if not url:
            raise ConfigError(f"production.postgres_url_env: the environment variable {self.postgres_url_env} "
                              f"is not set; it holds {POSTGRES_SCHEME}://user:password@host:port/database "
                              f"(`make postgres` starts a local server and prints it)")
        parts = urlsplit(url)
        if parts.scheme in ("postgresql", "postgres"):
            raise ConfigError(f"production.postgres_url_env: {self.postgres_url_env} must name the driver "
                              f"flywheel installs, {POSTGRES_SCHEME}://... (SQLAlchemy 2.1 reads "
                              f"{parts.scheme}:// as psycopg 3), got {redacted(url)!r}")
        if parts.scheme != POSTGRES_SCHEME or not parts.path.strip("/"):
            raise ConfigError(f"production.postgres_url_env: {self.postgres_url_env} must be "
                              f"{POSTGRES_SCHEME}://user:password@host:port/database, got {redacted(url)!r}")
        return url

    def mlflow_database_name(self) -> str:
        """MLflow's database: ``mlflow_database``, or the Dagster database's name + ``_mlflow``."""
        return self.mlflow_database or f"{urlsplit(self.postgres_url()).path.strip('/')}_mlflow"

    def mlflow_url(self) -> str:
        """MLflow's database on the same server, as a tracking and registry URI."""
        parts = urlsplit(self.postgres_url())
        return urlunsplit(parts._replace(path=f"/{self.mlflow_database_name()}"))


class Deployment(_Strict):
    """Where the Dagster instance and MLflow keep their state: ``embedded`` in the home folder
    (sqlite), or ``production`` in PostgreSQL (``production:``)."""

    profile: Profile = Field("embedded", description=f"embedded | production; ${PROFILE_ENV} overrides it")
    production: ProductionSettings = ProductionSettings()


class Alerts(_Strict):
    """Where an alert goes besides its failed asset check (docs/monitoring.md)."""

    webhook_url_env: str | None = Field(None, description="the environment variable holding a webhook URL "
                                        "(Slack, Teams, or a relay to e-mail): each alert is POSTed there as "
                                        "JSON, {\"text\": ...}; never the URL itself")


class FlywheelConfig(Deployment):
    partitions_start: date
    max_lateness_days: int = Field(7, ge=0)
    warehouse: WarehouseSettings = WarehouseSettings()
    landing: LandingSettings = LandingSettings()
    daemon: DaemonSettings = DaemonSettings()
    ui_url: str = Field("http://localhost:3000", pattern=r"^https?://\S+[^/]$",
                        description="where people open the Dagster UI (links in metadata and the CLI)")
    alerts: Alerts = Field(Alerts(), description="where regressions and drift are announced")
    approver_keys: dict[str, list[PublicKey]] = Field(
        default_factory=dict, description="each approver's SSH public keys (a line of their .pub file): a "
                                          "person's decision counts only with a signature by one of them "
                                          "(docs/security.md)")
    registry_watch: Literal["revert", "alert"] = Field(
        "revert", description="a serving alias (champion, previous, holdback) set outside flywheel: revert puts "
                              "it back as the signed deployment log says and alerts; alert only alerts (the "
                              "registry_matches_log check fails until a person puts it back)")
    domains: dict[str, DomainConfig]

    @model_validator(mode="after")
    def _domain_names(self) -> FlywheelConfig:
        if not self.domains:
            raise ValueError("at least one domain is required")
        for name in self.domains:
            if not name.isidentifier() or name != name.lower():
                raise ValueError(f"domain name {name!r} must be a lower-case identifier")
        return self

    @model_validator(mode="after")
    def _keys_of_approvers(self) -> FlywheelConfig:
        approvers = {name for domain in self.domains.values() for name in domain.approvers}
        if strangers := sorted(set(self.approver_keys) - approvers):
            raise ValueError(f"approver_keys.{strangers[0]}: not an approver of any domain (approvers: "
                             f"{sorted(approvers)})")
        return self

    def domain(self, name: str) -> DomainConfig:
        try:
            return self.domains[name]
        except KeyError:
            raise ConfigError(f"unknown domain {name!r}; configured: {sorted(self.domains)}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"{key}: {item['msg']}")
    return "; ".join(lines)


def parse_config(raw: object, source: str = "flywheel.yaml") -> FlywheelConfig:
    """Validate an already-parsed YAML document."""
    try:
        return FlywheelConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None


def config_path() -> Path:
    """$FLYWHEEL_CONFIG; else the nearest flywheel.yaml from the working directory up; else the
    checkout's own (so a command finds its project from any folder)."""
    if CONFIG_ENV in os.environ:
        return Path(os.environ[CONFIG_ENV])
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / DEFAULT_CONFIG.name).is_file():
            return folder / DEFAULT_CONFIG.name
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    raise ConfigError(f"no flywheel.yaml in {here} or above it: run from a flywheel project, or set "
                      f"{CONFIG_ENV} (and FLYWHEEL_HOME) to say where it is")


def _read(path: Path) -> object:
    """flywheel.yaml's document, its ``profile`` replaced by $FLYWHEEL_PROFILE when that is set."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if PROFILE_ENV in os.environ and isinstance(raw, dict):
        if (profile := os.environ[PROFILE_ENV]) not in get_args(Profile):
            raise ConfigError(f"{PROFILE_ENV}: must be one of {list(get_args(Profile))}, got {profile!r}")
        raw = {**raw, "profile": profile}
    return raw


def load_config(path: Path | str | None = None) -> FlywheelConfig:
    """Read and validate flywheel.yaml (or $FLYWHEEL_CONFIG, or ``path``)."""
    path = Path(path) if path else config_path()
    return parse_config(_read(path), source=str(path))


def load_deployment(path: Path | str | None = None) -> Deployment:
    """Only the profile and its settings from flywheel.yaml: what the home needs to say where the
    Dagster instance and MLflow keep their state."""
    path = Path(path) if path else config_path()
    raw = _read(path)
    section = {key: raw[key] for key in ("profile", "production") if key in raw} if isinstance(raw, dict) else {}
    try:
        return Deployment.model_validate(section)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None


@lru_cache(maxsize=1)
def active_config() -> FlywheelConfig:
    """The configuration the Dagster code location is built from."""
    return load_config()
