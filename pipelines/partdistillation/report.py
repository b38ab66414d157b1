"""The PartDistillation report: the stage-1 table (AR@k), the Table 3-shaped parts table, the metrics-by-round plot, purity grids."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from contract.io import atomic_open
from contract.spec import metric_keys
from pipelines.partdistillation import graph
from pipelines.partdistillation.config import PART_RANKER, PartDistillationConfig

PART_METRICS = ("nmi", "ari", "miou", "miou_hungarian")


def table_columns(cfg: PartDistillationConfig) -> tuple[str, ...]:
    """AR@1, AR@10 and AR@<query count>: no k above the part models' query count (graph.max_dets)."""
    ks = graph.max_dets(cfg)
    return tuple(f"AR@{k}" for k in sorted({k for k in ks if k in (1, 10)} | {ks[-1]}))


def part_columns(cfg: PartDistillationConfig) -> tuple[str, ...]:
    return (*PART_METRICS, f"AR_{graph.max_dets(cfg)[-1]}")

# -- tables ------------------------------------------------------------------------------------
def _metrics(outcomes: dict[str, Any], stage: str) -> dict[str, float]:
    o = outcomes.get(stage)
    return ((o.result or {}).get("metrics") or {}) if o else {}


def _metric(metrics: dict[str, Any], name: str) -> float:
    """``name`` (``AR@10``, ``AR_10`` or ``eval/AR_10``) in a stage's metrics; NaN when absent."""
    for key in metric_keys(name):
        if key in metrics:
            return float(metrics[key])
    return float("nan")


def proposals_table(outcomes: list[Any], cfg: PartDistillationConfig) -> list[tuple[str, dict[str, float]]]:
    """Rows of the stage-1 table: naive strips, mined k-means, round 1..R (AR@1/10/100)."""
    by_name = {o.name: o for o in outcomes}
    rows = graph.proposal_rows(cfg)
    return [(label, {c: _metric(_metrics(by_name, stage), c) for c in table_columns(cfg)}) for label, stage in rows]


def parts_table(outcomes: list[Any], cfg: PartDistillationConfig) -> list[tuple[str, str, dict[str, float]]]:
    """Rows shaped like the paper's Table 3: method x GT object (with / without) -> NMI, ARI, mIoU, AR@<queries>."""
    by_name = {o.name: o for o in outcomes}
    table = []
    for label, stage in graph.part_rows(cfg):
        m = _metrics(by_name, stage)
        for setting, gt in (("gt", "yes"), ("pred", "no")):
            vals = {c: float(m.get(f"eval/{setting}/{c}", float("nan"))) for c in part_columns(cfg)}
            if any(v == v for v in vals.values()):
                table.append((label, gt, vals))
    return table


