"""Fixtures of the fault suite (issue 16): the tiny inputs and unfaulted reference runs, made once per session."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> harness.World:
    return harness.World(tmp_path_factory.mktemp("faults-world"))


@pytest.fixture
def rng(request) -> random.Random:
    """Random fault points, reproducible: FAULTS_SEED (default 16) and the test's name pick them."""
    return random.Random(f"{os.environ.get('FAULTS_SEED', '16')}:{request.node.name}")


def assert_trial(trial: harness.Trial) -> None:
    assert trial.recovered and trial.lost == 0, f"{trial.fault}: recovered={trial.recovered} lost={trial.lost}: {trial.detail}"
