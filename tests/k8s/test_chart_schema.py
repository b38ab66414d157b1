"""charts/selftrain/values.schema.json types every value of values.yaml (helm validates values against it)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "selftrain"


def _leaves(value, path=()):
    if isinstance(value, dict) and value and path != ("pipeline",):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path, value


def _schema_at(schema: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        props = schema.get("properties") or {}
        if key not in props and isinstance(schema.get("additionalProperties"), dict):
            schema = schema["additionalProperties"]  # a map (requests, limits, nodeSelector, ...)
            continue
        assert key in props, f"values.{'.'.join(path)}: no schema for {key!r}"
        schema = props[key]
    return schema


def test_every_value_has_a_typed_schema_entry():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    untyped = [".".join(p) for p, _ in _leaves(values) if not {"type", "const", "enum"} & set(_schema_at(schema, p))]
    assert untyped == []


def test_objects_with_fixed_keys_reject_unknown_ones():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def open_objects(s, path=""):
        if s.get("type") == "object" and "properties" in s and path != ".pipeline" and s.get("additionalProperties") is not False:
            if not path.startswith(".pipeline."):
                yield path or "<root>"
        for k, sub in (s.get("properties") or {}).items():
            yield from open_objects(sub, f"{path}.{k}")

    assert list(open_objects(schema)) == []
