"""The LUSS report: a table shaped like the paper's LUSS table (Table V: mIoU, b-mIoU, Img-Acc, F-beta on val and test,
mIoU by object size), the other protocols, mIoU against K (table and ``miou_vs_k.png``) and the label statistics."""
from __future__ import annotations

import json
from typing import Any

from contract.io import atomic_open
from pipelines.luss import graph
from pipelines.luss.config import LussConfig

NAN = float("nan")
METRICS = (("mIoU", "luss/miou"), ("b-mIoU", "luss/boundary_miou"), ("Img-Acc", "luss/img_acc"), ("Fβ", "luss/fbeta"))
SIZES = ("S", "MS", "ML", "L")
LABEL_STATS = (("tau (threshold)", "labels/threshold"), ("'other' pixels", "labels/other_fraction"),
               ("images all 'other'", "labels/images_all_other"), ("images labelled", "labels/images"),
               ("clusters re-seeded", "labels/reseeded"), ("faiss splits of empty clusters", "labels/faiss_splits"),
               ("clusters no image joined", "labels/clusters_without_rows"), ("k-means sample", "labels/kmeans_sample"),
               ("k-means seconds", "labels/kmeans_seconds"), ("peak RSS (MB, a rank)", "labels/peak_rss_mb"))


def _metrics(by_name: dict[str, Any], stage: str | None) -> dict[str, float]:
    o = by_name.get(stage) if stage else None
    return ((o.result or {}).get("metrics") or {}) if o else {}


def rows(cfg: LussConfig) -> list[tuple[str, str]]:
    """(row label, stage whose -val/-eval evaluations fill it), in the paper's order: baselines, then PASS."""
    c, k = cfg.luss, cfg.luss.k
    out = []
    if "kmeans_random" in c.baselines:
        out.append((f"k-means K+1={k + 1}, random init", graph.kmeans_stage("kmeans_random", k)))
    if "kmeans_pretrained" in c.baselines:
        out.append((f"k-means K+1={k + 1}, pretrained (represent)", graph.kmeans_stage("kmeans_pretrained", k)))
    out += [(f"PASS labels, before fine-tuning (K={k})", graph.labels_stage(k)), (f"PASS fine-tuned (K={k})", graph.FINETUNE)]
    return out


def table(outcomes: list[Any], cfg: LussConfig) -> list[tuple[str, dict[str, float]]]:
    """The LUSS table rows: every metric on val and eval, mIoU by object size on eval."""
    by_name = {o.name: o for o in outcomes}
    out = []
    for label, stage in rows(cfg):
        val, ev = _metrics(by_name, graph.val_stage(stage)), _metrics(by_name, graph.eval_stage(stage))
        vals: dict[str, float] = {}
        for name, key in METRICS:
            vals[f"{name} val"] = float(val.get(key, NAN))
            vals[f"{name} eval"] = float(ev.get(key, NAN))
        for s in SIZES:
            vals[f"mIoU {s}"] = float(ev.get(f"luss/miou_{s}", NAN))
        out.append((label, vals))
    return out


def k_curve(outcomes: list[Any], cfg: LussConfig) -> dict[str, dict[int, float]]:
    """eval mIoU against K for every method (the main K and the sweep)."""
    by_name = {o.name: o for o in outcomes}
    ks = sorted({cfg.luss.k, *cfg.luss.k_sweep})
    curves = {"PASS labels": {k: float(_metrics(by_name, graph.eval_stage(graph.labels_stage(k))).get("luss/miou", NAN)) for k in ks}}
    for b in cfg.luss.baselines:
        curves[f"k-means ({b.split('_')[1]})"] = {
            k: float(_metrics(by_name, graph.eval_stage(graph.kmeans_stage(b, k))).get("luss/miou", NAN)) for k in ks}
    ft = float(_metrics(by_name, graph.eval_stage(graph.FINETUNE)).get("luss/miou", NAN))
    curves["PASS fine-tuned"] = {cfg.luss.k: ft}
    return curves


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}"


def format_table(rows_: list[tuple[str, dict[str, float]]]) -> str:
    cols = list(rows_[0][1]) if rows_ else []
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    lines += [f"| {label} | " + " | ".join(_pct(v) for v in vals.values()) + " |" for label, vals in rows_]
    return "\n".join(lines)


