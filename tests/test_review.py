"""The review loop: the review queue (audit slice + uncertainty), its Label Studio / Argilla files, reviews
imported back as `label` events, the late-label backfill they trigger, and validation's gold."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import duckdb
import polars as pl
import pytest

from flywheel_pipeline import simulation, warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import ConfigError, Groups, ReviewQueue, parse_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.assets import LABELS
from flywheel_pipeline.defs.review import REVIEW_QUEUE
from flywheel_pipeline.defs.transform import RAW_EVENTS, dbt_model_keys
from flywheel_pipeline.importers.base import Rejected
from flywheel_pipeline.importers.reviews import read_argilla, read_label_studio
from flywheel_pipeline.review import expire, forget_user, queue_for_review, review_folder
from flywheel_pipeline.simulation.reviewers import answer_review_queue
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation.evidence import holdout_rows

DOMAIN = "assistant"
DAYS = [date(2026, 5, 1), date(2026, 5, 2)]
NOW = datetime(2026, 5, 3, tzinfo=UTC)


# --- the queue, on a hand-built warehouse -------------------------------------------------------------

def impressions(per_day: int) -> pl.DataFrame:
    """per_day impressions a day, p_good spread over [0, 1) (every 10th unlabelled)."""
    rows = [{"domain": DOMAIN, "event_date": day, "interaction_id": f"i-{day:%d}-{n}", "item_id": "r0",
             "position": 0, "user_id": f"u{n}", "session_id": f"s{n}", "input_text": f"question {n}",
             "item_content": f"answer {n}", "segment": "minority" if n % 20 == 0 else "majority",
             "p_good": None if n % 10 == 9 else (n * 37 % per_day) / per_day}
            for day in DAYS for n in range(per_day)]
    return pl.DataFrame(rows)


@pytest.fixture
def con(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    warehouse.ensure_raw_tables(connection)
    connection.execute("CREATE SCHEMA marts; CREATE SCHEMA labels")
    fill(connection, impressions(200))
    yield connection
    connection.close()


def fill(connection: duckdb.DuckDBPyConnection, frame: pl.DataFrame) -> None:
    connection.register("frame", frame)
    connection.execute("CREATE OR REPLACE TABLE marts.fct_impressions AS SELECT * EXCLUDE (p_good) FROM frame")
    connection.execute("CREATE OR REPLACE TABLE labels.impression_labels AS "
                       "SELECT domain, event_date, interaction_id, item_id, p_good FROM frame")
    connection.unregister("frame")


def queue_rows(connection) -> pl.DataFrame:
    return connection.sql("SELECT * FROM labels.review_queue ORDER BY ALL").pl()


def review(connection, interaction_id: str, selection: str | None = None) -> None:
    """A review of one impression landed in raw.labels."""
    connection.execute(
        "INSERT INTO raw.labels VALUES ('e-' || ?, ?, ?, ?, 'u', 's', ?, 'r0', 'rev', 'good', 'f', 1, ?, ?)",
        [interaction_id, DOMAIN, DAYS[0], NOW.replace(tzinfo=None), interaction_id, NOW.replace(tzinfo=None),
         selection])


BUDGET = ReviewQueue(daily_budget=20, audit_fraction=0.25)


@pytest.mark.parametrize("key, value", [("daily_budget", -1), ("audit_fraction", 1.5), ("per_week", 3)])
def test_a_bad_review_setting_is_named(key, value):
    from tests.test_config import broken

    with pytest.raises(ConfigError, match=rf"domains\.assistant\.review\.{key}"):
        parse_config(broken(["domains", "assistant", "review", key], value))


def test_each_day_queues_its_budget_an_audit_slice_and_the_impressions_nearest_one_half(con, tmp_path):
    report = queue_for_review(con, tmp_path, DOMAIN, DAYS, BUDGET, now=NOW)
    queued = queue_rows(con)
    assert queued.group_by("event_date", "selection").len().sort("event_date", "selection").rows() == [
        (DAYS[0], "audit", 5), (DAYS[0], "uncertainty", 15), (DAYS[1], "audit", 5), (DAYS[1], "uncertainty", 15)]
    assert report.day_metadata(DAYS[0])["pending"] == 20
    labelled = con.sql("SELECT * FROM labels.impression_labels").pl().filter(pl.col("p_good").is_not_null())
    for day in DAYS:
        uncertain = queued.filter((pl.col("event_date") == day) & (pl.col("selection") == "uncertainty"))
        others = labelled.filter(pl.col("event_date") == day).join(
            queued.filter(pl.col("event_date") == day), on="interaction_id", how="anti")
        distance = (pl.col("p_good") - 0.5).abs()
        assert uncertain.select(distance.max()).item() <= others.select(distance.min()).item()


def test_a_stratified_audit_slice_gives_each_protected_group_its_minimum_and_weighs_it_back(con, tmp_path):
    """A 5% minority would get 0 of a 10-review slice (its share rounds to 0); protected with min_reviews 4 it gets
    4 a day, the rest 6, and the design weights give each stratum back its share of the day."""
    budget = ReviewQueue(daily_budget=20, audit_fraction=0.5)
    queue_for_review(con, tmp_path, DOMAIN, DAYS, budget, now=NOW)
    plain = queue_rows(con).filter(pl.col("selection") == "audit")
    assert plain["design_weight"].to_list() == [1.0] * 20
    groups = Groups(protected=["minority"], min_reviews=4)
    queue_for_review(con, tmp_path, DOMAIN, DAYS, budget, now=NOW, groups=groups)
    audit = queue_rows(con).filter(pl.col("selection") == "audit").join(
        impressions(200).select("event_date", "interaction_id", "segment"), on=["event_date", "interaction_id"])
    per_day = audit.group_by("event_date", "segment").agg(pl.len(), pl.col("design_weight").unique())
    assert sorted(per_day.iter_rows()) == [(day, segment, n, [weight]) for day in DAYS for segment, n, weight in
                                          (("majority", 6, (190 / 6) / (200 / 10)), ("minority", 4, (10 / 4) / (200 / 10)))]
    weighted = audit.group_by("event_date").agg(
        minority=((pl.col("segment") == "minority") * pl.col("design_weight")).sum() / pl.col("design_weight").sum())
    assert weighted["minority"].to_list() == pytest.approx([10 / 200] * 2)  # the day's true share, not 4/10
    within = audit.filter(pl.col("segment") == "minority")["interaction_id"].to_list()
    first_in_audit_order = con.sql(
        """SELECT interaction_id FROM (SELECT interaction_id, event_date, md5(concat_ws(':', 'flywheel-review-audit',
                   domain, interaction_id, item_id)) AS o FROM marts.fct_impressions WHERE segment = 'minority')
            QUALIFY row_number() OVER (PARTITION BY event_date ORDER BY o) <= 4""").pl()["interaction_id"].to_list()
    assert sorted(within) == sorted(first_in_audit_order)  # uniform within the stratum


def test_validation_weighs_a_verdict_by_its_design_weight(con, tmp_path):
    """holdout_rows carries each audit verdict's design weight (1 where the queue did not stratify)."""
    queue_for_review(con, tmp_path, DOMAIN, DAYS, ReviewQueue(daily_budget=20, audit_fraction=0.5), now=NOW,
                     groups=Groups(protected=["minority"], min_reviews=4))
    frame = impressions(200).with_columns(
        propensity=1.0, policy=pl.lit("champion"), model_version=pl.lit("baseline"),
        served_at=pl.col("event_date").cast(pl.Datetime("us")), is_new_user=False, context_features=pl.lit("{}"),
        slate_size=1, clicked=False, outcome_name=pl.lit(None, pl.String), outcome_value=pl.lit(None, pl.Float64),
        audit_review_value=pl.lit(1.0))
    fill(con, frame)
    con.execute("ALTER TABLE labels.impression_labels ADD COLUMN label BOOLEAN")
    held_out = holdout_rows(con, DOMAIN, Windows(DAYS[0], DAYS[0], DAYS[1], DAYS[1]))
    queued = queue_rows(con).filter((pl.col("selection") == "audit") & (pl.col("event_date") == DAYS[1]))
    weights = dict(held_out.select("interaction_id", "verdict_weight").iter_rows())
    assert {weights[i] for i in queued["interaction_id"]} == {(190 / 6) / 20, (10 / 4) / 20}
    assert {w for i, w in weights.items() if i not in set(queued["interaction_id"])} == {1.0}


