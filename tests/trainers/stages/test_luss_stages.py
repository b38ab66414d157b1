"""The PASS/LUSS stages on a tiny backbone (training stages under torchrun, one rank; the others in this process): the
model file contract, label generation with its bad-input counts, fine-tuning that refuses ground truth, and the
evaluation's two passes agreeing with the files it writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime_helpers import run_stage
from stage_helpers import result, stage_spec, write_world64
from trainers.__main__ import run

TINY_REP = {"backbone": "test_convnext", "global_size": 64, "local_size": 32, "local_count": 1, "grid_size": 4,
            "num_prototypes": 8, "hidden_dim": 16, "feat_dim": 8, "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("luss")
    return {"root": root, "train": write_world64(root / "train", "train", 16), "eval": write_world64(root / "eval", "eval", 6)}


@pytest.fixture(scope="module")
def attention_file(world) -> Path:
    """A random-init representation with a random pixel-attention module (no training: the rules are what is tested)."""
    from trainers.luss.model import PixelAttention, RepresentationModel, save_model_file, sub_state

    torch.manual_seed(0)
    rep = RepresentationModel("test_convnext", 16, 8, 16, 8)
    att = PixelAttention(rep.backbone.out_channels)
    state = rep.state_dict()
    return save_model_file(world["root"] / "attention.pt", "test_convnext", sub_state(state, "backbone.net"),
                           stage="pixel-attention", output_stride=16,
                           extra={"pixel_attention": att.state_dict(), "upsample": 4,
                                  "config": {"feat_dim": 8, "hidden_dim": 16, "num_prototypes": 8},
                                  "heads": {"projection": sub_state(state, "projection"), "prototypes": sub_state(state, "prototypes")}})


@pytest.mark.slow
def test_represent_writes_the_agreed_representation_file(world):
    from trainers.dense.backbone import load_backbone
    from trainers.dense.io import read_representation
    from trainers.models.encoder import _check_fits, load_state_dict_source

    spec = stage_spec("represent", world["root"] / "rep", datasets={"train": world["train"]},
                      params={**TINY_REP, "steps": 2, "queue_length": 8}, nproc=1, micro=4)
    run_stage(spec, nproc=1)
    r = result(world["root"] / "rep")
    assert r["steps"] == 2 and np.isfinite(r["metrics"]["train/swav"]) and "train/p2p" in r["metrics"] and "train/d2s" in r["metrics"]
    doc = read_representation(r["model_path"])
    assert doc["format"] == "selftrain-representation/1" and doc["timm_name"] == "test_convnext"
    assert doc["extra"]["model_kwargs"] == {"output_stride": 16} and "prototypes" in doc["extra"]["heads"]
    _check_fits("test_convnext", load_state_dict_source(r["model_path"]), r["model_path"])  # PartDistillation's encoder loads it
    assert load_backbone(doc)(torch.rand(1, 3, 64, 64)).shape == (1, 64, 4, 4)  # and the dense pipelines' backbone


def test_zero_steps_write_the_seeded_random_initialisation(world, one_rank):
    from trainers.dense.io import read_representation

    paths = []
    for name in ("init-a", "init-b"):
        run("represent", stage_spec("represent", world["root"] / name, params={**TINY_REP, "steps": 0, "seed": 3}, nproc=1))
        paths.append(result(world["root"] / name)["model_path"])
    a, b = (read_representation(p) for p in paths)
    assert a["extra"]["random_init"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_generate_labels_labels_every_image_drops_ground_truth_and_resumes(world, attention_file, one_rank):
    from trainers.data.shards import iter_samples
    from trainers.luss.labels import LabelRule

    out = world["root"] / "labels"
    spec = stage_spec("generate-labels", world["root"] / "gl", datasets={"images": world["train"]},
                      models={"model": attention_file}, params={"k": 3, "threshold": "otsu", "batch_size": 8, "shard_size": 8},
                      nproc=1, dataset_out=out)
    run("generate-labels", spec)
    m = result(world["root"] / "gl")["metrics"]
    records = [r for _, _, r in iter_samples(out)]
    assert len(records) == m["labels/images"] == 16 and m["labels/objects_dropped"] > 0
    assert all("objects" not in r for r in records)
    assert {p["label"] for r in records for p in r["proposals"]} <= {1, 2, 3}
    rule, centroids = LabelRule.load(out)
    assert centroids.shape == (3, 64) and rule.threshold == m["labels/threshold"]
    assert sum(rule.stats["cluster_sizes"]) == 16 and m["labels/clusters_without_rows"] == (np.array(rule.stats["cluster_sizes"]) == 0).sum()
    before = (out / "index.json").read_bytes()
    run("generate-labels", spec)  # the part is complete for this fingerprint: skipped, same bytes
    assert (out / "index.json").read_bytes() == before


def test_the_attention_polarity_is_decided_without_labels_by_the_border_prior_and_recorded_in_the_rule(world, attention_file, one_rank):
    from trainers.data.batches import images_to_tensor
    from trainers.data.shards import iter_samples
    from trainers.luss.labels import LabelRule, attention_histogram, border_contrast, features_and_attention
    from trainers.luss.model import PixelAttention, backbone_from, read_model_file

    doc = read_model_file(attention_file)
    backbone = backbone_from(doc).eval()
    att_model = PixelAttention(backbone.out_channels)
    att_model.load_state_dict(doc["extra"]["pixel_attention"])
    att_model.eval()
    images = images_to_tensor([im for _, im, _ in iter_samples(world["train"])][:10])
    _, att = features_and_attention(backbone, att_model, images, 4)
    expected = float(border_contrast(att).mean())  # the first 10 images: what auto reads with polarity_images 10
    rules = {}
    for polarity in ("auto", "as_trained", "flipped"):
        out = world["root"] / f"labels-{polarity}"
        run("generate-labels", stage_spec("generate-labels", world["root"] / f"gl-{polarity}", datasets={"images": world["train"]},
                                          models={"model": attention_file}, nproc=1, dataset_out=out,
                                          params={"k": 2, "threshold": "otsu", "batch_size": 4, "polarity": polarity,
                                                  "polarity_images": 10}))
        rules[polarity] = (LabelRule.load(out)[0], result(world["root"] / f"gl-{polarity}")["metrics"])
    rule, m = rules["auto"]
    assert m["labels/border_contrast"] == pytest.approx(expected, abs=1e-6)
    assert rule.attention_flipped == (expected < 0) == bool(m["labels/attention_flipped"])
    assert not rules["as_trained"][0].attention_flipped and rules["flipped"][0].attention_flipped
    # the flipped rule saw 1 - a everywhere: its attention histogram over all 16 images is the mirror image
    full = images_to_tensor([im for _, im, _ in iter_samples(world["train"])])
    _, att_all = features_and_attention(backbone, att_model, full, 4)
    assert rules["as_trained"][0].stats["attention_histogram"] == attention_histogram(att_all, 256).tolist()
    assert rules["flipped"][0].stats["attention_histogram"] == attention_histogram(1 - att_all, 256).tolist()


def test_an_all_other_image_is_kept_and_counted(world, attention_file, one_rank):
    from trainers.data.shards import iter_samples

    out = world["root"] / "labels-all-other"
    spec = stage_spec("generate-labels", world["root"] / "gl-other", datasets={"images": world["train"]},
                      models={"model": attention_file}, params={"k": 2, "threshold": 1.0, "batch_size": 8},
                      nproc=1, dataset_out=out)
    run("generate-labels", spec)
    m = result(world["root"] / "gl-other")["metrics"]
    assert m["labels/images_all_other"] == 16 and m["labels/proposals"] == 0 and m["labels/other_fraction"] == 1.0
    assert [r["proposals"] for _, _, r in iter_samples(out)] == [[]] * 16


def test_finetuning_refuses_a_generated_labels_record_with_ground_truth(world):
    from trainers.data import shards
    from trainers.stages.finetune_segmentation import SegmentationSample

    key, image, record = next(shards.iter_samples(world["train"]))
    assert record["objects"]
    sample = SegmentationSample("generated", {}, 32, (0.5, 1.0), 0.5)
    with pytest.raises(ValueError, match=f"sample {key}: ground-truth objects in a generated-labels dataset"):
        sample((key, image, {**record, "proposals": []}))
    img, labels = sample((key, image, {**record, "objects": [], "proposals": []}))
    assert img.shape == (3, 32, 32) and labels.shape == (32, 32) and int(labels.max()) == 0  # no proposal: all 'other'


@pytest.mark.slow
def test_finetune_then_evaluate_scores_the_files_it_writes(world, attention_file, one_rank):
    from trainers.data import shards
    from trainers.data.imagenet_s import IGNORE_LABEL, class_indices, decode_label_png, semantic_map
    from trainers.evaluation.semantic import LussScores, apply_mapping

    run_stage(stage_spec("finetune-segmentation", world["root"] / "ft", datasets={"train": world["root"] / "labels"},
                         models={"representation": attention_file},
                         params={"steps": 2, "crop_size": 64, "checkpoint_every": 1000}, nproc=1, micro=4), nproc=1)
    ft = result(world["root"] / "ft")
    assert ft["steps"] == 2 and np.isfinite(ft["metrics"]["train/loss"])
    out = world["root"] / "pred"
    run("evaluate-segmentation", stage_spec("evaluate-segmentation", world["root"] / "ev", datasets={"eval": world["eval"]},
                                            models={"candidate": ft["model_path"]}, nproc=1, dataset_out=out))
    m = result(world["root"] / "ev")["metrics"]
    match = json.loads((out / "match.json").read_text())
    mapping = np.array([-1 if v is None else v for v in match["mapping"].values()])  # PartWorld ids are 1..C: class = id
    index = shards.DatasetIndex.load(world["eval"])
    again = LussScores(len(index.categories) + 1, ignore=IGNORE_LABEL)
    for key, _, record in shards.iter_samples(world["eval"], decode=False, allow_parts=True):
        raw = decode_label_png(out / "predictions" / Path(record["file_name"]).with_suffix(".png"))
        again.add(apply_mapping(raw, mapping), semantic_map(record, class_indices(index.categories)), raw_foreground=raw != 0)
    r = again.result()
    assert m["luss/images"] == 6 and mapping[0] == 0
    assert m["luss/miou"] == pytest.approx(r["miou"]) and m["luss/fbeta"] == pytest.approx(r["fbeta"])
    assert m["luss/img_acc"] == pytest.approx(r["img_acc"])


def test_evaluating_a_representation_without_labels_or_head_names_the_input(world, attention_file, one_rank):
    from trainers.inputs import StageInputError

    spec = stage_spec("evaluate-segmentation", world["root"] / "ev-bad", datasets={"eval": world["eval"]},
                      models={"candidate": attention_file}, nproc=1, dataset_out=world["root"] / "pred-bad")
    with pytest.raises(StageInputError, match="no segmentation head; give inputs.datasets.labels"):
        run("evaluate-segmentation", spec)


def head_file(world, attention_file, num_classes: int, constant: int) -> Path:
    """The attention file's backbone with a 1x1 head that predicts class ``constant`` at every pixel (zero weights)."""
    from trainers.luss.model import read_model_file, save_model_file

    doc = read_model_file(attention_file)
    bias = torch.full((num_classes,), -5.0)
    bias[constant] = 5.0
    head = {"weight": torch.zeros(num_classes, 64, 1, 1), "bias": bias}
    return save_model_file(world["root"] / f"head-{num_classes}-{constant}.pt", "test_convnext", doc["state_dict"],
                           stage="finetune-segmentation", output_stride=16,
                           extra={"num_classes": num_classes, "segmentation_head": head, "targets": "ground_truth"})


