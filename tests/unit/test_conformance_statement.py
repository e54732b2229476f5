"""The conformance statement: docs/conformance.md is what the code generates for the built-in defaults, and
`appliance conformance` prints the statement of the given config (Markdown, or raw values with --json)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from appliance import errors
from appliance.cli import app
from appliance.config import DEFAULT_TRANSFER_SYNTAXES, all_storage_sop_classes, load_config
from appliance.conformance import default_markdown, markdown, statement
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

ROOT = Path(__file__).resolve().parents[2]


def test_docs_conformance_is_generated_from_the_code() -> None:
    shown = (ROOT / "docs/conformance.md").read_text()
    assert shown == default_markdown(), "docs/conformance.md is stale: run `make conformance` and commit it"


def test_default_statement_lists_what_the_negotiator_accepts() -> None:
    st = statement(load_config(None, environ={}))
    assert st["implementation"] == {"class_uid": IMPLEMENTATION_CLASS_UID, "version_name": IMPLEMENTATION_VERSION_NAME}
    assert [t["uid"] for t in st["transfer_syntaxes"]] == list(DEFAULT_TRANSFER_SYNTAXES)  # preference order
    storage = [c for c in st["sop_classes"] if c["service"] == "storage"]
    assert {c["uid"] for c in storage} == set(all_storage_sop_classes())
    assert all(c["roles"] == ["SCP", "SCU"] for c in storage)  # SCU of the C-MOVE/C-GET sub-operations
    assert all(c["name"] and c["name"] != c["uid"] for c in st["sop_classes"])
    assert [m["levels"][0] for m in st["query_retrieve"]["models"]].count("PATIENT") == 3
    assert st["extended_negotiation"]["accepted"] == []
    assert st["association_policies"]["max_pdu"] == 1_048_576
    assert {s["status"] for s in st["statuses"]["store"]} >= {0x0000, 0x0111, 0xA700, 0xC000}
    assert st["tls"]["enabled"] is False


def test_cli_prints_the_configured_values(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[server]\nae_title = "PACS1"\nmax_pdu = 65536\n[dicom]\nsop_classes = ["storage"]\n'
                   'transfer_syntaxes = ["1.2.840.10008.1.2.1"]\n[tls]\nenabled = true\nport = 2763\n'
                   f'certificate = "{tmp_path}/c.pem"\nprivate_key = "{tmp_path}/k.pem"\n'
                   f'ca_certificates = "{tmp_path}/ca.pem"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["conformance", "-c", str(cfg), "--json"], env={"APPLIANCE_CONFIG": ""})
    assert result.exit_code == 0, result.output
    st = json.loads(result.stdout)
    assert st["application_entity"]["ae_title"] == "PACS1" and st["application_entity"]["tls_port"] == 2763
    assert st["association_policies"]["max_pdu"] == 65536
    assert [t["name"] for t in st["transfer_syntaxes"]] == ["Explicit VR Little Endian"]
    assert st["query_retrieve"]["models"] == []
    human = runner.invoke(app, ["conformance", "-c", str(cfg)], env={"APPLIANCE_CONFIG": ""})
    assert human.exit_code == 0
    assert "title `PACS1`" in human.stdout and "64 KiB" in human.stdout and "port 2763" in human.stdout
    assert "## 6. Query/Retrieve" not in human.stdout and "## 7. Storage Commitment" not in human.stdout
    assert human.stdout == markdown(statement(load_config(cfg, environ={})))


def test_cli_config_error_is_one_line_and_its_exit_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["conformance", "-c", str(tmp_path / "missing.toml")])
    assert result.exit_code == errors.EXIT_CONFIG
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
