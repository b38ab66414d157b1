"""Fault trials shared by ``tests/faults`` (one or two trials per class, in CI) and ``benchmarks/faults.py`` (N each).

Every trial injects one fault into a tiny stage and checks recovery; it returns a :class:`Trial`:
``recovered`` (the stage finished after the fault, or failed with the expected clear error and then
finished once the cause was gone) and ``lost`` (outputs that differ from an unfaulted run, work lost
beyond one checkpoint interval, or a corrupt/half-written file that was visible). The stages:

- training: ``fit-objects`` on 32 tiny PartWorld images, 2 CPU ranks (gloo), ZeRO-2, 24 steps,
  a checkpoint every 3 steps; deterministic, so the final weights must equal an unfaulted run's
  (within 1e-5, as gloo sums in any order);
- labelling: ``mine-parts`` (objects: gt) on 12 images, 2 ranks, 6 output shards; deterministic,
  so every output shard and index must be byte-identical to an unfaulted run's.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (REPO, REPO / "tests" / "trainers", REPO / "tests" / "trainers" / "stages"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from runtime_helpers import free_port, make_spec, torchrun_cmd, write_partworld  # noqa: E402,F401
from stage_helpers import stage_spec, tiny_segmenter_file, write_world64  # noqa: E402

TRAIN_PARAMS = {"steps": 24, "checkpoint_every": 3, "lr": 0.02}
ZERO2 = {"zero_optimization": {"stage": 2}}
MINE_PARAMS = {"objects": "gt", "batch_size": 2, "shard_size": 2}
WEIGHT_TOL = {"rtol": 1e-5, "atol": 1e-6}


@dataclass
class Trial:
    """One fault injected and what came of it."""

    fault: str
    recovered: bool
    lost: int  # items lost or corrupted (steps beyond one interval, differing shards, visible partial files)
    detail: str = ""


@dataclass
class World:
    """The inputs every trial reads and the unfaulted reference outputs (made once, then copied)."""

    root: Path
    train: Path = field(init=False)
    images: Path = field(init=False)
    teacher: Path = field(init=False)
    ref_train: Path | None = None  # workdir of an unfaulted training run
    ref_mine: Path | None = None  # output dataset of an unfaulted mine-parts run
    step_seconds: float = 0.05  # a step of the reference run (checkpoints included), wall clock

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.train = self.root / "train"
        if not (self.train / "index.json").exists():
            write_partworld(self.train, "train", 32, shard_size=8)
        self.images = self.root / "images"
        if not (self.images / "index.json").exists():
            write_world64(self.images, "train", 12, shard_size=2)
        self.teacher = self.root / "teacher.pt"
        if not self.teacher.exists():
            tiny_segmenter_file(self.teacher)

    # -- specs --------------------------------------------------------------------------------------
    def train_spec(self, workdir: Path, mlflow: str | None = None, run_id: str | None = None,
                   outage_seconds: float | None = None, **params):
        kw = {"mlflow_uri": mlflow, "run_id": run_id} if mlflow else {}
        spec = make_spec(workdir, {"train": self.train}, params={**TRAIN_PARAMS, **params}, deepspeed=ZERO2, **kw)
        if outage_seconds is not None:  # the pipeline config's tracking.outage_seconds, as the driver passes it on
            spec.tracking.outage_seconds = outage_seconds
        return spec

    def mine_spec(self, workdir: Path, out: Path):
        return stage_spec("mine-parts", workdir, datasets={"images": self.images}, models={"teacher": self.teacher},
                          dataset_out=out, nproc=2, params=dict(MINE_PARAMS))

    # -- references ---------------------------------------------------------------------------------
    def reference_training(self) -> Path:
        if self.ref_train is None:
            work = self.root / "ref-train"
            if not (work / "result.json").exists():
                shutil.rmtree(work, ignore_errors=True)
                run_ok(self.train_spec(work))
            loop = (work / "model.pt").stat().st_mtime - (work / "engine.json").stat().st_mtime
            self.step_seconds = max(0.005, loop / TRAIN_PARAMS["steps"])
            self.ref_train = work
        return self.ref_train

    def reference_mine(self) -> Path:
        if self.ref_mine is None:
            out = self.root / "ref-mine"
            if not (out / "index.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                run_ok(self.mine_spec(self.root / "ref-mine-work", out))
            self.ref_mine = out
        return self.ref_mine


# -- processes --------------------------------------------------------------------------------------
def launch(spec, nproc: int = 2, cmd: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    """The stage under torchrun (2 CPU ranks), output captured."""
    c, e = torchrun_cmd(spec, nproc)
    return subprocess.Popen(cmd or c, env={**e, **(env or {})}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(spec, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = launch(spec, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_ok(spec) -> subprocess.CompletedProcess:
    res = run(spec)
    if res.returncode != 0:
        raise AssertionError(f"stage failed ({res.returncode}):\n{res.stderr[-6000:]}")
    return res


ERROR_LINE = re.compile(r"^(\[rank\d+\]:)?\s*([\w.]+\.)?\w*(Error|Exception|Outage|Unavailable)\b.*")


def why(stderr: str) -> str:
    """Why a stage failed: the ranks' own error lines (not torchrun's ChildFailedError summary), then the output's tail."""
    errors = list(dict.fromkeys(m.group(0).strip() for m in map(ERROR_LINE.match, stderr.splitlines())
                                if m and "ChildFailedError" not in m.group(0)))
    return f"{' / '.join(errors[:4])[:1500]} | tail: {stderr[-1000:]}"


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for(cond, proc: subprocess.Popen, timeout: float, poll: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the stage ended or timed out before the fault point (rc {proc.poll()}): "
                                 f"{proc.stderr.read()[-3000:] if proc.poll() is not None else ''}")
        time.sleep(poll)
    return time.monotonic()


