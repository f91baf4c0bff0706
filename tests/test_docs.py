"""The README stays the first ten minutes, and the docs' relative links lead somewhere.

Checks: README.md opens with the two commands that work on a fresh machine (``.ci/run`` runs the
second); it stays short (the reference lives under docs/); every relative markdown link in
README.md and docs/*.md names a file of this repository and, for a markdown file, one of its
headings (GitHub's anchors).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (unicode too)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 … for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = anchor(title)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: … are not ours


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# "), "the README starts with its title"
    body = [line for line in lines[1:8] if line.strip()]
    assert body[0] == "```bash", body[:4]
    assert body[1].startswith("./dev.sh run "), body[1]
    assert body[2].startswith("./dev.sh test "), body[2]
    assert body[3] == "```", "the first block holds the two commands only"
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text(), "CI runs the README's test command"


def test_readme_stays_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines: keep it the first ten minutes and move "
                                   "reference text to a page under docs/")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in links(page):
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment.lower() not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_anchor_rule():
    assert anchor("vLLM's own benchmark through the gateway (`--only serve`)") == \
        "vllms-own-benchmark-through-the-gateway---only-serve"
    assert anchor("Idle engines (issue 12, `bench_idle`)") == "idle-engines-issue-12-bench_idle"
    assert anchor("The GPUs a server may use, and MIG") == "the-gpus-a-server-may-use-and-mig"
