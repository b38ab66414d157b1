"""`helm uninstall` pre-delete hook: stop the release's driver, then delete the PyTorchJobs it started.

The driver Jobs (labels app.kubernetes.io/instance=<release>, app.kubernetes.io/component=driver) are
deleted first, in the foreground, so that no new stage is created meanwhile; then every PyTorchJob with
the label selftrain.io/release=<release> (the chart puts it in the pipeline config's executor labels).
Waits until they are gone (the operator then deletes their pods). Environment: SELFTRAIN_NAMESPACE,
SELFTRAIN_RELEASE, SELFTRAIN_CLEANUP_TIMEOUT (seconds, default 120). Outside a cluster it uses $KUBECONFIG.
"""
from __future__ import annotations

import os
import sys
import time

TIMEOUT = 15


def main() -> int:
    from kubernetes import client, config
    from kubernetes.client import ApiException

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    ns, release = os.environ["SELFTRAIN_NAMESPACE"], os.environ["SELFTRAIN_RELEASE"]
    deadline = time.monotonic() + float(os.environ.get("SELFTRAIN_CLEANUP_TIMEOUT", "120"))
    batch, custom = client.BatchV1Api(), client.CustomObjectsApi()
    gone = client.V1DeleteOptions(propagation_policy="Foreground")

    drivers = batch.list_namespaced_job(ns, label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=driver",
                                        _request_timeout=TIMEOUT).items
    for job in drivers:
        print(f"deleting driver job {job.metadata.name}", flush=True)
        try:
            batch.delete_namespaced_job(job.metadata.name, ns, body=gone, _request_timeout=TIMEOUT)
        except ApiException as e:
            if e.status != 404:
                raise
    while drivers and time.monotonic() < deadline:
        left = batch.list_namespaced_job(ns, label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=driver",
                                         _request_timeout=TIMEOUT).items
        if not left:
            break
        time.sleep(1)

    def stage_jobs():
        try:
            return custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs",
                                                        label_selector=f"selftrain.io/release={release}",
                                                        _request_timeout=TIMEOUT)["items"]
        except ApiException as e:
            if e.status == 404:  # the CRD is gone: nothing can be left
                return []
            raise

    jobs = stage_jobs()
    for job in jobs:
        name = job["metadata"]["name"]
        print(f"deleting pytorchjob {name}", flush=True)
        try:
            custom.delete_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", name, body=gone,
                                                   _request_timeout=TIMEOUT)
        except ApiException as e:
            if e.status != 404:
                raise
    while jobs and time.monotonic() < deadline:
        jobs = stage_jobs()
        if jobs:
            time.sleep(1)
    if jobs:
        print(f"still there after the timeout: {', '.join(j['metadata']['name'] for j in jobs)}", flush=True)
        return 1
    print(f"release {release}: driver stopped, stage jobs deleted", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
