"""A domain's catalogue file, read and checked at import and kept in the home (flywheel_pipeline/catalogue.py).

``importing.catalogue`` (flywheel.yaml) names a file of items, one row per item: CSV, TSV, any
separator (MovieLens-1M's ``::``), with or without a header line, or Parquet. Text is read as
UTF-8, an invalid byte replaced (a title in Latin-1 keeps its ids). An item without an id, an
item listed twice, or a declared column the file lacks stops the import before any batch is
written, naming the key.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from flywheel_pipeline.config import CatalogueFile, FlywheelConfig
from flywheel_pipeline.home import Home, write_atomically
from flywheel_pipeline.importers.base import UnreadableFile
from flywheel_pipeline.importers.text import read_delimited


def declared_file(config: FlywheelConfig, domain: str) -> CatalogueFile | None:
    """The domain's catalogue file, if it declares one."""
    importing = config.domain(domain).importing
    return importing.catalogue if importing and isinstance(importing.catalogue, CatalogueFile) else None


def read_catalogue_file(declared: CatalogueFile, domain: str) -> pl.DataFrame:
    """item_id, item_content of the declared file: one row per item, none missing."""
    key = f"domains.{domain}.importing.catalogue"
    path = Path(declared.file).resolve()
    try:
        items = (pl.read_parquet(path) if path.suffix.lower() == ".parquet"
                 else read_delimited(path, declared.separator, declared.header, declared.columns,
                                     text_columns=[c for c in (declared.item, declared.content) if c],
                                     encoding="utf8-lossy"))
    except (pl.exceptions.PolarsError, OSError) as error:
        raise UnreadableFile(f"{key}.file: cannot read {path}: {str(error).strip().splitlines()[0]}") from None
    for name, column in (("item", declared.item), ("content", declared.content)):
        if column is not None and column not in items.columns:
            raise UnreadableFile(f"{key}.{name}: {path} has no column {column!r}; its columns: {items.columns}")
    item = pl.col(declared.item).cast(pl.String).str.strip_chars()
    content = pl.col(declared.content).cast(pl.String) if declared.content else item
    items = items.select(item_id=item, item_content=content.fill_null(item))
    if items.is_empty() or items["item_id"].fill_null("").str.len_chars().min() == 0:
        raise UnreadableFile(f"{key}: {path} has an item without an id (column {declared.item!r}), or no item")
    if items["item_id"].n_unique() < items.height:
        twice = items.filter(pl.col("item_id").is_duplicated())["item_id"].unique().sort().head(5).to_list()
        raise UnreadableFile(f"{key}: {path} lists an item more than once, e.g. {twice}")
    return items


def keep_catalogue(home: Home, domain: str, items: pl.DataFrame) -> None:
    """Keep ``items`` (``read_catalogue_file``) as the domain's catalogue, whole or not at all."""
    path = home.catalogue(domain)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    items.write_parquet(buffer)
    write_atomically(path, buffer.getvalue())
