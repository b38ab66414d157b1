"""Re-run some of a finished PartDistillation run's evaluating stages with changed params, into a scratch folder
(issue 11; BENCHMARKS.md "Self-training rounds that improve, and the fair baselines").

    python benchmarks/pd_rescore.py .selftrain/runs/<run> --stages kmeans-eval-detected,kmeans-detected-evaluate,f1-evaluate \
        --set object_nms_iou=0.5 -o /tmp/rescore-<run>

Each stage's own ``spec.json`` is re-run with the ``--set`` params added (only to stages whose params class has them),
its outputs redirected under ``-o``; a later stage that reads a dataset an earlier one re-wrote reads the new one.
Nothing of the run is touched, and nothing is logged to MLflow. Models are the versions the run's specs pinned.
(Re-running the run itself with ``selftrain run`` is not the same: see "Left" in BENCHMARKS.md.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainers"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--stages", required=True, help="comma-separated, in order")
    ap.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE", help="YAML value")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    import yaml
    from runtime_helpers import run_stage

    from contract.spec import StageSpec
    from contract.stages import STAGES

    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    moved: dict[str, str] = {}  # original dataset path -> re-written one
    report = {"run": str(a.run), "set": extra, "stages": {}}
    for name in a.stages.split(","):
        base = json.loads((a.run / name / "spec.json").read_text())
        fields = STAGES[base["stage"]].params.model_fields
        params = {**base["params"], **{k: v for k, v in extra.items() if k in fields}}
        datasets = {k: {**d, "path": moved.get(d["path"], d["path"])} for k, d in base["inputs"]["datasets"].items()}
        out_ds = str(a.out / name / "data") if base["outputs"]["dataset"] else None
        if out_ds:
            moved[base["outputs"]["dataset"]] = out_ds
        spec = {**base, "params": params, "inputs": {**base["inputs"], "datasets": datasets},
                "outputs": {"workdir": str(a.out / name / "work"), "dataset": out_ds, "model": None},
                "tracking": {**base["tracking"], "run_id": None, "parent_run_id": None}, "promotion": None}
        run_stage(StageSpec.model_validate(spec), nproc=base["resources"]["nproc_per_node"], timeout=3600)
        m = json.loads((a.out / name / "work" / "result.json").read_text())["metrics"]
        report["stages"][name] = m
        shown = {k: round(100 * v, 1) for k, v in m.items() if k.split("/")[-1] in ("nmi", "ari", "miou", "miou_hungarian")}
        print(name, shown or "")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rescore.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
