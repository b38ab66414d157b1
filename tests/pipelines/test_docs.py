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
