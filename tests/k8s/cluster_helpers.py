"""kubectl and helm against the local control plane of tests/cluster, as admin or as the unprivileged selftrain-user.

Import the fixtures (``kube``, ``namespace``) into a test module; conftest.py's ``cluster`` starts the control plane.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing component never passes silently in CI."""
    if IN_CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Cluster:
    """kubectl and helm against the local API server, as admin or as the unprivileged selftrain-user."""

    admin: Path
    user: Path
    bin: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, tool: str, *args: str, user: bool = False, input: str | None = None, check: bool = True,
            timeout: float = 180) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), "--kubeconfig", str(self.user if user else self.admin), *args]
        p = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:1] + cmd[3:])} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return p

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, **kw)

    def helm(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("helm", *args, **kw)

    def can_i(self, namespace: str, who: str, verb: str, resource: str, *, all_namespaces: bool = False) -> bool:
        where = ["--all-namespaces"] if all_namespaces else ["-n", namespace]
        p = self.kubectl("auth", "can-i", verb, resource, f"--as={who}", *where, check=False)
        return p.stdout.strip() == "yes"

    def new_namespace(self, prefix: str) -> str:
        ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", ns)
        return ns

    def delete_namespace(self, ns: str) -> None:
        self.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)

    def get(self, *args: str, user: bool = False) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json", user=user).stdout)


@pytest.fixture(scope="session")
def kube(cluster: dict[str, str]) -> Cluster:
    """kubectl and helm of the running control plane (conftest.py's ``cluster`` starts it; CI fails, never skips)."""
    bin_dir = Path(cluster["SELFTRAIN_CLUSTER_CACHE"]) / "bin" if "SELFTRAIN_CLUSTER_CACHE" in cluster else None
    if bin_dir is None or not all((bin_dir / t).is_file() for t in ("kubectl", "helm")):
        unavailable(f"kubectl/helm not found in {bin_dir} after tests/cluster/up")
    return Cluster(admin=Path(cluster["KUBECONFIG_ADMIN"]), user=Path(cluster["KUBECONFIG_USER"]), bin=bin_dir, env=cluster)


@pytest.fixture
def namespace(kube: Cluster):
    """A fresh namespace of this test, deleted afterwards."""
    ns = kube.new_namespace("chart-test")
    yield ns
    kube.delete_namespace(ns)
