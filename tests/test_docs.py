"""The README and docs/: every relative link leads to a file of the repository."""

from __future__ import annotations

import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_file(), f"{page.relative_to(ROOT)}: broken link {target}"
            checked += 1
    assert checked >= 10  # the README links every page of docs/


@functools.cache
def _anchors(page: Path) -> frozenset[str]:
    """The heading anchors GitHub gives ``page``: lower case, punctuation but - and _ dropped,
    spaces as -, a repeated heading numbered -1, -2 ... (headings inside code fences are not)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        heading = None if fenced else re.match(r"#{1,6} (.*)", line)
        if heading:
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading[1].replace("`", "").strip())
            slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(anchors)


def test_every_link_to_a_section_finds_its_heading() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in LINK.findall(page.read_text()):
            file, _, anchor = target.partition("#")
            if "://" in target or not anchor or not (file or page.name).endswith(".md"):
                continue
            linked = (page.parent / file).resolve() if file else page
            assert anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading for {target}"
            checked += 1
    assert checked >= 10


def test_the_readme_defense_table_is_the_registry() -> None:
    """One README row per registered defense, listing exactly the flags its ``Args`` declares:
    adding a defense is its module and this row, and a flag added or dropped shows here."""
    import dataclasses

    from srd.defenses import DEFENSES

    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]) and cells[1] in (
            "-", "refine", "edit", "test-time"
        ):  # fmt: skip
            rows[cells[0].strip("`")] = set(re.findall(r"`--(\w+)`", cells[3]))
    assert set(rows) == set(DEFENSES)
    for name, cls in DEFENSES.items():
        assert rows[name] == {f.name for f in dataclasses.fields(cls.Args)}, name
