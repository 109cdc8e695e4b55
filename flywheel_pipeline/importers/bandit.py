"""Logged bandit feedback (CSV, TSV or Parquet, one row per slot shown) -> interactions, clicks, ratings.

The columns are the domain's ``importing.bandit_log`` mapping (flywheel.yaml), which also says how
the file reads (``separator``; ``header: false`` with ``columns`` for a CSV without a header line;
``timestamp_format``). Rows are read and checked with polars, vectorised; rows sharing the
``request`` column form one slate, one ``interaction`` whose impressions are the slate's items by
position (each row its own interaction without it; each row at the top slot, 0, without a
``position`` column), each with its propensity (null where the log declares it ``unknown``). A row
whose reward is > 0 (at least ``reward_threshold`` where declared) becomes a ``click`` signal on its
item, and with ``rating_scale`` every row a ``rating`` signal, its reward rescaled to 1..5, both at
the slate's time (a log has no reaction times). Ids come from the source: the interaction id is
``<source>:<request>`` (or ``<source>:<row>``), so importing the same file again yields the same
events. Where the log has no user or session column, each slate is its own anonymous user
(``anon:<interaction id>``) and session: nobody returns, and no session looks like a bot.

A row is rejected, first reason first, when its item is missing, its timestamp unreadable (as
``timestamp_format`` says, naive read as UTC, or a Parquet timestamp), its position not an integer
at or above ``position_base``, its propensity outside (0, 1], its reward not a number (or outside
``rating_scale``), its request, user or session not an id of the contract, or its consent neither
granted nor denied; a whole slate when two of its rows share a position (``duplicate_position``) or
an item (``duplicate_item``), or it holds more than the contract's 50 impressions
(``too_many_impressions``). Row numbers count data rows from 1 (a CSV's header is not a row).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from flywheel_pipeline.config import BanditLog, ConfigError, FlywheelConfig
from flywheel_pipeline.events import CONSENT_STATES, ID_PATTERN, MAX_ID_LENGTH, MAX_IMPRESSIONS
from flywheel_pipeline.importers.base import RECORDS, Encoded, Mapped, Rejected, UnreadableFile
from flywheel_pipeline.importers.landing import source_name
from flywheel_pipeline.importers.text import first_row_width, read_delimited

_ROW = "__record"  # the row number column
_SLATE = "__slate"  # the interaction id column
_TS = "__ts"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"
_EPOCH_MICROS = {"epoch_s": 1_000_000, "epoch_ms": 1_000}  # timestamp_format: microseconds per unit


def mapping(config: FlywheelConfig, domain: str) -> BanditLog:
    """The domain's declared columns; a ConfigError naming the key when there are none."""
    settings = config.domain(domain)
    if settings.shape != "recommendation":
        raise ConfigError(f"domains.{domain}.shape: a bandit log's slates import into a recommendation "
                          f"domain, not {settings.shape!r}")
    if settings.importing is None or settings.importing.bandit_log is None:
        raise ConfigError(f"domains.{domain}.importing.bandit_log: missing; declare the log's columns "
                          f"(timestamp, item, reward, propensity or `propensity: unknown`, policy; position "
                          f"and position_base for slates) and importing.consent (docs/importing.md)")
    return settings.importing.bandit_log


_CORE_KEYS = ("timestamp", "item", "position", "reward", "propensity", "request", "user", "session", "consent",
              "input", "content")


def _core(log: BanditLog) -> dict[str, str]:
    """The declared core columns by key (an unknown propensity declares none)."""
    declared = {key: log.propensity_column if key == "propensity" else getattr(log, key) for key in _CORE_KEYS}
    return {key: column for key, column in declared.items() if column is not None}


def _load(path: Path, domain: str, log: BanditLog) -> pl.DataFrame:
    """The mapped columns of the file; the core ones as read, context columns with their types.
    A declared column the file lacks stops the import, naming the key that declares it."""
    core = _core(log)
    parquet = path.suffix.lower() == ".parquet"
    key = f"domains.{domain}.importing.bandit_log"
    try:
        present = _column_names(path, parquet, log, key)
        declared = [(f"{name}: {column}", column) for name, column in core.items()] + [
            (f"context: [{column}]", column) for column in log.context]
        for name, column in declared:
            if column not in present:
                raise UnreadableFile(f"{path} has no column {column!r} ({key}.{name}); its columns: "
                                     f"{sorted(present)}{_separator_hint(len(present), log, key)}")
        columns = [*core.values(), *log.context]
        frame = (pl.read_parquet(path, columns=columns) if parquet else
                 read_delimited(path, log.separator, log.header, log.columns, columns,
                                text_columns=list(core.values())))
    except (pl.exceptions.PolarsError, OSError) as error:
        raise UnreadableFile(f"{path}: {str(error).strip().splitlines()[0]}") from None
    return frame.with_row_index(_ROW, offset=1)


