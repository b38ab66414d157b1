"""A stage job, complete in itself: ``python -m pipelines.stage_job --spec env:SELFTRAIN_SPEC``.

This is the command of every replica of a rendered PyTorchJob, so ``kubectl apply`` of a stage
manifest does everything ``selftrain run`` does for that stage:

1. **Resolve** the spec's inputs (every replica, read-only): ``stage:<name>`` -> the model version
   that stage of the same pipeline run registered (its succeeded MLflow run's ``model.version``
   tag); ``models:/<name>@<alias>`` -> the version holding the alias now; a model file -> itself,
   pinned by its sha256; a dataset directory -> its DVC hash. The resolved spec's fingerprint
   identifies the work.
2. On node rank 0 (``PET_NODE_RANK``, the Master replica) only: **skip** when ``<workdir>/stage.json``
   says this fingerprint succeeded; otherwise move aside what a different fingerprint left, find
   or create the MLflow parent run of the pipeline run (by its tags) and the stage's child run
   (reused when the stage restarts), record the resolved inputs on it, and write the resolved
   spec to ``<workdir>/spec.json``.
3. **Run the trainer** as a child, ``torchrun -m trainers <stage> --spec env:SELFTRAIN_SPEC`` with
   the resolved spec in ``SELFTRAIN_SPEC`` (SIGTERM/SIGINT are forwarded; its exit code is the job's).
   A world of one (``PET_NNODES`` = ``PET_NPROC_PER_NODE`` = 1) runs ``python -m trainers`` directly:
   the trainer joins that world from the launch variables itself, and torchrun would only add its
   own start-up (seconds per stage).
4. On node rank 0, after the trainer succeeded, **finish**: ``dvc add`` + ``dvc push`` of the
   output dataset, registration of the model, and for a stage with ``spec.promotion`` the
   evaluation record and the promotion rule (decision tags, then the alias). A failure is
   recorded too (a failed evaluation keeps the aliases). The outcome lands in ``stage.json``,
   written atomically last.

The pipeline run's name comes from ``SELFTRAIN_RUN`` (set in every rendered job), else from the
workdir (``<runs>/<run>/<stage>``). ``SELFTRAIN_TRAINER_COMMAND`` (a JSON list) replaces the
trainer command, e.g. with a stand-in program in tests. Never imports torch.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from contract.io import read_json, write_json
from contract.spec import SpecError, StageSpec, format_validation_error

SPEC_ENV = "SELFTRAIN_SPEC"
RUN_ENV = "SELFTRAIN_RUN"
TRAINER_ENV = "SELFTRAIN_TRAINER_COMMAND"
MARKER = "stage.json"  # <workdir>/stage.json: {"fingerprint", "status", "mlflow_run_id", "model_version", "output_hash", "decisions", "inputs"}
JOB_LOCK = ".job.lock"  # <workdir>/.job.lock: flock held by node rank 0 of the stage's running job; holds its pid
KEEP_ON_MOVE = ("logs", "pytorchjob.yaml", JOB_LOCK)  # written by whoever runs the job, not by an earlier fingerprint


class StageJobError(RuntimeError):
    """A stage job cannot start or finish (an input is missing, MLflow or DVC is unreachable); the message says which."""


@dataclass
class Resolved:
    """A spec with its inputs pinned, its fingerprint, and the record of what each input resolved to."""

    spec: StageSpec
    fingerprint: str
    inputs: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # {"models": {k: {...}}, "datasets": {k: {...}}}


# -- resolution --------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve(spec: StageSpec, run: str, lineage: Any, *, hash_datasets: bool = True, done: dict | None = None) -> Resolved:
    """Pin ``spec``'s inputs (see the module doc); raises StageJobError naming the stage and the input.

    ``done``: the stage's marker when it says succeeded. An input declared by alias (``models:/<name>@<alias>``)
    then resolves to the version the stage ran with, as its marker records, not to where the alias points now: the
    aliases of a pipeline run move as its later rounds are promoted, and a finished stage of an earlier round must not
    look changed (and be run again, with a later round's model) when the run is resumed or re-run."""
    ran_with = {n: e for n, e in ((done or {}).get("inputs") or {}).get("models", {}).items()
                if (done or {}).get("status") == "succeeded" and "@" in str(e.get("ref", "")) and e.get("model") and e.get("version")}
    from pipelines import render
    from pipelines.dvc import DvcError, dataset_hash

    s = spec.model_copy(deep=True)
    record: dict[str, dict[str, dict[str, str]]] = {"models": {}, "datasets": {}}
    files: dict[str, str] = {}
    for name, d in s.inputs.datasets.items():
        if not Path(d.path).is_dir():
            raise StageJobError(f"stage {spec.name}: input dataset {name!r} does not exist at {d.path}")
        if d.dvc_hash is None and hash_datasets:
            try:
                d.dvc_hash = dataset_hash(d.path)
            except DvcError as e:
                raise StageJobError(f"stage {spec.name}: cannot hash input dataset {name!r}: {e}") from e
        record["datasets"][name] = {"path": d.path, **({"dvc_hash": d.dvc_hash} if d.dvc_hash else {})}
    for name, m in s.inputs.models.items():
        declared = m.uri
        entry = {"ref": declared}
        if declared.startswith("stage:"):
            model, version = stage_model_version(lineage, spec.pipeline, run, declared[len("stage:"):], spec.name, name)
            m.uri = f"models:/{model}/{version}"
            entry.update(uri=m.uri, model=model, version=version)
        elif name in ran_with and ran_with[name]["ref"] == declared:
            model, version = ran_with[name]["model"], str(ran_with[name]["version"])
            m.uri = f"models:/{model}/{version}"
            entry.update(uri=m.uri, model=model, version=version)
        elif declared.startswith("models:/"):
            try:
                model, version = lineage.model_version(declared)
            except Exception as e:  # noqa: BLE001 - the registry's own message is the useful one
                raise StageJobError(f"stage {spec.name}: cannot resolve input model {name!r} ({declared}) at "
                                    f"{spec.tracking.mlflow_uri}: {e}") from e
            m.uri = f"models:/{model}/{version}"
            entry.update(uri=m.uri, model=model, version=version)
        elif "://" not in declared:  # a file: pinned by its content
            if not Path(declared).exists():
                raise StageJobError(f"stage {spec.name}: input model {name!r} does not exist at {declared}")
            files[name] = sha256_file(declared)
            entry.update(uri=declared, sha256=files[name])
        else:
            entry.update(uri=declared)
        record["models"][name] = entry
    return Resolved(s, render.fingerprint(s, {"model_files": files} if files else None), record)


def stage_model_version(lineage: Any, pipeline: str, run: str, stage: str, reader: str = "?", input_name: str = "?") -> tuple[str, str]:
    """(model, version) that stage ``stage`` of pipeline run ``run`` registered (its latest succeeded run)."""
    found = lineage.stage_runs(pipeline, run, stage, status="succeeded")
    for r in found:
        mv = r.data.tags.get("model.version")
        if mv and "/" in mv:
            model, version = mv.rsplit("/", 1)
            return model, version
    raise StageJobError(f"stage {reader}: input model {input_name!r} (stage:{stage}): stage {stage} of pipeline run "
                        f"{run} has registered no model{' (it has not succeeded yet)' if not found else ''}")


# -- the job -----------------------------------------------------------------------------------
def load_spec(source: str) -> StageSpec:
    """A spec from a file, or from the JSON in an environment variable (``env:NAME``)."""
    if not source.startswith("env:"):
        return StageSpec.load(source)
    text = os.environ.get(source[4:])
    if text is None:
        raise SpecError(f"--spec {source}: environment variable {source[4:]} is not set")
    from pydantic import ValidationError

    try:
        return StageSpec.model_validate_json(text)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, f"${source[4:]}")) from e


