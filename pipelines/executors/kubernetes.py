"""The kubernetes executor: creates a stage's PyTorchJob on a cluster, follows it to its end, keeps every replica's log.

A restart replaces the whole group. The v1.9.3 training operator restarts only the failed pod
(OnFailure: the kubelet restarts its container in place; ExitCode: the operator deletes and
recreates that one pod, pkg/controller.v1/common/pod.go), and a single restarted rank cannot
rejoin a DeepSpeed group. Its backoff count is unreliable too (pkg/core/job.go PastBackoffLimit sums
container restartCounts of Running pods, always 0 under ExitCode, plus a work-queue requeue count).
So the job is submitted with ``restartPolicy: Never`` on every replica and no ``backoffLimit``: the
first failed replica fails the job, and this executor deletes it (with its pods) and creates it
again, up to the rendered ``runPolicy.backoffLimit`` times, when the rendered restart policy allows
(OnFailure: any failure; ExitCode: exit codes 128-255; Never: none), as the local executor does.

Re-running a stage re-attaches to the job of the same name and fingerprint annotation (a driver
killed mid-run loses nothing); a finished job of other inputs is replaced, a running one is an error.

For a busy, unreliable cluster: every API request has a timeout (``request_timeout_seconds``) and is
retried with exponential backoff and jitter on 429, 5xx and connection errors for ``api_retry_seconds``;
a create retried after a lost answer (409 AlreadyExists) finds its own job. Pending time is told apart:
queued (suspended by Kueue, waiting for a gang scheduler), unschedulable, pulling an image or starting,
and replicas the operator cannot create (its FailedCreatePod event names the admission or quota error),
each with its own limit. A replica whose pod is deleted mid-run (eviction, preemption, by hand) fails the
attempt: the whole group restarts. The executor polls (no watch): per stage and poll, one GET of the
job and one LIST of its pods, plus one LIST of its events while replicas are missing or Pending.
"""
from __future__ import annotations

import copy
import json
import random
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from pipelines.config import KubernetesConfig
from pipelines.executors import ExecutionResult, ReplicaOutcome, StageFailed
from pipelines.executors.local import restartable

FINGERPRINT = "selftrain.io/fingerprint"
ATTEMPT = "selftrain.io/attempt"  # set on jobs this executor created: it restarts them as whole groups
BACKOFF = "selftrain.io/backoff-limit"  # the rendered runPolicy.backoffLimit, which the executor applies
STARTED = "selftrain.io/started"  # epoch seconds of attempt 1 (activeDeadlineSeconds spans all attempts)
FINISHED = ("Succeeded", "Failed")
DEADLINE_SLACK = 10.0  # seconds the operator gets to enforce activeDeadlineSeconds before the executor does
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
IMAGE_FATAL = ("InvalidImageName", "ErrImageNeverPull")  # no retry fixes these
RETRY_STATUS = (429, 500, 502, 503, 504)  # answers worth retrying; 409 on create is handled by the executor
BACKOFF_START, BACKOFF_MAX = 0.5, 8.0  # seconds: the first retry delay, doubled up to this
CREATE_FAILED = ("FailedCreatePod", "FailedCreate", "FailedCreateService")  # the operator's event reasons
DEFAULT_SCHEDULER = "default-scheduler"
SAY_AFTER = 5.0  # seconds a replica waits (not created, queued, unschedulable, pulling) before the executor says so


# -- errors ----------------------------------------------------------------------------------------
class ClusterError(StageFailed):
    """The stage could not run on the cluster (the message says why and what to do)."""


class CrdMissing(ClusterError):
    """The job's custom resource (PyTorchJob CRD) is not installed."""


class Forbidden(ClusterError):
    """RBAC forbids the executor's identity an action it needs."""


class ImagePullFailed(ClusterError):
    """A replica's image cannot be pulled."""


class PendingTimeout(ClusterError):
    """A replica stayed queued, unschedulable or starting past its limit (``*_timeout_seconds``)."""


class PodsNotCreated(ClusterError):
    """The training operator could not create the job's pods (admission, quota, missing service account)."""


class StageTimeout(ClusterError):
    """The stage did not finish within ``timeout_seconds``."""


class JobConflict(ClusterError):
    """A running job of the same name belongs to other inputs or params."""


class ApiDenied(Exception):
    """The API server answered 403 to ``verb`` on ``resource`` in ``namespace`` for ``user``."""

    def __init__(self, denied: list[tuple[str, str]], namespace: str, user: str, message: str = ""):
        self.denied, self.namespace, self.user, self.message = denied, namespace, user, message
        super().__init__(self.explain())

    def explain(self) -> str:
        what = ", ".join(f"{verb} {resource}" for verb, resource in self.denied)
        who = self.user or "this identity"
        if who.startswith("system:serviceaccount:"):
            subject = f"--serviceaccount={who.split(':', 2)[2]}"
        else:
            subject = f"--user={who}"
        resources = sorted({r for _, r in self.denied} | {"pytorchjobs.kubeflow.org", "pods", "pods/log"})
        return (
            f"RBAC forbids {who} to {what} in namespace {self.namespace}"
            + (f" (API server: {self.message})" if self.message else "")
            + f". Grant it, e.g.: kubectl -n {self.namespace} create role selftrain-executor --verb=create,get,list,delete"
            f" --resource={','.join(resources)} && kubectl -n {self.namespace} create rolebinding selftrain-executor"
            f" --role=selftrain-executor {subject}"
        )


class ApiNotInstalled(Exception):
    """The API server does not serve the job's resource (its CRD is not installed)."""


class ApiUnavailable(Exception):
    """The API server did not answer ``what`` (429, 5xx, connection errors) for ``seconds``, retries included."""

    def __init__(self, what: str, why: str, seconds: float, host: str):
        self.what, self.why, self.seconds, self.host = what, why, seconds, host
        super().__init__(f"the API server at {host} did not answer {what} for {seconds:.0f}s of retries "
                         f"(api_retry_seconds): {why}")


class AlreadyExists(Exception):
    """create answered 409: a job of that name exists (still terminating, or created by a retried request)."""


# -- the submission interface ----------------------------------------------------------------------
class LineStream(Protocol):
    def __iter__(self) -> Iterator[str]: ...
    def close(self) -> None: ...


