"""The documentation stands on its own: no links to missing pages or sections, no citations of documents not in the
repo (an upstream document is named with its folder in the official repository, e.g. ``beit2/TOKENIZER.md``)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "src").rglob("*.yaml")),
        *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py")), ROOT / "Makefile"]
SELF = Path(__file__).resolve()
# the official repository's documents (microsoft/unilm, folder beit2/) that the recipes follow
UPSTREAM = ("TOKENIZER.md", "PRETRAINING.md", "get_started_for_image_classification.md")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # a '#' comment in a code block is no heading
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def links(doc: Path) -> list[str]:
    text = doc.read_text()
    return re.findall(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text,
                                                                                    flags=re.M)


def test_relative_links_resolve_to_pages_and_sections():
    missing = []
    for doc in DOCS:
        for target in links(doc):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            page = (doc.parent / path) if path else doc
            if not page.exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target} (no such file)")
            elif anchor and page.suffix == ".md" and anchor not in anchors(page):
                missing.append(f"{doc.relative_to(ROOT)} -> {target} (no such section)")
    assert not missing


def test_slug_matches_githubs_anchors():
    assert slug("Before / after on this machine's CPU") == "before--after-on-this-machines-cpu"
    assert slug("DALL-E's released dVAE (BEiT v1 as published)") == "dall-es-released-dvae-beit-v1-as-published"
    assert slug("`metrics.jsonl`") == "metricsjsonl"


def test_no_citations_of_documents_outside_the_repo():
    """No "facts §x" (a notes file users do not have), no bare "§x" that names no paper."""
    pattern = re.compile(r"facts\s*§?\s*\d|official-beitv2-facts|peer-implementations\.md|shared/reference"
                         r"|(?<!BEiT v[12] )§")
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in DOCS + CODE if f.resolve() != SELF
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits


def test_named_documents_exist_or_name_their_repository():
    """`docs/x.md` mentioned anywhere exists; the official documents are named as ``beit2/NAME.md``."""
    bad = []
    for f in DOCS + CODE:
        if f.resolve() == SELF:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            for name in re.findall(r"(?<![\w/.-])docs/[\w.-]+\.md", line):
                if not (ROOT / name).exists():
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {name} does not exist")
            for name in UPSTREAM:
                for m in re.finditer(re.escape(name), line):
                    if not line[:m.start()].endswith("beit2/"):
                        bad.append(f"{f.relative_to(ROOT)}:{i}: {name} without beit2/ (the official repo's folder)")
    assert not bad
