"""Quality filtering as Dagster assets: the dbt project in dbt_project/, run with `dbt build`.

Every dbt model is an asset in group ``quality_filtering`` and every dbt test an asset check on its
model (a failed test fails the check and the run). The dbt sources (schema ``raw``) all map to one
upstream asset, accumulation's ``raw_events``. The dbt assets are partitioned by day x domain like
the rest of the pipeline: a run passes its days to dbt in the environment (``FLYWHEEL_DBT_DAYS``,
read when dbt runs, never when it parses), and the incremental models rebuild exactly those
partitions (dbt_project/macros/partitions.sql; docs/warehouse.md). A domain's runs share one target
folder, so each dbt reuses the project its last run parsed (dbt's partial parsing: nothing to parse
when no file changed) instead of parsing it anew. dbt dies with the run's process: a killed run does
not leave it writing, holding the warehouse's lock.
"""


import fcntl
import importlib.metadata
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Self

import dagster as dg
from dagster._core.execution.scripts import watch_orphans
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliInvocation,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)
from packaging import version

from flywheel_pipeline.config import DomainConfig, FlywheelConfig, WarehouseSettings
from flywheel_pipeline.defs.partitions import day_domain_partitions, run_scope
from flywheel_pipeline.home import HOME_ENV, Home
from flywheel_pipeline.object_store import SPARK_TABLES_ENV, ObjectStore

DBT_PROJECT_DIR = Path(__file__).resolve().parents[2] / "dbt_project"
# The venv's dbt, found without activating the venv.
DBT_EXECUTABLE = Path(sys.executable).with_name("dbt")
RAW_EVENTS = dg.AssetKey("raw_events")
GROUP = "quality_filtering"
DBT_MODELS = dg.AssetSelection.groups(GROUP)
# Under engine spark a domain's days may run as runs side by side; their dbt steps take turns in this
# pool (the home's dagster.yaml: one at a time), as they share the domain's dbt target folder and
# int_sessions' one partition per domain. On DuckDB the run queue already keeps a domain's runs apart.
DBT_POOL = "flywheel_dbt"
# What profiles.yml reads for the DuckDB connection dbt opens: the domain whose warehouse it builds, and
# flywheel.yaml's warehouse settings.
DOMAIN_ENV, MEMORY_LIMIT_ENV, THREADS_ENV = "FLYWHEEL_DOMAIN", "FLYWHEEL_DBT_MEMORY_LIMIT", "FLYWHEEL_DBT_THREADS"
# What the macros read when dbt runs (dbt_project/macros/partitions.sql): the run's days, comma-separated
# (unset: every partition), and whether the domain's input may be empty.
DAYS_ENV, INPUT_OPTIONAL_ENV = "FLYWHEEL_DBT_DAYS", "FLYWHEEL_DBT_INPUT_OPTIONAL"


