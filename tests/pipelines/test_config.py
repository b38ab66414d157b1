"""Pipeline config: validated in full, errors name the file and the key; pipelines add typed sections."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from pipelines.config import PIPELINES, PipelineConfig, load_config
from contract.spec import SpecError, StageSpec


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_rejected_naming_key_and_file(tmp_path):
    p = write(tmp_path, "executor:\n  kubernetes:\n    backof_limit: 2\n")
    with pytest.raises(SpecError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert "executor.kubernetes.backof_limit: unknown key" in str(e.value)


def test_bad_value_is_rejected_naming_key_and_file(tmp_path):
    p = write(tmp_path, "promotion:\n  direction: up\nresources:\n  replicas: 0\n")
    with pytest.raises(SpecError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "promotion.direction:" in msg and "resources.replicas:" in msg


def test_unknown_pipeline_names_the_known_ones(tmp_path):
    p = write(tmp_path, "pipeline: nosuch\n")
    with pytest.raises(SpecError, match="pipeline: unknown pipeline 'nosuch'"):
        load_config(p)


def test_stage_spec_error_names_key_and_file(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("stage: fit-objects\nname: x\noutputs: {workdir: /tmp/x}\nparamz: {}\n")
    with pytest.raises(SpecError, match=r"spec.yaml.*\n  paramz: unknown key"):
        StageSpec.load(p)


def test_defaults_put_everything_in_the_workspace_next_to_the_config(tmp_path):
    cfg = load_config(write(tmp_path, "stages:\n  - {stage: fit-objects, datasets: {train: pw}, output_model: objects}\n"))
    ws = tmp_path / ".selftrain"
    assert cfg.tracking_uri() == f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    assert cfg.artifact_location() == (ws / "mlflow" / "artifacts").as_uri()
    spec = cfg.stage_specs("r1")[0]
    assert spec.outputs.workdir == str(ws / "runs" / "r1" / "fit-objects")
    assert spec.inputs.datasets["train"].path == str(ws / "data" / "pw")
    assert spec.resources.deepspeed["zero_optimization"] == {"stage": 2}
    assert spec.tracking.mlflow_uri == cfg.tracking_uri()


def test_stage_resources_override_the_defaults(tmp_path):
    cfg = load_config(write(tmp_path, (
        "resources: {nproc_per_node: 2}\n"
        "deepspeed: {zero_stage: 1}\n"
        "stages:\n  - {stage: fit-objects, datasets: {train: pw}, resources: {replicas: 2, deepspeed: {zero_optimization: {stage: 3}}}}\n"
    )))
    spec = cfg.stage_specs("r")[0]
    assert (spec.resources.replicas, spec.resources.nproc_per_node) == (2, 2)
    assert spec.resources.deepspeed["zero_optimization"]["stage"] == 3


def test_duplicate_stage_names_are_rejected(tmp_path):
    with pytest.raises(SpecError, match="duplicate stage name 'a'"):
        load_config(write(tmp_path, "stages:\n  - {stage: a}\n  - {stage: b, name: a}\n"))


class _ToySection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(default=1, ge=1, description="Self-training rounds.")


class _ToyConfig(PipelineConfig):
    toy: _ToySection = Field(default_factory=_ToySection, description="The toy pipeline's section.")

    def stage_specs(self, run):
        return [self.new_stage_spec(run, "fit-objects", f"r{r}-fit", datasets={"train": "pw"}) for r in range(1, self.toy.rounds + 1)]


def test_a_pipeline_contributes_its_own_typed_section(tmp_path, monkeypatch):
    monkeypatch.setitem(PIPELINES, "toy", _ToyConfig)
    cfg = load_config(write(tmp_path, "pipeline: toy\ntoy: {rounds: 2}\n"))
    assert isinstance(cfg, _ToyConfig)
    assert [s.name for s in cfg.stage_specs("r")] == ["r1-fit", "r2-fit"]
    with pytest.raises(SpecError, match="toy.rounds:"):
        load_config(write(tmp_path, "pipeline: toy\ntoy: {rounds: 0}\n"))
    with pytest.raises(SpecError, match="toy: unknown key"):  # a section belongs to its pipeline only
        load_config(write(tmp_path, "toy: {rounds: 2}\n"))


def test_make_demo_makes_every_dataset_the_demo_config_reads():
    """`make demo` from a clean clone: each dataset a demo stage reads is written by `selftrain data generate` or by a
    command of the demo recipe (its `-o` folder). A clean clone once failed at mine-holdout: nothing made the holdout."""
    import re

    repo = Path(__file__).resolve().parents[2]
    recipe = repo.joinpath("Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    made = {repo / "data" / "partworld-demo"} | {repo / o for o in re.findall(r" -o (\S+)", recipe)}
    cfg = load_config(repo / "configs" / "partdistillation-demo.yaml")
    reads = {Path(d.path).resolve() for s in cfg.stage_specs("check") for d in s.inputs.datasets.values()}
    external = {p for p in reads if "runs" not in p.parts}  # not written by a stage of the run
    assert external, "the demo reads no dataset?"
    for p in external:
        assert any(m.resolve() in p.parents for m in made), f"{p}: no command of `make demo` writes it"
