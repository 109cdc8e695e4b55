"""Logged bandit feedback (CSV or Parquet, one row per slot shown) -> interactions and clicks.

The columns are the domain's ``importing.bandit_log`` mapping (flywheel.yaml). Rows are read and
checked with polars, vectorised; rows sharing the ``request`` column form one slate, one
``interaction`` whose impressions are the slate's items by position (each row its own interaction
without it); a row whose reward is > 0 becomes a ``click`` signal on its item, at the slate's time
(a log has no click times). Ids come from the source: the interaction id is
``<source>:<request>`` (or ``<source>:<row>``), so importing the same file again yields the same
events. Where the log has no user or session column, each slate is its own anonymous user
(``anon:<interaction id>``) and session: nobody returns, and no session looks like a bot.

A row is rejected, first reason first, when its item is missing, its timestamp unreadable
(ISO-8601, naive read as UTC, or a Parquet timestamp), its position not an integer at or above
``position_base``, its propensity outside (0, 1], its reward not a number, its request, user or
session not an id of the contract, or its consent neither granted nor denied; a whole slate when
two of its rows share a position (``duplicate_position``) or an item (``duplicate_item``), or it
holds more than the contract's 50 impressions (``too_many_impressions``). Row numbers count data
rows from 1 (a CSV's header is not a row).
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from flywheel_pipeline.config import BanditLog, ConfigError, FlywheelConfig
from flywheel_pipeline.events import CONSENT_STATES, ID_PATTERN, MAX_ID_LENGTH, MAX_IMPRESSIONS
from flywheel_pipeline.importers.base import RECORDS, Event, Mapped, Rejected, UnreadableFile
from flywheel_pipeline.importers.landing import source_name

_ROW = "__record"  # the row number column
_SLATE = "__slate"  # the interaction id column
_TS = "__ts"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.fZ"
_MAX_SLATE_ID = MAX_ID_LENGTH - len(":click:49")  # the longest id made from it (a click's) fits


def mapping(config: FlywheelConfig, domain: str) -> BanditLog:
    """The domain's declared columns; a ConfigError naming the key when there are none."""
    settings = config.domain(domain)
    if settings.shape != "recommendation":
        raise ConfigError(f"domains.{domain}.shape: a bandit log's slates import into a recommendation "
                          f"domain, not {settings.shape!r}")
    if settings.importing is None or settings.importing.bandit_log is None:
        raise ConfigError(f"domains.{domain}.importing.bandit_log: missing; declare the log's columns "
                          f"(timestamp, item, position, position_base, reward, propensity, policy) and "
                          f"importing.consent (docs/importing.md)")
    return settings.importing.bandit_log


def _load(path: Path, log: BanditLog) -> pl.DataFrame:
    """The mapped columns of the file; the core ones as read, context columns with their types."""
    core = [c for c in (log.timestamp, log.item, log.position, log.reward, log.propensity, log.request,
                        log.user, log.session, log.consent, log.input, log.content) if c is not None]
    columns = core + log.context
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path, columns=columns)
        else:
            frame = pl.read_csv(path, columns=columns, schema_overrides={c: pl.String for c in core},
                                infer_schema_length=100_000)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise UnreadableFile(f"{path}: {str(error).strip().splitlines()[0]}") from None
    return frame.with_row_index(_ROW, offset=1)


def _timestamp(column: str, dtype: pl.DataType) -> pl.Expr:
    """A column as UTC datetimes (null where unreadable): ISO-8601 text, naive read as UTC;
    Parquet timestamps, naive read as UTC."""
    col = pl.col(column)
    if isinstance(dtype, pl.Datetime):
        return (col.dt.replace_time_zone("UTC") if dtype.time_zone is None
                else col.dt.convert_time_zone("UTC")).dt.cast_time_unit("us")
    text = col.cast(pl.String).str.strip_chars()
    return pl.coalesce(
        text.str.to_datetime("%+", strict=False, time_unit="us"),
        text.str.replace("T", " ").str.to_datetime("%Y-%m-%d %H:%M:%S%.f", strict=False, time_unit="us")
        .dt.replace_time_zone("UTC"),
        text.str.to_datetime("%Y-%m-%d", strict=False, time_unit="us").dt.replace_time_zone("UTC"),
    )


def _number(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)


def _is_id(expr: pl.Expr) -> pl.Expr:
    return expr.str.contains(ID_PATTERN).fill_null(False)


def _row_reasons(log: BanditLog, frame: pl.DataFrame) -> pl.Expr:
    """Each row's first broken rule, null when it maps."""
    position = _number(log.position)
    propensity = _number(log.propensity)
    rules: list[tuple[str, pl.Expr]] = [
        (f"missing_field:{log.item}", pl.col(log.item).str.strip_chars().fill_null("") == ""),
        (f"invalid_value:{log.timestamp}", pl.col(_TS).is_null()),
        (f"invalid_value:{log.position}",
         position.is_null() | (position != position.round()) | (position < log.position_base)),
        (f"invalid_value:{log.propensity}", propensity.is_null() | ~(propensity > 0) | (propensity > 1)),
        (f"invalid_value:{log.reward}", _number(log.reward).is_null() | _number(log.reward).is_nan()),
    ]
    if log.request:
        rules.append((f"invalid_value:{log.request}", ~_is_id(pl.col(log.request))))
    if log.user:
        rules.append(("user_id_not_pseudonymous", ~_is_id(pl.col(log.user))))
    if log.session:
        rules.append((f"invalid_value:{log.session}", ~_is_id(pl.col(log.session))))
    if log.consent:
        rules.append((f"invalid_value:{log.consent}",
                      ~pl.col(log.consent).str.strip_chars().is_in(list(CONSENT_STATES)).fill_null(False)))
    rules.append((f"invalid_value:{log.request or 'row'}", pl.col(_SLATE).str.len_chars() > _MAX_SLATE_ID))
    reason = pl.lit(None, dtype=pl.String)
    for name, broken in reversed(rules):
        reason = pl.when(broken).then(pl.lit(name)).otherwise(reason)
    return reason


