"""``python -m trainers <stage> --spec <file | env:VAR>``: the data plane's entry point."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from contract.spec import SpecError, StageSpec
from trainers.__main__ import load_spec, main, result_document
from contract.stages import STAGES, UnknownStage
from contract.stages import get as get_stage
from trainers.stages import StageResult

from runtime_helpers import REPO


def _spec(tmp_path, stage="fit-objects") -> StageSpec:
    return StageSpec(stage=stage, name="s", outputs={"workdir": str(tmp_path / "work")})


def test_unknown_stage_names_the_known_ones():
    with pytest.raises(UnknownStage) as e:
        get_stage("no-such-stage")
    assert "no-such-stage" in str(e.value) and all(name in str(e.value) for name in STAGES)


def test_spec_from_environment_variable(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    monkeypatch.setenv("SELFTRAIN_SPEC", spec.to_json())
    assert load_spec("env:SELFTRAIN_SPEC") == spec


def test_spec_from_unset_environment_variable_is_an_error(monkeypatch):
    monkeypatch.delenv("SELFTRAIN_SPEC_MISSING", raising=False)
    with pytest.raises(SpecError, match="SELFTRAIN_SPEC_MISSING"):
        load_spec("env:SELFTRAIN_SPEC_MISSING")


def test_spec_file_for_another_stage_is_refused(tmp_path, capsys):
    path = _spec(tmp_path, stage="mine-parts").write(tmp_path / "spec.json")
    assert main(["fit-objects", "--spec", str(path)]) == 2
    assert "mine-parts" in capsys.readouterr().err


def test_cli_reports_unknown_stage_with_exit_code_2(tmp_path):
    path = _spec(tmp_path, stage="bogus").write(tmp_path / "spec.json")
    proc = subprocess.run([sys.executable, "-m", "trainers", "bogus", "--spec", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "known stages:" in proc.stderr and "fit-objects" in proc.stderr


def test_result_document_has_the_agreed_fields(tmp_path):
    doc = result_document(_spec(tmp_path), StageResult(metrics={"eval/miou": 0.5}, model_path="/m.pt", steps=7))
    assert doc == {"status": "succeeded", "stage": "fit-objects", "metrics": {"eval/miou": 0.5},
                   "model_path": "/m.pt", "dataset_path": None, "steps": 7}
    json.dumps(doc)
