"""Every TOML example in README.md and docs/*.md is a config the appliance loads (issue 13): an admin who pastes one
gets a working appliance, not a ConfigError. A block is loaded as a whole config file, unless the line just before
its fence says otherwise:

- ``<!-- toml: fragment -->``: part of a config that names tiers it does not define; it is loaded after a minimal
  ``[[tiers]]`` preamble (a nearline tier ``nas`` and a tape tier ``tape``);
- ``<!-- toml: not a config -->``: another TOML file (a credentials file...): it only has to parse.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from appliance.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREAMBLE = ('[[tiers]]\nname = "nas"\nkind = "nearline"\nvolumes = [{ name = "nas1", path = "/mnt/nas1" }]\n'
            '[[tiers]]\nname = "tape"\nkind = "tape"\npath = "/srv/vtl"\n')
MARKERS = {"<!-- toml: fragment -->": "fragment", "<!-- toml: not a config -->": "other"}


def toml_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, text) of each ```toml block; kind is "config", "fragment" or "other"."""
    blocks: list[tuple[int, str, str]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```toml":
            kind = MARKERS.get(lines[i - 1].strip(), "config") if i else "config"
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 1, kind, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


EXAMPLES = [(doc, *block) for doc in DOCS for block in toml_blocks(doc.read_text())]


def test_the_docs_have_toml_examples() -> None:
    names = {doc.name for doc, *_ in EXAMPLES}
    assert {"README.md", "operations.md", "configuration.md", "tiering.md", "security.md"} <= names


@pytest.mark.parametrize(("doc", "line", "kind", "block"), EXAMPLES,
                         ids=[f"{doc.name}:{line}" for doc, line, *_ in EXAMPLES])
def test_every_toml_example_in_the_docs_loads(tmp_path: Path, doc: Path, line: int, kind: str, block: str) -> None:
    where = f"{doc.relative_to(ROOT)}:{line}"
    try:
        tomllib.loads(block)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{where}: not valid TOML: {exc}")
    if kind == "other":
        return
    path = tmp_path / "appliance.toml"
    path.write_text(PREAMBLE + block if kind == "fragment" else block)
    load_config(path, environ={})  # a ConfigError names the key


def test_a_marker_is_understood(tmp_path: Path) -> None:
    text = "x\n<!-- toml: fragment -->\n```toml\n[[policies]]\n```\n```toml\na = 1\n```\n"
    assert [(kind, block) for _line, kind, block in toml_blocks(text)] == [("fragment", "[[policies]]"),
                                                                            ("config", "a = 1")]
