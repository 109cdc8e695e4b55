"""A domain's catalogue: the items a policy may choose from, when the log names only what it showed.

A per-row bandit log (the Open Bandit Dataset's shape: one item in one slot per row, with the
logger's probability of it there) says nothing of the items it did not show; a new policy ranks
the whole action space. flywheel.yaml's ``importing.catalogue`` declares it:

- ``log``: every item the domain's log shows (read from ``marts.fct_impressions``);
- a file (CSV, TSV or Parquet) with a row per item: ``flywheel import`` reads it, checks it and
  keeps it as ``<home>/catalogues/<domain>.parquet`` (written whole or not at all), so a cycle
  never depends on where the file was.

Validation scores every held-out interaction against every item of it (validation/evidence.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from flywheel_pipeline.config import CatalogueFile, FlywheelConfig
from flywheel_pipeline.home import Home, write_atomically
from flywheel_pipeline.sources import IMPRESSIONS, Readable, as_source

CATALOGUE_SCHEMA = {"item_id": pl.String, "item_content": pl.String}


class CatalogueError(ValueError):
    """A catalogue that cannot be read or used, with the key or file to fix."""


def declared_file(config: FlywheelConfig, domain: str) -> CatalogueFile | None:
    """The domain's catalogue file, if it declares one."""
    importing = config.domain(domain).importing
    return importing.catalogue if importing and isinstance(importing.catalogue, CatalogueFile) else None


def keep_catalogue(home: Home, domain: str, items: pl.DataFrame) -> None:
    """Keep ``items`` (``read_catalogue_file``) as the domain's catalogue, whole or not at all."""
    path = home.catalogue(domain)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    items.write_parquet(buffer)
    write_atomically(path, buffer.getvalue())


def store_catalogue(home: Home, config: FlywheelConfig, domain: str) -> int | None:
    """Read the domain's catalogue file and keep it in the home; its number of items (None: the
    domain declares no catalogue file)."""
    declared = declared_file(config, domain)
    if declared is None:
        return None
    items = read_catalogue_file(declared, domain)
    keep_catalogue(home, domain, items)
    return items.height


def read_catalogue_file(declared: CatalogueFile, domain: str) -> pl.DataFrame:
    """item_id, item_content of the declared file: one row per item, none missing."""
    key = f"domains.{domain}.importing.catalogue"
    path = Path(declared.file).resolve()
    try:
        items = (pl.read_parquet(path) if path.suffix.lower() == ".parquet"
                 else pl.read_csv(path, separator=declared.separator, infer_schema=False))
    except (pl.exceptions.PolarsError, OSError) as error:
        raise CatalogueError(f"{key}.file: cannot read {path}: {str(error).strip().splitlines()[0]}") from None
    for name, column in (("item", declared.item), ("content", declared.content)):
        if column is not None and column not in items.columns:
            raise CatalogueError(f"{key}.{name}: {path} has no column {column!r}; its columns: {items.columns}")
    content = pl.col(declared.content).cast(pl.String) if declared.content else pl.col(declared.item).cast(pl.String)
    items = items.select(item_id=pl.col(declared.item).cast(pl.String).str.strip_chars(),
                         item_content=content.fill_null(pl.col(declared.item).cast(pl.String)))
    if items["item_id"].fill_null("").str.len_chars().min() == 0 or items.is_empty():
        raise CatalogueError(f"{key}: {path} has an item without an id (column {declared.item!r}), or no item")
    if items["item_id"].n_unique() < items.height:
        twice = items.filter(pl.col("item_id").is_duplicated())["item_id"].unique().sort().head(5).to_list()
        raise CatalogueError(f"{key}: {path} lists an item more than once, e.g. {twice}")
    return items


def candidate_catalogue(home: Home, source: Readable, config: FlywheelConfig, domain: str) -> pl.DataFrame | None:
    """item_id, item_content of every item the domain's policies choose from; None when the domain
    declares no catalogue (its interactions' logged candidates, or shown items, are all there is)."""
    importing = config.domain(domain).importing
    declared = importing.catalogue if importing else None
    if declared is None:
        return None
    if declared == "log":
        shown = as_source(source).read(IMPRESSIONS, domain, columns=["item_id", "item_content"])
        return (shown.unique("item_id", keep="first").sort("item_id") if not shown.is_empty()
                else pl.DataFrame(schema=CATALOGUE_SCHEMA))
    path = home.catalogue(domain)
    if not path.is_file():
        raise CatalogueError(f"domains.{domain}.importing.catalogue: no catalogue stored for {domain} ({path}); "
                             f"`flywheel import` stores it from {declared.file}")
    return pl.read_parquet(path)


def judges_slots(config: FlywheelConfig, domain: str) -> bool:
    """Whether each shown slot is judged as its own decision: the domain's log has no slates (a
    bandit log without a ``request`` column) or names its candidates by a catalogue (the logger's
    probability is known for the shown item at its slot only)."""
    importing = config.domain(domain).importing
    if importing is None:
        return False
    return importing.catalogue is not None or (importing.bandit_log is not None and importing.bandit_log.request is None)
