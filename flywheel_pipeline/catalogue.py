"""A domain's catalogue: the items a policy may choose from, when the log names only what it showed.

A per-row bandit log (the Open Bandit Dataset's shape: one item in one slot per row, with the
logger's probability of it there) says nothing of the items it did not show; a new policy ranks
the whole action space. flywheel.yaml's ``importing.catalogue`` declares it:

- ``log``: every item the domain's log shows (read from ``marts.fct_impressions``);
- a file with a row per item: ``flywheel import`` reads it, checks it and keeps it as
  ``<home>/catalogues/<domain>.parquet`` (importers/catalogue.py), so a cycle never depends on
  where the file was.

Validation scores every held-out interaction against every item of it (validation/evidence.py).
"""

from __future__ import annotations

import polars as pl

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.sources import IMPRESSIONS, Readable, as_source

CATALOGUE_SCHEMA = {"item_id": pl.String, "item_content": pl.String}


class CatalogueError(ValueError):
    """A catalogue a cycle cannot find, with what to run."""


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
