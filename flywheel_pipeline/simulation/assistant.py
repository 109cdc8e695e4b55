"""The assistant domain: a user asks, the served model picks one of K candidate responses.

Queries and answers come from the bundled chatterbot corpus (21 categories). A response is truly
good for a query iff it is one of that query's own answers; each query's candidates are its
answer(s) plus distractors, mostly from its own category. Reactions follow the hidden truth,
noisily: good responses are mostly accepted, copied and later resolved; bad ones reformulated,
rejected, heavily edited or abandoned.
"""

from __future__ import annotations

from datetime import date
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import yaml

from flywheel_pipeline.scoring import Scorer
from flywheel_pipeline.simulation.delivery import EventLog
from flywheel_pipeline.simulation.scenarios import Shift
from flywheel_pipeline.simulation.serving import (
    Audit,
    DayLog,
    Policy,
    candidate_frame,
    impressions,
    logged_candidates,
    score,
    serve,
)
from flywheel_pipeline.simulation.world import (
    RATING_NOISE,
    RATING_SHARE,
    Stream,
    Traffic,
    World,
    rng_for,
)

K = 5                        # candidate responses per query
SAME_CATEGORY = 0.8          # share of distractors drawn from the query's own category
SECOND_ANSWER = 0.3          # chance a query with several answers has two good candidates
QUERY_POPULARITY = 0.9       # Zipf exponent of how often each query is asked
RESOLVE_DELAY_H = (20.0, 1.0)  # lognormal (median hours, sigma), clipped to 1 h .. 10 days

# A user's reaction to the response, by whether it was truly good (each row sums to 1).
REACTIONS = ("accept", "accept_copy", "copy", "light_edit", "nothing", "abandon", "reject",
             "reformulate", "heavy_edit", "accept_revert")
WHEN_GOOD = (0.42, 0.28, 0.05, 0.05, 0.08, 0.06, 0.03, 0.03, 0.00, 0.00)
WHEN_BAD = (0.04, 0.02, 0.03, 0.00, 0.05, 0.20, 0.20, 0.33, 0.08, 0.05)
RESOLVED = {True: (0.60, 0.08), False: (0.05, 0.35)}  # good? -> P(resolved 1), P(resolved 0)
EVALUATION_USER = "u_000000000000"  # a neutral returning user, for true_accuracy
REPHRASINGS = ("no, {q}", "let me rephrase: {q}", "{q} I mean", "again: {q}",
               "{q} please be specific")


class Exchange(NamedTuple):
    """One query and the response shown for it, with the answer the user actually wanted."""

    item_id: str       # the response shown
    text: str
    query: str
    true_answer: str


