"""The one configuration file (flywheel.yaml): domains, cadence, windows, gates, automation.

Loaded and validated with pydantic; a bad file raises ConfigError naming the offending key,
e.g. ``domains.assistant.gate.min_samples: Input should be greater than 0``.
"""

from __future__ import annotations

import os
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flywheel_pipeline.events import OUTCOME_NAMES

CONFIG_ENV = "FLYWHEEL_CONFIG"
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
    outcome: str = Field(min_length=1, description="the delayed outcome the domain waits for")
    quantile: float = Field(0.9, gt=0, lt=1, description="delay quantile a day must be older than")

    @field_validator("outcome")
    @classmethod
    def _known_outcome(cls, value: str) -> str:
        if value not in OUTCOME_NAMES:
            raise ValueError(f"must be an outcome the event contract knows, one of {list(OUTCOME_NAMES)} "
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


class TrainingSets(_Strict):
    """What the assistant shape's training sets keep (docs/training_sets.md)."""

    sft_min_p_good: float = Field(0.9, gt=0.5, le=1, description="an SFT response's P(good) is at least this")
    chosen_min_p_good: float = Field(0.7, gt=0.5, le=1, description="a regenerated or reformulated "
                                     "pair's chosen response has P(good) at least this")
    rejected_max_p_good: float = Field(0.3, ge=0, lt=0.5, description="and its rejected response at most this")
    reformulation_within_s: int = Field(600, gt=0, description="a reformulation's follow-up is the session's "
                                        "next interaction, served at most this long after the reformulated one")


class DomainConfig(_Strict):
    shape: Literal["assistant", "recommendation"]
    cadence: str
    lookback_days: int = Field(gt=0)
    holdout_days: int = Field(gt=0)
    exploration_share: float = Field(0.1, ge=0, lt=1)
    audit_share: float = Field(0.02, ge=0, lt=1, description="share of interactions routed to "
                               "human review (gold labels, `label` events)")
    label_maturity: LabelMaturity
    gate: Gate = Gate()
    automation: Literal["manual", "auto"] = "manual"
    approvers: list[str] = Field(default_factory=list)
    retention_days: int = Field(365, gt=0, description="days of events (rows and landing batches) kept; "
                                "the retention job deletes older ones (docs/privacy.md)")
    training_sets: TrainingSets = Field(TrainingSets(), description="an assistant domain's SFT and "
                                        "preference datasets (docs/training_sets.md)")

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

    @field_validator("approvers")
    @classmethod
    def _someone_approves(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("automation") == "manual" and not value:
            raise ValueError("a manual domain needs at least one approver (or automation: auto)")
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
    def _training_sets_of_an_assistant(self) -> DomainConfig:
        if "training_sets" in self.model_fields_set and self.shape != "assistant":
            raise ValueError(f"training_sets: only an assistant domain exports training sets "
                             f"(this one's shape is {self.shape})")
        return self

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


class LandingSettings(_Strict):
    """What a landing batch may hold before accumulation quarantines it (docs/events.md: Delivery)."""

    max_line_bytes: int = Field(
        1_048_576, ge=1024, le=16 * 1_048_576,
        description="a longer line is quarantined (line_too_long), never read whole; the reader buffers "
                    "16 times this per thread")
    min_daily_traffic_share: float = Field(
        0.2, gt=0, lt=1, description="a day whose accepted interactions fall below this share of the "
                                     "domain's median day is flagged (the daily_traffic check)")


class DaemonSettings(_Strict):
    """How the Dagster daemon drives the flywheel (schedules, sensors)."""

    schedules: Literal["stopped", "running"] = Field(
        "stopped",
        description="default status of each domain's cadence schedule: stopped until a person turns it "
                    "on (UI > Automation, or `dagster schedule start`), or running as soon as the daemon starts",
    )
    approval_sensor_seconds: int = Field(30, ge=5, description="how often the approval sensor looks")
    late_label_sensor_seconds: int = Field(300, ge=5, description="how often the late-label sensor looks")


class FlywheelConfig(_Strict):
    partitions_start: date
    max_lateness_days: int = Field(7, ge=0)
    warehouse: WarehouseSettings = WarehouseSettings()
    landing: LandingSettings = LandingSettings()
    daemon: DaemonSettings = DaemonSettings()
    ui_url: str = Field("http://localhost:3000", pattern=r"^https?://\S+[^/]$",
                        description="where people open the Dagster UI (links in metadata and the CLI)")
    domains: dict[str, DomainConfig]

    @model_validator(mode="after")
    def _domain_names(self) -> FlywheelConfig:
        if not self.domains:
            raise ValueError("at least one domain is required")
        for name in self.domains:
            if not name.isidentifier() or name != name.lower():
                raise ValueError(f"domain name {name!r} must be a lower-case identifier")
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


def load_config(path: Path | str | None = None) -> FlywheelConfig:
    """Read and validate flywheel.yaml (or $FLYWHEEL_CONFIG, or ``path``)."""
    path = Path(path) if path else config_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_config(raw, source=str(path))


@lru_cache(maxsize=1)
def active_config() -> FlywheelConfig:
    """The configuration the Dagster code location is built from."""
    return load_config()
