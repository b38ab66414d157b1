"""Promotion and model registration on a real MLflow store (SQLite), and against a real ``mlflow server``."""
from __future__ import annotations

import pytest

from pipelines.config import PromotionPolicy
from pipelines.lineage import Lineage, resolve_model


@pytest.fixture
def lineage(tmp_path) -> Lineage:
    return Lineage(f"sqlite:///{tmp_path / 'mlflow.db'}", "test", (tmp_path / "artifacts").as_uri())


def candidate(lineage: Lineage, tmp_path, name: str, value: float | None, succeeded: bool = True) -> str:
    """Register a model version (a file in a finished run) and record its evaluation."""
    run_id = lineage.client.create_run(lineage.experiment_id).info.run_id
    f = tmp_path / f"model-{run_id}.pt"
    f.write_bytes(f"weights {value}".encode())
    version = str(lineage.register_model(run_id, name, f).version)
    lineage.record_evaluation(name, version, {} if value is None else {"miou": value}, succeeded)
    return version


def holder(lineage: Lineage, name: str, alias: str = "teacher") -> str:
    return str(lineage.client.get_model_version_by_alias(name, alias).version)


def tags(lineage: Lineage, name: str, version: str) -> dict[str, str]:
    return {k: v for k, v in lineage.client.get_model_version(name, version).tags.items() if k.startswith("promotion.teacher.")}


POLICY = PromotionPolicy(metric="miou", direction="max", min_delta=0.0)


def test_first_successful_candidate_takes_both_aliases(lineage, tmp_path):
    v1 = candidate(lineage, tmp_path, "parts", 0.30)
    decisions = lineage.promote("parts", v1, POLICY)
    assert [(d.alias, d.promoted) for d in decisions] == [("teacher", True), ("champion", True)]
    assert holder(lineage, "parts", "teacher") == holder(lineage, "parts", "champion") == v1
    assert tags(lineage, "parts", v1)["promotion.teacher.reason"] == "first candidate with a successful evaluation"


def test_a_better_candidate_moves_the_alias_and_both_figures_are_recorded(lineage, tmp_path):
    v1 = candidate(lineage, tmp_path, "parts", 0.30)
    lineage.promote("parts", v1, POLICY)
    v2 = candidate(lineage, tmp_path, "parts", 0.35)
    (teacher, champion) = lineage.promote("parts", v2, POLICY)
    assert teacher.promoted and champion.promoted and holder(lineage, "parts") == v2
    t = tags(lineage, "parts", v2)
    assert t["promotion.teacher.decision"] == "promoted"
    assert float(t["promotion.teacher.candidate_value"]) == 0.35
    assert float(t["promotion.teacher.holder_value"]) == 0.30
    assert t["promotion.teacher.holder_version"] == v1
    assert "gain" in t["promotion.teacher.reason"]


def test_a_worse_candidate_leaves_the_alias(lineage, tmp_path):
    v1 = candidate(lineage, tmp_path, "parts", 0.30)
    lineage.promote("parts", v1, POLICY)
    v2 = candidate(lineage, tmp_path, "parts", 0.25)
    (teacher, _) = lineage.promote("parts", v2, POLICY)
    assert not teacher.promoted and holder(lineage, "parts") == v1
    t = tags(lineage, "parts", v2)
    assert (t["promotion.teacher.decision"], t["promotion.teacher.holder_version"]) == ("kept", v1)
    assert (float(t["promotion.teacher.candidate_value"]), float(t["promotion.teacher.holder_value"])) == (0.25, 0.30)


def test_a_failed_evaluation_never_takes_an_alias(lineage, tmp_path):
    v1 = candidate(lineage, tmp_path, "parts", 0.99, succeeded=False)
    (teacher, champion) = lineage.promote("parts", v1, POLICY)
    assert not teacher.promoted and not champion.promoted
    assert "no successful evaluation" in teacher.reason
    v2 = candidate(lineage, tmp_path, "parts", 0.10)
    lineage.promote("parts", v2, POLICY)
    v3 = candidate(lineage, tmp_path, "parts", 0.90, succeeded=False)
    lineage.promote("parts", v3, POLICY)
    assert holder(lineage, "parts") == v2
    assert tags(lineage, "parts", v3)["promotion.teacher.decision"] == "kept"


