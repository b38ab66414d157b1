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


def test_each_job_names_the_stages_it_waits_for(tmp_path):
    paths = render.render_pipeline(K8S_CONFIG, tmp_path, "demo")
    jobs = {render.spec_of(render.load_manifest(p)).name: render.load_manifest(p) for p in paths}

    def depends(name):
        v = jobs[name]["metadata"]["annotations"]["selftrain.io/depends-on"]
        return v.split(",") if v else []

    assert depends("instance-teacher") == []
    assert depends("r1-train-proposals") == ["instance-teacher", "mine-train"]
    assert depends("r1-evaluate") == ["r1-train-proposals"]
    assert depends("r1-val") == ["r1-train-proposals"]
    # reads models:/...part-proposals@teacher: waits for the val-split evaluation that moves that alias
    assert "r1-val" in depends("r1-pseudo-label")
    assert "r2-val" in depends("rank-parts")
    # the baselines wait for what they read only, so they may run beside the rounds
    assert depends("evaluate-strips") == ["instance-teacher"]
    row = next(line for line in (tmp_path / "README.md").read_text().splitlines() if "`05-r1-train-proposals.yaml`" in line)
    assert row.rstrip(" |").endswith("instance-teacher (`00`), mine-train (`01`)")
    # the stage: refs stay refs (resolved by the job at its start), no checkpoint paths
    assert render.spec_of(jobs["r1-evaluate"]).inputs.models["candidate"].uri == "stage:r1-train-proposals"
    # the promotion rule sits on the val-split evaluation; the eval-split one only reports
    assert render.spec_of(jobs["r1-val"]).promotion is not None and render.spec_of(jobs["r1-evaluate"]).promotion is None


def _stage_graph(tmp_path, stages):
    from contract.spec import Promotion

    cfg = make_config(tmp_path)
    specs = []
    for s in stages:
        s = dict(s)
        promotion = s.pop("promotion", None)
        spec = cfg.new_stage_spec("r1", s.pop("stage"), s.pop("name", None), **s)
        if promotion:
            spec.promotion = Promotion(**promotion)
        specs.append(spec)
    return render.stage_graph(specs)


def test_the_stage_graph_follows_datasets_model_refs_and_alias_moves(tmp_path):
    deps = _stage_graph(tmp_path, [
        {"stage": "train", "output_model": "m", "output_dataset": "out"},
        {"stage": "label", "datasets": {"images": "out/train"}},
        {"stage": "eval", "models": {"candidate": "stage:train"}, "promotion": {"metric": "miou"}},
        {"stage": "use", "models": {"parts": "models:/m@teacher"}},
        {"stage": "alone", "datasets": {"images": "elsewhere"}},
        {"stage": "train", "name": "train-2", "output_model": "m", "datasets": {"images": "out"}},
        {"stage": "eval", "name": "eval-2", "models": {"candidate": "stage:train-2"}, "promotion": {"metric": "miou"}},
        {"stage": "use", "name": "use-2", "models": {"parts": "models:/m@teacher"}},
        {"stage": "use", "name": "use-pinned", "models": {"parts": "models:/m/1", "f": "/elsewhere/model.pt"}},
    ])
    assert deps == {
        "train": [], "label": ["train"], "eval": ["train"],
        "use": ["eval"],  # the stage that moves m@teacher (which itself waits for the trainer)
        "alone": [],
        "train-2": ["train"],  # registers m after train: version numbers follow the pipeline order
        "eval-2": ["eval", "use", "train-2"],  # moves m@teacher only after use read it and eval moved it
        "use-2": ["eval-2"],
        "use-pinned": [],
    }


def test_a_stage_ref_to_a_later_or_unknown_stage_is_an_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="names stage 'later'"):
        _stage_graph(tmp_path, [{"stage": "use", "models": {"m": "stage:later"}}, {"stage": "train", "name": "later"}])


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
