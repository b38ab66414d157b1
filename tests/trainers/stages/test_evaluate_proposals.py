"""Stage ``evaluate-proposals``: part AR@k of stored proposals, a part model or the strip baseline."""
from __future__ import annotations

import pytest
from mlflow.utils.validation import _validate_metric_name

from runtime_helpers import run_stage
from stage_helpers import result, stage_spec, tiny_segmenter_file, write_proposals_dataset, write_world64
from trainers.data import shards
from trainers.evaluation import PartProposalRecall, coco_proposal_ar, strip_baseline
from trainers.evaluation.proposals import score_proposal_results
from trainers.stages.evaluate_proposals import run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalprop")
    return {"eval": write_world64(root / "eval", "eval", 8, shard_size=4),
            "gt_parts": write_proposals_dataset(root / "gt-parts", 8, shard_size=3),
            "model": tiny_segmenter_file(root / "parts.pt", num_classes=1)}


def evaluate(tmp_path, data, datasets=None, models=None, **params):
    spec = stage_spec("evaluate-proposals", tmp_path / "work", datasets={"eval": data["eval"], **(datasets or {})},
                      models=models, nproc=1, params=params, dataset_out=tmp_path / "predictions")
    return run(spec).metrics


def test_ground_truth_parts_as_proposals_score_recall_one(tmp_path, data, one_rank):
    m = evaluate(tmp_path, data, datasets={"proposals": data["gt_parts"]})
    for k in (10, 50, 100, 200):
        assert m[f"eval/AR_{k}"] == pytest.approx(1.0)
    assert m["eval/coco_AR_10"] == pytest.approx(1.0) and m["eval/coco_AP"] == pytest.approx(1.0)
    assert 0 < m["eval/AR_1"] < 1 and m["eval/images_without_proposals"] == 0


def test_strip_baseline_matches_the_evaluation_library(tmp_path, data, one_rank):
    m = evaluate(tmp_path, data, baseline="strips", k=4)
    records = [r for _, _, r in shards.iter_samples(data["eval"], decode=False, allow_parts=True)]
    recall = PartProposalRecall()
    pairs = list(strip_baseline(records, k=4))
    for record, props in pairs:
        recall.process(record, props)
    expected = recall.evaluate()
    coco = coco_proposal_ar([r for r, _ in pairs], [p for _, p in pairs])
    for k in (1, 10, 50, 100, 200):
        assert m[f"eval/AR_{k}"] == pytest.approx(expected[f"AR@{k}"])
    for k in (1, 10, 100):
        assert m[f"eval/coco_AR_{k}"] == pytest.approx(coco[f"coco/AR@{k}"])
    assert m["eval/num_parts"] == expected["num_parts"] > 0


def test_a_part_model_is_run_on_the_eval_images(tmp_path, data, one_rank):
    m = evaluate(tmp_path, data, models={"parts": data["model"]}, top_k=5)
    assert m["eval/num_images"] == 8 and 0 < m["eval/proposals_per_image"] <= 5
    assert 0 <= m["eval/AR_200"] <= 1


def test_metric_keys_are_valid_mlflow_metric_names(tmp_path, data, one_rank):
    m = evaluate(tmp_path, data, baseline="strips")
    assert "eval/AR_10" in m
    for key in m:
        _validate_metric_name(key)  # raises on '@' and other characters MLflow refuses


def test_images_missing_from_the_proposals_dataset_count_their_parts_as_missed(tmp_path, data, one_rank):
    def keep_first_four():
        for i, sample in enumerate(shards.iter_samples(data["gt_parts"], decode=False)):
            if i < 4:
                yield sample

    partial = tmp_path / "partial"
    shards.write_dataset(keep_first_four(), partial, name="partial", split="train",
                         categories=shards.DatasetIndex.load(data["gt_parts"]).categories)
    m = evaluate(tmp_path, data, datasets={"proposals": partial})
    assert m["eval/images_without_proposals"] == 4 and m["eval/AR_200"] < 1


def test_exactly_one_source_of_proposals(tmp_path, data, one_rank):
    with pytest.raises(ValueError, match="exactly one source"):
        evaluate(tmp_path, data)
    with pytest.raises(ValueError, match="exactly one source"):
        evaluate(tmp_path, data, datasets={"proposals": data["gt_parts"]}, baseline="strips")


@pytest.mark.slow
def test_two_ranks_report_the_same_figures_as_one(tmp_path, data):
    figures = {}
    for nproc in (1, 2):
        spec = stage_spec("evaluate-proposals", tmp_path / f"w{nproc}", datasets={"eval": data["eval"]}, nproc=nproc,
                          params={"baseline": "strips"}, dataset_out=tmp_path / f"predictions{nproc}")
        run_stage(spec, nproc=nproc)
        figures[nproc] = result(tmp_path / f"w{nproc}")["metrics"]
    assert figures[1] == pytest.approx(figures[2])


@pytest.mark.parametrize("source", ["strips", "model"])
def test_the_written_proposals_file_rescores_to_the_reported_recall(tmp_path, data, one_rank, source):
    """Item 2 of the issue: AR@k is reproducible from proposals.json alone, with the same evaluator."""
    import json

    m = evaluate(tmp_path, data, baseline="strips") if source == "strips" else \
        evaluate(tmp_path, data, models={"parts": data["model"]}, top_k=5)
    out = tmp_path / "predictions"
    res = json.loads((out / "proposals.json").read_text())
    assert res and set(res[0]) == {"image_id", "category_id", "segmentation", "score"}
    rescored = score_proposal_results(data["eval"], out)
    assert rescored == {k: v for k, v in m.items() if k.startswith(("eval/AR_", "eval/R50_")) or k == "eval/num_parts"}


def test_the_pseudo_label_reference_reads_no_part_labels(tmp_path, data, one_rank):
    """The label-free criterion: recall of the teacher's pseudo-labels on held-out images without part labels."""
    from trainers.inputs import StageInputError

    with pytest.raises(StageInputError, match="has part labels"):
        evaluate(tmp_path, data, datasets={"proposals": data["gt_parts"]}, reference="pseudo_labels")
    m = evaluate(tmp_path, {"eval": data["gt_parts"]}, datasets={"proposals": data["gt_parts"]}, reference="pseudo_labels")
    assert m["eval/AR_10"] == pytest.approx(1.0) and m["eval/num_parts"] > 0
