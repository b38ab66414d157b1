"""Issue 16 item 2: the driver (``selftrain run``, local executor) killed with SIGKILL mid-stage and between stages.

Running the same command again finishes the pipeline run: it re-attaches to a stage job that outlived the driver
(waits for it instead of starting a second one), skips the stages that finished, runs every stage exactly once, and
leaves every MLflow run ended (none RUNNING), one run per stage, one model version per model, the promotion with its
decision tag, and each dataset's DVC hash on its stage. Stand-in trainers (tests/pipelines/rank_program.py) under the
real runner, stage jobs, local executor, MLflow (SQLite) and DVC. CI runs the re-attach case (killed while a trainer
runs); ``python benchmarks/faults.py --trials N --only driver-kill`` runs all three fault points N times.
"""
from __future__ import annotations

import pytest

import harness
from conftest import assert_trial


@pytest.mark.slow
@pytest.mark.parametrize("where", ["trainer running"])  # the others: benchmarks/faults.py --only driver-kill
def test_a_killed_driver_is_rerun_to_a_finished_consistent_pipeline_run(where, rng, tmp_path):
    assert_trial(harness.trial_driver_kill(None, rng, tmp_path, where=where))
