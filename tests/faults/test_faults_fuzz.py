"""Issue 16 item 6: fuzzing (hypothesis) of the COCO and part importers, the stage spec and the pipeline config.

Every document starts valid and gets up to four random mutations (a value replaced by any JSON value, a key
deleted, a key added), or is replaced by random bytes. Whatever comes in, the outcome is a result or the project's
named error (DataError / SpecError / ParamsError / UnknownStage) naming the file; never a traceback from deep
inside a library. ``FAULTS_FUZZ_EXAMPLES`` sets the examples per target (CI: 200; the benchmark: more) and
``FAULTS_FUZZ_REPORT`` a JSON file the counts go to (``benchmarks/faults.py`` reads it).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import stages as registry
from contract.spec import SpecError
from pipelines.config import load_config
from trainers.__main__ import check_spec, load_spec
from trainers.data import coco_io, shards

EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FAULTS_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
COUNTS: dict[str, dict[str, int]] = {}
REPO = Path(__file__).resolve().parents[2]


def count(target: str, outcome: str) -> None:
    c = COUNTS.setdefault(target, {"examples": 0, "named": 0, "raw": 0})
    c["examples"] += 1
    c[outcome] += 1
    report = os.environ.get("FAULTS_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(COUNTS))


# -- mutations of a valid document ------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=8)
mutation = st.tuples(st.integers(min_value=0, max_value=10**6), st.sampled_from(["replace", "delete", "add"]),
                     json_values, st.text(max_size=6))


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def mutate(doc, mutations):
    doc = copy.deepcopy(doc)
    for pick, op, value, key in mutations:
        paths = list(_paths(doc))
        path = paths[pick % len(paths)]
        if not path:
            doc = value if op == "replace" else doc
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if op == "replace":
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[key] = value
        else:
            parent.append(value)
    return doc


documents = st.one_of(st.lists(mutation, min_size=1, max_size=4).map(lambda m: ("mutated", m)),
                      st.binary(max_size=64).map(lambda b: ("bytes", b)))


def as_text(base, drawn, fmt: str = "json") -> bytes:
    kind, value = drawn
    if kind == "bytes":
        return value
    doc = mutate(base, value)
    if fmt == "yaml":
        return yaml.safe_dump(doc, allow_unicode=True).encode()
    return json.dumps(doc).encode()  # NaN/Infinity as JSON's extension: json.loads reads them back


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- COCO instances and PartImageNet-style parts ----------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(scratch):
    d = scratch / "images"
    d.mkdir()
    for name, (h, w) in {"a.png": (12, 16), "b.png": (10, 10)}.items():
        (d / name).write_bytes(shards.encode_png(np.full((h, w, 3), 90, np.uint8)))
    return d


COCO = {
    "images": [{"id": 1, "file_name": "a.png", "height": 12, "width": 16}, {"id": 2, "file_name": "b.png", "height": 10, "width": 10}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 10, 1, 10, 8, 1, 8]], "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "segmentation": {"size": [10, 10], "counts": [20, 30, 50]}, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 1, "segmentation": {"size": [10, 10], "counts": "52203"}, "iscrowd": False},
    ],
    "categories": [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"},
                   {"id": 0, "name": "background"}],
}
PARTS = {
    "images": COCO["images"],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 11, "segmentation": [[1, 1, 6, 1, 6, 8, 1, 8]]},
        {"id": 2, "image_id": 1, "category_id": 12, "segmentation": [[6, 1, 10, 1, 10, 8, 6, 8]]},
        {"id": 3, "image_id": 2, "category_id": 13, "segmentation": {"size": [10, 10], "counts": [20, 30, 50]}},
    ],
    "categories": [{"id": 11, "name": "head", "supercategory": "cat"}, {"id": 12, "name": "body", "supercategory": "cat"},
                   {"id": 13, "name": "tail", "supercategory": "dog"}],
}


def _import(target, write, path: Path, expect=(shards.DataError,)) -> str:
    """'refused' (a named error naming the file or sample) or 'imported'; any other exception fails the test."""
    try:
        write()
    except expect as e:
        assert path.name in str(e) or (getattr(e, "source", None) or "").endswith(path.name) or "sample" in str(e), \
            f"{type(e).__name__} does not name the file: {e}"
        count(target, "named")
        return "refused"
    except Exception:
        count(target, "raw")
        raise
    count(target, "named")
    return "imported"


def _published(out: Path) -> bool:
    """An import that succeeded published a complete, readable dataset (index and every shard)."""
    index = shards.DatasetIndex.load(out)
    return index.num_samples == sum(s["num_samples"] for s in index.shards) and len(list(shards.iter_samples(out, decode=False, allow_parts=True))) == index.num_samples


@FUZZ
@given(doc=documents, skip_bad=st.booleans())
def test_coco_importer_fails_only_with_named_errors(scratch, image_dir, doc, skip_bad):
    path = scratch / "instances.json"
    path.write_bytes(as_text(COCO, doc))
    out = scratch / "coco-out"
    shutil.rmtree(out, ignore_errors=True)
    outcome = _import("COCO instances importer", lambda: coco_io.import_coco(path, image_dir, out, name="fz", skip_bad=skip_bad), path)
    assert outcome == "refused" or _published(out)


@FUZZ
@given(doc=documents, skip_bad=st.booleans(), as_training=st.booleans(),
       objects_from=st.sampled_from(coco_io.OBJECTS_FROM), with_instances=st.booleans())
def test_part_importer_fails_only_with_named_errors(scratch, image_dir, doc, skip_bad, as_training, objects_from,
                                                   with_instances):
    path = scratch / "parts.json"
    path.write_bytes(as_text(PARTS, doc))
    inst = None
    if with_instances:
        inst = scratch / "parts-instances.json"
        inst.write_text(json.dumps(COCO))
        objects_from = "union"
    out = scratch / "parts-out"
    shutil.rmtree(out, ignore_errors=True)
    outcome = _import("part importer", lambda: coco_io.import_partimagenet(
        path, image_dir, out, name="fz", instances_json=inst, objects_from=objects_from, as_training=as_training,
        skip_bad=skip_bad), path)
    assert outcome == "refused" or _published(out)


# -- the stage spec ---------------------------------------------------------------------------------
SPEC = {
    "api_version": "selftrain/v1", "stage": "mine-parts", "name": "r1-mine",
    "inputs": {"datasets": {"images": {"path": "/data/train", "dvc_hash": "abc.dir"}},
               "models": {"teacher": {"uri": "models:/teacher@champion"}}},
    "outputs": {"dataset": "/data/mined", "workdir": "/runs/r1/mine"},
    "params": {"k": 4, "metric": "cosine", "feature_levels": [0, 1], "batch_size": 8},
    "resources": {"replicas": 1, "nproc_per_node": 2, "deepspeed": {"zero_optimization": {"stage": 2}}},
    "tracking": {"mlflow_uri": "sqlite:///mlflow.db", "run_id": None},
    "promotion": None,
}


@FUZZ
@given(doc=documents, suffix=st.sampled_from([".json", ".yaml"]))
def test_stage_spec_fails_only_with_named_errors(scratch, doc, suffix):
    path = scratch / f"spec{suffix}"
    path.write_bytes(as_text(SPEC, doc, "json" if suffix == ".json" else "yaml"))

    def load():
        check_spec(load_spec(str(path)))

    try:
        load()
    except (SpecError, registry.ParamsError, registry.UnknownStage) as e:
        if isinstance(e, SpecError):
            assert str(path) in str(e) or "stage " in str(e), f"SpecError does not name the file: {e}"
        count("stage spec", "named")
        return
    except Exception:
        count("stage spec", "raw")
        raise
    count("stage spec", "named")


# -- the pipeline config ----------------------------------------------------------------------------
def _demo_config() -> dict:
    return yaml.safe_load((REPO / "configs" / "partdistillation-demo.yaml").read_text())


CONFIGS = {"partdistillation": _demo_config(), "custom": {
    "pipeline": "custom", "workspace": {"root": "ws"},
    "stages": [{"stage": "fit-objects", "name": "fit", "params": {"steps": 5, "lr": 0.01},
                "datasets": {"train": "partworld/train"}, "output_model": "fit"}],
    "executor": {"kind": "render", "max_parallel": 2}, "deepspeed": {"zero_stage": 2}}}


@FUZZ
@given(doc=documents, which=st.sampled_from(sorted(CONFIGS)))
def test_pipeline_config_fails_only_with_named_errors(scratch, doc, which):
    path = scratch / "pipeline.yaml"
    path.write_bytes(as_text(CONFIGS[which], doc, "yaml"))
    try:
        load_config(path)
    except SpecError as e:
        assert str(path) in str(e), f"SpecError does not name the file: {e}"
        count("pipeline config", "named")
        return
    except Exception:
        count("pipeline config", "raw")
        raise
    count("pipeline config", "named")


def test_mutations_reach_every_field():
    """The mutator can touch every key of the documents (a guard on the fuzzing itself)."""
    paths = list(_paths(SPEC))
    assert ("params", "k") in paths and ("resources", "deepspeed", "zero_optimization", "stage") in paths
    doc = mutate(SPEC, [(paths.index(("params", "k")), "replace", math.inf, "")])
    assert doc["params"]["k"] == math.inf and SPEC["params"]["k"] == 4


# -- the Helm chart's values ------------------------------------------------------------------------
CHART = REPO / "charts" / "selftrain"
HELM_EXAMPLES = int(os.environ.get("FAULTS_FUZZ_HELM_EXAMPLES", "25"))  # a helm template each: fewer than the others
HELM_FUZZ = settings(FUZZ, max_examples=HELM_EXAMPLES)
HELM_VALUES = {**yaml.safe_load((CHART / "values.yaml").read_text()),
               "image": {**yaml.safe_load((CHART / "values.yaml").read_text())["image"], "repository": "registry.example.com/ml/selftrain"}}
HELM_NAMED = ("values don't meet the specifications of the schema",  # values.schema.json, with the field's path
              "execution error at (")  # the chart's own `fail`/`required`, with its message


@pytest.fixture(scope="module")
def helm():
    import sys

    sys.path.insert(0, str(REPO / "tests" / "k8s"))
    from helm_tools import helm_binary

    return helm_binary(4)


def helm_outcome(helm, values: Path) -> tuple[str, str]:
    """("valid" | "named" | "raw", helm's stderr) of ``helm template`` with ``values`` over the chart's defaults."""
    import subprocess

    p = subprocess.run([str(helm), "template", "st", str(CHART), "-n", "ns", "--api-versions", "kubeflow.org/v1/PyTorchJob",
                        "-f", str(values)], capture_output=True, text=True, timeout=120)
    if p.returncode == 0:
        try:
            docs = [d for d in yaml.safe_load_all(p.stdout) if d]
        except yaml.YAMLError as e:
            return "raw", f"rendered, but not YAML: {e}"
        config = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"].endswith("-pipeline")]
        if config:  # the `pipeline` values become the driver's config: selftrain refuses a bad one naming the key
            path = values.with_name("pipeline.yaml")
            path.write_text(config[0]["data"]["pipeline.yaml"])
            try:
                load_config(path)
            except SpecError as e:
                return "named", str(e)
            except Exception as e:  # noqa: BLE001 - the outcome is what counts
                return "raw", f"pipeline config from the chart: {type(e).__name__}: {e}"
        return "valid", ""
    if any(s in p.stderr for s in HELM_NAMED) or (f"{values}" in p.stderr and "Error: failed to parse" in p.stderr):
        return "named", p.stderr
    return "raw", p.stderr


# strings a template could paste into a manifest: YAML indicators, quotes, braces, newlines
nasty = st.text(alphabet=st.sampled_from(list(":\n\"'{}[]-#&*!|>%@` a1./")), min_size=1, max_size=10)
helm_documents = st.one_of(documents, st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.just("replace"), nasty,
                                                         st.just("")), min_size=1, max_size=3).map(lambda m: ("mutated", m)))


@HELM_FUZZ
@given(doc=helm_documents)
def test_helm_values_fail_only_with_named_errors(scratch, helm, doc):
    """A values file (deleted keys written as null, as a user unsets a default) is rendered, or refused by the schema
    naming the field, or by the chart's own check; never a Go template error or a broken manifest. The `pipeline`
    values the chart renders into the driver's config must load, or be refused by selftrain naming the key."""
    kind, value = doc
    path = scratch / "values.yaml"
    if kind == "bytes":
        path.write_bytes(value)
    else:
        mutations = [(pick, "replace" if op == "delete" else op, None if op == "delete" else v, key)
                     for pick, op, v, key in value]
        path.write_text(yaml.safe_dump(mutate(HELM_VALUES, mutations), allow_unicode=True))
    outcome, err = helm_outcome(helm, path)
    count("Helm values (helm template)", "named" if outcome != "raw" else "raw")
    assert outcome != "raw", f"{path.read_text()[:2000]}\n-> {err[-2000:]}"


@pytest.mark.parametrize("values, field", [
    ({"image": {"tag": "1\n- x: y"}}, "/image/tag"),  # rendered a broken cleanup.yaml before the schema had patterns
    ({"fullnameOverride": "x\ny"}, "/fullnameOverride"),
    ({"serviceAccount": {"name": "a: b"}}, "/serviceAccount/name"),  # broke driver-job.yaml
    ({"tests": {"resources": {"requests": {"cpu": "lots"}}}}, "/tests/resources/requests/cpu"),  # the API server's refusal
    ({"nodeSelector": {"disk": "fast: yes"}}, "/nodeSelector/disk"),
    ({"checks": None}, ""),  # a default unset (helm drops it): was a nil pointer in checks.yaml, now "missing property"
    ({"pipeline": {"tracking": 3}}, "/pipeline/tracking"),  # was a Go template error in selftrain.pipelineConfig
])
def test_helm_values_fuzzing_found_are_refused_naming_the_field(scratch, helm, values, field):
    path = scratch / "found.yaml"
    doc = {"image": {"repository": "registry.example.com/ml/selftrain"}}
    doc.update({k: {**doc.get(k, {}), **v} if isinstance(v, dict) else v for k, v in values.items()})
    path.write_text(yaml.safe_dump(doc))
    outcome, err = helm_outcome(helm, path)
    assert outcome == "named" and "values don't meet the specifications of the schema" in err and f"at '{field}'" in err, err
    if values == {"checks": None}:
        assert "missing property 'checks'" in err, err
