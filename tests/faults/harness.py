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
    def train_spec(self, workdir: Path, mlflow: str | None = None, run_id: str | None = None, **params):
        kw = {"mlflow_uri": mlflow, "run_id": run_id} if mlflow else {}
        return make_spec(workdir, {"train": self.train}, params={**TRAIN_PARAMS, **params}, deepspeed=ZERO2, **kw)

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
        return Trial("kill rank: training", False, 0, f"rerun failed: {again.stderr[-2000:]}")
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
        return Trial("kill rank: shard map", False, len(damage), f"rerun failed: {again.stderr[-2000:]}")
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
            return Trial("disk full: checkpoints", False, 0, f"rerun failed: {again.stderr[-2000:]}")
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
            return Trial("disk full: shards", False, len(damage), f"rerun failed: {again.stderr[-2000:]}")
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
        return Trial("corrupt checkpoint", False, 0, f"{mode} {victim.name}: rerun failed: {again.stderr[-2000:]}")
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
        return Trial("non-finite loss", False, 0, f"{what}: failed: {res.stderr[-2000:]}")
    out = json.loads((work / "nan_result.json").read_text())
    ok = out["finite"] and out["steps"] == TRAIN_PARAMS["steps"] and "skipped" in res.stderr
    return Trial("non-finite loss", ok, 0 if out["finite"] else 1, f"{what}: finished {out}")
