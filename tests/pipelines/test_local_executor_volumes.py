"""The local executor maps a job's PVCs to local folders without root (issue 15 item 5): the mount paths the job
names (env values, JSON such as the stage spec, args, workingDir) become the folders; nothing is mounted and
nothing is created outside them. As root, the run drops to user nobody (setpriv) to show that."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

# the replica: a shell (the interpreter of this venv may sit where user nobody cannot exec it)
REPLICA = 'tr a-z A-Z < "$DATA" > "$OUT" && printenv SPEC > "$SPEC_COPY" && pwd > "${1#--cwd-file=}"'


def job() -> dict:
    spec = {"data": "/data/in.txt", "out": "/checkpoints/run/out.txt", "not_mounted": "/database/x", "mlflow": "http://mlflow:5000/data"}
    env = {"DATA": "/data/in.txt", "OUT": "/checkpoints/run/out.txt", "SPEC_COPY": "/checkpoints/run/spec.json", "SPEC": json.dumps(spec)}
    pod = {
        "containers": [{
            "name": "pytorch", "image": "selftrain:latest", "workingDir": "/checkpoints/run",
            "command": ["sh", "-c", REPLICA, "sh"], "args": ["--cwd-file=/checkpoints/run/cwd.txt"],
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "checkpoints", "mountPath": "/checkpoints"}],
        }],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "selftrain-data"}},
                    {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "selftrain-checkpoints"}}],
    }
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "volumes"},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": pod}}}}}


RUN = """
import json, sys
from pipelines.executors.local import LocalExecutor
job, data, ckpt, logs = sys.argv[1:5]
LocalExecutor(volumes={"selftrain-data": data, "selftrain-checkpoints": ckpt}, echo=print).run(json.load(open(job)), log_dir=logs)
"""


@pytest.fixture
def shared_dir():
    """A folder user nobody can write (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="selftrain-volumes-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_pvcs_become_local_folders_without_root_and_outside_the_root_directory(shared_dir):
    data, ckpt, logs = shared_dir / "pvc-data", shared_dir / "pvc-checkpoints", shared_dir / "logs"
    for d in (data, ckpt / "run", logs):
        d.mkdir(parents=True)
        d.chmod(0o777)
    (data / "in.txt").write_text("parts")
    (data / "in.txt").chmod(0o644)
    (shared_dir / "job.json").write_text(json.dumps(job()))
    root_before = sorted(os.listdir("/"))
    cmd = [sys.executable, "-c", RUN, str(shared_dir / "job.json"), str(data), str(ckpt), str(logs)]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root for this test"
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HOME": str(shared_dir), "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stdout + p.stderr

    assert (ckpt / "run" / "out.txt").read_text() == "PARTS"  # env paths under /data and /checkpoints
    assert (ckpt / "run" / "cwd.txt").read_text().strip() == str(ckpt / "run")  # workingDir and --opt=/path
    spec = json.loads((ckpt / "run" / "spec.json").read_text())  # paths inside JSON (the stage spec)
    assert spec == {"data": str(data / "in.txt"), "out": str(ckpt / "run" / "out.txt"), "not_mounted": "/database/x",
                    "mlflow": "http://mlflow:5000/data"}
    assert (ckpt / "run" / "out.txt").stat().st_uid == (NOBODY if os.geteuid() == 0 else os.geteuid())
    assert sorted(os.listdir("/")) == root_before


def test_only_paths_under_a_mount_path_are_rewritten(tmp_path):
    from pipelines.executors.local import _local_path

    mounts = [("/checkpoints", tmp_path / "c"), ("/data", tmp_path / "d")]
    spec = json.loads(_local_path(json.dumps({"a": "/data", "b": ["/data/x", "/database/x"], "c": "http://h/data/x", "n": 3}), mounts))
    assert spec == {"a": str(tmp_path / "d"), "b": [str(tmp_path / "d" / "x"), "/database/x"], "c": "http://h/data/x", "n": 3}
    assert _local_path("--out=/checkpoints/r", mounts) == f"--out={tmp_path / 'c' / 'r'}"
    assert _local_path("x=/checkpoints/r", mounts) == "x=/checkpoints/r"  # not an option: left alone
