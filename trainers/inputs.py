"""A stage's inputs and outputs as its spec names them: datasets, models, the output dataset, MLflow metrics.

Every error names the input (``inputs.datasets.<name>``, ``inputs.models.<name>``) so a failed stage
says which part of its spec is wrong.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from contract.spec import StageSpec
from trainers.data import shards


class StageInputError(ValueError):
    """A stage input named in the spec is missing or unreadable; the message names the input."""


def stage_device(spec: StageSpec) -> torch.device:
    """cuda:<LOCAL_RANK> when the spec asks for GPUs and one is visible, else cpu."""
    if spec.resources.gpus_per_replica > 0 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def dataset_input(spec: StageSpec, name: str) -> str:
    """Path of ``spec.inputs.datasets[name]``; StageInputError when it is not in the spec or not a published dataset."""
    ref = spec.inputs.datasets.get(name)
    if ref is None:
        raise StageInputError(f"stage {spec.stage!r} needs inputs.datasets.{name} "
                              f"(the spec has: {sorted(spec.inputs.datasets) or 'none'})")
    try:
        shards.DatasetIndex.load(ref.path)
    except shards.DataError as e:
        raise StageInputError(f"inputs.datasets.{name}: {e}") from None
    return ref.path


def output_dataset(spec: StageSpec) -> Path:
    """``outputs.dataset``; StageInputError when the spec has none."""
    if not spec.outputs.dataset:
        raise StageInputError(f"stage {spec.stage!r} needs outputs.dataset (the directory of the dataset it writes)")
    return Path(spec.outputs.dataset)


def model_input_path(spec: StageSpec, name: str) -> Path:
    """Local file of ``spec.inputs.models[name]`` (a ``models:/`` URI is resolved through MLflow)."""
    from contract.models import resolve_model

    ref = spec.inputs.models.get(name)
    if ref is None:
        raise StageInputError(f"stage {spec.stage!r} needs inputs.models.{name} "
                              f"(the spec has: {sorted(spec.inputs.models) or 'none'})")
    try:
        return Path(resolve_model(ref.uri, spec.tracking.mlflow_uri))
    except Exception as e:  # FileNotFoundError, MLflow lookup errors
        raise StageInputError(f"inputs.models.{name} ({ref.uri}): {e}") from e


def load_model_input(spec: StageSpec, name: str, device: torch.device | None = None):
    """The Segmenter of ``spec.inputs.models[name]`` (a segmenter file, see ``trainers.models.io``), in eval mode on ``device``."""
    from trainers.models.io import load_segmenter

    path = model_input_path(spec, name)
    try:
        model = load_segmenter(path)
    except (FileNotFoundError, ValueError) as e:
        raise StageInputError(f"inputs.models.{name}: {e}") from e
    return model.to(device or stage_device(spec)).eval()


def log_metrics(spec: StageSpec, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics to the stage's MLflow run (when the spec names one); call on rank 0 only (non-training stages).

    Sent through a :class:`MetricBuffer`: an MLflow outage shorter than the limit delays the call, never loses them.
    """
    if spec.tracking.run_id is None or not metrics:
        return
    buffer = MetricBuffer(spec.tracking.mlflow_uri, spec.tracking.run_id, spec.tracking.outage_seconds)
    buffer.log(metrics, step)
    buffer.close()


class MlflowOutage(RuntimeError):
    """MLflow stayed unreachable for longer than the outage limit; the message names the server and the metrics held."""


class MetricBuffer:
    """Metrics on their way to one MLflow run: queued by the training loop (which never waits on the server), sent in
    order by a background thread, kept and re-sent while the server is unreachable. Metrics waiting longer than
    ``limit`` seconds (the spec's ``tracking.outage_seconds``) fail the stage, naming the server and how many are held;
    :meth:`close` waits for the rest."""

    BATCH = 1000  # MLflow's log_batch limit on metrics per request
    REFUSED = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST")

    def __init__(self, tracking_uri: str, run_id: str, limit: float):
        import threading
        from collections import deque

        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = tracking_uri, run_id
        self.limit = limit
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.pending: deque = deque()  # (queued at, Metric)
        self.error: BaseException | None = None  # the last failed send, while an outage lasts
        self.sent = 0
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._send, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = time.time()
        with self.cond:
            self._check(now)
            self.pending.extend((now, Metric(k, float(v), int(now * 1000), step)) for k, v in metrics.items())
            self.cond.notify()

    def close(self) -> None:
        """Send what is queued (waiting out an outage up to the limit), then stop the thread."""
        with self.cond:
            self.closing = True
            self.cond.notify()
            while self.pending:
                self._check(time.time())
                self.cond.wait(timeout=0.5)
        self.thread.join(timeout=5)

    def _check(self, now: float) -> None:
        if self.pending and now - self.pending[0][0] > self.limit:
            raise MlflowOutage(
                f"MLflow at {self.uri} has not taken metrics of run {self.run_id} for {now - self.pending[0][0]:.0f} s "
                f"(limit {self.limit:g} s, tracking.outage_seconds); {len(self.pending)} metric value(s) held, {self.sent} sent; "
                f"last error: {type(self.error).__name__}: {str(self.error)[:500]}")

    def _send(self) -> None:
        backoff = 0.5
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                if not self.pending and self.closing:
                    return
                batch = [m for _, m in list(self.pending)[:self.BATCH]]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - unreachable, 5xx, timeouts: keep them and try again
                with self.cond:
                    self.error = e
                    if getattr(e, "error_code", None) in self.REFUSED:  # the server answered no: waiting will not help
                        self.limit = 0.0
                        self.cond.notify_all()
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            with self.cond:
                for _ in batch:
                    self.pending.popleft()
                self.sent += len(batch)
                self.error = None
                self.cond.notify_all()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def fetch_model_file(source: str, spec: StageSpec, what: str) -> Path:
    """Local file of a model reference that is not a spec input (e.g. ``params.import_from``): a path, a
    ``models:/`` URI or an http(s) URL (downloaded once into ``<workdir>/imported``). Errors name ``what``."""
    if source.startswith(("http://", "https://")):
        from contract.io import write_atomic

        dst = Path(spec.outputs.workdir) / "imported" / Path(source.split("?")[0]).name
        if not dst.is_file():
            import urllib.request

            with urllib.request.urlopen(source) as r:  # noqa: S310 (a URL the spec names)
                write_atomic(dst, r.read())
        return dst
    from contract.models import resolve_model

    try:
        return Path(resolve_model(source, spec.tracking.mlflow_uri))
    except Exception as e:
        raise StageInputError(f"{what} ({source}): {e}") from e
