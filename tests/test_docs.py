"""The documentation stands on its own: no links to missing pages, no citations of documents not in the repo."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_resolve():
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing


def test_no_citations_of_documents_outside_the_repo():
    pattern = re.compile(r"facts §|official-beitv2-facts|peer-implementations\.md|shared/reference")
    files = DOCS + sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "src").rglob("*.yaml"))
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits
