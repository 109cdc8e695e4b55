"""flywheel.yaml: the shipped file is valid; a bad key is named in the error."""

from __future__ import annotations

import copy

import pytest
import yaml

from flywheel_pipeline.config import ConfigError, load_config, parse_config
from tests.conftest import REPO

RAW = yaml.safe_load((REPO / "flywheel.yaml").read_text())


def broken(path: list[str], value: object) -> dict:
    raw = copy.deepcopy(RAW)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


def test_shipped_config_has_a_weekly_and_a_quarterly_domain():
    config = load_config(REPO / "flywheel.yaml")
    cadences = {name: domain.cadence for name, domain in config.domains.items()}
    assert "weekly" in cadences.values() and "quarterly" in cadences.values()
    assert config.domain("assistant").cron == "0 3 * * 1"


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (["domains", "assistant", "gate", "min_samples"], 0, "domains.assistant.gate.min_samples"),
        (["domains", "assistant", "cadence"], "fortnightly", "domains.assistant.cadence"),
        (["domains", "recommendation", "automation"], "yolo", "domains.recommendation.automation"),
        (["domains", "assistant", "holdout_dayz"], 3, "domains.assistant.holdout_dayz"),
        (["partitions_start"], "not a date", "partitions_start"),
        (["warehouse", "memory_limit"], "lots", "warehouse.memory_limit"),
        (["warehouse", "dbt_threads"], 0, "warehouse.dbt_threads"),
        (["warehouse", "engine"], "bigquery", "warehouse.engine"),
    ],
)
def test_bad_key_is_named(path, value, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_config(broken(path, value))


@pytest.mark.parametrize(
    ("path", "value", "why"),
    [
        (["domains", "assistant", "holdout_days"], 30, "exceed lookback_days (28)"),
        (["domains", "recommendation", "approvers"], [], "a domain at automation 'oversight' needs at least one approver"),
        (["domains", "assistant", "approvers"], ["flywheel:auto"], "the pipeline's own identity"),
        (["domains", "assistant", "approvers"], [" "], "a person's non-blank name"),
        (["domains", "assistant", "label_maturity", "outcome"], "resolvd", "one of ['resolved', 'purchase', 'click']"),
    ],
)
def test_cross_field_rules_name_the_key(path, value, why):
    with pytest.raises(ConfigError) as error:
        parse_config(broken(path, value))
    assert f"{'.'.join(path)}: " in str(error.value) and why in str(error.value)


def test_an_auto_domain_may_have_no_approver():
    assert parse_config(broken(["domains", "assistant", "approvers"], [])).domain("assistant").approvers == []


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_domain_lookup_names_the_configured_ones():
    with pytest.raises(ConfigError, match="configured: \\['assistant', 'recommendation'\\]"):
        load_config(REPO / "flywheel.yaml").domain("search")


def test_retention_shorter_than_the_training_and_held_out_windows_is_refused():
    with pytest.raises(ConfigError, match=r"domains\.assistant.*retention_days \(20\) must be at least "
                                          r"lookback_days \+ holdout_days \(35\)"):
        parse_config(broken(["domains", "assistant", "retention_days"], 20))


@pytest.mark.parametrize(
    ("warehouse", "named"),
    [
        ({"engine": "spark"}, "warehouse: .*root: engine spark keeps its tables under a root"),
        ({"engine": "spark", "root": "gs://lake/flywheel"}, "warehouse: .*root: s3://bucket/prefix or a folder"),
        ({"root": "s3://lake/flywheel"}, "warehouse: .*engine: root, spark_root and endpoint_url are for engine spark"),
        ({"engine": "spark", "root": "s3://lake", "endpoint_url": "minio:9000"}, r"warehouse\.endpoint_url"),
    ],
)
def test_the_distributed_profile_names_its_bad_key(warehouse, named):
    raw = copy.deepcopy(RAW)
    raw["warehouse"] = {**raw["warehouse"], **warehouse}
    with pytest.raises(ConfigError, match=named):
        parse_config(raw)
    assert parse_config({**raw, "warehouse": {"engine": "spark", "root": "s3://lake/flywheel"}}).warehouse.engine == "spark"
