"""Fixtures for tests against the real local control plane of tests/cluster (kube-apiserver, training operator, kwok)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cluster_helpers import REPO, Cluster, unavailable


def _env_file(path: Path) -> dict[str, str]:
    """The ``export K="V"`` lines of the cluster's state/env file."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            out[k] = v.strip().strip('"')
    return out


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """kubectl and helm of a running tests/cluster control plane (admin and the unprivileged user).

    Starts it with ``tests/cluster/up`` (idempotent; about 20 s warm). In CI (CI=true) a cluster
    that cannot start fails the tests; elsewhere they are skipped with the reason. It is never
    stopped here: other sessions may share it. ``cluster[NAME]`` reads its environment
    (KUBECONFIG_ADMIN, KUBECONFIG_USER, PATH with kubectl and helm).
    """
    reason = None
    try:
        proc = subprocess.run([str(REPO / "tests/cluster/up")], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            reason = f"tests/cluster/up exited {proc.returncode}:\n{(proc.stderr or proc.stdout)[-3000:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = f"tests/cluster/up could not run: {e}"
    if reason is None:
        lines = proc.stdout.strip().splitlines()
        kubeconfig = Path(lines[-1]) if lines else None
        if kubeconfig is None or not kubeconfig.is_file():
            reason = f"tests/cluster/up printed no kubeconfig path (stdout: {proc.stdout[-500:]!r})"
    if reason is not None:
        unavailable(f"no local Kubernetes control plane: {reason}")
    env = dict(os.environ)
    env.update(_env_file(kubeconfig.parent / "env"))
    env["PATH"] = env["PATH"].replace("$PATH", os.environ.get("PATH", ""))
    env.setdefault("KUBECONFIG_ADMIN", str(kubeconfig))
    env.setdefault("KUBECONFIG_USER", str(kubeconfig.parent / "user.kubeconfig"))
    env["KUBECONFIG"] = env["KUBECONFIG_ADMIN"]
    bin_dir = Path(env.get("SELFTRAIN_CLUSTER_CACHE", kubeconfig.parent.parent)) / "bin"
    missing = [t for t in ("kubectl", "helm") if not (bin_dir / t).is_file()]
    if missing:
        unavailable(f"{', '.join(missing)} missing from {bin_dir} after tests/cluster/up")
    return Cluster(admin=Path(env["KUBECONFIG_ADMIN"]), user=Path(env["KUBECONFIG_USER"]), bin=bin_dir, env=env)
