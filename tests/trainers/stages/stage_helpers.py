"""Shared pieces of the PartDistillation stage tests: a 64 px PartWorld, tiny segmenter files, stage specs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from contract.spec import StageSpec
from trainers.data import shards
from trainers.data.partworld import PartWorldConfig, category_table, generate
from trainers.models.config import DecoderConfig, EncoderConfig, SegmenterConfig
from trainers.models.io import save_segmenter
from trainers.models.segmenter import Segmenter

WORLD64 = PartWorldConfig(image_size=64, num_classes=3, num_part_types=4, min_parts=2, max_parts=3, max_instances=2,
                          min_object_area=32, max_distractors=0)
TINY_MODEL = {  # params.model of the stages: a step takes tens of milliseconds on one core
    "encoder": {"backbone": "test_convnext", "pixel_dim": 16, "mask_dim": 16, "norm_groups": 4},
    "decoder": {"num_queries": 8, "hidden_dim": 16, "num_heads": 2, "dim_feedforward": 32, "num_layers": 2},
    "loss": {"num_points": 0, "class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0},
}
TINY_DECODER = {"decoder": TINY_MODEL["decoder"], "loss": TINY_MODEL["loss"]}


def tiny_segmenter_file(path: Path, num_classes: int = 3, seed: int = 0) -> Path:
    """A randomly initialised tiny Segmenter saved as a segmenter file."""
    torch.manual_seed(seed)
    cfg = SegmenterConfig(encoder=EncoderConfig(**TINY_MODEL["encoder"]),
                          decoder=DecoderConfig(num_classes=num_classes, **TINY_MODEL["decoder"]))
    return save_segmenter(path, cfg, Segmenter(cfg).state_dict())


def gt_parts_as_proposals(samples):
    """Evaluation samples with their GT parts moved to ``proposals`` (a perfect hand-made pseudo-label set)."""
    for key, image, record in samples:
        parts = record.pop("parts")
        record["proposals"] = [{"object_id": p["object_id"], "segmentation": p["segmentation"], "score": 1.0,
                                "area": p["area"], "label": 0} for p in parts]
        yield key, image, record


def write_proposals_dataset(out: Path, count: int, shard_size: int = 8) -> Path:
    shards.write_dataset(gt_parts_as_proposals(generate(WORLD64, "eval", 0, count)), out, name="gt-parts",
                         split="train", categories=category_table(WORLD64), shard_size=shard_size)
    return out


def write_world64(out: Path, split: str, count: int, shard_size: int = 8, records=None) -> Path:
    from trainers.data.partworld import part_category_table

    samples = generate(WORLD64, split, 0, count)
    if records is not None:
        samples = (records(s) for s in samples)
    shards.write_dataset(samples, out, name="world64", split=split, categories=category_table(WORLD64),
                         part_categories=part_category_table(WORLD64) if split == "eval" else None,
                         shard_size=shard_size)
    return out


def stage_spec(stage: str, workdir: Path, *, datasets: dict[str, Path] | None = None,
               models: dict[str, Path] | None = None, params: dict | None = None, dataset_out: Path | None = None,
               nproc: int = 2, zero: int = 2, micro: int = 4, mlflow_uri: str = "sqlite:///unused.db",
               run_id: str | None = None) -> StageSpec:
    return StageSpec.model_validate({
        "stage": stage, "name": f"test-{stage}",
        "inputs": {"datasets": {k: {"path": str(v)} for k, v in (datasets or {}).items()},
                   "models": {k: {"uri": str(v)} for k, v in (models or {}).items()}},
        "outputs": {"workdir": str(workdir), "dataset": None if dataset_out is None else str(dataset_out)},
        "params": params or {},
        "resources": {"nproc_per_node": nproc, "deepspeed": {"train_micro_batch_size_per_gpu": micro,
                                                             "zero_optimization": {"stage": zero}}},
        "tracking": {"mlflow_uri": mlflow_uri, "run_id": run_id},
    })


def result(workdir: Path) -> dict:
    return json.loads((Path(workdir) / "result.json").read_text())


def mlflow_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("stage-test"))
    return uri, run.info.run_id, client