class Assistant:
    """The corpus as the product knows it, plus the hidden truth of which candidates are good."""

    def __init__(self, queries: pl.DataFrame, responses: pl.DataFrame, candidates: pl.DataFrame,
                 shift: Shift | None = None):
        self.queries = queries        # query_id, category, text, popularity
        self.shift = shift or Shift(None, 0, "")  # the world's scenario (simulation/scenarios.py)
        self.responses = responses    # response_id, category, text
        self.candidates = candidates  # query_id, slot, response_id, good (the hidden truth)
        index = {rid: n for n, rid in enumerate(responses["response_id"])}
        self.query_text = queries["text"].to_numpy()
        self.popularity = queries["popularity"].to_numpy()
        self.response_id = responses["response_id"].to_numpy()
        self.response_text = responses["text"].to_numpy()
        self.slots = np.array([index[r] for r in candidates["response_id"]]).reshape(-1, K)
        self.good = candidates["good"].to_numpy().reshape(-1, K)
        self.answer = self.slots[np.arange(len(self.slots)), self.good.argmax(axis=1)]

    @classmethod
    def open(cls, world: World) -> Assistant:
        """Load the world's corpus, or build it on first use."""
        names = ("queries", "responses", "candidates")
        paths = [world.folder / f"{name}.parquet" for name in names]
        if all(p.exists() for p in paths):
            assistant = cls(*(pl.read_parquet(p) for p in paths))
        else:
            assistant = _build(rng_for(world.seed, world.domain, Stream.CATALOGUE))
            assistant.save(world.folder)
        assistant.shift = Shift.of_world(world)
        if assistant.shift.scenario and not (world.folder / "scenario.json").exists():
            moved = assistant.shift.moved_answers(assistant.good, assistant.popularity)
            assistant.shift.record(world.folder, {
                "moved_answers": {assistant.queries["query_id"][q]:
                                  assistant.response_id[assistant.slots[q, slot]]
                                  for q, slot in moved.items()},
                "moved_share": float(assistant.popularity[list(moved)].sum()),
            })
        return assistant

    def truth_on(self, day: date) -> tuple[np.ndarray, np.ndarray]:
        """(queries, K) which candidates are truly good on ``day``, and each query's answer (the
        response a user who edits heavily writes)."""
        if not self.shift.shifted(day):
            return self.good, self.answer
        good = self.shift.good_on(day, self.good, self.popularity)
        return good, self.slots[np.arange(len(self.slots)), good.argmax(axis=1)]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.queries.write_parquet(folder / "queries.parquet")
        self.responses.write_parquet(folder / "responses.parquet")
        self.candidates.write_parquet(folder / "candidates.parquet")

    def serve_day(self, traffic: Traffic, policy: Policy,
                  rng: dict[Stream, np.random.Generator]) -> DayLog:
        query = self._queries(traffic, rng[Stream.REQUESTS])
        slots = self.slots[query]
        frame = candidate_frame(traffic.domain, traffic.user_id, None, traffic.is_new_user,
                                self.query_text[query], self.response_id[slots],
                                self.response_text[slots])
        scores, versions = policy.score(frame, K, rng[Stream.ROUTING])
        served = serve(scores, 1, policy.exploration_share, rng[Stream.SERVING])
        chosen = served.slate[:, 0]
        response = slots[np.arange(len(query)), chosen]
        truly_good, answer = self.truth_on(traffic.day)
        good = truly_good[query, chosen]
        shown = impressions(self.response_id[response][:, None],
                            self.response_text[response][:, None], served.propensity)
        ranked = logged_candidates(self.response_id[slots], self.response_text[slots],
                                   served.candidate_propensity)
        exchanges = [Exchange(*row) for row in zip(
            self.response_id[response].tolist(), self.response_text[response].tolist(),
            self.query_text[query].tolist(), self.response_text[answer[query]].tolist())]
        log = EventLog(traffic)
        reactions = _Reactions(good, policy.audit, rng[Stream.REACTIONS])
        for i, (exchange, policy_name, version, bot) in enumerate(
                zip(exchanges, served.policy.tolist(), versions.tolist(), traffic.bot.tolist())):
            log.interaction(i, model_version=version, policy=policy_name,
                            input_text=exchange.query, impressions=shown[i],
                            context={"candidates": ranked[i]})
            reactions.log(log, i, exchange, bot)
        truth = pl.DataFrame({"interaction_id": traffic.interaction_id,
                              "item_id": self.response_id[response], "good": good},
                             schema_overrides={"interaction_id": pl.String, "item_id": pl.String})
        if self.shift.shifted(traffic.day):
            truth = truth.with_columns(scenario=(truly_good != self.good).any(axis=1)[query])
        return DayLog(log.events, truth)

    def _queries(self, traffic: Traffic, rng: np.random.Generator) -> np.ndarray:
        """What each interaction asks; a bot repeats its session's first query."""
        return traffic.bots_repeat(rng.choice(len(self.queries), size=len(traffic),
                                              p=self.popularity))

    def accuracy(self, world: World, scorer: Scorer, day: date | None = None, segment: str | None = None) -> float:
        """Share of traffic whose top-scored candidate is truly good.

        Every query counts with its popularity (the expected share over served queries); a tie
        at the top counts the share of good candidates among the tied ones (random tie-break).
        The truth is the one of ``day`` (default: the last simulated day) under the world's
        scenario. The assistant's requests carry no segment: ``segment`` must be None.
        """
        if segment is not None:
            raise ValueError(f"{world.domain}: an assistant's requests carry no segment to score {segment!r} on")
        good, _ = self.truth_on(day or world.last_day or world.epoch)
        n = len(self.queries)
        frame = candidate_frame(world.domain, np.full(n, EVALUATION_USER), None,
                                np.zeros(n, bool), self.query_text, self.response_id[self.slots],
                                self.response_text[self.slots])
        scores = score(scorer, frame, K)
        top = scores == scores.max(axis=1, keepdims=True)
        hit = (top & good).sum(axis=1) / top.sum(axis=1)
        return float(hit @ self.popularity)


