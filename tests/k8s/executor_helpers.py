"""Small stage jobs for the kubernetes executor tests: rendered PyTorchJobs whose kwok pods behave as told.

Pod behaviours come from the tests/cluster kwok rules (label ``selftrain.test/behaviour``, annotation
``selftrain.test/run-duration``); kwok pods have no container logs.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from pipelines import render
from pipelines.config import KubernetesConfig
from pipelines.executors.kubernetes import ATTEMPT, KubernetesExecutor, PyTorchJobBackend
from contract.spec import Outputs, Resources, StageSpec

REPO = Path(__file__).resolve().parents[2]
COMPONENT = str(REPO / "tests" / "cluster" / "component")
BEHAVIOUR = "selftrain.test/behaviour"
DURATION = "selftrain.test/run-duration"


def stage_job(namespace, name, master="succeed", worker="succeed", *, duration="1s", image="selftrain:latest",
              replicas=2, worker_duration=None, **k8s):
    """The rendered PyTorchJob of a small stage, pods labelled with their kwok behaviour; and its config."""
    cfg = KubernetesConfig(namespace=namespace, **k8s)
    spec = StageSpec(stage="fit-objects", name=name, pipeline="exectest", image=image, params={"steps": 1},
                     outputs=Outputs(workdir="/tmp/exectest"), resources=Resources(replicas=replicas, cpu="1", memory="1Gi"))
    job = render.render_stage(spec, cfg, run="r1")
    for rtype, rs in job["spec"]["pytorchReplicaSpecs"].items():
        meta = rs["template"]["metadata"]
        meta["labels"][BEHAVIOUR] = master if rtype == "Master" else worker
        meta.setdefault("annotations", {})[DURATION] = duration if rtype == "Master" else (worker_duration or duration)
    return job, cfg


def executor(cluster, cfg, kubeconfig=None, lines=None, **kw):
    backend = kw.pop("backend", None) or PyTorchJobBackend(kubeconfig=str(kubeconfig or cluster.admin))
    echo = lines.append if lines is not None else (lambda s: print(s, flush=True))
    return KubernetesExecutor(cfg, backend=backend, echo=echo, poll_seconds=0.3, delete_timeout=60, **kw)


def jobs(cluster, ns):
    return cluster.get("-n", ns, "pytorchjobs")["items"]


def condition(job, kind) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or [])


class RecordingBackend(PyTorchJobBackend):
    """The real backend, remembering every job it submitted and every pod it saw (per job uid)."""

    def __init__(self, *a, succeed_from_attempt=None, **kw):
        super().__init__(*a, **kw)
        self.submitted: list[dict] = []
        self.pods_seen: dict[str, dict[str, str]] = {}  # job uid -> {replica: pod uid}
        self.succeed_from_attempt = succeed_from_attempt

    def create(self, job):
        attempt = int(job["metadata"]["annotations"][ATTEMPT])
        if self.succeed_from_attempt and attempt >= self.succeed_from_attempt:  # the fault was transient
            for rs in job["spec"]["pytorchReplicaSpecs"].values():
                rs["template"]["metadata"]["labels"][BEHAVIOUR] = "succeed"
                rs["template"]["metadata"]["annotations"][DURATION] = "1s"
        self.submitted.append(job)
        return super().create(job)

    def pods(self, namespace, job):
        pods = super().pods(namespace, job)
        seen = self.pods_seen.setdefault(job["metadata"]["uid"], {})
        for p in pods:
            seen[self.replica(p)] = p["metadata"]["uid"]
        return pods


def component(cluster, action: str, name: str) -> None:
    p = subprocess.run([COMPONENT, action, name], capture_output=True, text=True, env=cluster.env, timeout=180)
    assert p.returncode == 0, f"tests/cluster/component {action} {name}: {p.stderr[-2000:]}"


CLIENTS = ("kube-scheduler", "kube-controller-manager", "kwok", "training-operator")


def restart_clients(cluster) -> None:
    """Stop and start the API server's clients, side by side: after an API outage their client-go reflectors back
    off up to a minute before they reconnect; restarted, they are quick again."""
    threads = [threading.Thread(target=lambda n=n: (component(cluster, "stop", n), component(cluster, "start", n))) for n in CLIENTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for n in CLIENTS:
        assert component_alive(cluster, n), f"{n} is not running after its restart"


def component_alive(cluster, name: str) -> bool:
    state = Path(cluster.admin).parent
    try:
        pid = int((state / "pids" / f"{name}.pid").read_text())
        return Path(f"/proc/{pid}").exists()
    except (OSError, ValueError):
        return False


class Background:
    """executor.run(job) in a thread; ``result()`` returns what it returned or raises what it raised."""

    def __init__(self, ex, job, log_dir):
        self.out: dict = {}
        self.thread = threading.Thread(target=self._run, args=(ex, job, log_dir), daemon=True)
        self.thread.start()

    def _run(self, ex, job, log_dir):
        try:
            self.out["result"] = ex.run(job, log_dir)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.out["error"] = e

    def result(self, timeout: float = 180):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the executor did not return"
        if "error" in self.out:
            raise self.out["error"]
        return self.out["result"]


def wait_running(cluster, ns, bg: Background | None = None, timeout: float = 60, names: list[str] | None = None) -> dict:
    """The stage's job once it is Running (all of ``names`` if given); fails early when the executor already returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [j for j in jobs(cluster, ns) if condition(j, "Running")]
        if running and (names is None or {j["metadata"]["name"] for j in running} >= set(names)):
            return running[0]
        if bg is not None and not bg.thread.is_alive():
            bg.result()
            raise AssertionError("the executor returned before its job ran")
        time.sleep(0.3)
    raise AssertionError(f"no job Running in {ns} after {timeout}s")
