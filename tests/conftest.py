"""Shared fixtures: a temporary home folder and the repository's flywheel.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_pipeline.config import FlywheelConfig, load_config
from flywheel_pipeline.home import Home

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home").ensure()


@pytest.fixture
def config() -> FlywheelConfig:
    return load_config(REPO / "flywheel.yaml")


@pytest.fixture(scope="session")
def assistant_cycle(tmp_path_factory):
    """One assistant cycle over simulated days with the training sets' events planted, shared by
    test_pipeline (it reruns the cycle and relabels late outcomes) and then test_training_sets (whose
    last tests forget a user and expire days): one cycle instead of two."""
    from tests.test_pipeline import FIRST, LAST, simulated_cycle
    from tests.test_training_sets import plant

    with simulated_cycle(tmp_path_factory.mktemp("assistant_cycle"), FIRST, LAST, before=plant) as cycle:
        yield cycle
