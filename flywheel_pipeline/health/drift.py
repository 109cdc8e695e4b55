"""Input drift: has the traffic the champion serves moved away from the traffic it was trained on?

The reference is the deployed champion's training window (its registry tags ``training.train_start``
.. ``training.train_end``); before the first champion, the domain's first ``lookback_days`` of
traffic. The recent traffic is the last ``drift.recent_days`` days the warehouse holds. Both are read
from ``marts.fct_impressions`` (``sources.IMPRESSIONS``), never after the recent window's last day.

Per serving feature (``scoring.SERVING_FEATURES``) that describes the request rather than naming a
user or an item, the population stability index between the two windows' distributions:

    segment                          categories (a missing value is its own category)
    context:<name>                   each numeric context feature (``context_features`` JSON),
                                     binned by the reference's deciles; absent is its own bin
    input_length                     the input text's length in characters, by the same deciles
    input_tokens                     (assistant) the share of each of the reference's top
                                     TOP_TOKENS tokens among the input's tokens, the rest as one

``is_new_user`` and ``policy`` describe the product's age and its exploration, not what users ask:
a young product's share of new users falls week after week (the simulator's does, from 100%), and
would read as drift every day. The identities (``user_id``, ``item_id``, ``item_content``) have too many values for a PSI; the
items' drift is measured instead as the share of new items (``new_item_share``): among the
candidates the recent requests were ranked over, where they logged them (``context.candidates``),
those the reference window neither offered nor showed; else among the recent impressions, those it
never showed. The candidates see a new item the champion ranks low, which impressions rarely do.

The population stability index (Siddiqi 2006, "Credit Risk Scorecards", ch. 8; Yurdakul 2018,
"Statistical properties of population stability index") is

    PSI = sum over bins b of (p_recent[b] - p_ref[b]) * ln(p_recent[b] / p_ref[b])

the symmetric Kullback-Leibler divergence (Jeffreys divergence) between the two binned
distributions. The usual rule of thumb: below 0.1 no significant change, 0.1 to 0.25 a moderate
one, above 0.25 a large one; ``drift.max_psi`` defaults to 0.2. What it assumes:

- the bins are fixed by the reference (its deciles), so a shift within a bin goes unseen and a
  feature the reference holds constant has one bin, hence a PSI of 0;
- both windows are samples large enough for their bin shares to be estimates: without any change
  the PSI is still about (bins - 1) * (1/n_ref + 1/n_recent) (Yurdakul 2018), 0.005 for 10 bins,
  2,000 recent and 20,000 reference interactions; a few hundred recent rows make it noisy;
- rows are independent draws (a user's many interactions are not; the index is descriptive);
- an empty bin has no logarithm: its share is floored at PSI_FLOOR (0.0001, i.e. 0.01%) on both
  sides, so a category absent from the reference and holding 30% of the recent traffic counts
  (0.3 - 0.0001) * ln(0.3 / 0.0001) = 2.4, not infinity.

Per-interaction features are measured over distinct interactions (a slate's five rows are one
request); the new-item share over candidates (or impressions).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
import polars as pl

from flywheel_pipeline.config import DomainConfig, Drift
from flywheel_pipeline.scoring import tokens
from flywheel_pipeline.sources import IMPRESSIONS, Readable, as_source
from flywheel_pipeline.training.base import Windows, context_features
from flywheel_pipeline.validation.evidence import logged_candidates

PSI_FLOOR = 1e-4  # an empty bin's share, on either side (ln(0) is undefined)
DECILES = np.linspace(0.1, 0.9, 9)  # a numeric feature's bin edges: the reference's deciles
TOP_TOKENS = 20  # the input tokens compared one by one; the rest are one bin
MISSING = "(missing)"
OTHER = "(other)"
CATEGORICAL = ("segment",)
COLUMNS = ["event_date", "interaction_id", "item_id", "policy", "is_new_user", "segment", "context_features",
           "input_text"]
TRAIN_START_TAG, TRAIN_END_TAG = "training.train_start", "training.train_end"  # the champion's lineage


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    bins: int  # the bins (categories) compared


@dataclass(frozen=True)
class DriftReport:
    """A domain's input drift: the recent days against the reference window, and the verdict."""

    domain: str
    reference: str  # what the reference window is: "champion v3's training window", ...
    reference_start: date
    reference_end: date
    recent_start: date
    recent_end: date
    reference_interactions: int
    recent_interactions: int
    features: tuple[FeatureDrift, ...]
    new_item_share: float
    max_psi: float
    max_new_item_share: float
    note: str = ""  # why nothing could be measured, when so
    new_items_among: str = "impressions"  # or "candidates": what the new-item share counts
    reasons: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        reasons = [f"{f.feature}: PSI {f.psi:.3f} > {self.max_psi:g}" for f in self.features if f.psi > self.max_psi]
        if self.new_item_share > self.max_new_item_share:
            reasons.append(f"new items: {self.new_item_share:.1%} of recent {self.new_items_among} > "
                           f"{self.max_new_item_share:.0%}")
        object.__setattr__(self, "reasons", tuple(reasons))

    @property
    def drifted(self) -> bool:
        return bool(self.reasons)

    @property
    def largest(self) -> FeatureDrift | None:
        return max(self.features, key=lambda f: f.psi, default=None)

    def measures(self) -> dict[str, float]:
        """Flat numbers: ``psi@<feature>``, ``max_psi``, ``new_item_share`` (NaN when unmeasured)."""
        largest = self.largest
        return {**{f"psi@{f.feature}": f.psi for f in self.features},
                "max_psi": largest.psi if largest else math.nan, "new_item_share": self.new_item_share}

    def summary(self) -> str:
        """One line: the verdict and the measured values."""
        windows = (f"{self.recent_start}..{self.recent_end} ({self.recent_interactions} interactions) vs "
                   f"{self.reference} {self.reference_start}..{self.reference_end} "
                   f"({self.reference_interactions})")
        if self.note:
            return f"{self.domain}: not measured: {self.note}"
        largest = self.largest
        values = (f"largest PSI {largest.psi:.3f} ({largest.feature}) vs {self.max_psi:g}"
                  if largest else "no feature to compare")
        values += f", new items {self.new_item_share:.1%} of {self.new_items_among} vs {self.max_new_item_share:.0%}"
        verdict = "drifted: " + "; ".join(self.reasons) if self.drifted else "no drift"
        return f"{self.domain}: {verdict} ({values}; {windows})"

    def to_dict(self) -> dict[str, object]:
        return {"domain": self.domain, "reference": self.reference,
                "reference_start": self.reference_start.isoformat(), "reference_end": self.reference_end.isoformat(),
                "recent_start": self.recent_start.isoformat(), "recent_end": self.recent_end.isoformat(),
                "reference_interactions": self.reference_interactions,
                "recent_interactions": self.recent_interactions,
                "features": [{"feature": f.feature, "psi": f.psi, "bins": f.bins} for f in self.features],
                "new_item_share": self.new_item_share, "new_items_among": self.new_items_among, "max_psi": self.max_psi,
                "max_new_item_share": self.max_new_item_share, "note": self.note,
                "drifted": self.drifted, "reasons": list(self.reasons)}


