"""`flywheel import FORMAT PATH --domain D`: files other tools wrote, as landing batches.

Each format's reader (``read(path, domain, config) -> Mapped``, importers/base.py) maps a file's
records to events of the contract; ``import_file`` writes them as the domain's landing batches
and the records it could not map to ``raw.quarantine`` (importers/landing.py); a bandit log's
declared catalogue is read first and kept in the home (importers/catalogue.py). docs/importing.md
walks through each format, from file to a gate decision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.importers import bandit, otel, reviews
from flywheel_pipeline.importers.base import Mapped, UnreadableFile
from flywheel_pipeline.importers.catalogue import declared_file, keep_catalogue, read_catalogue_file
from flywheel_pipeline.importers.landing import ImportReport, write_import

Reader = Callable[[Path, str, FlywheelConfig], Mapped]

FORMATS: dict[str, Reader] = {
    "otel": otel.read,  # OpenTelemetry GenAI spans, OTLP JSON
    "bandit": bandit.read,  # logged bandit feedback, CSV or Parquet
    "label-studio": reviews.read_label_studio,  # a Label Studio JSON export of the review queue's tasks
    "argilla": reviews.read_argilla,  # Argilla records with their responses, JSON or JSON Lines
}


def import_file(home: Home, config: FlywheelConfig, fmt: str, path: Path | str, domain: str,
                now: datetime | None = None) -> ImportReport:
    """Import the file at ``path`` (format ``fmt``, one of FORMATS) into ``domain``'s landing folder."""
    if fmt not in FORMATS:
        raise UnreadableFile(f"unknown format {fmt!r}; one of {sorted(FORMATS)}")
    config.domain(domain)
    path = Path(path).resolve()
    if not path.is_file():
        raise UnreadableFile(f"{path}: no such file")
    catalogue = declared_file(config, domain) if fmt == "bandit" else None
    items = read_catalogue_file(catalogue, domain) if catalogue else None  # a bad catalogue stops it first
    report = write_import(home, config, fmt, path, domain, FORMATS[fmt](path, domain, config), now)
    if items is not None:
        keep_catalogue(home, domain, items)
        report = replace(report, catalogue_items=items.height)
    return report


__all__ = ["FORMATS", "ImportReport", "UnreadableFile", "import_file"]
