"""Training sets out: what an assistant domain's labels teach, in the files fine-tuning tools read.

    sft_dataset          chat-format records {"messages": [user, assistant]}: responses labelled good
                         with P(good) >= training_sets.sft_min_p_good
    preference_dataset   DPO pairs {"prompt", "chosen", "rejected"}, each with its ``source``:
                           edit           the user's edited text over the response they edited
                           regeneration   the same input asked again in the session: a good response
                                          over the earlier bad one
                           reformulation  a bad response the user reformulated: the good response to
                                          the session's next interaction over it

Read from ``marts.fct_impressions`` (kept interactions only: consent granted, text redacted at
ingest, docs/privacy.md) and ``labels.impression_labels``, over the mature training window the
trainer uses (never the held-out days). Each set is written to
``<home>/datasets/<domain>/<name>/<train_start>_<train_end>/`` as train.parquet, train.jsonl and a
dataset card (README.md, YAML front matter as on the Hugging Face Hub), atomically; MLflow records
it with ``mlflow.data`` (schema, digest, counts; the card as an artifact, never the rows).

Every record carries its user's hash (``privacy.user_hash``): ``flywheel forget`` and the retention
job rewrite the files without a forgotten user's or an expired day's records (``drop_records``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import mlflow
import polars as pl
import yaml
from mlflow.data.dataset_source_registry import get_dataset_source_from_json

from flywheel_pipeline.config import FlywheelConfig, TrainingSets
from flywheel_pipeline.home import Home
from flywheel_pipeline.sources import Scope
from flywheel_pipeline.training.base import (
    DAGSTER_RUN_TAG,
    Windows,
    ensure_experiment,
    label_model_versions,
)

SFT, PREFERENCE = "sft_dataset", "preference_dataset"
PARQUET, JSONL, CARD = "train.parquet", "train.jsonl", "README.md"
PAIR_SOURCES = ("edit", "regeneration", "reformulation")
REDACTION = ("email addresses, phone numbers, card numbers, US SSNs and API keys replaced by <ENTITY> "
             "at ingest, before any table was written (docs/privacy.md)")
CONSENT = "interactions with consent granted only (consent-denied ones never reach the marts)"

# The training window's impressions, with their labels, the text known at serving time and the
# reactions pairs are made of. Assistant interactions show one impression each.
_IMPRESSIONS = """
    SELECT i.event_date, i.interaction_id, i.item_id, i.served_at, i.session_id,
           sha256(i.user_id) AS user_hash, i.input_text, lower(trim(i.input_text)) AS normalized_input,
           i.item_content, i.edited_text, i.reformulated_after_s, l.p_good, l.label_model_version
    FROM marts.fct_impressions AS i
    LEFT JOIN labels.impression_labels AS l USING (domain, event_date, interaction_id, item_id)
    WHERE i.domain = $domain AND i.event_date BETWEEN $start AND $end
      AND length(trim(i.item_content)) > 0
"""

_SFT = """
    SELECT [{'role': 'user', 'content': input_text}, {'role': 'assistant', 'content': item_content}] AS messages,
           interaction_id, item_id, event_date, p_good, label_model_version, user_hash
    FROM window_impressions WHERE p_good >= $sft_min_p_good
    ORDER BY served_at, interaction_id
"""

_PAIR_COLUMNS = """{source} AS source, {rejected}.input_text AS prompt, {chosen} AS chosen,
    {rejected}.item_content AS rejected, {rejected}.interaction_id, {rejected}.event_date,
    {chosen_interaction}.interaction_id AS chosen_interaction_id, {chosen_p_good} AS chosen_p_good,
    {rejected}.p_good AS rejected_p_good, {rejected}.user_hash, {rejected}.served_at"""

_PREFERENCES = f"""
    WITH edits AS (
        SELECT {_PAIR_COLUMNS.format(source="'edit'", rejected="r", chosen="r.edited_text",
                                     chosen_interaction="r", chosen_p_good="NULL::DOUBLE")}
        FROM window_impressions AS r
        WHERE length(trim(r.edited_text)) > 0 AND trim(r.edited_text) <> trim(r.item_content)
    ),
    regenerations AS (  -- each bad response with the first good one to the same input after it
        SELECT {_PAIR_COLUMNS.format(source="'regeneration'", rejected="r", chosen="c.item_content",
                                     chosen_interaction="c", chosen_p_good="c.p_good")}
        FROM window_impressions AS r
        JOIN window_impressions AS c
          ON c.session_id = r.session_id AND c.user_hash = r.user_hash
         AND c.normalized_input = r.normalized_input AND c.served_at > r.served_at
        WHERE r.p_good <= $rejected_max_p_good AND c.p_good >= $chosen_min_p_good
          AND c.item_content <> r.item_content
        QUALIFY row_number() OVER (PARTITION BY r.interaction_id ORDER BY c.served_at, c.interaction_id) = 1
    ),
    followed AS (
        SELECT *, lead({{'interaction_id': interaction_id, 'served_at': served_at, 'user_hash': user_hash,
                         'normalized_input': normalized_input, 'item_content': item_content,
                         'p_good': p_good}})
                  OVER (PARTITION BY session_id ORDER BY served_at, interaction_id) AS next
        FROM window_impressions
    ),
    reformulations AS (  -- a different input: the same one again is a regeneration
        SELECT {_PAIR_COLUMNS.format(source="'reformulation'", rejected="r", chosen="r.next.item_content",
                                     chosen_interaction="r.next", chosen_p_good="r.next.p_good")}
        FROM followed AS r
        WHERE r.reformulated_after_s IS NOT NULL AND r.p_good <= $rejected_max_p_good
          AND r.next.p_good >= $chosen_min_p_good AND r.next.user_hash = r.user_hash
          AND r.next.normalized_input <> r.normalized_input AND r.next.item_content <> r.item_content
          AND r.next.served_at <= r.served_at + to_seconds($reformulation_within_s)
    )
    SELECT * EXCLUDE (served_at) FROM (
        SELECT * FROM edits UNION ALL SELECT * FROM regenerations UNION ALL SELECT * FROM reformulations
    ) ORDER BY served_at, interaction_id, source