# --- the statistic ---------------------------------------------------------------------------

def psi(reference: Iterable[float], recent: Iterable[float], floor: float = PSI_FLOOR) -> float:
    """The PSI of two histograms over the same bins (counts or shares; each is normalised), each
    bin's share floored at ``floor``. 0 when either histogram is empty."""
    ref, new = np.asarray(list(reference), dtype=float), np.asarray(list(recent), dtype=float)
    if ref.sum() <= 0 or new.sum() <= 0:
        return 0.0
    p_ref = np.maximum(ref / ref.sum(), floor)
    p_new = np.maximum(new / new.sum(), floor)
    return float(np.sum((p_new - p_ref) * np.log(p_new / p_ref)))


def _histograms(reference: Iterable[object], recent: Iterable[object]) -> tuple[list[int], list[int]]:
    ref, new = Counter(reference), Counter(recent)
    keys = sorted(set(ref) | set(new), key=str)
    return [ref[key] for key in keys], [new[key] for key in keys]


def categorical_psi(reference: Iterable[object], recent: Iterable[object]) -> FeatureDrift:
    """PSI over the categories either side holds (None: its own category)."""
    ref, new = _histograms((MISSING if v is None else str(v) for v in reference),
                           (MISSING if v is None else str(v) for v in recent))
    return FeatureDrift("", psi(ref, new), len(ref))


