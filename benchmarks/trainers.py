"""Trainer benchmark: every trainer of each domain (training.TRAINERS) on the simulator's hidden truth.

    .venv/bin/python benchmarks/trainers.py                              # 3 seeds x 3 cycles, both domains
    .venv/bin/python benchmarks/trainers.py --domains assistant --seeds 1 --cycles 1 --per-day 300
    .venv/bin/python benchmarks/trainers.py --encoding     # the transformer's costs, zero-label accuracy
    .venv/bin/python benchmarks/trainers.py --report a.jsonl b.jsonl   # the tables of --records files

Each seed runs benchmarks/gate.py's closed loop (its ``Loop``: a warm-up served by the baseline, then
per cycle a week of traffic served by the champion, the domain's cycle job, a passed candidate
promoted), with flywheel.yaml's trainer serving. After each cycle, every trainer the domain's shape
has is fitted on that cycle's labelled training window (the same rows the cycle's candidate was
fitted on, weighted by the trainer's own rules), each in a fresh process (``spawn``) on the
machine's cores, and the benchmark records:

- true accuracy of the fitted model (``simulation.true_accuracy``) and the oracle: the same trainer
  fitted on the hidden truth of the same impressions (``simulation.oracle.oracle_accuracy``);
- fit seconds (one fit; a cycle fits twice: the internal check, then all rows) and the fitting
  process's peak RSS (after importing and reading the rows: ``rss_before``; after the fit: ``peak``);
- assistant: true accuracy on new paraphrases (every query rephrased the way the simulator's users
  rephrase, ``simulation.assistant.REPHRASINGS``: text no training row held), and, on the first
  cycle, cold start: the trainer fitted on the first 50, 200 and 1,000 labelled interactions only.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import resource
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate import DAYS_PER_CYCLE, WARMUP_DAYS, Loop  # the closed loop, as benchmarks/gate.py runs it

from flywheel_pipeline import simulation
from flywheel_pipeline.config import (
    DomainConfig,
    InProcessSettings,
    TransformerTrainerSettings,
    load_config,
)
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation.assistant import REPHRASINGS, Assistant
from flywheel_pipeline.simulation.oracle import oracle_accuracy
from flywheel_pipeline.simulation.world import World
from flywheel_pipeline.training import TRAINERS
from flywheel_pipeline.training.base import TrainingResult, Windows, impressions, training_set
from flywheel_pipeline.warehouse import connect

COLD_START = (50, 200, 1000)  # labelled interactions the first cycle's cold-start fits see


@dataclass
class Fit:
    seed: int
    cycle: int
    domain: str
    trainer: str
    n_labelled: int
    accuracy: float
    oracle: float
    fit_seconds: float
    rss_before_mb: float
    peak_rss_mb: float
    paraphrases: float | None = None
    cold_start: dict[int, float] = field(default_factory=dict)


def paraphrase_accuracy(home: Home, domain: str, scorer) -> float:
    """True accuracy with every query rephrased (REPHRASINGS in turn): the same candidates and truth."""
    world = World.load(home.simulator / domain)
    assistant = Assistant.open(world)
    texts = [REPHRASINGS[n % len(REPHRASINGS)].format(q=text) for n, text in enumerate(assistant.queries["text"])]
    rephrased = Assistant(assistant.queries.with_columns(text=pl.Series(texts)), assistant.responses,
                          assistant.candidates, assistant.shift)
    return rephrased.accuracy(world, scorer)


def first_interactions(train: pl.DataFrame, n: int) -> pl.DataFrame:
    """The labelled rows of the window's first ``n`` interactions (serving order)."""
    first = train.sort("served_at")["interaction_id"].unique(maintain_order=True).head(n)
    return train.filter(pl.col("interaction_id").is_in(first.implode()))


def fit_one(root: str, config_path: str, domain: str, kind: str, windows: dict, cold_start: bool,
            transformer: dict) -> dict:
    """In a fresh process: fit ``kind`` on the window's labels; its figures (see the module doc)."""
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    home, config = Home(Path(root)), load_config(config_path)
    domain_config = config.domain(domain)
    windows = Windows.from_params(windows)
    with connect(home.warehouse(domain), read_only=True) as con:
        train = training_set(impressions(con, domain, windows.train_start, windows.train_end))
    trainer = TRAINERS[domain_config.shape][kind](settings_of(domain_config, kind, transformer))
    weighted, _ = trainer.weigh(train)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    scorer = trainer.fit(weighted)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"n_labelled": train.height, "fit_seconds": seconds, "rss_before_mb": rss_before, "peak_rss_mb": peak,
               "accuracy": simulation.true_accuracy(home, config, domain, scorer),
               "oracle": oracle_accuracy(home, config, domain, windows, trainer)}
    if domain_config.shape == "assistant":
        figures["paraphrases"] = paraphrase_accuracy(home, domain, scorer)
    if cold_start:
        figures["cold_start"] = {}
        for n in COLD_START:
            few, _ = trainer.weigh(first_interactions(train, n))
            try:
                figures["cold_start"][n] = simulation.true_accuracy(home, config, domain, trainer.fit(few))
            except ValueError:  # one class only among so few labels
                figures["cold_start"][n] = float("nan")
    return figures