def rank_processes(proc: subprocess.Popen) -> list:
    """The worker (rank) processes torchrun started, in start order."""
    import psutil

    return [p for p in psutil.Process(proc.pid).children() if "trainers" in " ".join(p.cmdline())]


def kill_random_rank(proc: subprocess.Popen, rng: random.Random) -> int:
    """kill -9 of one rank; torchrun then stops the others and fails. Returns the pid killed."""
    import psutil

    ranks = rank_processes(proc)
    victim = rng.choice(ranks)
    with contextlib.suppress(psutil.NoSuchProcess):
        victim.send_signal(signal.SIGKILL)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
    kill_group(proc)  # stragglers
    return victim.pid


# -- comparisons ------------------------------------------------------------------------------------
def weights_differ(a: Path, b: Path) -> list[str]:
    import torch

    x = torch.load(a, map_location="cpu", weights_only=True)
    y = torch.load(b, map_location="cpu", weights_only=True)
    bad = []
    for k in y:
        try:
            torch.testing.assert_close(x[k], y[k], **WEIGHT_TOL)
        except (AssertionError, KeyError):
            bad.append(k)
    return bad


def dataset_files(root: Path) -> dict[str, bytes]:
    """index.json and shard bytes of a (multi-part) dataset, by relative path (the done markers live in the workdir)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.suffix == ".tar" or p.name == "index.json")}


def visible_damage(root: Path) -> list[str]:
    """Published files that are corrupt: an index whose shards fail verify, in the dataset or any rank part."""
    from trainers.data import shards

    bad = []
    for index in ([root / "index.json"] if (root / "index.json").exists() else []) + sorted(root.glob("rank-*/index.json")):
        try:
            shards.verify(index.parent)
        except shards.DataError as e:
            bad.append(str(e))
    return bad


def resumed_step(stderr: str) -> int:
    m = re.search(r"resumed from step\d+ at step (\d+)", stderr)
    return int(m.group(1)) if m else 0


# -- 1. killed ranks --------------------------------------------------------------------------------
def trial_kill_training(world: World, rng: random.Random, tmp: Path) -> Trial:
    """kill -9 of a random rank at a random point of the training loop; rerun; compare with the unfaulted run."""
    from mlflow.tracking import MlflowClient

    ref = world.reference_training()
    uri = f"sqlite:///{world.root / 'mlflow.db'}"  # one store for all trials: its tables are made once
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment(f"kill-{uuid.uuid4().hex[:8]}")).info.run_id
    work = tmp / "work"
    spec = world.train_spec(work, mlflow=uri, run_id=run_id)
    every, steps = TRAIN_PARAMS["checkpoint_every"], TRAIN_PARAMS["steps"]
    for _ in range(3):  # a kill that lands after the run finished is no trial: draw again
        shutil.rmtree(work, ignore_errors=True)
        target = rng.randint(1, steps - 1)  # the step to kill in: wait for the checkpoint before it, then some steps
        base = target // every * every

        def reached():
            if not (work / "engine.json").exists():
                return False
            return base == 0 or any(int(p.name[4:]) >= base for p in (work / "checkpoints").glob("step*"))

        proc = launch(spec)
        wait_for(reached, proc, 300, poll=0.002)
        time.sleep((target - base + rng.random()) * world.step_seconds)
        if proc.poll() is not None:
            proc.communicate()
            continue
        kill_random_rank(proc, rng)
        if not (work / "result.json").exists():
            break
    else:
        return Trial("kill rank: training", False, 0, "every kill landed after the run had finished")
    done = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    reached = max(done, default=0)  # the last step that completed before the kill
    again = run(spec)
    if again.returncode != 0:
        return Trial("kill rank: training", False, 0, f"rerun failed: {why(again.stderr)}")
    resumed = resumed_step(again.stderr)
    lost_steps = max(0, reached - resumed - TRAIN_PARAMS["checkpoint_every"])
    result = json.loads((work / "result.json").read_text())
    differ = weights_differ(work / "model.pt", ref / "model.pt")
    ok = result["steps"] == TRAIN_PARAMS["steps"]
    return Trial("kill rank: training", ok, lost_steps + len(differ),
                 f"killed after step {reached}, resumed at {resumed}; {len(differ)} tensors differ")


def trial_kill_shardmap(world: World, rng: random.Random, tmp: Path) -> Trial:
    """kill -9 of a random rank of mine-parts after a random number of shard writes; rerun; compare bytes."""
    ref = world.reference_mine()
    out, work = tmp / "out", tmp / "work"
    spec = world.mine_spec(work, out)
    shards_total = len([k for k in dataset_files(ref) if k.endswith(".tar")])

    def started() -> int:
        """Output shards begun so far (a temp file or a finished shard), over both ranks."""
        seen = set()
        for p in (out.glob("rank-*/*.tar*") if out.exists() else []):
            m = re.search(r"-(\d{6})", p.name)
            if m:
                seen.add((p.parent.name, m.group(1)))
        return len(seen)

    target = rng.randint(0, shards_total - 1)  # kill once this many shards have begun (0: before the first)
    for _ in range(4):
        shutil.rmtree(out, ignore_errors=True)
        proc = launch(spec)
        wait_for(lambda: out.exists() and started() >= target, proc, 300, poll=0.001)
        time.sleep(rng.uniform(0, 0.02))
        if proc.poll() is not None:
            proc.communicate()
            target = max(0, target - 2)
            continue
        kill_random_rank(proc, rng)
        if not (out / "index.json").exists():
            break
        target = max(0, target - 2)
    else:
        return Trial("kill rank: shard map", False, 0, "every kill landed after the stage had finished")
    damage = visible_damage(out)
    again = run(spec)
    if again.returncode != 0:
        return Trial("kill rank: shard map", False, len(damage), f"rerun failed: {why(again.stderr)}")
    want, got = dataset_files(ref), dataset_files(out)
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    strays = [p.name for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    return Trial("kill rank: shard map", True, len(damage) + len(differ) + len(strays),
                 f"killed once {target} of {shards_total} shards had begun; damage {damage}; differ {differ}; strays {strays}")


# -- 4. disk full -----------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (root: ``mount -t tmpfs``): a real disk that fills up (ENOSPC)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def can_mount_tmpfs(where: Path) -> str | None:
    """None when ``mount -t tmpfs`` works here, else why not."""
    try:
        with tmpfs(where / f"probe-{uuid.uuid4().hex[:6]}", "1m"):
            return None
    except (subprocess.CalledProcessError, OSError) as e:
        return getattr(e, "stderr", None) or str(e)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes stay free."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.truncate(0)
        remaining = max(0, free - leave)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            n = f.write(block[:min(len(block), remaining)])
            remaining -= n
    return filler


def trial_disk_full_checkpoint(world: World, rng: random.Random, tmp: Path) -> Trial:
    """The training workdir on a tmpfs filled to a random level: the save fails naming the path, nothing partial is
    published, and once space is freed the rerun resumes and ends where an unfaulted run does."""
    ref = world.reference_training()
    ckpt_bytes = sum(p.stat().st_size for p in (ref / "checkpoints").rglob("*") if p.is_file()) // 2
    with tmpfs(tmp / "disk", "16m") as disk:
        work = disk / "work"
        leave = int(rng.uniform(0.3, 2.8) * ckpt_bytes)
        filler = fill(disk, leave)
        spec = world.train_spec(work)
        first = run(spec)
        if first.returncode == 0:
            return Trial("disk full: checkpoints", True, 0, f"{leave} bytes free sufficed (no fault)")
        named = "disk full" in first.stderr and str(work) in first.stderr
        partial = [str(p) for p in (work / "checkpoints").glob("step*") if not (p / "COMPLETE").exists()] \
            if (work / "checkpoints").exists() else []
        latest = (work / "checkpoints" / "latest").read_text() if (work / "checkpoints" / "latest").exists() else None
        half = [p.name for p in work.rglob(".*tmp-*")]
        filler.unlink()
        again = run(spec)
        if again.returncode != 0:
            return Trial("disk full: checkpoints", False, 0, f"rerun failed: {why(again.stderr)}")
        differ = weights_differ(work / "model.pt", ref / "model.pt")
        err = next((line for line in first.stderr.splitlines() if "CheckpointError:" in line), "")
        return Trial("disk full: checkpoints", named, len(partial) + len(half) + len(differ),
                     f"{leave} bytes free; latest {latest}; resumed at {resumed_step(again.stderr)}; error: {err[:300]}")


def trial_disk_full_shards(world: World, rng: random.Random, tmp: Path) -> Trial:
    """mine-parts writing to a tmpfs filled to a random level: a WriteError naming the file, no index over a partial
    shard, no temp file left; once space is freed the rerun's shards equal an unfaulted run's, byte for byte."""
    ref = world.reference_mine()
    total = sum(len(b) for b in dataset_files(ref).values())
    with tmpfs(tmp / "disk", "8m") as disk:
        out = disk / "out"
        leave = int(rng.uniform(0.1, 0.9) * total)
        filler = fill(disk, leave)
        spec = world.mine_spec(tmp / "work", out)
        first = run(spec)
        if first.returncode == 0:
            return Trial("disk full: shards", True, 0, f"{leave} bytes free sufficed (no fault)")
        named = "disk full" in first.stderr and str(out) in first.stderr
        damage = visible_damage(out) if out.exists() else []
        half = [str(p) for p in out.rglob(".*tmp-*")] if out.exists() else []
        filler.unlink()
        again = run(spec)
        if again.returncode != 0:
            return Trial("disk full: shards", False, len(damage), f"rerun failed: {why(again.stderr)}")
        want, got = dataset_files(ref), dataset_files(out)
        differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        err = next((line for line in first.stderr.splitlines() if "Error:" in line and "disk full" in line),
                   next((line for line in first.stderr.splitlines() if "Error:" in line), ""))
        return Trial("disk full: shards", named, len(damage) + len(half) + len(differ),
                     f"{leave} bytes free; temp files left {half}; differ {differ}; error: {err[:300]}")


# -- 5. corrupt state -------------------------------------------------------------------------------
def trial_bad_checkpoint(world: World, rng: random.Random, tmp: Path) -> Trial:
    """The newest checkpoint truncated, overwritten with garbage, or ``latest`` damaged: the rerun falls back to the
    previous complete checkpoint, says so, and ends with the unfaulted run's weights."""
    ref = world.reference_training()
    work = tmp / "work"
    shutil.copytree(ref, work)
    ckpt = work / "checkpoints"
    newest = (ckpt / "latest").read_text().strip()
    files = sorted(p for p in (ckpt / newest).iterdir() if p.suffix == ".pt")
    victim = rng.choice(files)
    mode = rng.choice(["truncate", "garbage", "delete", "latest"])
    if mode == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[:rng.randint(0, len(data) - 1)])
    elif mode == "garbage":
        victim.write_bytes(os.urandom(victim.stat().st_size))
    elif mode == "delete":
        victim.unlink()
    else:
        (ckpt / "latest").write_bytes(os.urandom(12))
    (work / "model.pt").unlink()
    again = run(world.train_spec(work))
    if again.returncode != 0:
        return Trial("corrupt checkpoint", False, 0, f"{mode} {victim.name}: rerun failed: {why(again.stderr)}")
    said = "falling back" in again.stderr
    resumed = resumed_step(again.stderr)
    differ = weights_differ(work / "model.pt", ref / "model.pt")
    lost = max(0, TRAIN_PARAMS["steps"] - resumed - TRAIN_PARAMS["checkpoint_every"])
    return Trial("corrupt checkpoint", said and resumed > 0, lost + len(differ),
                 f"{mode} {newest}/{victim.name}: resumed at {resumed}, logged fallback: {said}; {len(differ)} differ")