def test_the_audit_slice_is_uniform_whatever_the_label_model_says(con, tmp_path):
    """The audit slice is the same when every p_good changes (it never looks at them), and over many
    days it holds confident and unlabelled impressions in their share of the day."""
    queue_for_review(con, tmp_path, DOMAIN, DAYS, BUDGET, now=NOW)
    audit = queue_rows(con).filter(pl.col("selection") == "audit").select("interaction_id")
    flipped = impressions(200).with_columns(pl.col("p_good").reverse())
    fill(con, flipped)
    queue_for_review(con, tmp_path, DOMAIN, DAYS, BUDGET, now=NOW)
    assert queue_rows(con).filter(pl.col("selection") == "audit").select("interaction_id").equals(audit)

    many_days = [date(2026, 6, 1) + timedelta(days=d) for d in range(100)]
    frame = pl.concat([impressions(40).with_columns(event_date=pl.lit(day), interaction_id=pl.col("interaction_id")
                                                    + f"-{day:%m%d}") for day in many_days])
    fill(con, frame)
    queue_for_review(con, tmp_path, DOMAIN, many_days, ReviewQueue(daily_budget=8, audit_fraction=0.5), now=NOW)
    picked = queue_rows(con).filter(pl.col("selection") == "audit").join(
        frame.select("interaction_id", "p_good"), on="interaction_id")
    assert picked.height == 400
    confident = (pl.col("p_good") - 0.5).abs() > 0.4
    expected = frame.select(confident.mean()).item()  # 0.2 of the impressions
    assert abs(picked.select(confident.mean()).item() - expected) < 0.06  # 3 binomial SEs at n = 400
    assert abs(picked.select(pl.col("p_good").is_null().mean()).item() - 0.1) < 0.05


