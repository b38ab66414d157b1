"""CaSP's pseudo-labels: score > delta only, images without one dropped, an empty set named with delta and the scores;
late pretraining refuses ground truth; alpha(.) and the class-head init; the evaluating stage's COCO results files."""
from __future__ import annotations

import json

import pytest
import torch

from contract.stages import ParamsError
from contract.stages.detect_pseudo_label import DEFINITION
from contract.stages.evaluate_instances import DEFINITION as EVALUATE
from contract.stages.instance_teacher import DEFINITION as TEACHER
from trainers.data import shards
from trainers.data.pseudo_labels import (
    EmptyPseudoLabels,
    GroundTruthInPseudoLabels,
    PseudoLabelCounts,
    alpha,
    augment,
    empty_message,
    mask_nms,
    pseudo_label_targets,
    pseudo_labels,
    training_targets,
)
from trainers.models.segmenter import InstancePredictions

from stage_helpers import TINY_MODEL, stage_spec, tiny_segmenter_file, write_world64


def _pred(scores, labels=None, size=8):
    n = len(scores)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        masks[i, i % size, :] = True
    return InstancePredictions(scores=torch.tensor(scores), labels=torch.tensor(labels or [0] * n), masks=masks,
                               query_features=torch.zeros(n, 4), query_indices=torch.arange(n))


@pytest.mark.parametrize("definition,key", [(DEFINITION, "detla"), (EVALUATE, "score_treshold"), (TEACHER, "class_agnositc")])
def test_misspelt_params_are_rejected_naming_the_allowed_keys(definition, key):
    with pytest.raises(ParamsError, match=f"{key}: unknown key"):
        definition.parse({key: 1})


def test_default_delta_is_the_papers():
    assert DEFINITION.parse({}).delta == 0.2


def test_only_predictions_scoring_above_delta_are_kept():
    out = pseudo_labels(_pred([0.9, 0.2, 0.21, 0.1]), 0.2, None)
    assert [round(p["score"], 2) for p in out] == [0.9, 0.21]  # 0.2 is not > 0.2
    assert all(p["label"] == 0 and "category_id" not in p for p in out)
    specific = pseudo_labels(_pred([0.9, 0.5], labels=[1, 0]), 0.2, {0: 7, 1: 9})
    assert [p["category_id"] for p in specific] == [9, 7]


def _masks(*rows_cols, size=10):
    """One mask per (r0, r1, c0, c1) rectangle."""
    out = torch.zeros(len(rows_cols), size, size, dtype=torch.bool)
    for i, (r0, r1, c0, c1) in enumerate(rows_cols):
        out[i, r0:r1, c0:c1] = True
    return out


def test_mask_nms_drops_a_prediction_overlapping_a_better_one_of_its_class_above_the_iou():
    # 0 and 1: IoU 80/100 = 0.8; 0 and 2: 40/100 = 0.4; 3 is empty
    masks = _masks((0, 10, 0, 10), (0, 8, 0, 10), (0, 10, 0, 4), (0, 0, 0, 0))
    scores = torch.tensor([0.5, 0.9, 0.4, 0.3])
    one_class = torch.zeros(4, dtype=torch.int64)
    # 1 (best) suppresses 0 (IoU 0.8 > 0.6); 2 overlaps 1 by 32/(80+40-32) = 0.36: kept; the empty mask overlaps nothing
    assert mask_nms(masks, scores, one_class, 0.6).tolist() == [1, 2, 3]
    assert mask_nms(masks, scores, one_class, 0.3).tolist() == [1, 3]  # 0.36 > 0.3 now
    assert mask_nms(masks, scores, one_class, 0.8).tolist() == [1, 0, 2, 3]  # IoU 0.8 is not > 0.8
    # per class: a better prediction of another class suppresses nothing
    assert mask_nms(masks, scores, torch.tensor([0, 1, 1, 0]), 0.6).tolist() == [1, 0, 2, 3]
    assert mask_nms(masks[:0], scores[:0], one_class[:0], 0.6).tolist() == []


def test_pseudo_labels_apply_the_nms_before_delta_and_count_what_it_removed():
    masks = _masks((0, 10, 0, 10), (0, 9, 0, 10), (0, 10, 0, 3))
    pred = InstancePredictions(scores=torch.tensor([0.9, 0.8, 0.1]), labels=torch.zeros(3, dtype=torch.int64), masks=masks,
                               query_features=torch.zeros(3, 4), query_indices=torch.arange(3))
    counts = PseudoLabelCounts()
    out = pseudo_labels(pred, 0.2, None, nms_iou=0.6, counts=counts)
    assert [round(p["score"], 2) for p in out] == [0.9] and counts.suppressed == 1  # 0.1 is below delta, not suppressed
    assert len(pseudo_labels(pred, 0.2, None, nms_iou=None)) == 2
    # class-specific: the duplicate under another class is kept (FCOS's NMS is per class)
    pred.labels[1] = 1
    assert [p["category_id"] for p in pseudo_labels(pred, 0.2, {0: 7, 1: 9}, nms_iou=0.6)] == [7, 9]
    assert DEFINITION.parse({}).nms_iou == 0.6 and DEFINITION.parse({"nms_iou": None}).nms_iou is None
    with pytest.raises(ParamsError, match="nms_iou"):
        DEFINITION.parse({"nms_iou": 0})