def settings_of(domain_config: DomainConfig, kind: str, transformer: dict):
    """A trainer kind's settings: the domain's own when it names that kind, else the kind's defaults
    (the transformer's updated with ``transformer``, --transformer)."""
    if domain_config.trainer.kind == kind:
        return domain_config.trainer
    if kind == "transformer":
        return TransformerTrainerSettings(**transformer)
    return TypeAdapter(InProcessSettings).validate_python({"kind": kind})


def run_seed(seed: int, args, config, config_path: Path, records: Path | None) -> list[Fit]:
    end = date.today() - timedelta(days=1)
    fits = []
    with tempfile.TemporaryDirectory(prefix=f"trainers-bench-{seed}-") as root:
        loop = Loop(Path(root), config, seed, args.per_day, end, args.cycles)
        loop.serve(loop.start, WARMUP_DAYS)
        for cycle in range(1, args.cycles + 1):
            first = loop.start + timedelta(days=WARMUP_DAYS + (cycle - 1) * DAYS_PER_CYCLE)
            loop.serve(first, DAYS_PER_CYCLE)
            run_from = loop.start if cycle == 1 else first - timedelta(days=config.max_lateness_days)
            for domain in config.domains:
                judged, _ = loop.cycle(cycle, domain, run_from, first + timedelta(days=DAYS_PER_CYCLE - 1))
                windows = TrainingResult.logged(loop.client, judged.model_uri).windows
                for kind in TRAINERS[config.domain(domain).shape]:
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                        figures = pool.submit(fit_one, root, str(config_path), domain, kind, windows.params(),
                                              cycle == 1, args.transformer).result()
                    fit = Fit(seed, cycle, domain, kind, **figures)
                    fits.append(fit)
                    if records:
                        with records.open("a") as out:
                            out.write(json.dumps(asdict(fit)) + "\n")
                    print(f"  seed {seed} cycle {cycle} {domain:<14} {kind:<12} accuracy {fit.accuracy:.3f} "
                          f"oracle {fit.oracle:.3f} paraphrases {fit.paraphrases or float('nan'):.3f} "
                          f"fit {fit.fit_seconds:.1f}s peak RSS {fit.peak_rss_mb:.0f} MB "
                          f"(before {fit.rss_before_mb:.0f}) cold start {fit.cold_start}", flush=True)
        loop.instance.dispose()
    return fits