def _column_names(path: Path, parquet: bool, log: BanditLog, key: str) -> list[str]:
    """The file's columns: a Parquet file's, a CSV's header line, or ``columns`` for a CSV without
    one (which must name as many columns as its first row holds)."""
    if parquet:
        if not log.header:
            raise UnreadableFile(f"{path}: a Parquet file names its own columns; {key}.header: false and "
                                 f"columns are for CSV and TSV files")
        return list(pl.read_parquet_schema(path))
    if log.header:
        return read_delimited(path, log.separator, header=True, n_rows=0).columns
    width = first_row_width(path, log.separator)
    if width != len(log.columns):
        raise UnreadableFile(f"{path}: {key}.columns names {len(log.columns)} columns, {log.columns}, its "
                             f"first row holds {width}{_separator_hint(width, log, key)}")
    return log.columns


def _separator_hint(width: int, log: BanditLog, key: str) -> str:
    """A hint at ``separator`` for a file read as one column (a log has at least a timestamp, an
    item and a reward)."""
    return (f" (read as one column: is {key}.separator {log.separator!r} the file's separator? "
            f"\"\\t\" for tab-separated)" if width == 1 else "")


def _timestamp(column: str, dtype: pl.DataType, timestamp_format: str) -> pl.Expr:
    """A column as UTC datetimes (null where unreadable): text or numbers as ``timestamp_format``
    says (ISO-8601, epoch seconds or milliseconds, or a strftime pattern; naive read as UTC);
    Parquet timestamps, naive read as UTC."""
    col = pl.col(column)
    if isinstance(dtype, pl.Datetime):
        return (col.dt.replace_time_zone("UTC") if dtype.time_zone is None
                else col.dt.convert_time_zone("UTC")).dt.cast_time_unit("us")
    if timestamp_format in _EPOCH_MICROS:
        micros = (_number(column) * _EPOCH_MICROS[timestamp_format]).round().cast(pl.Int64, strict=False)
        return pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC")
    text = col.cast(pl.String).str.strip_chars()
    if timestamp_format != "iso":  # a pattern with an offset parses to UTC already
        return text.str.to_datetime(timestamp_format, strict=False, time_unit="us").dt.replace_time_zone("UTC")
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


def _position(log: BanditLog) -> pl.Expr:
    """A row's 0-based position as a number (not checked); the top slot without a position column."""
    return _number(log.position) - log.position_base if log.position else pl.lit(0.0)


def _propensity(log: BanditLog) -> pl.Expr:
    """A row's propensity as a number (not checked); null where the log declares it unknown."""
    return _number(log.propensity_column) if log.propensity_column else pl.lit(None, dtype=pl.Float64)


def _bad_reward(log: BanditLog) -> pl.Expr:
    """Not a number, or outside the declared rating scale."""
    reward = _number(log.reward)
    broken = reward.is_null() | reward.is_nan()
    return broken | ~reward.is_between(*log.rating_scale) if log.rating_scale else broken


def _row_reasons(log: BanditLog) -> pl.Expr:
    """Each row's first broken rule, null when it maps."""
    position = _position(log)
    rules: list[tuple[str, pl.Expr]] = [
        (f"missing_field:{log.item}", pl.col(log.item).str.strip_chars().fill_null("") == ""),
        (f"invalid_value:{log.timestamp}", pl.col(_TS).is_null()),
    ]
    if log.position:
        rules.append((f"invalid_value:{log.position}",
                      position.is_null() | (position != position.round()) | (position < 0)))
    if log.propensity_column:
        propensity = _propensity(log)
        rules.append((f"invalid_value:{log.propensity_column}",
                      propensity.is_null() | ~(propensity > 0) | (propensity > 1)))
    rules.append((f"invalid_value:{log.reward}", _bad_reward(log)))
    if log.request:
        rules.append((f"invalid_value:{log.request}", ~_is_id(pl.col(log.request))))
    if log.user:
        rules.append(("user_id_not_pseudonymous", ~_is_id(pl.col(log.user))))
    if log.session:
        rules.append((f"invalid_value:{log.session}", ~_is_id(pl.col(log.session))))
    if log.consent:
        rules.append((f"invalid_value:{log.consent}",
                      ~pl.col(log.consent).str.strip_chars().is_in(list(CONSENT_STATES)).fill_null(False)))
    suffix = ":rating:" if log.rating_scale else ":click:"  # of the longest signal id made from a slate
    signal_id = (pl.col(_SLATE).str.len_chars() + len(suffix)
                 + position.cast(pl.Int64, strict=False).cast(pl.String).str.len_chars())
    rules.append((f"invalid_value:{log.request or 'row'}", signal_id > MAX_ID_LENGTH))
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
    frame = frame.with_columns(
        _timestamp(log.timestamp, frame.schema[log.timestamp], log.timestamp_format).alias(_TS),
        (pl.lit(f"{source}:") + key).alias(_SLATE))
    frame = frame.with_columns(reason=_row_reasons(log),
                               item_id=pl.col(log.item).cast(pl.String).str.strip_chars(),
                               position=_position(log).cast(pl.Int64, strict=False),
                               propensity=_propensity(log), reward=_number(log.reward))
    return frame.with_columns(reason=pl.coalesce("reason", _slate_reasons()))