def test_min_delta_must_be_exceeded(lineage, tmp_path):
    policy = PromotionPolicy(metric="miou", direction="max", min_delta=0.05)
    v1 = candidate(lineage, tmp_path, "parts", 0.30)
    lineage.promote("parts", v1, policy)
    v2 = candidate(lineage, tmp_path, "parts", 0.34)  # better, but by less than min_delta
    assert not lineage.promote("parts", v2, policy)[0].promoted
    v3 = candidate(lineage, tmp_path, "parts", 0.36)
    assert lineage.promote("parts", v3, policy)[0].promoted
    assert holder(lineage, "parts") == v3


def test_direction_min_prefers_lower_values(lineage, tmp_path):
    policy = PromotionPolicy(metric="miou", direction="min")
    v1 = candidate(lineage, tmp_path, "loss-model", 0.5)
    lineage.promote("loss-model", v1, policy)
    v2 = candidate(lineage, tmp_path, "loss-model", 0.6)
    assert not lineage.promote("loss-model", v2, policy)[0].promoted
    v3 = candidate(lineage, tmp_path, "loss-model", 0.4)
    assert lineage.promote("loss-model", v3, policy)[0].promoted


def test_alias_resolves_to_the_downloadable_state_dict(lineage, tmp_path):
    v1 = candidate(lineage, tmp_path, "parts", 0.3)
    lineage.promote("parts", v1, POLICY)
    path = resolve_model("models:/parts@teacher", lineage.tracking_uri, dst=tmp_path / "dl")
    assert path.name.startswith("model-") and path.read_bytes() == b"weights 0.3"
    assert lineage.model_version("models:/parts@champion") == ("parts", v1)


@pytest.mark.slow
def test_promotion_and_download_against_a_real_mlflow_server(mlflow_server, tmp_path):
    lin = Lineage(mlflow_server, "server-test")
    v1 = candidate(lin, tmp_path, "parts", 0.30)
    lin.promote("parts", v1, POLICY)
    v2 = candidate(lin, tmp_path, "parts", 0.20)
    assert not lin.promote("parts", v2, POLICY)[0].promoted
    v3 = candidate(lin, tmp_path, "parts", 0.40)
    assert lin.promote("parts", v3, POLICY)[0].promoted
    assert holder(lin, "parts") == v3
    assert lin.client.get_model_version("parts", v3).source.startswith("mlflow-artifacts:")
    path = resolve_model("models:/parts@teacher", mlflow_server, dst=tmp_path / "dl")
    assert path.read_bytes() == b"weights 0.4"


def test_the_promotion_metric_may_be_named_as_the_evaluator_names_it(lineage, tmp_path):
    run_id = lineage.client.create_run(lineage.experiment_id).info.run_id
    f = tmp_path / "m.pt"
    f.write_bytes(b"w")
    v = str(lineage.register_model(run_id, "props", f).version)
    lineage.record_evaluation("props", v, {"eval/AR_10": 0.4}, True)  # MLflow metric names have no "@"
    (teacher, _) = lineage.promote("props", v, PromotionPolicy(metric="AR@10"))
    assert teacher.promoted and teacher.candidate_value == 0.4


def test_teacher_alias_is_run_scoped_while_champion_is_best_across_runs(tmp_path):
    """A new pipeline run starts its own teacher line; champion still needs to beat the best so far."""
    from pipelines.config import PromotionPolicy
    from pipelines.lineage import Lineage

    lin = Lineage(f"sqlite:///{tmp_path / 'm.db'}", "exp", (tmp_path / "art").as_uri())
    policy = PromotionPolicy(metric="AR_10", direction="max", min_delta=0.0)
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    versions = {}
    for run, value in (("run-a", 0.5), ("run-b", 0.3)):
        stage = lin.client.create_run(lin.experiment_id, tags={"selftrain.run": run}).info.run_id
        mv = lin.register_model(stage, "parts", model, tags={"selftrain.run": run})
        lin.record_evaluation("parts", mv.version, {"AR_10": value}, True)
        versions[run] = (str(mv.version), {d.alias: d for d in lin.promote("parts", mv.version, policy)})
    b_version, b_decisions = versions["run-b"]
    assert b_decisions["teacher"].promoted and "run-a" in b_decisions["teacher"].reason
    assert not b_decisions["champion"].promoted
    assert str(lin.client.get_model_version_by_alias("parts", "teacher").version) == b_version
    assert str(lin.client.get_model_version_by_alias("parts", "champion").version) == versions["run-a"][0]