def _slate_reasons(log: BanditLog) -> pl.Expr:
    """A slate's broken rule (on every one of its rows), null when it maps."""
    slate = pl.col(_SLATE)
    return (pl.when(pl.len().over(slate) > MAX_IMPRESSIONS).then(pl.lit("too_many_impressions"))
            .when(pl.col("position").n_unique().over(slate) < pl.len().over(slate)).then(pl.lit("duplicate_position"))
            .when(pl.col("item_id").n_unique().over(slate) < pl.len().over(slate)).then(pl.lit("duplicate_item")))


def _checked(log: BanditLog, frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """Every row with its slate, typed values and ``reason`` (null when it maps)."""
    key = pl.col(log.request).cast(pl.String) if log.request else pl.col(_ROW).cast(pl.String)
    frame = frame.with_columns(_timestamp(log.timestamp, frame.schema[log.timestamp]).alias(_TS),
                               (pl.lit(f"{source}:") + key).alias(_SLATE))
    frame = frame.with_columns(reason=_row_reasons(log, frame),
                               item_id=pl.col(log.item).cast(pl.String).str.strip_chars(),
                               position=(_number(log.position) - log.position_base).cast(pl.Int64, strict=False),
                               propensity=_number(log.propensity), reward=_number(log.reward))
    valid = frame.filter(pl.col("reason").is_null()).with_columns(slate_reason=_slate_reasons(log))
    return frame.join(valid.select(_ROW, "slate_reason"), on=_ROW, how="left").with_columns(
        reason=pl.coalesce("reason", "slate_reason")).drop("slate_reason").sort(_ROW)


def _rejects(log: BanditLog, checked: pl.DataFrame) -> Mapped:
    raw_columns = [c for c in checked.columns if not c.startswith("__") and c not in
                   ("reason", "item_id", "position", "propensity", "reward")]
    for row in checked.filter(pl.col("reason").is_not_null()).iter_rows(named=True):
        ts = row[_TS]
        yield Rejected.of(row[_ROW], row["reason"], {c: row[c] for c in raw_columns},
                          ts.date() if ts is not None else None)


def _context(row: dict, log: BanditLog, numeric: set[str]) -> dict | None:
    strings = {c: str(row[c]) for c in log.context if c not in numeric and row[c] is not None}
    features = {c: float(row[c]) for c in log.context
                if c in numeric and row[c] is not None and math.isfinite(row[c])}
    context = {**strings, **({"features": features} if features else {})}
    return context or None


def _events(log: BanditLog, checked: pl.DataFrame, domain: str, consent: str) -> Mapped:
    """One interaction per slate (in the order of its first row), then its clicks."""
    valid = checked.filter(pl.col("reason").is_null())
    firsts = [c for c in (log.user, log.session, log.consent, log.input, *log.context) if c]
    numeric = {c for c in log.context if checked.schema[c].is_numeric()}
    slates = (valid.sort("position", maintain_order=True)
              .group_by(_SLATE, maintain_order=True)
              .agg(pl.col(_ROW).min().alias("first_row"), pl.col(_TS).min().dt.strftime(_TIME_FORMAT).alias("ts"),
                   pl.len().alias("rows"), pl.col("item_id"), pl.col("position"), pl.col("propensity"),
                   pl.col("reward"), *([pl.col(log.content).cast(pl.String)] if log.content else []),
                   *(pl.col(c).first() for c in firsts))
              .sort("first_row"))
    for row in slates.iter_rows(named=True):
        interaction_id = row[_SLATE]
        user = row[log.user] if log.user else f"anon:{interaction_id}"
        session = row[log.session] if log.session else interaction_id
        common = {"domain": domain, "timestamp": row["ts"], "user_id": user, "session_id": session,
                  "interaction_id": interaction_id}
        contents = row[log.content] if log.content else row["item_id"]
        interaction: Event = {
            "event_id": interaction_id, "event_type": "interaction", **common,
            "model_version": log.model_version, "policy": log.policy,
            "consent": row[log.consent].strip() if log.consent else consent,
            "input": str(row[log.input] or "") if log.input else "",
            "impressions": [{"item_id": item, "position": position, "propensity": propensity,
                             "content": str(content) if content is not None else item}
                            for item, position, propensity, content
                            in zip(row["item_id"], row["position"], row["propensity"], contents)],
            RECORDS: row["rows"],
        }
        if (context := _context(row, log, numeric)) is not None:
            interaction["context"] = context
        yield interaction
        for item, position, reward in zip(row["item_id"], row["position"], row["reward"]):
            if reward > 0:
                yield {"event_id": f"{interaction_id}:click:{position}", "event_type": "signal", **common,
                       "signal_type": "click", "item_id": item, RECORDS: 0}


def read(path: Path, domain: str, config: FlywheelConfig) -> Mapped:
    """The bandit log at ``path`` as events of ``domain``, and its rows that cannot map."""
    log = mapping(config, domain)
    consent = config.domain(domain).importing.consent
    checked = _checked(log, _load(path, log), source_name("bandit", path))
    yield from _rejects(log, checked)
    yield from _events(log, checked, domain, consent)
