"""kubectl and helm against the local control plane of tests/cluster, as admin or as the unprivileged selftrain-user.

conftest.py's ``cluster`` fixture starts the control plane and returns a :class:`Cluster`.
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
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


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
        resource, _, sub = resource.partition("/")  # "pods/log": kubectl reads TYPE/NAME, a subresource needs its flag
        sub_flag = [f"--subresource={sub}"] if sub else []
        p = self.kubectl("auth", "can-i", verb, resource, *sub_flag, f"--as={who}", *where, check=False)
        return p.stdout.strip() == "yes"

    def new_namespace(self, prefix: str) -> str:
        ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", ns)
        return ns

    def delete_namespace(self, ns: str) -> None:
        self.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)

    def __getitem__(self, name: str) -> str:
        """The cluster's environment (KUBECONFIG_ADMIN, KUBECONFIG_USER, PATH, ...)."""
        return self.env[name]

    def get(self, *args: str, user: bool = False) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json", user=user).stdout)


@pytest.fixture
def namespace(cluster: Cluster):
    """A fresh namespace ``chart-test-<id>`` of this test, deleted afterwards (import it into a test module)."""
    ns = cluster.new_namespace("chart-test")
    yield ns
    cluster.delete_namespace(ns)