"""


@dataclass(frozen=True)
class TrainingSet:
    """One dataset's records and what its card says about them."""

    domain: str
    name: str
    records: pl.DataFrame
    card: dict[str, Any]  # the card's ``flywheel`` section

    @property
    def version(self) -> str:
        windows = self.card["windows"]
        return f"{windows['train_start']}_{windows['train_end']}"


@dataclass(frozen=True)
class Exported:
    """A training set written and logged: what the Dagster asset reports."""

    training_set: TrainingSet
    path: Path
    mlflow_run_id: str

    def metadata(self) -> dict[str, Any]:
        card = self.training_set.card
        return {"records": card["records"], **{f"records.{s}": n for s, n in card.get("sources", {}).items()},
                "path": str(self.path), "mlflow_run_id": self.mlflow_run_id,
                "label_model_version": card["label_model_version"], **card["windows"]}


def build(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, domain: str, name: str,
          windows: Windows) -> TrainingSet:
    """The ``name`` set (SFT or PREFERENCE) of ``domain`` over the training window of ``windows``."""
    settings = config.domain(domain).training_sets
    params = {"domain": domain, "start": windows.train_start, "end": windows.train_end}
    con.execute(f"CREATE OR REPLACE TEMP TABLE window_impressions AS {_IMPRESSIONS}", params)
    query = _SFT if name == SFT else _PREFERENCES
    records = con.sql(query, params={k: v for k, v in settings.model_dump().items() if f"${k}" in query}).pl()
    labelled = (records["interaction_id"] if name == SFT else
                records.filter(pl.col("source") != "edit").select(pl.concat_list(
                    "interaction_id", "chosen_interaction_id").explode()).to_series())
    card = {
        "domain": domain,
        "dataset": name,
        "format": "chat messages (SFT)" if name == SFT else "prompt / chosen / rejected (DPO)",
        "filters": _filters(name, settings),
        "label_sources": _label_sources(con, domain, labelled),
        "label_model_version": label_model_versions(con, domain, windows.train_start, windows.train_end),
        "windows": windows.params(),
        "redaction": REDACTION,
        "consent": CONSENT,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return TrainingSet(domain, name, records, {**card, **_counts(name, records)})


def _filters(name: str, settings: TrainingSets) -> dict[str, Any]:
    window = "the mature training window (train_start..train_end); never the held-out days"
    if name == SFT:
        return {"window": window, "sft_min_p_good": settings.sft_min_p_good}
    return {"window": window, **settings.model_dump(exclude={"sft_min_p_good"}),
            "edit": "edited text differs from the response (whitespace aside); no label needed"}


def _counts(name: str, records: pl.DataFrame) -> dict[str, Any]:
    """What the card counts, from the records themselves (so a rewrite keeps them true)."""
    if name == SFT:
        return {"records": records.height}
    sources = dict(records.group_by("source").len().iter_rows())
    return {"records": records.height, "sources": {source: sources.get(source, 0) for source in PAIR_SOURCES}}


def _label_sources(con: duckdb.DuckDBPyConnection, domain: str, interaction_ids: pl.Series) -> dict[str, dict]:
    """Per labeling function, its good and bad votes on the records' labelled impressions."""
    rows = con.execute("""
        SELECT lf, count(*) FILTER (WHERE vote = 1), count(*) FILTER (WHERE vote = 0)
        FROM labels.label_matrix
        WHERE domain = $domain AND interaction_id IN (SELECT unnest($ids::VARCHAR[]))
        GROUP BY lf ORDER BY lf""", {"domain": domain, "ids": interaction_ids.unique().to_list()}).fetchall()
    return {lf: {"good_votes": good, "bad_votes": bad} for lf, good, bad in rows}


def write(home: Home, training_set: TrainingSet) -> Path:
    """Write the set's folder (replacing an earlier one of the same window) and return it."""
    path = home.training_set(training_set.domain, training_set.name, training_set.version)
    _write_folder(path, training_set.records, training_set.card)
    return path


def _write_folder(path: Path, records: pl.DataFrame, card: dict[str, Any]) -> None:
    """Parquet, JSONL and card in a hidden folder beside ``path``, renamed into place when whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        records.write_parquet(partial / PARQUET)
        records.write_ndjson(partial / JSONL)
        (partial / CARD).write_text(render_card(card))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            path.rename(old)
            partial.rename(path)
            shutil.rmtree(old)
        else:
            partial.rename(path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _size_category(n: int) -> str:
    """The Hub's size_categories tag."""
    for bound, tag in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return tag
    return "1M<n<10M"


def render_card(card: dict[str, Any]) -> str:
    """The dataset card: Hub metadata and flywheel's own (``flywheel``) as YAML front matter, then prose."""
    front = {
        "pretty_name": f"flywheel {card['domain']} {card['dataset']}",
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(card["records"])],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": PARQUET}]}],
        "flywheel": card,
    }
    sources = "".join(f"\n- {source}: {n}" for source, n in card.get("sources", {}).items())
    windows = card["windows"]
    return (f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n\n"
            f"# {front['pretty_name']}\n\n"
            f"{card['records']} records, {card['format']}, from {windows['train_start']} to "
            f"{windows['train_end']} (held-out days {windows['holdout_start']}..{windows['holdout_end']} "
            f"excluded).{sources}\n\n"
            f"Labels: label model {card['label_model_version'] or 'none'}. Redaction: {card['redaction']}. "
            f"Consent: {card['consent']}. Files: {PARQUET}, {JSONL} (the same records).\n")


