"""Issue 16 item 3: the MLflow server killed (kill -9) mid-stage and started again on the same port.

A real ``mlflow server`` on SQLite, started by the test; a training stage (fit-objects, 2 CPU ranks) logs every step
to it. The stage does not fail on an outage shorter than the configured limit (``tracking.outage_seconds`` of the
pipeline config, passed to every stage in its spec): its metrics wait in a buffer and every step reaches the run once
the server is back; a promotion tried during the outage is refused with nothing changed, and afterwards the alias and
its decision tags move together. An outage longer than the limit fails the stage and the stage job's bookkeeping with
an error naming the server and the limit.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import yaml

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
                                           r"tracking\.outage_seconds\); 1 metric value\(s\) held, 0 sent"):
        buffer.close()


@pytest.fixture(scope="module")
def outage_past_the_limit(tmp_path_factory):
    """A pipeline config with ``tracking.outage_seconds: 2`` on a real MLflow server; a stage spec of that config with
    its run made, the stage job's lineage opened; then the server killed for good (an outage longer than the limit)."""
    from mlflow import MlflowClient

    from pipelines.config import load_config
    from pipelines.stage_job import open_lineage

    tmp = tmp_path_factory.mktemp("outage-limit")
    with harness.MlflowServer(tmp / "mlflow") as server:
        (tmp / "pipeline.yaml").write_text(yaml.safe_dump({"workspace": {"root": str(tmp / "ws")},
                                                           "tracking": {"uri": server.url, "outage_seconds": 2}}))
        spec = load_config(tmp / "pipeline.yaml").new_stage_spec("r1", "fit-objects")
        client = MlflowClient(tracking_uri=server.url)
        spec.tracking.run_id = client.create_run(client.create_experiment(spec.tracking.experiment)).info.run_id
        lineage = open_lineage(spec)
    return SimpleNamespace(tracking=spec.tracking, lineage=lineage)


def _log_in_training_loop(spec, metrics):
    """What a training stage's rank 0 does with its metrics (trainers.engine.fit's logger)."""
    from trainers.engine import MetricLogger

    logger = MetricLogger(spec, is_main=True, total=1, initial=0)
    logger.log(1, metrics)
    logger.close()


def _log_in_other_stage(spec, metrics):
    """What an evaluation or labelling stage does with its metrics."""
    from trainers.inputs import log_metrics

    log_metrics(spec, metrics, step=1)


@pytest.mark.parametrize("log", [_log_in_training_loop, _log_in_other_stage], ids=["training-loop", "other-stage"])
def test_a_stage_fails_once_an_outage_outlasts_the_configured_limit(outage_past_the_limit, tmp_path, log):
    from contract.spec import StageSpec
    from trainers.inputs import MlflowOutage

    t = outage_past_the_limit.tracking
    spec = StageSpec(stage="fit-objects", name="s", outputs={"workdir": str(tmp_path)}, tracking=t)
    start = time.monotonic()
    with pytest.raises(MlflowOutage, match=rf"MLflow at {t.mlflow_uri} has not taken metrics of run {t.run_id} for \d+ s "
                                           r"\(limit 2 s, tracking\.outage_seconds\); 1 metric value\(s\) held, 0 sent"):
        log(spec, {"train/loss": 0.5})
    assert 2 <= time.monotonic() - start < 30


def test_the_stage_jobs_bookkeeping_gives_up_after_the_configured_limit(outage_past_the_limit, monkeypatch):
    from pipelines.lineage import TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each try fails at once; the limit is ours
    lineage = outage_past_the_limit.lineage
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"unreachable for \d+ s \(limit 2 s, tracking\.outage_seconds\): "
                                                  r"tagging the stage run not done"):
        lineage.retry("tagging the stage run", lambda: lineage.client.set_tag(outage_past_the_limit.tracking.run_id, "k", "v"),
                      echo=lambda _: None)
    assert 2 <= time.monotonic() - start < 30


@pytest.mark.parametrize("value", [0, -5, "soon", math.inf], ids=["zero", "negative", "text", "inf"])
def test_a_bad_outage_limit_is_refused_naming_the_field(tmp_path, value):
    from contract.spec import SpecError, StageSpec
    from pipelines.config import load_config

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"tracking": {"outage_seconds": value}}))
    with pytest.raises(SpecError, match=r"pipeline\.yaml: invalid configuration\n  tracking\.outage_seconds: "):
        load_config(tmp_path / "pipeline.yaml")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"stage": "fit-objects", "name": "s", "outputs": {"workdir": "w"},
                                                        "tracking": {"outage_seconds": value}}))
    with pytest.raises(SpecError, match=r"spec\.yaml: invalid configuration\n  tracking\.outage_seconds: "):
        StageSpec.load(tmp_path / "spec.yaml")
