"""The CaSP report: a table shaped like the paper's Table 2 (pretraining data -> pretrained and finetuned mask AP on the
reported split) and a bar plot of the finetuned models."""
from __future__ import annotations

from typing import Any

from contract.io import atomic_open, write_json
from pipelines.casp import graph
from pipelines.casp.config import CaspConfig, delta_tag

COLUMNS = ("pretrained AP^seg-a", "pretrained AP^seg", "finetuned AP^seg", "finetuned AP^seg-a")


def _metrics(by_name: dict[str, Any], stage: str | None) -> dict[str, float]:
    o = by_name.get(stage) if stage else None
    return ((o.result or {}).get("metrics") or {}) if o else {}


def table(outcomes: list[Any], cfg: CaspConfig) -> list[tuple[str, dict[str, float]]]:
    """Rows of Table 2 on the eval split: AP (class-agnostic, one category) of the pretrained model; class-specific AP
    of a class-specific pretrained model (Objects(P,S)); class-specific and class-agnostic AP after finetuning."""
    by_name = {o.name: o for o in outcomes}
    nan = float("nan")
    rows = []
    for label, pretrain, finetune in graph.table_rows(cfg):
        pre = _metrics(by_name, graph.eval_stage(pretrain)) if pretrain else {}
        fin = _metrics(by_name, graph.eval_stage(finetune))
        class_specific_pretrain = pretrain == graph.SPECIFIC_PRETRAIN or (pretrain == graph.LATE and cfg.casp.alpha == "identity")
        rows.append((label, {
            COLUMNS[0]: float(pre.get("eval/mask_AP_agnostic", nan)),
            COLUMNS[1]: float(pre.get("eval/mask_AP", nan)) if class_specific_pretrain else nan,
            COLUMNS[2]: float(fin.get("eval/mask_AP", nan)),
            COLUMNS[3]: float(fin.get("eval/mask_AP_agnostic", nan)),
        }))
    return rows


def sweep_table(outcomes: list[Any], cfg: CaspConfig) -> list[dict[str, float]]:
    """Table 7 rows: per delta, the pseudo-labels it kept and the late-pretrained model's AP^seg-a on the eval split."""
    by_name = {o.name: o for o in outcomes}
    nan = float("nan")
    rows = []
    for delta, pseudo, late in graph.sweep_stages(cfg):
        p, e = _metrics(by_name, pseudo), _metrics(by_name, graph.eval_stage(late))
        rows.append({"delta": delta, "pseudo-labels": float(p.get("pseudo/labels", nan)),
                     "images kept": float(p.get("pseudo/images", nan) - p.get("pseudo/images_without_labels", nan)),
                     "late-pretrain AP^seg-a": float(e.get("eval/mask_AP_agnostic", nan))})
    return rows


