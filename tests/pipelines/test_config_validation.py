"""A misspelt key anywhere in a pipeline config is rejected before anything runs, naming the file, the key path and the allowed keys."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract import stages as registry
from pipelines.config import KubernetesConfig, load_config

REPO = Path(__file__).resolve().parents[2]
MINE_KEYS = ", ".join(sorted(registry.STAGES["mine-parts"].params.model_fields))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


CASES = {
    # level: (config text, key path in the message, allowed keys that must be listed)
    "pipeline section": (
        "pipeline: partdistillation\npartdistillation:\n  mining: {kk: 3}\n",
        "partdistillation.mining.kk: unknown key",
        "k, min_object_area, min_part_area, objects, params, refine, score_threshold",
    ),
    "stage params passed through by the pipeline": (
        "pipeline: partdistillation\npartdistillation:\n  proposals: {train: {stepz: 5}}\n",
        "partdistillation.proposals.train.stepz: unknown key",
        ", ".join(sorted(registry.STAGES["train-proposals"].params.model_fields)),
    ),
    "stage params of an explicit stage list": (
        "stages:\n  - {stage: mine-parts, params: {kay: 3}, output_dataset: mined}\n",
        "stages.0.params.kay: unknown key",
        MINE_KEYS,
    ),
    "default resources": (
        "pipeline: partdistillation\nresources: {gpus: 1}\n",
        "resources.gpus: unknown key",
        "cpu, deepspeed, gpus_per_replica, memory, nproc_per_node, replicas",
    ),
    "a stage's resources": (
        "stages:\n  - {stage: mine-parts, output_dataset: mined, resources: {replica: 2}}\n",
        "stages.0.resources: unknown key 'replica'",
        "cpu, deepspeed, gpus_per_replica, memory, nproc_per_node, replicas",
    ),
    "kubernetes settings": (
        "pipeline: partdistillation\nexecutor:\n  kubernetes: {namespaces: x}\n",
        "executor.kubernetes.namespaces: unknown key",
        ", ".join(sorted(KubernetesConfig.model_fields)),
    ),
}


@pytest.mark.parametrize("level", sorted(CASES))
@pytest.mark.parametrize("command", ["render", "run"])
def test_a_misspelt_key_is_rejected_by_render_and_run(tmp_path: Path, level: str, command: str) -> None:
    text, key, allowed = CASES[level]
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(text)
    args = ["render", str(cfg), "-o", str(tmp_path / "manifests")] if command == "render" else ["run", str(cfg)]
    p = _cli(*args, cwd=tmp_path)
    assert p.returncode != 0
    err = p.stderr + p.stdout
    assert str(cfg) in err and key in err and allowed in err, err
    assert not (tmp_path / "manifests").exists() and not (tmp_path / ".selftrain" / "runs").exists()


def test_a_value_the_params_model_forbids_is_rejected_with_its_key_path(tmp_path: Path) -> None:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("pipeline: partdistillation\npartdistillation:\n  mining: {params: {metric: manhattan}}\n")
    with pytest.raises(ValueError) as e:
        load_config(cfg)
    assert "partdistillation.mining.params.metric:" in str(e.value) and "'cosine' or 'l2'" in str(e.value)


def test_an_unknown_trainer_is_rejected_naming_the_known_ones(tmp_path: Path) -> None:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("stages:\n  - {stage: mine-partz}\n")
    with pytest.raises(ValueError) as e:
        load_config(cfg)
    assert "stages.0.stage: unknown stage 'mine-partz'" in str(e.value) and "mine-parts" in str(e.value)


def test_every_stage_the_demo_builds_validates_against_its_definition() -> None:
    cfg = load_config(REPO / "configs" / "partdistillation-demo.yaml")
    specs = cfg.stage_specs("check")
    assert {s.stage for s in specs} <= set(registry.STAGES)
    for s in specs:
        d = registry.get(s.stage)
        d.parse(s.params)
        assert not d.missing_inputs(set(s.inputs.datasets), set(s.inputs.models)), s.name
    # promotion rules sit on the val-split stages only; the *-evaluate stages (the reported split) never promote
    assert [s.name for s in specs if s.promotion] == ["r1-val", "r2-val", "f1-val", "one-stage-r1-val", "one-stage-r2-val",
                                                       "one-stage-r3-val"]


@pytest.mark.parametrize("pipeline", ["partdistillation", "casp", "luss", "dense"])
def test_a_config_whose_promotion_would_read_the_reported_split_is_rejected(tmp_path: Path, pipeline: str) -> None:
    """A model is selected on a split that is never the one reported: the section's val set to its eval is an error
    naming a promoting stage and the split, before anything runs (defaults of every other key)."""
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"pipeline: {pipeline}\n{pipeline}:\n  val: partworld-demo/eval\n  eval: partworld-demo/eval\n")
    with pytest.raises(ValueError) as e:
        load_config(cfg)
    msg = str(e.value)
    if pipeline == "partdistillation":  # its section refuses shared splits itself, before any stage is built
        assert str(cfg) in msg and "train, val, eval and selection.holdout must be different datasets" in msg, msg
    else:  # the generic check on the built stages (pipelines.config._promotions_reading_reported_splits)
        assert str(cfg) in msg and "reads the reported split" in msg and "partworld-demo/eval" in msg and "-val (" in msg, msg
    # the shipped configs select on val and pass
    shipped = [f for f in REPO.glob("configs/*.yaml") if f"\npipeline: {pipeline}\n" in f.read_text()]
    assert shipped
    for f in shipped:
        assert load_config(f).reported_splits(), f
