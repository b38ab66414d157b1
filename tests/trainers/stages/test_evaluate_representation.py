"""Stage ``evaluate-representation`` on a 64 px PartWorld: every metric of the protocol, the concept page, bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from trainers.dense.backbone import DenseBackbone
from trainers.dense.heads import Projector
from trainers.dense.io import save_representation
from trainers.inputs import StageInputError

from stage_helpers import stage_spec, write_world64

FAST = {"fit_pixels": 2000, "probe_pixels": 2000, "probe_epochs": 20, "overcluster_k": 8, "concepts_top_k": 3, "batch_size": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world64")
    return {"probe": write_world64(root / "train", "train", 16), "eval": write_world64(root / "eval", "eval", 12)}


def _representation_file(path):
    torch.manual_seed(0)
    bb = DenseBackbone("test_convnext", {"output_stride": 8})
    proj = Projector(bb.dim, 32, 16, norm=True)
    return save_representation(path, "test_convnext", bb.model.state_dict(), "slotcon", extra={
        "model_kwargs": {"output_stride": 8}, "prototypes": torch.randn(4, 16), "projector": proj.state_dict(),
        "projector_config": proj.config})


def test_a_representation_file_gets_every_metric_and_a_concept_page(tmp_path, world, one_rank):
    from trainers.stages.evaluate_representation import run

    model = _representation_file(tmp_path / "model.pt")
    res = run(stage_spec("evaluate-representation", tmp_path / "w", datasets=world, models={"candidate": model},
                         params=FAST, nproc=1))
    m = res.metrics
    assert m["eval/images"] == 12 and m["eval/categories"] == 4  # 3 classes + background
    for name in ("kmeans", "overcluster", "community", "prototypes", "probe"):
        assert 0 < m[f"eval/{name}/miou"] <= 1 and 0 < m[f"eval/{name}/pixel_accuracy"] <= 1, name
    # many-to-one over 8 clusters can only match or beat one-to-one over 4 on pixel accuracy... of the same features
    assert m["eval/overcluster/pixel_accuracy"] >= m["eval/kmeans/pixel_accuracy"] - 0.05
    doc = json.loads((tmp_path / "w" / "evaluation.json").read_text())
    assert len(doc["details"]["prototypes"]["mapping"]) == 4 and doc["representation"] == "slotcon"
    page = (tmp_path / "w" / "concepts.html").read_text()
    assert page.count("<h3>prototype") == m["eval/prototypes/active"] and "data:image/png;base64," in page


def test_without_a_candidate_the_backbone_is_evaluated_at_random_init(tmp_path, world, one_rank):
    from trainers.stages.evaluate_representation import run

    params = {**FAST, "backbone": "test_convnext", "output_stride": 8, "concepts_top_k": 0}
    res = run(stage_spec("evaluate-representation", tmp_path / "w", datasets={"eval": world["eval"]}, params=params, nproc=1))
    assert "eval/prototypes/miou" not in res.metrics and "eval/probe/miou" not in res.metrics
    assert 0 < res.metrics["eval/kmeans/miou"] <= 1 and not (tmp_path / "w" / "concepts.html").exists()


def test_a_foreign_model_file_is_named_in_the_error(tmp_path, world, one_rank):
    from trainers.stages.evaluate_representation import run

    bad = tmp_path / "bad.pt"
    torch.save({"format": "selftrain.segmenter/v1"}, bad)
    with pytest.raises(StageInputError, match=r"inputs.models.candidate: .*bad.pt: format 'selftrain.segmenter/v1'"):
        run(stage_spec("evaluate-representation", tmp_path / "w", datasets={"eval": world["eval"]},
                       models={"candidate": bad}, params=FAST, nproc=1))
