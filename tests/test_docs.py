"""The README is a user guide: short, the first request to the service near the top, and every
relative link in it and in the guides it points to names a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GUIDES = [README, REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Linked from the README, made outside the test suite (a browser screenshot the lead commits).
NOT_YET_IN_TREE = {"docs/images/upload-page.png"}
MAX_README_LINES = 250
FIRST_PREDICT_BY_LINE = 60

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)
    return {_slug(h) for h in headings}


def _relative_links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it a guide"


def test_readme_shows_a_prediction_request_near_the_top() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    first = next((n for n, line in enumerate(lines, 1) if re.search(r"\bcurl\b.*/predict\b", line)), None)
    assert first is not None, "README.md never shows `curl …/predict`"
    assert first <= FIRST_PREDICT_BY_LINE, f"the first `curl …/predict` is on line {first}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(guide: Path) -> None:
    broken = []
    for link in _relative_links(guide):
        target, _, anchor = link.partition("#")
        path = (guide.parent / target).resolve() if target else guide
        if str(path.relative_to(REPO)) in NOT_YET_IN_TREE:
            continue
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading with that anchor")
    assert not broken, f"{guide.relative_to(REPO)}: " + "; ".join(broken)
