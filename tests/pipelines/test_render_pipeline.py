"""A whole pipeline as files for kubectl apply: numbered stage manifests, their README, and the checked-in copy."""
from __future__ import annotations

import filecmp
from pathlib import Path

import yaml

from control_helpers import make_config
from pipelines import render

REPO = Path(__file__).resolve().parents[2]
K8S_CONFIG = REPO / "configs" / "partdistillation-k8s.yaml"
CHECKED_IN = REPO / "manifests" / "pipeline"


def test_render_pipeline_writes_numbered_jobs_and_a_readme_in_stage_order(tmp_path):
    paths = render.render_pipeline(K8S_CONFIG, tmp_path, "demo")
    assert paths[0].name == "00-instance-teacher.yaml"
    assert [p.name[:2] for p in paths] == [f"{i:02d}" for i in range(len(paths))]
    readme = (tmp_path / "README.md").read_text()
    for p in paths:
        assert f"`{p.name}`" in readme
    assert readme.index("00-instance-teacher.yaml") < readme.index("01-mine-train.yaml")


def test_stages_that_read_earlier_outputs_say_so(tmp_path):
    paths = render.render_pipeline(K8S_CONFIG, tmp_path, "demo")
    jobs = {render.spec_of(render.load_manifest(p)).name: render.load_manifest(p) for p in paths}
    depends = jobs["r1-train-proposals"]["metadata"]["annotations"]["selftrain.io/depends-on"].split(",")
    assert {"instance-teacher", "mine-train"} <= set(depends)
    assert jobs["instance-teacher"]["metadata"]["annotations"]["selftrain.io/depends-on"] == ""
    row = next(line for line in (tmp_path / "README.md").read_text().splitlines() if "`05-r1-train-proposals.yaml`" in line)
    assert row.rstrip(" |").endswith("mine-train, instance-teacher")


def test_data_dependencies_follow_datasets_model_files_and_registered_models(tmp_path):
    cfg = make_config(tmp_path, stages=[
        {"stage": "train", "output_model": "m", "output_dataset": "out"},
        {"stage": "label", "datasets": {"images": "out/train"}},
        {"stage": "eval", "models": {"candidate": "stage:train"}},
        {"stage": "use", "models": {"parts": "models:/m@teacher"}},
        {"stage": "alone", "datasets": {"images": "elsewhere"}},
    ])
    deps = render.data_dependencies(render.pin_stage_models(cfg.stage_specs("r1")))
    assert deps == {"train": [], "label": ["train"], "eval": ["train"], "use": ["train"], "alone": []}


def test_rendered_demo_manifests_are_portable(tmp_path):
    for p in render.render_pipeline(K8S_CONFIG, tmp_path, "demo"):
        text = p.read_text()
        assert "/work/" not in text and str(REPO) not in text, p.name
        spec = render.spec_of(yaml.safe_load(text))
        assert spec.outputs.workdir.startswith("/checkpoints/")
        assert all(d.path.startswith(("/data/", "/checkpoints/")) for d in spec.inputs.datasets.values())


def test_checked_in_pipeline_manifests_match_the_renderer(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    render.render_pipeline(K8S_CONFIG.relative_to(REPO), tmp_path, "demo")
    ours = sorted(p.name for p in CHECKED_IN.iterdir())
    assert ours == sorted(p.name for p in tmp_path.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(CHECKED_IN, tmp_path, ours, shallow=False)
    assert mismatch == [] and errors == [], (
        f"manifests/pipeline is stale ({mismatch or errors}): "
        "run `selftrain render configs/partdistillation-k8s.yaml -o manifests/pipeline --run demo`")


def test_a_second_render_of_a_shorter_pipeline_removes_the_stale_stage_files(tmp_path):
    long = make_config(tmp_path, stages=[{"stage": "a"}, {"stage": "b"}, {"stage": "c"}])
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(long.model_dump(exclude_defaults=True)))
    render.render_pipeline(tmp_path / "long.yaml", tmp_path / "out", "r")
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({**long.model_dump(exclude_defaults=True), "stages": [{"stage": "a"}]}))
    render.render_pipeline(tmp_path / "short.yaml", tmp_path / "out", "r")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00-a.yaml", "README.md"]


def test_gang_scheduling_and_queue_labels_come_from_the_kubernetes_section(tmp_path):
    cfg = make_config(tmp_path, executor={"kubernetes": {
        "scheduling_policy": {"minAvailable": 2, "queue": "training", "priorityClass": "high"},
        "labels": {"kueue.x-k8s.io/queue-name": "gpu"}}})
    spec = cfg.new_stage_spec("r1", "fit", resources={"replicas": 2})
    job = render.render_stage(spec, cfg.executor.kubernetes, run="r1")
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2, "queue": "training", "priorityClass": "high"}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    plain = render.render_stage(spec, make_config(tmp_path).executor.kubernetes)
    assert "schedulingPolicy" not in plain["spec"]["runPolicy"]
