"""Fault-injection benchmark (issue 16, items 1-6): repeated trials per fault class, with counts.

    .venv/bin/python benchmarks/faults.py --trials 20 [--examples 2000] [--only kill-training,...] [--seed 0]

Each class runs ``--trials`` times on tiny stages under torchrun (2 CPU ranks, gloo; the trials are those of
``tests/faults/harness.py``, which CI runs once or twice each); the fuzz targets run ``--examples`` hypothesis
examples each (the Helm values a quarter of that: a ``helm template`` each). Needs root for the disk-full classes
(``mount -t tmpfs``). Prints a Markdown table (trials run / recovered / data lost per class) with the command and the
machine, and every trial's detail with ``--verbose``.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "faults"))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402

CLASSES = {
    "kill-training": ("1. kill -9 of a random rank at a random step: training (fit-objects, ZeRO-2)", harness.trial_kill_training),
    "kill-shardmap": ("1. kill -9 of a random rank at a random shard: labelling (mine-parts)", harness.trial_kill_shardmap),
    "driver-kill": ("2. kill -9 of the driver (`selftrain run`, local executor) while a trainer runs / a stage finishes / between stages", harness.trial_driver_kill),
    "mlflow-outage": ("3. MLflow server kill -9 at a random training step, restarted on its port after 1-8 s; a promotion tried meanwhile", harness.trial_mlflow_outage),
    "disk-full-checkpoints": ("4. disk full (tmpfs) while writing checkpoints", harness.trial_disk_full_checkpoint),
    "disk-full-shards": ("4. disk full (tmpfs) while writing shards (mine-parts)", harness.trial_disk_full_shards),
    "bad-checkpoint": ("5. newest checkpoint truncated / garbage / deleted / `latest` damaged", harness.trial_bad_checkpoint),
    "nonfinite-loss": ("5. NaN/inf loss on a random rank and step (stop or skip)", harness.trial_nonfinite_loss),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores visible, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def run_fuzz(examples: int) -> list[tuple[str, int, int, int]]:
    """(target, examples, named errors or valid, raw exceptions) per fuzz target, from tests/faults/test_faults_fuzz.py."""
    env = {**os.environ, "FAULTS_FUZZ_EXAMPLES": str(examples), "PYTHONPATH": str(REPO),
           "FAULTS_FUZZ_HELM_EXAMPLES": str(max(1, examples // 4))}  # a helm template each
    report = Path(tempfile.mkdtemp()) / "fuzz.json"
    env["FAULTS_FUZZ_REPORT"] = str(report)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults/test_faults_fuzz.py"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    import json

    counts = json.loads(report.read_text()) if report.exists() else {}
    rows = [(t, c["examples"], c["named"], c["raw"]) for t, c in sorted(counts.items())]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--examples", type=int, default=2000, help="hypothesis examples per fuzz target (0: no fuzzing)")
    ap.add_argument("--only", default="", help="comma-separated classes: " + ", ".join(CLASSES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    only = [c for c in args.only.split(",") if c] or list(CLASSES)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    world = harness.World(root / "world")
    rows, details = [], []
    t0 = time.monotonic()
    for name in only:
        title, trial = CLASSES[name]
        results = []
        for i in range(args.trials):
            tmp = root / f"{name}-{i}"
            tmp.mkdir()
            t = time.monotonic()
            try:
                r = trial(world, rng, tmp)
            except Exception as e:  # a harness failure is a failed trial, reported
                r = harness.Trial(name, False, 0, f"trial raised {type(e).__name__}: {e}")
            results.append(r)
            details.append(f"{name} #{i + 1} ({time.monotonic() - t:.0f} s): recovered={r.recovered} lost={r.lost} {r.detail}")
            if args.verbose:
                print(details[-1], file=sys.stderr, flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append((title, len(results), sum(r.recovered for r in results), sum(r.lost for r in results)))
    fuzz = run_fuzz(args.examples) if args.examples > 0 else []
    print(f"Command: `python benchmarks/faults.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {machine()}  ")
    print(f"Wall time: {time.monotonic() - t0:.0f} s\n")
    print("| fault class | trials | recovered | data lost |")
    print("| --- | ---: | ---: | ---: |")
    for title, n, rec, lost in rows:
        print(f"| {title} | {n} | {rec} | {lost} |")
    if fuzz:
        print("\n| fuzz target (6.) | examples | named error or valid | raw exception |")
        print("| --- | ---: | ---: | ---: |")
        for target, n, named, raw in fuzz:
            print(f"| {target} | {n} | {named} | {raw} |")
    if args.verbose:
        print("\n" + "\n".join(f"- {d}" for d in details))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
