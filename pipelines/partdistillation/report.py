"""The PartDistillation report: the stage-1 table (AR@k), the Table 3-shaped parts table, the metrics-by-round plot, purity grids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contract.io import atomic_open
from pipelines.partdistillation import graph
from pipelines.partdistillation.config import PartDistillationConfig

TABLE_COLUMNS = ("AR@1", "AR@10", "AR@100")
PART_COLUMNS = ("nmi", "ari", "miou", "miou_hungarian", "AR_200")

# -- tables ------------------------------------------------------------------------------------
def _metrics(outcomes: dict[str, Any], stage: str) -> dict[str, float]:
    o = outcomes.get(stage)
    return ((o.result or {}).get("metrics") or {}) if o else {}


def _metric(metrics: dict[str, Any], name: str) -> float:
    alt = name.replace("@", "_")
    for key in (name, f"eval/{name}", alt, f"eval/{alt}"):
        if key in metrics:
            return float(metrics[key])
    return float("nan")


def proposals_table(outcomes: list[Any], cfg: PartDistillationConfig) -> list[tuple[str, dict[str, float]]]:
    """Rows of the stage-1 table: naive strips, mined k-means, round 1..R (AR@1/10/100)."""
    by_name = {o.name: o for o in outcomes}
    rows = graph.proposal_rows(cfg)
    return [(label, {c: _metric(_metrics(by_name, stage), c) for c in TABLE_COLUMNS}) for label, stage in rows]


def parts_table(outcomes: list[Any], cfg: PartDistillationConfig) -> list[tuple[str, str, dict[str, float]]]:
    """Rows shaped like the paper's Table 3: method x GT object (with / without) -> NMI, ARI, mIoU, AR@200."""
    by_name = {o.name: o for o in outcomes}
    table = []
    for label, stage in graph.part_rows(cfg):
        m = _metrics(by_name, stage)
        for setting, gt in (("gt", "yes"), ("pred", "no")):
            vals = {c: float(m.get(f"eval/{setting}/{c}", float("nan"))) for c in PART_COLUMNS}
            if any(v == v for v in vals.values()):
                table.append((label, gt, vals))
    return table


def format_table(table: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown table (percent, one decimal, like the paper)."""
    lines = ["| proposals | " + " | ".join(TABLE_COLUMNS) + " |", "| --- |" + " ---: |" * len(TABLE_COLUMNS)]
    for label, vals in table:
        lines.append(f"| {label} | " + " | ".join(_pct(v) for v in vals.values()) + " |")
    return "\n".join(lines)


def format_parts_table(table: list[tuple[str, str, dict[str, float]]]) -> str:
    heads = ("NMI", "ARI", "mIoU (majority)", "mIoU (Hungarian)", "AR@200")
    lines = ["| method | GT object | " + " | ".join(heads) + " |", "| --- | --- |" + " ---: |" * len(heads)]
    for label, gt, vals in table:
        lines.append(f"| {label} | {gt} | " + " | ".join(_pct(v) for v in vals.values()) + " |")
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}"


def plot_rounds(outcomes: list[Any], cfg: PartDistillationConfig, out_png: Path) -> Path:
    """Every metric across rounds: proposal AR@k per stage-1 round, part metrics per stage-2 round (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pd = cfg.partdistillation
    by_name = {o.name: o for o in outcomes}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(1, pd.proposals.rounds + 1))
    for col in ("AR@1", "AR@10", "AR@100"):
        axes[0].plot(xs, [100 * _metric(_metrics(by_name, graph.proposals_evaluate(r)), col) for r in xs], marker="o", label=col)
        mined = _metric(_metrics(by_name, graph.MINED_EVALUATE), col)
        if mined == mined:
            axes[0].axhline(100 * mined, ls="--", lw=0.8, color=axes[0].lines[-1].get_color())
    axes[0].set(title="Part proposals (dashed: mined k-means)", xlabel="self-training round", ylabel="%")
    axes[0].set_xlim(0.5, pd.proposals.rounds + 0.5)
    axes[0].set_xticks(xs)
    axes[0].legend()
    if pd.ranking.enabled:
        xs2 = list(range(1, pd.ranking.rounds + 1))
        for c in ("nmi", "ari", "miou", "miou_hungarian", "AR_200"):
            axes[1].plot(xs2, [100 * _metrics(by_name, graph.ranker_evaluate(r)).get(f"eval/gt/{c}", float("nan")) for r in xs2],
                         marker="o", label=c)
            one = _metrics(by_name, graph.one_stage_evaluate(pd.ranking.one_stage_rounds)).get(f"eval/gt/{c}")
            if one is not None:
                axes[1].axhline(100 * one, ls="--", lw=0.8, color=axes[1].lines[-1].get_color())
        axes[1].set(title="Class-specific parts, GT objects (dashed: one-stage)", xlabel="final self-training round", ylabel="%")
        axes[1].set_xlim(0.5, pd.ranking.rounds + 0.5)
        axes[1].set_xticks(xs2)
        axes[1].legend()
    else:
        axes[1].axis("off")
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out_png


def write_report(cfg: PartDistillationConfig, result: Any, lineage: Any) -> str:
    pd = cfg.partdistillation
    run_dir = cfg.run_dir(result.run)
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = ["Part proposals (class-agnostic AR, %, held-out part masks)\n" + format_table(proposals_table(result.stages, cfg))]
    ptable = parts_table(result.stages, cfg) if pd.ranking.enabled else []
    if ptable:
        sections.append("Class-specific parts (%, held-out part masks; Table 3 layout)\n" + format_parts_table(ptable))
    text = "\n\n".join(sections)
    (report_dir / "tables.md").write_text(text + "\n")
    png = plot_rounds(result.stages, cfg, report_dir / "metrics_by_round.png")
    lineage.client.log_artifact(result.mlflow_run_id, str(report_dir / "tables.md"), "report")
    lineage.client.log_artifact(result.mlflow_run_id, str(png), "report")
    for label, vals in proposals_table(result.stages, cfg):
        for col, v in vals.items():
            if v == v:
                lineage.client.log_metric(result.mlflow_run_id, f"proposals.{label.replace(' ', '_')}.{col.replace('@', '_')}", v)
    for label, gt, vals in ptable:
        for col, v in vals.items():
            if v == v:
                key = f"parts.{label.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}.{'gt' if gt == 'yes' else 'pred'}.{col}"
                lineage.client.log_metric(result.mlflow_run_id, key, v)
    lines = [text, "", f"plot: {png}"]
    if pd.ranking.enabled and pd.ranking.purity_grids:
        from pipelines import purity

        last = {o.name: o for o in result.stages}
        labels = Path(graph.final_part_labels(cfg, result.run))
        if graph.RANK_PARTS in last and labels.is_dir():
            index = purity.grids(labels, report_dir / "purity")
            lineage.client.log_artifacts(result.mlflow_run_id, str(report_dir / "purity"), "purity")
            lines.append(f"purity grids: {index}  (rate them, then: selftrain purity curve <ratings.csv> -o curve.png)")
    lines.append(f"report folder: {report_dir}")
    (report_dir / "summary.json").write_text(json.dumps({"run": result.run, "mlflow_run_id": result.mlflow_run_id}, indent=2))
    return "\n".join(lines)