def format_curves(curves: dict[str, dict[int, float]]) -> str:
    ks = sorted({k for c in curves.values() for k in c})
    lines = ["| method | " + " | ".join(f"K={k}" for k in ks) + " |", "| --- |" + " ---: |" * len(ks)]
    lines += [f"| {m} | " + " | ".join(_pct(c.get(k, NAN)) for k in ks) + " |" for m, c in curves.items()]
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, float]], out_png) -> Any:
    """mIoU (eval split, fully unsupervised) against K for every method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, c in curves.items():
        ks = [k for k in sorted(c) if c[k] == c[k]]
        if ks:
            ax.plot(ks, [100 * c[k] for k in ks], marker="*" if len(ks) == 1 else "o", markersize=12 if len(ks) == 1 else 5,
                    linestyle="-" if len(ks) > 1 else "none", label=name)
    ax.set(xlabel="K (generated categories)", ylabel="mIoU (%)", title="Fully unsupervised mIoU against K, eval split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out_png


def other_protocols(outcomes: list[Any], cfg: LussConfig) -> list[tuple[str, dict[str, float]]]:
    by_name = {o.name: o for o in outcomes}
    out = []
    if "distance_matching" in cfg.luss.protocols:
        for label, source in (("distance matching: represent", graph.REPRESENT), ("distance matching: random init", graph.RANDOM_INIT)):
            m = _metrics(by_name, graph.eval_stage(graph.dm_stage(source)))
            out.append((label, {n: float(m.get(k, NAN)) for n, k in METRICS}))
    if "semi_supervised" in cfg.luss.protocols:
        m = _metrics(by_name, graph.eval_stage(graph.SEMI))
        out.append(("semi-supervised: represent fine-tuned on the labeled images", {n: float(m.get(k, NAN)) for n, k in METRICS}))
    return out


def verdicts(table_rows: list[tuple[str, dict[str, float]]]) -> list[str]:
    """The issue's acceptance comparisons on the eval split, stated with their numbers."""
    ev = {label: vals["mIoU eval"] for label, vals in table_rows}
    ft = next((v for label, v in ev.items() if label.startswith("PASS fine-tuned")), NAN)
    lines = []
    for label, v in ev.items():
        if label.startswith("PASS fine-tuned"):
            continue
        verdict = "beats" if ft > v else "does NOT beat"
        lines.append(f"PASS fine-tuned ({_pct(ft)}) {verdict} {label} ({_pct(v)}) on eval mIoU")
    return lines


def write_report(cfg: LussConfig, result: Any, lineage: Any) -> str:
    report_dir = cfg.run_dir(result.run) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    by_name = {o.name: o for o in result.stages}
    main_rows = table(result.stages, cfg)
    curves = k_curve(result.stages, cfg)
    others = other_protocols(result.stages, cfg)
    text = [f"LUSS table, fully unsupervised protocol (%; K={cfg.luss.k}; val = selection split, eval = reported split; "
            "mIoU by object size on eval)", format_table(main_rows), ""]
    if others:
        text += ["Other protocols (eval split, %)", format_table(others), ""]
    text += ["mIoU against K (eval split, %)", format_curves(curves), ""]
    labels = _metrics(by_name, graph.labels_stage(cfg.luss.k))
    if labels:
        text.append(f"label generation ({graph.labels_stage(cfg.luss.k)}): " + ", ".join(
            f"{name} {labels[key]:.3g}" for name, key in LABEL_STATS if key in labels))
    text += verdicts(main_rows)
    body = "\n".join(text)
    (report_dir / "tables.md").write_text(body + "\n")
    png = plot(curves, report_dir / "miou_vs_k.png")
    lineage.client.log_artifact(result.mlflow_run_id, str(report_dir / "tables.md"), "report")
    lineage.client.log_artifact(result.mlflow_run_id, str(png), "report")
    for label, vals in main_rows:
        key = "".join(ch if ch.isalnum() else "_" for ch in label.split(" (")[0].split(",")[0]).strip("_")
        for col, v in vals.items():
            if v == v:
                lineage.client.log_metric(result.mlflow_run_id, f"luss_table.{key}.{col.replace(' ', '_').replace('β', 'beta')}", v)
    (report_dir / "summary.json").write_text(json.dumps(
        {"run": result.run, "mlflow_run_id": result.mlflow_run_id, "k": cfg.luss.k, "table": dict(main_rows),
         "other_protocols": dict(others), "miou_vs_k": {m: {str(k): v for k, v in c.items()} for m, c in curves.items()},
         "labels": labels}, indent=2))
    return "\n".join([body, "", f"plot: {png}", f"report folder: {report_dir}"])
