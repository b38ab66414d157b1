"""Stage ``slotcon`` trained in this process on a 64 px PartWorld, then scored by ``evaluate-representation``."""
from __future__ import annotations


import pytest
import torch

from contract.stages import ParamsError, get
from trainers.dense.io import FORMAT, read_representation
from trainers.inputs import StageInputError
from trainers.models.encoder import load_state_dict_source

from runtime_helpers import run_stage
from stage_helpers import result, stage_spec, write_world64

TINY = {"backbone": "test_convnext", "output_stride": 8, "num_prototypes": 4, "dim": 16, "hidden_dim": 32,
        "crop_size": 48, "steps": 6, "lr": 3e-3, "checkpoint_every": 100, "warmup_steps": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world64")
    return {"train": write_world64(root / "train", "train", 16), "eval": write_world64(root / "eval", "eval", 8)}


@pytest.mark.slow
def test_slotcon_writes_a_representation_file_of_its_teacher(tmp_path, world):
    # under torchrun (one rank): DeepSpeed keeps process-group state that a second engine in one process trips over
    run_stage(stage_spec("slotcon", tmp_path / "w", datasets={"train": world["train"]}, params=TINY, nproc=1, zero=2), nproc=1)
    res = result(tmp_path / "w")
    blob = read_representation(res["model_path"])
    assert blob["format"] == FORMAT and blob["timm_name"] == "test_convnext" and blob["stage"] == "slotcon"
    assert blob["extra"]["prototypes"].shape == (4, 16) and blob["extra"]["model_kwargs"] == {"output_stride": 8}
    # the backbone is the EMA teacher, in timm's own keys: a timm model of the name loads it (head left out)
    import timm

    own = timm.create_model("test_convnext").state_dict()
    assert set(blob["state_dict"]) == {k for k in own if not k.startswith("head.fc")}
    assert set(load_state_dict_source(res["model_path"])) == set(blob["state_dict"])
    assert res["steps"] == 6 and res["metrics"]["train/loss_group"] > 0 and res["metrics"]["train/loss_contrast"] > 0
    # the teacher moved away from the initial student (EMA of 6 updated students), so the file is not the init
    torch.manual_seed(0)
    init = timm.create_model("test_convnext", output_stride=8, num_classes=0, global_pool="").state_dict()
    assert any(not torch.equal(init[k], blob["state_dict"][k]) for k in blob["state_dict"] if k in init)


def test_slotcon_refuses_zero_3(tmp_path, world, one_rank):
    from trainers.stages.slotcon import run

    spec = stage_spec("slotcon", tmp_path / "w", datasets={"train": world["train"]}, params=TINY, nproc=1, zero=3)
    with pytest.raises(StageInputError, match="ZeRO stage 0, 1 or 2"):
        run(spec)


def test_slotcon_params_reject_an_inverted_crop_scale():
    with pytest.raises(ParamsError, match="crop_scale"):
        get("slotcon").parse({"crop_scale": [0.9, 0.2]})
