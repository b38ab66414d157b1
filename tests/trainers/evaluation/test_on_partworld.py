"""The metrics on PartWorld evaluation records: perfect predictions score 1, the strip baseline sits in between."""
from __future__ import annotations

import numpy as np
import pytest

from trainers.data.partworld import PartWorldConfig, render_sample
from trainers.evaluation import PartClusteringEvaluator, PartProposalRecall, gt_label_maps, strip_baseline

CFG = PartWorldConfig(image_size=64, num_classes=4, num_part_types=8, train_images=4, eval_images=6,
                      min_object_area=32)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [render_sample(CFG, "eval", i)[2] for i in range(CFG.eval_images)]


def test_gt_parts_as_proposals_recall_every_part(records):
    ev = PartProposalRecall(max_dets=(200,))
    for r in records:
        ev.process(r, [{"segmentation": p["segmentation"], "score": 1.0} for p in r["parts"]])
    res = ev.evaluate()
    assert res["num_parts"] == sum(len(r["parts"]) for r in records) > 0
    assert res["AR@200"] == 1.0


def test_strip_baseline_recalls_some_but_not_all_parts(records):
    ev = PartProposalRecall(max_dets=(1, 10, 200))
    for rec, props in strip_baseline(records, k=4):
        ev.process(rec, props)
    res = ev.evaluate()
    assert 0.0 < res["AR@200"] < 1.0
    assert res["AR@1"] <= res["AR@10"] <= res["AR@200"]


def test_gt_part_categories_as_clusters_score_one(records):
    ev = PartClusteringEvaluator()
    for r in records:
        _, part = gt_label_maps(r)
        ev.process(r, np.where(part >= 0, part + 5, -1))  # relabelled: ids need not match
    res = ev.evaluate()
    assert res["num_classes"] >= 1
    assert res["nmi"] == pytest.approx(1.0) and res["ari"] == pytest.approx(1.0)
    assert res["miou"] == pytest.approx(1.0) and res["miou_hungarian"] == pytest.approx(1.0)
