"""The documentation shows what the code does: the configuration reference carries the default config verbatim."""

from __future__ import annotations

from pathlib import Path

from appliance.config import DEFAULT_CONFIG_TOML

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_shows_the_default_config_verbatim() -> None:
    lines = (ROOT / "docs/configuration.md").read_text().split("\n")
    start = lines.index("```toml")
    end = lines.index("```", start + 1)
    shown = "\n".join(lines[start + 1 : end])
    assert shown == DEFAULT_CONFIG_TOML.rstrip("\n"), "docs/configuration.md: paste DEFAULT_CONFIG_TOML into its block"


def _toml_blocks(text: str) -> list[str]:
    blocks, lines, inside = [], [], False
    for line in text.split("\n"):
        if line.strip() == "```toml":
            inside, lines = True, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append("\n".join(lines))
        elif inside:
            lines.append(line)
    return blocks


def test_tiering_guide_config_examples_load(tmp_path: Path) -> None:
    """Every TOML example of docs/tiering.md is a valid config (alone, or with the tiers it refers to), so an admin
    who pastes one gets a working appliance, not a ConfigError."""
    import tomllib

    from appliance.config import load_config

    blocks = _toml_blocks((ROOT / "docs/tiering.md").read_text())
    assert blocks, "docs/tiering.md has no TOML examples"
    tiers = ('[[tiers]]\nname = "nas"\nkind = "nearline"\nvolumes = [{ name = "nas1", path = "/mnt/nas1" }]\n'
             '[[tiers]]\nname = "tape"\nkind = "tape"\npath = "/srv/vtl"\n')
    for i, block in enumerate(blocks):
        raw = tomllib.loads(block)  # valid TOML at least
        text = block if "tiers" in raw or "policies" not in raw else tiers + block
        path = tmp_path / f"example{i}.toml"
        path.write_text(text)
        load_config(path, environ={})
