"""Play the kubelet for one pod of the local control plane: kwok runs no containers, so a chart hook's script
(``helm test``'s selftest.py, the pre-delete cleanup.py) is run here, as the pod would run it there: with the
pod's environment and its ServiceAccount's token, against the same API server; its exit code then becomes the
pod's status, which is what helm waits for. The pod must be labelled ``selftrain.test/behaviour: hang`` (kwok
keeps it Running and leaves its end to us).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cluster_helpers import Cluster


def wait_pod(cluster: Cluster, ns: str, selector: str, timeout: float = 60) -> dict:
    """The first pod matching ``selector`` once kwok has it Running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = cluster.get("-n", ns, "pods", "-l", selector)["items"]
        running = [p for p in items if (p.get("status") or {}).get("phase") == "Running"]
        if running:
            return running[0]
        time.sleep(0.3)
    raise AssertionError(f"no Running pod {selector} in {ns} after {timeout}s")


def _kubeconfig(cluster: Cluster, ns: str, service_account: str, path: Path) -> Path:
    admin = yaml.safe_load(cluster.admin.read_text())
    token = cluster.kubectl("-n", ns, "create", "token", service_account, "--duration=10m").stdout.strip()
    server = admin["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "pod",
        "clusters": [{"name": "c", "cluster": {"server": server["server"],
                                               "certificate-authority-data": server["certificate-authority-data"]}}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "pod", "context": {"cluster": "c", "user": service_account, "namespace": ns}}],
    }))
    return path


def run_pod(cluster: Cluster, pod: dict, script: Path, tmp: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` with ``pod``'s first container's environment (``env`` overrides, e.g. volume paths) as its
    ServiceAccount; then set the pod's phase from the exit code (Succeeded/Failed) and return the process."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    penv = {}
    for e in container.get("env") or []:
        ref = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        penv[e["name"]] = ns if ref == "metadata.namespace" else str(e.get("value", ""))
    penv.update(env or {})
    kubeconfig = _kubeconfig(cluster, ns, pod["spec"]["serviceAccountName"], tmp / f"{name}.kubeconfig")
    run_env = {"PATH": os.environ["PATH"], "KUBECONFIG": str(kubeconfig), "HOME": str(tmp), **penv}
    p = subprocess.run([sys.executable, str(script)], env=run_env, capture_output=True, text=True, timeout=180)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"phase": "Succeeded" if p.returncode == 0 else "Failed", "containerStatuses": [{
        "name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": p.returncode, "reason": "Completed" if p.returncode == 0 else "Error",
                                 "message": (p.stdout or p.stderr)[-1000:],
                                 "startedAt": now, "finishedAt": now}}}]}
    cluster.kubectl("-n", ns, "patch", "pod", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))
    return p
