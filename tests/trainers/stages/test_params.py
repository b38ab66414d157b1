"""Every stage's params model: unknown (misspelt) keys are rejected with the key and the allowed keys, one stage of
each family (train, evaluate, label); defaults are filled in; values out of range are refused."""
from __future__ import annotations

import pytest

from contract.stages import STAGES, ParamsError
from contract.stages import get as definition

MISSPELT = {  # a likely typo of a real key per stage
    "fit-objects": ("stpes", "steps"),
    "instance-teacher": ("import_form", "import_from"),
    "train-proposals": ("flip_porb", "flip_prob"),
    "train-ranker": ("rond", "round"),
    "evaluate-proposals": ("max_det", "max_dets"),
    "evaluate-parts": ("setting", "settings"),
    "mine-parts": ("feature_level", "feature_levels"),
    "pseudo-label": ("scor_threshold", "score_threshold"),
    "rank-parts": ("nitre", "niter"),
    "rank-pseudo-label": ("min_part_aera", "min_part_area"),
    "cluster-pixels": ("pixels_per_instanse", "pixels_per_instance"),
    "detect-pseudo-label": ("detla", "delta"),
    "evaluate-instances": ("score_treshold", "score_threshold"),
    "join-datasets": ("shard_szie", "shard_size"),
    "slotcon": ("num_protoypes", "num_prototypes"),
    "leopart": ("fg_mas", "fg_mass"),
    "evaluate-representation": ("overcluster", "overcluster_k"),
    "represent": ("sinkhorn_iteration", "sinkhorn_iterations"),
    "pixel-attention": ("temprature", "temperature"),
    "generate-labels": ("treshold", "threshold"),
    "finetune-segmentation": ("crop_szie", "crop_size"),
    "evaluate-segmentation": ("boundry_ratio", "boundary_ratio"),
}


def test_every_stage_has_a_misspelling_case():
    project = {name: d for name, d in STAGES.items() if d.entry.startswith("trainers.")}  # not the control-plane tests' stand-ins
    assert set(MISSPELT) == set(project)
    assert {d.kind for d in project.values()} == {"train", "evaluate", "label"}


@pytest.mark.parametrize("stage", sorted(MISSPELT))
def test_a_misspelt_param_is_rejected_with_the_key_and_the_allowed_keys(stage):
    typo, real = MISSPELT[stage]
    with pytest.raises(ParamsError) as e:
        definition(stage).parse({typo: 1}, source="stage 'x' params")
    msg = str(e.value)
    assert f"stage 'x' params.{typo}: unknown key" in msg and real in msg
    assert all(k in msg for k in definition(stage).params.model_fields)


@pytest.mark.parametrize("stage", sorted(MISSPELT))
def test_defaults_fill_an_empty_params_dict(stage):
    p = definition(stage).parse({})
    assert p == definition(stage).params()


def test_values_out_of_range_or_not_allowed_are_refused():
    with pytest.raises(ParamsError, match="objects"):
        definition("mine-parts").parse({"objects": "both"})
    with pytest.raises(ParamsError, match="settings"):
        definition("evaluate-parts").parse({"settings": []})
    with pytest.raises(ParamsError, match="steps"):
        definition("train-ranker").parse({"steps": 0})


def test_model_overrides_merge_over_the_default_architecture():
    p = definition("instance-teacher").parse({"model": {"decoder": {"num_queries": 7}}})
    assert p.model["decoder"]["num_queries"] == 7 and p.model["decoder"]["hidden_dim"] == 64
    assert p.model["encoder"]["backbone"] == "convnext_atto"
    assert definition("instance-teacher").params().model["decoder"]["num_queries"] == 16  # the default is untouched
