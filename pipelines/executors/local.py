"""The local executor: runs a rendered PyTorchJob as process groups on this machine.

It interprets the job manifest the way the training operator (v1.9.3) and the kubelet would:
one process group per replica (Master = node rank 0, Worker i = node rank i+1), each started
as the container's command/args with the container env plus what the operator appends
(pkg/controller.v1/pytorch/envvar.go, master.go): MASTER_ADDR/PET_MASTER_ADDR,
MASTER_PORT/PET_MASTER_PORT, WORLD_SIZE (replicas x nprocPerNode), RANK and PET_NODE_RANK (node
rank), PET_NPROC_PER_NODE, PET_NNODES, PYTHONUNBUFFERED. Locally the master address is 127.0.0.1
(instead of the ``<job>-master-0`` service) and the port a free one (instead of the container
port, so that stages never collide); ``$(VAR)`` in command/args is expanded from the final
environment like the kubelet does. If a replica fails, the others are stopped (their whole
process trees) and the group restarts, up to ``runPolicy.backoffLimit`` times, as under the
``OnFailure`` restart policy on a cluster.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from pipelines.executors import ExecutionResult, ReplicaOutcome, StageFailed

# Distributed-launch variables of the calling process never leak into a replica.
_LAUNCH_VARS = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|ROLE_RANK|MASTER_ADDR|MASTER_PORT|PET_.*|TORCHELASTIC_.*|TORCH_NCCL_.*|MLFLOW_RUN_ID)$")
_REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced, ``$$`` is a literal ``$``, the rest stays."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def local_cpus() -> int:
    """The cores this process may run on (its affinity mask: what a cgroup or taskset leaves it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_gpus() -> list[str]:
    """GPU ids this machine offers (CUDA_VISIBLE_DEVICES if set, else nvidia-smi)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


@dataclass
class _Replica:
    rtype: str  # "Master" | "Worker"
    index: int
    node_rank: int
    container: dict[str, Any]
    gpus: int
    volumes: list = field(default_factory=list)  # the pod template's volumes
    proc: subprocess.Popen | None = None
    known: dict[int, psutil.Process] = field(default_factory=dict)  # the process tree, refreshed while it runs
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"{self.rtype.lower()}-{self.index}"


class LocalExecutor:
    """Runs PyTorchJob manifests as local processes (CPU: gloo; GPUs: one slice per replica, nccl)."""

    def __init__(
        self,
        grace_seconds: float = 10.0,
        echo: Callable[[str], None] | None = None,
        cwd: str | Path | None = None,
        poll_seconds: float = 0.2,
        volumes: dict[str, str | Path] | None = None,
    ):
        """``volumes`` maps a PersistentVolumeClaim name to a directory on this machine: a replica whose
        container mounts that claim at a mountPath gets that path rewritten to the directory wherever the job
        names it (its env values, JSON in them such as the stage spec, command, args, workingDir). No mount,
        no root: nothing is created outside the mapped directories."""
        self.volumes = {k: Path(v).resolve() for k, v in (volumes or {}).items()}
        self.grace_seconds = grace_seconds
        self.echo = echo if echo is not None else _print
        self.cwd = Path(cwd) if cwd else None
        self.poll_seconds = poll_seconds
        # processes of the jobs this executor is running now: a job starting beside them gets its share of the cores
        self._busy = 0
        self._busy_lock = threading.Lock()
        # how many jobs the caller runs at once now, those starting included (the pipeline runner sets it before it
        # starts them): of two stages started together the first would otherwise see the cores free and take them all
        self.side_by_side = 1

    # -- public --------------------------------------------------------------------------------
    def run(self, job: dict[str, Any], log_dir: str | Path | None = None) -> ExecutionResult:
        """Run the job to completion; raises StageFailed when it fails for good."""
        if not isinstance(job, dict):  # a kubeflow-training SDK object
            from pipelines.render import to_dict

            job = to_dict(job)
        name = job.get("metadata", {}).get("name", "job")
        spec = job["spec"]
        run_policy = spec.get("runPolicy") or {}
        backoff_limit = int(run_policy.get("backoffLimit", 0) or 0)
        deadline = run_policy.get("activeDeadlineSeconds")
        replicas = self._replicas(spec)
        log_dir = Path(log_dir) if log_dir else self._default_log_dir(replicas)
        log_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()

        attempt = 0
        while True:
            attempt += 1
            outcome, reason = self._attempt(name, spec, replicas, log_dir, attempt, started, deadline)
            if reason is None:
                return ExecutionResult(job=name, attempts=attempt, replicas=outcome, log_dir=log_dir)
            policies = {r.rtype: (spec["pytorchReplicaSpecs"][r.rtype].get("restartPolicy") or "OnFailure") for r in replicas}
            retry = attempt <= backoff_limit and reason != "deadline" and all(
                restartable(policies[r.rtype], o.exit_code) for r, o in zip(replicas, outcome) if not o.stopped
            )
            if not retry:
                why = {"deadline": f"activeDeadlineSeconds={deadline} passed"}.get(reason, f"backoffLimit={backoff_limit}")
                raise StageFailed(name, attempt, outcome, why)
            self.echo(f"[{name}] attempt {attempt} failed; restarting the whole group ({attempt}/{backoff_limit} restarts)")

    # -- one attempt ---------------------------------------------------------------------------
    def _attempt(self, name, spec, replicas, log_dir, attempt, started, deadline):
        port = free_port()
        world = len(replicas)
        nproc = str(spec.get("nprocPerNode") or "auto")  # the operator's default
        gpu_pool = local_gpus() if any(r.gpus for r in replicas) else []
        need = sum(r.gpus for r in replicas)
        if need > len(gpu_pool):
            raise StageFailed(name, 0, [], f"the job asks for {need} nvidia.com/gpu in all, this machine offers {len(gpu_pool)}")
        try:
            procs = world * int(nproc)
        except ValueError:
            procs = world  # "auto": one process per replica
        with self._busy_lock:
            others = max(self._busy, self.side_by_side - 1)  # a job the caller is starting counts one process at least
            self._busy += procs
        try:
            for r in replicas:
                gpus = [gpu_pool.pop(0) for _ in range(r.gpus)]
                mounts = self._mounts(r)
                env = self._env(r, world, nproc, port, gpus, mounts, others)
                c = r.container
                cmd = [_local_path(expand(a, env), mounts) for a in (c.get("command") or []) + (c.get("args") or [])]
                if not cmd:
                    raise StageFailed(name, attempt, [], f"{r.name}: the container has neither command nor args")
                log_path = log_dir / f"{r.name}.log"
                workdir = _local_path(c.get("workingDir") or "", mounts)
                cwd = workdir if workdir and Path(workdir).is_dir() else (self.cwd or os.getcwd())
                # the replica writes its log file itself, as a container runtime does: it outlives this driver
                with open(log_path, "ab") as log:
                    log.write(f"===== attempt {attempt} =====\n".encode())
                    log.flush()
                    start = log.tell()
                    try:
                        r.proc = subprocess.Popen(
                            cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                        )
                    except OSError as e:
                        raise StageFailed(name, attempt, [], f"{r.name}: cannot start {cmd[0]!r}: {e.strerror}") from e
                r.known = {r.proc.pid: psutil.Process(r.proc.pid)}
                r.tail.clear()
                r.reader = threading.Thread(target=self._pump, args=(r, log_path, start), daemon=True)
                r.reader.start()

            failed: list[_Replica] = []
            reason = None
            while True:
                for r in replicas:
                    self._refresh(r)
                codes = [r.proc.poll() for r in replicas]
                failed = [r for r, c in zip(replicas, codes) if c not in (None, 0)]
                if failed:
                    reason = "failed"
                    break
                if all(c == 0 for c in codes):
                    break
                if deadline and time.monotonic() - started > float(deadline):
                    reason = "deadline"
                    break
                time.sleep(self.poll_seconds)
        finally:
            # Every path out of an attempt leaves no process of it behind (also on exceptions/Ctrl-C).
            running = [r for r in replicas if r.proc is not None and r.proc.poll() is None]
            self._stop(replicas)
            with self._busy_lock:
                self._busy -= procs
        outcome = []
        for r in replicas:
            if r.reader:
                r.reader.join(timeout=5)
            outcome.append(ReplicaOutcome(
                replica=r.name, exit_code=_exit_code(r.proc.returncode) if r.proc else None,
                stopped=r in running, log=log_dir / f"{r.name}.log", last_lines=list(r.tail)[-20:],
            ))
        return outcome, reason

    def _env(self, r: _Replica, world: int, nproc: str, port: int, gpus: list[str],
             mounts: list[tuple[str, Path]], others: int = 0) -> dict[str, str]:
        """The replica's environment. OMP_NUM_THREADS: the job's own value capped at this job's share of the cores,
        cores / (its processes + the processes of the jobs already running beside it), at least 1; a value the user
        exported wins. A job alone gets every core; without the cap, two stages side by side on 2 cores ran 18x
        slower than one alone (torch's thread pools spin against each other)."""
        env = {k: v for k, v in os.environ.items() if not _LAUNCH_VARS.match(k)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(_REPO), env.get("PYTHONPATH", "")] if p)
        # what a pod without (with) an nvidia.com/gpu limit sees
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        for e in r.container.get("env") or []:  # $(VAR) refers to variables defined earlier in the list
            if "value" in e:
                env[e["name"]] = _local_path(expand(str(e["value"]), env), mounts)
            elif "valueFrom" in e:
                raise ValueError(f"{r.name}: env {e['name']} uses valueFrom, which the local executor cannot resolve")
        try:
            nproc_int = int(nproc)
        except ValueError:
            nproc_int = 1  # "auto": the operator then counts one process per replica
        if "OMP_NUM_THREADS" in os.environ:  # the user's choice for this machine
            env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
        else:
            share = max(1, local_cpus() // (others + world * nproc_int))
            try:
                share = min(share, max(1, int(env.get("OMP_NUM_THREADS") or share)))
            except ValueError:
                raise ValueError(f"{r.name}: env OMP_NUM_THREADS={env['OMP_NUM_THREADS']!r} is not a whole number") from None
            env["OMP_NUM_THREADS"] = str(share)
        env.update({  # appended by the operator after the container's own env: these win
            "PYTHONUNBUFFERED": "1",
            "MASTER_PORT": str(port),
            "PET_MASTER_PORT": str(port),
            "MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_ADDR": "127.0.0.1",
            "WORLD_SIZE": str(world * nproc_int),
            "RANK": str(r.node_rank),
            "PET_NODE_RANK": str(r.node_rank),
            "PET_NPROC_PER_NODE": nproc,
            "PET_NNODES": str(world),
        })
        return env

    # -- processes -----------------------------------------------------------------------------
    def _pump(self, r: _Replica, log_path: Path, start: int) -> None:
        """Follow the replica's log file from ``start`` until the replica has ended: echo and keep the tail."""
        prefix = f"[{r.name}]"
        with open(log_path, "rb") as log:
            log.seek(start)
            pending = b""
            while True:
                ended = r.proc.poll() is not None
                chunk = log.read()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    r.tail.append(line)
                    self.echo(f"{prefix} {line}")
                if ended and not chunk:
                    break
                if not chunk:
                    time.sleep(0.05)
            if pending:
                r.tail.append(pending.decode(errors="replace"))
                self.echo(f"{prefix} {pending.decode(errors='replace')}")

    @staticmethod
    def _refresh(r: _Replica) -> None:
        """Remember every process of the replica's tree (torchrun starts its ranks in new sessions)."""
        for p in list(r.known.values()):
            try:
                for c in p.children(recursive=True):
                    r.known.setdefault(c.pid, c)
            except psutil.Error:
                pass

    def _stop(self, replicas: list[_Replica]) -> None:
        """Stop every replica's process tree: SIGTERM, then SIGKILL after the grace period."""
        for r in replicas:
            self._refresh(r)
        mains = [r.proc for r in replicas if r.proc is not None]
        # descendants only: the replicas' own processes are reaped by Popen (keeps their exit codes)
        others = [p for r in replicas for pid, p in r.known.items() if r.proc is None or pid != r.proc.pid]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in mains:
                try:  # the replica's session; it outlives a leader that already exited
                    os.killpg(proc.pid, sig)
                except OSError:
                    pass
                if proc.poll() is None:
                    try:
                        proc.send_signal(sig)
                    except OSError:
                        pass
            for p in others:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            end = time.monotonic() + (self.grace_seconds if sig == signal.SIGTERM else 5.0)
            for proc in mains:
                try:
                    proc.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            _, others = psutil.wait_procs(others, timeout=max(0.0, end - time.monotonic()))
            if not others and all(proc.poll() is not None for proc in mains) and not any(_group_alive(p.pid) for p in mains):
                break
        for r in replicas:
            r.known.clear()

    def _mounts(self, r: _Replica) -> list[tuple[str, Path]]:
        """(mountPath, local directory) of each mapped PVC the container mounts, longest mountPath first."""
        claims = {v["name"]: (v.get("persistentVolumeClaim") or {}).get("claimName") for v in r.volumes}
        mounts = []
        for m in r.container.get("volumeMounts") or []:
            claim = claims.get(m.get("name"))
            if claim in self.volumes:
                local = self.volumes[claim] / m["subPath"] if m.get("subPath") else self.volumes[claim]
                local.mkdir(parents=True, exist_ok=True)  # an empty claim is an empty folder
                mounts.append((m["mountPath"].rstrip("/") or "/", local))
        return sorted(mounts, key=lambda t: -len(t[0]))

    # -- manifest ------------------------------------------------------------------------------
    @staticmethod
    def _replicas(spec: dict[str, Any]) -> list[_Replica]:
        specs = spec.get("pytorchReplicaSpecs") or {}
        unknown = set(specs) - {"Master", "Worker"}
        if unknown:
            raise ValueError(f"pytorchReplicaSpecs: unknown replica types {sorted(unknown)} (Master, Worker)")
        if "Master" not in specs:
            raise ValueError("pytorchReplicaSpecs: the local executor needs a Master replica (node rank 0)")
        out: list[_Replica] = []
        for rtype in ("Master", "Worker"):
            rs = specs.get(rtype)
            if not rs:
                continue
            containers = rs["template"]["spec"]["containers"]
            c = next((c for c in containers if c.get("name") == "pytorch"), containers[0])
            limits = (c.get("resources") or {}).get("limits") or {}
            gpus = int(limits.get("nvidia.com/gpu", 0) or 0)
            for i in range(int(rs.get("replicas", 1))):
                node_rank = i if rtype == "Master" else i + 1
                out.append(_Replica(rtype=rtype, index=i, node_rank=node_rank, container=c, gpus=gpus,
                                    volumes=list(rs["template"]["spec"].get("volumes") or [])))
        return out

    @staticmethod
    def _default_log_dir(replicas: list[_Replica]) -> Path:
        """``<workdir>/logs`` of the stage spec the job carries, else ./logs."""
        for e in replicas[0].container.get("env") or []:
            if e.get("name") == "SELFTRAIN_SPEC":
                import json

                try:
                    return Path(json.loads(e["value"])["outputs"]["workdir"]) / "logs"
                except (ValueError, KeyError, TypeError):
                    break
        return Path("logs")


def _local_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    """``value`` with a path under a mountPath moved to its local directory: the whole string, the part after
    ``--opt=``, or every such string inside JSON (the stage spec)."""
    if not mounts or not value:
        return value
    if value[0] in "{[":
        try:
            doc = json.loads(value)
        except ValueError:
            doc = None
        if isinstance(doc, (dict, list)):
            return json.dumps(_local_json(doc, mounts))
    key, eq, rest = value.partition("=")
    if eq and key.startswith("-"):
        return f"{key}={_local_path(rest, mounts)}"
    for mount, local in mounts:
        if value == mount or value.startswith(mount + "/"):
            return str(local) + value[len(mount):]
    return value


def _local_json(doc: Any, mounts: list[tuple[str, Path]]) -> Any:
    if isinstance(doc, dict):
        return {k: _local_json(v, mounts) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_local_json(v, mounts) for v in doc]
    return _local_path(doc, mounts) if isinstance(doc, str) else doc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def _exit_code(returncode: int | None) -> int | None:
    """A container's exit code: 128+N for a process killed by signal N."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


def restartable(policy: str, code: int | None) -> bool:
    """Whether a replica that ended with ``code`` restarts under its restartPolicy (ExitCode: 128-255 are retryable)."""
    if policy == "Never":
        return False
    if policy == "ExitCode":
        return code is not None and 128 <= code <= 255
    return True  # OnFailure, Always


def _print(line: str) -> None:
    print(line, flush=True)