def test_an_empty_set_names_delta_and_the_score_distribution():
    counts = PseudoLabelCounts(images=3)
    counts.count_scores(torch.tensor([0.05, 0.12, 0.15]))
    msg = empty_message(0.2, counts)
    assert "delta=0.2" in msg and "3 image(s)" in msg and "[0.0,0.1): 1" in msg and "[0.1,0.2): 2" in msg
    assert "lower delta below 0.2" in msg


def test_alpha_maps_every_class_to_one_object_and_pseudo_label_targets_refuse_ground_truth():
    assert alpha({3: 0, 5: 1}) == {3: 0, 5: 0}
    rle = pseudo_labels(_pred([0.9]), 0.2, None)[0]["segmentation"]
    record = {"image_id": 1, "height": 8, "width": 8, "objects": [], "proposals": [{"segmentation": rle, "category_id": 5}]}
    assert pseudo_label_targets(record, None)["labels"].tolist() == [0]
    assert training_targets("pseudo_labels", {3: 0, 5: 1}, False)(record)["labels"].tolist() == [1]
    gt = {**record, "objects": [{"category_id": 5, "segmentation": rle}]}
    with pytest.raises(GroundTruthInPseudoLabels, match="ground-truth object"):
        pseudo_label_targets(gt, None)
    assert training_targets("objects", {3: 0, 5: 1}, True)(gt)["labels"].tolist() == [0]


def test_augment_is_seeded_by_key_and_none_is_the_identity():
    image = (torch.arange(8 * 8 * 3) % 255).to(torch.uint8).reshape(8, 8, 3).numpy()
    assert augment(image, "a", "none") is image
    assert (augment(image, "a", "jitter", 1) == augment(image, "a", "jitter", 1)).all()


def test_the_class_head_starts_from_the_agnostic_channel_or_at_random():
    from trainers.models.config import DecoderConfig, EncoderConfig, SegmenterConfig
    from trainers.models.init import init_from
    from trainers.models.segmenter import Segmenter

    def model(classes, seed):
        torch.manual_seed(seed)
        return Segmenter(SegmenterConfig(encoder=EncoderConfig(**TINY_MODEL["encoder"]),
                                         decoder=DecoderConfig(num_classes=classes, **TINY_MODEL["decoder"])))

    source = model(1, 0).state_dict()
    agnostic = model(3, 1)
    init_from(agnostic, source, "agnostic")
    w = agnostic.state_dict()
    key = next(k for k in w if k.endswith("class_embed.weight"))
    assert all(torch.equal(w[key][c], source[key][0]) for c in range(3)) and torch.equal(w[key][3], source[key][1])
    random = model(3, 1)
    before = random.state_dict()[key].clone()
    init_from(random, source, "random")
    assert torch.equal(random.state_dict()[key], before)
    enc = next(k for k in w if "encoder" in k)
    assert torch.equal(random.state_dict()[enc], source[enc])


