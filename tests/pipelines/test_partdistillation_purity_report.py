"""The PartDistillation report's purity grids are the final model's (issue 11 item 7): drawn from the predictions of
the ranker round the selection criterion picks, on the held-out eval images; and the input size reaches every stage
that runs the models (item 5)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import config_from_dict
from pipelines.partdistillation import PartDistillationConfig, graph, report
from pipelines.runner import PipelineResult, StageOutcome

WORLD = {"image_size": 64, "num_classes": 3, "num_part_types": 4, "min_parts": 2, "max_parts": 3, "max_instances": 2,
         "min_object_area": 32, "max_distractors": 0}


def _config(tmp_path: Path, **section) -> PartDistillationConfig:
    data = {"pipeline": "partdistillation", "workspace": {"root": "ws", "data": "data"},
            "partdistillation": {"train": "pw/train", "val": "pw/val", "eval": "pw/eval",
                                 "ranking": {"rounds": 2, "one_stage_rounds": 0, "kmeans_baseline": False}, **section}}
    return config_from_dict(data, base_dir=tmp_path, model=PartDistillationConfig)


def _predictions(out: Path, eval_dir: Path, cluster_offset: int) -> None:
    """A predictions folder whose gt segments are the eval split's GT parts, cluster = part type + ``cluster_offset``."""
    from trainers.data import shards
    from trainers.evaluation.part_predictions import write_part_results

    images, preds = [], []
    for key, _, record in shards.iter_samples(eval_dir, decode=False, allow_parts=True):
        objects = {o["id"]: (j, o["category_id"]) for j, o in enumerate(record["objects"])}
        images.append({"key": key, "height": record["height"], "width": record["width"]})
        preds.append({"proposals": [], "segments": [
            {"object": objects[p["object_id"]][0], "object_class": objects[p["object_id"]][1],
             "cluster": p["category_id"] + cluster_offset, "segmentation": p["segmentation"]} for p in record["parts"]]})
    write_part_results(out, images, {"gt": preds}, shards.DatasetIndex.load(eval_dir).categories, [1, 10], ["gt"])


@pytest.fixture(scope="module")
def eval_split(tmp_path_factory) -> Path:
    from trainers.data import shards
    from trainers.data.partworld import PartWorldConfig, category_table, generate, part_category_table

    world = PartWorldConfig(**WORLD)
    out = tmp_path_factory.mktemp("pw") / "eval"
    shards.write_dataset(generate(world, "eval", 0, 8), out, name="pw", split="eval", categories=category_table(world),
                         part_categories=part_category_table(world), shard_size=8)
    return out


@pytest.mark.parametrize("val_miou, picked", [((0.6, 0.5), 1), ((0.5, 0.6), 2)])
def test_purity_grids_are_the_selected_rankers_predictions_on_eval(tmp_path, eval_split, val_miou, picked):
    import shutil

    cfg = _config(tmp_path)
    shutil.copytree(eval_split, Path(cfg.paths.data) / "pw" / "eval")
    stages = []
    for r, miou in zip((1, 2), val_miou):
        _predictions(Path(graph.predictions_dir(cfg, "run", graph.ranker_evaluate(r))), eval_split, 100 * r)
        stages += [StageOutcome(graph.ranker_evaluate(r, "val"), "succeeded", "", tmp_path, result={"metrics": {"eval/gt/miou": miou}}),
                   StageOutcome(graph.ranker_evaluate(r), "succeeded", "", tmp_path, result={"metrics": {"eval/gt/miou": 0.1}})]
    index, r = report.purity_grids(cfg, PipelineResult("run", "", stages), tmp_path / "purity")
    assert r == picked and index.is_file()
    clusters = {int(p.stem.split("-")[1]) for p in (tmp_path / "purity").rglob("cluster-*.png")}
    assert clusters and all(100 * picked <= c < 100 * picked + 100 for c in clusters)   # that round's predictions only
    assert "larger than 50% of their object left out" in index.read_text()


def test_input_size_reaches_every_stage_that_runs_the_models_and_only_those(tmp_path):
    from contract.stages import STAGES
    from contract.stages.input_size import InputSizeParams

    specs = graph.build_stages(_config(tmp_path, input_size={"min_size": 128, "max_size": 213}), "run")
    sized = {s.stage for s in specs if s.params.get("min_size") == 128 and s.params.get("max_size") == 213}
    assert sized == {s.stage for s in specs if issubclass(STAGES[s.stage].params, InputSizeParams)}
    assert {"instance-teacher", "mine-parts", "train-proposals", "evaluate-proposals", "rank-parts", "train-ranker",
            "evaluate-parts", "pseudo-label"} <= sized
    for s in specs:
        STAGES[s.stage].parse(s.params)                                              # every spec's params validate
    plain = graph.build_stages(_config(tmp_path), "run")
    assert not any("min_size" in s.params or "max_size" in s.params for s in plain)  # default: specs unchanged
