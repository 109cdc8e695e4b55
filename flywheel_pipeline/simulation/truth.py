"""The hidden truth behind the logs, one parquet file per simulated day, apart from landing."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl

TRUTH_COLUMNS = {"interaction_id": pl.String, "item_id": pl.String, "good": pl.Boolean}


def save_day(world_folder: Path, day: date, truth: pl.DataFrame) -> None:
    folder = world_folder / "truth"
    folder.mkdir(parents=True, exist_ok=True)
    truth.write_parquet(folder / f"{day.isoformat()}.parquet")


def load(world_folder: Path) -> pl.DataFrame:
    """Every simulated impression's truth, in day order: interaction_id, item_id, good."""
    files = sorted((world_folder / "truth").glob("*.parquet"))
    if not files:
        return pl.DataFrame(schema=TRUTH_COLUMNS)
    return pl.concat([pl.read_parquet(f, columns=list(TRUTH_COLUMNS)) for f in files])