def test_reviewed_impressions_are_never_queued_again_and_a_rerun_replaces_the_partition(con, tmp_path):
    queue_for_review(con, tmp_path, DOMAIN, DAYS, BUDGET, now=NOW)
    first = queue_rows(con)
    again_at = NOW + timedelta(hours=1)
    queue_for_review(con, tmp_path, DOMAIN, DAYS, BUDGET, now=again_at)
    assert queue_rows(con).equals(first)  # idempotent, queued_at kept

    day0 = first.filter(pl.col("event_date") == DAYS[0])
    done = day0.filter(pl.col("selection") == "uncertainty")["interaction_id"][0]
    review(con, done, "uncertainty")
    audited_by_the_product = (con.sql("SELECT interaction_id FROM marts.fct_impressions WHERE event_date = $day",
                                      params={"day": DAYS[0]}).pl()
                              .join(day0, on="interaction_id", how="anti")["interaction_id"][0])
    review(con, audited_by_the_product)
    report = queue_for_review(con, tmp_path, DOMAIN, DAYS, BUDGET, now=again_at)
    after = queue_rows(con).filter(pl.col("event_date") == DAYS[0])
    assert after.height == 20 and after["interaction_id"].is_unique().all()
    assert done in after["interaction_id"].to_list()  # done, still counted against the budget
    assert audited_by_the_product not in after["interaction_id"].to_list()
    assert report.day_metadata(DAYS[0])["pending"] == 19
    tasks = json.loads((review_folder(tmp_path, DOMAIN) / f"{DAYS[0]}.label-studio.json").read_text())
    assert len(tasks) == 19 and done not in {task["data"]["interaction_id"] for task in tasks}

    report = queue_for_review(con, tmp_path, DOMAIN, DAYS, ReviewQueue(daily_budget=0), now=again_at)
    assert queue_rows(con).filter(pl.col("selection") == "audit").is_empty()  # only the done review stays
    assert report.metadata()["pending"] == 0
    assert not list(review_folder(tmp_path, DOMAIN).glob("*.argilla.json"))  # nothing left to review