def test_init_parts_copy_only_the_parts_named_the_rest_keeps_its_random_init():
    """CaSP Table 10: backbone, neck (pixel decoder) and head (transformer decoder) transfer one by one."""
    from trainers.models.config import DecoderConfig, EncoderConfig, SegmenterConfig
    from trainers.models.init import PARTS, init_from, part_of
    from trainers.models.segmenter import Segmenter

    def model(classes, seed):
        torch.manual_seed(seed)
        return Segmenter(SegmenterConfig(encoder=EncoderConfig(**TINY_MODEL["encoder"]),
                                         decoder=DecoderConfig(num_classes=classes, **TINY_MODEL["decoder"])))

    source = model(1, 0).state_dict()
    target = model(3, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    counts = init_from(target, source, "random", ["backbone"])
    after = target.state_dict()
    parts = {part_of(k) for k in after}
    assert set(PARTS) <= parts  # every named part has weights in this model
    for k, v in after.items():
        changed = not torch.equal(v, before[k])
        if part_of(k) == "backbone" and v.is_floating_point() and v.numel() > 1:
            assert torch.equal(v, source[k])
        elif part_of(k) in ("neck", "head") and v.is_floating_point() and v.numel() > 1:
            assert torch.equal(v, before[k]) and not changed
    assert counts["kept_random"] == sum(part_of(k) in ("neck", "head") for k in after if k in source)
    assert counts["copied"] == sum(part_of(k) == "backbone" for k in after)
    with pytest.raises(ValueError, match="unknown init part"):
        init_from(model(3, 1), source, "random", ["classifier"])


def test_labeling_keeps_scores_above_delta_drops_empty_images_and_never_copies_ground_truth(tmp_path, one_rank):
    from trainers.stages.detect_pseudo_label import run

    images = write_world64(tmp_path / "images", "train", 6, shard_size=6)
    detector = tiny_segmenter_file(tmp_path / "det.pt", num_classes=1)
    spec = stage_spec("detect-pseudo-label", tmp_path / "work", datasets={"images": images}, models={"detector": detector},
                      dataset_out=tmp_path / "pseudo", nproc=1, params={"delta": 0.0, "augment": "flip"})
    res = run(spec)
    records = [r for _, _, r in shards.iter_samples(tmp_path / "pseudo")]
    assert res.metrics["pseudo/images"] == 6 and res.metrics["pseudo/gt_objects_dropped"] > 0
    assert len(records) == 6 - res.metrics["pseudo/images_without_labels"] and records
    assert all(r["objects"] == [] and r["proposals"] for r in records)
    assert sum(len(r["proposals"]) for r in records) == res.metrics["pseudo/labels"]
    assert res.metrics["pseudo/predictions"] == sum(res.metrics[f"pseudo/score_{i}"] for i in range(10))


def test_an_empty_pseudo_label_set_is_an_error_naming_delta(tmp_path, one_rank):
    from trainers.stages.detect_pseudo_label import run

    images = write_world64(tmp_path / "images", "train", 4, shard_size=4)
    spec = stage_spec("detect-pseudo-label", tmp_path / "work", datasets={"images": images},
                      models={"detector": tiny_segmenter_file(tmp_path / "det.pt", num_classes=1)},
                      dataset_out=tmp_path / "pseudo", nproc=1, params={"delta": 0.99})
    with pytest.raises(EmptyPseudoLabels, match=r"delta=0.99 on any of 4 image\(s\).*score distribution: \["):
        run(spec)


def test_evaluation_writes_coco_results_and_counts_images_without_predictions(tmp_path, one_rank):
    from trainers.stages.evaluate_instances import run

    data = write_world64(tmp_path / "eval", "eval", 5, shard_size=5)
    spec = stage_spec("evaluate-instances", tmp_path / "work", datasets={"eval": data},
                      models={"candidate": tiny_segmenter_file(tmp_path / "m.pt")}, dataset_out=tmp_path / "preds",
                      nproc=1)
    m = run(spec).metrics
    assert {"eval/mask_AP", "eval/mask_AP_agnostic", "eval/mask_AP50_agnostic"} <= set(m)
    doc = json.loads((tmp_path / "preds" / "images.json").read_text())
    res = json.loads((tmp_path / "preds" / "results.json").read_text())
    assert len(doc["images"]) == 5 and len(res) == m["eval/predictions"] > 0
    assert {r["image_id"] for r in res} <= {im["id"] for im in doc["images"]}
    assert m["eval/images_without_predictions"] == 0

    spec.params = {"score_threshold": 0.99}
    spec.outputs.dataset = str(tmp_path / "preds2")
    m = run(spec).metrics
    assert m["eval/images_without_predictions"] == 5 and m["eval/mask_AP"] == 0.0
    assert json.loads((tmp_path / "preds2" / "results.json").read_text()) == []


def test_an_imported_image_folder_is_an_unlabeled_split(tmp_path, one_rank):
    """Item 3: an image folder (`selftrain data import folder`) serves as D^u: class-agnostic pseudo-labels are written;
    class-specific ones need the labeled split's categories, which a folder has none of (a named error)."""
    from PIL import Image

    from pipelines.data import import_folder
    from trainers.stages.detect_pseudo_label import run

    folder = tmp_path / "photos"
    folder.mkdir()
    for key, image, _ in shards.iter_samples(write_world64(tmp_path / "w", "train", 4, shard_size=4)):
        Image.fromarray(image).save(folder / f"{key}.png")
    import_folder(folder, tmp_path / "unlabeled", progress=False)
    detector = tiny_segmenter_file(tmp_path / "det.pt", num_classes=1)
    spec = stage_spec("detect-pseudo-label", tmp_path / "work", datasets={"images": tmp_path / "unlabeled"},
                      models={"detector": detector}, dataset_out=tmp_path / "pseudo", nproc=1, params={"delta": 0.0})
    res = run(spec)
    assert res.metrics["pseudo/images"] == 4 and res.metrics["pseudo/labels"] > 0
    assert all(r["proposals"] and "category_id" not in r["proposals"][0] for _, _, r in shards.iter_samples(tmp_path / "pseudo"))
    specific = stage_spec("detect-pseudo-label", tmp_path / "work2", datasets={"images": tmp_path / "unlabeled"},
                          models={"detector": detector}, dataset_out=tmp_path / "pseudo2", nproc=1,
                          params={"delta": 0.0, "class_agnostic": False})
    from trainers.inputs import StageInputError

    with pytest.raises(StageInputError, match="has no categories"):
        run(specific)