class JobBackend(Protocol):
    """Where jobs of one kind are created and followed (PyTorchJob v1 now; a Trainer v2 TrainJob later)."""

    kind: str

    def check(self, namespace: str) -> list[str]:
        """Raise ApiNotInstalled / ApiDenied when the resource is missing or a required verb is forbidden; return warnings."""

    def configure(self, *, request_timeout: float, retry_seconds: float, echo: Callable[[str], None]) -> None:
        """Timeout of each request, how long transient errors are retried, where retries are reported."""

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        """Create the job; raises AlreadyExists on 409."""

    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete(self, namespace: str, name: str, wait: float = 0.0) -> bool:
        """Delete the job and its pods; with ``wait`` > 0, until they are gone (at most ``wait`` seconds). True: gone."""

    def events(self, namespace: str, uid: str) -> list[dict[str, Any]] | None:
        """Events about the object ``uid`` (oldest first); None when RBAC forbids listing events."""

    def pods(self, namespace: str, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The pods of this job object (its uid), as dicts."""

    def delete_pod(self, namespace: str, name: str) -> None: ...
    def logs(self, namespace: str, pod: str, container: str, since: str | None = None) -> LineStream:
        """Follow one container's log, each line prefixed by its RFC 3339 timestamp, from ``since`` (RFC 3339)
        if given; raises the client's ApiException when there is none."""

    # what the kind means
    def state(self, job: dict[str, Any]) -> tuple[str, str]:
        """(Created | Running | Restarting | Succeeded | Failed | '', message) of a job object."""

    def replicas(self, job: dict[str, Any]) -> list[str]:
        """Replica names of a job, e.g. ['master-0', 'worker-0']."""

    def replica(self, pod: dict[str, Any]) -> str: ...
    def restart_policies(self, job: dict[str, Any]) -> tuple[dict[str, str], int]:
        """({replica type: restart policy}, backoffLimit) as rendered."""

    def for_group_restart(self, job: dict[str, Any], active_deadline: int | None) -> dict[str, Any]:
        """The job as submitted: the cluster never restarts a replica on its own (the executor restarts the group)."""


class _HttpLines:
    """Lines of a streaming HTTP response; ``close`` (from any thread) ends the iteration."""

    def __init__(self, resp: Any):
        self.resp = resp

    def __iter__(self) -> Iterator[str]:
        buf = b""
        try:
            for chunk in self.resp.stream(4096, decode_content=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace").rstrip("\r")
            if buf:
                yield buf.decode(errors="replace")
        finally:
            self.resp.release_conn()

    def close(self) -> None:
        try:
            self.resp.close()
        except Exception:  # noqa: BLE001 - closing a dead stream
            pass


class PyTorchJobBackend:
    """Kubeflow training-operator v1 PyTorchJobs through the kubernetes client (CustomObjectsApi)."""

    kind = "PyTorchJob"

    def __init__(self, api_client: Any = None, *, kubeconfig: str | None = None, context: str | None = None,
                 group: str = "kubeflow.org", version: str = "v1", plural: str = "pytorchjobs"):
        from kubernetes import client

        if api_client is None:
            api_client = _api_client(kubeconfig, context)
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.group, self.version, self.plural = group, version, plural
        self._user: str | None = None
        self.request_timeout, self.retry_seconds = 30.0, 300.0
        self.echo: Callable[[str], None] = _print

    def configure(self, *, request_timeout: float, retry_seconds: float, echo: Callable[[str], None]) -> None:
        self.request_timeout, self.retry_seconds, self.echo = request_timeout, retry_seconds, echo

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}"

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    # -- API -----------------------------------------------------------------------------------
    def check(self, namespace: str) -> list[str]:
        from kubernetes.client import ApiException

        try:
            found = self._call(f"GET /apis/{self.group}/{self.version}", self.custom.get_api_resources, self.group, self.version)
        except ApiException as e:
            if e.status == 404:
                raise ApiNotInstalled(self._not_installed()) from e
            raise
        if not any(r.name == self.plural for r in (found.resources or [])):
            raise ApiNotInstalled(self._not_installed())
        required = [("create", self.plural, self.group), ("get", self.plural, self.group),
                    ("delete", self.plural, self.group), ("list", "pods", "")]
        optional = [("get", "pods/log", ""), ("delete", "pods", ""), ("list", "events", "")]
        denied = [(v, _res(r, g)) for v, r, g in required if self._can(namespace, v, r, g) is False]
        if denied:
            raise ApiDenied(denied, namespace, self.user())
        return [f"RBAC forbids {self.user()} to {v} {_res(r, g)} in namespace {namespace}: "
                + {"pods/log": "replica logs are not kept", "pods": "running pods of a failed job kept by cleanup are not stopped",
                   "events": "why the operator cannot create a pod (Pod Security, ResourceQuota) is not named"}[r]
                for v, r, g in optional if self._can(namespace, v, r, g) is False]

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client import ApiException

        ns = job["metadata"]["namespace"]
        try:
            with self._denied("create", self.resource, ns):
                return self._call(f"create {self.kind} {ns}/{job['metadata']['name']}",
                                  self.custom.create_namespaced_custom_object, self.group, self.version, ns, self.plural, job)
        except ApiException as e:
            if e.status == 409:
                raise AlreadyExists(_status(e).get("message") or str(e.reason)) from e
            raise

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client import ApiException

        try:
            with self._denied("get", self.resource, namespace):
                return self._call(f"get {self.kind} {namespace}/{name}", self.custom.get_namespaced_custom_object,
                                  self.group, self.version, namespace, self.plural, name)
        except ApiException as e:
            if e.status != 404:
                raise
            if (_status(e).get("details") or {}).get("name"):
                return None  # the job is not there
            raise ApiNotInstalled(self._not_installed()) from e

    def delete(self, namespace: str, name: str, wait: float = 0.0) -> bool:
        from kubernetes.client import ApiException

        try:
            with self._denied("delete", self.resource, namespace):
                self._call(f"delete {self.kind} {namespace}/{name}", self.custom.delete_namespaced_custom_object,
                           self.group, self.version, namespace, self.plural, name, propagation_policy="Foreground")
        except ApiException as e:
            if e.status != 404:
                raise
        end = time.monotonic() + wait
        while wait and time.monotonic() < end:  # Foreground: the job goes after its pods
            if self.get(namespace, name) is None:
                return True
            time.sleep(0.2)
        return not wait or self.get(namespace, name) is None

    def events(self, namespace: str, uid: str) -> list[dict[str, Any]] | None:
        try:
            with self._denied("list", "events", namespace):
                resp = self._call(f"list events of {uid}", self.core.list_namespaced_event, namespace,
                                  field_selector=f"involvedObject.uid={uid}", _preload_content=False)
        except ApiDenied:
            return None
        items = json.loads(resp.data).get("items") or []
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def pods(self, namespace: str, job: dict[str, Any]) -> list[dict[str, Any]]:
        name, uid = job["metadata"]["name"], job["metadata"].get("uid")
        with self._denied("list", "pods", namespace):
            resp = self._call(f"list pods of {self.kind} {namespace}/{name}", self.core.list_namespaced_pod, namespace,
                              label_selector=f"training.kubeflow.org/job-name={name}", _preload_content=False)
        items = json.loads(resp.data).get("items") or []
        return [p for p in items if not uid or any(o.get("uid") == uid for o in p["metadata"].get("ownerReferences") or [])]

    def delete_pod(self, namespace: str, name: str) -> None:
        from kubernetes.client import ApiException

        try:
            with self._denied("delete", "pods", namespace):
                self._call(f"delete pod {namespace}/{name}", self.core.delete_namespaced_pod, name, namespace, grace_period_seconds=30)
        except ApiException as e:
            if e.status != 404:
                raise

    def logs(self, namespace: str, pod: str, container: str, since: str | None = None) -> LineStream:
        extra = {"since_time": since} if since else {}
        # connect within the request timeout; a stream idle for longer than the read timeout is resumed by _Stream
        resp = self._call(f"log of pod {namespace}/{pod}", self.core.read_namespaced_pod_log, pod, namespace,
                          container=container, follow=True, timestamps=True, _preload_content=False,
                          timeout=(self.request_timeout, max(self.request_timeout, 300.0)), **extra)
        return _HttpLines(resp)

    def user(self) -> str:
        """Who the API server says we are (SelfSubjectReview), e.g. ``system:serviceaccount:ns:sa``."""
        if self._user is None:
            from kubernetes import client

            try:
                review = self._call("SelfSubjectReview", client.AuthenticationV1Api(self.api_client).create_self_subject_review,
                                    client.V1SelfSubjectReview(metadata=client.V1ObjectMeta()))
                self._user = review.status.user_info.username or ""
            except Exception:  # noqa: BLE001 - only used in messages
                self._user = ""
        return self._user

    # -- the PyTorchJob kind -------------------------------------------------------------------
    def state(self, job: dict[str, Any]) -> tuple[str, str]:
        conds = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        for t in FINISHED:
            for c in conds:
                if c["type"] == t:
                    return t, c.get("message", "")
        return (conds[-1]["type"], conds[-1].get("message", "")) if conds else ("", "")

    def replicas(self, job: dict[str, Any]) -> list[str]:
        out = []
        for rtype in ("Master", "Worker"):
            rs = job["spec"]["pytorchReplicaSpecs"].get(rtype)
            if rs:
                out += [f"{rtype.lower()}-{i}" for i in range(int(rs.get("replicas", 1)))]
        return out

    def replica(self, pod: dict[str, Any]) -> str:
        labels = pod["metadata"].get("labels") or {}
        return f"{labels.get('training.kubeflow.org/replica-type', 'pod')}-{labels.get('training.kubeflow.org/replica-index', '0')}"

    def restart_policies(self, job: dict[str, Any]) -> tuple[dict[str, str], int]:
        specs = job["spec"]["pytorchReplicaSpecs"]
        policies = {rtype.lower(): rs.get("restartPolicy") or "OnFailure" for rtype, rs in specs.items()}
        return policies, int((job["spec"].get("runPolicy") or {}).get("backoffLimit") or 0)

    def for_group_restart(self, job: dict[str, Any], active_deadline: int | None) -> dict[str, Any]:
        job = copy.deepcopy(job)
        job["apiVersion"] = f"{self.group}/{self.version}"
        for rs in job["spec"]["pytorchReplicaSpecs"].values():
            rs["restartPolicy"] = "Never"
        run_policy = job["spec"].setdefault("runPolicy", {})
        # No backoffLimit: past it, v1.9.3 deletes every pod of the job before marking it Failed
        # (common/job.go, whatever cleanPodPolicy says); with Never, the first failed replica fails the job.
        backoff = run_policy.pop("backoffLimit", None)
        if backoff is not None:
            job["metadata"].setdefault("annotations", {})[BACKOFF] = str(backoff)
        if active_deadline is not None:
            run_policy["activeDeadlineSeconds"] = active_deadline
        return job

    # -- helpers -------------------------------------------------------------------------------
    def _can(self, namespace: str, verb: str, resource: str, group: str) -> bool | None:
        """SelfSubjectAccessReview; None when it cannot be asked."""
        from kubernetes import client

        res, _, sub = resource.partition("/")
        try:
            review = self._call("SelfSubjectAccessReview", client.AuthorizationV1Api(self.api_client).create_self_subject_access_review,
                                client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                                    resource_attributes=client.V1ResourceAttributes(
                                        namespace=namespace, verb=verb, group=group, resource=res, subresource=sub or None))))
        except Exception:  # noqa: BLE001 - then the real call will tell
            return None
        return bool(review.status.allowed)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, timeout: Any = None, **kw: Any) -> Any:
        """``fn(*args, **kw)`` with a request timeout, retried on 429, 5xx and connection errors with exponential
        backoff and jitter (Retry-After honoured) for at most ``retry_seconds``; then ApiUnavailable."""
        first, delay = None, BACKOFF_START
        while True:
            try:
                out = fn(*args, _request_timeout=timeout or self.request_timeout, **kw)
            except Exception as e:  # noqa: BLE001 - sorted into transient or not below
                why, retry_after = _transient(e)
                if why is None:
                    raise
                now = time.monotonic()
                if first is None:
                    first = now
                    self.echo(f"API server: {what}: {why}; retrying for up to {self.retry_seconds:g}s (api_retry_seconds)")
                left = first + self.retry_seconds - now
                if left <= 0:
                    raise ApiUnavailable(what, why, now - first, self.host) from e
                time.sleep(min(left, retry_after if retry_after is not None else delay / 2 + random.uniform(0, delay / 2)))
                delay = min(2 * delay, BACKOFF_MAX)
                continue
            if first is not None:
                self.echo(f"API server: {what} answered after {time.monotonic() - first:.0f}s of retries")
            return out

    @contextmanager
    def _denied(self, verb: str, resource: str, namespace: str) -> Iterator[None]:
        from kubernetes.client import ApiException

        try:
            yield
        except ApiException as e:
            if e.status == 403:
                msg = _status(e).get("message") or str(e.reason)
                m = re.search(r'User "([^"]+)"', msg)
                raise ApiDenied([(verb, resource)], namespace, m.group(1) if m else self.user(), msg) from e
            raise

    def _not_installed(self) -> str:
        return (
            f"the API server at {self.host} does not serve {self.resource}/{self.version} ({self.kind}): "
            "the Kubeflow training operator's PyTorchJob CRD is not installed. Install the training operator v1.9 "
            '(kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.3") '
            "or point the executor at a cluster that has it"
        )


