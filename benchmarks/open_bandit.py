"""Open Bandit Dataset benchmark: off-policy estimates of ZOZOTOWN's Bernoulli TS from the uniform log.

    .venv/bin/python benchmarks/open_bandit.py                    # cache under ~/.cache/flywheel
    .venv/bin/python benchmarks/open_bandit.py --cache /tmp/obd

The Open Bandit Dataset (Saito, Aihara, Matsutani & Narita 2021, "Open Bandit Dataset and
Pipeline: Towards Realistic and Reproducible Off-Policy Evaluation", NeurIPS D&B) logs the same
fashion-recommendation slots (80 items, 3 positions) under two policies: uniform random and the
production Bernoulli Thompson sampling (BTS). The small sample shipped inside the obp 0.4.1 wheel
(10,000 rows per policy, campaign "all") is fetched with pip and cached; obp itself is never
imported (its dependencies, torch among them, are not needed).

The reference side, faithful to obp 0.4.1's own code (the documented OPE example):

- the logs as ``OpenBanditDataset`` builds them (rows by timestamp, position 1..3 -> 0..2);
- the evaluation policy's action distribution, ``BernoulliTS(n_actions=80, len_list=3,
  is_zozotown_prior=True, campaign="all", random_state=12345).compute_batch_action_dist(
  n_sim=100000)``: the same draws from the same random state, so the same numbers;
- IPW, SNIPW, DM and DR as ``obp.ope.estimators`` defines them;
- the truth: the BTS log's own click rate (obp's ``calc_on_policy_policy_value_estimate``).

The flywheel side, through the documented path only (no hand conversion): a project whose
flywheel.yaml declares each log's columns and the catalogue (``importing.bandit_log``,
``importing.catalogue``: item_context.csv), ``flywheel import bandit`` of each CSV as it is,
``flywheel run --only accumulate`` (accumulation, dbt, labels), then the pipeline's own validation
path (``validation.held_out_evidence`` + ``compare_models``) with the BTS policy handed to it as a
candidate that gives its own slot probabilities over the catalogue. Beside each of flywheel's
estimates it prints the textbook one on the same rows (the same held-out rows, the same pi, and
for DR the same reward model), so any difference is plumbing. Last it runs a whole cycle on each
log (``flywheel run``) and prints the gate's outcome and reasons.

It prints the estimates, the truth and the relative errors. DR and DM depend on the reward model:
both of obp's example ones are shown (the per-(item, position) click rate of the random log, and
obp's ``RegressionModel`` with a logistic regression, fitting_method "normal", 3-fold
cross-fitting).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import yaml

OBP = "obp==0.4.1"
WHEEL_SHA256 = "87dec9caf4283c25ab13036532e0a24566f1c7bdcad1653a8ded43b2f5ef8208"
CAMPAIGN = "all"
# cached path -> path inside the wheel
MEMBERS = {
    **{f"{policy}/{CAMPAIGN}/{name}": f"obp/dataset/obd/{policy}/{CAMPAIGN}/{name}"
       for policy in ("random", "bts") for name in (f"{CAMPAIGN}.csv", "item_context.csv")},
    "prior_bts.yaml": "obp/policy/conf/prior_bts.yaml",
}
DEFAULT_CACHE = Path.home() / ".cache" / "flywheel" / "open_bandit"
SEED = 12345  # obp's examples' random_state, for the policy and the cross-fitting folds


def fetch_obd(cache: Path = DEFAULT_CACHE) -> Path:
    """The OBD sample and the BTS prior from the obp 0.4.1 wheel (pip download, sha256-checked),
    cached under ``cache`` as ``{random,bts}/all/{all.csv,item_context.csv}`` and
    ``prior_bts.yaml``. Returns ``cache``."""
    if all((cache / name).is_file() for name in MEMBERS):
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", OBP, "--no-deps",
                              "--only-binary=:all:", "--quiet", "-d", tmp],
                             check=False, capture_output=True, text=True)
        if pip.returncode != 0:
            raise RuntimeError(f"pip download {OBP} failed:\n{pip.stderr}")
        wheel = next(Path(tmp).glob("obp-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as archive:
            for name, member in MEMBERS.items():
                target = cache / name
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(target.suffix + ".part")
                partial.write_bytes(archive.read(member))
                partial.replace(target)
    return cache


@dataclass(frozen=True)
class Log:
    """One policy's logged feedback as obp's ``OpenBanditDataset`` gives it, rows by timestamp.

    ``action``: item_id (0..79); ``position``: 0..2 (the CSV's 1..3, dense-ranked minus one);
    ``reward``: click; ``pscore``: the logging policy's propensity of that item at that position;
    ``frame``: the CSV's rows in the same order (user features, affinities, timestamp)."""

    action: np.ndarray
    position: np.ndarray
    reward: np.ndarray
    pscore: np.ndarray
    frame: pl.DataFrame

    @property
    def n_rounds(self) -> int:
        return len(self.action)


def load_log(folder: Path, policy: str) -> Log:
    """``{policy}/all/all.csv`` as obp's ``load_raw_data`` reads it (sorted by timestamp; the file
    already is, so the row order is the file's)."""
    frame = pl.read_csv(folder / policy / CAMPAIGN / f"{CAMPAIGN}.csv").rename({"": "row"})
    frame = frame.sort("timestamp", maintain_order=True)
    _, position = np.unique(frame["position"].to_numpy(), return_inverse=True)
    return Log(frame["item_id"].to_numpy().astype(int), position.astype(int),
               frame["click"].to_numpy().astype(float),
               frame["propensity_score"].to_numpy().astype(float), frame)


def bts_prior(folder: Path, campaign: str = CAMPAIGN) -> tuple[np.ndarray, np.ndarray]:
    """ZOZOTOWN's production Beta prior (alpha, beta) per item, from obp's ``prior_bts.yaml``."""
    prior = yaml.safe_load((folder / "prior_bts.yaml").read_text())[campaign]
    return np.asarray(prior["alpha"], dtype=float), np.asarray(prior["beta"], dtype=float)


def bts_action_dist(alpha: np.ndarray, beta: np.ndarray, len_list: int = 3,
                    n_sim: int = 100_000, random_state: int = SEED,
                    chunk: int = 10_000) -> np.ndarray:
    """pi(item at position k), shape (n_actions, len_list): obp's BernoulliTS
    ``compute_batch_action_dist`` before its tiling over rounds (context-free, the same for
    every round). Each simulation draws one Beta(alpha, beta) sample per item from a
    ``RandomState(random_state)`` (no updates: counts stay zero) and lists the items by
    descending draw (``argsort()[::-1][:len_list]``). The draws are taken ``chunk`` simulations
    at a time; the legacy generator fills an array element by element, so the stream, and the
    result, are those of obp's one-simulation-at-a-time loop."""
    rng = np.random.RandomState(random_state)
    counts = np.zeros((len(alpha), len_list))
    slots = np.arange(len_list)
    for start in range(0, n_sim, chunk):
        size = (min(chunk, n_sim - start), len(alpha))
        draws = rng.beta(np.broadcast_to(alpha, size), np.broadcast_to(beta, size))
        listed = np.argsort(draws, axis=1)[:, ::-1][:, :len_list]
        np.add.at(counts, (listed, slots), 1)
    return counts / n_sim


def per_round(dist: np.ndarray, n_rounds: int) -> np.ndarray:
    """A context-free (n_actions, len_list) table as obp's (n_rounds, n_actions, len_list), a
    read-only view (no copy)."""
    return np.broadcast_to(dist, (n_rounds, *dist.shape))


def importance_weight(action: np.ndarray, position: np.ndarray, pscore: np.ndarray,
                      action_dist: np.ndarray) -> np.ndarray:
    """w_i = pi(a_i, k_i | x_i) / pscore_i."""
    return action_dist[np.arange(len(action)), action, position] / pscore


def ipw(reward: np.ndarray, action: np.ndarray, position: np.ndarray, pscore: np.ndarray,
        action_dist: np.ndarray) -> float:
    """obp's InverseProbabilityWeighting: mean of r_i w_i."""
    return float(np.mean(reward * importance_weight(action, position, pscore, action_dist)))


def snipw(reward: np.ndarray, action: np.ndarray, position: np.ndarray, pscore: np.ndarray,
          action_dist: np.ndarray) -> float:
    """obp's SelfNormalizedInverseProbabilityWeighting: mean of r_i w_i / mean(w)."""
    weight = importance_weight(action, position, pscore, action_dist)
    return float(np.mean(reward * weight / weight.mean()))


def direct_terms(position: np.ndarray, action_dist: np.ndarray,
                 estimated_rewards_by_reg_model: np.ndarray) -> np.ndarray:
    """sum_a pi(a, k_i | x_i) q_hat(x_i, a, k_i) per row (obp's weighted average over actions)."""
    rows = np.arange(len(position))
    return np.average(estimated_rewards_by_reg_model[rows, :, position],
                      weights=action_dist[rows, :, position], axis=1)


def dm(position: np.ndarray, action_dist: np.ndarray,
       estimated_rewards_by_reg_model: np.ndarray) -> float:
    """obp's DirectMethod: mean of the direct terms."""
    return float(np.mean(direct_terms(position, action_dist, estimated_rewards_by_reg_model)))


def dr(reward: np.ndarray, action: np.ndarray, position: np.ndarray, pscore: np.ndarray,
       action_dist: np.ndarray, estimated_rewards_by_reg_model: np.ndarray) -> float:
    """obp's DoublyRobust: mean of q_hat(x_i, pi, k_i) + w_i (r_i - q_hat(x_i, a_i, k_i))."""
    rows = np.arange(len(action))
    factual = estimated_rewards_by_reg_model[rows, action, position]
    weight = importance_weight(action, position, pscore, action_dist)
    direct = direct_terms(position, action_dist, estimated_rewards_by_reg_model)
    return float(np.mean(direct + weight * (reward - factual)))


def click_rate_model(log: Log, n_actions: int, len_list: int) -> np.ndarray:
    """q_hat(a, k): the log's click rate of each (item, position), fitted in-sample (0 where never
    shown), shape (n_actions, len_list); the same for every round (use ``per_round``). With a
    context-free pi and a constant pscore, DR's residuals then sum to zero in every cell: DR = DM."""
    shown = np.zeros((n_actions, len_list))
    clicks = np.zeros((n_actions, len_list))
    np.add.at(shown, (log.action, log.position), 1)
    np.add.at(clicks, (log.action, log.position), log.reward)
    return np.divide(clicks, shown, out=np.zeros_like(clicks), where=shown > 0)


def one_hot_drop_first(frame: pl.DataFrame) -> np.ndarray:
    """pandas ``get_dummies(drop_first=True)``: per column, one indicator per sorted category but
    the first."""
    blocks = []
    for column in frame.columns:
        values = frame[column].to_numpy().astype(str)
        categories = np.unique(values)
        blocks.append(values[:, None] == categories[None, 1:])
    return np.hstack(blocks).astype(float)


def obd_features(folder: Path, log: Log, policy: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """obp's ``OpenBanditDataset.pre_process``: context = the user features one-hot (drop first),
    shape (n_rounds, dim); action context = item_id and item_feature_1..3 label-encoded, then
    item_feature_0, shape (n_actions, 5), row = item_id."""
    context = one_hot_drop_first(log.frame.select(pl.col("^user_feature_.*$")))
    items = pl.read_csv(folder / policy / CAMPAIGN / "item_context.csv").sort("item_id")
    encoded = [np.unique(items[c].to_numpy(), return_inverse=True)[1]
               for c in ("item_id", "item_feature_1", "item_feature_2", "item_feature_3")]
    return context, np.column_stack([*encoded, items["item_feature_0"].to_numpy()]).astype(float)


def logistic_model(log: Log, context: np.ndarray, action_context: np.ndarray,
                   len_list: int = 3, n_folds: int = 3, random_state: int = SEED,
                   max_iter: int = 10_000, c: float = 100.0) -> np.ndarray:
    """q_hat(x_i, a, k), shape (n_rounds, n_actions, len_list): obp's ``RegressionModel``
    (fitting_method "normal") with a ``LogisticRegression(C=c, max_iter, random_state)`` per
    position on [context, action_context[a]], cross-fitted over ``KFold(n_folds, shuffle=True,
    random_state)`` (obp's ``fit_predict``; the settings of obp's OBD benchmark)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    n_actions = len(action_context)
    q_hat = np.zeros((log.n_rounds, n_actions, len_list))
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=random_state).split(context)
    for train, test in folds:
        for k in range(len_list):
            rows = train[log.position[train] == k]
            model = LogisticRegression(C=c, max_iter=max_iter, random_state=random_state)
            model.fit(np.c_[context[rows], action_context[log.action[rows]]], log.reward[rows])
            for a in range(n_actions):
                features = np.c_[context[test], np.repeat(action_context[a][None], len(test), 0)]
                q_hat[test, a, k] = model.predict_proba(features)[:, 1]
    return q_hat


def relative_error(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / truth


FIRST_DAY, LAST_DAY = date(2019, 11, 24), date(2019, 11, 30)  # the sample's days
WHOLE_LOG = (date(2019, 11, 23), date(2019, 11, 23), FIRST_DAY, LAST_DAY)  # every logged day held out


def project(folder: Path, cache: Path) -> Path:
    """A flywheel project with one domain per log, declared as docs/importing.md says; its path."""
    features = [f"user_feature_{i}" for i in range(4)]
    domains = {
        f"obd_{policy}": {
            "shape": "recommendation", "cadence": "weekly", "lookback_days": 4, "holdout_days": 3,
            "exploration_share": 1.0 if policy == "random" else 0.0, "audit_share": 0.0,
            "label_maturity": {"outcome": "click"}, "retention_days": 3650,
            "gate": {"min_samples": 200, "min_ess": 50},
            "importing": {
                "consent": "granted",
                "catalogue": {"file": str(cache / policy / CAMPAIGN / "item_context.csv"), "item": "item_id"},
                "bandit_log": {"timestamp": "timestamp", "item": "item_id", "position": "position",
                               "position_base": 1, "reward": "click", "propensity": "propensity_score",
                               "policy": "explore" if policy == "random" else "champion",
                               "context": features, "model_version": policy},
            },
        } for policy in ("random", "bts")}
    config = folder / "flywheel.yaml"
    config.write_text(yaml.safe_dump({"partitions_start": FIRST_DAY.isoformat(), "domains": domains}))
    return config


def flywheel(*arguments: str, env: dict[str, str]) -> str:
    """Run the ``flywheel`` command; its output (raises with it on failure)."""
    command = [str(Path(sys.executable).with_name("flywheel")), *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


class BernoulliTS:
    """The BTS policy as a model that gives its own slot probabilities: row = the item's pi per slot."""

    def __init__(self, dist: np.ndarray) -> None:
        self.dist = dist

    def predict(self, candidates) -> np.ndarray:  # a pandas DataFrame with SERVING_FEATURES
        return self.dist[candidates["item_id"].astype(int).to_numpy()]


def pipeline_estimates(home_root: Path, config_path: Path, domain: str, dist: np.ndarray) -> dict:
    """flywheel's estimates of BTS from ``domain``'s held-out rows, and the textbook ones on them."""
    import duckdb

    from flywheel_pipeline.config import load_config
    from flywheel_pipeline.home import Home
    from flywheel_pipeline.scoring import UniformScorer
    from flywheel_pipeline.training.base import Windows
    from flywheel_pipeline.validation import compare_models, held_out_evidence
    from flywheel_pipeline.validation.evidence import REWARD_MODEL_KEYS, reward_model

    home, config = Home(home_root), load_config(config_path)
    with duckdb.connect(str(home.warehouse(domain)), read_only=True) as con:
        evidence = held_out_evidence(con, home, config, domain, Windows(*WHOLE_LOG))
    overall = compare_models(evidence, "recommendation", BernoulliTS(dist), UniformScorer()).slices[0].metrics
    shown = evidence.shown.sort("unit")
    action, position = shown["item_id"].cast(pl.Int64).to_numpy(), shown["position"].to_numpy()
    reward, pscore = shown["reward"].to_numpy(), shown["propensity"].to_numpy()
    action_dist = per_round(dist, len(action))
    rho = reward_model(evidence, np.ones(evidence.slate_size), REWARD_MODEL_KEYS["recommendation"])
    options = evidence.options(0, evidence.n_units)  # one row per (held-out row, catalogue item)
    q_hat = np.zeros((evidence.n_units, len(dist)))
    q_hat[options.frame["unit"].to_numpy(), options.frame["item_id"].cast(pl.Int64).to_numpy()] = rho.predict(options)
    q_hat = np.repeat(q_hat[:, :, None], dist.shape[1], axis=2)  # flywheel's rho does not depend on the slot
    feedback = {"reward": reward, "action": action, "position": position, "pscore": pscore,
                "action_dist": action_dist}
    return {
        "rows": len(action),
        "IPW": (overall["pbm_ips"].candidate, ipw(**feedback)),
        "SNIPW": (overall["snips"].candidate, snipw(**feedback)),
        "DR": (overall["dr"].candidate, dr(**feedback, estimated_rewards_by_reg_model=q_hat)),
        "ess": overall["ess"].candidate,
        "uniform": overall["pbm_ips"].champion,
        "click_rate": float(reward.mean()),
    }


def gate_outcome(output: str, domain: str) -> str:
    """What `flywheel run` prints last for ``domain``: its outcome, and the gate's reasons below it."""
    lines = output.strip().splitlines()
    last = max((i for i, line in enumerate(lines) if line.startswith(f"{domain}:")), default=len(lines) - 1)
    reasons = [line.strip() for line in lines[last + 1:last + 2] if line.startswith("  ")]
    return "\n    ".join([lines[last].strip(), *reasons])


def run_pipeline(folder: Path, cache: Path, dist: np.ndarray, truth: float, cycles: bool) -> None:
    """Import both logs, estimate BTS from the random one through the pipeline, run a cycle on each."""
    config = project(folder, cache)
    env = {**os.environ, "FLYWHEEL_HOME": str(folder / "home"), "FLYWHEEL_CONFIG": str(config)}
    for policy in ("random", "bts"):
        domain, csv = f"obd_{policy}", cache / policy / CAMPAIGN / f"{CAMPAIGN}.csv"
        started = time.perf_counter()
        imported = flywheel("import", "bandit", str(csv), "--domain", domain, env=env).splitlines()[0]
        flywheel("run", "--domain", domain, "--start", FIRST_DAY.isoformat(), "--end", LAST_DAY.isoformat(),
                 "--only", "accumulate", env=env)
        print(f"{imported}\n  accumulated and labelled in {time.perf_counter() - started:.0f}s")
    estimates = pipeline_estimates(folder / "home", config, "obd_random", dist)
    print(f"\nBTS estimated through flywheel's validation path: {estimates['rows']} held-out rows of the random "
          f"log x 80 catalogue items (each slot judged as its own decision)")
    print(f"{'estimator':<10} {'flywheel':>10} {'textbook':>10} {'|diff|':>9} {'rel. error':>10}")
    for name in ("IPW", "SNIPW", "DR"):
        mine, textbook = estimates[name]
        print(f"{name:<10} {mine:>10.6f} {textbook:>10.6f} {abs(mine - textbook):>9.1e} "
              f"{relative_error(mine, truth):>10.3f}")
    print(f"truth {truth:.6f} (BTS log); ess of BTS's weights {estimates['ess']:.0f}; the uniform baseline's "
          f"IPW {estimates['uniform']:.6f} = the random log's click rate {estimates['click_rate']:.6f}")
    if cycles:
        print("\nA cycle on each log (train 4 days, hold out 3; champion: the uniform baseline):")
        for policy in ("random", "bts"):
            started = time.perf_counter()
            output = flywheel("run", "--domain", f"obd_{policy}", "--end", LAST_DAY.isoformat(), env=env)
            print(f"  {gate_outcome(output, f'obd_{policy}')}  ({time.perf_counter() - started:.0f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--no-pipeline", action="store_true", help="only the reference side (seconds)")
    parser.add_argument("--no-cycles", action="store_true", help="estimate through the pipeline, run no cycle")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = fetch_obd(args.cache)
    logged, on_policy = load_log(folder, "random"), load_log(folder, "bts")
    n_actions, len_list = int(logged.action.max()) + 1, int(logged.position.max()) + 1
    dist = bts_action_dist(*bts_prior(folder), len_list=len_list)
    action_dist = per_round(dist, logged.n_rounds)
    feedback = {"reward": logged.reward, "action": logged.action, "position": logged.position,
                "pscore": logged.pscore, "action_dist": action_dist}
    rate_q = per_round(click_rate_model(logged, n_actions, len_list), logged.n_rounds)
    logistic_q = logistic_model(logged, *obd_features(folder, logged), len_list=len_list)
    truth = float(on_policy.reward.mean())
    rows = [
        ("IPW", ipw(**feedback)),
        ("SNIPW", snipw(**feedback)),
        ("DM  (click rate per item x position)", dm(logged.position, action_dist, rate_q)),
        ("DR  (click rate per item x position)", dr(**feedback, estimated_rewards_by_reg_model=rate_q)),
        ("DM  (logistic, 3-fold cross-fit)", dm(logged.position, action_dist, logistic_q)),
        ("DR  (logistic, 3-fold cross-fit)", dr(**feedback, estimated_rewards_by_reg_model=logistic_q)),
    ]
    print(f"Open Bandit Dataset (obp 0.4.1 sample, campaign {CAMPAIGN}): {logged.n_rounds} rows "
          f"random -> evaluate BTS ({n_actions} items x {len_list} positions)")
    print(f"random log click rate {logged.reward.mean():.6f}; BTS log click rate (truth) {truth:.6f}")
    print(f"BTS top-{len_list} probabilities: max {dist.max():.4f}, items with pi > 0 "
          f"{int((dist.sum(axis=1) > 0).sum())}; mean importance weight "
          f"{importance_weight(logged.action, logged.position, logged.pscore, action_dist).mean():.4f}")
    print(f"\n{'estimator':<40} {'estimate':>9} {'rel. error':>10} {'/ random':>9}")
    for name, value in rows:
        print(f"{name:<40} {value:>9.6f} {relative_error(value, truth):>10.3f} "
              f"{value / logged.reward.mean():>9.4f}")
    print(f"{'truth (BTS on-policy)':<40} {truth:>9.6f}")
    if not args.no_pipeline:
        with tempfile.TemporaryDirectory(prefix="flywheel-obd-") as tmp:
            run_pipeline(Path(tmp), folder, dist, truth, cycles=not args.no_cycles)
    print(f"\n{time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