def read_card(path: Path) -> dict[str, Any]:
    """The ``flywheel`` section of a set folder's card."""
    _, front, _ = (path / CARD).read_text().split("---\n", 2)
    return yaml.safe_load(front)["flywheel"]


def copy_scope(windows: Windows) -> Scope:
    """What an export holds in a working copy: its training window's impressions and labels."""
    return Scope.between(windows.train_start, windows.train_end,
                         ("marts.fct_impressions", "labels.impression_labels", "labels.label_matrix"))


def export(con: duckdb.DuckDBPyConnection, home: Home, config: FlywheelConfig, domain: str,
           names: list[str], windows: Windows, dagster_run_id: str | None = None) -> list[Exported]:
    """Build, write and log the ``names`` sets of ``domain``: one MLflow run in the domain's
    experiment, each set an input (``mlflow.data``) with its card as an artifact."""
    sets = [build(con, config, domain, name, windows) for name in names]
    with mlflow.start_run(
        experiment_id=ensure_experiment(home, domain), run_name=f"training-sets-{windows.train_end}",
        tags={"flywheel.domain": domain, "flywheel.stage": "training_sets",
              **({DAGSTER_RUN_TAG: dagster_run_id} if dagster_run_id else {})},
    ) as run:
        mlflow.log_params({**windows.params(), **config.domain(domain).training_sets.model_dump()})
        exported = []
        for training_set in sets:
            training_set = replace(training_set, card={**training_set.card, "mlflow_run_id": run.info.run_id})
            path = write(home, training_set)
            source = get_dataset_source_from_json(json.dumps({"uri": str(path)}), "local")
            mlflow.log_input(mlflow.data.from_polars(training_set.records, source=source,
                                                     name=f"{domain}-{training_set.name}-{training_set.version}"),
                             context=training_set.name)
            mlflow.log_artifact(str(path / CARD), artifact_path=training_set.name)
            mlflow.log_metric(f"{training_set.name}.records", training_set.card["records"])
            exported.append(Exported(training_set, path, run.info.run_id))
    return exported


def drop_records(home: Home, doomed: Callable[[str], pl.Expr], reason: str) -> dict[str, int]:
    """Rewrite every exported set without the records ``doomed(domain)`` selects (each folder
    atomically, its card's counts recomputed); returns records removed per set folder. Folders
    left by a write that died are deleted: they may hold such records."""
    for leftover in home.datasets.glob("*/*/.*"):
        shutil.rmtree(leftover)
    removed = {}
    for path in sorted(home.datasets.glob(f"*/*/*/{PARQUET}")):
        folder_path = path.parent
        card = read_card(folder_path)
        records = pl.read_parquet(path)
        kept = records.filter(~doomed(card["domain"]))
        if kept.height == records.height:
            continue
        gone = records.height - kept.height
        card = {**card, **_counts(card["dataset"], kept),
                "records_removed": {**card.get("records_removed", {}),
                                    reason: card.get("records_removed", {}).get(reason, 0) + gone}}
        _write_folder(folder_path, kept, card)
        removed[str(folder_path.relative_to(home.datasets))] = gone
    return removed


def forget_user(home: Home, user_hash: str) -> dict[str, int]:
    """Remove a forgotten user's records (by ``privacy.user_hash``) from every exported set."""
    return drop_records(home, lambda domain: pl.col("user_hash") == user_hash, "forgotten_user")


def expire(home: Home, domain: str, cutoff: date) -> dict[str, int]:
    """Remove the records of ``domain``'s days before ``cutoff`` from its exported sets (retention)."""
    return drop_records(home, lambda d: pl.lit(d == domain) & (pl.col("event_date") < cutoff), "retention")