def report(fits: list[Fit]) -> None:
    """Per domain: per trainer and cycle, mean (min..max over seeds) of each figure."""
    def shown(values: list[float], digits: int = 3) -> str:
        values = [v for v in values if v is not None and np.isfinite(v)]
        if not values:
            return "n/a"
        return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"

    for domain in sorted({f.domain for f in fits}):
        mine = [f for f in fits if f.domain == domain]
        seeds = sorted({f.seed for f in mine})
        print(f"\n## {domain}: {len(seeds)} seeds {seeds}; mean (min..max) over seeds")
        print("| trainer | cycle | labelled rows | true accuracy | oracle | new paraphrases | fit s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        by = defaultdict(list)
        for f in mine:
            by[f.trainer, f.cycle].append(f)
        for (trainer, cycle), group in sorted(by.items()):
            print(f"| {trainer} | {cycle} | {np.mean([f.n_labelled for f in group]):.0f} | "
                  f"{shown([f.accuracy for f in group])} | {shown([f.oracle for f in group])} | "
                  f"{shown([f.paraphrases for f in group])} | {shown([f.fit_seconds for f in group], 1)} | "
                  f"{shown([f.peak_rss_mb for f in group], 0)} |")
        cold = [f for f in mine if f.cold_start]
        if cold:
            print("\n| trainer | cold start: first cycle, labelled interactions | " +
                  " | ".join(str(n) for n in COLD_START) + " |\n|---|---|" + "---|" * len(COLD_START))
            for trainer in sorted({f.trainer for f in cold}):
                group = [f for f in cold if f.trainer == trainer]
                print(f"| {trainer} | true accuracy | " + " | ".join(
                    shown([f.cold_start.get(n, f.cold_start.get(str(n))) for f in group]) for n in COLD_START) + " |")


def encoding(config, seeds: list[int]) -> None:
    """The transformer's costs on the assistant world, and what the pre-trained encoder alone
    reaches (zero labels) against the day-zero lexical policy, per seed's world."""
    import torch

    from flywheel_pipeline.scoring import LexicalOverlapScorer
    from flywheel_pipeline.training.transformer import EncoderScorer

    settings = TransformerTrainerSettings()
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"trainers-encoding-{seed}-") as root:
            home = Home(Path(root)).ensure()
            simulation.simulate(home, config, date.today() - timedelta(days=1), 1, seed=seed,
                                interactions_per_day=10, domains=["assistant"])
            zero_shot = simulation.true_accuracy(home, config, "assistant", EncoderScorer(settings))
            lexical = simulation.true_accuracy(home, config, "assistant", LexicalOverlapScorer())
            print(f"seed {seed}: the pre-trained encoder alone (no label) {zero_shot:.3f}; "
                  f"the lexical baseline {lexical:.3f}")
            assistant = Assistant.open(World.load(home.simulator / "assistant"))
    queries, responses = assistant.queries["text"].to_list(), assistant.response_text
    pairs = [(queries[q], responses[r]) for q in range(len(queries)) for r in assistant.slots[q]]
    texts = list(dict.fromkeys(queries + [responses[r] for r in np.unique(assistant.slots)]))
    scorer = EncoderScorer(settings)
    encoder = scorer.encoder

    def rate(inputs: list, max_length: int) -> float:
        encoder.max_seq_length = max_length
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(inputs), 64):
                encoder(encoder.preprocess(inputs[start:start + 64]))
        return len(inputs) / (time.perf_counter() - started)

    bi, cross = rate(texts[:640], settings.max_length), rate(pairs[:320], 2 * settings.max_length)
    print(f"true accuracy scores {len(pairs)} (query, response) pairs, {len(texts)} distinct texts; "
          f"bi-encoder {bi:.0f} texts/s: {len(texts) / bi:.0f} s; cross-encoder {cross:.0f} pairs/s: "
          f"{len(pairs) / cross:.0f} s")
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(pairs), 2000, replace=False)
    train = pl.DataFrame({"input_text": [pairs[i][0] for i in chosen], "item_content": [pairs[i][1] for i in chosen],
                          "p_good": rng.random(2000), "weight": np.ones(2000)})
    for tune, epochs, n in ((0, settings.epochs, 2000), (1, 1, 300)):
        scorer = EncoderScorer(settings.model_copy(update={"tune_layers": tune, "epochs": epochs}))
        if not tune:
            scorer.embeddings(list(dict.fromkeys(train["input_text"].to_list() + train["item_content"].to_list())))
        started = time.perf_counter()
        scorer.fit(train.head(n))
        seconds = time.perf_counter() - started
        print(f"fit, tune_layers {tune}: {n} examples x {epochs} epochs in {seconds:.1f} s, "
              f"{n * epochs / seconds:.0f} examples/s" + (" (embeddings computed before)" if not tune else ""))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--per-day", type=int, default=1500)
    parser.add_argument("--domains", nargs="+", help="default: every domain of the config")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "flywheel.yaml")
    parser.add_argument("--transformer", type=json.loads, default={},
                        help='the transformer\'s settings beyond its defaults, e.g. \'{"tune_layers": 1}\'')
    parser.add_argument("--records", type=Path, help="append every fit here as JSON lines")
    parser.add_argument("--report", type=Path, nargs="+", help="only print the tables of --records files")
    parser.add_argument("--encoding", action="store_true", help="only the transformer's costs (encoding, "
                        "fit rates) and its zero-label accuracy on each seed's assistant world")
    args = parser.parse_args()
    if args.report:
        report([Fit(**json.loads(line)) for path in args.report for line in path.read_text().splitlines()])
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    config = load_config(args.config)
    if args.domains:
        config = config.model_copy(update={"domains": {d: config.domain(d) for d in args.domains}})
    if args.encoding:
        encoding(config, list(range(args.first_seed, args.first_seed + args.seeds)))
        return
    print(f"trainers per domain: { {d: list(TRAINERS[c.shape]) for d, c in config.domains.items()} }", flush=True)
    started = time.monotonic()
    fits = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        fits += run_seed(seed, args, config, args.config, args.records)
    print(f"\n# Trainer benchmark: {args.seeds} seeds x {args.cycles} cycles, {args.per_day} interactions a day "
          f"per domain ({time.monotonic() - started:.0f}s)")
    report(fits)


if __name__ == "__main__":
    main()
