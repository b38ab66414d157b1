"""A stand-in trainer container for executor tests: records what it was started with, then obeys env knobs.

Writes ``$OUT/<attempt>-<PET_NODE_RANK>.json`` ({"argv", "env", "pid", "child_pid"}) and then:
FAIL_NODE=<rank>:<code> exits that rank with <code> (after the others are up);
FAIL_ATTEMPTS=<n> makes it fail only in the first n attempts; SLEEP=<s> keeps the others running;
SPAWN_CHILD=1 starts a grandchild that sleeps (to check that no process is left behind).
With WRITE_RESULT=1, node rank 0 then acts as a trainer of the spec in SELFTRAIN_SPEC: it writes
``model.pt``, the output dataset (if any) and ``result.json`` with ``params.metrics`` as metrics,
or exits 1 when ``params.fail`` is true.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

out = Path(os.environ["OUT"])
out.mkdir(parents=True, exist_ok=True)
rank = int(os.environ["PET_NODE_RANK"])
attempt = 1
while (out / f"{attempt}-{rank}.json").exists():
    attempt += 1
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) if os.environ.get("SPAWN_CHILD") else None
rec = {"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid(), "child_pid": child.pid if child else None}
tmp = out / f".{attempt}-{rank}.tmp"
tmp.write_text(json.dumps(rec))
tmp.replace(out / f"{attempt}-{rank}.json")
print(f"rank {rank} attempt {attempt} up", flush=True)

if os.environ.get("WRITE_RESULT") and rank == 0:  # the trainer's own record of its starts in its workdir
    workdir = Path(json.loads(os.environ["SELFTRAIN_SPEC"])["outputs"]["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "starts.txt", "a") as f:
        f.write(f"attempt {attempt}\n")

fail = os.environ.get("FAIL_NODE")
if fail and attempt <= int(os.environ.get("FAIL_ATTEMPTS", "1000")):
    node, code = (int(x) for x in fail.split(":"))
    if node == rank:
        world = int(os.environ["PET_NNODES"])
        while len(list(out.glob(f"{attempt}-*.json"))) < world:  # wait until every replica is up
            time.sleep(0.05)
        print(f"rank {rank} failing with {code}", flush=True)
        sys.exit(code)
time.sleep(float(os.environ.get("SLEEP", "0")))
if os.environ.get("WRITE_RESULT") and rank == 0:
    spec = json.loads(os.environ["SELFTRAIN_SPEC"])
    if spec["params"].get("fail"):
        print("evaluation failed on purpose", flush=True)
        sys.exit(1)
    workdir = Path(spec["outputs"]["workdir"])
    (workdir / "model.pt").write_bytes(json.dumps(spec["params"]).encode())
    if spec["outputs"]["dataset"]:
        d = Path(spec["outputs"]["dataset"])
        d.mkdir(parents=True, exist_ok=True)
        (d / "index.json").write_text(json.dumps(spec["params"]))
    result = {"status": "succeeded", "stage": spec["stage"], "metrics": spec["params"].get("metrics", {}),
              "model_path": str(workdir / "model.pt"), "dataset_path": spec["outputs"]["dataset"], "steps": 1}
    (workdir / ".result.json.tmp").write_text(json.dumps(result))
    (workdir / ".result.json.tmp").replace(workdir / "result.json")
print(f"rank {rank} done", flush=True)
