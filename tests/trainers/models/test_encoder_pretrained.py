"""Encoders any pipeline can use (issue 14 item 4): a representation file, a timm hub name or a state_dict initialises
the segmenter's backbone; the instance-teacher stage resolves its ``encoder`` input or param."""
from __future__ import annotations

import pytest
import torch

from trainers.dense.backbone import DenseBackbone
from trainers.dense.io import save_representation
from trainers.inputs import StageInputError
from trainers.models.encoder import Encoder, PretrainedWeightsError, with_pretrained
from model_helpers import TINY_ENCODER


def _representation(path, seed=5):
    torch.manual_seed(seed)
    bb = DenseBackbone("test_resnet", {"output_stride": 8})
    return save_representation(path, "test_resnet", bb.model.state_dict(), "slotcon", extra={"model_kwargs": {"output_stride": 8}}), bb


def test_a_representation_file_becomes_the_encoders_backbone_with_its_weights(tmp_path):
    path, bb = _representation(tmp_path / "rep.pt")
    cfg = with_pretrained(TINY_ENCODER.model_copy(update={"backbone": "resnet10t"}), str(path))
    assert cfg.backbone == "test_resnet" and cfg.pretrained == str(path)  # the representation names the architecture
    enc = Encoder(cfg)
    trained = bb.model.state_dict()
    loaded = enc.backbone.state_dict()
    shared = [k for k in loaded if k in trained]
    assert shared and all(torch.equal(loaded[k], trained[k]) for k in shared)


def test_timm_names_keep_the_hub_loading_path_without_downloading():
    assert with_pretrained(TINY_ENCODER, "timm").model_dump(include={"backbone", "pretrained"}) == {
        "backbone": "test_convnext", "pretrained": "timm"}
    assert with_pretrained(TINY_ENCODER, "timm:convnext_atto.d2_in1k").backbone == "convnext_atto.d2_in1k"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="nowhere.pt"):
        with_pretrained(TINY_ENCODER, str(tmp_path / "nowhere.pt"))


def test_instance_teacher_takes_the_encoder_from_its_model_input_or_param(tmp_path):
    from contract.spec import StageSpec
    from contract.stages import params_of
    from trainers.stages.instance_teacher import encoder_source

    path, _ = _representation(tmp_path / "rep.pt")

    def spec(params, models=None):
        return StageSpec.model_validate({"stage": "instance-teacher", "name": "t", "outputs": {"workdir": str(tmp_path / "w")},
                                         "inputs": {"models": {k: {"uri": v} for k, v in (models or {}).items()}},
                                         "params": params})

    s = spec({}, {"encoder": str(path)})
    assert encoder_source(s, params_of(s)) == (str(path), "inputs.models.encoder")
    s = spec({"encoder": str(path)})
    assert encoder_source(s, params_of(s)) == (str(path), "params.encoder")
    s = spec({"encoder": "timm:resnet10t"})
    assert encoder_source(s, params_of(s)) == ("timm:resnet10t", "params.encoder")
    s = spec({"encoder": "stage:slotcon"})
    with pytest.raises(StageInputError, match="model input encoder"):
        encoder_source(s, params_of(s))
    s = spec({"encoder": str(path)}, {"init": str(path)})
    with pytest.raises(StageInputError, match="both initialise the encoder"):
        encoder_source(s, params_of(s))