def numeric_psi(reference: Iterable[float | None], recent: Iterable[float | None]) -> FeatureDrift:
    """PSI over bins cut at the reference's deciles (ties merge bins); a missing value is a bin."""
    ref = np.asarray([math.nan if v is None else v for v in reference], dtype=float)
    new = np.asarray([math.nan if v is None else v for v in recent], dtype=float)
    present = ref[~np.isnan(ref)]
    edges = np.unique(np.quantile(present, DECILES)) if present.size else np.array([])

    def binned(values: np.ndarray) -> list[object]:
        bins = np.searchsorted(edges, values, side="left")  # (edge[i-1], edge[i]] -> i
        return [MISSING if math.isnan(v) else int(b) for v, b in zip(values, bins)]

    ref_counts, new_counts = _histograms(binned(ref), binned(new))
    return FeatureDrift("", psi(ref_counts, new_counts), len(ref_counts))


def token_psi(reference: Iterable[str | None], recent: Iterable[str | None], top: int = TOP_TOKENS) -> FeatureDrift:
    """PSI of the input tokens' distribution: each of the reference's ``top`` most frequent tokens
    (counted once per text), the rest as one bin."""
    ref_tokens = [tokens(text or "") for text in reference]
    new_tokens = [tokens(text or "") for text in recent]
    counts = Counter(token for found in ref_tokens for token in found)
    kept = {token for token, _ in counts.most_common(top)}
    ref, new = _histograms((t if t in kept else OTHER for found in ref_tokens for t in found),
                           (t if t in kept else OTHER for found in new_tokens for t in found))
    return FeatureDrift("", psi(ref, new), len(ref))


# --- a domain's windows ----------------------------------------------------------------------

def _named(drift: FeatureDrift, feature: str) -> FeatureDrift:
    return FeatureDrift(feature, drift.psi, drift.bins)


def _contexts(rows: pl.DataFrame) -> list[dict[str, float]]:
    return [context_features(text) for text in rows["context_features"].to_list()]


def measure(reference: pl.DataFrame, recent: pl.DataFrame, settings: Drift, shape: str, domain: str,
            reference_window: tuple[date, date], recent_window: tuple[date, date],
            reference_name: str = "reference", offered: tuple[pl.Series, pl.Series] | None = None) -> DriftReport:
    """The drift of ``recent``'s impressions from ``reference``'s (marts.fct_impressions rows with
    COLUMNS), judged against ``settings``; ``offered``: the item ids of the candidates each
    window's requests logged (``offered_items``), when the recent ones did."""
    window = {"domain": domain, "reference": reference_name,
              "reference_start": reference_window[0], "reference_end": reference_window[1],
              "recent_start": recent_window[0], "recent_end": recent_window[1],
              "max_psi": settings.max_psi, "max_new_item_share": settings.max_new_item_share}
    ref_requests = reference.unique("interaction_id", keep="first", maintain_order=True)
    new_requests = recent.unique("interaction_id", keep="first", maintain_order=True)
    counts = {"reference_interactions": ref_requests.height, "recent_interactions": new_requests.height}
    if reference.is_empty() or recent.is_empty():
        empty = "reference window" if reference.is_empty() else "recent days"
        return DriftReport(**window, **counts, features=(), new_item_share=math.nan,
                           note=f"no impressions in the {empty}")
    features = [_named(categorical_psi(ref_requests[name].to_list(), new_requests[name].to_list()), name)
                for name in CATEGORICAL]
    ref_context, new_context = _contexts(ref_requests), _contexts(new_requests)
    for name in sorted({key for row in ref_context + new_context for key in row}):
        features.append(_named(numeric_psi([row.get(name) for row in ref_context],
                                           [row.get(name) for row in new_context]), f"context:{name}"))
    lengths = [ref_requests["input_text"].fill_null("").str.len_chars().to_list(),
               new_requests["input_text"].fill_null("").str.len_chars().to_list()]
    features.append(_named(numeric_psi(*lengths), "input_length"))
    if shape == "assistant":
        features.append(_named(token_psi(ref_requests["input_text"].to_list(), new_requests["input_text"].to_list()),
                               "input_tokens"))
    seen, recent_items, among = reference["item_id"], recent["item_id"], "impressions"
    if offered is not None and not offered[1].is_empty():
        seen, recent_items, among = pl.concat([seen, offered[0]]), offered[1], "candidates"
    new_items = recent_items.is_in(seen.unique().implode()).not_().mean()
    return DriftReport(**window, **counts, features=tuple(features), new_item_share=float(new_items),
                       new_items_among=among)