def test_the_semi_supervised_protocol_trains_on_painted_objects_and_scores_category_ids(world, attention_file, one_rank):
    """Sec. 3.2.1: ``targets: ground_truth`` paints a labeled image's objects as categories (its training targets),
    and the evaluation scores such a model's labels as ground-truth ids (no matching); a model with another number
    of labels is refused."""
    from trainers.data import shards
    from trainers.data.imagenet_s import class_indices, decode_label_png, semantic_map
    from trainers.inputs import StageInputError
    from trainers.stages.finetune_segmentation import SegmentationSample

    categories = shards.DatasetIndex.load(world["eval"]).categories
    classes, num_gt = class_indices(categories), len(categories) + 1
    key, image, record = next(shards.iter_samples(world["train"]))
    _, labels = SegmentationSample("ground_truth", classes, 64, (1.0, 1.0), 0.0)((key, image, record))
    assert torch.equal(labels, torch.from_numpy(semantic_map(record, classes)).long()) and int(labels.max()) > 0

    out = world["root"] / "pred-semi"
    run("evaluate-segmentation", stage_spec("evaluate-segmentation", world["root"] / "ev-semi", datasets={"eval": world["eval"]},
                                            models={"candidate": head_file(world, attention_file, num_gt, 2)},
                                            params={"protocol": "semi_supervised"}, nproc=1, dataset_out=out))
    m = result(world["root"] / "ev-semi")["metrics"]
    match = json.loads((out / "match.json").read_text())
    ids = [int(c["id"]) for c in categories]
    assert match["protocol"] == "semi_supervised" and list(match["mapping"].values()) == [0] + ids  # the identity
    matched = [decode_label_png(p) for p in sorted((out / "matched").rglob("*.png"))]
    assert len(matched) == m["luss/images"] == 6 and all((a == ids[1]).all() for a in matched)  # class 2 stays category 2
    assert m["luss/fbeta"] > 0 and 0.0 <= m["luss/miou"] < 0.5
    with pytest.raises(StageInputError, match=f"semi_supervised needs a model of the {num_gt - 1} ground-truth categories"):
        run("evaluate-segmentation", stage_spec("evaluate-segmentation", world["root"] / "ev-semi-bad",
                                                datasets={"eval": world["eval"]},
                                                models={"candidate": head_file(world, attention_file, num_gt + 1, 2)},
                                                params={"protocol": "semi_supervised"}, nproc=1,
                                                dataset_out=world["root"] / "pred-semi-bad"))