def _res(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def _transient(e: BaseException) -> tuple[str | None, float | None]:
    """(why, Retry-After seconds) when ``e`` is worth retrying (429, 5xx, a connection error or timeout); (None, None) if not."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(e, ApiException):
        if e.status not in RETRY_STATUS:
            return None, None
        retry_after = None
        try:
            retry_after = float((e.headers or {}).get("Retry-After"))
        except (TypeError, ValueError):
            pass
        return f"{e.status} {_status(e).get('message') or e.reason}", retry_after
    if isinstance(e, (HTTPError, ConnectionError, TimeoutError)):
        return f"{type(e).__name__}: {str(e)[:300]}", None
    return None, None


def _status(e: Any) -> dict[str, Any]:
    try:
        return json.loads(e.body or "{}")
    except (TypeError, ValueError):
        return {}


def _api_client(kubeconfig: str | None, context: str | None) -> Any:
    """A client for ``kubeconfig`` (else $KUBECONFIG / ~/.kube/config), or the in-cluster service account."""
    import os

    from kubernetes import client, config

    if kubeconfig or os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists() or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return config.new_client_from_config(config_file=kubeconfig, context=context, persist_config=False)
    c = client.Configuration()
    config.load_incluster_config(client_configuration=c)
    return client.ApiClient(c)


# -- the executor ----------------------------------------------------------------------------------
class _Stream:
    """Follows one pod's log into ``<replica>.log`` (appended; one header per attempt), echoing each line.

    A stream that drops (API server restarted, read timeout) while the container runs is resumed from the
    timestamp of the last line kept (``sinceTime``); lines already kept are skipped, nothing is re-read.
    """

    def __init__(self, backend: JobBackend, namespace: str, pod: dict[str, Any], replica: str, path: Path,
                 attempt: int, echo: Callable[[str], None], tail: deque):
        self.backend, self.namespace, self.replica, self.path = backend, namespace, replica, path
        self.pod, self.attempt, self.echo, self.tail = pod["metadata"]["name"], attempt, echo, tail
        containers = pod["spec"]["containers"]
        self.container = next((c["name"] for c in containers if c["name"] == "pytorch"), containers[0]["name"])
        self.lines: LineStream | None = None
        self.closed = False
        self.ended = threading.Event()  # set by the executor once the container has terminated
        self.resumed = 0
        self.thread = threading.Thread(target=self._pump, daemon=True, name=f"log-{self.pod}")
        self.thread.start()

    def _pump(self) -> None:
        from kubernetes.client import ApiException

        last: tuple[str, int] = ("", 0)  # (timestamp of the last line kept, lines kept with that timestamp)
        with open(self.path, "a", buffering=1) as log:
            log.write(f"===== attempt {self.attempt}: pod {self.pod} =====\n")
            while not self.closed:
                final = self.ended.is_set()  # the container had ended: this read gets the rest, then stop
                try:
                    self.lines = self.backend.logs(self.namespace, self.pod, self.container, since=last[0] or None)
                    for line, last in _after(self.lines, last):
                        self.tail.append(line)
                        log.write(line + "\n")
                        self.echo(f"[{self.replica}] {line}")
                except ApiException as e:
                    if not self.resumed:
                        msg = _status(e).get("message") or e.reason
                        note = (f"(no log for pod {self.pod}: the API server answered {e.status} {msg}; "
                                "the node serves no container logs, e.g. a virtual/kwok node, or the pod is gone)")
                        log.write(note + "\n")
                        self.echo(f"[{self.replica}] {note}")
                    return
                except Exception as e:  # noqa: BLE001 - a broken stream never fails the stage; it is resumed
                    if self.closed:
                        return
                    log.write(f"(log stream of pod {self.pod} dropped: {type(e).__name__}: {str(e)[:200]}; resuming)\n")
                if final:
                    return
                self.ended.wait(1.0)  # ended or dropped while the container may still run: resume after the last line
                self.resumed += 1

    def close(self, timeout: float) -> None:
        self.ended.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.closed = True
            if self.lines is not None:
                self.lines.close()
            self.thread.join(2.0)


def _after(lines: Iterable[str], last: tuple[str, int]) -> Iterator[tuple[str, tuple[str, int]]]:
    """The lines of a timestamped log stream (``<RFC 3339> <text>``, as with ``timestamps=true``) that come after
    ``last`` = (timestamp of the last line kept, how many lines with that timestamp were kept): (text, new last).
    A stream resumed with ``sinceTime`` = that timestamp repeats those lines; they are skipped."""
    last_key, kept, seen = _ts_key(last[0]), last[1], 0
    for raw in lines:
        ts, _, text = raw.partition(" ")
        key = _ts_key(ts)
        if key < last_key or (key == last_key and seen < kept):
            seen += key == last_key
            continue  # kept before the stream dropped
        if key == last_key:
            kept += 1
            seen += 1
        else:
            last_key, kept, seen = key, 1, 1
        yield text, (ts, kept)


def _ts_key(ts: str) -> tuple[str, str]:
    """A sortable key of an RFC 3339 timestamp with 0-9 fraction digits ("...:05.1Z" < "...:05.12Z")."""
    if not ts:
        return ("", "")
    whole, _, frac = ts.rstrip("Z").partition(".")
    return (whole, frac.ljust(9, "0"))


class KubernetesExecutor:
    """Runs PyTorchJob manifests on a cluster: create (or re-attach), follow, restart whole groups, keep logs, clean up."""

    def __init__(self, config: KubernetesConfig | None = None, *, backend: JobBackend | None = None,
                 kubeconfig: str | None = None, context: str | None = None,
                 echo: Callable[[str], None] | None = None, poll_seconds: float = 1.0, delete_timeout: float = 120.0):
        self.config = config or KubernetesConfig()
        self.backend = backend or PyTorchJobBackend(kubeconfig=kubeconfig, context=context)
        self.echo = echo if echo is not None else _print
        self.poll_seconds = poll_seconds
        self.delete_timeout = delete_timeout
        self._checked: set[str] = set()
        self.backend.configure(request_timeout=self.config.request_timeout_seconds,
                               retry_seconds=self.config.api_retry_seconds, echo=self.echo)

    # -- public --------------------------------------------------------------------------------
    def run(self, job: dict[str, Any], log_dir: str | Path | None = None) -> ExecutionResult:
        """Run the job to completion on the cluster; raises StageFailed (or a ClusterError) when it fails for good."""
        if not isinstance(job, dict):  # a kubeflow-training SDK object
            from pipelines.render import to_dict

            job = to_dict(job)
        job = copy.deepcopy(job)
        meta = job.setdefault("metadata", {})
        meta["namespace"] = meta.get("namespace") or self.config.namespace
        run = _Run(name=meta["name"], namespace=meta["namespace"])
        run.log_dir = Path(log_dir) if log_dir else _default_log_dir(job)
        run.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._run(job, run)
        except ApiDenied as e:
            after = (f". The {self.backend.kind} {run.namespace}/{run.name} keeps running: once the Role is back, run the stage "
                     "again to re-attach to it") if run.created else ""
            raise Forbidden(run.name, run.attempt, run.outcome, e.explain() + after) from e
        except ApiNotInstalled as e:
            raise CrdMissing(run.name, run.attempt, run.outcome, str(e)) from e
        except ApiUnavailable as e:
            raise ClusterError(run.name, run.attempt, run.outcome, (
                f"{e}. The {self.backend.kind} {run.namespace}/{run.name} may still be running: run the stage again to "
                "re-attach to it, or raise api_retry_seconds")) from e
        except StageFailed:
            raise
        except Exception as e:
            from kubernetes.client import ApiException
            from urllib3.exceptions import HTTPError

            if isinstance(e, ApiException):
                status = _status(e)
                raise ClusterError(run.name, run.attempt, run.outcome,
                                   f"the API server answered {e.status} {status.get('reason') or e.reason}: {status.get('message') or e.body}") from e
            if isinstance(e, HTTPError):
                host = getattr(self.backend, "host", "the API server")
                raise ClusterError(run.name, run.attempt, run.outcome,
                                   f"cannot reach {host} ({type(e).__name__}: {e}): is the cluster up and the kubeconfig right?") from e
            raise

    # -- one stage -----------------------------------------------------------------------------
    def _run(self, job: dict[str, Any], run: "_Run") -> ExecutionResult:
        ns, name = run.namespace, run.name
        fp = (job["metadata"].get("annotations") or {}).get(FINGERPRINT)
        policies, backoff = self.backend.restart_policies(job)
        deadline_s = run.deadline_s = (job["spec"].get("runPolicy") or {}).get("activeDeadlineSeconds")
        if ns not in self._checked:
            for w in self.backend.check(ns):
                self.echo(f"[{name}] warning: {w}")
            self._checked.add(ns)
        end = time.monotonic() + self.config.timeout_seconds if self.config.timeout_seconds else None

        current, run.attempt, started = self._adopt(job, run, fp, policies, backoff)
        run.created = current is not None
        while True:
            if current is None:
                remaining = None
                if deadline_s:
                    remaining = int(float(deadline_s) - (time.time() - started) + 0.999)
                    if remaining < 1:
                        raise StageFailed(name, run.attempt - 1, run.outcome, f"activeDeadlineSeconds={deadline_s} passed")
                submit = self.backend.for_group_restart(job, remaining)
                ann = submit["metadata"].setdefault("annotations", {})
                ann[ATTEMPT], ann[STARTED] = str(run.attempt), str(int(started))
                current = self._create(submit, run)
                run.created = True
                self.echo(f"[{name}] created {self.backend.kind} {ns}/{name} (attempt {run.attempt}/{backoff + 1})")
            state, message = self._follow(current, run, end, started + float(deadline_s) if deadline_s else None)
            if state == "Succeeded":
                self._cleanup(run, succeeded=True)
                return ExecutionResult(job=name, attempts=run.attempt, replicas=run.outcome, log_dir=run.log_dir)
            ours = ATTEMPT in (current["metadata"].get("annotations") or {})
            by_deadline = "deadline" in message
            if state == "Interrupted":  # a replica's pod was deleted mid-run: killed from outside, as by SIGKILL
                codes = [(r, 137) for r in run.interrupted]
            else:
                failed = [o for o in run.outcome if not o.stopped and o.exit_code not in (0, None)] or [o for o in run.outcome if not o.stopped]
                codes = [(o.replica, o.exit_code) for o in failed]
            retry = ours and _retryable(policies, codes, message, run.attempt, backoff)
            if not retry:
                if state == "Interrupted":
                    self._give_up(run)  # still active, with a lone recreated rank: it would hold its nodes
                else:
                    self._cleanup(run, succeeded=False)
                why = f"activeDeadlineSeconds={deadline_s} passed" if by_deadline else (
                    f"backoffLimit={backoff}" + (f"; {message}" if message else ""))
                raise StageFailed(name, run.attempt, run.outcome, why)
            self.echo(f"[{name}] attempt {run.attempt} failed ({message or state}); restarting the whole group "
                      f"({run.attempt}/{backoff} restarts)")
            self._delete(run, "restart the group")
            current = None
            run.attempt += 1

    def _create(self, submit: dict[str, Any], run: "_Run") -> dict[str, Any]:
        """Create the job; on 409 wait for a terminating namesake to go, or take the job a retried create made."""
        ns, name = run.namespace, run.name
        ann = submit["metadata"]["annotations"]
        while True:
            try:
                return self.backend.create(submit)
            except AlreadyExists as e:
                existing = self.backend.get(ns, name)
                if existing is None:
                    continue  # gone in between
                theirs = existing["metadata"].get("annotations") or {}
                if existing["metadata"].get("deletionTimestamp"):
                    self.echo(f"[{name}] {ns}/{name} is still terminating (409 AlreadyExists): waiting for its deletion")
                    self._delete(run, "create the next attempt")
                elif all(theirs.get(k) == ann.get(k) for k in (ATTEMPT, STARTED, FINGERPRINT)):
                    self.echo(f"[{name}] {ns}/{name} was created by a retried request (409 AlreadyExists): following it")
                    return existing
                else:
                    raise JobConflict(name, run.attempt, run.outcome, (
                        f"{self.backend.kind} {ns}/{name} was created by someone else while this stage was starting ({e}): "
                        f"delete it (kubectl -n {ns} delete {self.backend.kind.lower()} {name}) and run again")) from e

    def _delete(self, run: "_Run", why: str) -> None:
        """Delete the job and wait until it and its pods are gone; a job that stays is an error (same name is reused)."""
        if not self.backend.delete(run.namespace, run.name, wait=self.delete_timeout):
            raise ClusterError(run.name, run.attempt, run.outcome, (
                f"{self.backend.kind} {run.namespace}/{run.name} is still there {self.delete_timeout:g}s after its deletion "
                f"(to {why}): a finalizer or a stuck pod holds it (kubectl -n {run.namespace} get {self.backend.kind.lower()} "
                f"{run.name} -o yaml; kubectl -n {run.namespace} get pods -l training.kubeflow.org/job-name={run.name})"))

    def _adopt(self, job: dict[str, Any], run: "_Run", fp: str | None, policies: dict[str, str], backoff: int) -> tuple[dict | None, int, float]:
        """(the existing job to re-attach to or None, its attempt, start time): same name and fingerprint re-attaches."""
        ns, name = run.namespace, run.name
        existing = self.backend.get(ns, name)
        if existing is None:
            return None, 1, time.time()
        ann = existing["metadata"].get("annotations") or {}
        state, message = self.backend.state(existing)
        if existing["metadata"].get("deletionTimestamp"):  # e.g. a driver killed during a group restart
            self.echo(f"[{name}] waiting for the deletion of the previous {ns}/{name}")
            self._delete(run, "start the stage")
            if ann.get(FINGERPRINT) != fp or state != "Failed":
                return None, 1, time.time()
        elif ann.get(FINGERPRINT) != fp:
            if state not in FINISHED:
                raise JobConflict(name, 0, [], (
                    f"{self.backend.kind} {ns}/{name} exists and is {state or 'pending'}, but for other inputs or params "
                    f"(fingerprint {str(ann.get(FINGERPRINT))[:12]}, this stage {str(fp)[:12]}): wait for it to finish, "
                    f"or delete it (kubectl -n {ns} delete {self.backend.kind.lower()} {name}) and run again"))
            self.echo(f"[{name}] replacing the finished {ns}/{name} of other inputs or params ({state})")
            self._delete(run, "replace it")
            return None, 1, time.time()
        attempt = int(ann.get(ATTEMPT) or 1)
        started = float(ann.get(STARTED) or time.time())
        if state == "Failed":  # a driver stopped between attempts goes on counting; a stage that failed for good starts over
            codes = [(self.backend.replica(p), _exit_code(p)) for p in self.backend.pods(ns, existing)]
            pending_restart = _retryable(policies, [(r, c) for r, c in codes if c not in (0, None)], message, attempt, backoff)
            self.echo(f"[{name}] the existing {ns}/{name} failed (attempt {attempt}); "
                      + ("restarting the whole group" if pending_restart else "it had failed for good: starting over"))
            self._delete(run, "start the next attempt")
            return (None, attempt + 1, started) if pending_restart else (None, 1, time.time())
        self.echo(f"[{name}] re-attaching to {ns}/{name} ({state or 'pending'}, attempt {attempt}, uid {existing['metadata'].get('uid')})")
        return existing, attempt, started

    # -- following one attempt -----------------------------------------------------------------
    def _follow(self, current: dict[str, Any], run: "_Run", end: float | None, active_until: float | None) -> tuple[str, str]:
        """Wait for the job's end (Succeeded/Failed, or Interrupted: a replica's pod deleted mid-run), streaming logs;
        raise ClusterError on what the cluster cannot fix."""
        ns, name, uid = run.namespace, run.name, current["metadata"].get("uid")
        names = self.backend.replicas(current)
        tails = {r: deque(maxlen=40) for r in names}
        streams: dict[str, _Stream] = {}
        last: dict[str, dict[str, Any]] = {}
        waits = _Waits(self, run)
        echoed: set[tuple[str, str]] = set()
        state, message = "", ""
        ok = False
        run.interrupted = []
        try:
            while True:
                obj = self.backend.get(ns, name)
                if obj is None or obj["metadata"].get("uid") != uid:
                    raise ClusterError(name, run.attempt, self._outcome(names, last, tails, run, state),
                                       f"{self.backend.kind} {ns}/{name} was deleted or replaced by someone else while it ran")
                for c in (obj.get("status") or {}).get("conditions") or []:
                    key = (c["type"], c.get("lastTransitionTime", ""))
                    if c.get("status") == "True" and key not in echoed:
                        echoed.add(key)
                        self.echo(f"[{name}] {c['type']}: {c.get('message', '')}")
                state, message = self.backend.state(obj)
                pods = self.backend.pods(ns, obj)
                if state in FINISHED:
                    self._see(pods, last, tails, streams, run)
                    break
                gone = self._see(pods, last, tails, streams, run)
                if gone:  # unless the job ended in between: cleanPodPolicy then deletes its running pods
                    state, message = self.backend.state(self.backend.get(ns, name) or obj)
                if gone and state not in FINISHED:
                    run.interrupted = gone
                    state, message = "Interrupted", f"the pod of {', '.join(gone)} was deleted while it ran"
                    self.echo(f"[{name}] {message}: one rank cannot rejoin its group")
                    break
                if state in FINISHED:
                    break
                waits.check(obj, pods, names, lambda: self._outcome(names, last, tails, run, "stopping"))
                if active_until is not None and time.time() > active_until + DEADLINE_SLACK:
                    # v1.9.3 checks activeDeadlineSeconds only in a reconcile queued once, when the job starts
                    raise StageTimeout(name, run.attempt, self._outcome(names, last, tails, run, "stopping"), (
                        f"activeDeadlineSeconds={run.deadline_s} passed "
                        f"(the operator did not stop the job within {DEADLINE_SLACK:g}s of it; state: {state or 'pending'})"))
                if end is not None and time.monotonic() > end:
                    raise StageTimeout(name, run.attempt, self._outcome(names, last, tails, run, "stopping"), (
                        f"not finished after timeout_seconds={self.config.timeout_seconds:g} (state: {state or 'pending'})"))
                time.sleep(self.poll_seconds)
            ok = True
        except (ImagePullFailed, PendingTimeout, PodsNotCreated, StageTimeout) as e:
            run.outcome = e.replicas
            self._give_up(run)
            raise
        except KeyboardInterrupt:
            self.echo(f"[{name}] interrupted: {ns}/{name} keeps running; run again to re-attach, or kubectl -n {ns} delete {self.backend.kind.lower()} {name}")
            raise
        finally:
            for s in streams.values():
                s.close(10.0 if ok else 0.0)
        run.outcome = self._outcome(names, last, tails, run, "stopping" if state == "Interrupted" else state)
        return state, message

    def _see(self, pods: list[dict[str, Any]], last: dict[str, dict], tails: dict[str, deque], streams: dict[str, "_Stream"],
             run: "_Run") -> list[str]:
        """Record the pods of this poll, start and end their log streams; return the replicas whose running pod was
        deleted or replaced (the operator recreates a deleted pod under the same name: a lone rank)."""
        gone = []
        now = {self.backend.replica(p): p for p in pods}
        for r, before in last.items():
            pod = now.get(r)
            if _exit_code(before) is None and (pod is None or pod["metadata"]["uid"] != before["metadata"]["uid"]
                                               or (pod["metadata"].get("deletionTimestamp") and _exit_code(pod) is None)):
                gone.append(r)
        for r, pod in now.items():
            last[r] = pod
            tails.setdefault(r, deque(maxlen=40))
            puid = pod["metadata"]["uid"]
            if puid not in streams and _started(pod):
                streams[puid] = _Stream(self.backend, run.namespace, pod, r, run.log_dir / f"{r}.log", run.attempt, self.echo, tails[r])
            if puid in streams and _exit_code(pod) is not None:
                streams[puid].ended.set()
        return sorted(gone)

    def _outcome(self, names: list[str], last: dict[str, dict], tails: dict[str, deque], run: "_Run", state: str) -> list[ReplicaOutcome]:
        """How each replica ended; one without an exit code in a job that failed (or that the executor gives up on) is stopped."""
        out = []
        for r in names + sorted(set(last) - set(names)):
            pod = last.get(r)
            code = _exit_code(pod) if pod else None
            out.append(ReplicaOutcome(
                replica=r, exit_code=code, stopped=code is None and state in ("Failed", "stopping"),
                log=run.log_dir / f"{r}.log", last_lines=list(tails.get(r, ()))[-20:],
            ))
        run.pods = [p["metadata"]["name"] for p in last.values() if _exit_code(p) is None]
        return out

    # -- ending --------------------------------------------------------------------------------
    def _cleanup(self, run: "_Run", succeeded: bool) -> None:
        """Delete the finished job by ``cleanup`` policy; a kept failed job's still-running replicas are stopped."""
        policy = self.config.cleanup
        if policy == "always" or (policy == "on-success" and succeeded):
            self.backend.delete(run.namespace, run.name, wait=self.delete_timeout)
            return
        if not succeeded:
            for pod in run.pods:
                try:
                    self.backend.delete_pod(run.namespace, pod)
                except ApiDenied as e:
                    self.echo(f"[{run.name}] warning: cannot stop pod {pod}: {e.explain()}")
                    break
        self.echo(f"[{run.name}] kept {self.backend.kind} {run.namespace}/{run.name} (cleanup: {policy})")

    def _give_up(self, run: "_Run") -> None:
        """A job the executor gives up on while it is active is deleted (it would hold its nodes), unless cleanup is never."""
        if self.config.cleanup == "never":
            self.echo(f"[{run.name}] left {run.namespace}/{run.name} in place (cleanup: never)")
            return
        try:
            self.backend.delete(run.namespace, run.name, wait=self.delete_timeout)
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            self.echo(f"[{run.name}] warning: could not delete {run.namespace}/{run.name}: {e}")


