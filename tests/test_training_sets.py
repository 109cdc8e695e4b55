"""Training sets out: the assistant's SFT and preference datasets from one real cycle (DuckDB file,
dbt, MLflow store, Dagster instance) with planted events: a consent-denied interaction, personal
data in an input and an edit, and a session with a reformulation and a regeneration."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import datasets
import mlflow
import polars as pl
import pytest
import yaml

from flywheel_pipeline import privacy, training_sets
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import ConfigError, parse_config
from flywheel_pipeline.defs.training_sets import training_set_keys
from flywheel_pipeline.home import Home
from flywheel_pipeline.warehouses import Warehouses
from tests.conftest import REPO
from tests.test_accumulation import interaction, signal
from tests.test_pipeline import DOMAIN, FIRST, metadata
from tests.test_privacy import CANARIES, DENIED, files_holding

pytestmark = pytest.mark.slow  # reads the assistant cycle (conftest)

PLANTED_DAY = FIRST + timedelta(days=3)  # in the training window
EMAIL = CANARIES["EMAIL_ADDRESS"]
QUESTION = f"how do I reset my password? write to {EMAIL}"
KEYS = training_set_keys(DOMAIN)


def at(time: str) -> str:
    return f"{PLANTED_DAY.isoformat()}T{time}Z"


def liked(event_id: str, interaction_id: str, time: str, user: str, session: str) -> list[dict]:
    """Accepted, copied and rated 5: labelled good."""
    who = {"user_id": user, "session_id": session, "interaction_id": interaction_id}
    return [signal(f"{event_id}a", timestamp=at(f"{time}:10"), signal_type="accept", **who),
            signal(f"{event_id}c", timestamp=at(f"{time}:15"), signal_type="copy", **who),
            signal(f"{event_id}r", timestamp=at(f"{time}:20"), signal_type="rating", value=5, **who)]


def served(event_id: str, time: str, user: str, session: str, text: str, response: str, **fields) -> dict:
    return interaction(event_id, user_id=user, session_id=session, timestamp=at(f"{time}:00"), input=text,
                       impressions=[{"item_id": f"r_{event_id}", "position": 0, "propensity": 1.0,
                                     "content": response}], **fields)


def planted_events() -> list[dict]:
    """u_pairs asks, gets a bad answer, edits it (with an email), reformulates (a good answer),
    then asks again (a good answer); u_denied's liked interaction is consent-denied."""
    pairs = {"user": "u_pairs", "session": "s_pairs"}
    who = {"user_id": "u_pairs", "session_id": "s_pairs", "interaction_id": "i_p1"}
    return [
        served("p1", "10:00", **pairs, text=QUESTION, response="Try turning it off and on again."),
        signal("p1j", timestamp=at("10:00:05"), signal_type="reject", **who),
        signal("p1f", timestamp=at("10:00:10"), signal_type="reformulate", text="how can I reset my password", **who),
        signal("p1r", timestamp=at("10:00:20"), signal_type="rating", value=1, **who),
        signal("p1e", timestamp=at("10:00:30"), signal_type="edit", text=f"Ask {EMAIL} to reset it.", **who),
        served("p2", "10:01", **pairs, text="how can I reset my password",
               response="Open Settings, then Security, then Reset password."),
        *liked("p2", "i_p2", "10:01", "u_pairs", "s_pairs"),
        served("p3", "10:05", **pairs, text=QUESTION, response="Settings > Security > Reset password."),
        *liked("p3", "i_p3", "10:05", "u_pairs", "s_pairs"),
        served("d1", "11:00", "u_denied", "s_denied", text=f"please {DENIED}", response=DENIED, consent="denied"),
        *liked("d1", "i_d1", "11:00", "u_denied", "s_denied"),
        signal("d1e", user_id="u_denied", session_id="s_denied", interaction_id="i_d1", timestamp=at("11:00:40"),
               signal_type="edit", text=DENIED),
    ]


