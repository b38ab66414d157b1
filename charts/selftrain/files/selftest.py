"""`helm test`: check an installed selftrain release from inside the cluster, as the driver's ServiceAccount.

1. the API server serves kubeflow.org/v1 pytorchjobs (the Kubeflow training operator's CRD);
2. the driver's RBAC: a SelfSubjectAccessReview for every verb the kubernetes executor uses;
3. MLflow answers on <tracking uri>/health;
4. the data and checkpoint PVCs are mounted and writable by this user.

Every check runs; the output names each, and the pod fails if any did. Environment: SELFTRAIN_NAMESPACE,
SELFTRAIN_DRIVER_RULES (lines "group resource verb..."; "-" is the core group), SELFTRAIN_MLFLOW_URI,
SELFTRAIN_VOLUMES (space-separated paths), SELFTRAIN_PYTORCHJOB_API (group/version checked, default kubeflow.org/v1).
Outside a cluster it uses $KUBECONFIG (tests run it that way).
"""
from __future__ import annotations

import os
import sys
import urllib.request
import uuid
from pathlib import Path

TIMEOUT = 15


def api():
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client


def check_crd(client, api: str = "kubeflow.org/v1") -> str:
    from kubernetes.client import ApiException

    group, version = api.split("/")
    try:
        found = client.CustomObjectsApi().get_api_resources(group, version, _request_timeout=TIMEOUT)
    except ApiException as e:
        if e.status == 404:
            found = None
        else:
            raise
    if found is None or "pytorchjobs" not in {r.name for r in found.resources}:
        raise RuntimeError(f"the API server does not serve {api} pytorchjobs: the Kubeflow training operator v1 "
                           f"(CRD pytorchjobs.{group}) is not installed; install it (docs/kubernetes.md, Prerequisites) "
                           f"and check with: kubectl get crd pytorchjobs.{group}")
    return f"{api} pytorchjobs is served"


def check_rbac(client, namespace: str, rules: str) -> str:
    wanted = []
    for line in rules.strip().splitlines():
        group, resource, *verbs = line.split()
        wanted += [("" if group == "-" else group, resource, verb) for verb in verbs]
    denied = []
    for group, resource, verb in wanted:
        res, _, sub = resource.partition("/")
        review = client.AuthorizationV1Api().create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(namespace=namespace, verb=verb, group=group,
                                                                resource=res, subresource=sub or None))),
            _request_timeout=TIMEOUT)
        if not review.status.allowed:
            denied.append(f"{verb} {resource}{'.' + group if group else ''}")
    if denied:
        raise RuntimeError(f"the driver's ServiceAccount may not {', '.join(denied)} in namespace {namespace} "
                           "(the chart's Role/RoleBinding <release>-selftrain-driver)")
    return f"{len(wanted)} verbs allowed in {namespace}"


def check_mlflow(uri: str) -> str:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            body = r.read(200).decode(errors="replace").strip()
            status = r.status
    except OSError as e:
        raise RuntimeError(f"MLflow at {url} does not answer: {e}") from e
    if status != 200:
        raise RuntimeError(f"MLflow at {url} answered {status}: {body}")
    return f"{url}: {status} {body}"


def check_volume(path: str) -> str:
    probe = Path(path) / f".selftrain-helm-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("ok")
        if probe.read_text() != "ok":
            raise RuntimeError(f"{path}: read back something else")
    except OSError as e:
        raise RuntimeError(f"{path} is not writable by uid {os.getuid()}: {e} (PVC bound and mounted? fsGroup?)") from e
    finally:
        probe.unlink(missing_ok=True)
    return f"{path} writable by uid {os.getuid()}"


def main() -> int:
    namespace = os.environ["SELFTRAIN_NAMESPACE"]
    failed = 0

    def run(name, fn, *args):
        nonlocal failed
        try:
            print(f"ok    {name}: {fn(*args)}", flush=True)
        except Exception as e:  # noqa: BLE001 - every check reports, then the pod fails
            failed += 1
            print(f"FAIL  {name}: {e}", flush=True)

    try:
        client = api()
    except Exception as e:  # noqa: BLE001
        print(f"FAIL  kubernetes API: {e}")
        return 1
    run("pytorchjob-crd", check_crd, client, os.environ.get("SELFTRAIN_PYTORCHJOB_API", "kubeflow.org/v1"))
    run("driver-rbac", check_rbac, client, namespace, os.environ["SELFTRAIN_DRIVER_RULES"])
    if os.environ.get("SELFTRAIN_MLFLOW_URI"):
        run("mlflow-health", check_mlflow, os.environ["SELFTRAIN_MLFLOW_URI"])
    for path in os.environ.get("SELFTRAIN_VOLUMES", "").split():
        run(f"volume {path}", check_volume, path)
    print(f"{'FAILED' if failed else 'passed'}: {failed} check(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
