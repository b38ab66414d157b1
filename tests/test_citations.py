"""Code cites the project's own docs, and every cited section exists."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("contract", "pipelines", "trainers", "benchmarks") for p in (REPO / d).rglob("*.py")]


def test_code_never_cites_documents_outside_the_repository() -> None:
    bad = [f"{p.relative_to(REPO)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"\b(DESIGN|STYLE)\.md\b", line)]
    assert not bad, f"cite docs/architecture.md instead: {bad}"


def test_every_cited_architecture_section_exists() -> None:
    headings = {h.strip().lower() for h in re.findall(r"^#+ (.+)$", (REPO / "docs" / "architecture.md").read_text(), re.M)}
    cited = {(p.relative_to(REPO), m.lower()) for p in SOURCES for m in re.findall(r'docs/architecture\.md "([^"]+)"', p.read_text())}
    assert cited, "no code cites docs/architecture.md"
    missing = sorted(f"{p}: {s!r}" for p, s in cited if s not in headings)
    assert not missing, missing
