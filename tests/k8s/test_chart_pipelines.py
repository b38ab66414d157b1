"""The chart runs every built-in pipeline through its `pipeline:` value: a release that sets `pipeline.pipeline: casp`
(or luss, dense) and that pipeline's section gets a driver config that loads as that pipeline (the chart's
PartDistillation defaults do not leak into it), rendered by helm 3 and helm 4 without a cluster."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helm_tools import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "selftrain"


@pytest.fixture(scope="module", params=[3, 4], ids=["helm3", "helm4"])
def helm(request):
    return helm_binary(request.param)


def _configs() -> dict[str, Path]:
    """One shipped config per pipeline name (the first in sorted order)."""
    out: dict[str, Path] = {}
    for p in sorted((REPO / "configs").glob("*.yaml")):
        doc = yaml.safe_load(p.read_text()) or {}
        if isinstance(doc, dict) and isinstance(doc.get("pipeline"), str):
            out.setdefault(doc["pipeline"], p)
    return out


def test_the_chart_knows_every_registered_pipeline():
    from pipelines.config import PIPELINES, load_config  # noqa: F401  (load_config registers the built-in pipelines)

    load_config(REPO / "configs" / "partdistillation-demo.yaml")
    listed = re.search(r'range \$name := list ((?:"[a-z_]+" ?)+)', (CHART / "templates" / "_helpers.tpl").read_text()).group(1)
    with_section = {name for name, cls in PIPELINES.items() if name in cls.model_fields}  # not "custom" (a stages list)
    assert set(re.findall(r'"([a-z_]+)"', listed)) == with_section


@pytest.mark.parametrize("name", sorted(_configs()))
def test_a_release_of_each_pipeline_loads_as_that_pipeline(helm, name, tmp_path):
    from pipelines.config import PIPELINES, load_config

    cfg = yaml.safe_load(_configs()[name].read_text())
    cfg.pop("workspace", None)  # the chart owns the workspace (PVC mount paths)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"pipeline": cfg}))
    out = subprocess.run([str(helm), "template", "st", str(CHART), "-n", "ns", "--api-versions", "kubeflow.org/v1/PyTorchJob",
                          "--set", "image.repository=registry.example.com/ml/selftrain", "-f", str(values)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (cm,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ConfigMap" and "pipeline.yaml" in d.get("data", {})]
    driver_config = yaml.safe_load(cm["data"]["pipeline.yaml"])
    assert name in driver_config and not (set(PIPELINES) - {name}) & set(driver_config)
    (tmp_path / "pipeline.yaml").write_text(cm["data"]["pipeline.yaml"])
    loaded = load_config(tmp_path / "pipeline.yaml")
    assert type(loaded) is PIPELINES[name] and loaded.executor.kind == "kubernetes"
    assert loaded.stage_specs("r")
