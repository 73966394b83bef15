"""The user docs stay short and true: README.md is at most 300 lines, every relative link and every
repository path named in README.md and docs/ exists (anchors included), and docs/cli.md is what
scripts/cli_reference.py generates from the real parsers."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w./-])((?:napari_cellseg|training|scripts|benchmarks|tests)/[\w./-]+)")
_CODE_BLOCK = re.compile(r"^(```|~~~)")


def _ids(doc: Path) -> list[str]:
    return [str(p.relative_to(REPO)) for p in doc] if isinstance(doc, list) else str(doc.relative_to(REPO))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _CODE_BLOCK.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links (and #anchors) of one Markdown file that point at nothing."""
    bad = []
    for target in _LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    return bad


def missing_paths(text: str) -> list[str]:
    """Repository paths (napari_cellseg/..., training/..., scripts/..., benchmarks/..., tests/...)
    named in a text that do not exist."""
    bad = []
    for match in _PATH.finditer(text):
        if text[match.end():match.end() + 1] in "*{<":  # a pattern such as tests/test_*.py
            continue
        name = match.group(1).rstrip(".")
        is_file_or_folder = "." in name.rsplit("/", 1)[-1] or match.group(1).endswith("/")
        if name.startswith(("napari_cellseg/", "training/")) and not is_file_or_folder:
            continue  # prose such as "training/validation", not a path
        if not (REPO / name).exists():
            bad.append(name)
    return sorted(set(bad))


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; details go to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_named_paths_exist(doc):
    assert missing_paths(doc.read_text(encoding="utf-8")) == []


def test_the_checks_find_what_is_missing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](nowhere.md) [anchor](#no-such-part)\n", encoding="utf-8")
    assert broken_links(page) == ["nowhere.md: no such file", "#no-such-part: no heading with anchor #no-such-part"]
    text = ("see `napari_cellseg/network.py`, `scripts/demo.sh`, napari_cellseg/gui/, training/old/ "
            "and tests/test_*.py; training/validation is prose.")
    assert missing_paths(text) == ["napari_cellseg/network.py", "training/old/"]
    assert slug("`cellseg predict`") == "cellseg-predict"
    assert slug("Your own images (intensity, channels)") == "your-own-images-intensity-channels"


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_the_parsers():
    expected = _cli_reference().render()
    committed = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == expected, "docs/cli.md is stale: run python scripts/cli_reference.py"


def test_cli_reference_names_every_flag():
    import argparse

    from napari_cellseg.commands.main import build_parser
    from training.cli import build_parser as train_parser

    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    main = build_parser()
    sub = next(a for a in main._actions if isinstance(a, argparse._SubParsersAction))
    parsers = [*sub.choices.values(), train_parser()]
    flags = {f for p in parsers for a in p._actions for f in a.option_strings if f not in ("-h", "--help")}
    assert sorted(f for f in flags if f"`{f}`" not in text) == []
    assert all(f"## `cellseg {name}`" in text for name in sub.choices)
