"""The documentation and the code describe the software as it is: no development-history markers, every relative
link and image in README.md and docs/ resolves, and the version is the same in pyproject.toml, ``msdet.__version__``
and CHANGELOG.md. Plain text checks, no MindSpore."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".cc", ".h", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh"}
AREAS = ("README.md", "docs", "msdet", "stages", "tests")

# A '#N' right after one of these words numbers an item of a data set (the converters' error messages:
# "annotation #1 (id 2) has no 'bbox'", "object #2: unknown category"); anywhere else '#N' cites an issue.
COUNTED = ("annotation", "image", "object", "category", "box", "line", "row")
MARKERS = {
    "a development session": re.compile(r"\bsessions?[ -]\d+", re.IGNORECASE),
    "an issue number": re.compile(r"\b(?:issues?|PR|pull request)\s*#?\d+", re.IGNORECASE),
    # '#' then 1-5 digits and no further letter or digit, not inside a word or URL: an issue reference such as
    # "(#18)", "#18's" or "the #18 work". Never matches a heading ("# x"), an anchor ("#part"), "#!", "#include",
    # a noqa comment or a hex colour of 6 or 8 digits ("#1a2b3c", "#000000"); a 3-digit one such as "#123" it would.
    "an issue reference": re.compile(r"(?<![\w#&/=])#(\d{1,5})(?![\w])"),
}


def _files(area: str) -> list[Path]:
    path = ROOT / area
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    return [p for p in files if p != Path(__file__).resolve() and "__pycache__" not in p.parts]


def history_markers(text: str) -> list[str]:
    """Each history marker in ``text`` as 'line N: what: the match'."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        taken: list[range] = []  # one report per marker: an issue number is not also a bare reference
        for what, pattern in MARKERS.items():
            for m in pattern.finditer(line):
                before = line[:m.start()].rstrip().lower()
                if any(m.start() in r for r in taken) or (what == "an issue reference" and before.endswith(COUNTED)):
                    continue
                taken.append(range(m.start(), m.end()))
                found.append(f"line {number}: {what}: {m.group(0)!r}")
    return found


@pytest.mark.parametrize("area", AREAS)
def test_no_development_history_markers(area):
    problems = [f"{p.relative_to(ROOT)} {hit}" for p in _files(area)
                for hit in history_markers(p.read_text(encoding="utf-8", errors="replace"))]
    assert not problems, "history belongs in CHANGELOG.md:\n" + "\n".join(problems)


@pytest.mark.parametrize(("text", "hits"), [
    ("until {s} 10 these were missing", 1), ("{s}-11 code", 1), ("Closed ({S} 12): x", 1),
    ("the rule before {i} #19", 1), ("{i} 18's figures", 1), ("merge (#21)", 1), ("#18's kernels", 1),
    ("the #18 work", 1), ("fused AdamW (#18, partly)", 1),
    ("annotation #1 (id 2) has no 'bbox'", 0), ("a.xml: object #2: unknown", 0), ("image #0 has", 0),
    ("## A heading", 0), ("[x](#your-own-data)", 0), ("#!/bin/sh", 0), ('#include "aot.h"', 0), ("x = 1  # noqa", 0),
    ("colour #1a2b3c or #000000", 0), ("https://github.com/o/r/issues/19#issuecomment-1", 0), ("a session of 3", 0),
    ("ort.InferenceSession(path)", 0), ("&#39;", 0),
])
def test_history_marker_patterns(text, hits):
    """The examples spell the marker words through placeholders, so this file holds no marker itself."""
    text = text.replace("{s}", "session").replace("{S}", "Session").replace("{i}", "issue")
    assert len(history_markers(text)) == hits, history_markers(text)


# --- links -------------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation other than '-' and '_' removed,
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings, repeats numbered '-1', '-2', ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def link_problems(path: Path) -> list[str]:
    """Every relative link or image of ``path`` that names a missing file or a heading its file lacks."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for line in _prose(text):
        targets = [m.group(1) for m in LINK.finditer(line)] + [m.group(1) for m in HTML.finditer(line)]
        targets += [m.group(1) for m in REFERENCE.finditer(line)]
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
                continue
            name, _, anchor = target.partition("#")
            file = (path.parent / name).resolve() if name else path
            if not file.exists():
                problems.append(f"{path.relative_to(ROOT)}: '{target}': no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{path.relative_to(ROOT)}: '{target}': no heading '#{anchor}' in {file.name}")
    return problems


MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


def test_github_slugs():
    assert github_slug("Data sources (`data.source`)") == "data-sources-datasource"
    assert github_slug("Watching a running experiment") == "watching-a-running-experiment"
    assert github_slug("Performance and kernels: D0 @ 128 px, 1.05x") == "performance-and-kernels-d0--128-px-105x"
    assert github_slug("[ImageNet starts](x.md)") == "imagenet-starts"


def test_a_missing_file_and_a_missing_heading_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "b.md").write_text("# Title\n## Part one\n## Part one\n")
    (tmp_path / "a.md").write_text(
        "[ok](b.md#part-one) [ok](b.md#part-one-1) [ok](#top) ![ok](b.md) [web](https://x.org/y)\n"
        "# Top\n`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[bad](c.md) [bad](b.md#part-two) <img src=\"pic.png\"> [bad](#bottom)\n")
    assert [p.split("'")[1] for p in link_problems(tmp_path / "a.md")] == [
        "c.md", "b.md#part-two", "#bottom", "pic.png"]


# --- version -----------------------------------------------------------------------------------------------------

def test_version_is_one_in_pyproject_package_and_changelog():
    import msdet

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == msdet.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\]", changelog, re.MULTILINE), f"CHANGELOG.md has no ## [{version}]"
