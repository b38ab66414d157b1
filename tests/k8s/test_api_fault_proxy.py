"""The executor's API calls through a fault-injecting proxy in front of the real local API server (issue 15 item 3):
429 (with Retry-After) and 5xx answers are retried with backoff until the real answer arrives; a 409 from the real
server at create is AlreadyExists; a fault that outlasts api_retry_seconds is ApiUnavailable naming the call.

The proxy speaks plain HTTP to the client and forwards every request it does not fault to the API server over TLS with
the admin kubeconfig's client certificate, so every answer that is not injected is the real server's."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster_helpers import Cluster, namespace  # noqa: F401  (fixture)
from executor_helpers import stage_job
from pipelines.executors.kubernetes import AlreadyExists, ApiUnavailable, PyTorchJobBackend

pytestmark = pytest.mark.cluster


class FaultProxy:
    """Forwards to ``upstream`` (a kubernetes client Configuration); ``faults`` is a list of (method, path part,
    status, headers) answered instead of forwarding, each once, in order of arrival."""

    def __init__(self, upstream) -> None:
        import urllib3

        self.faults: list[tuple[str, str, int, dict[str, str]]] = []
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self.lock = threading.Lock()
        pool = urllib3.PoolManager(cert_file=upstream.cert_file, key_file=upstream.key_file, ca_certs=upstream.ssl_ca_cert,
                                   cert_reqs="CERT_REQUIRED")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    fault = next((f for f in proxy.faults if f[0] == self.command and f[1] in self.path), None)
                    if fault:
                        proxy.faults.remove(fault)
                if fault:
                    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": fault[2],
                              "message": f"injected {fault[2]}", "reason": "Injected"}
                    data = json.dumps(status).encode()
                    proxy.seen.append((self.command, self.path, fault[2]))  # before the answer: the client may look next
                    self.send_response(fault[2])
                    for k, v in {**fault[3], "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")}
                r = pool.request(self.command, upstream.host + self.path, body=body or None, headers=headers,
                                 preload_content=True, retries=False)
                proxy.seen.append((self.command, self.path, r.status))  # recorded before the client can read it
                self.send_response(r.status)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.data)))
                self.end_headers()
                self.wfile.write(r.data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxied(cluster: Cluster):
    """(backend through the proxy, proxy, echoed lines)."""
    from kubernetes import client, config

    upstream = client.Configuration()
    config.load_kube_config(config_file=str(cluster.admin), client_configuration=upstream, persist_config=False)
    proxy = FaultProxy(upstream)
    c = client.Configuration()
    c.host = proxy.url
    lines: list[str] = []
    backend = PyTorchJobBackend(client.ApiClient(c))
    backend.configure(request_timeout=20, retry_seconds=30, echo=lines.append)
    yield backend, proxy, lines
    proxy.close()


def test_429_and_5xx_are_retried_until_the_real_server_answers(proxied, namespace):
    backend, proxy, lines = proxied
    job, _ = stage_job(namespace, "retried")
    proxy.faults += [("POST", "/pytorchjobs", 503, {}), ("POST", "/pytorchjobs", 429, {"Retry-After": "1"})]
    created = backend.create(job)  # two injected answers, then the real server's 201
    name = job["metadata"]["name"]
    assert created["metadata"]["name"] == name and created["metadata"]["uid"]
    proxy.faults += [("GET", f"/pytorchjobs/{name}", status, {}) for status in (500, 502, 504)]
    got = backend.get(namespace, name)
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    assert [s for m, _, s in proxy.seen if m == "POST"] == [503, 429, 201]
    assert [s for m, p, s in proxy.seen if m == "GET" and p.endswith(f"/{name}")] == [500, 502, 504, 200]
    assert any("retrying for up to 30s" in x for x in lines) and any("answered after" in x for x in lines)


def test_a_real_409_at_create_is_already_exists(proxied, namespace):
    backend, proxy, _ = proxied
    job, _ = stage_job(namespace, "twice")
    backend.create(job)
    with pytest.raises(AlreadyExists, match="already exists"):
        backend.create(job)
    assert [s for m, _, s in proxy.seen if m == "POST"] == [201, 409]  # a 409 is not retried


def test_a_fault_that_outlasts_the_retry_budget_names_the_call(proxied, namespace):
    backend, proxy, _ = proxied
    backend.configure(request_timeout=5, retry_seconds=2, echo=lambda s: None)
    proxy.faults += [("GET", "/pytorchjobs/gone", 503, {})] * 50
    with pytest.raises(ApiUnavailable, match=f"get PyTorchJob {namespace}/gone"):
        backend.get(namespace, "gone")
    assert 2 <= len([1 for m, p, s in proxy.seen if p.endswith("/gone") and s == 503]) < 50