def test_the_files_are_what_label_studio_and_argilla_import(con, tmp_path):
    report = queue_for_review(con, tmp_path, DOMAIN, DAYS, BUDGET, now=NOW)
    folder = review_folder(tmp_path, DOMAIN)
    assert {path.name for path in report.files} == {
        "label-studio-config.xml", *(f"{day}.{tool}.json" for day in DAYS for tool in ("label-studio", "argilla"))}

    view = ET.fromstring((folder / "label-studio-config.xml").read_text())
    texts = {text.get("name"): text.get("value") for text in view.iter("Text")}
    (choices,) = view.iter("Choices")
    assert texts == {"input": "$input", "content": "$content"} and choices.get("toName") in texts
    assert choices.get("name") == "verdict" and [c.get("value") for c in choices] == ["good", "bad"]

    tasks = json.loads((folder / f"{DAYS[0]}.label-studio.json").read_text())
    assert isinstance(tasks, list) and len(tasks) == 20
    for task in tasks:  # a task list: each task's data has every $variable of the config, and the ids
        assert set(task) == {"data"} and {"input", "content"} <= set(task["data"])
        assert {"interaction_id", "item_id", "user_id", "session_id", "selection"} <= set(task["data"])

    records = json.loads((folder / f"{DAYS[0]}.argilla.json").read_text())
    assert len(records) == 20 and len({record["id"] for record in records}) == 20
    for record in records:  # flat dicts for dataset.records.log: field, metadata and id keys
        assert isinstance(record["content"], str) and record["selection"] in ("audit", "uncertainty")
        assert all(isinstance(value, str | int | float) for value in record.values())

    user = tasks[0]["data"]["user_id"]  # flywheel forget takes a user's tasks out of every file
    assert forget_user(tmp_path, user) == 2 * sum(t["data"]["user_id"] == user for t in tasks)
    assert f'"{user}"' not in (folder / f"{DAYS[0]}.label-studio.json").read_text() + (
        folder / f"{DAYS[0]}.argilla.json").read_text()
    assert [path.name for path in expire(tmp_path, DOMAIN, DAYS[1])] == [  # retention
        f"{DAYS[0]}.argilla.json", f"{DAYS[0]}.label-studio.json"]


# --- reading reviews back -----------------------------------------------------------------------------

def label_studio_export(tasks: list[dict], verdicts: list[object], reviewed_at: datetime) -> list[dict]:
    """What Label Studio's JSON export holds once each task is annotated: ``verdicts[i]`` a choice,
    None (no choice) or "cancel" (skipped)."""
    export = []
    for number, (task, verdict) in enumerate(zip(tasks, verdicts, strict=True), start=1):
        result = [] if verdict in (None, "cancel") else [
            {"from_name": "verdict", "to_name": "content", "type": "choices", "value": {"choices": [verdict]}}]
        annotation = {"id": 100 + number, "completed_by": 3, "result": result, "was_cancelled": verdict == "cancel",
                      "created_at": (reviewed_at + timedelta(minutes=number)).isoformat().replace("+00:00", "Z")}
        export.append({"id": number, "data": task["data"], "annotations": [annotation], "predictions": []})
    return export


def task(interaction_id: str = "i_1", **data: object) -> dict:
    return {"data": {"input": "q", "content": "a", "domain": DOMAIN, "interaction_id": interaction_id,
                     "item_id": "r0", "user_id": "u1", "session_id": "s1", "selection": "audit", **data}}


