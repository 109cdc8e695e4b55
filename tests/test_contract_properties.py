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


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines())
def test_any_line_is_accepted_or_quarantined_and_the_run_never_fails(batch: list[str]) -> None:
    with tempfile.TemporaryDirectory() as root:
        home = Home(Path(root)).ensure()
        path = home.landing / "assistant" / f"{DAY}.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(line + "\n" for line in batch), encoding="utf-8", errors="surrogatepass")
        with warehouse.connect(home.warehouse("assistant")) as con:
            report = accumulate(con, home, CONFIG, "assistant", [DAY], now=NOW)
        blank = sum(not line.strip() for line in batch)
        assert report.lines_in + blank == len(batch)
        assert report.reconciles, (report.lines_in, report.accepted, report.quarantined, report.reasons)