NAN_PROGRAM = HERE / "nan_program.py"


def trial_nonfinite_loss(world: World, rng: random.Random, tmp: Path, mode: str | None = None) -> Trial:
    """A NaN or inf loss on a random rank at a random step: ``stop`` fails every rank naming the step; ``skip``
    finishes with finite weights and counts the skipped step."""
    mode = mode or rng.choice(["stop", "skip"])
    step, rank, value = rng.randint(1, TRAIN_PARAMS["steps"]), rng.randint(0, 1), rng.choice(["nan", "inf", "-inf"])
    work = tmp / "work"
    spec = world.train_spec(work, nonfinite_loss=mode)
    cmd, env = torchrun_cmd(spec)
    cmd = cmd[:cmd.index("-m", 5)] + [str(NAN_PROGRAM)]
    env = {"FAULT_NAN_STEP": str(step), "FAULT_NAN_RANK": str(rank), "FAULT_NAN_VALUE": value}
    res = run(spec, cmd=cmd, env=env)
    what = f"{value} loss on rank {rank} at step {step}, nonfinite_loss {mode}"
    if mode == "stop":
        named = res.returncode != 0 and "non-finite loss" in res.stderr and f"at step {step} " in res.stderr
        later = [p.name for p in (work / "checkpoints").glob("step*") if int(p.name[4:]) >= step] \
            if (work / "checkpoints").exists() else []
        return Trial("non-finite loss", named, len(later), f"{what}: stopped with a named step: {named}; "
                     f"checkpoints at or after it: {later}")
    if res.returncode != 0:
        return Trial("non-finite loss", False, 0, f"{what}: failed: {why(res.stderr)}")
    out = json.loads((work / "nan_result.json").read_text())
    ok = out["finite"] and out["steps"] == TRAIN_PARAMS["steps"] and "skipped" in res.stderr
    return Trial("non-finite loss", ok, 0 if out["finite"] else 1, f"{what}: finished {out}")


