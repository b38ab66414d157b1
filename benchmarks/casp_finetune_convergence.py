"""CaSP's fine-tuning at longer schedules, on the selection split (issue 12; BENCHMARKS.md "CaSP demo").

    python benchmarks/casp_finetune_convergence.py <run-dir> --val data/partworld-demo/val --steps 200,800

The paper fine-tunes every row of Table 2 to convergence; the demo gives each 200 steps. This re-runs the demo's
``finetune`` stage (``instance-teacher`` on the labeled split, the run's own spec and params but ``steps``) from each
pretrained model the run made -- CaSP's target model (``late-pretrain``), the class-specific pseudo-label model
(``specific-pretrain``), the class-agnostic ground truth upper bound (``gt-pretrain``) and none
(``no-pretraining``'s random start) -- and scores each on the **val** split with the
stage the pipeline uses (``evaluate-instances``: class-specific and class-agnostic mask AP). Reported figures stay
the run's own on eval; this looks only at val, so it cannot tune anything on the reported split.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainers"))
sys.path.insert(0, str(REPO / "tests" / "trainers" / "stages"))

ROWS = {  # --rows name -> (Table 2's label, the run's stage whose spec is the fine-tuning's, the stage whose model
    # is the start)
    "none": ("none", "no-pretraining", None),
    "specific": ("Objects(P,S)", "specific-finetune", "specific-pretrain"),
    "gt": ("Objects(G,A)", "gt-finetune", "gt-pretrain"),
    "casp": ("CaSP", "finetune", "late-pretrain"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--steps", default="200,800")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--init-parts", default=None, help="e.g. backbone: only these parts from the pretrained model (CaSP "
                    "Table 10; instance-teacher's init_parts); default: the run's own (all)")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    from runtime_helpers import run_stage
    from stage_helpers import result, stage_spec

    a.out.mkdir(parents=True, exist_ok=True)
    done = a.out / "convergence.json"
    report = json.loads(done.read_text()) if done.is_file() else {"run": str(a.run), "val": str(a.val), "rows": []}
    for name in a.rows.split(","):
        if name not in ROWS:
            ap.error(f"--rows: unknown row {name!r}; the rows are {', '.join(ROWS)}")
        label, spec_stage, start = ROWS[name]
        base = json.loads((a.run / spec_stage / "spec.json").read_text())
        models = {}
        if start is not None:
            models["init"] = Path(result(a.run / start)["model_path"])
        ds = base["resources"]["deepspeed"]
        for steps in (int(s) for s in a.steps.split(",")):
            t0 = time.perf_counter()
            parts = a.init_parts.split(",") if a.init_parts and start is not None else None
            tag = f"{spec_stage}-{steps}" + (f"-{'+'.join(parts)}" if parts else "")
            work = a.out / tag
            params = {**base["params"], "steps": steps, **({"init_parts": parts} if parts else {})}
            run_stage(stage_spec("instance-teacher", work, datasets={"train": Path(base["inputs"]["datasets"]["train"]["path"])},
                                 models=models, params=params, nproc=base["resources"]["nproc_per_node"],
                                 zero=ds["zero_optimization"]["stage"], micro=ds["train_micro_batch_size_per_gpu"]),
                      nproc=base["resources"]["nproc_per_node"], timeout=7200)
            model = Path(result(work)["model_path"])
            ev = a.out / f"{tag}-val"
            run_stage(stage_spec("evaluate-instances", ev, datasets={"eval": a.val}, models={"candidate": model},
                                 dataset_out=a.out / f"predictions-{tag}-val",
                                 nproc=base["resources"]["nproc_per_node"]),
                      nproc=base["resources"]["nproc_per_node"], timeout=3600)
            m = result(ev)["metrics"]
            row = {"pretraining": label, "steps": steps, "init_parts": parts or "all", "mask_AP": m["eval/mask_AP"],
                   "mask_AP_agnostic": m["eval/mask_AP_agnostic"], "seconds": time.perf_counter() - t0}
            report["rows"].append(row)
            print(f"{label:14s} {'+'.join(parts) if parts else 'all':14s} {steps:5d} steps: val AP^seg {100 * row['mask_AP']:5.1f}  AP^seg-a "
                  f"{100 * row['mask_AP_agnostic']:5.1f}  ({row['seconds']:.0f} s)", flush=True)
            (a.out / "convergence.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