class FlywheelDbtTranslator(DagsterDbtTranslator):
    """Models go to group quality_filtering; every source on schema raw is raw_events."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        if dbt_resource_props["resource_type"] == "source" and dbt_resource_props["schema"] == "raw":
            return RAW_EVENTS
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str:
        return GROUP


class FlywheelDbtResource(DbtCliResource):
    """A DbtCliResource whose dbt builds a domain's warehouse in one home (FLYWHEEL_HOME=home_path,
    FLYWHEEL_DOMAIN) within flywheel.yaml's warehouse.memory_limit, running warehouse.dbt_threads
    models at once, with the domain's target folder (``target_folder``) unless told another; under
    warehouse.engine spark, the object store's tables on Spark (target spark)."""

    home_path: str
    memory_limit: str
    threads: int
    spark_warehouse: str | None = None  # the engine spark's warehouse settings as JSON (target spark)

    @cached_property
    def _cli_version(self) -> version.Version:
        """dbt-core's version as installed beside this process (dbt_executable is this venv's):
        dagster-dbt would start `dbt --version`, 1.5-5 s, before each invocation to learn it."""
        return version.parse(importlib.metadata.version("dbt-core"))

    def target_folder(self, domain: str) -> Path:
        """Where dbt writes ``domain``'s artifacts and keeps its parsed project (partial_parse.msgpack)
        between runs: ``<home>/dbt/runs/<domain>``. A domain's runs never overlap (one writer of its
        warehouse at a time), so they can share it; dagster-dbt's default, a new folder per run, would
        make every run parse the project from scratch."""
        return Path(self.home_path) / "dbt" / "runs" / domain

    def cli(self, args: Sequence[str], *, domain: str, partitions: Mapping[str, str] | None = None,
            **kwargs: Any) -> DbtCliInvocation:
        """``dbt <args>`` on ``domain``'s warehouse; ``partitions`` (``partition_env``) limit a build to
        a run's days, none builds every partition."""
        kwargs.setdefault("target_path", self.target_folder(domain))
        # dagster-dbt hands dbt a copy of this process's environment, taken inside cli().
        with _environ({HOME_ENV: self.home_path, DOMAIN_ENV: domain, MEMORY_LIMIT_ENV: self.memory_limit,
                       THREADS_ENV: str(self.threads), DAYS_ENV: None, INPUT_OPTIONAL_ENV: None,
                       **(partitions or {}), **self._spark_environ()}):
            return super().cli(args, **kwargs)

    def _spark_environ(self) -> dict[str, str]:
        """Under warehouse.engine spark: the tables' root as Spark names it, a metastore that lives as
        long as the dbt process, and the tables it registers from the store (object_store)."""
        if self.spark_warehouse is None:
            return {}
        store = ObjectStore.from_settings(WarehouseSettings.model_validate_json(self.spark_warehouse))
        return {"FLYWHEEL_SPARK_WAREHOUSE": store.spark_root, SPARK_TABLES_ENV: store.spark_tables(),
                "FLYWHEEL_SPARK_METASTORE": "jdbc:derby:memory:metastore;create=true"}


@contextmanager
def _environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """This process's environment with ``values`` set (None: unset) while inside."""
    previous = {name: os.environ.get(name) for name in values}
    _set_environ(values)
    try:
        yield
    finally:
        _set_environ(previous)


