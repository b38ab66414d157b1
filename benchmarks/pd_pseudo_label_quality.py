"""How good are a PartDistillation round's pseudo-labels, against the model that made them (issue 11; BENCHMARKS.md
"Why self-training rounds do not improve")?

    python benchmarks/pd_pseudo_label_quality.py .selftrain/runs/<run> --split data/partworld-demo/val \
        --round 1 --thresholds 0.5,0.3,0.1 -o benchmarks/results/pd_pseudo_label_quality

Round r + 1 learns from round r's pseudo-labels: round r's predictions filtered by the sec. 4.2 filters (score above
``score_threshold``, inside a detected instance, clipped to it, duplicates dropped). This re-runs the run's own
``r<r>-pseudo-label`` stage (same models, same params but the score threshold) on a split with part masks
(``allow_parts``: part labels are never copied) and scores what it writes with ``evaluate-proposals``, the stage that
scores every row of the stage-1 table. The model's own AR@k on the same split comes from the run's ``r<r>-val`` (or
``r<r>-evaluate``) result. Use the **val** split: a threshold chosen here is chosen on the selection split, never on
the reported one.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a PartDistillation run folder (.selftrain/runs/<run>)")
    ap.add_argument("--split", type=Path, required=True, help="a split with part masks: val (selection), not eval")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--thresholds", default="0.5,0.3,0.1", help="pseudo-label score thresholds, comma-separated")
    ap.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                    help="another pseudo-label param for every row (YAML value), e.g. objects=gt or duplicate_iou=1")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    from runtime_helpers import run_stage
    from stage_helpers import result

    from contract.spec import StageSpec

    import yaml

    base = json.loads((a.run / f"r{a.round}-pseudo-label" / "spec.json").read_text())
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    evaluation = json.loads((a.run / f"r{a.round}-evaluate" / "spec.json").read_text())
    split_name = a.split.name
    own = a.run / (f"r{a.round}-val" if split_name == "val" else f"r{a.round}-evaluate")
    model_metrics = result(own)["metrics"] if (own / "result.json").is_file() else {}
    nproc = base["resources"]["nproc_per_node"]
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"run": str(a.run), "split": str(a.split), "round": a.round, "labeller": base["inputs"]["models"],
              "model": {k: v for k, v in model_metrics.items() if k.startswith("eval/AR_")}, "rows": []}
    print(f"round {a.round}'s model on {split_name}: AR@10 {100 * model_metrics.get('eval/AR_10', float('nan')):.2f}")
    for t in (float(x) for x in a.thresholds.split(",")):
        t0 = time.perf_counter()
        tag = f"{a.run.name}-r{a.round}-{split_name}-t{t:g}" + "".join(f"-{k}={v}" for k, v in extra.items())
        label = {**base, "name": f"{tag}-labels",
                 "params": {**base["params"], **extra, "score_threshold": t, "allow_parts": True},
                 "inputs": {**base["inputs"], "datasets": {"images": {"path": str(a.split.resolve())}}},
                 "outputs": {"workdir": str(a.out / tag / "label"), "dataset": str(a.out / tag / "labels"), "model": None},
                 "tracking": {**base["tracking"], "run_id": None, "parent_run_id": None}}
        run_stage(StageSpec.model_validate(label), nproc=nproc, timeout=3600)
        score = {**evaluation, "name": f"{tag}-evaluate", "params": {**evaluation["params"], "coco": False},
                 "inputs": {"datasets": {"eval": {"path": str(a.split.resolve())}, "proposals": {"path": str(a.out / tag / "labels")}},
                            "models": {}},
                 "outputs": {"workdir": str(a.out / tag / "evaluate"), "dataset": str(a.out / tag / "predictions"), "model": None},
                 "tracking": {**evaluation["tracking"], "run_id": None, "parent_run_id": None}, "promotion": None}
        run_stage(StageSpec.model_validate(score), nproc=nproc, timeout=3600)
        counts = result(a.out / tag / "label")["metrics"]
        m = result(a.out / tag / "evaluate")["metrics"]
        row = {"score_threshold": t, "params": extra, **{k: v for k, v in m.items() if k.startswith("eval/AR_")},
               "labels_per_image": counts.get("pseudo_label/proposals_per_image"),
               "label_counts": counts, "seconds": time.perf_counter() - t0}
        report["rows"].append(row)
        print(f"labels at score > {t:g}: AR@10 {100 * m['eval/AR_10']:.2f}  "
              + "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in counts.items() if "proposal" in k or "kept" in k))
    done = a.out / f"{a.run.name}-r{a.round}-{split_name}.json"  # rows of earlier calls kept
    if done.is_file():
        report["rows"] = json.loads(done.read_text())["rows"] + report["rows"]
    done.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
