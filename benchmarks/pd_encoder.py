"""PartDistillation with a pretrained encoder against random initialisation (issue 14 acceptance; the paper's Table 5
question: do better features give better parts?). BENCHMARKS.md "PartDistillation with a pretrained encoder".

    python benchmarks/pd_encoder.py --encoder models:/dense-slotcon@champion --run-prefix enc1 \
        [--config configs/partdistillation-demo.yaml] [--trim] [--only random|encoder] [-o benchmarks/results/pd_encoder.json]

Runs the config twice with ``selftrain run``, identical except ``partdistillation.teacher.params.encoder`` (absent:
the instance teacher's backbone at random init, as the config has it; set: the representation's weights, whose
timm_name becomes the backbone). ``--trim`` leaves out what the comparison does not read (the one-stage and k-means
baselines, the label-free criterion, the pseudo-label scores) so both runs fit the budget. Then prints, for both:
the teacher's mask AP on eval, the mined proposals' and each round's AR@10 on eval, and the final ranker's NMI, ARI
and mIoU with and without ground-truth objects on eval (every figure is a stage's own result.json; selection read
val only, as in any run).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def variant(config: Path, encoder: str | None, trim: bool, out: Path) -> Path:
    """The config with the teacher's encoder set (or left out) and, with ``trim``, the unread parts off; written to
    ``out`` with its workspace made absolute (relative paths in a config are relative to its folder)."""
    cfg = yaml.safe_load(config.read_text())
    ws = cfg.setdefault("workspace", {})
    for key in ("root", "data"):
        if key in ws:
            ws[key] = str((config.parent / ws[key]).resolve())
    pd = cfg.setdefault("partdistillation", {})
    params = pd.setdefault("teacher", {}).setdefault("params", {})
    params.pop("encoder", None)
    if encoder:
        params["encoder"] = encoder
    if trim:
        pd.setdefault("ranking", {}).update(one_stage_rounds=0, kmeans_baseline=False, purity_grids=False)
        pd.setdefault("selection", {}).update(compare=False)
        pd.setdefault("proposals", {}).update(measure_labels=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def figures(run_dir: Path, proposal_rounds: int, ranker_rounds: int) -> dict[str, float]:
    def m(stage: str) -> dict[str, float]:
        return json.loads((run_dir / stage / "result.json").read_text())["metrics"]

    out = {"teacher mask AP": m("instance-teacher")["eval/mask_AP"],
           "teacher mask AP (agnostic)": m("instance-teacher")["eval/mask_AP_agnostic"],
           "mined AR@10": m("evaluate-mined")["eval/AR_10"]}
    for r in range(1, proposal_rounds + 1):
        out[f"round {r} AR@10"] = m(f"r{r}-evaluate")["eval/AR_10"]
    final = m(f"f{ranker_rounds}-evaluate")
    for setting, label in (("gt", "GT objects"), ("pred", "no GT objects")):
        for c in ("nmi", "ari", "miou", "miou_hungarian"):
            out[f"{c} ({label})"] = final[f"eval/{setting}/{c}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "partdistillation-demo.yaml")
    ap.add_argument("--encoder", required=True, help="partdistillation.teacher.params.encoder of the second run")
    ap.add_argument("--run-prefix", required=True)
    ap.add_argument("--trim", action="store_true")
    ap.add_argument("--only", choices=("random", "encoder"), help="run one of the two (a later call with the same "
                    "--run-prefix resumes the finished one: all its stages are skipped)")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "pd_encoder.json")
    a = ap.parse_args()
    cfg = yaml.safe_load(a.config.read_text())
    pd = cfg.get("partdistillation", {})
    rounds = (pd.get("proposals", {}).get("rounds", 2), pd.get("ranking", {}).get("rounds", 1))
    root = (a.config.parent / cfg.get("workspace", {}).get("root", "../.selftrain")).resolve()
    report = {"config": str(a.config), "encoder": a.encoder, "trim": a.trim, "runs": {}}
    for name, enc in (("random init", None), ("encoder", a.encoder)):
        run = f"{a.run_prefix}-{'random' if enc is None else 'encoder'}"
        if a.only and not run.endswith(a.only):
            continue
        path = variant(a.config, enc, a.trim, root / "bench-configs" / f"{run}.yaml")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path), "--run", run], cwd=REPO, check=True)
        report["runs"][name] = {"run": run, "wall_s": round(time.perf_counter() - t0, 1),
                                "figures": figures(root / "runs" / run, *rounds)}
        print(name, json.dumps(report["runs"][name]), flush=True)
    if a.only:
        return
    rows = list(report["runs"]["random init"]["figures"])
    lines = ["| eval figure (%) | random init | " + a.encoder + " | difference |", "| --- | ---: | ---: | ---: |"]
    for k in rows:
        r, e = report["runs"]["random init"]["figures"][k], report["runs"]["encoder"]["figures"][k]
        lines.append(f"| {k} | {100 * r:.1f} | {100 * e:.1f} | {100 * (e - r):+.1f} |")
    report["table"] = "\n".join(lines)
    print(report["table"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
