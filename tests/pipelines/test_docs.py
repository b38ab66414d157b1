"""The README's configuration reference is generated from the typed configs and kept in sync."""
from pathlib import Path

from pipelines import docs

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_in_sync_with_the_code() -> None:
    text = README.read_text()
    section = text.split(docs.BEGIN, 1)[1].split(docs.END, 1)[0].strip("\n")
    assert section == docs.reference().strip("\n"), "README config reference is stale: run `python -m pipelines.docs`"


def test_every_documented_config_is_importable_and_nonempty() -> None:
    ref = docs.reference()
    for title, _ in docs.DOCUMENTED:
        assert f"### {title}" in ref


def test_stage_reference_is_in_sync_with_the_stage_definitions() -> None:
    assert docs.STAGES_DOC.read_text() == docs.stage_reference(), "docs/stages.md is stale: run `python -m pipelines.docs`"


def test_stage_reference_lists_every_trainer_with_its_params() -> None:
    from contract import stages as registry

    ref = docs.stage_reference()
    for name, d in registry.STAGES.items():
        if d.entry.startswith("tests."):
            continue
        assert f"## `{name}` ({d.kind})" in ref
        for param in d.params.model_fields:
            assert f"| `{param}` |" in ref
