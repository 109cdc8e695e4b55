"""Simulated reviewers: the review queue's Label Studio tasks answered from the hidden truth.

What a team's reviewers do between the review_queue asset and ``flywheel import label-studio``
(docs/importing.md), so the demo and the tests exercise the loop: each pending task of a day gets
one annotation, the truth flipped ``reviewer_error`` of the time, given ``delay_days`` after the day,
written as Label Studio's JSON export under ``<home>/simulator/<domain>/reviews/``.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np

from flywheel_pipeline.home import Home
from flywheel_pipeline.review import VERDICT_CONTROL, review_folder
from flywheel_pipeline.simulation import truth
from flywheel_pipeline.simulation.world import World


def answer_review_queue(home: Home, domain: str, day: date, *, reviewer_error: float = 0.05,
                        delay_days: float = 1.0, reviewers: int = 4, seed: int = 0) -> Path | None:
    """Answer ``domain``'s queue of ``day``; the export's path, None when nothing is pending."""
    tasks_file = review_folder(home.root, domain) / f"{day.isoformat()}.label-studio.json"
    if not tasks_file.exists():
        return None
    tasks = json.loads(tasks_file.read_text())
    hidden = {(row["interaction_id"], row["item_id"]): row["good"]
              for row in truth.load(home.simulator / domain).iter_rows(named=True)}
    day_number = World.load(home.simulator / domain).day_number(day)
    wrong = np.random.default_rng([seed, day_number]).random(len(tasks)) < reviewer_error
    reviewed_at = datetime.combine(day, time(), UTC) + timedelta(days=1 + delay_days)
    export = [
        {"id": number, "data": task["data"], "annotations": [{
            "id": number, "completed_by": 1 + number % reviewers, "was_cancelled": False,
            "created_at": (reviewed_at + timedelta(seconds=number)).isoformat(),
            "result": [{"from_name": VERDICT_CONTROL, "to_name": "content", "type": "choices",
                        "value": {"choices": ["good" if good != flip else "bad"]}}],
        }]}
        for number, (task, flip) in enumerate(zip(tasks, wrong, strict=True), start=1)
        if (good := hidden.get((task["data"]["interaction_id"], task["data"]["item_id"]))) is not None
    ]
    path = home.simulator / domain / "reviews" / f"{day.isoformat()}.label-studio-export.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(export))
    return path
