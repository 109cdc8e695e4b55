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