def format_sweep(rows: list[dict[str, float]]) -> str:
    lines = ["| score threshold (delta) | " + " | ".join(f"{r['delta']:g}" for r in rows) + " |",
             "| --- |" + " ---: |" * len(rows)]
    for key in ("pseudo-labels", "images kept"):
        lines.append(f"| {key} | " + " | ".join("-" if r[key] != r[key] else str(int(r[key])) for r in rows) + " |")
    lines.append("| late-pretraining AP^seg-a (%) | " + " | ".join(_pct(r["late-pretrain AP^seg-a"]) for r in rows) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, float]], out_png) -> Any:
    """Late-pretraining class-agnostic AP against delta (Table 7 as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["delta"] for r in rows], [100 * r["late-pretrain AP^seg-a"] for r in rows], marker="o")
    ax.set(xlabel="score threshold delta", ylabel="AP^seg-a (%)", title="Late pretraining vs delta (eval split)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out_png


def selection(outcomes: list[Any]) -> list[dict[str, Any]]:
    """The val-split figures the promotion read (every ``<stage>-val``): the stage, its class-agnostic and
    class-specific mask AP on val and each alias decision (promoted or kept, with the reason)."""
    nan = float("nan")
    out = []
    for o in outcomes:
        if not o.name.endswith("-val"):
            continue
        m = (o.result or {}).get("metrics") or {}
        out.append({"stage": o.name[: -len("-val")], "AP^seg-a": float(m.get("eval/mask_AP_agnostic", nan)),
                    "AP^seg": float(m.get("eval/mask_AP", nan)),
                    "decisions": [f"{d.alias}: {'promoted' if d.promoted else 'kept'} ({d.reason})"
                                  for d in getattr(o, "decisions", None) or []]})
    return out


def format_selection(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"Selection on the val split (promotion reads {metric} there, never the eval split)",
             "| model | val AP^seg-a | val AP^seg | decision |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['stage']} | {_pct(r['AP^seg-a'])} | {_pct(r['AP^seg'])} | {'; '.join(r['decisions']) or '-'} |")
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}"


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = ["| pretraining data | " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for label, vals in rows:
        lines.append(f"| {label} | " + " | ".join(_pct(v) for v in vals.values()) + " |")
    return "\n".join(lines)


def plot(rows: list[tuple[str, dict[str, float]]], out_png) -> Any:
    """Finetuned mask AP (class-specific and class-agnostic) per pretraining choice (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(rows))
    for j, col in enumerate(COLUMNS[2:]):
        ax.bar([x + (j - 0.5) * 0.38 for x in xs], [100 * (v[col] if v[col] == v[col] else 0) for _, v in rows], 0.38, label=col)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r[0] for r in rows], fontsize=8)
    ax.set(ylabel="mask AP (%)", title="Finetuned on the labeled split, eval split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out_png


def write_report(cfg: CaspConfig, result: Any, lineage: Any) -> str:
    report_dir = cfg.run_dir(result.run) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = table(result.stages, cfg)
    by_name = {o.name: o for o in result.stages}
    early = _metrics(by_name, graph.EARLY)
    text = "CaSP, Table 2 layout (mask AP %, eval split; pretraining models scored class-agnostic over one category)\n" + format_table(rows)
    if "eval/mask_AP_agnostic" in early:
        text += f"\n\nlabeling detector h_L: class-agnostic AP {_pct(early['eval/mask_AP_agnostic'])} on the val split"
    pseudo = _metrics(by_name, graph.PSEUDO)
    if pseudo:
        text += (f"\npseudo-labels (delta={cfg.casp.delta:g}): {int(pseudo.get('pseudo/labels', 0))} on "
                 f"{int(pseudo.get('pseudo/images', 0) - pseudo.get('pseudo/images_without_labels', 0))} of "
                 f"{int(pseudo.get('pseudo/images', 0))} images ({int(pseudo.get('pseudo/images_without_labels', 0))} without one, dropped)")
    chosen = selection(result.stages)
    if chosen:
        text += "\n\n" + format_selection(chosen, cfg.casp.evaluation.promotion_metric)
    sweep = sweep_table(result.stages, cfg) if cfg.casp.delta_sweep else []
    if sweep:
        text += "\n\nTable 7 layout (late pretraining on the pseudo-labels of each delta, eval split)\n" + format_sweep(sweep)
    with atomic_open(report_dir / "tables.md", "w") as f:
        f.write(text + "\n")
    png = plot(rows, report_dir / "table2.png")
    lineage.client.log_artifact(result.mlflow_run_id, str(report_dir / "tables.md"), "report")
    lineage.client.log_artifact(result.mlflow_run_id, str(png), "report")
    if sweep:
        sweep_png = plot_sweep(sweep, report_dir / "table7.png")
        lineage.client.log_artifact(result.mlflow_run_id, str(sweep_png), "report")
        for r in sweep:
            if r["late-pretrain AP^seg-a"] == r["late-pretrain AP^seg-a"]:
                lineage.client.log_metric(result.mlflow_run_id, f"table7.{delta_tag(r['delta'])}.late_pretrain_APseg-a",
                                          r["late-pretrain AP^seg-a"])
    for label, vals in rows:
        key = label.split(" ")[0].replace("(", "_").replace(")", "").replace(",", "")
        for col, v in vals.items():
            if v == v:
                lineage.client.log_metric(result.mlflow_run_id, f"table2.{key}.{col.replace(' ', '_').replace('^', '')}", v)
    write_json(report_dir / "summary.json", {"run": result.run, "mlflow_run_id": result.mlflow_run_id,
                                             "table2": {label: vals for label, vals in rows}, "table7": sweep,
                                             "selection": chosen})
    plots = f"plots: {png}, {report_dir / 'table7.png'}" if sweep else f"plot: {png}"
    return "\n".join([text, "", plots, f"report folder: {report_dir}"])
