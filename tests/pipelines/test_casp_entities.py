"""CaSP with entity labels (sec. 3.3, Table 2 'Entities(P,A)'): casp.entities puts the class-agnostic chain and the
ground-truth baseline on things and stuff; the class-specific baseline, finetuning and every evaluation stay on
things; alpha 'identity' with entities is refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **casp):
    from pipelines.config import load_config

    cfg = yaml.safe_load((REPO / "configs" / "casp-demo.yaml").read_text())
    cfg["casp"].update(casp)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(tmp_path / "c.yaml")


def test_entities_reach_the_class_agnostic_chain_and_the_gt_baseline_only(tmp_path: Path) -> None:
    from pipelines.casp import graph

    cfg = _config(tmp_path, entities=True, delta_sweep=[0.1, 0.2],
                  baselines=["no_pretraining", "class_specific_pseudo_labels", "class_agnostic_gt"])
    specs = {s.name: s for s in cfg.stage_specs("e")}
    for name in (graph.EARLY, graph.LATE, "late-pretrain-delta10", graph.GT_PRETRAIN):
        assert specs[name].params["entities"] is True and specs[name].params["class_agnostic"] is True, name
    for name in (graph.PSEUDO, "pseudo-label-delta10"):
        assert specs[name].params["entities"] is True and specs[name].params["class_agnostic"] is True, name
    for name in (graph.FINETUNE, graph.NO_PRETRAINING, graph.SPECIFIC_PSEUDO, graph.SPECIFIC_PRETRAIN, graph.GT_FINETUNE):
        assert "entities" not in specs[name].params, name
    assert all("entities" not in s.params for s in specs.values() if s.stage == "evaluate-instances")
    rows = [label for label, _, _ in graph.table_rows(cfg)]
    assert rows == ["none (random init)", "Entities(G,A)", "Objects(P,S)", "Entities(P,A) = CaSP"]

    plain = {s.name: s for s in _config(tmp_path, entities=False).stage_specs("o")}
    assert all("entities" not in s.params for s in plain.values())


def test_entities_with_alpha_identity_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="entities: true needs alpha 'object'"):
        _config(tmp_path, entities=True, alpha="identity")