def test_a_label_studio_export_becomes_label_events_and_bad_annotations_are_rejected_with_a_reason(tmp_path, config):
    tasks = [task("i_1"), task("i_2", selection="uncertainty"), task("i_3"), task("i_4"), task("i_5"),
             {"data": {"input": "q", "content": "a"}}]
    export = label_studio_export(tasks, ["good", "bad", "cancel", None, "maybe", "good"],
                                 datetime(2026, 5, 4, 10, tzinfo=UTC))
    export.append({"id": 7, "data": task("i_7")["data"], "annotations": []})
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    mapped = list(read_label_studio(path, DOMAIN, config))
    events = [event for event in mapped if not isinstance(event, Rejected)]
    assert [(e["interaction_id"], e["verdict"], e.get("selection")) for e in events] == [
        ("i_1", "good", "audit"), ("i_2", "bad", "uncertainty")]
    assert events[0]["reviewer"] == "label-studio:3" and events[0]["timestamp"] == "2026-05-04T10:01:00.000000Z"
    assert {e["user_id"] for e in events} == {"u1"} and all(e["event_type"] == "label" for e in events)
    assert [(r.record, r.reason) for r in mapped if isinstance(r, Rejected)] == [
        (3, "cancelled"), (4, "missing_field:verdict"), (5, "invalid_value:verdict"),
        (6, "missing_field:interaction_id"), (7, "not_reviewed")]
    assert [e["event_id"] for e in read_label_studio(path, DOMAIN, config) if isinstance(e, dict)] == [
        e["event_id"] for e in events]  # the same export imported twice lands each review once


def test_argilla_records_become_label_events_and_bad_responses_are_rejected_with_a_reason(tmp_path, config):
    def record(interaction_id: str, *responses: dict, **extra: object) -> dict:
        metadata = {"domain": DOMAIN, "interaction_id": interaction_id, "item_id": "r0", "user_id": "u1",
                    "session_id": "s1", "selection": "uncertainty"}
        return {"id": f"{DOMAIN}:{interaction_id}:r0", "fields": {"content": "a"}, "metadata": metadata,
                "responses": {"verdict": list(responses)}, "status": "completed", **extra}

    user = "6f1e7c9a-0000-4000-8000-000000000001"
    nested = [
        record("i_1", {"value": "good", "user_id": user, "status": "submitted"}, updated_at="2026-05-04T09:00:00"),
        record("i_2", {"value": "bad", "user_id": user, "status": "discarded"}),
        record("i_3", {"value": "good", "user_id": user, "status": "draft"}),
        record("i_4", {"value": "neutral", "user_id": user}),
        record("i_5"),
    ]
    flat = {"id": "x", "content": "a", "domain": DOMAIN, "interaction_id": "i_6", "item_id": "r0", "user_id": "u1",
            "session_id": "s1", "verdict.responses": ["bad"], "verdict.responses.users": [user],
            "verdict.responses.status": ["submitted"]}
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*nested, flat]))
    mapped = list(read_argilla(path, DOMAIN, config))
    events = [event for event in mapped if not isinstance(event, Rejected)]
    assert [(e["interaction_id"], e["verdict"], e.get("selection")) for e in events] == [
        ("i_1", "good", "uncertainty"), ("i_6", "bad", None)]
    assert events[0]["reviewer"] == f"argilla:{user}" and events[0]["timestamp"].startswith("2026-05-04T09:00:00")
    assert [(r.record, r.reason) for r in mapped if isinstance(r, Rejected)] == [
        (2, "cancelled"), (3, "not_submitted"), (4, "invalid_value:verdict"), (5, "not_reviewed")]
    path.write_text("[{not json")
    assert [r.reason for r in read_argilla(path, DOMAIN, config)] == ["malformed_json"]


# --- the loop, through Dagster: queue -> Label Studio -> import -> late-label backfill -> gold --------------

def land_reviews(home, day: date, events: list[dict]) -> None:
    """The reviews as a landing batch of label events (what `flywheel import label-studio` writes)."""
    path = home.landing / DOMAIN / "labels" / f"{day}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(event) + "\n" for event in events))


