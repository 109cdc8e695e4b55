"""No line can stop a domain: for any line, whatever any field holds, accumulation accepts it or
quarantines it with a reason, and the counts reconcile (a property-based test over the contract)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel_pipeline import warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from tests.test_accumulation import DAY, NOW, interaction, label, signal

CONFIG = load_config(Path(__file__).resolve().parent.parent / "flywheel.yaml")
TEMPLATES = {"interaction": interaction, "signal": signal, "label": label}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
    | st.sampled_from(["", "x" * 5000, "2026-11-02T09:15:00Z", "assistant", "interaction", "\u0000", "\ud800"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def events(draw: st.DrawFn, n: int) -> dict:
    """A valid event of some type, then some of its fields replaced, removed or added."""
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    event = TEMPLATES[kind](f"e{n}", interaction_id=f"i_{n}")
    for key in draw(st.lists(st.sampled_from(sorted(event)), max_size=3, unique=True)):
        if draw(st.booleans()):
            event[key] = draw(json_values)
        else:
            del event[key]
    for key in draw(st.lists(st.text(max_size=10), max_size=2)):
        event[key] = draw(json_values)
    return event


@st.composite
def lines(draw: st.DrawFn) -> list[str]:
    """A batch's lines: mostly mutated events, some arbitrary JSON or text, some blank."""
    batch = []
    for n in range(draw(st.integers(1, 12))):
        shape = draw(st.sampled_from(["event", "event", "event", "json", "text", "blank"]))
        if shape == "event":
            batch.append(json.dumps(draw(events(n))))
        elif shape == "json":
            batch.append(json.dumps(draw(json_values)))
        elif shape == "text":
            batch.append(draw(st.text(max_size=60)).replace("\n", " ").replace("\r", " "))
        else:
            batch.append(" ")
    return batch


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines())
def test_any_line_is_accepted_or_quarantined_and_the_run_never_fails(batch: list[str]) -> None:
    with tempfile.TemporaryDirectory() as root:
        home = Home(Path(root)).ensure()
        path = home.landing / "assistant" / f"{DAY}.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(line + "\n" for line in batch), encoding="utf-8", errors="surrogatepass")
        with warehouse.connect(home.warehouse("assistant")) as con:
            report = accumulate(con, home, CONFIG, "assistant", [DAY], now=NOW)
        blank = sum(not line.strip(" \t\r") for line in batch)  # JSON's whitespace only: "\x85" is a line
        assert report.lines_in + blank == len(batch)
        assert report.reconciles, (report.lines_in, report.accepted, report.quarantined, report.reasons)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["exact", "changed", "broken"]), st.booleans()), min_size=1, max_size=6))
def test_a_copy_that_breaks_the_contract_never_wins_and_differing_copies_are_all_quarantined(
        copies: list[tuple[str, bool]]) -> None:
    """Each event comes twice, its copy before or after it: an exact copy is a duplicate (one kept), a copy that
    breaks the contract is quarantined and the valid one kept, whichever came first; two valid copies that differ
    are both quarantined (file order does not say which is right)."""
    batch, kept, reasons = [], set(), {}
    for n, (kind, copy_first) in enumerate(copies):
        event = interaction(f"e{n}", interaction_id=f"i_{n}")
        copy = {"exact": event, "changed": {**event, "input": "changed"},
                "broken": {**event, "impressions": None}}[kind]
        batch += [copy, event] if copy_first else [event, copy]
        if kind != "changed":
            kept.add(f"e{n}")
        reason = {"exact": "duplicate_event_id", "changed": "conflicting_duplicate",
                  "broken": "missing_field:impressions"}[kind]
        reasons[reason] = reasons.get(reason, 0) + (2 if kind == "changed" else 1)
    with tempfile.TemporaryDirectory() as root:
        home = Home(Path(root)).ensure()
        path = home.landing / "assistant" / f"{DAY}.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(event) + "\n" for event in batch))
        with warehouse.connect(home.warehouse("assistant")) as con:
            report = accumulate(con, home, CONFIG, "assistant", [DAY], now=NOW)
            accepted = {event_id for (event_id,) in con.execute("SELECT event_id FROM raw.interactions").fetchall()}
            quarantined = con.execute("SELECT count(*) FROM raw.quarantine").fetchall()[0][0]
    assert accepted == kept and report.reasons == reasons and quarantined == sum(reasons.values())
