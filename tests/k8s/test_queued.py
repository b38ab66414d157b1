"""Queued is told apart from unschedulable and pulling (issue 15 item 3), on the local control plane without Kueue or
a gang scheduler: a PyTorchJob suspended until admitted (what Kueue does) and pods waiting for a scheduler that does
not run (what a gang scheduler's queue looks like) fail after queued_timeout_seconds with that reason and what to
check, and the job is not left holding a place."""
from __future__ import annotations

import pytest

from cluster_helpers import namespace  # noqa: F401  (fixture)
from executor_helpers import executor, jobs, stage_job
from pipelines.executors.kubernetes import PendingTimeout

pytestmark = pytest.mark.cluster


def test_a_job_suspended_until_admitted_is_queued_not_unschedulable(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "suspended", queued_timeout_seconds=3, unschedulable_timeout_seconds=1)
    job["spec"].setdefault("runPolicy", {})["suspend"] = True
    with pytest.raises(PendingTimeout) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    msg = str(e.value)
    assert "still queued (suspended)" in msg and "queued_timeout_seconds=3" in msg and "get workloads" in msg
    assert "unschedulable" not in msg


def test_pods_waiting_for_a_gang_scheduler_are_queued(cluster, namespace, tmp_path):
    job, cfg = stage_job(namespace, "gang", queued_timeout_seconds=3, unschedulable_timeout_seconds=1)
    for rs in job["spec"]["pytorchReplicaSpecs"].values():
        rs["template"]["spec"]["schedulerName"] = "volcano"  # a scheduler that is not running: nothing binds the pods
    with pytest.raises(PendingTimeout) as e:
        executor(cluster, cfg).run(job, tmp_path / "logs")
    msg = str(e.value)
    assert "queued" in msg and "volcano" in msg and "queued_timeout_seconds=3" in msg
    assert jobs(cluster, namespace) == []  # given up: the job does not keep its place
