"""Every path the documentation names exists: a reader who follows a link or opens a file
a doc names finds it.

What is checked, in README.md and docs/*.md, outside fenced code blocks (whose text is
commands and file contents, not references):

* **Links** ``[text](target)`` and ``![alt](target)``, and reference definitions
  ``[name]: target``, whose target has no URL scheme: the path, relative to the document's
  directory, exists. A ``#anchor`` (on a link to a Markdown file, or alone for the same
  document) must be the GitHub slug of one of that document's headings.
* **Repository paths in backticks**: inline code that is a repository top-level entry
  (``pyproject.toml``, ``BUILD.example``) or starts with one followed by ``/``
  (``engine/cli.py``, ``docs/remote.md``, ``plugins/examples/``), and has no spaces and
  no pattern characters (``* ? [ ] { } < > $ |``). It is relative to the repository root;
  a ``:LINE`` or ``#anchor`` suffix is allowed (the anchor is checked as above). Paths of
  a user's workspace (``tools/motd.py``, ``dtbuild-out/pkg/``) start with no top-level
  entry of the repository, so they are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The repository's top-level entries a doc may name. Generated or local ones (build/,
#: .venv/, dtbuild-out/) are left out on purpose: a doc naming them names a user's copy.
TOP_LEVEL = ("engine", "rules", "plugins", "docs", "scripts", "tests", "bench", "examples",
             "BUILD.example", "README.md", "LICENSE", "pyproject.toml", ".ci", ".gitignore")

DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_PATTERN_CHARS = set(" *?[]{}<>$|")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The (line number, line) pairs outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation other
    than ``-`` and ``_`` removed, spaces turned into ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    """Every anchor of ``document``'s headings (a repeated one also as ``slug-1``, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(document.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def is_repository_path(code: str) -> bool:
    """Whether inline code ``code`` names a path of this repository (see the module docstring)."""
    if not code or _PATTERN_CHARS & set(code) or "..." in code:
        return False
    head = code.split("/", 1)[0]
    return head in TOP_LEVEL and (code == head or code.startswith(head + "/"))


def references(document: Path) -> list[tuple[int, str, Path, str]]:
    """(line, as written, the path it names, its anchor or "") of each checked reference."""
    found: list[tuple[int, str, Path, str]] = []
    for number, line in prose_lines(document.read_text(encoding="utf-8")):
        spans = list(_CODE_SPAN.finditer(line))
        for span in spans:
            code = span.group(2).strip()
            if is_repository_path(code):
                path, _, anchor = code.partition("#")
                path = re.sub(r":\d+(-\d+)?$", "", path)  # engine/cli.py:120
                found.append((number, code, ROOT / path, anchor))
        outside_code = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in _LINK.finditer(outside_code)]
        reference = _REFERENCE.match(outside_code)
        if reference:
            targets.append(reference.group(1))
        for target in targets:
            if _SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            found.append((number, target, document if not path else document.parent / path, anchor))
    return found


def test_the_listed_top_level_entries_exist() -> None:
    missing = [name for name in TOP_LEVEL if not (ROOT / name).exists()]
    assert not missing, f"TOP_LEVEL names entries the repository does not have: {missing}"
    assert DOCUMENTS and all(d.is_file() for d in DOCUMENTS)


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(d.relative_to(ROOT)) for d in DOCUMENTS])
def test_every_path_a_document_names_exists(document: Path) -> None:
    broken = []
    for number, written, path, anchor in references(document):
        where = f"{document.relative_to(ROOT)}:{number}: {written!r}"
        if not path.exists():
            broken.append(f"{where}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{where}: {path.name} has no heading with the anchor #{anchor}")
    assert not broken, "broken references in the documentation:\n" + "\n".join(broken)


# --------------------------------------------------------------------------- the rule itself


def test_the_rule_tells_repository_paths_from_other_code() -> None:
    assert is_repository_path("engine/cli.py")
    assert is_repository_path("plugins/examples/tarball_layer.py")
    assert is_repository_path("docs/remote.md#the-http-cache")
    assert is_repository_path("pyproject.toml") and is_repository_path("scripts/")
    for not_a_path in ("tools/motd.py", "dtbuild-out/pkg/name.tar", "rules.api.layer_kind_rule",
                       "plugins/builtin/*_plugin.py", "docs/{a,b}.md", "tests/e2e/test_x.py -k y",
                       "engine/remote/...", "enginex/cli.py", "dtbuild.plugins", "build/tools/buildbox"):
        assert not is_repository_path(not_a_path), not_a_path


def test_references_are_found_in_prose_only(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text("# A guide\n\n## Two `words`, here!\n\nSee [this](other.md#part), "
                   "`engine/cli.py:12`, [up](#two-words-here) and ![pic](img.png \"title\").\n"
                   "[ref]: ../x.md\n\n```sh\n[not](checked.md) `engine/nope.py`\n```\n"
                   "`[code](not-a-link.md)`\n")
    found = [(line, written, anchor) for line, written, _, anchor in references(doc)]
    assert found == [(5, "engine/cli.py:12", ""), (5, "other.md#part", "part"),
                     (5, "#two-words-here", "two-words-here"), (5, "img.png", ""), (6, "../x.md", "")]
    assert anchors(doc) == {"a-guide", "two-words-here"}
    assert github_slug("`dtbuild run` and `-p no:NAME`") == "dtbuild-run-and--p-noname"