def _rejects(checked: pl.DataFrame) -> Mapped:
    raw_columns = [c for c in checked.columns if not c.startswith("__") and c not in
                   ("reason", "item_id", "position", "propensity", "reward")]
    for row in checked.filter(pl.col("reason").is_not_null()).iter_rows(named=True):
        ts = row[_TS]
        yield Rejected.of(row[_ROW], row["reason"], {c: row[c] for c in raw_columns},
                          ts.date() if ts is not None else None)


def _clicked(log: BanditLog) -> pl.Expr:
    """A row's reward makes it a click: at least ``reward_threshold``, or > 0 without one."""
    reward = pl.col("reward")
    return reward > 0 if log.reward_threshold is None else reward >= log.reward_threshold


def _rated(log: BanditLog) -> list[pl.Expr]:
    """A slate's rated items, their positions and ratings rescaled to 1..5 (none without a scale)."""
    if not log.rating_scale:
        return []
    low, high = log.rating_scale
    rating = (1 + 4 * (pl.col("reward") - low) / (high - low)).round(4)
    return [pl.col("item_id").alias("rated_items"), pl.col("position").alias("rated_positions"),
            rating.alias("ratings")]


def _slates(log: BanditLog, valid: pl.DataFrame) -> pl.DataFrame:
    """One row per slate, in the order of its first row: its time, row count, impressions by
    position, clicked and rated items, and its first row's user, session, consent, input and context."""
    content = pl.col(log.content).cast(pl.String).fill_null(pl.col("item_id")) if log.content else pl.col("item_id")
    firsts = [c for c in (log.user, log.session, log.consent, log.input, *log.context) if c]
    clicked = _clicked(log)
    rows = valid.select(_SLATE, _ROW, _TS, "item_id", "position", "propensity", "reward",
                        content.alias("content"), *firsts)  # only what the events carry
    return (rows.group_by(_SLATE, maintain_order=True)
            .agg(pl.col(_ROW).min(), pl.col(_TS).min(), pl.len().alias(RECORDS),
                 pl.struct("item_id", "position", "propensity", "content").sort_by("position").alias("impressions"),
                 pl.col("item_id").filter(clicked).alias("clicked_items"),
                 pl.col("position").filter(clicked).alias("clicked_positions"), *_rated(log),
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
    """A click signal per clicked item, at its slate's time (logs have no click times)."""
    clicks = slates.explode("clicked_items", "clicked_positions").drop_nulls("clicked_items")
    fields = {"event_id": pl.col(_SLATE) + ":click:" + pl.col("clicked_positions").cast(pl.String),
              **_common(log, domain), "signal_type": pl.lit("click"), "item_id": pl.col("clicked_items")}
    return _encoded(clicks, "signal", fields, pl.lit(0))


def _ratings(log: BanditLog, slates: pl.DataFrame, domain: str) -> Encoded:
    """A rating signal per rated item (every mapped row), at its slate's time."""
    rated = slates.explode("rated_items", "rated_positions", "ratings")
    fields = {"event_id": pl.col(_SLATE) + ":rating:" + pl.col("rated_positions").cast(pl.String),
              **_common(log, domain), "signal_type": pl.lit("rating"), "item_id": pl.col("rated_items"),
              "value": pl.col("ratings")}
    return _encoded(rated, "signal", fields, pl.lit(0))


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
    if log.rating_scale:
        yield _ratings(log, slates, domain)