def plant(home: Home) -> None:
    """The planted events, in their day's batch."""
    with home.landing_file(DOMAIN, PLANTED_DAY.isoformat()).open("a") as batch:
        batch.writelines(json.dumps(event) + "\n" for event in planted_events())


@pytest.fixture(scope="module")
def cycle(assistant_cycle):
    """test_pipeline's assistant cycle, whose simulated days hold the planted events (conftest)."""
    return assistant_cycle


def load(path, cache, **files) -> datasets.Dataset:
    """``path`` as the Hugging Face datasets library loads it (``files``: the JSONL loader's); a
    cache of its own each time (the sets' folders have the same name)."""
    if files:
        return datasets.load_dataset("json", split="train", cache_dir=str(cache / "json"), **files)
    return datasets.load_dataset(str(path), split="train", cache_dir=str(cache / "folder"))


def test_both_sets_load_with_hugging_face_datasets_and_match_their_cards(cycle, tmp_path):
    assert cycle.result.success
    for name, key in KEYS.items():
        exported = metadata(cycle.result, key)
        path = cycle.home.training_set(DOMAIN, name, f"{exported['train_start']}_{exported['train_end']}")
        assert exported["path"] == str(path)
        jsonl = load(path, tmp_path / name, data_files=str(path / training_sets.JSONL))
        parquet = load(path, tmp_path / name)  # the card's configs point at the Parquet file
        card = training_sets.read_card(path)
        assert jsonl.num_rows == parquet.num_rows == card["records"] == exported["records"] > 0
        assert card["windows"]["train_end"] < card["windows"]["holdout_start"]
        assert all(exported["train_start"] <= str(day) <= exported["train_end"] for day in parquet["event_date"])
        assert card["label_model_version"] and card["label_sources"]
        if name == training_sets.SFT:
            assert {tuple(m["role"] for m in messages) for messages in jsonl["messages"]} == {("user", "assistant")}
            assert min(parquet["p_good"]) >= card["filters"]["sft_min_p_good"]
        else:
            assert all(row["chosen"] != row["rejected"] for row in jsonl)
            assert card["sources"] == {s: jsonl["source"].count(s) for s in training_sets.PAIR_SOURCES}


def test_pairs_come_from_the_planted_edit_reformulation_and_regeneration(cycle):
    path = Path(metadata(cycle.result, KEYS[training_sets.PREFERENCE])["path"])
    pairs = pl.read_parquet(path / training_sets.PARQUET)
    planted = pairs.filter(pl.col("interaction_id") == "i_p1").sort("source")
    prompt = QUESTION.replace(EMAIL, "<EMAIL_ADDRESS>")
    assert planted.select("source", "prompt", "chosen", "rejected").rows() == [
        ("edit", prompt, "Ask <EMAIL_ADDRESS> to reset it.", "Try turning it off and on again."),
        ("reformulation", prompt, "Open Settings, then Security, then Reset password.",
         "Try turning it off and on again."),
        ("regeneration", prompt, "Settings > Security > Reset password.", "Try turning it off and on again."),
    ]


def test_no_consent_denied_or_personal_text_is_exported(cycle):
    home = cycle.home
    assert list(home.datasets.rglob(training_sets.JSONL))
    assert not files_holding(home.datasets, DENIED, EMAIL, "i_d1", "u_pairs")


def test_the_mlflow_run_records_each_set_as_a_dataset_input(cycle):
    run_id = metadata(cycle.result, KEYS[training_sets.SFT])["mlflow_run_id"]
    run = mlflow.MlflowClient(cycle.home.mlflow_tracking_uri).get_run(run_id)
    inputs = {(i.dataset.name, json.loads(i.dataset.source)["uri"]) for i in run.inputs.dataset_inputs}
    assert inputs == {(f"{DOMAIN}-{name}-{Path(path).name}", path)
                      for name, path in ((name, metadata(cycle.result, key)["path"]) for name, key in KEYS.items())}
    artifacts = {a.path for name in KEYS for a in mlflow.MlflowClient(cycle.home.mlflow_tracking_uri)
                 .list_artifacts(run_id, name)}
    assert artifacts == {f"{name}/{training_sets.CARD}" for name in KEYS}


