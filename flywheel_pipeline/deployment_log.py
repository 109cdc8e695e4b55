"""The signed deployment log: what flywheel set each domain's serving aliases to, and the registry
checked against it.

A serving system reads ``champion`` and ``holdback`` (and a rollback restores ``previous``), and
anyone with write access to MLflow can move them. Every change flywheel makes to them (a
deployment, a rollback, a revert of a change made outside it) appends an entry to
``registry.deployment_log`` holding the three aliases as flywheel left them, sealed with the machine
key and chained to the entry before, like the approval records. ``mismatch`` compares the registry
with the latest entry of a domain: the registry watch (``defs/registry_watch.py``) does it every
tick, and deployments and rollbacks refuse to build on aliases flywheel did not set.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from typing import Literal

import duckdb
from mlflow import MlflowClient

from flywheel_pipeline import registry
from flywheel_pipeline.signatures import seal, sealed_by
from flywheel_pipeline.warehouse import transaction

WATCHED = (registry.CHAMPION, registry.PREVIOUS, registry.HOLDBACK)  # what serving reads or restores
Change = Literal["deployed", "rolled back", "reverted"]
UNLOGGED = "not compared: deployed before the signed deployment log began; its next deployment starts it"

_FIELDS = "entry_id, domain, change, approval_id, champion, previous, holdback, note, logged_at"
_DDL = """
CREATE SCHEMA IF NOT EXISTS registry;
CREATE SEQUENCE IF NOT EXISTS registry.deployment_log_ids;
CREATE TABLE IF NOT EXISTS registry.deployment_log (
    entry_id BIGINT PRIMARY KEY DEFAULT nextval('registry.deployment_log_ids'),
    domain VARCHAR NOT NULL, change VARCHAR NOT NULL, approval_id BIGINT,
    champion VARCHAR, previous VARCHAR, holdback VARCHAR, note VARCHAR, logged_at TIMESTAMP NOT NULL,
    signature VARCHAR NOT NULL
);
"""


class LogError(ValueError):
    """A deployment log that does not verify, or a registry that does not match it."""


@dataclass(frozen=True)
class LogEntry:
    entry_id: int
    domain: str
    change: Change
    approval_id: int | None  # the approval a deployment carried out
    champion: str | None
    previous: str | None
    holdback: str | None
    note: str  # a revert: what the registry said
    logged_at: datetime

    @property
    def aliases(self) -> dict[str, str | None]:
        return dict(zip(WATCHED, (self.champion, self.previous, self.holdback), strict=True))

    def summary(self) -> str:
        """``entry 3, 2026-11-28T10:02:11: deployed (approval 2): champion=v4, previous=v3, holdback=v3``."""
        approval = f" (approval {self.approval_id})" if self.approval_id is not None else ""
        return (f"entry {self.entry_id}, {self.logged_at.isoformat(timespec='seconds')}: {self.change}{approval}: "
                f"{shown(self.aliases)}" + (f"; {self.note}" if self.note else ""))


@dataclass(frozen=True)
class Mismatch:
    """A domain's registry aliases as found, against the latest entry of the log (None: no entry)."""

    domain: str
    found: dict[str, str | None]
    expected: dict[str, str | None]
    entry: LogEntry | None

    def summary(self) -> str:
        moved = [f"{alias}={_version(self.found[alias])}" for alias in WATCHED
                 if self.found[alias] != self.expected[alias]]
        said = (f"entry {self.entry.entry_id} ({self.entry.change})" if self.entry else "no deployment")
        return (f"{registry.model_name(self.domain)}: {', '.join(moved)} was set outside flywheel; the signed "
                f"deployment log says {shown(self.expected)} ({said})")


def ensure_log(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_DDL)


def shown(aliases: dict[str, str | None]) -> str:
    return ", ".join(f"{alias}={_version(version)}" for alias, version in aliases.items())


def _version(version: str | None) -> str:
    return f"v{version}" if version else "none"


def aliases(client: MlflowClient, domain: str) -> dict[str, str | None]:
    """The watched aliases as the registry has them now."""
    return {alias: registry.alias_version(client, domain, alias) for alias in WATCHED}


def _fields(entry: LogEntry, previous_signature: str) -> list:
    return ["deployment_log", *astuple(entry)[:-1], entry.logged_at.isoformat(), previous_signature]