class _Waits:
    """Time a job spends before its replicas run, each cause against its own limit: replicas not created (the
    operator's FailedCreatePod events), queued (Kueue suspend, a gang scheduler), unschedulable, pulling/starting."""

    LIMITS = {"creating": "pod_creation_timeout_seconds", "queued": "queued_timeout_seconds",
              "unschedulable": "unschedulable_timeout_seconds", "pulling": "image_pull_timeout_seconds"}

    def __init__(self, ex: "KubernetesExecutor", run: "_Run"):
        self.ex, self.run = ex, run
        self.since: dict[tuple[str, str], float] = {}  # (who, cause) -> first seen (monotonic)
        self.events_seen: set[str] = set()
        self.events_at = 0.0
        self.failures: list[str] = []
        self.said: set[tuple[str, str]] = set()

    def _over(self, who: str, cause: str, detail: str) -> float | None:
        """Seconds ``who`` has been in ``cause`` when that passes its limit, else None; says so the first time."""
        now = time.monotonic()
        for key in [k for k in self.since if k[0] == who and k[1] != cause]:
            del self.since[key]  # the cause changed: its clock starts again
        self.since.setdefault((who, cause), now)
        limit = getattr(self.ex.config, self.LIMITS[cause])
        waited = now - self.since[(who, cause)]
        if waited > SAY_AFTER and (who, cause) not in self.said:
            self.said.add((who, cause))
            self.ex.echo(f"[{self.run.name}] {who} {cause} for {waited:.0f}s{': ' + detail if detail else ''} "
                         f"(limit {self.LIMITS[cause]}={'none' if limit is None else f'{limit:g}s'})")
        return waited if limit is not None and waited > limit else None

    def check(self, job: dict[str, Any], pods: list[dict[str, Any]], names: list[str], outcome: Callable[[], list]) -> None:
        ns, name, kind = self.run.namespace, self.run.name, self.ex.backend.kind
        here = {self.ex.backend.replica(p) for p in pods}
        missing = [r for r in names if r not in here]
        suspended = bool((job["spec"].get("runPolicy") or {}).get("suspend"))
        if suspended:
            waited = self._over(kind, "queued", "suspended until admitted (e.g. by Kueue)")
            if waited is not None:
                raise PendingTimeout(name, self.run.attempt, outcome(), (
                    f"{kind} {ns}/{name} is still queued (suspended) after {waited:.0f}s (queued_timeout_seconds="
                    f"{self.ex.config.queued_timeout_seconds:g}); check its queue (kubectl -n {ns} get workloads)"))
            return
        if missing:
            failures = self._create_failures(job)
            detail = failures[-1] if failures else ""
            waited = self._over(f"replicas {', '.join(missing)}", "creating", detail)
            if waited is not None:
                raise PodsNotCreated(name, self.run.attempt, outcome(), self._not_created(job, missing, failures, waited))
        gang = bool((job["spec"].get("runPolicy") or {}).get("schedulingPolicy"))
        for pod in pods:
            if (pod.get("status") or {}).get("phase") != "Pending" or pod["metadata"].get("deletionTimestamp"):
                continue
            who = f"pod {pod['metadata']['name']} ({self.ex.backend.replica(pod)})"
            cause, detail = _pending_cause(pod, gang)
            pull = _image_pull_error(pod)
            if pull and pull[1] in IMAGE_FATAL:
                raise ImagePullFailed(name, self.run.attempt, outcome(), _pull_message(who, pull))
            waited = self._over(who, cause, detail)
            if waited is None:
                continue
            setting = self.LIMITS[cause]
            limit = f"{setting}={getattr(self.ex.config, setting):g}"
            if pull:
                raise ImagePullFailed(name, self.run.attempt, outcome(), f"{_pull_message(who, pull)} (for {waited:.0f}s, {limit})")
            hint = {"unschedulable": "check its resource requests, nodeSelector and tolerations against the nodes",
                    "queued": "check the gang scheduler's queue and the PodGroup",
                    "pulling": "a large image on a slow registry? raise the limit, or pre-pull the image on the nodes"}[cause]
            raise PendingTimeout(name, self.run.attempt, outcome(), (
                f"{who} is still Pending, {cause}, after {waited:.0f}s ({limit}): {detail or 'no reason given'}; {hint} "
                f"(kubectl -n {ns} describe pod {pod['metadata']['name']})"))

    def _create_failures(self, job: dict[str, Any]) -> list[str]:
        """The messages of the job's FailedCreatePod events (echoed once each); read at most every 2 s."""
        if time.monotonic() - self.events_at < 2.0:
            return self.failures
        self.events_at = time.monotonic()
        events = self.ex.backend.events(self.run.namespace, job["metadata"]["uid"])
        self.failures = [e.get("message", "") for e in events or [] if e.get("reason") in CREATE_FAILED]
        for e in events or []:
            if e.get("type") == "Warning" and e["metadata"]["uid"] not in self.events_seen:
                self.events_seen.add(e["metadata"]["uid"])
                self.ex.echo(f"[{self.run.name}] event {e.get('reason')}: {e.get('message', '')}")
        return self.failures

    def _not_created(self, job: dict[str, Any], missing: list[str], failures: list[str], waited: float) -> str:
        ns, name, kind = self.run.namespace, self.run.name, self.ex.backend.kind
        head = (f"the training operator has not created the pods of {', '.join(missing)} of {kind} {ns}/{name} after "
                f"{waited:.0f}s (pod_creation_timeout_seconds={self.ex.config.pod_creation_timeout_seconds:g})")
        if not failures:
            if not (job.get("status") or {}).get("conditions"):
                return (f"{head}, and the job has no conditions: is the training operator running and watching this "
                        f"namespace? (kubectl -n kubeflow get pods; kubectl -n {ns} describe {kind.lower()} {name})")
            return f"{head}; no FailedCreatePod event says why (kubectl -n {ns} describe {kind.lower()} {name})"
        msg = failures[-1]
        if "PodSecurity" in msg:
            hint = ("the namespace's Pod Security level refuses the pod"
                    + ("; init-pytorch is the operator's own init container on Worker pods: give the operator a template "
                       "that meets 'restricted' (--pytorch-init-container-template-file, docs/production.md \"Pod Security\")"
                       if "init-pytorch" in msg else "; executor.kubernetes.pod_security: restricted makes trainer pods meet it"))
        elif "exceeded quota" in msg or "must specify" in msg:
            hint = f"a ResourceQuota in {ns} refuses it (kubectl -n {ns} describe resourcequota)"
        elif "serviceaccount" in msg.lower():
            hint = "the pod's service account does not exist (executor.kubernetes.service_account)"
        else:
            hint = f"kubectl -n {ns} describe {kind.lower()} {name}"
        return f"{head}: {msg} ({hint})"