def test_config_errors_name_the_training_sets_key():
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"]["assistant"]["training_sets"]["sft_min_p_good"] = 0.3
    with pytest.raises(ConfigError, match=r"domains\.assistant\.training_sets\.sft_min_p_good: Input should be"):
        parse_config(raw)
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"]["recommendation"]["training_sets"] = {"sft_min_p_good": 0.95}
    with pytest.raises(ConfigError, match="training_sets: only an assistant domain"):
        parse_config(raw)


def test_a_failed_write_leaves_the_previous_set_whole(tmp_path, monkeypatch):
    home = Home(tmp_path)
    card = {"domain": DOMAIN, "dataset": training_sets.SFT, "format": "f", "records": 1, "label_model_version": "v",
            "windows": {"train_start": "a", "train_end": "b", "holdout_start": "c", "holdout_end": "d"},
            "redaction": "r", "consent": "c"}
    path = home.training_set(DOMAIN, training_sets.SFT, "a_b")
    training_sets._write_folder(path, pl.DataFrame({"user_hash": ["h1"]}), card)
    monkeypatch.setattr(pl.DataFrame, "write_ndjson", lambda *args: 1 / 0)

    with pytest.raises(ZeroDivisionError):
        training_sets._write_folder(path, pl.DataFrame({"user_hash": ["h2"]}), card)

    assert pl.read_parquet(path / training_sets.PARQUET)["user_hash"].to_list() == ["h1"]
    assert [p.name for p in path.parent.iterdir()] == ["a_b"]


def test_forget_rewrites_the_sets_without_the_user(cycle, monkeypatch, capsys):  # last: it deletes u_pairs
    home = cycle.home
    folders = {name: Path(metadata(cycle.result, key)["path"]) for name, key in KEYS.items()}
    before = {name: pl.read_parquet(path / training_sets.PARQUET) for name, path in folders.items()}
    theirs = {name: records.filter(pl.col("user_hash") == privacy.user_hash("u_pairs")).height
              for name, records in before.items()}
    assert theirs[training_sets.PREFERENCE] == 3 and theirs[training_sets.SFT] >= 1
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))

    main(["forget", "--user", "u_pairs"])

    assert f"{theirs[training_sets.PREFERENCE]:>8,} records" in capsys.readouterr().out
    for name, path in folders.items():
        after = pl.read_parquet(path / training_sets.PARQUET)
        assert after.height == before[name].height - theirs[name] == training_sets.read_card(path)["records"]
        assert privacy.user_hash("u_pairs") not in after["user_hash"].to_list()
        assert len((path / training_sets.JSONL).read_text().splitlines()) == after.height


def test_retention_rewrites_the_sets_without_the_expired_days(cycle):  # after forgetting: it deletes days
    home, config = cycle.home, cycle.config
    cutoff = PLANTED_DAY + timedelta(days=1)
    retention = config.domain(DOMAIN).retention_days
    report = privacy.enforce_retention(home, DOMAIN, retention, cutoff + timedelta(days=retention),
                                       Warehouses(home).for_deletion)

    assert report.domain == DOMAIN and report.metadata()[f"{DOMAIN}_dataset_records_deleted"] > 0
    for key in KEYS.values():
        path = Path(metadata(cycle.result, key)["path"])
        records, card = pl.read_parquet(path / training_sets.PARQUET), training_sets.read_card(path)
        assert records["event_date"].min() >= cutoff and card["records"] == records.height
        assert card["records_removed"]["retention"] == report.dataset_records_deleted[str(path.relative_to(home.datasets))]