def verify_log(con: duckdb.DuckDBPyConnection, key: bytes) -> str:
    """Check every entry's seal in order; returns the last one ('' for none). Raises LogError naming
    the first entry that breaks the chain."""
    ensure_log(con)
    previous = ""
    for *fields, signature in con.execute(
            f"SELECT {_FIELDS}, signature FROM registry.deployment_log ORDER BY entry_id").fetchall():
        entry = LogEntry(*fields)
        if not sealed_by(key, _fields(entry, previous), signature):
            raise LogError(f"deployment log entry {entry.entry_id} breaks the log's chain: its signature does not "
                           f"match (the entry was changed, one before it was removed, or the key was replaced)")
        previous = signature
    return previous


def latest(con: duckdb.DuckDBPyConnection, domain: str) -> LogEntry | None:
    ensure_log(con)
    rows = con.execute(f"SELECT {_FIELDS} FROM registry.deployment_log WHERE domain = ? "
                       f"ORDER BY entry_id DESC LIMIT 1", [domain]).fetchall()
    return LogEntry(*rows[0]) if rows else None


def deployed_before_the_log(con: duckdb.DuckDBPyConnection, domain: str) -> bool:
    """A domain deployed by a flywheel from before the log (registry.deployments, approval.py's table,
    holds its deployments) and not since: what it left in the registry cannot be told from a
    forgery, so it is not compared until its next deployment starts the log."""
    if latest(con, domain) is not None:
        return False
    [(count,)] = con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'registry' "
                             "AND table_name = 'deployments'").fetchall()
    return bool(count) and bool(con.execute("SELECT count(*) FROM registry.deployments WHERE domain = ?",
                                            [domain]).fetchall()[0][0])


def mismatch(con: duckdb.DuckDBPyConnection, client: MlflowClient, key: bytes, domain: str) -> Mismatch | None:
    """The domain's aliases against its latest log entry (none yet: no alias set), the log verified
    first; None when they match, or when the domain was ``deployed_before_the_log``."""
    verify_log(con, key)
    if deployed_before_the_log(con, domain):
        return None
    entry = latest(con, domain)
    expected = entry.aliases if entry else dict.fromkeys(WATCHED)
    found = aliases(client, domain)
    return None if found == expected else Mismatch(domain, found, expected, entry)


def check_matches(con: duckdb.DuckDBPyConnection, client: MlflowClient, key: bytes, domain: str) -> None:
    """Raise LogError when the registry's aliases are not the ones flywheel set: nothing is deployed or
    rolled back on top of them."""
    if found := mismatch(con, client, key, domain):
        raise LogError(f"{found.summary()}. Nothing deploys or rolls back over it until the aliases are "
                       f"put back (registry_watch: revert does it on its next tick; `flywheel status` shows it)")


def append(con: duckdb.DuckDBPyConnection, client: MlflowClient, key: bytes, domain: str, change: Change,
           approval_id: int | None = None, note: str = "") -> LogEntry:
    """Record the domain's aliases as they are now, after ``change`` flywheel made."""
    with transaction(con):
        previous = verify_log(con, key)
        entry_id = con.execute("SELECT nextval('registry.deployment_log_ids')").fetchall()[0][0]
        entry = LogEntry(entry_id, domain, change, approval_id, *aliases(client, domain).values(), note,
                         datetime.now(UTC).replace(tzinfo=None))
        con.execute(f"INSERT INTO registry.deployment_log ({_FIELDS}, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [*astuple(entry), seal(key, _fields(entry, previous))])
    return entry


def revert(con: duckdb.DuckDBPyConnection, client: MlflowClient, key: bytes, found: Mismatch) -> LogEntry:
    """Put the aliases back as the log says, and log the revert with what was found."""
    name = registry.model_name(found.domain)
    for alias, version in found.expected.items():
        if found.found[alias] == version:
            continue
        if version is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, version)
    return append(con, client, key, found.domain, "reverted", note=f"found {shown(found.found)}")


def last_revert(con: duckdb.DuckDBPyConnection, domain: str) -> LogEntry | None:
    """The latest revert of the domain's aliases, if any (``flywheel status``)."""
    ensure_log(con)
    rows = con.execute(f"SELECT {_FIELDS} FROM registry.deployment_log WHERE domain = ? AND change = 'reverted' "
                       f"ORDER BY entry_id DESC LIMIT 1", [domain]).fetchall()
    return LogEntry(*rows[0]) if rows else None
