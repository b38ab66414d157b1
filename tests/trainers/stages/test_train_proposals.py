"""Stage ``train-proposals``: D^p learns class-agnostic parts from proposals with the teacher's frozen encoder."""
from __future__ import annotations

import pytest
import torch

from trainers.data import shards
from trainers.models.io import load_segmenter
from contract.stages.train_proposals import TrainProposalsParams
from trainers.data.batches import images_to_tensor, proposal_targets
from trainers.models.presets import part_config

from runtime_helpers import run_stage
from stage_helpers import TINY_DECODER, mlflow_run, result, stage_spec, tiny_segmenter_file, write_proposals_dataset


def _mean_best_iou(model, dataset) -> float:
    """Mean over target parts of the best IoU among the model's top predictions."""
    ious = []
    for _, image, record in shards.iter_samples(dataset):
        target = proposal_targets(record)["masks"]
        pred = model.predict(images_to_tensor([image]))[0].masks
        if len(target) and len(pred):
            a, b = pred.flatten(1).float(), target.flatten(1).float()
            inter = a @ b.T
            iou = inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter).clamp(min=1)
            ious += iou.max(0).values.tolist()
    return sum(ious) / len(ious)


def test_part_config_is_single_class_with_the_teachers_frozen_encoder(tmp_path):
    teacher = load_segmenter(tiny_segmenter_file(tmp_path / "t.pt"))
    cfg = part_config(TrainProposalsParams(model={"decoder": {"num_queries": 12}}).model, teacher.cfg.encoder)
    assert cfg.decoder.num_classes == 1 and cfg.freeze_encoder and cfg.decoder.num_queries == 12
    assert cfg.encoder == teacher.cfg.encoder


def test_an_encoder_override_is_refused(tmp_path):
    from trainers.inputs import StageInputError

    teacher = load_segmenter(tiny_segmenter_file(tmp_path / "t.pt"))
    with pytest.raises(StageInputError, match="params.model.encoder"):
        part_config(TrainProposalsParams(model={"encoder": {"pixel_dim": 8}}).model, teacher.cfg.encoder)


def test_missing_teacher_model_file_is_named_in_the_error(tmp_path):
    from trainers.inputs import StageInputError
    from trainers.stages.train_proposals import run

    data = write_proposals_dataset(tmp_path / "proposals", 4)
    spec = stage_spec("train-proposals", tmp_path / "work", datasets={"proposals": data},
                      models={"teacher": tmp_path / "missing.pt"}, nproc=1)
    with pytest.raises(StageInputError, match="inputs.models.teacher"):
        run(spec)


@pytest.mark.slow
def test_learns_hand_made_part_proposals_with_the_encoder_frozen(tmp_path):
    data = write_proposals_dataset(tmp_path / "proposals", 32)
    teacher_path = tiny_segmenter_file(tmp_path / "teacher.pt")
    uri, run_id, client = mlflow_run(tmp_path)
    spec = stage_spec("train-proposals", tmp_path / "work", datasets={"proposals": data},
                      models={"teacher": teacher_path}, mlflow_uri=uri, run_id=run_id,
                      params={"steps": 120, "lr": 0.005, "warmup_steps": 0, "checkpoint_every": 60, "flip_prob": 0.0,
                              "log_every": 5, "model": {**TINY_DECODER, "top_k": 8}})
    run_stage(spec)

    res = result(tmp_path / "work")
    assert res["steps"] == 120
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert losses[-1] < 0.8 * losses[0]  # the loss falls (means over 5 steps)

    trained, teacher = load_segmenter(res["model_path"]), load_segmenter(teacher_path)
    assert trained.cfg.decoder.num_classes == 1 and trained.cfg.freeze_encoder
    for (k, a), b in zip(teacher.encoder.state_dict().items(), trained.encoder.state_dict().values()):
        assert torch.equal(a, b), f"encoder weight {k} changed"
    torch.manual_seed(0)
    untrained = type(trained)(trained.cfg, encoder=teacher.encoder).eval()
    trained_iou, untrained_iou = _mean_best_iou(trained, data), _mean_best_iou(untrained, data)
    # a random frozen 16-channel encoder limits what D^p can reach; it still finds the parts far better than chance
    assert trained_iou > untrained_iou + 0.1 and trained_iou > 0.15, (trained_iou, untrained_iou)