class _Reactions:
    """How each user reacts to what they were served, drawn for the whole day in one go."""

    DRAWS = ("reaction", "when", "detail", "rated", "rating_noise", "rating", "rated_after",
             "resolved", "reviewed", "review_noise", "reviewed_after")

    def __init__(self, good: np.ndarray, audit: Audit, rng: np.random.Generator):
        self.good = good
        self.audit = audit
        self.u = {name: rng.random(len(good)) for name in self.DRAWS}
        cumulative = np.where(good[:, None], WHEN_GOOD, WHEN_BAD).cumsum(axis=1)
        chosen = (self.u["reaction"][:, None] > cumulative).sum(axis=1)
        self.reaction = np.minimum(chosen, len(REACTIONS) - 1)
        median_h, sigma = RESOLVE_DELAY_H
        delay_h = np.clip(rng.lognormal(np.log(median_h), sigma, len(good)), 1, 240)
        self.resolve_after_s = (delay_h * 3600).astype(np.int64)

    def log(self, log: EventLog, i: int, exchange: Exchange, bot: bool) -> None:
        if bot:
            log.signal(i, 1, "accept")  # rubber-stamps everything, seconds apart
        else:
            self._react(log, i, exchange)
            self._rate(log, i)
            self._resolve(log, i)
        self._review(log, i, exchange.item_id)

    def _react(self, log: EventLog, i: int, exchange: Exchange) -> None:
        reaction = REACTIONS[self.reaction[i]]
        when, detail = self.u["when"][i], self.u["detail"][i]
        if reaction in ("accept", "accept_copy"):
            accepted_after = int(3 + 57 * when)
            log.signal(i, accepted_after, "accept")
            if reaction == "accept_copy":
                log.signal(i, accepted_after + int(1 + 19 * detail), "copy")
        elif reaction == "accept_revert":
            accepted_after = int(3 + 27 * when)
            log.signal(i, accepted_after, "accept")
            log.signal(i, accepted_after + int(60 + 540 * detail), "revert")
        elif reaction == "copy":
            log.signal(i, int(5 + 55 * when), "copy")
        elif reaction == "light_edit":
            log.signal(i, int(20 + 160 * when), "edit", text=_lightly_edited(exchange.text))
        elif reaction == "heavy_edit":
            log.signal(i, int(20 + 160 * when), "edit", text=exchange.true_answer)
        elif reaction == "abandon":
            log.signal(i, int(10 + 110 * when), "abandon")
        elif reaction == "reject":
            log.signal(i, int(2 + 28 * when), "reject")
        elif reaction == "reformulate":
            rephrasing = REPHRASINGS[int(detail * len(REPHRASINGS))]
            query = exchange.query[:1].lower() + exchange.query[1:]
            log.signal(i, int(3 + 27 * when), "reformulate", text=rephrasing.format(q=query))

    def _rate(self, log: EventLog, i: int) -> None:
        if self.u["rated"][i] >= RATING_SHARE:
            return
        u = self.u["rating"][i]
        if self.u["rating_noise"][i] < RATING_NOISE:
            rating = 1 + int(u * 5)
        elif self.good[i]:
            rating = 3 + int(np.searchsorted([0.1, 0.4], u))   # 3, 4 or 5, mostly 5
        else:
            rating = 1 + int(np.searchsorted([0.55, 0.85], u))  # 1, 2 or 3, mostly 1
        log.signal(i, int(10 + 290 * self.u["rated_after"][i]), "rating", value=rating)

    def _resolve(self, log: EventLog, i: int) -> None:
        resolved, unresolved = RESOLVED[bool(self.good[i])]
        u = self.u["resolved"][i]
        if u < resolved + unresolved:
            log.outcome(i, self.resolve_after_s[i], "resolved", 1.0 if u < resolved else 0.0)

    def _review(self, log: EventLog, i: int, item_id: str) -> None:
        """The audit sample: a reviewer's verdict on the response, from the hidden truth."""
        u = self.u["reviewed"][i]
        if not self.audit.reviewed(u):
            return
        verdict = bool(self.good[i]) != (self.u["review_noise"][i] < self.audit.reviewer_error)
        log.review(i, self.audit.delay_s(self.u["reviewed_after"][i]), verdict, item_id=item_id,
                   reviewer=self.audit.reviewer(u))


