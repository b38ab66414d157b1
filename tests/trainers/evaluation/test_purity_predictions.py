"""Purity grids of a model's predictions on held-out images (issue 11 item 7): a predictions folder as evaluate-parts
writes it, drawn on the dataset's images, parts larger than half their object left out (PartDistillation sec. 5.4)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainers.data import shards
from trainers.data.partworld import PartWorldConfig, category_table, generate, part_category_table
from trainers.evaluation.part_predictions import write_part_results
from trainers.evaluation.purity import make_prediction_purity_grids, prediction_parts, sample_part_clusters
from trainers.structures import mask_area

WORLD64 = PartWorldConfig(image_size=64, num_classes=3, num_part_types=4, min_parts=2, max_parts=3, max_instances=2,
                          min_object_area=32, max_distractors=0)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """An eval split and a predictions folder whose gt-setting segments are its GT parts (cluster = part type)."""
    root = tmp_path_factory.mktemp("purity-pred")
    shards.write_dataset(generate(WORLD64, "eval", 0, 16), root / "eval", name="eval", split="eval",
                         categories=category_table(WORLD64), part_categories=part_category_table(WORLD64), shard_size=8)
    images, preds, large = [], [], 0
    for key, _, record in shards.iter_samples(root / "eval", decode=False, allow_parts=True):
        index = {o["id"]: j for j, o in enumerate(record["objects"])}
        objects = {o["id"]: o for o in record["objects"]}
        images.append({"key": key, "height": record["height"], "width": record["width"]})
        preds.append({"segments": [{"object": index[p["object_id"]], "object_class": objects[p["object_id"]]["category_id"],
                                    "cluster": p["category_id"], "segmentation": p["segmentation"]}
                                   for p in record["parts"]], "proposals": []})
        large += sum(mask_area(p["segmentation"]) > 0.5 * mask_area(objects[p["object_id"]]["segmentation"])
                     for p in record["parts"])
    write_part_results(root / "pred", images, {"gt": preds}, category_table(WORLD64), [1, 10], gt_class_map=["gt"])
    return {"eval": root / "eval", "pred": root / "pred", "parts": sum(len(p["segments"]) for p in preds), "large": large}


def test_parts_over_half_their_object_are_left_out(predicted):
    records = prediction_parts(predicted["pred"], predicted["eval"])
    left_out: dict[str, int] = {}
    clusters, n = sample_part_clusters(records.items(), max_part_fraction=0.5, left_out=left_out)
    assert 0 < predicted["large"] < predicted["parts"]            # the data has both kinds
    assert left_out == {"unlabelled": 0, "too_large": predicted["large"]} and n == predicted["large"]
    assert sum(c.instances for c in clusters.values()) == predicted["parts"] - predicted["large"]
    everything, none_out = sample_part_clusters(records.items(), max_part_fraction=None)
    assert none_out == 0 and sum(c.instances for c in everything.values()) == predicted["parts"]


def test_grids_of_a_predictions_folder_are_drawn_on_the_dataset_images(predicted, tmp_path):
    page = make_prediction_purity_grids(predicted["pred"], predicted["eval"], tmp_path / "g", max_part_fraction=0.5)
    clusters, _ = sample_part_clusters(prediction_parts(predicted["pred"], predicted["eval"]).items(), max_part_fraction=0.5)
    pngs = sorted(p.relative_to(tmp_path / "g").as_posix() for p in (tmp_path / "g").rglob("*.png"))
    assert pngs == sorted(c.grid_name for c in clusters.values()) and pngs
    html = page.read_text()
    assert set(re.findall(r"src='([^']+\.png)'", html)) == set(pngs)
    assert f"{predicted['large']} parts larger than 50% of their object left out" in html


def test_a_setting_the_folder_lacks_is_an_error_naming_it(predicted):
    with pytest.raises(ValueError, match="no setting 'pred'"):
        prediction_parts(predicted["pred"], predicted["eval"], setting="pred")
    with pytest.raises(FileNotFoundError, match="no images.json"):
        prediction_parts(Path(predicted["eval"]), predicted["eval"])
