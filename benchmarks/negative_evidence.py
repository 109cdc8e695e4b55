"""Negative evidence: the simulator's labels against hidden truth, without and with the "not clicked" LFs.

    .venv/bin/python benchmarks/negative_evidence.py --home .flywheel   # a home with simulated, built days

Each domain's days in ``marts.fct_impressions`` are labelled twice, on copies of the warehouse, by
the labeling stage itself (one fit over every day): without ``not_clicked_top`` and
``not_clicked_lower``, then with them. Printed per domain: label accuracy and coverage against the
simulator's truth, accuracy on the rows both label (what the new LFs may not make worse), and the
LFs' accuracy on the audit reviews (gold) beside what the label model learned.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import duckdb
import polars as pl

from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.labeling import functions
from flywheel_pipeline.labeling.stage import LabelingReport, label_partitions
from flywheel_pipeline.simulation import true_labels

NOT_CLICKED = ("not_clicked_top", "not_clicked_lower")
KEY = ["interaction_id", "item_id"]


def relabel(warehouse: Path, domain: str, without: tuple[str, ...]) -> tuple[pl.DataFrame, LabelingReport]:
    """p_good per impression of ``domain`` with the LFs ``without`` left out, on a copy of ``warehouse``."""
    registered = dict(functions.LABELING_FUNCTIONS)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "warehouse.duckdb"
        shutil.copy(warehouse, copy)
        for name in without:
            functions.LABELING_FUNCTIONS.pop(name)
        try:
            with duckdb.connect(str(copy)) as con:
                [(first, last)] = con.execute(
                    "SELECT min(event_date), max(event_date) FROM marts.fct_impressions WHERE domain = ?", [domain]
                ).fetchall()
                days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
                report = label_partitions(con, domain, days, load_config(), fit_window_days=len(days))
                labels = con.sql("SELECT interaction_id, item_id, p_good FROM labels.impression_labels "
                                 "WHERE domain = $domain", params={"domain": domain}).pl()
        finally:
            functions.LABELING_FUNCTIONS.clear()
            functions.LABELING_FUNCTIONS.update(registered)
    return labels, report


def accuracy(scored: pl.DataFrame, column: str) -> tuple[float, float]:
    """(accuracy against ``good`` of the rows ``column`` labels, their share of all rows)."""
    labelled = scored.filter(pl.col(column).is_not_null())
    return float(((labelled[column] >= 0.5) == labelled["good"]).mean()), labelled.height / scored.height


def benchmark(home: Home, domain: str) -> None:
    truth = true_labels(home, domain).unique(KEY, keep="first", maintain_order=True)
    before, _ = relabel(home.warehouse(domain), domain, NOT_CLICKED)
    after, report = relabel(home.warehouse(domain), domain, ())
    scored = before.join(after, on=KEY, suffix="_after").join(truth, on=KEY)
    print(f"{domain}: {scored.height:,} impressions with truth, {scored['good'].mean():.3f} truly good")
    for name, column in (("without not_clicked", "p_good"), ("with not_clicked", "p_good_after")):
        share, coverage = accuracy(scored, column)
        print(f"  {name:20} accuracy {share:.4f} on coverage {coverage:.3f}")
    both = scored.filter(pl.col("p_good").is_not_null())
    print(f"  on the rows labelled without them: {accuracy(both, 'p_good')[0]:.4f} -> "
          f"{accuracy(both, 'p_good_after')[0]:.4f}")
    stats = report.lf_stats.filter(pl.col("lf").is_in(NOT_CLICKED))
    for lf, coverage, gold, learned in stats.select("lf", "coverage", "empirical_accuracy", "learned_accuracy").rows():
        print(f"  {lf:18} coverage {coverage:.3f}, accuracy on gold {_fmt(gold)}, learned {_fmt(learned)}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="a flywheel home with simulated, built days")
    home = Home(parser.parse_args().home.resolve())
    for domain in load_config().domains:
        benchmark(home, domain)


if __name__ == "__main__":
    main()