# -- 2. the driver killed ---------------------------------------------------------------------------
DRIVER = HERE / "driver_program.py"
STAND_IN = HERE / "gated_stand_in.py"
DRIVER_STAGES = [  # two stand-in stages: one writes a dataset and a model, the next reads both and promotes the model
    {"stage": "train", "params": {"k": 4}, "output_dataset": "mined", "output_model": "proposals"},
    {"stage": "evaluate", "datasets": {"mined": "mined"}, "models": {"candidate": "stage:train"},
     "params": {"metrics": {"miou": 0.5}}, "promotion": {"metric": "miou"}},
]


def driver_env(tmp: Path) -> dict[str, str]:
    """The environment of a driver whose stage jobs run the gated stand-in trainer (gates in ``tmp/gates``)."""
    (tmp / "gates").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "SELFTRAIN_TRAINER_COMMAND": json.dumps([sys.executable, str(STAND_IN)]), "WRITE_RESULT": "1",
            "OUT": str(tmp / "stand-in"), "GATE_DIR": str(tmp / "gates"), "PYTHONPATH": str(REPO)}


def driver_config(tmp: Path) -> Path:
    import yaml

    cfg = tmp / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"workspace": {"root": str(tmp / "ws")}, "stages": DRIVER_STAGES,
                                   "executor": {"max_parallel": 1, "kubernetes": {"backoff_limit": 0}}}))
    return cfg


