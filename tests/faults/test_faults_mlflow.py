"""Issue 16 item 3: the MLflow server killed (kill -9) mid-stage and started again on the same port.

A real ``mlflow server`` on SQLite, started by the test; a training stage (fit-objects, 2 CPU ranks) logs every step
to it. The stage does not fail on an outage shorter than ``SELFTRAIN_MLFLOW_OUTAGE_SECONDS``: its metrics wait in a
buffer and every step reaches the run once the server is back; a promotion tried during the outage is refused with
nothing changed, and afterwards the alias and its decision tags move together. Failing on an outage longer than the
limit, and the clear error, are checked against a port where no server ever answers.
"""
from __future__ import annotations

import pytest

import harness
from conftest import assert_trial


@pytest.mark.slow
def test_a_stage_outlives_an_mlflow_restart_and_loses_no_metric(world, rng, tmp_path):
    assert_trial(harness.trial_mlflow_outage(world, rng, tmp_path))


def test_metrics_held_longer_than_the_outage_limit_fail_naming_the_server():
    from trainers.inputs import MetricBuffer, MlflowOutage

    url = f"http://127.0.0.1:{harness.free_port()}"  # nothing listens there: an outage that never ends
    buffer = MetricBuffer(url, "0123abcd", limit=1.0)
    buffer.log({"train/loss": 0.5}, 2)
    with pytest.raises(MlflowOutage, match=rf"MLflow at {url} has not taken metrics of run 0123abcd for \d+ s \(limit 1 s, "
                                           r"SELFTRAIN_MLFLOW_OUTAGE_SECONDS\); 1 metric value\(s\) held, 0 sent"):
        buffer.close()
