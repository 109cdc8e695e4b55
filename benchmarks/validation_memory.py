"""Validation's memory against the size of the action space: held-out rows x catalogue items.

    .venv/bin/python benchmarks/validation_memory.py                     # 50,000 rows x 100 items: 5M pairs
    .venv/bin/python benchmarks/validation_memory.py --rows 10000 --items 1000

A per-row log (one item in one of 3 slots per row, a uniformly random logger) is judged against
a catalogue: every held-out row is a unit whose candidates are every catalogue item, so the pairs
scored are rows x items. Candidate and champion (a score per item, vectorised, so the figure is
validation's own and not a model's) are compared through ``validation.compare_models``, which
scores ``Evidence.chunks`` a chunk of units at a time and resamples the bootstrap a block of
resamples at a time (many held-out rows: ``--rows 200000 --items 20``). Prints the pairs, the time, the peak RSS
of the process (``ru_maxrss``) and that of building every pair at once for comparison (what
validation did before it streamed), with ``--whole``.
"""

from __future__ import annotations

import argparse
import resource
import time
from datetime import date

import numpy as np
import pandas as pd
import polars as pl

from flywheel_pipeline.scoring import UniformScorer
from flywheel_pipeline.validation import compare_models
from flywheel_pipeline.validation.evidence import assemble

SLOTS = 3


class ItemScores:
    """A fixed score per item: a model as cheap as a model can be."""

    def __init__(self, items: int, seed: int) -> None:
        self.table = dict(zip((f"i{a}" for a in range(items)), np.random.default_rng(seed).random(items)))

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        return candidates["item_id"].map(self.table).to_numpy(dtype=float)


def per_row_log(rows: int, items: int, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Held-out rows in the Open Bandit shape, and the catalogue."""
    rng = np.random.default_rng(seed)
    item = rng.integers(items, size=rows)
    log = pl.DataFrame({
        "domain": "home_feed", "event_date": date(2026, 3, 30), "interaction_id": [f"r{i}" for i in range(rows)],
        "item_id": [f"i{a}" for a in item], "position": rng.integers(SLOTS, size=rows),
        "propensity": 1 / items, "policy": "explore", "user_id": [f"u{i % 5000}" for i in range(rows)],
        "segment": [f"s{i % 4}" for i in range(rows)], "context_features": '{"affinity": 0.5}',
        "is_new_user": False, "input_text": "", "item_content": [f"item {a}" for a in item],
        "clicked": (rng.random(rows) < 0.01).astype(float), "verdict": None, "p_good": 0.5, "label": False,
    }, schema_overrides={"verdict": pl.Float64})
    catalogue = pl.DataFrame({"item_id": [f"i{a}" for a in range(items)],
                              "item_content": [f"item {a}" for a in range(items)]})
    return log, catalogue


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--whole", action="store_true", help="build every pair at once instead (the old way)")
    args = parser.parse_args()
    log, catalogue = per_row_log(args.rows, args.items)
    evidence = assemble(log, pl.DataFrame(schema={"interaction_id": pl.String, "item_id": pl.String,
                                                  "item_content": pl.String, "mu": pl.List(pl.Float64)}),
                        "clicked", catalogue=catalogue, slot_decisions=True)
    before = peak_rss_gb()
    started = time.perf_counter()
    if args.whole:
        options = evidence.options(0, evidence.n_units)
        options.frame.to_pandas()
        figure = f"{options.frame.height:,} rows built at once"
    else:
        compared = compare_models(evidence, "recommendation", ItemScores(args.items, 1), UniformScorer())
        dr = compared.slices[0].metrics["dr"]
        figure = f"dr candidate {dr.candidate:.4f}, champion {dr.champion:.4f}"
    seconds = time.perf_counter() - started
    print(f"{args.rows:,} held-out rows x {args.items:,} catalogue items = {args.rows * args.items:,} pairs"
          f"{' (all at once)' if args.whole else ' (streamed)'}")
    print(f"  {figure}")
    print(f"  {seconds:.1f} s; peak RSS {peak_rss_gb():.2f} GB (before validation {before:.2f} GB)")


if __name__ == "__main__":
    main()