def run_name(spec: StageSpec, env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get(RUN_ENV) or Path(spec.outputs.workdir).parent.name


def node_rank(env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("PET_NODE_RANK") or env.get("GROUP_RANK") or 0)


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of an experiment a job creates in an SQLite store: ``artifacts/`` beside the database (as the config does)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def open_lineage(spec: StageSpec):
    from pipelines.lineage import Lineage

    try:
        return Lineage(spec.tracking.mlflow_uri, spec.tracking.experiment, default_artifact_location(spec.tracking.mlflow_uri),
                       spec.tracking.outage_seconds)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI: say where
        raise StageJobError(f"stage {spec.name}: MLflow at {spec.tracking.mlflow_uri} is not reachable from this job: "
                            f"{type(e).__name__}: {e}") from e


def trainer_command(spec: StageSpec, env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    if env.get(TRAINER_ENV):
        return list(json.loads(env[TRAINER_ENV]))
    if env.get("PET_NNODES") == "1" and env.get("PET_NPROC_PER_NODE") == "1":
        # a world of one: the trainer joins it from RANK/WORLD_SIZE/MASTER_* itself (trainers.comm); torchrun would add
        # only its own start-up, seconds per stage
        return [sys.executable, "-u", "-m", "trainers", spec.stage, "--spec", f"env:{SPEC_ENV}"]
    return [sys.executable, "-m", "torch.distributed.run", "-m", "trainers", spec.stage, "--spec", f"env:{SPEC_ENV}"]


def launch(cmd: list[str], env: dict[str, str], echo: Callable[[str], None]) -> tuple[int, int | None]:
    """Run the trainer; (exit code, signal that stopped this job or None). SIGTERM/SIGINT are forwarded to it."""
    proc = subprocess.Popen(cmd, env=env)
    got: list[int] = []

    def forward(signum, _frame):
        got.append(signum)
        try:
            proc.send_signal(signum)
        except OSError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if code < 0:
        code = 128 - code
    return code, (got[0] if got else None)


def move_aside(spec: StageSpec, echo: Callable[[str], None]) -> None:
    """What a different fingerprint left (the workdir's files, the output dataset) goes to ``*.replaced-<time>``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(spec.outputs.workdir)
    aside = workdir.with_name(f"{workdir.name}.replaced-{stamp}")
    for p in sorted(workdir.iterdir()):
        if p.name not in KEEP_ON_MOVE:
            aside.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), aside / p.name)
    if aside.exists():
        echo(f"[{spec.name}] inputs or params changed: previous {workdir} moved to {aside}")
    if spec.outputs.dataset and Path(spec.outputs.dataset).exists():
        old = Path(spec.outputs.dataset)
        to = old.with_name(f"{old.name}.replaced-{stamp}")
        shutil.move(str(old), to)  # (its .dvc file stays: the next ``dvc add`` rewrites it; the old version is in the cache)
        echo(f"[{spec.name}] previous output dataset {old} moved to {to}")


@contextmanager
def job_lock(workdir: Path, name: str, echo: Callable[[str], None]) -> Iterator[None]:
    """Hold the stage's job lock while node rank 0 prepares, trains and finishes.

    See docs/architecture.md "Idempotent and resumable": a second job of the same stage (a driver that lost track of the
    first) waits for the first to end, then finds the stage done or resumes it; a re-run driver re-attaches by waiting
    on it (:func:`running_job`). Where the file system has no flock (some network volumes) the job says so and runs
    unguarded."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / JOB_LOCK, "a+") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                echo(f"[{name}] another job of this stage is running (pid {f.read().strip() or '?'}); waiting for it to end")
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            echo(f"[{name}] warning: no lock on {workdir / JOB_LOCK} ({e.strerror}); a second job of this stage would not wait")
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def running_job(workdir: str | Path) -> str | None:
    """The pid of the stage job running in ``workdir`` now (it holds the job lock), else None."""
    lock = Path(workdir) / JOB_LOCK
    try:
        f = open(lock)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "?"
        except OSError:
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def wait_for_job(workdir: str | Path, poll: float = 0.5) -> None:
    """Block until no stage job holds ``workdir``'s job lock."""
    while running_job(workdir) is not None:
        time.sleep(poll)


def is_done(marker: dict | None, result: dict | None, fingerprint: str) -> bool:
    return bool(marker and marker.get("fingerprint") == fingerprint and marker.get("status") == "succeeded"
                and result and result.get("status") == "succeeded")


def workspace_repo_root(spec: StageSpec) -> Path:
    """Where a job makes the DVC repository for its output dataset when none holds it.

    The deepest folder holding both the stage's workdir and its output dataset: the workspace root
    for datasets under ``workspace.data``, the run folder for datasets a pipeline keeps in its run
    (a driver makes the repository at the workspace root first; a job uses the one it finds).
    """
    return Path(os.path.commonpath([Path(spec.outputs.workdir).resolve(), Path(spec.outputs.dataset or spec.outputs.workdir).resolve()]))


def finish(spec: StageSpec, lineage: Any, run_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Version + push the output dataset, register the model, apply the promotion rule; returns the marker fields."""
    from pipelines import dvc

    output_hash = None
    if spec.outputs.dataset:
        try:
            output_hash = dvc.version_output(spec.outputs.dataset, workspace_repo_root(spec), spec.tracking.dvc_remote).md5
        except dvc.DvcError as e:
            raise StageJobError(f"stage {spec.name}: cannot version its output dataset with DVC (remote "
                                f"{spec.tracking.dvc_remote or 'default'}): {e}") from e
    version = lineage.finish_stage(run_id, spec, result, output_hash=output_hash)
    decisions = evaluate(spec, lineage, run_id, result)
    return {"model_version": version, "output_hash": output_hash, "decisions": decisions}


def evaluate(spec: StageSpec, lineage: Any, run_id: str, result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """For a stage with ``spec.promotion``: record the evaluation on the candidate version and apply the rule."""
    rule = spec.promotion
    if rule is None:
        return []
    cand = spec.inputs.models.get(rule.candidate)
    if cand is None or not cand.uri.startswith("models:/"):
        raise StageJobError(f"stage {spec.name}: promotion.candidate {rule.candidate!r} is not a registered-model input "
                            f"(inputs.models: {', '.join(spec.inputs.models) or 'none'})")
    name, version = lineage.model_version(cand.uri)
    ok = result is not None and result.get("status") == "succeeded"
    lineage.record_evaluation(name, version, (result or {}).get("metrics") or {}, ok, run_id=run_id)
    return [d.__dict__ for d in lineage.promote(name, version, rule, aliases=tuple(rule.aliases))]


def record_failure(spec: StageSpec, lineage: Any, run_id: str | None, fingerprint: str, error: str,
                   log_dir: Path | None = None, evaluation: bool = True) -> dict[str, Any]:
    """A failed stage on its run, its (failed) evaluation on the candidate, and the marker; returns the marker."""
    decisions: list[dict[str, Any]] = []
    try:
        if run_id:
            lineage.retry(f"recording the failure of stage {spec.name}", lambda: lineage.fail_stage(run_id, error, log_dir))
        if evaluation and spec.promotion is not None and run_id:
            try:
                decisions = lineage.retry(f"recording the failed evaluation of stage {spec.name}",
                                          lambda: evaluate(spec, lineage, run_id, None))
            except StageJobError:
                pass
    except Exception as e:  # noqa: BLE001 - MLflow gone for good: the marker still says what happened
        error = f"{error}\n(not recorded in MLflow: {type(e).__name__}: {e})"
    marker = {"fingerprint": fingerprint, "status": "failed", "mlflow_run_id": run_id, "error": error[-2000:], "decisions": decisions}
    write_json(Path(spec.outputs.workdir) / MARKER, marker)
    return marker


def stage_run(spec: StageSpec, resolved: Resolved, run: str, lineage: Any, marker: dict | None, echo: Callable[[str], None]) -> str:
    """The stage's MLflow child run: the interrupted or failed one of the same fingerprint, else a new one."""
    if marker and marker.get("fingerprint") == resolved.fingerprint and marker.get("status") in ("running", "failed") and marker.get("mlflow_run_id"):
        try:
            lineage.resume_stage(marker["mlflow_run_id"])
            return marker["mlflow_run_id"]
        except Exception:  # noqa: BLE001 - gone (another store): start a new one
            pass
    parent = lineage.pipeline_run(spec.pipeline, run, resume=False)
    return lineage.start_stage(parent, resolved.spec, resolved.fingerprint, run, inputs=resolved.inputs)


def main(argv: list[str] | None = None, echo: Callable[[str], None] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.stage_job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="Stage spec: a YAML/JSON file or env:VAR (the rendered job's SELFTRAIN_SPEC).")
    args = ap.parse_args(argv)
    echo = echo or (lambda s: print(s, flush=True))
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        echo(f"error: {e}")
        return 2
    if node_rank() != 0:
        return _job(spec, echo)
    with job_lock(Path(spec.outputs.workdir), spec.name, echo):  # node rank 0 holds it from here to the marker
        return _job(spec, echo)


def _job(spec: StageSpec, echo: Callable[[str], None]) -> int:
    run = run_name(spec)
    rank = node_rank()
    try:
        lineage = open_lineage(spec)
        resolved = resolve(spec, run, lineage, hash_datasets=rank == 0)
    except StageJobError as e:
        echo(f"error: {e}")
        return 2
    env = {**os.environ, SPEC_ENV: resolved.spec.model_dump_json(), RUN_ENV: run}
    cmd = trainer_command(resolved.spec)
    if rank != 0:  # workers train; node rank 0 prepares and finishes
        code, _ = launch(cmd, env, echo)
        return code
    return _run_rank0(spec, resolved, run, lineage, cmd, env, echo)


def _run_rank0(spec: StageSpec, resolved: Resolved, run: str, lineage: Any, cmd: list[str], env: dict[str, str],
               echo: Callable[[str], None]) -> int:
    workdir = Path(spec.outputs.workdir)
    fp = resolved.fingerprint
    marker, result = read_json(workdir / MARKER), read_json(workdir / "result.json")
    if is_done(marker, result, fp):
        echo(f"[{spec.name}] done already for the same inputs and params ({fp[:12]}): nothing to run")
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    if marker and marker.get("fingerprint") != fp:  # never resume from checkpoints or shards of other inputs or params
        move_aside(spec, echo)
        marker = None
    elif not marker and result:  # a result without a marker: not ours to trust
        (workdir / "result.json").unlink()
    try:
        run_id = lineage.retry(f"recording stage {spec.name}", lambda: stage_run(spec, resolved, run, lineage, marker, echo), echo)
        parent_id = lineage.retry("reading its run", lambda: lineage.client.get_run(run_id).data.tags.get("mlflow.parentRunId"), echo)
    except Exception as e:  # noqa: BLE001
        echo(f"error: stage {spec.name}: cannot record the stage in MLflow at {spec.tracking.mlflow_uri}: {type(e).__name__}: {e}")
        return 2
    pinned = resolved.spec.model_copy(update={"tracking": resolved.spec.tracking.model_copy(update={
        "parent_run_id": parent_id, "run_id": run_id})})
    pinned.write(workdir / "spec.json")
    write_json(workdir / MARKER, {"fingerprint": fp, "status": "running", "mlflow_run_id": run_id, "inputs": resolved.inputs})
    (workdir / "result.json").unlink(missing_ok=True)
    env = {**env, SPEC_ENV: pinned.model_dump_json(), "MLFLOW_RUN_ID": run_id}
    code, stopped = launch(cmd, env, echo)
    if code != 0:
        why = f"stopped by signal {stopped}" if stopped else f"the trainer exited with code {code}"
        record_failure(pinned, lineage, run_id, fp, f"stage {spec.name}: {why}", evaluation=stopped is None)
        return code
    result = read_json(workdir / "result.json")
    try:
        if not result or result.get("status") != "succeeded":
            raise StageJobError(f"stage {spec.name}: the trainer exited 0 but {workdir / 'result.json'} "
                                f"{'says ' + repr(result.get('status')) if result else 'is missing'}")
        done = lineage.retry(f"finishing stage {spec.name} (its dataset, model and promotion)",
                             lambda: finish(pinned, lineage, run_id, result), echo)
    except Exception as e:  # noqa: BLE001 - every failure is recorded on the stage's run
        record_failure(pinned, lineage, run_id, fp, f"{type(e).__name__}: {e}")
        echo(f"error: {e}")
        return 1
    write_json(workdir / MARKER, {"fingerprint": fp, "status": "succeeded", "mlflow_run_id": run_id, "inputs": resolved.inputs, **done})
    echo(f"[{spec.name}] succeeded" + (f": model {spec.outputs.model} version {done['model_version']}" if done["model_version"] else "")
         + (f", dataset {done['output_hash']}" if done["output_hash"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
