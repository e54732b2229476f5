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
