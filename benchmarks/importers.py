"""Bandit importer throughput: a generated log of N rows (one per slot shown) through
``flywheel import bandit``, as CSV and as Parquet, against polars reading the same file bare.

    .venv/bin/python benchmarks/importers.py --rows 1000000 [--slots 3] [--dir DIR]

The log: a uniformly random logger over 80 items, ``--slots`` slots a request (1-based), a click
with probability 0.02 / slot, a user column, two context columns (a string, a number). Each
measurement runs in its own process, so its peak RSS is its own; it prints wall seconds, CPU
seconds, peak RSS and rows/s, and the importer's time over the bare read's (a ratio, steadier than
the seconds on a shared machine), with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import yaml

REPO = Path(__file__).resolve().parent.parent
MAPPING = {"timestamp": "timestamp", "item": "item_id", "position": "slot", "position_base": 1,
           "reward": "click", "propensity": "propensity", "policy": "explore", "request": "request_id",
           "user": "user_id", "context": ["device", "affinity"]}


def generate(rows: int, slots: int, folder: Path) -> dict[str, Path]:
    """The log as CSV and Parquet in ``folder``."""
    rng = np.random.default_rng(0)
    requests = rows // slots
    start = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=10)
    served = pl.datetime_range(start, start + timedelta(days=9), interval="1s", eager=True)[:requests]
    per_request = pl.DataFrame({
        "request_id": [f"r{n}" for n in range(requests)],
        "timestamp": served.sample(requests, with_replacement=True, seed=0).sort(),
        "user_id": [f"u{n}" for n in rng.integers(0, 50_000, requests)],
        "device": rng.choice(["ios", "android", "web"], requests),
    })
    frame = (per_request.with_columns(slot=pl.lit(list(range(1, slots + 1)))).explode("slot")
             .with_columns(item_id=pl.Series([f"item_{i}" for i in rng.integers(0, 80, requests * slots)]),
                           click=pl.Series(rng.random(requests * slots) < 0.02).cast(pl.Int8),
                           propensity=pl.lit(1 / 80), affinity=pl.Series(rng.random(requests * slots)).round(4)))
    paths = {"csv": folder / "log.csv", "parquet": folder / "log.parquet"}
    frame.write_csv(paths["csv"])
    frame.write_parquet(paths["parquet"])
    return paths


def project(folder: Path) -> Path:
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"]["recommendation"]["importing"] = {"consent": "granted", "bandit_log": MAPPING}
    path = folder / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def measure(stage: str, path: Path, folder: Path) -> dict[str, float]:
    """Run ``stage`` (import, or read: polars alone) on ``path`` in a process of its own."""
    output = subprocess.run([sys.executable, __file__, "--stage", stage, "--path", str(path), "--dir", str(folder)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run_stage(stage: str, path: Path, folder: Path) -> None:
    """One measurement in this process: prints its figures as JSON."""
    from flywheel_pipeline.config import load_config
    from flywheel_pipeline.home import Home
    from flywheel_pipeline.importers import import_file

    config = load_config(project(folder))
    home = Home(folder / f"home-{path.suffix[1:]}").ensure()
    wall, cpu = time.perf_counter(), time.process_time()
    if stage == "import":
        report = import_file(home, config, "bandit", path, "recommendation")
        rows = report.records
    else:
        rows = (pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)).height
    figures = {"rows": rows, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--stage", choices=["import", "read"])
    parser.add_argument("--path", type=Path)
    args = parser.parse_args()
    if args.stage:
        run_stage(args.stage, args.path, args.dir)
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="flywheel-import-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = generate(args.rows, args.slots, folder)
    print(f"generated {args.rows:,} rows ({args.slots} slots a request) in {time.perf_counter() - started:.1f}s: "
          f"CSV {paths['csv'].stat().st_size / 2**20:.0f} MiB, Parquet {paths['parquet'].stat().st_size / 2**20:.0f} MiB")
    for kind, path in paths.items():
        bare, imported = measure("read", path, folder), measure("import", path, folder)
        print(f"{kind:8} import: {imported['rows']:,} rows in {imported['wall_s']:.1f}s wall, "
              f"{imported['cpu_s']:.1f}s CPU = {imported['rows'] / imported['wall_s']:,.0f} rows/s, "
              f"peak RSS {imported['peak_rss_mib']:,.0f} MiB | bare polars read {bare['wall_s']:.2f}s, "
              f"{bare['peak_rss_mib']:,.0f} MiB | import / read: {imported['wall_s'] / bare['wall_s']:.0f}x")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
