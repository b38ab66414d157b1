"""Runner: stages as whole stage jobs through the local executor, lineage in MLflow, skip on re-run, promotion by spec.promotion."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from control_helpers import make_config
from stage_job_helpers import StandInExecutor
from pipelines.lineage import Lineage, resolve_model
from pipelines.runner import PipelineError, run_pipeline, run_stages

pytestmark = pytest.mark.slow

STAGES = [
    {"stage": "produce", "params": {"k": 4, "metrics": {"train/loss": 0.5}}, "output_dataset": "mined", "output_model": "parts"},
    {"stage": "consume", "datasets": {"mined": "mined"}, "params": {"metrics": {"train/loss": 0.25}}},
]


def _config(tmp_path, stages=STAGES, **extra):
    return make_config(tmp_path, stages=stages, executor={"kubernetes": {"backoff_limit": 0}}, **extra)


def _executor(tmp_path, **env):
    return StandInExecutor(env)


def _starts(cfg, run, name) -> int:
    p = cfg.run_dir(run) / name / "starts.txt"
    return len(p.read_text().splitlines()) if p.exists() else 0


def test_stages_become_nested_runs_with_dataset_hashes_and_a_model_version(tmp_path):
    cfg = _config(tmp_path)
    res = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=_executor(tmp_path), echo=lambda s: None)
    assert [s.status for s in res.stages] == ["succeeded", "succeeded"]
    produce, consume = res.stages
    assert produce.output_hash and produce.output_hash.endswith(".dir")
    client = Lineage(cfg.tracking_uri(), cfg.tracking.experiment).client
    parent = client.get_run(res.mlflow_run_id)
    assert parent.data.tags["selftrain.run"] == "r1" and parent.info.status == "FINISHED"
    p_run, c_run = client.get_run(produce.mlflow_run_id), client.get_run(consume.mlflow_run_id)
    assert p_run.data.tags["mlflow.parentRunId"] == c_run.data.tags["mlflow.parentRunId"] == res.mlflow_run_id
    # the hash of the dataset one stage wrote is on the run that wrote it and on the run that read it
    assert p_run.data.params["dataset.output.dvc_hash"] == produce.output_hash
    assert c_run.data.params["dataset.mined.dvc_hash"] == produce.output_hash
    assert c_run.data.tags["dataset.mined.dvc_hash"] == produce.output_hash
    assert p_run.data.params["params.k"] == "4"
    assert p_run.data.metrics["train/loss"] == 0.5
    artifacts = {a.path for a in client.list_artifacts(produce.mlflow_run_id)}
    assert {"stage_spec.json", "result.json", "pytorchjob.yaml", "logs", "model"} <= artifacts
    assert produce.model_version == "1"
    mv = client.get_model_version("parts", "1")
    assert mv.run_id == produce.mlflow_run_id
    assert json.loads(resolve_model("models:/parts/1", cfg.tracking_uri(), dst=tmp_path / "dl").read_text())["k"] == 4


def test_rerunning_a_pipeline_run_skips_the_stages_that_are_done(tmp_path):
    cfg = _config(tmp_path)
    first = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=_executor(tmp_path), echo=lambda s: None)
    again = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=_executor(tmp_path), echo=lambda s: None)
    assert [s.status for s in again.stages] == ["skipped", "skipped"]
    assert again.mlflow_run_id == first.mlflow_run_id  # the same parent run, resumed
    assert [s.fingerprint for s in again.stages] == [s.fingerprint for s in first.stages]
    assert _starts(cfg, "r1", "produce") == 1 and _starts(cfg, "r1", "consume") == 1


def test_changed_params_run_the_stage_again_in_a_fresh_workdir(tmp_path):
    cfg = _config(tmp_path)
    run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=_executor(tmp_path), echo=lambda s: None)
    changed = [dict(STAGES[0], params={"k": 8}), STAGES[1]]
    cfg2 = _config(tmp_path, stages=changed)
    res = run_stages(cfg2, cfg2.stage_specs("r1"), "r1", executor=_executor(tmp_path), echo=lambda s: None)
    # produce changed; consume reads a dataset whose content (hash) changed, so it runs again too
    assert [s.status for s in res.stages] == ["succeeded", "succeeded"]
    assert _starts(cfg2, "r1", "produce") == 1
    assert len(list(cfg2.run_dir("r1").glob("produce.replaced-*"))) == 1
    assert len(list(Path(cfg2.paths.data).glob("mined.replaced-*"))) == 1  # no stale shards either


def test_a_failing_stage_fails_the_pipeline_with_its_log(tmp_path):
    cfg = _config(tmp_path, stages=[{"stage": "produce", "params": {"fail": True}}])
    with pytest.raises(PipelineError, match=r"(?s)stage produce failed.*master-0: exit code 1.*evaluation failed on purpose"):
        run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=_executor(tmp_path), echo=lambda s: None)
    marker = json.loads((cfg.run_dir("r1") / "produce" / "stage.json").read_text())
    assert marker["status"] == "failed"
    client = Lineage(cfg.tracking_uri(), cfg.tracking.experiment).client
    assert client.get_run(marker["mlflow_run_id"]).info.status == "FAILED"


def _round(train_miou: float, name: str, fail: bool = False) -> list[dict]:
    return [
        {"stage": "train", "name": f"{name}-train", "params": {"seed": name}, "output_model": "proposals"},
        {"stage": "evaluate", "name": f"{name}-evaluate", "models": {"candidate": f"stage:{name}-train"},
         "params": {"metrics": {"miou": train_miou}, "fail": fail}, "promotion": {"metric": "miou", "min_delta": 0.01}},
    ]


def test_evaluate_stages_promote_only_better_candidates(tmp_path):
    stages = _round(0.30, "r1") + _round(0.20, "r2") + _round(0.90, "r3", fail=True) + _round(0.40, "r4")
    cfg = _config(tmp_path, stages=stages[:6])
    with pytest.raises(PipelineError, match=r"teacher: kept \(candidate has no successful evaluation of miou\)"):
        run_stages(cfg, cfg.stage_specs("p"), "p", executor=_executor(tmp_path), echo=lambda s: None)
    client = Lineage(cfg.tracking_uri(), cfg.tracking.experiment).client
    assert client.get_model_version_by_alias("proposals", "teacher").version == 1  # r2 worse, r3 failed
    assert client.get_model_version("proposals", "2").tags["promotion.teacher.decision"] == "kept"
    assert client.get_model_version("proposals", "3").tags["evaluation.status"] == "failed"
    cfg = _config(tmp_path, stages=stages[:4] + stages[6:])
    res = run_stages(cfg, cfg.stage_specs("p"), "p", executor=_executor(tmp_path), echo=lambda s: None)
    assert [s.status for s in res.stages] == ["skipped"] * 4 + ["succeeded"] * 2
    assert [d.promoted for d in res.stages[-1].decisions] == [True, True]
    assert client.get_model_version_by_alias("proposals", "teacher").version == 4
    assert client.get_model_version_by_alias("proposals", "champion").version == 4


def test_render_executor_writes_numbered_manifests(tmp_path):
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(
        "executor: {kind: render, manifests: out/manifests}\n"
        "stages:\n  - {stage: produce, output_dataset: mined}\n  - {stage: consume}\n"
    )
    paths = run_pipeline(cfg_file, run="r1")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["out/manifests/00-produce.yaml", "out/manifests/01-consume.yaml"]


def test_pipeline_runs_against_a_real_mlflow_server(tmp_path, mlflow_server):
    stages = [dict(STAGES[0], output_model="runner-parts"), STAGES[1]]  # the server's registry is shared by the session
    cfg = _config(tmp_path, stages=stages, tracking={"uri": mlflow_server, "experiment": "runner"})
    res = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=_executor(tmp_path), echo=lambda s: None)
    client = Lineage(mlflow_server, "runner").client
    child = client.get_run(res.stages[1].mlflow_run_id)
    assert child.data.tags["mlflow.parentRunId"] == res.mlflow_run_id
    assert child.data.params["dataset.mined.dvc_hash"] == res.stages[0].output_hash
    path = resolve_model("models:/runner-parts/1", mlflow_server, dst=tmp_path / "dl")
    assert json.loads(path.read_text())["k"] == 4


def test_run_pipeline_from_a_config_file_reports_a_summary(tmp_path):
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text("stages:\n  - {stage: produce, output_model: parts, output_dataset: mined}\n")
    res = run_pipeline(cfg_file, run="r1", executor=_executor(tmp_path), echo=lambda s: None)
    assert (tmp_path / ".selftrain" / "mlflow" / "mlflow.db").exists()  # the embedded default store
    assert "produce: succeeded - model version 1; dataset " in res.summary


def test_an_interrupted_stage_runs_again_in_its_own_workdir(tmp_path):
    cfg = _config(tmp_path, stages=[STAGES[0]])
    failing_once = StandInExecutor({"FAIL_NODE": "0:1", "FAIL_ATTEMPTS": "1"})
    with pytest.raises(PipelineError):
        run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=failing_once, echo=lambda s: None)
    res = run_stages(cfg, cfg.stage_specs("r1"), "r1", executor=failing_once, echo=lambda s: None)
    assert res.stages[0].status == "succeeded"
    # same inputs and params: the workdir (and the trainer's checkpoints in it) is kept for the restart
    assert (cfg.run_dir("r1") / "produce" / "starts.txt").read_text().splitlines() == ["attempt 1", "attempt 2"]
    assert not list(cfg.run_dir("r1").glob("produce.replaced-*"))
