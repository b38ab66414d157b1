"""The figures of BENCHMARKS.md "SlotCon and Leopart": the stages of configs/dense-demo.yaml run directly (torchrun,
one rank each, the two learners side by side, then every evaluation one after the other), without MLflow or DVC.

    python benchmarks/dense_demo.py --out /tmp/dense-demo [--config configs/dense-demo.yaml] [--only slotcon,...]

The specs are the pipeline's own (``load_config(...).stage_specs``), so the params are the config's; a ``stage:<m>``
candidate is replaced by ``<out>/<m>/model.pt``. Prints one line per stage (exit code, wall seconds) and the
comparison table (pipelines.dense.report) from the stages' result.json files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contract.io import free_port  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.dense.report import format_table, table  # noqa: E402


def launch(spec, log: Path) -> subprocess.Popen:
    env = {**os.environ, "SELFTRAIN_SPEC": spec.to_json(), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--nnodes=1", f"--master-port={free_port()}",
           "-m", "trainers", spec.stage, "--spec", "env:SELFTRAIN_SPEC"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "configs" / "dense-demo.yaml"))
    ap.add_argument("--out", required=True, help="folder of the stages' workdirs and logs")
    ap.add_argument("--only", default="", help="comma-separated stage names to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    specs = []
    for s in cfg.stage_specs("bench"):
        s = s.model_copy(deep=True)
        s.outputs.workdir = str(out / s.name)
        s.tracking.run_id = None
        for ref in s.inputs.models.values():
            if ref.uri.startswith("stage:"):
                ref.uri = str(out / ref.uri[len("stage:"):] / "model.pt")
        specs.append(s)
    only = set(filter(None, args.only.split(",")))
    chosen = [s for s in specs if not only or s.name in only]
    train = [s for s in chosen if s.stage in ("slotcon", "leopart")]
    t0 = time.time()
    procs = [(s, launch(s, out / f"{s.name}.log")) for s in train]
    for s, p in procs:
        print(f"{s.name}: exit {p.wait()}, {time.time() - t0:.0f} s", flush=True)
    for s in chosen:
        if s not in train:
            t1 = time.time()
            print(f"{s.name}: exit {launch(s, out / f'{s.name}.log').wait()}, {time.time() - t1:.0f} s", flush=True)
    outcomes = [SimpleNamespace(name=s.name, result=json.loads((out / s.name / "result.json").read_text()))
                for s in specs if (out / s.name / "result.json").is_file()]
    print(format_table(table(outcomes, cfg)))


if __name__ == "__main__":
    main()