class _Run:
    """State of one ``run`` call (what the errors report)."""

    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace
        self.attempt = 0
        self.outcome: list[ReplicaOutcome] = []
        self.pods: list[str] = []  # pods without an exit code at the end of the last attempt
        self.interrupted: list[str] = []  # replicas whose pod was deleted mid-run in the last attempt
        self.created = False  # a job of this stage exists on the cluster (created or re-attached to)
        self.deadline_s: int | None = None  # the rendered activeDeadlineSeconds (over all attempts)
        self.log_dir = Path("logs")


def _retryable(policies: dict[str, str], failed: list[tuple[str, int | None]], message: str, attempt: int, backoff: int) -> bool:
    """Whether a failed attempt restarts: attempts left, not stopped by its deadline, every failed replica's policy allows it."""
    return "deadline" not in message and attempt <= backoff and all(
        restartable(policies.get(replica.rsplit("-", 1)[0], "OnFailure"), code) for replica, code in failed)


def _containers(pod: dict[str, Any]) -> Iterable[dict[str, Any]]:
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def _started(pod: dict[str, Any]) -> bool:
    """Whether the main container runs or ran (its log can be followed)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        s = cs.get("state") or {}
        if "running" in s or "terminated" in s:
            return True
    return False


def _exit_code(pod: dict[str, Any]) -> int | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    cs = next((c for c in statuses if c.get("name") == "pytorch"), statuses[0] if statuses else None)
    term = ((cs or {}).get("state") or {}).get("terminated")
    return int(term["exitCode"]) if term else None


def _image_pull_error(pod: dict[str, Any]) -> tuple[str, str, str] | None:
    """(image, reason, message) of a container whose image cannot be pulled."""
    specs = {c["name"]: c.get("image", "?") for key in ("initContainers", "containers") for c in pod["spec"].get(key) or []}
    for cs in _containers(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            return specs.get(cs["name"], cs.get("image", "?")), waiting["reason"], waiting.get("message", "")
    return None


def _pending_cause(pod: dict[str, Any], gang: bool) -> tuple[str, str]:
    """Why a Pending pod waits: (queued | unschedulable | pulling, detail)."""
    conds = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
    scheduled = conds.get("PodScheduled") or {}
    if scheduled.get("status") != "True":
        detail = (scheduled.get("message") or "").rstrip(".")
        if scheduled.get("reason") == "SchedulingGated" or gang or pod["spec"].get("schedulerName", DEFAULT_SCHEDULER) != DEFAULT_SCHEDULER:
            return "queued", detail or f"waiting for scheduler {pod['spec'].get('schedulerName', DEFAULT_SCHEDULER)}"
        return "unschedulable", detail or "not scheduled yet"
    waiting = [(cs["name"], (cs.get("state") or {}).get("waiting") or {}) for cs in _containers(pod)]
    detail = ", ".join(f"{n}: {w.get('reason')}" + (f" ({w['message']})" if w.get("message") else "") for n, w in waiting if w)
    return "pulling", detail or "containers starting"


def _pull_message(who: str, pull: tuple[str, str, str]) -> str:
    return (f"{who} cannot pull image {pull[0]} ({pull[1]}: {pull[2]}): check the image name and tag, that the registry "
            "is reachable from the nodes, and the pod's imagePullSecrets")


def _default_log_dir(job: dict[str, Any]) -> Path:
    """``<workdir>/logs`` of the stage spec the job carries, else ./logs."""
    from pipelines.render import spec_of

    try:
        return Path(spec_of(job).outputs.workdir) / "logs"
    except Exception:  # noqa: BLE001 - a hand-written manifest without a spec
        return Path("logs")


def _print(line: str) -> None:
    print(line, flush=True)
