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

from pathlib import Path

import polars as pl

from flywheel_pipeline.config import BanditLog, ConfigError, FlywheelConfig
from flywheel_pipeline.events import CONSENT_STATES, ID_PATTERN, MAX_ID_LENGTH, MAX_IMPRESSIONS
from flywheel_pipeline.importers.base import RECORDS, Encoded, Mapped, Rejected, UnreadableFile
from flywheel_pipeline.importers.landing import source_name

_ROW = "__record"  # the row number column
_SLATE = "__slate"  # the interaction id column
_TS = "__ts"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"


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


_CORE_KEYS = ("timestamp", "item", "position", "reward", "propensity", "request", "user", "session", "consent",
              "input", "content")


def _load(path: Path, domain: str, log: BanditLog) -> pl.DataFrame:
    """The mapped columns of the file; the core ones as read, context columns with their types.
    A declared column the file lacks stops the import, naming the key that declares it."""
    core = {key: column for key in _CORE_KEYS if (column := getattr(log, key)) is not None}
    parquet = path.suffix.lower() == ".parquet"
    try:
        present = set(pl.read_parquet_schema(path) if parquet else pl.read_csv(path, n_rows=0).columns)
        declared = [(f"{key}: {column}", column) for key, column in core.items()] + [
            (f"context: [{column}]", column) for column in log.context]
        for key, column in declared:
            if column not in present:
                raise UnreadableFile(f"{path} has no column {column!r} (domains.{domain}.importing.bandit_log."
                                     f"{key}); its columns: {sorted(present)}")
        columns = [*core.values(), *log.context]
        frame = (pl.read_parquet(path, columns=columns) if parquet else
                 pl.read_csv(path, columns=columns, schema_overrides={c: pl.String for c in core.values()},
                             infer_schema_length=100_000))
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
    click_id = pl.col(_SLATE).str.len_chars() + len(":click:") + position.cast(pl.Int64).cast(pl.String).str.len_chars()
    rules.append((f"invalid_value:{log.request or 'row'}", click_id > MAX_ID_LENGTH))  # the longest id made from it
    reason = pl.lit(None, dtype=pl.String)
    for name, broken in reversed(rules):
        reason = pl.when(broken).then(pl.lit(name)).otherwise(reason)
    return reason


def _slate_reasons() -> pl.Expr:
    """A slate's broken rule over its mappable rows (on every one of them), null when it maps."""
    mappable = pl.col("reason").is_null()
    rows = mappable.sum().over(_SLATE)
    return (pl.when(~mappable).then(None)
            .when(rows > MAX_IMPRESSIONS).then(pl.lit("too_many_impressions"))
            .when(pl.col("position").filter(mappable).n_unique().over(_SLATE) < rows).then(pl.lit("duplicate_position"))
            .when(pl.col("item_id").filter(mappable).n_unique().over(_SLATE) < rows).then(pl.lit("duplicate_item")))