def rows(home, sql: str) -> list[tuple]:
    with warehouse.connect(home.warehouse(DOMAIN), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.mark.slow
def test_reviews_of_a_labelled_day_come_back_as_gold_relabel_it_and_validation_scores_only_the_audit(
        home, config):
    first, last = date(2026, 11, 2), date(2026, 11, 3)
    simulation.simulate(home, config, first, 2, seed=3, interactions_per_day=60, domains=[DOMAIN])
    defs = build_definitions(config, home)
    instance = dg.DagsterInstance.ephemeral()
    assert execute_cycle(defs, instance, DOMAIN, first, last,
                         asset_selection=[RAW_EVENTS, *dbt_model_keys(), LABELS, REVIEW_QUEUE]).success
    sensor = defs.resolve_sensor_def("late_label_sensor")
    resources = {"warehouse": defs.resources["warehouse"]}
    before = sensor(dg.build_sensor_context(instance=instance, resources=resources, definitions=defs))

    # reviewers answer the first day's queue in Label Studio two days later (from the hidden truth)
    tasks = json.loads((review_folder(home.root, DOMAIN) / f"{first}.label-studio.json").read_text())
    assert {t["data"]["selection"] for t in tasks} == {"audit", "uncertainty"}
    reviewed_on = first + timedelta(days=2)
    export = answer_review_queue(home, DOMAIN, first, reviewer_error=0.0, delay_days=1.0)
    events = list(read_label_studio(export, DOMAIN, config))
    assert len(events) == len(tasks) and not [e for e in events if isinstance(e, Rejected)]
    truth = {(i, t): good for i, t, good in simulation.true_labels(home, DOMAIN).iter_rows()}
    assert all((e["verdict"] == "good") == truth[e["interaction_id"], e["item_id"]] for e in events)
    assert {e["timestamp"][:10] for e in events} == {reviewed_on.isoformat()}
    land_reviews(home, reviewed_on, events)
    with warehouse.connect(home.warehouse(DOMAIN)) as con:  # (a Dagster run of a day without traffic fails its check)
        accumulate(con, home, config, DOMAIN, [reviewed_on])
    assert rows(home, "SELECT count(*), count(selection) FROM raw.labels WHERE reviewer LIKE 'label-studio:%'") == [
        (len(tasks), len(tasks))]

    # the late-label sensor relabels exactly the reviewed day
    tick = sensor(dg.build_sensor_context(instance=instance, resources=resources, definitions=defs,
                                          cursor=before.cursor))
    (request,) = tick.run_requests
    assert request.tags["dagster/asset_partition_range_start"].startswith(f"{first}|")
    assert request.tags["dagster/asset_partition_range_end"].startswith(f"{first}|")
    job = defs.resolve_job_def(request.job_name)
    assert job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False).success

    # marts hold every review; validation's gold only the audit ones (and the product's own audit)
    queued = rows(home, f"""SELECT q.selection, i.review_value IS NOT NULL, i.audit_review_value IS NOT NULL,
                                   i.review_selection
                            FROM labels.review_queue q JOIN marts.fct_impressions i
                              USING (domain, event_date, interaction_id, item_id)
                            WHERE q.event_date = DATE '{first}'""")
    assert queued and {(sel, True, sel == "audit", sel) for sel, *_ in queued} == set(queued)
    with warehouse.connect(home.warehouse(DOMAIN), read_only=True) as con:
        held_out = holdout_rows(con, DOMAIN, Windows(first - timedelta(days=1), first - timedelta(days=1), first, first))
        gold = con.sql(f"""SELECT interaction_id, item_id FROM marts.fct_impressions
                           WHERE event_date = DATE '{first}' AND (review_selection = 'audit')""").pl()
    verdicts = held_out.filter(pl.col("verdict").is_not_null()).select("interaction_id", "item_id")
    assert verdicts.sort(pl.all()).equals(gold.sort(pl.all()))
    uncertain = {(i, t) for sel, i, t in rows(home, f"""SELECT selection, interaction_id, item_id
        FROM labels.review_queue WHERE event_date = DATE '{first}'""") if sel == "uncertainty"}
    assert uncertain and not uncertain & set(verdicts.iter_rows())