def offered_items(source: Readable, domain: str, start: date, end: date) -> pl.Series:
    """The item id of every candidate the requests of start..end logged (empty where none did)."""
    if start > end:
        return pl.Series("item_id", [], pl.String)
    return logged_candidates(source, domain, Windows(start - timedelta(days=1), start - timedelta(days=1),
                                                     start, end))["item_id"]


def traffic_days(source: Readable, domain: str) -> tuple[date, date] | None:
    """The first and latest day of ``domain``'s impressions in the warehouse (None: none yet)."""
    days = as_source(source).read(IMPRESSIONS, domain, columns=["event_date"])
    if days.is_empty() or days["event_date"].null_count() == days.height:
        return None
    return days["event_date"].min(), days["event_date"].max()


def reference_window(settings: DomainConfig, first_day: date, champion: str | None,
                     champion_tags: Mapping[str, str] | None) -> tuple[date, date, str]:
    """(start, end, what it is): the champion's training window, from its registry tags; before the
    first champion (or for one registered without them), the domain's first lookback_days."""
    tags = champion_tags or {}
    if champion and TRAIN_START_TAG in tags and TRAIN_END_TAG in tags:
        return (date.fromisoformat(tags[TRAIN_START_TAG]), date.fromisoformat(tags[TRAIN_END_TAG]),
                f"champion v{champion}'s training window")
    what = (f"the first {settings.lookback_days} days (champion v{champion} names no training window)"
            if champion else f"the first {settings.lookback_days} days (no champion yet)")
    return first_day, first_day + timedelta(days=settings.lookback_days - 1), what


def domain_drift(source: Readable, settings: DomainConfig, domain: str, champion: str | None = None,
                 champion_tags: Mapping[str, str] | None = None, as_of: date | None = None) -> DriftReport | None:
    """``domain``'s drift: its last ``drift.recent_days`` days up to ``as_of`` (default: the latest
    day the warehouse holds) against the reference window (``reference_window``), which is cut
    before the recent days so they never overlap. None when the warehouse holds no impression."""
    source = as_source(source)
    days = traffic_days(source, domain)
    if days is None:
        return None
    first_day, latest = days
    recent_end = as_of or latest
    recent_start = recent_end - timedelta(days=settings.drift.recent_days - 1)
    start, end, what = reference_window(settings, first_day, champion, champion_tags)
    end = min(end, recent_start - timedelta(days=1))
    reference = (source.read(IMPRESSIONS, domain, start, end, COLUMNS) if start <= end
                 else pl.DataFrame(schema={name: pl.String for name in COLUMNS}))
    recent = source.read(IMPRESSIONS, domain, recent_start, recent_end, COLUMNS)
    offered = offered_items(source, domain, start, end), offered_items(source, domain, recent_start, recent_end)
    return measure(reference, recent, settings.drift, settings.shape, domain, (start, max(start, end)),
                   (recent_start, recent_end), what, offered)
