"""Every relative link in README.md and docs/ points at a file that exists, and at a heading of it
when it names one (GitHub's anchors): the README sends a newcomer to docs/, so a moved file or a
renamed section must fail here, not in front of a reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deploy.cluster import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def links(document: Path) -> list[str]:
    """The link targets of a Markdown file, code blocks left out."""
    return LINK.findall(FENCE.sub("", document.read_text()))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = FENCE.sub("", document.read_text())
    return {anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_the_documents_link_to_each_other() -> None:
    assert len(DOCUMENTS) > 5
    readme_links = links(REPO / "README.md")
    for document in DOCUMENTS[1:]:  # every topic is reachable from the front door
        assert f"docs/{document.name}" in readme_links, document.name


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_points_at_a_file_and_heading_that_exist(document: Path) -> None:
    broken = []
    for target in links(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        path, _, fragment = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{document.name}: {broken}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_code_block_is_closed(document: Path) -> None:
    """An unclosed fence swallows the rest of the page, headings and links included."""
    fences = re.findall(r"^```", document.read_text(), re.MULTILINE)
    assert len(fences) % 2 == 0, f"{document.name}: a code block is never closed"