def _lightly_edited(response: str) -> str:
    """A small touch-up: the last word dropped, or an exclamation added."""
    words = response.split()
    return " ".join(words[:-1]) if len(words) > 3 else response.rstrip(".") + "!"


def _read_corpus() -> dict[str, tuple[str, list[str]]]:
    """question -> (category, its distinct answers), from the corpus's english files."""
    folder = resources.files("chatterbot_corpus").joinpath("data", "english")
    corpus: dict[str, tuple[str, list[str]]] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yml"):
            continue
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
        for conversation in document["conversations"]:
            if len(conversation) < 2 or not all(isinstance(t, str) for t in conversation[:2]):
                continue
            question, answer = conversation[0].strip(), conversation[1].strip()
            _, answers = corpus.setdefault(question, (path.name.removesuffix(".yml"), []))
            if answer not in answers:
                answers.append(answer)
    return corpus


def _build(rng: np.random.Generator) -> Assistant:
    """Queries with Zipf popularity; K candidates each: answer(s) plus distractors."""
    corpus = _read_corpus()
    response_index: dict[str, int] = {}
    response_category: list[str] = []
    for category, answers in corpus.values():
        for answer in answers:
            if answer not in response_index:
                response_index[answer] = len(response_index)
                response_category.append(category)
    everything = list(range(len(response_index)))
    by_category: dict[str, list[int]] = {}
    for r, category in enumerate(response_category):
        by_category.setdefault(category, []).append(r)
    rank = rng.permutation(len(corpus)) + 1
    popularity = rank ** -QUERY_POPULARITY
    rows = []
    for q, (category, answers) in enumerate(corpus.values()):
        own = [response_index[a] for a in answers]
        n_good = 2 if len(own) > 1 and rng.random() < SECOND_ANSWER else 1
        chosen = [int(r) for r in rng.choice(own, n_good, replace=False)]
        same = _sample(rng, by_category[category], set(own),
                       rng.binomial(K - n_good, SAME_CATEGORY))
        other = _sample(rng, everything, set(own) | set(same), K - n_good - len(same))
        slots = rng.permutation(chosen + same + other)
        rows += [(f"q_{q:04d}", slot, f"r_{r:04d}", bool(r in own)) for slot, r in enumerate(slots)]
    return Assistant(
        queries=pl.DataFrame({"query_id": [f"q_{q:04d}" for q in range(len(corpus))],
                              "category": [category for category, _ in corpus.values()],
                              "text": list(corpus), "popularity": popularity / popularity.sum()}),
        responses=pl.DataFrame({"response_id": [f"r_{r:04d}" for r in everything],
                                "category": response_category, "text": list(response_index)}),
        candidates=pl.DataFrame(rows, schema=["query_id", "slot", "response_id", "good"],
                                orient="row"),
    )


def _sample(rng: np.random.Generator, pool: list[int], exclude: set[int], size: int) -> list[int]:
    """Up to ``size`` distinct members of ``pool`` not in ``exclude``."""
    allowed = [r for r in pool if r not in exclude]
    return [int(r) for r in rng.choice(allowed, min(size, len(allowed)), replace=False)]
