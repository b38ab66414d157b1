"""``python -m trainers <stage> --help`` is generated from the stage's definition; a spec with a misspelt param is refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from contract import stages as registry
from contract.spec import Outputs, StageSpec

REPO = Path(__file__).resolve().parents[2]


def _trainers(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainers", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_stage_help_lists_inputs_and_every_param_with_its_default() -> None:
    p = _trainers("mine-parts", "--help")
    assert p.returncode == 0, p.stderr
    d = registry.get("mine-parts")
    assert p.stdout.startswith(f"mine-parts (label): {d.summary}")
    assert "  teacher: " in p.stdout and "  images: " in p.stdout
    for name, f in d.params.model_fields.items():
        assert f"  {name} (default {json.dumps(f.get_default(call_default_factory=True), default=str)}): {f.description}" in p.stdout


def test_a_spec_with_a_misspelt_param_is_refused_before_the_stage_runs(tmp_path: Path) -> None:
    spec = StageSpec(stage="mine-parts", name="mine", params={"kay": 3},
                     outputs=Outputs(dataset=str(tmp_path / "out"), workdir=str(tmp_path / "wd")))
    path = spec.write(tmp_path / "spec.json")
    p = _trainers("mine-parts", "--spec", str(path))
    assert p.returncode == 2
    assert "stage 'mine' params.kay: unknown key (allowed: " in p.stderr and "k, max_detections" in p.stderr
    assert not (tmp_path / "out").exists()
