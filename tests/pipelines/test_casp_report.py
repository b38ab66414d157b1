"""The CaSP report's selection table: the val-split figures each promotion read, with its decisions."""
from __future__ import annotations

from types import SimpleNamespace

from pipelines.casp import report
from pipelines.lineage import Decision


def test_the_selection_table_lists_every_val_stage_with_its_decisions_and_no_eval_stage() -> None:
    outcomes = [
        SimpleNamespace(name="late-pretrain-val", result={"metrics": {"eval/mask_AP_agnostic": 0.25}},
                        decisions=[Decision("teacher", False, "4", 0.25, "3", 0.3, "not better than the holder")]),
        SimpleNamespace(name="finetune-val", result={"metrics": {"eval/mask_AP_agnostic": 0.4, "eval/mask_AP": 0.125}},
                        decisions=[Decision("champion", True, "2", 0.4, None, None, "no holder")]),
        SimpleNamespace(name="finetune-eval", result={"metrics": {"eval/mask_AP_agnostic": 0.9}}, decisions=[]),
    ]
    rows = report.selection(outcomes)
    assert [r["stage"] for r in rows] == ["late-pretrain", "finetune"]
    text = report.format_selection(rows, "eval/mask_AP_agnostic")
    assert "| late-pretrain | 25.0 | - | teacher: kept (not better than the holder) |" in text
    assert "| finetune | 40.0 | 12.5 | champion: promoted (no holder) |" in text
    assert "90.0" not in text  # the reported split never enters the selection table
