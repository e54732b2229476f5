"""The DICOM conformance statement (PS3.2), built from the code and the running configuration: what an integrator
reads before pointing a modality at us. ``statement(cfg)`` gives the raw values (``appliance conformance --json``),
``markdown(...)`` the document in the order of PS3.2 (``appliance conformance``; docs/conformance.md is its output
for the built-in defaults, regenerated with ``make conformance`` and kept in sync by
tests/unit/test_conformance_statement.py).

Every value that can change comes from where the code takes it (the config, the UID constants, the negotiator's
rules, the error table, the query keys), so that the document cannot drift; the prose around it is fixed text.
``register(app)`` adds the command (cli.py owns the app).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydicom.charset import python_encoding
from pydicom.uid import UID
from pynetdicom.sop_class import _STORAGE_CLASSES

from appliance import errors
from appliance.config import BCP195_CIPHERS, Config, all_storage_sop_classes, load_config
from appliance.dicom import uids
from appliance.query.identifier import ANY_LEVEL_KEYS, DEFAULT_CHARSET, KEYS_OF, UTF8
from appliance.query.matching import RANGE_VRS, WILDCARD_VRS

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the same as appliance.net.negotiation's (net is not imported here)
# pydicom's UID dictionary lacks a few storage classes pynetdicom knows: their pynetdicom keyword names them then.
_KEYWORDS = {str(uid): keyword for keyword, uid in _STORAGE_CLASSES.items()}
_STORAGE = frozenset(all_storage_sop_classes())
_FIND = frozenset(uids.FIND_MODELS)
_MOVE_GET = frozenset((*uids.MOVE_MODELS, *uids.GET_MODELS))
_LEVELS = {uids.PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
           uids.STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE")}
_PATIENT_ROOT = frozenset((uids.PATIENT_ROOT_FIND, uids.PATIENT_ROOT_MOVE, uids.PATIENT_ROOT_GET))

# DIMSE statuses per service, with when each is returned (the codes are appliance/errors.py's).
STORE_STATUSES = (
    (errors.SUCCESS, "stored: the instance is durable (fdatasync'd) and indexed; an identical re-send is a no-op "
                     "Success"),
    (errors.DUPLICATE_SOP_INSTANCE, "duplicate SOP instance with other bytes, under storage.duplicate_policy = "
                                    "\"reject\""),
    (errors.SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted, or not that of the presentation context"),
    (errors.NOT_AUTHORIZED, "the peer lacks the store right"),
    (errors.OUT_OF_RESOURCES, "no volume can take the instance, the commit queue is full, or the instance exceeds "
                              "storage.max_instance_bytes"),
    (errors.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class/Instance UID in the dataset differ from the command"),
    (errors.CANNOT_UNDERSTAND, "dataset cannot be parsed"),
    (errors.CANNOT_UNDERSTAND_MISSING_UIDS, "dataset lacks its Study, Series or SOP Instance UID"),
    (errors.PROCESSING_FAILURE, "index failure"),
)
FIND_STATUSES = (
    (errors.PENDING, "a match (streamed as found)"),
    (errors.PENDING_WARNING, "a match, some requested keys not supported (a sequence key with values)"),
    (errors.SUCCESS, "matching complete"),
    (errors.CANCEL, "C-CANCEL honoured"),
    (errors.OUT_OF_RESOURCES, "more than query.results_max matches (after sending that many), or "
                              "query.search_s_max passed"),
    (errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "level missing or unknown, hierarchy keys missing"),
    (errors.UNABLE_TO_PROCESS, "identifier unparsable or larger than query.identifier_bytes_max"),
    (errors.NOT_AUTHORIZED, "the peer lacks the find right"),
)
RETRIEVE_STATUSES = (
    (errors.PENDING, "progress, with Remaining/Completed/Failed/Warning counts (at most one per "
                     "retrieve.pending_interval_ms)"),
    (errors.SUCCESS, "every sub-operation succeeded"),
    (errors.SUB_OPERATIONS_WITH_FAILURES, "some sub-operations failed (Failed SOP Instance UID List in the "
                                          "identifier)"),
    (errors.CANCEL, "C-CANCEL honoured, with counts"),
    (errors.OUT_OF_RESOURCES_MATCHES, "more than retrieve.matches_max instances"),
    (errors.OUT_OF_RESOURCES_SUB_OPERATIONS, "destination unreachable or rejecting, retrieve.concurrent_max "
                                             "retrieves running, or the study is on tape and its recall did not "
                                             "finish within tiering.recall_wait_s (Error Comment \"study is on "
                                             "tape; recall queued\")"),
    (errors.MOVE_DESTINATION_UNKNOWN, "C-MOVE destination not under [peers], or without allow_receive"),
    (errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "identifier invalid for the level"),
    (errors.UNABLE_TO_PROCESS, "identifier cannot be parsed"),
    (errors.NOT_AUTHORIZED, "the peer lacks the move or get right"),
)
COMMITMENT_STATUSES = (
    (errors.SUCCESS, "N-ACTION accepted and journaled (fsync'd); the result follows in an N-EVENT-REPORT"),
    (errors.NO_SUCH_OBJECT_INSTANCE, "N-ACTION not on the well-known SOP instance"),
    (errors.NO_SUCH_ACTION, "Action Type other than 1"),
    (errors.INVALID_ARGUMENT_VALUE, "missing or invalid Transaction UID or references"),
    (errors.RESOURCE_LIMITATION, "over the [commitment] bounds"),
    (errors.N_PROCESSING_FAILURE, "journal not writable"),
    (errors.NOT_AUTHORIZED, "the peer lacks the storage_commitment right"),
)
NOT_SUPPORTED = (
    "Relational queries and retrieves (SOP Class Extended Negotiation), SOP Class Common Extended Negotiation, "
    "User Identity Negotiation, an asynchronous operations window above 1, fuzzy semantic matching of person "
    "names, timezone adjustment in date-time matching, Modality Worklist, MPPS, the Storage Commitment Pull model, "
    "Instance Availability Notification, DICOMweb."
)


def uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else _KEYWORDS.get(uid, uid)


def _defined_terms() -> list[str]:
    """The Specific Character Set defined terms (PS3.3 C.12.1.1.2) an identifier can be decoded with: pydicom's,
    without its own aliases (an empty value is the default repertoire, ISO_IR 6)."""
    return sorted(t for t in python_encoding if t.startswith(("ISO_IR ", "ISO 2022 IR ")) or t in ("GB18030", "GBK"))


def _service(uid: str) -> str:
    if uid == uids.VERIFICATION:
        return "verification"
    if uid == uids.STORAGE_COMMITMENT_PUSH:
        return "storage-commitment"
    if uid in _FIND or uid in _MOVE_GET:
        return "query-retrieve"
    return "storage" if uid in _STORAGE else "other"


def _roles(uid: str, retrieves: bool) -> list[str]:
    service = _service(uid)
    if service == "storage":
        # SCU of C-STORE for the sub-operations of C-MOVE and C-GET, when either is offered at all.
        return ["SCP", "SCU"] if retrieves else ["SCP"]
    return ["SCP"]


# Codes whose meaning differs for a Query/Retrieve identifier (PS3.4 C.4) from a C-STORE dataset (PS3.4 B.2.3).
_QR_NAMES = {errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: "Identifier does not match SOP Class",
             errors.UNABLE_TO_PROCESS: "Unable to process"}


def _statuses(table: tuple[tuple[int, str], ...], overrides: dict[int, str] | None = None) -> list[dict[str, Any]]:
    names = {**errors.STATUS_NAMES, errors.PENDING: "Pending", errors.PENDING_WARNING: "Pending (optional keys "
             "not supported)", errors.CANCEL: "Cancel", errors.OUT_OF_RESOURCES_MATCHES: "Out of resources (number "
             "of matches)", errors.OUT_OF_RESOURCES_SUB_OPERATIONS: "Out of resources (sub-operations)",
             errors.MOVE_DESTINATION_UNKNOWN: "Move Destination unknown", errors.SUB_OPERATIONS_WITH_FAILURES:
             "Sub-operations complete, one or more failures", **(overrides or {})}
    return [{"status": code, "name": names.get(code, ""), "when": when} for code, when in table]


def statement(cfg: Config) -> dict[str, Any]:
    """The conformance statement of this configuration, as raw values (seconds, bytes, UIDs)."""
    accepted = cfg.dicom.sop_classes
    retrieves = any(uid in _MOVE_GET for uid in accepted)
    server = cfg.server
    find_models = [uid for uid in accepted if uid in _FIND]
    return {
        "implementation": {"class_uid": uids.IMPLEMENTATION_CLASS_UID,
                           "version_name": uids.IMPLEMENTATION_VERSION_NAME},
        "application_entity": {"ae_title": server.ae_title, "host": server.host, "port": server.port,
                               "tls_port": cfg.tls.port if cfg.tls.enabled else None},
        "association_policies": {
            "application_context": APPLICATION_CONTEXT,
            "called_ae_title": server.ae_title,
            "refuse_unknown_calling_ae": server.refuse_unknown_calling_ae,
            "check_peer_host": server.check_peer_host,
            "unknown_peer_rights": list(server.unknown_peer_rights),
            "max_associations": server.max_associations,
            "max_associations_per_ae": server.max_associations_per_ae,
            "max_associations_per_host": server.max_associations_per_host,
            "max_pdu": server.max_pdu,
            "min_peer_pdu": server.min_peer_pdu,
            "max_presentation_contexts": server.max_presentation_contexts,
            "async_operations_window": 1,
            "acse_timeout_s": server.acse_timeout,
            "idle_timeout_s": server.idle_timeout,
            "message_timeout_s": server.message_timeout,
        },
        "sop_classes": [{"uid": uid, "name": uid_name(uid), "service": _service(uid), "roles": _roles(uid, retrieves)}
                        for uid in accepted],
        "transfer_syntaxes": [{"uid": uid, "name": uid_name(uid)} for uid in cfg.dicom.transfer_syntaxes],
        "transfer_syntax_selection": "requestor's first choice among the accepted",
        "storage": {"duplicate_policy": cfg.storage.duplicate_policy,
                    "max_instance_bytes": cfg.storage.max_instance_bytes},
        "role_selection": {"accepted_for": "storage", "sop_classes": sum(uid in _STORAGE for uid in accepted)},
        "extended_negotiation": {"accepted": [], "not_accepted": [
            "SOP Class Extended Negotiation", "SOP Class Common Extended Negotiation", "User Identity Negotiation",
            "Asynchronous Operations Window"]},
        "query_retrieve": {
            "models": [{"uid": uid, "name": uid_name(uid),
                        "levels": list(_LEVELS[uids.PATIENT_ROOT_FIND if uid in _PATIENT_ROOT
                                               else uids.STUDY_ROOT_FIND])}
                       for uid in accepted if uid in _FIND or uid in _MOVE_GET],
            "keys": {level: sorted(keys) for level, keys in KEYS_OF.items()} if find_models else {},
            "any_level_keys": sorted(ANY_LEVEL_KEYS) if find_models else [],
            "wildcard_vrs": sorted(WILDCARD_VRS),
            "range_vrs": sorted(RANGE_VRS),
            "case_sensitive_person_names": cfg.query.case_sensitive_person_names,
        },
        "statuses": {
            "store": _statuses(STORE_STATUSES),
            "find": _statuses(FIND_STATUSES, _QR_NAMES) if find_models else [],
            "retrieve": _statuses(RETRIEVE_STATUSES, _QR_NAMES) if retrieves else [],
            "storage_commitment": _statuses(COMMITMENT_STATUSES) if uids.STORAGE_COMMITMENT_PUSH in accepted else [],
        },
        "tls": {"enabled": cfg.tls.enabled, "port": cfg.tls.port, "min_version": cfg.tls.min_version,
                "ciphers": cfg.tls.ciphers.split(":"),
                "require_client_certificate": cfg.tls.require_client_certificate},
        "character_sets": {"stored": "as received", "query_default": DEFAULT_CHARSET, "query_fallback": UTF8,
                           "query_decoded": _defined_terms()},
        "not_supported": NOT_SUPPORTED,
    }


def _overview(classes: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """PS3.2's summary of network services: one row per service, whether we use it and provide it."""
    rows: list[tuple[str, ...]] = []
    for service, label in (("verification", "Verification"), ("storage", "Storage"),
                           ("query-retrieve", "Query/Retrieve"), ("storage-commitment", "Storage Commitment Push")):
        mine = [c for c in classes if c["service"] == service]
        if mine:
            scu = "Yes (C-MOVE/C-GET sub-operations)" if any("SCU" in c["roles"] for c in mine) else "No"
            rows.append((label, str(len(mine)), scu, "Yes"))
    return rows