def start_driver(cfg: Path, run: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``selftrain run <cfg> --run <run>`` in its own session (so a kill -9 of it leaves its stage jobs alone, as on a cluster)."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, str(DRIVER), "run", str(cfg), "--run", run], cwd=cfg.parent, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def check_pipeline_run(ws: Path, run: str) -> tuple[list[str], dict[str, int]]:
    """What is inconsistent after a pipeline run finished: stages run more than once, MLflow runs left RUNNING, missing or
    duplicate stage runs and model versions, a promotion without its decision tag, a dataset hash that does not match."""
    from mlflow import MlflowClient

    from pipelines import dvc
    from pipelines.stage_job import MARKER, running_job

    problems: list[str] = []
    starts = {}
    runs_dir = ws / "runs" / run
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    all_runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    problems += [f"MLflow run {r.info.run_name} left {r.info.status}" for r in all_runs if r.info.status == "RUNNING"]
    for st in DRIVER_STAGES:
        name = st["stage"]
        f = runs_dir / name / "starts.txt"
        starts[name] = len(f.read_text().splitlines()) if f.exists() else 0
        if starts[name] != 1:
            problems.append(f"stage {name} started {starts[name]} times")
        if running_job(runs_dir / name):
            problems.append(f"stage {name}: a job still holds its lock")
        marker = json.loads((runs_dir / name / MARKER).read_text()) if (runs_dir / name / MARKER).exists() else {}
        if marker.get("status") != "succeeded":
            problems.append(f"stage {name}: marker {marker.get('status')}")
        children = [r for r in all_runs if r.data.tags.get("selftrain.stage") == name]
        if len(children) != 1 or children[0].info.status != "FINISHED" or children[0].data.tags.get("selftrain.status") != "succeeded":
            problems.append(f"stage {name}: MLflow runs {[(r.info.status, r.data.tags.get('selftrain.status')) for r in children]}")
        if st.get("output_dataset"):
            out = ws / "data" / st["output_dataset"]
            got = dvc.dataset_hash(out) if out.is_dir() else None
            if got is None or got != marker.get("output_hash"):
                problems.append(f"stage {name}: dataset {got} but marker says {marker.get('output_hash')}")
        if st.get("output_model"):
            versions = client.search_model_versions(f"name = '{st['output_model']}'")
            if len(versions) != 1:
                problems.append(f"stage {name}: {len(versions)} versions of {st['output_model']}")
    parents = [r for r in all_runs if r.data.tags.get("selftrain.kind") == "pipeline"]
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        problems.append(f"pipeline runs {[r.info.status for r in parents]}")
    try:
        mv = client.get_model_version_by_alias("proposals", "teacher")
        if mv.tags.get("promotion.teacher.decision") != "promoted":
            problems.append(f"teacher alias on version {mv.version} without its decision tag")
    except Exception as e:  # noqa: BLE001 - no alias: the promotion never happened
        problems.append(f"no teacher alias: {e}")
    return problems, starts


DRIVER_POINTS = ("trainer running", "stage finishing", "between stages")


def trial_driver_kill(world: World | None, rng: random.Random, tmp: Path, where: str | None = None) -> Trial:
    """kill -9 of the driver (``selftrain run``, local executor) while a stage's trainer runs, while its job versions
    and registers its outputs, or between the two stages; then the same command again: it re-attaches to a stage job
    that outlived the driver, skips finished stages, and ends the run with every stage run once and every MLflow run ended.
    """
    from pipelines.stage_job import MARKER, wait_for_job

    where = where or rng.choice(DRIVER_POINTS)
    cfg, env, run = driver_config(tmp), driver_env(tmp), "r1"
    runs_dir, gates = tmp / "ws" / "runs" / run, tmp / "gates"
    k = 0 if where == "between stages" else rng.randrange(len(DRIVER_STAGES))
    stage = DRIVER_STAGES[k]["stage"]
    if where == "trainer running":  # the trainer waits at its gate until the re-run driver has re-attached
        (gates / f"{stage}.closed").touch()
    log = tmp / "driver.log"
    driver = start_driver(cfg, run, env, log)
    points = {"trainer running": lambda: (runs_dir / stage / "gate.waiting").exists(),
              "stage finishing": lambda: (runs_dir / stage / "result.json").exists(),
              "between stages": lambda: (runs_dir / stage / MARKER).exists() and '"succeeded"' in (runs_dir / stage / MARKER).read_text()}
    again = None
    try:
        deadline = time.monotonic() + 600
        while not points[where]():
            if driver.poll() is not None or time.monotonic() > deadline:
                return Trial(f"driver killed: {where}", False, 0, f"the run ended before the fault point: {log.read_text()[-3000:]}")
            time.sleep(0.005)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        outlived = [s["stage"] for s in DRIVER_STAGES if _job_alive(runs_dir / s["stage"])]
        late = where != "trainer running" and rng.random() < 0.3
        if late:  # the re-run comes only after the job that outlived the driver has ended
            for s in DRIVER_STAGES:
                wait_for_job(runs_dir / s["stage"])
        again = start_driver(cfg, run, env, log)
        if where == "trainer running":
            while "re-attaching" not in log.read_text() and again.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            (gates / f"{stage}.open").touch()
        try:
            rc = again.wait(timeout=600)
        except subprocess.TimeoutExpired:
            rc = None
    finally:
        (gates / f"{stage}.open").touch()
        for p in (driver, again):
            if p is not None:
                kill_group(p)
        for s in DRIVER_STAGES:  # a job that outlived both drivers (a failed trial) ends before the next trial
            wait_for_job(runs_dir / s["stage"])
    text = log.read_text()
    problems, starts = check_pipeline_run(tmp / "ws", run)
    attached = text.count("re-attaching")
    detail = (f"killed at {stage} ({where}); jobs that outlived the driver: {outlived}; re-run "
              f"{'after they ended' if late else 'at once'}; re-attached: {attached}; starts {starts}; problems {problems}")
    if where == "trainer running" and not attached:
        problems.append("the re-run did not re-attach to the running job")
    if rc != 0:
        return Trial(f"driver killed: {where}", False, len(problems), f"{detail}; re-run exit {rc}: {text[-3000:]}")
    return Trial(f"driver killed: {where}", True, len(problems), detail)


def _job_alive(workdir: Path) -> bool:
    from pipelines.stage_job import running_job

    return running_job(workdir) is not None


# -- 3. the MLflow server killed and restarted ------------------------------------------------------
# the server's GenAI job runner (a uvicorn worker, a job runner and ~7 huey consumers) is not used by selftrain
MLFLOW_SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, served artifacts) on a fixed port, to be killed and started again."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        import urllib.request

        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root, env=MLFLOW_SERVER_ENV)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server did not come up: {(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """kill -9 of the server and its workers (the port closes at once)."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc.wait()
            self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.kill()


def trial_mlflow_outage(world: World, rng: random.Random, tmp: Path, outage: float | None = None) -> Trial:
    """The MLflow server killed (kill -9) at a random step of a training stage that logs every step to it, and started
    again on the same port after ``outage`` seconds (below the limit): the stage finishes, every step's metrics are in
    the run, the weights equal an unfaulted run's; a promotion tried during the outage is refused with nothing changed,
    and once the server is back the alias and its decision tags move together."""
    from mlflow.tracking import MlflowClient

    from contract.spec import Promotion
    from pipelines.lineage import Lineage, TrackingUnavailable

    ref = world.reference_training()
    outage = rng.uniform(1.0, 8.0) if outage is None else outage
    steps, every = TRAIN_PARAMS["steps"], TRAIN_PARAMS["checkpoint_every"]
    with MlflowServer(tmp / "mlflow") as server:
        lineage = Lineage(server.url, "outage")
        client = MlflowClient(tracking_uri=server.url)
        run_id = client.create_run(lineage.experiment_id).info.run_id
        (tmp / "model.json").write_text("{}")
        version = str(lineage.register_model(run_id, "outage-model", tmp / "model.json").version)
        lineage.record_evaluation("outage-model", version, {"miou": 0.5}, True, run_id=run_id)
        work = tmp / "work"
        spec = world.train_spec(work, mlflow=server.url, run_id=run_id, outage_seconds=300)
        target = rng.choice([0, rng.randint(0, steps - every)])  # 0: as the loop starts (24 steps take a few seconds)
        proc = launch(spec)
        try:
            wait_for(lambda: (work / "engine.json").exists() and (target == 0 or any(
                int(p.name[4:]) >= target for p in (work / "checkpoints").glob("step*"))), proc, 300, poll=0.01)
            before = len(client.get_metric_history(run_id, "train/loss"))  # steps the server had when it was killed
            server.kill()
            killed_at = max((int(p.name[4:]) for p in (work / "checkpoints").glob("step*")), default=0)
            t0 = time.monotonic()
            refused = changed = None
            try:
                lineage.promote("outage-model", version, Promotion(metric="miou"), aliases=("teacher",))
                refused = False
            except TrackingUnavailable:
                refused = True
            time.sleep(max(0.0, outage - (time.monotonic() - t0)))
            server.start()
            tags = client.get_model_version("outage-model", version).tags
            changed = [k for k in tags if k.startswith("promotion.")] + [a for a in client.get_registered_model("outage-model").aliases]
            out, err = proc.communicate(timeout=900)
        finally:
            kill_group(proc)
        history = {m.step for m in client.get_metric_history(run_id, "train/loss")}
        missing = sorted(set(range(1, steps + 1)) - history)
        decisions = lineage.promote("outage-model", version, Promotion(metric="miou"), aliases=("teacher",))
        mv = client.get_model_version_by_alias("outage-model", "teacher")
        together = mv.version == version and mv.tags.get("promotion.teacher.decision") == "promoted" and decisions[0].promoted
    what = f"server killed at step ~{killed_at} ({before} of {steps} steps' metrics sent), down {outage:.1f} s"
    if proc.returncode != 0:
        return Trial("mlflow outage", False, len(missing), f"{what}: the stage failed ({proc.returncode}): {why(err)}")
    differ = weights_differ(work / "model.pt", ref / "model.pt")
    ok = refused and not changed and together
    return Trial("mlflow outage", bool(ok), len(missing) + len(differ) + len(changed or []),
                 f"{what}; steps missing from the run: {missing}; {len(differ)} tensors differ; promotion during the outage "
                 f"refused: {refused}, changed: {changed}; after it alias and decision together: {together}")
