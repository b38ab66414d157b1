"""The stand-in trainer of the driver-kill trials: tests/pipelines/rank_program.py behind a gate.

When ``$GATE_DIR/<stage>.closed`` exists, node rank 0 writes ``<workdir>/gate.waiting`` and waits for
``$GATE_DIR/<stage>.open`` before it runs the stand-in; so a trial can kill the driver while a stage's trainer is
running and let that trainer finish only once the re-run driver has re-attached to it.
"""
import json
import os
import runpy
import time
from pathlib import Path

spec = json.loads(os.environ["SELFTRAIN_SPEC"])
gate = Path(os.environ.get("GATE_DIR", "/nonexistent"))
if os.environ.get("PET_NODE_RANK", "0") == "0" and (gate / f"{spec['name']}.closed").exists():
    workdir = Path(spec["outputs"]["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "gate.waiting").write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while not (gate / f"{spec['name']}.open").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
runpy.run_path(str(Path(__file__).resolve().parents[1] / "pipelines" / "rank_program.py"), run_name="__main__")
