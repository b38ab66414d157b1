"""Kubernetes faults benchmark (issue 16 item 8, issue 15 item 3): repeated trials per fault class on the local
control plane of tests/cluster (real kube-apiserver, etcd, training operator v1.9.3, kwok), with counts.

    .venv/bin/python benchmarks/k8s_faults.py --trials 3 [--only api-outage,...] [--outage 30]

Each trial runs one small stage (Master + Worker, kwok pods) through the kubernetes executor and injects one
fault while it runs, each trial in its own process and namespace; components are stopped and started with
tests/cluster/component. Unlike the CI test, the API outage leaves the controllers to reconnect by themselves
(client-go backs off up to a minute); once the stage has finished they are restarted, so that the next trial
starts on a quick cluster. Prints a
Markdown table: trials / recovered / work lost (attempts restarted beyond what the fault requires, jobs lost) and
the mean seconds per trial. The trials share their helpers with tests/k8s/test_kubernetes_faults.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "k8s"))
sys.path.insert(0, str(REPO))

from conftest import _env_file  # noqa: E402
from cluster_helpers import Cluster  # noqa: E402
from executor_helpers import (  # noqa: E402
    Background,
    RecordingBackend,
    component,
    condition,
    executor,
    jobs,
    restart_clients,
    stage_job,
    wait_running,
)
from pipelines.executors.kubernetes import ClusterError, Forbidden  # noqa: E402


def cluster() -> Cluster:
    out = subprocess.run([str(REPO / "tests/cluster/up")], capture_output=True, text=True, check=True).stdout
    kubeconfig = Path(out.strip().splitlines()[-1])
    env = dict(os.environ)
    env.update(_env_file(kubeconfig.parent / "env"))
    env["PATH"] = env["PATH"].replace("$PATH", os.environ.get("PATH", ""))
    return Cluster(admin=kubeconfig, user=kubeconfig.parent / "user.kubeconfig", bin=kubeconfig.parent.parent / "bin", env=env)


def trial_api_outage(c: Cluster, ns: str, tmp: Path, outage: float) -> tuple[bool, int, str]:
    job, cfg = stage_job(ns, "outage", duration="5s", api_retry_seconds=outage + 180, request_timeout_seconds=5)
    bg = Background(executor(c, cfg, lines=[]), job, tmp)
    running = wait_running(c, ns, bg)
    component(c, "stop", "kube-apiserver")
    try:
        time.sleep(outage)
    finally:
        component(c, "start", "kube-apiserver")
    back = time.monotonic()
    try:
        result = bg.result(timeout=outage + 300)
    finally:
        settle(c)
    ok = result.attempts == 1 and result.replicas[0].exit_code == 0
    return ok, result.attempts - 1, (f"uid {running['metadata']['uid'][:8]}, attempts {result.attempts}, "
                                     f"finished {time.monotonic() - back:.0f}s after the API server was back")


def settle(c: Cluster) -> None:
    """After an outage the controllers back off up to a minute before they reconnect (client-go): restart them so
    that the next trial starts on a quick cluster (the trial itself has let them reconnect by themselves)."""
    restart_clients(c)


def trial_operator_restart(c: Cluster, ns: str, tmp: Path, _: float) -> tuple[bool, int, str]:
    job, cfg = stage_job(ns, "operator", duration="6s", cleanup="never")
    bg = Background(executor(c, cfg), job, tmp)
    running = wait_running(c, ns, bg)
    component(c, "stop", "training-operator")
    time.sleep(3)
    component(c, "start", "training-operator")
    result = bg.result()
    (done,) = jobs(c, ns)
    ok = result.attempts == 1 and done["metadata"]["uid"] == running["metadata"]["uid"] and condition(done, "Succeeded")
    return ok, result.attempts - 1, f"attempts {result.attempts}"


def _worker_deleted(c: Cluster, ns: str, tmp: Path, force: bool) -> tuple[bool, int, str]:
    job, cfg = stage_job(ns, "evicted", master="hang", worker="hang", backoff_limit=2, cleanup="never")
    backend = RecordingBackend(kubeconfig=str(c.admin), succeed_from_attempt=2)
    bg = Background(executor(c, cfg, backend=backend, lines=[]), job, tmp)
    wait_running(c, ns, bg)
    c.kubectl("-n", ns, "delete", "pod", f"{job['metadata']['name']}-worker-0", "--wait=false",
              *(["--force", "--grace-period=0"] if force else []))
    result = bg.result()
    first, last = list(backend.pods_seen.values())[0], list(backend.pods_seen.values())[-1]
    replaced = set(last) == {"master-0", "worker-0"} and not set(first.values()) & set(last.values())
    ok = result.attempts == 2 and result.replicas[0].exit_code == 0 and replaced
    return ok, result.attempts - 2, f"attempts {result.attempts}, whole group replaced: {replaced}"


def trial_rbac_removed(c: Cluster, ns: str, tmp: Path, _: float) -> tuple[bool, int, str]:
    c.kubectl("-n", ns, "create", "role", "exec", "--verb=create,get,delete", "--resource=pytorchjobs.kubeflow.org")
    c.kubectl("-n", ns, "create", "role", "exec-pods", "--verb=list,delete", "--resource=pods")
    for role in ("exec", "exec-pods"):
        c.kubectl("-n", ns, "create", "rolebinding", role, f"--role={role}", "--user=selftrain-user")
    job, cfg = stage_job(ns, "revoked", duration="8s", cleanup="never")
    bg = Background(executor(c, cfg, kubeconfig=c.user), job, tmp)
    running = wait_running(c, ns, bg)
    c.kubectl("-n", ns, "delete", "rolebinding", "exec")
    try:
        bg.result()
        return False, 0, "no error after the RoleBinding was deleted"
    except Forbidden as e:
        clear = "get pytorchjobs.kubeflow.org" in str(e) and "re-attach" in str(e)
    c.kubectl("-n", ns, "create", "rolebinding", "exec", "--role=exec", "--user=selftrain-user")
    lines: list[str] = []
    result = executor(c, cfg, kubeconfig=c.user, lines=lines).run(job, tmp)
    reattached = any("re-attaching" in line and running["metadata"]["uid"] in line for line in lines)
    return clear and reattached and result.attempts == 1, result.attempts - 1, f"clear error: {clear}, re-attached: {reattached}"


def trial_failed_create(c: Cluster, ns: str, tmp: Path, _: float) -> tuple[bool, int, str]:
    """Reported, not recovered: a ResourceQuota refuses the replica; the stage fails in time naming the quota."""
    c.kubectl("-n", ns, "create", "quota", "small", "--hard=requests.cpu=500m")
    job, cfg = stage_job(ns, "quota", replicas=1, pod_creation_timeout_seconds=4)
    try:
        executor(c, cfg).run(job, tmp)
        return False, 0, "the stage ran"
    except ClusterError as e:
        ok = "exceeded quota: small" in str(e)
    return ok, 0, f"error names the quota: {ok}"


CLASSES = {
    "api-outage": ("API server stopped for --outage s mid-stage, then started (controllers reconnect by themselves)", trial_api_outage),
    "operator-restart": ("training operator stopped 3 s mid-stage, then started", trial_operator_restart),
    "worker-deleted": ("worker pod deleted mid-stage (it ends Failed): the whole group restarts",
                       lambda c, ns, tmp, _: _worker_deleted(c, ns, tmp, force=False)),
    "worker-force-deleted": ("worker pod force-deleted mid-stage (the operator recreates it alone): the whole group restarts",
                             lambda c, ns, tmp, _: _worker_deleted(c, ns, tmp, force=True)),
    "rbac-removed": ("executor's RoleBinding deleted mid-stage: clear error, job keeps running, re-run re-attaches", trial_rbac_removed),
    "quota-refuses": ("ResourceQuota refuses the replica: the stage fails within pod_creation_timeout_seconds naming it", trial_failed_create),
}


def one_trial(key: str, outage: float, out: Path) -> dict:
    """One trial in this process (a fresh namespace); the parent runs each in a subprocess, so that an executor
    thread of a trial that broke dies with it."""
    c = cluster()
    ns = c.new_namespace(f"bench-{key}")
    t0 = time.monotonic()
    try:
        ok, extra, detail = CLASSES[key][1](c, ns, out, outage)
    except Exception as e:  # noqa: BLE001 - a trial that breaks counts as not recovered, with why
        ok, extra, detail = False, 0, f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        c.delete_namespace(ns)
    return {"ok": bool(ok), "extra": max(int(extra), 0), "detail": detail, "seconds": time.monotonic() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated classes: " + ", ".join(CLASSES))
    ap.add_argument("--outage", type=float, default=30.0, help="seconds the API server is stopped")
    ap.add_argument("--out", type=Path, default=Path("/tmp/selftrain-k8s-faults"))
    ap.add_argument("--trial", default="", help=argparse.SUPPRESS)  # internal: run one trial, print its JSON
    args = ap.parse_args()
    if args.trial:
        print("RESULT " + json.dumps(one_trial(args.trial, args.outage, args.out / f"{args.trial}-{uuid.uuid4().hex[:6]}")), flush=True)
        return 0
    only = [k for k in args.only.split(",") if k] or list(CLASSES)
    cluster()
    rows = []
    for key in only:
        what = CLASSES[key][0]
        recovered, lost, seconds = 0, 0, 0.0
        for i in range(args.trials):
            cmd = [sys.executable, __file__, "--trial", key, "--outage", str(args.outage), "--out", str(args.out)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.outage + 900)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                r = json.loads(line[len("RESULT "):]) if line else {
                    "ok": False, "extra": 0, "seconds": 0.0, "detail": f"exit {p.returncode}: {p.stderr[-300:]}"}
            except subprocess.TimeoutExpired:
                r = {"ok": False, "extra": 0, "seconds": args.outage + 900, "detail": "timed out"}
            seconds += r["seconds"]
            recovered += r["ok"]
            lost += r["extra"]
            print(f"{key} trial {i + 1}: {'recovered' if r['ok'] else 'NOT recovered'} ({r['detail']}) in {r['seconds']:.0f}s", flush=True)
        rows.append((key, what, args.trials, recovered, lost, seconds / max(args.trials, 1)))
    print(f"\n`.venv/bin/python benchmarks/k8s_faults.py --trials {args.trials} --outage {args.outage:g}`"
          + (f" `--only {args.only}`" if args.only else "") + " on this machine: "
          f"{platform.system()} {platform.release()}, {os.cpu_count()} cores visible\n")
    print("| fault | trials | recovered | extra attempts / jobs lost | s per trial |")
    print("| --- | --- | --- | --- | --- |")
    for key, what, n, rec, lost, sec in rows:
        print(f"| `{key}`: {what} | {n} | {rec} | {lost} | {sec:.0f} |")
    return 0 if all(r[3] == r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
