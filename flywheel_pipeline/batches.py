"""Landing batches: which files in a domain's landing folder are batches, the day each was
delivered, and which of them a run over some days reads.

A domain's folder (``<home>/landing/<domain>/``) holds the product's daily batches
(``<day>.jsonl``), importers' (``<day>.<source>.jsonl``, docs/importing.md) and, in ``labels/``,
the review queue's (``label`` events). A batch is gzip'd or not whatever its name: its first two
bytes tell.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from pathlib import Path

from flywheel_pipeline.home import Home

LABEL_BATCHES = "labels"  # the review queue's batches: <domain>/labels/<day>.jsonl
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of a gzip'd batch
# <day>.jsonl, the product's batch of a day; <day>.<source>.jsonl, an importer's (docs/importing.md)
_BATCH_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.[a-z0-9][a-z0-9-]*)?\.jsonl$")


def batch_day(path: Path) -> date | None:
    """The day a landing batch was delivered, from its name; None for a file that is no batch."""
    match = _BATCH_NAME.match(path.name)
    try:
        return date.fromisoformat(match.group(1)) if match else None
    except ValueError:  # 2026-13-45.jsonl
        return None


def batches_for(home: Home, domain: str, dates: list[date], max_lateness_days: int) -> list[Path]:
    """Landing batches that may carry events of ``dates``: delivered that day up to the lateness
    limit, the product's and the review queue's."""
    first, last = min(dates), max(dates) + timedelta(days=max_lateness_days)
    found = []
    for folder in (home.landing / domain, home.landing / domain / LABEL_BATCHES):
        for path in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
            day = batch_day(path)
            if day and first <= day <= last:
                found.append(path)
    return found
