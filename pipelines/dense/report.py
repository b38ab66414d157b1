"""The dense report: one table comparing every representation on the reported split, each learned one with its gain
over its backbone at random initialisation (the issue's acceptance: it must be positive on Hungarian mIoU)."""
from __future__ import annotations

import json
from typing import Any

from pipelines.dense import graph
from pipelines.dense.config import DenseConfig

COLUMNS = (("k-means mIoU", "eval/kmeans/miou"), ("k-means pAcc", "eval/kmeans/pixel_accuracy"),
           ("overclustering mIoU", "eval/overcluster/miou"), ("community mIoU", "eval/community/miou"),
           ("prototypes mIoU", "eval/prototypes/miou"), ("linear probe mIoU", "eval/probe/miou"))


def table(outcomes: list[Any], cfg: DenseConfig) -> list[tuple[str, dict[str, float]]]:
    """Rows of the comparison: the metrics of each row's eval-split stage, plus the k-means mIoU gain over random init."""
    by_name = {o.name: ((o.result or {}).get("metrics") or {}) for o in outcomes}
    nan = float("nan")
    out = []
    for label, stage, base in graph.rows(cfg):
        m = by_name.get(stage, {})
        row = {col: float(m.get(key, nan)) for col, key in COLUMNS}
        if base is not None:
            row["gain over random init (k-means mIoU)"] = row["k-means mIoU"] - float(by_name.get(base, {}).get("eval/kmeans/miou", nan))
        out.append((label, row))
    return out


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}"


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    cols = [c for c, _ in COLUMNS] + ["gain over random init (k-means mIoU)"]
    lines = ["| representation | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for label, vals in rows:
        lines.append(f"| {label} | " + " | ".join(_pct(vals.get(c, float("nan"))) for c in cols) + " |")
    return "\n".join(lines)


def write_report(cfg: DenseConfig, result: Any, lineage: Any) -> str:
    report_dir = cfg.run_dir(result.run) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = table(result.stages, cfg)
    text = (f"Dense representations on {cfg.dense.eval} (%, Hungarian matching unless noted; background is a category; "
            "overclustering: many-to-one)\n" + format_table(rows))
    (report_dir / "tables.md").write_text(text + "\n")
    (report_dir / "summary.json").write_text(json.dumps({"run": result.run, "mlflow_run_id": result.mlflow_run_id,
                                                        "table": {label: vals for label, vals in rows}}, indent=2))
    lineage.client.log_artifact(result.mlflow_run_id, str(report_dir / "tables.md"), "report")
    for label, vals in rows:
        key = "".join(ch if ch.isalnum() else "_" for ch in label)
        for col, v in vals.items():
            if v == v:
                lineage.client.log_metric(result.mlflow_run_id, f"dense.{key}.{''.join(ch if ch.isalnum() else '_' for ch in col)}", v)
    return "\n".join([text, "", f"report folder: {report_dir}"])