def _set_environ(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def dies_with_this_process(child: subprocess.Popen) -> Iterator[None]:
    """Terminate ``child`` within about a second if this process dies first, however it dies
    (SIGKILL included): Dagster's orphan watcher, the one that stops its compute-log tails."""
    watcher = subprocess.Popen([sys.executable, watch_orphans.__file__, str(os.getpid()), str(child.pid)])
    try:
        yield
    finally:
        watcher.kill()
        watcher.wait()


class ReadAhead:
    """A child's stdout read by a thread as fast as the child writes it, handed out line by line.

    dagster-dbt reads dbt's log lines as it turns them into Dagster events, storing each (one
    transaction each in the event log) before it reads on; a pipe holds 64 KiB of dbt's JSON log,
    so dbt, past that, waited for Dagster to store the events of the nodes it had already finished.
    Read ahead, the two overlap."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self.closed = False
        self._lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Iterable[bytes]) -> None:
        try:
            for line in stream:
                self._lines.put(line)
        finally:
            self._lines.put(None)  # the end: the child closed its stdout (it ended)

    def __iter__(self) -> Iterator[bytes]:
        while (line := self._lines.get()) is not None:
            yield line

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.closed = True


def dbt_resource(home: Home, config: FlywheelConfig) -> FlywheelDbtResource:
    """The `dbt` resource: the project in dbt_project/, building ``home``'s warehouse."""
    spark = config.warehouse.engine == "spark"
    return FlywheelDbtResource(
        project_dir=dbt_project, dbt_executable=str(DBT_EXECUTABLE), home_path=str(home.root),
        memory_limit=config.warehouse.memory_limit, threads=config.warehouse.dbt_threads,
        target="spark" if spark else None, spark_warehouse=config.warehouse.model_dump_json() if spark else None,
    )


def _prepare(project: DbtProject) -> DbtProject:
    """Write target/manifest.json with `dbt parse`: under `dagster dev`, or when it is missing (a
    fresh clone) or older than a model, macro or YAML file (a checkout that changed the models), so
    `dagster definitions validate` works without a manual step. One process at a time (the suite's
    workers, a code server beside the daemon import this at once on a fresh clone): another's
    half-written manifest is never read, nor parsed over."""
    if not (project.preparer.using_dagster_dev() or _manifest_is_stale(project)):
        return project
    target = project.project_dir / project.target_path
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".parse.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if project.preparer.using_dagster_dev() or _manifest_is_stale(project):  # not parsed while we waited
            parser = DbtCliResource(project_dir=project, dbt_executable=str(DBT_EXECUTABLE))
            with _environ({DOMAIN_ENV: os.environ.get(DOMAIN_ENV, "parse")}):  # parsing opens no warehouse
                parser.cli(["parse", "--quiet"], target_path=project.target_path).wait()
    return project


def _manifest_is_stale(project: DbtProject) -> bool:
    if not project.manifest_path.exists():
        return True
    built = project.manifest_path.stat().st_mtime
    sources = (path for folder in ("models", "macros") for path in (project.project_dir / folder).rglob("*"))
    return any(path.stat().st_mtime > built for path in (project.project_dir / "dbt_project.yml", *sources))


dbt_project = _prepare(DbtProject(project_dir=DBT_PROJECT_DIR))


TRANSLATOR = FlywheelDbtTranslator(settings=DagsterDbtTranslatorSettings(enable_duplicate_source_asset_keys=True))


def partition_env(days: Sequence[date], settings: DomainConfig) -> dict[str, str]:
    """What makes a build cover a domain's ``days`` (dbt_project/macros/partitions.sql), with what
    filtering needs of the domain's config (whether its input may be empty). Environment variables the
    macros read only when dbt runs: unlike ``--vars``, whose every change makes dbt parse the whole
    project again, they leave the parsed project as it was."""
    return {DAYS_ENV: ",".join(day.isoformat() for day in days),
            INPUT_OPTIONAL_ENV: "true" if settings.input_optional else "false"}


def build_dbt_assets(config: FlywheelConfig) -> dg.AssetsDefinition:
    """The dbt models as assets, partitioned by day x domain, a range of days in one run."""
    partitions = day_domain_partitions(config)

    @dbt_assets(manifest=dbt_project.manifest_path, project=dbt_project, dagster_dbt_translator=TRANSLATOR,
                partitions_def=partitions, backfill_policy=dg.BackfillPolicy.single_run(),
                pool=DBT_POOL if config.warehouse.engine == "spark" else None)
    def flywheel_dbt_assets(context: dg.AssetExecutionContext, dbt: FlywheelDbtResource):
        """Rebuild the run's partitions of staging -> intermediate -> marts in the domain's warehouse
        and run every dbt test on them (one asset check each)."""
        domain, days = run_scope(context, partitions)
        invocation = dbt.cli(["build"], domain=domain, partitions=partition_env(days, config.domain(domain)),
                             context=context)
        invocation.process.stdout = ReadAhead(invocation.process.stdout)
        with dies_with_this_process(invocation.process):
            yield from invocation.stream()

    return flywheel_dbt_assets


@cache
def _models() -> dict[str, Mapping[str, Any]]:
    manifest = json.loads(dbt_project.manifest_path.read_text())
    return {node["name"]: node for node in manifest["nodes"].values() if node["resource_type"] == "model"}


def dbt_model_key(model: str) -> dg.AssetKey:
    """The asset key of one dbt model."""
    return TRANSLATOR.get_asset_key(_models()[model])


def dbt_model_keys() -> list[dg.AssetKey]:
    return [dbt_model_key(model) for model in _models()]


def fct_impressions_key() -> dg.AssetKey:
    """The asset key of marts.fct_impressions (what labeling and the GX gate depend on)."""
    return dbt_model_key("fct_impressions")
