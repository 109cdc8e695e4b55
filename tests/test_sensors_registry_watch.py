"""The registry watch (issue 25): a serving alias moved directly in MLflow is found on the next tick,
shown by `flywheel status` and the registry_matches_log check, and put back (registry_watch: revert,
the default) or alerted and left (alert). The sensor evaluated with a real Dagster instance; then
through the real daemon, as a deployment runs it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from flywheel_pipeline import approval, deployment_log, registry
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.registry_watch import CHECK, build_registry_watch, serving_aliases
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import local_dagster
from tests.conftest import REPO
from tests.signing import signed, ssh_key, write_config
from tests.test_approval import candidate

DOMAIN, APPROVER = "recommendation", "recsys-lead"
NAME = registry.model_name(DOMAIN)
WEBHOOK_ENV = "FLYWHEEL_TEST_WEBHOOK"


def project_config(path: Path, key_file: Path, **settings: object) -> Path:
    """The repository's flywheel.yaml, the approver's key declared, alerts to the test's webhook,
    and ``settings`` (e.g. registry_watch, daemon) over it."""
    raw = {**yaml.safe_load((REPO / "flywheel.yaml").read_text()), "alerts": {"webhook_url_env": WEBHOOK_ENV}}
    for name, value in settings.items():
        raw[name] = {**raw[name], **value} if isinstance(value, dict) else value
    return write_config(path, {APPROVER: key_file}, raw)


@pytest.fixture
def project(home, tmp_path, monkeypatch, webhook):
    """A home whose recommendation champion (v1) was deployed through flywheel, a genuine v2 waiting,
    the commands pointed at it, alerts posted to a local webhook."""
    key_file = ssh_key(tmp_path / "keys", APPROVER)
    config_file = project_config(tmp_path / "flywheel.yaml", key_file)
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # recorded first: what the home sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config_file))
    url, received = webhook
    monkeypatch.setenv(WEBHOOK_ENV, url)
    resources = {"warehouse": WarehouseResource(home_path=str(home.root), config_path=str(config_file)),
                 "mlflow": MlflowResource(home_path=str(home.root))}
    client, key = resources["mlflow"].client(), approval.signing_key(home)
    first, second = candidate(client, key), candidate(client, key)
    signature = signed(home.approvals, client, key_file, DOMAIN, first)
    with resources["warehouse"].approvals() as con:
        record = approval.record_decision(con, client, load_config(config_file), key, DOMAIN, first, "approved",
                                          APPROVER, signature=signature)
        approval.deploy(con, client, load_config(config_file), key, record.approval_id)
    return {"resources": resources, "client": client, "key_file": key_file, "received": received,
            "first": first, "second": second, "tmp": tmp_path, "home": home}


def tick(project, instance, cursor: str | None = None, **settings: object) -> dg.SensorResult:
    """One tick of the registry watch built from the project's flywheel.yaml with ``settings`` over it."""
    config_file = project_config(project["tmp"] / "tick.yaml", project["key_file"], **settings)
    sensor = build_registry_watch(load_config(config_file))
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=project["resources"])
    return sensor(context)


def status(capsys) -> str:
    main(["status"])
    return " ".join(capsys.readouterr().out.split())  # the console wraps long lines


def reported(result: dg.SensorResult, domain: str = DOMAIN) -> list[tuple[bool, str]]:
    return [(event.passed, event.metadata["registry"].value) for event in result.asset_events
            if event.asset_key == serving_aliases(domain) and event.check_name == CHECK]


def champion(project) -> str | None:
    return registry.alias_version(project["client"], DOMAIN, registry.CHAMPION)


def test_an_alias_moved_in_mlflow_is_put_back_on_the_next_tick(project, capsys):
    client, first, second = project["client"], project["first"], project["second"]
    with dg.instance_for_test() as instance:
        quiet = tick(project, instance)
        [(passed, text)] = reported(quiet)
        assert passed and text.startswith("matches the signed deployment log (entry 1, ")
        assert text.endswith(f"deployed (approval 1): champion=v{first}, previous=none, holdback=none)")
        assert reported(quiet, "assistant") == [(True, "matches the signed deployment log (nothing deployed)")]

        client.set_registered_model_alias(NAME, registry.CHAMPION, second)  # one MLflow call, no flywheel
        client.set_registered_model_alias(NAME, registry.HOLDBACK, second)
        shown = status(capsys)
        assert f"{NAME}: champion=v{second}" in shown  # what the registry says...
        assert (f"registry: MISMATCH {NAME}: champion=v{second}, holdback=v{second} was set outside flywheel; "
                f"the signed deployment log says champion=v{first}, previous=none, holdback=none") in shown

        moved = tick(project, instance, cursor=quiet.cursor)
        [(passed, text)] = reported(moved)
        assert not passed and "put back (registry_watch: revert" in text and f"champion=v{second}" in text
        assert champion(project) == first
        assert registry.alias_version(client, DOMAIN, registry.HOLDBACK) is None
        [alert] = project["received"]
        assert alert["kind"] == "registry" and f"champion=v{second}" in alert["text"]
        shown = status(capsys)
        assert f"champion=v{first}" in shown and "registry: matches the signed deployment log; last put back:" in shown
        assert f"found champion=v{second}, previous=none, holdback=v{second}" in shown

        after = tick(project, instance, cursor=moved.cursor)
        assert [passed for passed, _ in reported(after)] == [True]  # the check is green again
        assert len(project["received"]) == 1


