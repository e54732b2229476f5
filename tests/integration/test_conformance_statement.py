"""The conformance statement (appliance conformance) against what a real association negotiates: every SOP class x
every transfer syntax it lists is accepted in the A-ASSOCIATE-AC, what it does not list is refused, with pynetdicom
proposing all of them and DCMTK's storescu proposing every transfer syntax for CT Image Storage (and sending)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pynetdicom import AE

from appliance.config import load_config
from appliance.conformance import statement
from tests.conftest import ServerHandle, dcmtk
from tests.peers import CT_IMAGE_STORAGE, ct_instances

# Not in any statement of ours: Modality Worklist FIND and MPPS (SOP classes), and two transfer syntaxes (JPEG
# Extended 3-5, retired; and JPIP Referenced) the default list leaves out.
UNLISTED_CLASSES = ("1.2.840.10008.5.1.4.31", "1.2.840.10008.3.1.2.3.3")
UNLISTED_SYNTAXES = ("1.2.840.10008.1.2.4.52", "1.2.840.10008.1.2.4.94")
BATCH = 120  # contexts per association: under server.max_presentation_contexts (128)


def _statement(handle: ServerHandle) -> dict[str, Any]:
    return statement(load_config(handle.config_path, environ={}))


def _negotiate(port: int, pairs: list[tuple[str, str]]) -> Iterator[tuple[str, str, bool]]:
    """Propose each (abstract syntax, transfer syntax) as its own context, BATCH per association; yield each pair
    with whether the A-ASSOCIATE-AC accepted it."""
    for start in range(0, len(pairs), BATCH):
        ae = AE(ae_title="CONFTEST")
        for abstract, ts in pairs[start:start + BATCH]:
            ae.add_requested_context(abstract, [ts])
        # A batch where nothing is accepted would end in an abort, not an AC: Verification anchors each one.
        ae.add_requested_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])
        assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
        assert assoc.is_established
        accepted = {cx.context_id: cx for cx in assoc.accepted_contexts}
        # Context ids are 1, 3, 5, ... in the order proposed.
        for i, (abstract, ts) in enumerate(pairs[start:start + BATCH]):
            got = accepted.get(2 * i + 1)
            ok = got is not None and str(got.abstract_syntax) == abstract and str(got.transfer_syntax[0]) == ts
            yield abstract, ts, ok
        assoc.release()


def test_every_listed_pair_is_accepted_and_nothing_else(server: ServerHandle) -> None:
    st = _statement(server)
    classes = [c["uid"] for c in st["sop_classes"]]
    syntaxes = [t["uid"] for t in st["transfer_syntaxes"]]
    pairs = [(c, t) for c in (*classes, *UNLISTED_CLASSES) for t in (*syntaxes, *UNLISTED_SYNTAXES)]
    wrong = [(c, t, ok) for c, t, ok in _negotiate(server.port, pairs)
             if ok != (c in classes and t in syntaxes)]
    assert not wrong, f"{len(wrong)} pairs negotiated otherwise than the statement says, e.g. {wrong[:5]}"


def test_a_narrowed_config_states_and_negotiates_less(make_server: Any) -> None:
    narrowed = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"]
    handle = make_server(dicom={"sop_classes": ["storage"], "transfer_syntaxes": narrowed})
    st = _statement(handle)
    classes = {c["uid"] for c in st["sop_classes"]}
    assert [t["uid"] for t in st["transfer_syntaxes"]] == narrowed
    assert "1.2.840.10008.1.1" in classes and "1.2.840.10008.5.1.4.1.2.2.1" not in classes
    assert st["query_retrieve"]["models"] == [] and st["statuses"]["find"] == []
    # No C-MOVE/C-GET: the appliance is never a Storage SCU then.
    assert all(c["roles"] == ["SCP"] for c in st["sop_classes"])
    probe = ["1.2.840.10008.1.1", CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.1.20.1"]
    pairs = [(c, t) for c in probe for t in (*narrowed, "1.2.840.10008.1.2.4.50")]
    for c, t, ok in _negotiate(handle.port, pairs):
        assert ok == (c in classes and t in narrowed), (c, t)


def _dcmtk_profile(path: Path, syntaxes: list[str]) -> None:
    """A storescu association configuration (DCMTK's --config-file): one context per transfer syntax for CT Image
    Storage, then Verification and Modality Worklist."""
    groups = "".join(f"[TS{i}]\nTransferSyntax1 = {ts}\n" for i, ts in enumerate(syntaxes))
    contexts = "".join(f"PresentationContext{i + 1} = {CT_IMAGE_STORAGE}\\TS{i}\n" for i in range(len(syntaxes)))
    n = len(syntaxes)
    contexts += f"PresentationContext{n + 1} = 1.2.840.10008.1.1\\TS0\n"
    contexts += f"PresentationContext{n + 2} = {UNLISTED_CLASSES[0]}\\TS0\n"
    path.write_text(f"[[TransferSyntaxes]]\n{groups}\n[[PresentationContexts]]\n[All]\n{contexts}\n"
                    "[[Profiles]]\n[Conformance]\nPresentationContexts = All\n")


def _storescu_every_syntax(port: int, st: dict[str, Any], tmp_path: Path, *options: str) -> None:
    """DCMTK's storescu proposes CT Image Storage once per transfer syntax (the statement's and two others), then
    sends a CT: its A-ASSOCIATE-AC (storescu -d) accepts exactly the statement's syntaxes, and the C-STORE
    succeeds."""
    listed = [t["uid"] for t in st["transfer_syntaxes"]]
    proposed = [*listed, *UNLISTED_SYNTAXES]
    cfg = tmp_path / "storescu.cfg"
    _dcmtk_profile(cfg, proposed)
    ct = ct_instances(tmp_path / "in", 1)[0]
    result = dcmtk("storescu", "-d", *options, "-aec", "APPLIANCE", "-aet", "CONFTEST", "-xf", str(cfg),
                   "Conformance", "127.0.0.1", str(port), str(ct))
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout + result.stderr
    ac = log[log.index("BEGIN A-ASSOCIATE-AC"):log.index("END A-ASSOCIATE-AC")]
    # Each context of the AC: "Context ID: N (Accepted|Transfer Syntaxes Not Supported|...)"
    results = dict(re.findall(r"Context ID:\s+(\d+) \(([^)]+)\)", ac))
    for i, ts in enumerate(proposed):
        assert (results[str(2 * i + 1)] == "Accepted") == (ts in listed), (ts, results[str(2 * i + 1)])
    assert results[str(2 * len(proposed) + 1)] == "Accepted"  # Verification
    assert results[str(2 * len(proposed) + 3)] != "Accepted"  # Modality Worklist
    assert re.search(r"C-STORE RSP.*?DIMSE Status\s*: 0x0000: Success", log, re.S), log[-2000:]


def test_storescu_proposing_every_transfer_syntax(server: ServerHandle, tmp_path: Path) -> None:
    _storescu_every_syntax(server.port, _statement(server), tmp_path)


def test_tls_as_stated(make_server: Any, tmp_path: Path) -> None:
    """With [tls] enabled the statement says so, storescu over TLS negotiates exactly as on the plain port, and a
    TLS 1.2 association uses one of the cipher suites the statement lists."""
    import ssl

    from tests.integration.test_tls import client_context, dcmtk_tls, tls_associate, tls_section
    from tests.tls_pki import make_pki

    pki = make_pki(tmp_path / "pki")
    handle = make_server(tls=tls_section(pki))
    st = _statement(handle)
    assert st["tls"]["enabled"] and st["tls"]["require_client_certificate"]
    assert st["application_entity"]["tls_port"] is not None
    _storescu_every_syntax(handle.tls_port, st, tmp_path, *dcmtk_tls(pki))
    assoc = tls_associate(handle, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert assoc.is_established
    try:
        cipher = assoc.dul.socket.socket.cipher()  # type: ignore[union-attr]
        assert cipher[0] in st["tls"]["ciphers"], cipher
    finally:
        assoc.release()


def test_cli_json_matches_the_running_config(server: ServerHandle) -> None:
    """``appliance conformance -c`` in a real subprocess names the AE and port of that config."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "appliance", "conformance", "-c", str(server.config_path), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["application_entity"]["ae_title"] == "APPLIANCE"
    assert st == json.loads(json.dumps(_statement(server)))


def test_role_selection_as_stated(server: ServerHandle) -> None:
    """SCP/SCU role selection: granted as proposed for a storage SOP class (what C-GET needs), not for the
    others (the default roles stay), as the statement says."""
    from pynetdicom import build_role

    st = _statement(server)
    assert st["role_selection"]["accepted_for"] == "storage"
    find = "1.2.840.10008.5.1.4.1.2.2.1"
    ae = AE(ae_title="CONFTEST")
    ae.add_requested_context(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])
    ae.add_requested_context(find, ["1.2.840.10008.1.2.1"])
    roles: list[Any] = [build_role(CT_IMAGE_STORAGE, scu_role=True, scp_role=True), build_role(find, scu_role=True,
                                                                                    scp_role=True)]
    assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE", ext_neg=roles)
    assert assoc.is_established
    try:
        by_class = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
        assert by_class[CT_IMAGE_STORAGE].as_scp and by_class[CT_IMAGE_STORAGE].as_scu  # we may send to it (C-GET)
        assert by_class[find].as_scu and not by_class[find].as_scp  # default: the requestor is only the SCU
    finally:
        assoc.release()
