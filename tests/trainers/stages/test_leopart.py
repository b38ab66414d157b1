"""Stage ``leopart`` trained in this process on a 64 px PartWorld with a test ViT."""
from __future__ import annotations

import pytest

from trainers.dense.backbone import DenseBackbone, load_backbone
from trainers.dense.io import read_representation

from runtime_helpers import run_stage
from stage_helpers import result, stage_spec, write_world64

TINY = {"backbone": "test_vit", "num_prototypes": 8, "dim": 16, "hidden_dim": 32, "global_size": 64, "local_size": 32,
        "num_local": 1, "steps": 4, "lr": 3e-3, "checkpoint_every": 100, "warmup_steps": 1}


@pytest.fixture(scope="module")
def train64(tmp_path_factory):
    return write_world64(tmp_path_factory.mktemp("world64") / "train", "train", 16)


@pytest.mark.slow
def test_leopart_fine_tunes_the_vit_on_its_attention_foreground(tmp_path, train64):
    run_stage(stage_spec("leopart", tmp_path / "w", datasets={"train": train64}, params=TINY, nproc=1, zero=1), nproc=1)
    res = result(tmp_path / "w")
    blob = read_representation(res["model_path"])
    assert blob["timm_name"] == "test_vit" and blob["stage"] == "leopart"
    assert blob["extra"]["prototypes"].shape == (8, 16) and blob["extra"]["projector_config"]["norm"] is False
    # foreground: a share of the tokens, not all of them and not none (fg_mass 0.6 of the attention)
    metrics = res["metrics"]
    assert 0 < metrics["train/fg_share"] < 1 and metrics["train/loss"] > 0 and metrics["train/score_spread"] > 0
    # the ViT is fine-tuned at backbone_lr_scale (default 0.1) of the head's and prototypes' lr
    import json

    groups = json.loads((tmp_path / "w" / "engine.json").read_text())["engine"]["peak_lr_per_group"]
    assert groups == pytest.approx([TINY["lr"] * 0.1, TINY["lr"]])
    model = load_backbone(blob)
    assert model.vit
    import torch

    feats, attn = model.features(torch.rand(2, 3, 64, 48), attention=True)
    assert feats.shape[-2:] == attn.shape[-2:] == (4, 3)  # any image size: the patch grid of 16 px patches


def test_leopart_without_a_vit_needs_foreground_all(tmp_path, train64, one_rank):
    from trainers.stages.leopart import run

    with pytest.raises(ValueError, match="not a ViT"):
        run(stage_spec("leopart", tmp_path / "w", datasets={"train": train64},
                       params={**TINY, "backbone": "test_convnext", "output_stride": 8}, nproc=1, zero=0))


def test_a_vit_has_no_attention_maps_when_it_is_a_cnn():
    with pytest.raises(ValueError, match="not a ViT"):
        import torch

        DenseBackbone("test_convnext", {"output_stride": 8}).features(torch.rand(1, 3, 32, 32), attention=True)
