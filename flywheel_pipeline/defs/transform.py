"""Quality filtering as Dagster assets: the dbt project in dbt_project/, run with `dbt build`.

Every dbt model is an asset in group ``quality_filtering`` and every dbt test an asset check on its
model (a failed test fails the check and the run). The dbt sources (schema ``raw``) all map to one
upstream asset, accumulation's ``raw_events``. The dbt assets are unpartitioned: each run rebuilds
staging, intermediate and marts from every raw row. dbt dies with the run's process: a killed run
does not leave it writing, holding the warehouse's lock.
"""


import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.execution.scripts import watch_orphans
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliInvocation,
    DbtCliResource,
    DbtProject,
    dbt_assets,
    get_asset_key_for_model,
)

from flywheel_pipeline.home import HOME_ENV, Home

DBT_PROJECT_DIR = Path(__file__).resolve().parents[2] / "dbt_project"
# The venv's dbt, found without activating the venv.
DBT_EXECUTABLE = Path(sys.executable).with_name("dbt")
RAW_EVENTS = dg.AssetKey("raw_events")
GROUP = "quality_filtering"


class FlywheelDbtTranslator(DagsterDbtTranslator):
    """Models go to group quality_filtering; every source on schema raw is raw_events."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        if dbt_resource_props["resource_type"] == "source" and dbt_resource_props["schema"] == "raw":
            return RAW_EVENTS
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str:
        return GROUP


class FlywheelDbtResource(DbtCliResource):
    """A DbtCliResource whose dbt builds the warehouse of one home (FLYWHEEL_HOME=home_path)."""

    home_path: str

    def cli(self, args: Sequence[str], **kwargs: Any) -> DbtCliInvocation:
        # dagster-dbt hands dbt a copy of this process's environment, taken inside cli().
        with _environ(HOME_ENV, self.home_path):
            return super().cli(args, **kwargs)


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


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


def dbt_resource(home: Home) -> FlywheelDbtResource:
    """The `dbt` resource: the project in dbt_project/, building ``home``'s warehouse."""
    return FlywheelDbtResource(
        project_dir=dbt_project, dbt_executable=str(DBT_EXECUTABLE), home_path=str(home.root)
    )


def _prepare(project: DbtProject) -> DbtProject:
    """Write target/manifest.json with `dbt parse`: under `dagster dev`, or when it is missing
    (a fresh clone), so `dagster definitions validate` works without a manual step."""
    if project.preparer.using_dagster_dev() or not project.manifest_path.exists():
        parser = DbtCliResource(project_dir=project, dbt_executable=str(DBT_EXECUTABLE))
        parser.cli(["parse", "--quiet"], target_path=project.target_path).wait()
    return project


dbt_project = _prepare(DbtProject(project_dir=DBT_PROJECT_DIR))


@dbt_assets(
    manifest=dbt_project.manifest_path,
    project=dbt_project,
    dagster_dbt_translator=FlywheelDbtTranslator(
        settings=DagsterDbtTranslatorSettings(enable_duplicate_source_asset_keys=True)
    ),
)
def flywheel_dbt_assets(context: dg.AssetExecutionContext, dbt: DbtCliResource):
    """Rebuild staging -> intermediate -> marts and run every dbt test (one asset check each)."""
    invocation = dbt.cli(["build"], context=context)
    with dies_with_this_process(invocation.process):
        yield from invocation.stream()


def fct_impressions_key() -> dg.AssetKey:
    """The asset key of marts.fct_impressions (what labeling and the GX gate depend on)."""
    return get_asset_key_for_model([flywheel_dbt_assets], "fct_impressions")
