"""Encoder E: timm backbone + FPN pixel decoder; weight loading from a local path."""
from __future__ import annotations

import pytest
import timm
import torch

from trainers.models.config import EncoderConfig
from trainers.models.encoder import Encoder, PretrainedWeightsError
from model_helpers import TINY_ENCODER


def test_default_backbone_gives_stride4_mask_features_and_coarser_levels():
    enc = Encoder(EncoderConfig())
    out = enc(torch.rand(2, 3, 112, 112))
    assert out.mask_features.shape == (2, 128, 28, 28)
    assert [tuple(f.shape[-2:]) for f in out.multi_scale] == [(3, 3), (7, 7), (14, 14)]  # coarse to fine
    assert all(f.shape[:2] == (2, 128) for f in out.multi_scale)


def test_uint8_and_float_images_are_normalised_alike():
    enc = Encoder(TINY_ENCODER).eval()
    img = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    a, b = enc(img), enc(img.float() / 255)
    assert torch.allclose(a.mask_features, b.mask_features, atol=1e-5)


def test_strides_must_exist_in_backbone():
    with pytest.raises(ValueError, match="strides"):
        Encoder(TINY_ENCODER.model_copy(update={"strides": (4, 64)}))
    with pytest.raises(ValueError, match="include 4"):
        EncoderConfig(strides=(8, 16))


def test_same_seed_gives_identical_init():
    torch.manual_seed(3)
    a = Encoder(TINY_ENCODER).state_dict()
    torch.manual_seed(3)
    b = Encoder(TINY_ENCODER).state_dict()
    torch.manual_seed(4)
    c = Encoder(TINY_ENCODER).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_local_state_dict_loads_into_the_backbone(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_convnext", pretrained=False)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as many checkpoints are
    enc = Encoder(TINY_ENCODER.model_copy(update={"pretrained": str(path)}))
    got = enc.backbone.state_dict()
    want = source.state_dict()
    w = "stages_1.blocks.0.conv_dw.weight"  # the feature wrapper flattens stages.1 -> stages_1
    assert torch.equal(got[w], want["stages.1.blocks.0.conv_dw.weight"])
    assert torch.equal(got["stem_0.weight"], want["stem.0.weight"])


def test_missing_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        Encoder(TINY_ENCODER.model_copy(update={"pretrained": str(bad)}))


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="do not fit backbone 'test_convnext'"):
        Encoder(TINY_ENCODER.model_copy(update={"pretrained": str(path)}))