def _checked(log: BanditLog, frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """Every row with its slate, typed values and ``reason`` (null when it maps)."""
    key = pl.col(log.request).cast(pl.String) if log.request else pl.col(_ROW).cast(pl.String)
    frame = frame.with_columns(_timestamp(log.timestamp, frame.schema[log.timestamp]).alias(_TS),
                               (pl.lit(f"{source}:") + key).alias(_SLATE))
    frame = frame.with_columns(reason=_row_reasons(log, frame),
                               item_id=pl.col(log.item).cast(pl.String).str.strip_chars(),
                               position=(_number(log.position) - log.position_base).cast(pl.Int64, strict=False),
                               propensity=_number(log.propensity), reward=_number(log.reward))
    return frame.with_columns(reason=pl.coalesce("reason", _slate_reasons()))


def _rejects(checked: pl.DataFrame) -> Mapped:
    raw_columns = [c for c in checked.columns if not c.startswith("__") and c not in
                   ("reason", "item_id", "position", "propensity", "reward")]
    for row in checked.filter(pl.col("reason").is_not_null()).iter_rows(named=True):
        ts = row[_TS]
        yield Rejected.of(row[_ROW], row["reason"], {c: row[c] for c in raw_columns},
                          ts.date() if ts is not None else None)


def _slates(log: BanditLog, valid: pl.DataFrame) -> pl.DataFrame:
    """One row per slate, in the order of its first row: its time, row count, impressions by
    position, clicked items, and its first row's user, session, consent, input and context."""
    content = pl.col(log.content).cast(pl.String).fill_null(pl.col("item_id")) if log.content else pl.col("item_id")
    firsts = [c for c in (log.user, log.session, log.consent, log.input, *log.context) if c]
    clicked = pl.col("reward") > 0
    rows = valid.select(_SLATE, _ROW, _TS, "item_id", "position", "propensity", "reward",
                        content.alias("content"), *firsts)  # only what the events carry
    return (rows.group_by(_SLATE, maintain_order=True)
            .agg(pl.col(_ROW).min(), pl.col(_TS).min(), pl.len().alias(RECORDS),
                 pl.struct("item_id", "position", "propensity", "content").sort_by("position").alias("impressions"),
                 pl.col("item_id").filter(clicked).alias("clicked_items"),
                 pl.col("position").filter(clicked).alias("clicked_positions"),
                 *(pl.col(c).first() for c in firsts))
            .sort(_ROW))


def _common(log: BanditLog, domain: str) -> dict[str, pl.Expr]:
    """The fields every event of a slate carries."""
    return {"domain": pl.lit(domain), "timestamp": pl.col(_TS).dt.strftime(_TIME_FORMAT),
            "user_id": pl.col(log.user) if log.user else pl.lit("anon:") + pl.col(_SLATE),
            "session_id": pl.col(log.session) if log.session else pl.col(_SLATE),
            "interaction_id": pl.col(_SLATE)}


def _context(log: BanditLog, numeric: set[str], present: list[str]) -> dict[str, pl.Expr]:
    """``context``: the ``present`` columns, strings as they are, numbers under ``features``."""
    strings = {c: pl.col(c).cast(pl.String) for c in present if c not in numeric}
    features = {c: pl.col(c).cast(pl.Float64) for c in present if c in numeric}
    context = {**strings, **({"features": pl.struct(**features)} if features else {})}
    return {"context": pl.struct(**context)} if context else {}


def _encoded(frame: pl.DataFrame, event_type: str, fields: dict[str, pl.Expr], records: pl.Expr) -> Encoded:
    return Encoded(frame.select(day=pl.col(_TS).dt.date(), event_type=pl.lit(event_type), records=records,
                                line=pl.struct(event_type=pl.lit(event_type), **fields).struct.json_encode()))


def _interactions(log: BanditLog, slates: pl.DataFrame, domain: str, consent: str, numeric: set[str]) -> Mapped:
    """The slates as interactions, a frame per pattern of missing context values (a missing
    string or a non-finite number is left out of the slate's context, never written as null)."""
    present = {c: pl.col(c).is_not_null() & (pl.col(c).cast(pl.Float64).is_finite() if c in numeric else True)
               for c in log.context}
    mask = pl.concat_str([present[c].cast(pl.Int8).cast(pl.String) for c in log.context]) if log.context else pl.lit("")
    for group in slates.with_columns(mask.alias("__mask")).partition_by("__mask", maintain_order=True):
        columns = [c for c, bit in zip(log.context, group["__mask"][0]) if bit == "1"]
        fields = {"event_id": pl.col(_SLATE), **_common(log, domain), "model_version": pl.lit(log.model_version),
                  "policy": pl.lit(log.policy),
                  "consent": pl.col(log.consent).str.strip_chars() if log.consent else pl.lit(consent),
                  "input": pl.col(log.input).cast(pl.String).fill_null("") if log.input else pl.lit(""),
                  "impressions": pl.col("impressions"), **_context(log, numeric, columns)}
        yield _encoded(group, "interaction", fields, pl.col(RECORDS))


def _clicks(log: BanditLog, slates: pl.DataFrame, domain: str) -> Encoded:
    """A click signal per item whose reward is > 0, at its slate's time (logs have no click times)."""
    clicks = slates.explode("clicked_items", "clicked_positions").drop_nulls("clicked_items")
    fields = {"event_id": pl.col(_SLATE) + ":click:" + pl.col("clicked_positions").cast(pl.String),
              **_common(log, domain), "signal_type": pl.lit("click"), "item_id": pl.col("clicked_items")}
    return _encoded(clicks, "signal", fields, pl.lit(0))


def read(path: Path, domain: str, config: FlywheelConfig) -> Mapped:
    """The bandit log at ``path`` as events of ``domain``, and its rows that cannot map."""
    log = mapping(config, domain)
    consent = config.domain(domain).importing.consent
    checked = _checked(log, _load(path, domain, log), source_name("bandit", path))
    yield from _rejects(checked)
    numeric = {c for c in log.context if checked.schema[c].is_numeric()}
    slates = _slates(log, checked.filter(pl.col("reason").is_null()))
    del checked  # the rows' memory, before the slates are encoded
    yield from _interactions(log, slates, domain, consent, numeric)
    yield _clicks(log, slates, domain)
