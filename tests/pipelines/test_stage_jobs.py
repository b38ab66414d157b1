"""Stage jobs complete in themselves, and the pipeline as a graph: real MLflow (SQLite), real DVC with a local
remote, the real local executor running the rendered jobs (``python -m pipelines.stage_job``) with the stand-in
trainer program.

The main check: applying the rendered manifests one by one, as ``kubectl apply`` would on a cluster, gives the
same MLflow runs, registered versions, aliases and DVC versions as ``selftrain run`` (here with stages side by side).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from control_helpers import make_config
from pipelines import render
from pipelines.executors.local import LocalExecutor
from pipelines.lineage import Lineage
from pipelines.runner import PipelineError, run_stages
from stage_job_helpers import StandInExecutor, with_stand_in

pytestmark = pytest.mark.slow

PROMOTE = {"metric": "miou", "min_delta": 0.01}
PIPELINE = [
    {"stage": "produce", "params": {"k": 4}, "output_dataset": "mined", "output_model": "parts"},
    {"stage": "train", "name": "t1", "datasets": {"mined": "mined"}, "params": {"seed": 1}, "output_model": "proposals"},
    {"stage": "evaluate", "name": "e1", "models": {"candidate": "stage:t1"}, "params": {"metrics": {"miou": 0.3}}, "promotion": PROMOTE},
    {"stage": "label", "name": "l1", "datasets": {"mined": "mined"}, "models": {"parts": "models:/proposals@teacher"},
     "output_dataset": "labels"},
    {"stage": "train", "name": "t2", "datasets": {"labels": "labels"}, "models": {"init": "stage:t1"}, "params": {"seed": 2},
     "output_model": "proposals"},
    {"stage": "evaluate", "name": "e2", "models": {"candidate": "stage:t2"}, "params": {"metrics": {"miou": 0.5}}, "promotion": PROMOTE},
    {"stage": "alone", "name": "baseline", "datasets": {"mined": "mined"}, "params": {"metrics": {"miou": 0.1}}},
]


def _config(tmp_path, stages):
    return make_config(tmp_path, stages=stages, executor={"kubernetes": {"backoff_limit": 0}})


def _state(ws: Path, experiment: str = "selftrain") -> dict:
    """What a pipeline run left: stage runs, registered versions, aliases, DVC versions (run ids and times left out)."""
    client = MlflowClient(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("selftrain.kind") == "pipeline"]
    stages = {}
    for r in runs:
        if r.data.tags.get("selftrain.kind") != "stage":
            continue
        tags = {k: v for k, v in r.data.tags.items() if k.startswith(("selftrain.", "dataset.", "model."))}
        stages[r.data.tags["selftrain.stage"]] = {"status": r.info.status, "tags": tags, "params": r.data.params,
                                                   "metrics": r.data.metrics, "parent": r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id}
    models = {}
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{rm.name}'")
        models[rm.name] = {
            "versions": {str(v.version): {k: val for k, val in v.tags.items() if k != "evaluation.run_id"} for v in versions},
            "aliases": dict(sorted((a, str(v)) for a, v in rm.aliases.items())),
        }
    dvc_files = {p.relative_to(ws).as_posix(): p.read_text() for p in sorted((ws / "data").glob("*.dvc"))}
    remote = sorted(p.relative_to(ws / "dvc-remote").as_posix() for p in (ws / "dvc-remote").rglob("*") if p.is_file())
    return {"parents": len(parents), "stages": stages, "models": models, "dvc": dvc_files, "remote": remote}


def test_the_rendered_manifests_one_by_one_give_what_selftrain_run_gives(tmp_path):
    cfg = _config(tmp_path, PIPELINE)
    specs = cfg.stage_specs("r1")
    res = run_stages(cfg, specs, "r1", executor=StandInExecutor(), echo=lambda s: None, max_parallel=2)
    assert [s.status for s in res.stages] == ["succeeded"] * len(PIPELINE)
    driver = _state(tmp_path / "ws")
    shutil.move(tmp_path / "ws", tmp_path / "ws-driver")

    # the same config rendered to files, then each file run as it is, in order, by the local executor
    paths = render.write_manifests(cfg.stage_specs("r1"), tmp_path / "manifests", cfg.executor.kubernetes, run="r1")
    executor = LocalExecutor(echo=lambda s: None)
    for p in paths:
        executor.run(with_stand_in(render.load_manifest(p)), log_dir=tmp_path / "logs" / p.stem)
    by_hand = _state(tmp_path / "ws")

    assert by_hand["stages"] == driver["stages"]
    assert by_hand["models"] == driver["models"]
    assert by_hand["dvc"] == driver["dvc"] and by_hand["remote"] == driver["remote"]
    assert by_hand["parents"] == driver["parents"] == 1
    # what the jobs did, in detail: versions by stage, promotion, inputs resolved and recorded
    proposals = driver["models"]["proposals"]
    assert {v: t["selftrain.stage"] for v, t in proposals["versions"].items()} == {"1": "t1", "2": "t2"}
    assert proposals["aliases"] == {"champion": "2", "teacher": "2"}
    assert proposals["versions"]["1"]["promotion.teacher.decision"] == "promoted"
    assert proposals["versions"]["2"]["promotion.teacher.holder_version"] == "1"
    l1 = driver["stages"]["l1"]
    assert l1["params"]["model.parts.uri"] == "models:/proposals/1" and l1["tags"]["model.parts.ref"] == "models:/proposals@teacher"
    assert driver["stages"]["t2"]["params"]["model.init.uri"] == "models:/proposals/1"
    assert len(driver["remote"]) >= 2 and set(driver["dvc"]) == {"data/mined.dvc", "data/labels.dvc"}

    # applying a finished stage's manifest again changes nothing: the job sees its stage done and exits
    executor.run(with_stand_in(render.load_manifest(paths[1])), log_dir=tmp_path / "logs" / "again")
    assert _state(tmp_path / "ws") == by_hand


def test_independent_stages_run_side_by_side_and_dependents_wait(tmp_path):
    cfg = _config(tmp_path, [
        {"stage": "a", "output_dataset": "x"},
        {"stage": "b", "output_model": "m"},
        {"stage": "c", "datasets": {"x": "x"}, "models": {"m": "stage:b"}},
    ])
    ex = StandInExecutor(per_stage={"a": {"SLEEP": "4"}, "b": {"SLEEP": "4"}})
    res = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=ex, echo=lambda s: None, max_parallel=2)
    assert [s.status for s in res.stages] == ["succeeded"] * 3
    (a0, a1), (b0, b1), (c0, _) = ex.spans["a"], ex.spans["b"], ex.spans["c"]
    assert b0 < a1 and a0 < b1  # a and b overlapped
    assert c0 >= max(a1, b1)  # c waited for both
    assert [render.spec_of(j).name for j in ex.jobs][2] == "c"


def test_a_failing_stage_stops_the_graph_after_the_running_ones_finish(tmp_path):
    cfg = _config(tmp_path, [
        {"stage": "a", "params": {"fail": True}},
        {"stage": "b", "output_model": "m"},
        {"stage": "c", "models": {"m": "stage:b"}},
    ])
    ex = StandInExecutor(per_stage={"b": {"SLEEP": "3"}})
    with pytest.raises(PipelineError, match=r"(?s)^stage a failed.*evaluation failed on purpose"):
        run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=ex, echo=lambda s: None, max_parallel=2)
    assert json.loads((cfg.run_dir("r1") / "b" / "stage.json").read_text())["status"] == "succeeded"  # b was let finish
    assert "c" not in ex.spans and not (cfg.run_dir("r1") / "c" / "stage.json").exists()  # c never started
    client = Lineage(cfg.tracking_uri(), cfg.tracking.experiment).client
    marker = json.loads((cfg.run_dir("r1") / "a" / "stage.json").read_text())
    assert marker["status"] == "failed" and client.get_run(marker["mlflow_run_id"]).info.status == "FAILED"


def test_an_imported_teacher_is_a_pinned_model_input_recorded_in_lineage(tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"imported weights v1")
    stages = [
        {"stage": "use", "name": "from-file", "models": {"import_from": str(weights)}, "output_model": "teacher"},
        {"stage": "produce", "output_model": "src"},
        {"stage": "evaluate", "models": {"candidate": "stage:produce"}, "params": {"metrics": {"miou": 0.4}}, "promotion": PROMOTE},
        {"stage": "use", "name": "from-alias", "models": {"import_from": "models:/src@teacher"}},
    ]
    cfg = _config(tmp_path, stages)
    res = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=StandInExecutor(), echo=lambda s: None, max_parallel=1)
    client = Lineage(cfg.tracking_uri(), cfg.tracking.experiment).client
    by_name = {s.name: s for s in res.stages}
    run = client.get_run(by_name["from-file"].mlflow_run_id)
    sha = hashlib.sha256(b"imported weights v1").hexdigest()
    assert run.data.tags["model.import_from.sha256"] == run.data.params["model.import_from.sha256"] == sha
    assert run.data.params["model.import_from.uri"] == str(weights)
    aliased = client.get_run(by_name["from-alias"].mlflow_run_id)
    assert aliased.data.params["model.import_from.uri"] == "models:/src/1"
    assert aliased.data.tags["model.import_from.ref"] == "models:/src@teacher"
    assert json.loads((cfg.run_dir("r1") / "from-alias" / "stage.json").read_text())["inputs"]["models"]["import_from"]["version"] == "1"
    # other content at the same path is another input: the stage runs again; the unchanged ones are skipped
    weights.write_bytes(b"imported weights v2")
    again = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=StandInExecutor(), echo=lambda s: None, max_parallel=1)
    assert [s.status for s in again.stages] == ["succeeded", "skipped", "skipped", "skipped"]
    assert client.get_run(again.stages[0].mlflow_run_id).data.tags["model.import_from.sha256"] != sha


def test_a_rerun_keeps_the_alias_versions_finished_stages_ran_with(tmp_path):
    """l1 labels with models:/proposals@teacher while the alias is on t1's version; e2 then moves it to t2's. Running
    the same pipeline run again must skip l1 (its marker records version 1), not re-label with version 2."""
    cfg = _config(tmp_path, PIPELINE)
    run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=StandInExecutor(), echo=lambda s: None, max_parallel=1)
    client = Lineage(cfg.tracking_uri(), cfg.tracking.experiment).client
    assert str(client.get_model_version_by_alias("proposals", "teacher").version) == "2"
    marker = cfg.run_dir("r1") / "l1" / "stage.json"
    assert json.loads(marker.read_text())["inputs"]["models"]["parts"]["version"] == "1"
    again = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=StandInExecutor(), echo=lambda s: None, max_parallel=1)
    assert [s.status for s in again.stages] == ["skipped"] * len(PIPELINE)
    assert json.loads(marker.read_text())["inputs"]["models"]["parts"]["version"] == "1"
    # a stage that never finished resolves the alias as it is now
    shutil.rmtree(cfg.run_dir("r1") / "l1")
    third = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=StandInExecutor(), echo=lambda s: None, max_parallel=1)
    assert {s.name: s.status for s in third.stages}["l1"] == "succeeded"
    assert json.loads(marker.read_text())["inputs"]["models"]["parts"]["version"] == "2"