def _duplicates(policy: str) -> str:
    if policy == "reject":
        return "A re-sent SOP Instance UID with other bytes is refused (0x0111); the first version stays."
    first = "A re-sent SOP Instance UID with other bytes keeps the first version (`storage.duplicate_policy`)"
    if policy == "overwrite":
        return first + " except from peers given `allow_overwrite`, whose version replaces it."
    return first + "."


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    def row(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    return [row(header), "|" + "---|" * len(header), *(row(r) for r in rows)]


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _bytes(value: int) -> str:
    if value and value % (1 << 30) == 0:
        return f"{value >> 30} GiB"
    if value and value % 1_048_576 == 0:
        return f"{value // 1_048_576} MiB"
    if value and value % 1024 == 0:
        return f"{value // 1024} KiB"
    return f"{value} bytes"


def _status_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table([(f"0x{r['status']:04X}", r["name"], r["when"]) for r in rows], ("status", "name", "returned when"))


def markdown(st: dict[str, Any]) -> str:  # noqa: C901 - one section after the other, in PS3.2's order
    """The statement as a Markdown document, in the order of PS3.2."""
    ae, pol = st["application_entity"], st["association_policies"]
    classes = st["sop_classes"]
    services = {c["service"] for c in classes}
    qr, statuses, tls = st["query_retrieve"], st["statuses"], st["tls"]
    out = [
        "# DICOM Conformance Statement",
        "",
        "In the order of PS3.2 (the parts a PACS integrator needs to connect a modality, a workstation or another "
        "archive), for the configuration it was printed from: `appliance conformance -c CONFIG` prints the "
        "statement of yours (`--json`: the raw values). The behaviour stated here is exercised by the integration "
        "tests (docs/testing.md) against DCMTK, Orthanc and pynetdicom; "
        "tests/integration/test_conformance_statement.py checks every SOP class and transfer syntax listed here "
        "against a real association.",
        "",
        "## Overview",
        "",
        *_table(_overview(classes), ("Network service", "SOP classes", "User of service (SCU)",
                                     "Provider of service (SCP)")),
        "",
        "Media interchange (PS3.10 media, DICOMDIR): none. Files are exported with `appliance export` as Part-10 "
        "files, byte for byte as received.",
        "",
        "## 1. Implementation model",
        "",
        *_table([
            ("Implementation Class UID", f"`{st['implementation']['class_uid']}`"),
            ("Implementation Version Name", f"`{st['implementation']['version_name']}`"),
            ("Application Entity", f"one AE, title `{ae['ae_title']}`, port {ae['port']} on {ae['host']}"
             + (f"; DICOM over TLS on port {ae['tls_port']} (the same AE and services)" if ae["tls_port"] else "")),
            ("Real-world activities", "stores what it receives (Storage SCP), answers queries and retrieves from "
             "its index and stores (Query/Retrieve SCP), commits storage on request (Storage Commitment SCP); "
             "opens associations itself only for C-MOVE sub-operations and Storage Commitment reports"),
        ], ("", "")),
        "",
        "## 2. AE specification: SOP classes",
        "",
    ]
    storage = [c for c in classes if c["service"] == "storage"]
    other = [c for c in classes if c["service"] != "storage"]
    out += _table([(c["name"], c["uid"], ", ".join(c["roles"])) for c in other], ("SOP class", "UID", "Role"))
    if storage:
        roles = storage[0]["roles"]
        out += ["", f"Storage SOP classes ({len(storage)}), each with the role "
                + (" and ".join(roles) + " (SCU for the C-STORE sub-operations of C-MOVE and C-GET)"
                   if "SCU" in roles else "SCP") + ":", ""]
        out += _table([(c["name"], c["uid"]) for c in storage], ("Storage SOP class", "UID"))
    out += ["", "`[dicom] sop_classes` sets this list (`[\"storage\"]`: Verification and storage only). A proposed "
            "context whose abstract syntax is not in it is refused (result 3, abstract syntax not supported); the "
            "other contexts go on.", ""]

    out += ["## 3. Association policies", ""]
    unknown = ", ".join(pol["unknown_peer_rights"]) or "none"
    calling = ("only `[peers]` titles" if pol["refuse_unknown_calling_ae"]
               else f"any; a title not under `[peers]` has the rights: {unknown}")
    if pol["check_peer_host"]:
        calling += "; a `[peers]` title only from that peer's host"
    if pol["refuse_unknown_calling_ae"] or pol["check_peer_host"]:
        calling += " (else A-ASSOCIATE-RJ, calling AE title not recognized)"
    out += _table([
        ("Application context", f"`{pol['application_context']}` only (anything else: A-ASSOCIATE-RJ, permanent, "
         "application context not supported)"),
        ("Called AE title", f"must be `{pol['called_ae_title']}` (else A-ASSOCIATE-RJ, called AE title not "
         "recognized)"),
        ("Calling AE title", calling),
        ("Associations", f"at most {pol['max_associations']} at once (`server.max_associations`), "
         f"{pol['max_associations_per_ae']} per calling AE title and {pol['max_associations_per_host']} per "
         "address; beyond: A-ASSOCIATE-RJ transient, local limit exceeded"),
        ("Maximum PDU length received", f"{_bytes(pol['max_pdu'])} (`server.max_pdu`); a peer announcing less than "
         f"{_bytes(pol['min_peer_pdu'])} (`server.min_peer_pdu`) is rejected"),
        ("Presentation contexts", f"at most {pol['max_presentation_contexts']} per request"),
        ("Asynchronous operations window", "not negotiated: one operation at a time per association (the default "
         "window of 1)"),
        ("Timeouts", f"ARTIM {_seconds(pol['acse_timeout_s'])}, idle {_seconds(pol['idle_timeout_s'])}, "
         f"{_seconds(pol['message_timeout_s'])} per message"),
    ], ("", ""))
    out += ["", "### SCP/SCU role selection", "",
            f"Accepted for the {st['role_selection']['sop_classes']} storage SOP classes (a C-GET requester acts "
            "as Storage SCP: both roles are granted as proposed); for every other SOP class the item is ignored and "
            "the default roles stay.", "",
            "### Association initiation policy", "",
            "Associations are opened only for the C-STORE sub-operations of C-MOVE, when offered (to the "
            "destination's `[peers]` "
            "host and port, calling AE title " + f"`{ae['ae_title']}`" + "; one context per SOP class and stored "
            "transfer syntax, most instances first, then Explicit and Implicit VR Little Endian for each class, 128 "
            "contexts at most) and for Storage Commitment reports that cannot go on the requester's association "
            "(Storage Commitment Push Model in Explicit or Implicit VR Little Endian, with SCP/SCU role selection "
            "asking the SCP role). With `tls = true` on the peer they use TLS.", "",
            "### Extended negotiation", "",
            "None is accepted: " + ", ".join(st["extended_negotiation"]["not_accepted"]) + " items are not "
            "returned in the A-ASSOCIATE-AC, so queries and retrieves are hierarchical and the window is 1.", ""]

    out += ["## 4. Transfer syntaxes", "",
            "Accepted for every accepted SOP class (`[dicom] transfer_syntaxes`), listed in the configured "
            "order. When a context proposes several, the requester's own first choice among them wins, so a "
            "modality sends what it holds without converting; a context with none of them is refused (result 4, "
            "transfer syntaxes not supported). What is received is stored as received, byte for byte, and "
            "returned so.", ""]
    out += _table([(t["name"], t["uid"]) for t in st["transfer_syntaxes"]], ("Transfer syntax", "UID"))
    out += [""]

    out += ["## 5. Verification and Storage SCP", "",
            "C-ECHO: Success, or 0x0124 for a peer without the echo right. C-STORE statuses (`appliance/errors.py`, "
            "one table for the whole appliance):", "", *_status_table(statuses["store"]), "",
            _duplicates(st["storage"]["duplicate_policy"]) + " The dataset is stored byte for byte as received, "
            f"with our File Meta in front; at most {_bytes(st['storage']['max_instance_bytes'])} per instance.", ""]

    if qr["models"]:
        out += ["## 6. Query/Retrieve SCP", "", "Hierarchical only, answered from the index without opening any "
                "stored instance. Details: [query.md](query.md), [retrieve.md](retrieve.md).", ""]
        out += _table([(m["name"], m["uid"], ", ".join(m["levels"])) for m in qr["models"]],
                      ("Information model", "UID", "Levels"))
        out += [""]
    if qr["keys"]:
        out += ["### C-FIND", "",
                "- **Matching** (PS3.4 C.2.2.2): single value, universal, wildcard `*` and `?` (VRs "
                + ", ".join(qr["wildcard_vrs"]) + "), range on " + "/".join(qr["range_vrs"])
                + " (open ends), list of UIDs; person names "
                + ("case-sensitive" if qr["case_sensitive_person_names"] else "case-insensitive")
                + " (`query.case_sensitive_person_names`); a name query without `=` also matches each component "
                "group. Sequence matching is not supported: a sequence key with values makes the matches Pending "
                "0xFF01.",
                "- **Keys** the index holds at each level are matched and returned; other requested keys come back "
                "zero-length. At any level: " + ", ".join(qr["any_level_keys"]) + " (ONLINE, NEARLINE or OFFLINE, from "
                "the index). The counts, ModalitiesInStudy and SOPClassesInStudy are computed.", ""]
        out += _table([(level, ", ".join(keys)) for level, keys in qr["keys"].items()], ("Level", "Keys"))
        out += ["", *_status_table(statuses["find"]), ""]
    if statuses["retrieve"]:
        out += ["### C-MOVE and C-GET", "",
                "Selection by the unique keys of the level (lists of UIDs at STUDY, SERIES, IMAGE); keys of the levels "
                "above must agree with what is stored when given. C-MOVE "
                "destinations are `[peers]` entries with `allow_receive`, reached on up to "
                "`retrieve.move_associations` parallel associations (each C-STORE-RQ carries Move Originator AE "
                "Title and Message ID). C-GET sends on the requester's association, on the storage contexts for "
                "which role selection made the requester the Storage SCP. Each sub-operation goes in the stored "
                "transfer syntax when the destination accepted it, else converted to Explicit VR Little Endian, "
                "else Implicit VR Little Endian (pixel data decompressed with pylibjpeg); nothing is ever compressed "
                "or sent in a syntax that was not accepted. NEARLINE instances are sent like ONLINE ones; OFFLINE "
                "ones (on tape) are recalled first, with one Pending response meanwhile (docs/tiering.md).", "",
                *_status_table(statuses["retrieve"]), ""]
    if "storage-commitment" in services:
        out += ["## 7. Storage Commitment Push Model SCP", "",
                "Details: [storage-commitment.md](storage-commitment.md). N-ACTION (Action Type 1) is answered at "
                "once; each referenced instance is committed only if it is indexed under the same SOP class and its "
                "stored bytes re-hash to the SHA-256 recorded at ingest. The N-EVENT-REPORT (Event Type 1 all "
                "committed, 2 some failed, Failure Reason 0x0112 no such instance, 0x0119 class-instance conflict, "
                "0x0110 processing failure) goes on the same association while it is open, otherwise on a new "
                "association to the requester's `[peers]` host and port (we propose the SOP class with SCP/SCU role "
                "selection, SCP role), retried `commitment.report_attempts_max` times. Answered requests are "
                "journaled (fsync'd) before Success and reported after a restart: delivery is at least once. "
                "N-ACTION statuses:", "", *_status_table(statuses["storage_commitment"]),
                ""]

    out += ["## 8. Communication profiles and security", "",
            "TCP/IP (PS3.8), DICOM upper layer. Rights per `[peers]` entry (echo, store, find, move, get, "
            "storage_commitment, receive, overwrite); a refused service gets 0x0124 and one log line, the "
            "association stays open. Details: [security.md](security.md).", ""]
    if tls["enabled"]:
        out += [f"DICOM over TLS (PS3.15 Annex B, BCP 195) on port {tls['port']}: TLS {tls['min_version']} or later; "
                "TLS 1.2 cipher suites " + ", ".join(f"`{c}`" for c in tls["ciphers"]) + "; client certificates "
                + ("required and verified against `tls.ca_certificates`" if tls["require_client_certificate"]
                   else "not required") + ". Associations we open use TLS to the peers with `tls = true`.", ""]
    else:
        default = tls["ciphers"] == BCP195_CIPHERS.split(":")
        out += ["DICOM over TLS: not enabled in this configuration (`[tls] enabled = false`). Enabled, it is PS3.15 "
                f"Annex B on a second port ({tls['port']}), TLS {tls['min_version']} or 1.3"
                + (", BCP 195 cipher suites (ECDHE with AES-GCM or ChaCha20-Poly1305)" if default else "")
                + ", client certificates required by default.", ""]

    out += ["### Network interface and configuration", "",
            "TCP/IP over IPv4 or IPv6, on the address `server.host` "
            f"(`{ae['host']}` here: loopback is the default, set `0.0.0.0` or `::` to serve modalities). The "
            "AE title, ports, limits and lists above are all read from the config file (docs/configuration.md); "
            "peers that may query, retrieve or receive are `[peers]` entries (AE title, host, port, rights).", ""]
    out += ["## 9. Character sets", "",
            "Storage: any Specific Character Set (0008,0005), stored as received; the index decodes the values it "
            "keeps. C-FIND: the identifier is decoded with its own (0008,0005) (default "
            f"{st['character_sets']['query_default']}); responses are encoded in the requester's character set when "
            f"every value fits it, else in {st['character_sets']['query_fallback']} (UTF-8) with (0008,0005) saying "
            "so. Defined terms understood: " + ", ".join(st["character_sets"]["query_decoded"]) + ".",
            "Tested with ISO_IR 100, ISO_IR 192 and ISO 2022 IR 87 across each other.", "",
            "## 10. Not supported", "", st["not_supported"], ""]
    return "\n".join(out)


def default_markdown() -> str:
    """docs/conformance.md: the statement of the built-in defaults, whatever the environment says."""
    header = ("<!-- Generated by `make conformance` (appliance/conformance.py, for the built-in default "
              "configuration): do not edit by hand. -->\n")
    return header + markdown(statement(load_config(None, environ={})))


def register(app: typer.Typer) -> None:
    @app.command("conformance")
    def conformance(
        config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config (default: "
                                                    "$APPLIANCE_CONFIG, ./appliance.toml, built-in)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (raw values)")] = False,
    ) -> None:
        """Print the DICOM conformance statement (PS3.2) of this configuration: SOP classes, transfer syntaxes,
        roles, association policies, extended negotiation."""
        from appliance.cli_common import load_cli_config

        cfg = load_cli_config(config)  # a config error: one line or JSON, by the root group (cli_common.RootGroup)
        st = statement(cfg)
        typer.echo(json.dumps(st, indent=2, sort_keys=True) if as_json else markdown(st), nl=as_json)


if __name__ == "__main__":  # make conformance
    print(default_markdown(), end="")
