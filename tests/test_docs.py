"""The README and the manual in docs/: every relative link and anchor resolves, and the README opens with the two
commands a newcomer runs first (the second is the very command CI runs)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[(?:[^\]]|\][^(])*?\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The page without its fenced code blocks, which hold no links or headings."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def test_the_manual_has_pages() -> None:
    assert len(PAGES) > 5, PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... : not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not a page")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_is_closed(page: Path) -> None:
    fences = [n for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
              if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"an unclosed code block: fences at lines {fences}"


def test_the_slugs_follow_githubs_rule() -> None:
    assert slug("Signed checkpoints and witnesses") == "signed-checkpoints-and-witnesses"
    assert slug("2. Give keyturn the tokens (environment only)") == "2-give-keyturn-the-tokens-environment-only"
    assert slug("Ledger (WAL, synchronous=NORMAL, as shipped)") == "ledger-wal-synchronousnormal-as-shipped"
    assert slug("What policies see about tools keyturn never saw") == "what-policies-see-about-tools-keyturn-never-saw"
    assert slug("Loading tools: packs") == "loading-tools-packs"


def test_the_manual_is_reachable_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, missing


def test_the_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```sh\n(.*?)\n```", readme, re.M | re.S)
    first_lines = readme[: readme.index(blocks[1]) + len(blocks[1])]
    assert first_lines.count("```sh") == 2, "the two commands are the README's first two code blocks"
    run, test = blocks[0], blocks[1]
    assert run == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/keyturn serve --http 127.0.0.1:8765"
    assert test == "scripts/test"
    # CI runs the README's test command, nothing more; and that command is the whole suite.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.rstrip().splitlines()[-1] == f"exec {test}"
    script = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    assert "pytest" in script and "ruff" in script and "mypy" in script
    assert len(readme.splitlines()) <= 150, "the README is a front door; the manual is in docs/"
