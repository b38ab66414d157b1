"""Every pipeline config other than PartDistillation's (whose checked-in manifests/ test_manifests.py applies) renders
with `selftrain render` to PyTorchJobs that the real local API server accepts (server-side dry run, strict
validation against the training operator's CRD), as `kubectl apply -f <dir>/` would send them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster_helpers import REPO, Cluster, namespace  # noqa: F401  (fixture)

pytestmark = pytest.mark.cluster


def _pipeline_configs() -> list[Path]:
    """The demo config of every pipeline but PartDistillation (one per pipeline: ``<pipeline>-demo.yaml`` when it exists)."""
    by_pipeline: dict[str, list[Path]] = {}
    for p in sorted((REPO / "configs").glob("*.yaml")):
        doc = yaml.safe_load(p.read_text()) or {}
        if isinstance(doc, dict) and doc.get("pipeline") not in (None, "partdistillation"):
            by_pipeline.setdefault(doc["pipeline"], []).append(p)
    return [next((p for p in ps if p.stem.endswith("-demo")), ps[0]) for _, ps in sorted(by_pipeline.items())]


CONFIGS = _pipeline_configs()


def test_there_are_pipelines_besides_partdistillation():
    assert {yaml.safe_load(p.read_text())["pipeline"] for p in CONFIGS} >= {"casp"}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_rendered_jobs_are_accepted_by_the_api_server(cluster: Cluster, namespace, config: Path, tmp_path: Path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "render", str(config), "-o", str(out), "--run", "check"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"selftrain render {config.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    docs = [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert docs and all(d["kind"] == "PyTorchJob" for d in docs)
    for d in docs:
        d["metadata"]["namespace"] = namespace
    applied = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=yaml.safe_dump_all(docs)).stdout
    assert applied.count("(server dry run)") == len(docs)
