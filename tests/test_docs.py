"""The docs hold together: every relative link and #anchor in README.md, docs/ and datasets/README.md
resolves, and every place in code or configs that cites a doc section by its quoted name
(``docs/results-aasce.md, "Chain rescue"``) names text that the doc still holds. Measurements
move between the README and docs/ as they age; these catch the references left behind."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "datasets" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links and backticks dropped, lower case, punctuation
    removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(text: str) -> set:
    seen, out, code = {}, set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            code = not code
        m = None if code else re.match(r"#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def broken_links(path: Path) -> list:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    out = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, frag = target.partition("#")
        dest = (path.parent / file) if file else path
        if not dest.exists():
            out.append(f"{path.name}: {target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest.read_text("utf-8")):
            out.append(f"{path.name}: {target}: no such heading")
    return out


# `README, "Heading"` or `docs/x.md, "Some text"`, possibly wrapped onto a comment line
CITE = re.compile(r'(README|docs/[\w-]+\.md)(?:\]\([^)]*\))?,\s*(?:#\s*)?"([^"]+)"')


def citations(text: str):
    for m in CITE.finditer(text):
        quoted = re.sub(r"\s*\n\s*#?\s*", " ", m.group(2))
        yield m.group(1), quoted


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", ""))


def test_slug_follows_githubs_rule():
    assert slug("Chain rescue (`SPINE.LEVEL_HEAD.RESCUE`, on in the AASCE configs)") == (
        "chain-rescue-spinelevel_headrescue-on-in-the-aasce-configs"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_checker_sees_a_broken_link_and_anchor(tmp_path):
    doc = tmp_path / "doc.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Here it is\n")
    doc.write_text(
        "# Doc\n[ok](other.md#here-it-is) [ok](#doc) [gone](missing.md) [moved](other.md#not-here)"
        " [web](https://example.org/x#y)\n"
    )
    assert broken_links(doc) == [
        "doc.md: missing.md: no such file",
        "doc.md: other.md#not-here: no such heading",
    ]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(path):
    assert broken_links(path) == []


def test_cited_sections_exist():
    files = [
        p
        for pattern in ("spine_d2/**/*.py", "tools/*.py", "benchmarks/*.py", "datasets/*.py",
                        "tests/**/*.py", "configs/**/*.yaml", "Makefile", "datasets/README.md")
        for p in ROOT.glob(pattern)
        if p.name != "test_docs.py"
    ]  # fmt: skip
    seen, missing = 0, []
    for path in files:
        for doc, quoted in citations(path.read_text(encoding="utf-8")):
            seen += 1
            if _flat(quoted) not in _flat((ROOT / doc if doc != "README" else ROOT / "README.md")
                                          .read_text(encoding="utf-8")):  # fmt: skip
                missing.append(f"{path.relative_to(ROOT)}: {doc}, {quoted!r}")
    assert seen > 20  # the pattern still finds the citations
    assert missing == []


def test_a_citation_wrapped_onto_a_comment_line_is_read_whole():
    text = '# level accuracy 0.858 (docs/results-aasce.md,\n# "Real radiographs"). Against'
    assert list(citations(text)) == [("docs/results-aasce.md", "Real radiographs")]
    assert list(citations('(README, "CPU\ntraining recipe and levels")')) == [
        ("README", "CPU training recipe and levels")
    ]