def test_with_registry_watch_alert_the_alias_stays_moved_alerted_once_and_nothing_deploys_over_it(project):
    client, first, second = project["client"], project["first"], project["second"]
    resources, key = project["resources"], approval.signing_key(project["home"])
    with dg.instance_for_test() as instance:
        cursor = tick(project, instance, registry_watch="alert").cursor
        client.set_registered_model_alias(NAME, registry.CHAMPION, second)

        moved = tick(project, instance, cursor, registry_watch="alert")
        [(passed, text)] = reported(moved)
        assert not passed and "left as found (registry_watch: alert)" in text
        assert champion(project) == second and len(project["received"]) == 1
        again = tick(project, instance, moved.cursor, registry_watch="alert")
        assert reported(again) == [] and len(project["received"]) == 1  # said once, still failed

        config = load_config(resources["warehouse"].config_path)
        third = candidate(client, key)
        signature = signed(project["home"].approvals, client, project["key_file"], DOMAIN, third)
        with resources["warehouse"].approvals() as con:
            record = approval.record_decision(con, client, config, key, DOMAIN, third, "approved", APPROVER,
                                              signature=signature)
            with pytest.raises(approval.ApprovalError, match=f"champion=v{second} was set outside flywheel"):
                approval.deploy(con, client, config, key, record.approval_id)
            with pytest.raises(approval.ApprovalError, match="Nothing deploys or rolls back over it"):
                approval.rollback(con, client, key, DOMAIN)

        client.set_registered_model_alias(NAME, registry.CHAMPION, first)  # a person puts it back
        back = tick(project, instance, again.cursor, registry_watch="alert")
        assert [passed for passed, _ in reported(back)] == [True]


def test_a_changed_deployment_log_fails_the_tick_naming_the_entry(project):
    with project["resources"]["warehouse"].approvals() as con:
        con.execute("UPDATE registry.deployment_log SET champion = ?", [project["second"]])
    with dg.instance_for_test() as instance, pytest.raises(
            deployment_log.LogError, match="deployment log entry 1 breaks the log's chain"):
        tick(project, instance)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_daemon_puts_a_moved_champion_back_within_one_tick(project, monkeypatch):
    """Through the Dagster daemon, as `make ui` or a deployment runs it: a code server and the daemon
    for the home, the sensor on its interval (daemon.registry_watch_seconds: 5)."""
    client, first, second, home = project["client"], project["first"], project["second"], project["home"]
    config_file = project_config(project["tmp"] / "flywheel.yaml", project["key_file"],
                                 daemon={"registry_watch_seconds": 5})
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config_file))
    Home(home.root).activate()
    with (project["tmp"] / "services.log").open("a") as log, local_dagster(home, log) as dagster:
        check = dg.AssetCheckKey(serving_aliases(DOMAIN), CHECK)
        storage = dagster.instance.event_log_storage
        wait_until(lambda: storage.get_latest_asset_check_execution_by_key([check]), "the first tick", 240)
        client.set_registered_model_alias(NAME, registry.CHAMPION, second)
        moved, moved_at = time.monotonic(), time.time()
        wait_until(lambda: champion(project) == first, "the champion put back", 60)
        print(f"\nchampion moved in MLflow -> put back by the daemon's registry_watch in {time.monotonic() - moved:.1f}s",
              file=sys.__stdout__)
        def statuses() -> list[str]:  # the check's evaluations as the UI lists them, oldest first
            return [e.status.value for e in reversed(storage.get_asset_check_execution_history(check, limit=10))]

        wait_until(lambda: "FAILED" in statuses(), "the check failed", 60)  # reported as the tick ends
        wait_until(lambda: statuses()[-1] == "SUCCEEDED", "the check green again", 60)
        assert statuses() == ["SUCCEEDED", "FAILED", "SUCCEEDED"]  # reported when what it found changed
    ticks = sorted(dagster.instance.get_ticks(*_sensor_ids(dagster.instance), limit=100), key=lambda t: t.timestamp)
    assert ticks and not [t for t in ticks if t.is_failure]
    [put_back] = [t for t in ticks if "put back" in (t.skip_reason or "")]
    assert not [t for t in ticks if moved_at < t.timestamp < put_back.timestamp]  # the first tick after the move


def _sensor_ids(instance: dg.DagsterInstance) -> tuple[str, str]:
    (state,) = [s for s in instance.all_instigator_state() if s.name == "registry_watch"]
    return state.instigator_origin_id, state.selector_id


def wait_until(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f}s"
        time.sleep(0.5)
    return result


def test_a_domain_deployed_before_the_log_is_compared_from_its_next_deployment(project, capsys):
    """A home upgraded from a flywheel without the log: its deployments are in registry.deployments
    only, so what the registry holds cannot be told from a forgery until flywheel deploys again."""
    with project["resources"]["warehouse"].approvals() as con:
        con.execute("DELETE FROM registry.deployment_log")
    project["client"].set_registered_model_alias(NAME, registry.CHAMPION, project["second"])
    with dg.instance_for_test() as instance:
        assert reported(tick(project, instance)) == [(True, deployment_log.UNLOGGED)]
    assert champion(project) == project["second"] and f"registry: {deployment_log.UNLOGGED}" in status(capsys)
