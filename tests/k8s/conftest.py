"""Fixtures for tests against the real local control plane of tests/cluster (kube-apiserver, training operator, kwok)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env_file(path: Path) -> dict[str, str]:
    """The ``export K="V"`` lines of the cluster's state/env file."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            out[k] = v.strip().strip('"')
    return out


@pytest.fixture(scope="session")
def cluster() -> dict[str, str]:
    """The environment of a running tests/cluster control plane (KUBECONFIG_ADMIN, KUBECONFIG_USER, PATH with kubectl).

    Starts it with ``tests/cluster/up`` (idempotent; about 20 s warm). In CI (CI=true) a cluster
    that cannot start fails the tests; elsewhere they are skipped with the reason. It is never
    stopped here: other sessions may share it.
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
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"the local Kubernetes control plane did not start (CI never skips it): {reason}")
        pytest.skip(f"no local Kubernetes control plane: {reason}")
    env = dict(os.environ)
    env.update(_env_file(kubeconfig.parent / "env"))
    env["PATH"] = env["PATH"].replace("$PATH", os.environ.get("PATH", ""))
    env.setdefault("KUBECONFIG_ADMIN", str(kubeconfig))
    env.setdefault("KUBECONFIG_USER", str(kubeconfig.parent / "user.kubeconfig"))
    env["KUBECONFIG"] = env["KUBECONFIG_ADMIN"]
    return env