def format_table(table: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown table (percent, one decimal, like the paper)."""
    cols = list(table[0][1]) if table else []
    lines = ["| proposals | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for label, vals in table:
        lines.append(f"| {label} | " + " | ".join(_pct(v) for v in vals.values()) + " |")
    return "\n".join(lines)


def format_parts_table(table: list[tuple[str, str, dict[str, float]]]) -> str:
    ar = [c for c in (table[0][2] if table else {}) if c.startswith("AR_")]
    heads = ("NMI", "ARI", "mIoU (majority)", "mIoU (Hungarian)", *(c.replace("_", "@") for c in ar))
    lines = ["| method | GT object | " + " | ".join(heads) + " |", "| --- | --- |" + " ---: |" * len(heads)]
    for label, gt, vals in table:
        lines.append(f"| {label} | {gt} | " + " | ".join(_pct(v) for v in vals.values()) + " |")
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}"


def selection_table(outcomes: list[Any], cfg: PartDistillationConfig) -> tuple[list[dict], list[str]]:
    """Per promoted model line and round: the selection metrics on val and (label-free) on the holdout images, and the
    round each criterion selects under the promotion rule (a round takes the alias when it beats the holder by more
    than promotion.min_delta), plus the reported eval metric. Returns (rows, one summary line per model line)."""
    by_name = {o.name: o for o in outcomes}
    rows, summary = [], []
    for line, model, rounds, name_of in graph.selection_rounds(cfg):
        picks = {split: picked_round(by_name, cfg, model, rounds, name_of, split) for split in graph.selection_splits(cfg)}
        reported = graph.selection_metric(cfg, model, "val")
        for r in range(1, rounds + 1):
            row = {"model": line, "round": r, "eval": _metric(_metrics(by_name, name_of(r)), reported)}
            for split in graph.selection_splits(cfg):
                row[split] = _metric(_metrics(by_name, name_of(r, split)), graph.selection_metric(cfg, model, split))
            rows.append(row)
        if len(picks) == 2:
            same = "the same round" if picks["val"] == picks["holdout"] else "different rounds"
            summary.append(f"{line}: val picks round {picks['val']}, label-free picks round {picks['holdout']} ({same})")
        else:
            (split, r), = picks.items()
            summary.append(f"{line}: {'val' if split == 'val' else 'label-free'} picks round {r}")
    return rows, summary


def picked_round(by_name: dict[str, Any], cfg: PartDistillationConfig, model: str, rounds: int, name_of,
                 split: str) -> int | None:
    """The round of ``model`` the selection evaluations on ``split`` pick under the promotion rule (a round takes the
    alias when it beats the holder by more than promotion.min_delta); None when none was measured."""
    pol, metric = cfg.promotion, graph.selection_metric(cfg, model, split)
    holder, best = None, None
    for r in range(1, rounds + 1):
        v = _metric(_metrics(by_name, name_of(r, split)), metric)
        if v != v:
            continue
        gain = None if best is None else (v - best if pol.direction == "max" else best - v)
        if gain is None or gain > pol.min_delta:
            holder, best = r, v
    return holder


def format_selection(rows: list[dict], cfg: PartDistillationConfig) -> str:
    splits = graph.selection_splits(cfg)
    head = {"val": "val (selection)", "holdout": "label-free (agreement, holdout)"}
    lines = ["| model | round | " + " | ".join(head[s] for s in splits) + " | eval (reported) |",
             "| --- | ---: |" + " ---: |" * (len(splits) + 1)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['round']} | " + " | ".join(_pct(row[s]) for s in splits) + f" | {_pct(row['eval'])} |")
    return "\n".join(lines)


def plot_rounds(outcomes: list[Any], cfg: PartDistillationConfig, out_png: Path) -> Path:
    """Every metric across rounds: proposal AR@k per stage-1 round, part metrics per stage-2 round (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pd = cfg.partdistillation
    by_name = {o.name: o for o in outcomes}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(1, pd.proposals.rounds + 1))
    for col in table_columns(cfg):
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
        for c in part_columns(cfg):
            axes[1].plot(xs2, [100 * _metrics(by_name, graph.ranker_evaluate(r)).get(f"eval/gt/{c}", float("nan")) for r in xs2],
                         marker="o", label=c)
            one = _metrics(by_name, graph.one_stage_evaluate(pd.one_stage_rounds)).get(f"eval/gt/{c}")
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


def _metric_name(label: str) -> str:
    """A table row label as part of an MLflow metric name (alphanumerics, '_', '-', '.')."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", label.replace(",", "").replace("(", "").replace(")", "")).strip("_")


def purity_grids(cfg: PartDistillationConfig, result: Any, out_dir: Path) -> tuple[Path, int] | None:
    """Purity grids (sec. 5.2) of the final model -- the ranker round the selection criterion picks (the last round when
    none was measured) -- drawn from its predictions on the held-out eval images with GT objects (its ``f<r>-evaluate``
    predictions folder), parts over half their object left out (sec. 5.4); (index.html, round), or None when that
    evaluation did not succeed."""
    from pipelines import purity

    pd = cfg.partdistillation
    by_name = {o.name: o for o in result.stages}
    r = picked_round(by_name, cfg, PART_RANKER, pd.ranking.rounds, graph.ranker_evaluate,
                     graph.selection_splits(cfg)[0]) or pd.ranking.rounds
    stage = graph.ranker_evaluate(r)
    folder = Path(graph.predictions_dir(cfg, result.run, stage))
    if not _metrics(by_name, stage) or not (folder / "images.json").is_file():
        return None
    return purity.grids(folder, out_dir, dataset=Path(cfg.paths.data) / pd.eval, setting="gt"), r


def write_report(cfg: PartDistillationConfig, result: Any, lineage: Any) -> str:
    pd = cfg.partdistillation
    run_dir = cfg.run_dir(result.run)
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = ["Part proposals (class-agnostic AR, %, held-out part masks)\n" + format_table(proposals_table(result.stages, cfg))]
    ptable = parts_table(result.stages, cfg) if pd.ranking.enabled else []
    if ptable:
        sections.append("Class-specific parts (%, held-out part masks; Table 3 layout)\n" + format_parts_table(ptable))
    srows, summary = selection_table(result.stages, cfg)
    metrics = ", ".join(sorted({f"{graph.selection_metric(cfg, m, s)} ({s})" for _, m, _, _ in graph.selection_rounds(cfg)
                                for s in graph.selection_splits(cfg)}))
    sections.append(f"Model selection (%, metrics: {metrics}; promotion: {pd.selection.criterion})\n"
                    + format_selection(srows, cfg) + "\n\n" + "\n".join(summary))
    text = "\n\n".join(sections)
    (report_dir / "tables.md").write_text(text + "\n")
    png = plot_rounds(result.stages, cfg, report_dir / "metrics_by_round.png")
    lineage.client.log_artifact(result.mlflow_run_id, str(report_dir / "tables.md"), "report")
    lineage.client.log_artifact(result.mlflow_run_id, str(png), "report")
    for label, vals in proposals_table(result.stages, cfg):
        for col, v in vals.items():
            if v == v:
                lineage.client.log_metric(result.mlflow_run_id, f"proposals.{_metric_name(label)}.{col.replace('@', '_')}", v)
    for label, gt, vals in ptable:
        for col, v in vals.items():
            if v == v:
                key = f"parts.{_metric_name(label)}.{'gt' if gt == 'yes' else 'pred'}.{col}"
                lineage.client.log_metric(result.mlflow_run_id, key, v)
    lines = [text, "", f"plot: {png}"]
    if pd.ranking.enabled and pd.ranking.purity_grids:
        grids = purity_grids(cfg, result, report_dir / "purity")
        if grids is not None:
            lineage.client.log_artifacts(result.mlflow_run_id, str(report_dir / "purity"), "purity")
            lines.append(f"purity grids of the final model (round {grids[1]}, eval split, GT objects): {grids[0]}  "
                         "(rate them, then: selftrain purity curve <ratings.csv> -o curve.png)")
    lines.append(f"report folder: {report_dir}")
    (report_dir / "summary.json").write_text(json.dumps({"run": result.run, "mlflow_run_id": result.mlflow_run_id,
                                                        "selection": srows, "selection_summary": summary}, indent=2))
    return "\n".join(lines)


