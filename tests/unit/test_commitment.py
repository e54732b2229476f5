"""Storage Commitment pieces without a network: the Action Information parser (hostile bytes included), the Event
Information encoder, the handler's checks and the [commitment] config section."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from appliance import errors
from appliance.config import DEFAULT_CONFIG_TOML, CommitmentConfig, Config, load_config
from appliance.dicom.uids import STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE
from appliance.errors import ConfigError
from appliance.net import dimse
from appliance.net.service import Request, Response
from appliance.services.commitment import (
    EVENT_ALL_COMMITTED,
    EVENT_SOME_FAILED,
    BadRequest,
    CommitmentHandler,
    Outcome,
    Reference,
    commitments_for,
    event_information,
    parse_action,
)
from appliance.services.commitment_journal import Journal, JournalEntry

SYNTAXES = {"1.2.840.10008.1.2": (True, True, False), "1.2.840.10008.1.2.1": (False, True, False),
            "1.2.840.10008.1.2.2": (False, False, False), "1.2.840.10008.1.2.1.99": (False, True, True)}
CT = "1.2.840.10008.5.1.4.1.1.2"


def action(references: list[tuple[str, str]], transaction: str | None = "1.2.3.4") -> Dataset:
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        if sop_class:
            item.ReferencedSOPClassUID = sop_class
        if sop_instance:
            item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def encoded(ds: Dataset, transfer_syntax: str = "1.2.840.10008.1.2.1") -> bytes:
    data = encode(ds, *SYNTAXES[transfer_syntax])
    assert data is not None
    return data


@pytest.mark.parametrize("transfer_syntax", sorted(SYNTAXES))
def test_parse_action_in_every_uncompressed_syntax(transfer_syntax: str) -> None:
    refs = [(CT, f"1.2.3.{i}") for i in range(5)]
    transaction, references = parse_action(encoded(action(refs), transfer_syntax), transfer_syntax, 10)
    assert transaction == "1.2.3.4"
    assert references == [Reference(c, i) for c, i in refs]


@pytest.mark.parametrize(
    ("ds", "status"),
    [(action([(CT, "1.2.3")], transaction=None), errors.INVALID_ARGUMENT_VALUE),
     (action([]), errors.INVALID_ARGUMENT_VALUE),
     (action([(CT, "")]), errors.INVALID_ARGUMENT_VALUE),
     (action([("", "1.2.3")]), errors.INVALID_ARGUMENT_VALUE),
     (action([(CT, f"1.2.{i}") for i in range(11)]), errors.RESOURCE_LIMITATION),
     (action([(CT, "1.2.03")]), errors.INVALID_ARGUMENT_VALUE),  # not a UID: a component with a leading zero
     (action([(CT, "1.2.3." + "4" * 70)]), errors.INVALID_ARGUMENT_VALUE),
     (action([(CT, "1.2.3")], transaction="1.2.x"), errors.INVALID_ARGUMENT_VALUE)],
)
def test_parse_action_refuses_what_is_missing_or_too_much(ds: Dataset, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_action(encoded(ds), "1.2.840.10008.1.2.1", 10)
    assert caught.value.status == status


def test_parse_action_hostile_bytes_are_invalid_argument_never_a_crash() -> None:
    good = encoded(action([(CT, "1.2.3"), (CT, "1.2.4")]))
    rng = random.Random(9)
    cases = [b"", b"\x00", b"\x08\x00\x95\x11UI\xff\x7f1.2", good[: len(good) // 2], b"\xff" * 64]
    for _ in range(300):  # truncations and byte flips of a good request
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(bytes(data[: rng.randint(0, len(data))]))
    for data in cases:
        try:
            transaction, references = parse_action(data, "1.2.840.10008.1.2.1", 10)
        except BadRequest as exc:
            assert exc.status in (errors.INVALID_ARGUMENT_VALUE, errors.RESOURCE_LIMITATION)
            continue
        # What gets through is safe to put into the report.
        event_information(transaction, Outcome(committed=references), "APPLIANCE", "1.2.840.10008.1.2.1")


@pytest.mark.parametrize("transfer_syntax", sorted(SYNTAXES))
def test_event_information_round_trips(transfer_syntax: str) -> None:
    outcome = Outcome(committed=[Reference(CT, "1.2.3.1")], failed=[(Reference(CT, "1.2.3.2"), 0x0112),
                                                                  (Reference(CT, "1.2.3.3"), 0x0110)])
    assert outcome.event_type == EVENT_SOME_FAILED and Outcome([Reference(CT, "1")]).event_type == EVENT_ALL_COMMITTED
    data = event_information("1.2.3.4", outcome, "APPLIANCE", transfer_syntax)
    ds = decode(io.BytesIO(data), *SYNTAXES[transfer_syntax])
    assert ds.TransactionUID == "1.2.3.4" and ds.RetrieveAETitle == "APPLIANCE"
    assert [str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence] == ["1.2.3.1"]
    assert [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason), str(i.ReferencedSOPClassUID))
            for i in ds.FailedSOPSequence] == [("1.2.3.2", 0x0112, CT), ("1.2.3.3", 0x0110, CT)]
    only_failed = decode(io.BytesIO(event_information("1.2", Outcome(failed=outcome.failed), "A", transfer_syntax)),
                         *SYNTAXES[transfer_syntax])
    assert "ReferencedSOPSequence" not in only_failed  # PS3.4 J.3.3.1: only when something was committed


@dataclasses.dataclass
class FakeContext:
    config: Config


def run_handler(config: Config, command: dimse.Command, data: bytes | None) -> Response:
    request = Request(command, 1, STORAGE_COMMITMENT_PUSH, "1.2.840.10008.1.2.1", "SCU", None, "127.0.0.1")
    ctx: Any = FakeContext(config)
    handler = CommitmentHandler(ctx, request)
    if data is not None:
        for i in range(0, len(data), 1000):
            handler.feed(memoryview(data[i : i + 1000]))

    async def first() -> Response:
        return [r async for r in handler.responses()][0]

    return asyncio.run(first())


def n_action(action_type: int | None = 1, instance: str = STORAGE_COMMITMENT_PUSH_INSTANCE,
             has_dataset: bool = True) -> dimse.Command:
    return dimse.Command(dimse.N_ACTION_RQ, message_id=7, requested_sop_class_uid=STORAGE_COMMITMENT_PUSH,
                         requested_sop_instance_uid=instance, action_type_id=action_type, has_dataset=has_dataset)


def test_handler_checks_before_anything_starts() -> None:
    config = Config(commitment=CommitmentConfig(request_bytes_max=64 << 10, pending_per_worker_max=1))
    data = encoded(action([(CT, "1.2.3")]))
    assert run_handler(config, n_action(instance="1.2.3"), data).status == errors.NO_SUCH_OBJECT_INSTANCE
    wrong = run_handler(config, n_action(action_type=2), data)
    assert wrong.status == errors.NO_SUCH_ACTION
    assert wrong.extra == ((dimse.ACTION_TYPE_ID, dimse.us(2)),)  # echoed, as the request had one
    assert run_handler(config, n_action(has_dataset=False), None).status == errors.INVALID_ARGUMENT_VALUE
    big = encoded(action([(CT, f"1.2.3.{i + 1}" + "9" * 40) for i in range(2000)]))
    assert len(big) > 64 << 10
    assert run_handler(config, n_action(), big).status == errors.RESOURCE_LIMITATION


def test_handler_refuses_beyond_pending_per_worker_max() -> None:
    config = Config(commitment=CommitmentConfig(pending_per_worker_max=1))
    ctx: Any = FakeContext(config)
    request = Request(n_action(), 1, STORAGE_COMMITMENT_PUSH, "1.2.840.10008.1.2.1", "SCU", None, "127.0.0.1")
    handler = CommitmentHandler(ctx, request)
    handler.feed(memoryview(encoded(action([(CT, "1.2.3")]))))
    commitments_for(ctx).pending = 1  # one request of this worker still verifying or reporting

    async def first() -> Response:
        return [r async for r in handler.responses()][0]

    assert asyncio.run(first()).status == errors.RESOURCE_LIMITATION


def test_commitment_section_is_loaded_and_validated(tmp_path: Path) -> None:
    config_path = tmp_path / "a.toml"
    config_path.write_text(DEFAULT_CONFIG_TOML)
    assert load_config(config_path).commitment == CommitmentConfig(journal_path=tmp_path / "var/commitments")
    config_path.write_text("[commitment]\nreport_attempts_max = 5\nreport_timeout_s = 2\n")
    loaded = load_config(config_path).commitment
    assert (loaded.report_attempts_max, loaded.report_timeout_s) == (5, 2.0)
    for bad in ("verify_concurrency_max = 0", "report_timeout_s = 0", "references_per_request_max = 0",
                "request_bytes_max = 10", "pending_per_worker_max = 0", "report_attempts_max = 0", "nosuch = 1"):
        config_path.write_text(f"[commitment]\n{bad}\n")
        with pytest.raises(ConfigError, match="commitment"):
            load_config(config_path)


def test_journal_takes_up_its_own_and_orphaned_workers_entries(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    for worker in (0, 1, 3):
        Journal(root, worker).add(JournalEntry(f"1.2.{worker}", f"AE{worker}", [(CT, f"1.2.3.{worker}")]))
    (root / "worker-0" / ".half.json.tmp").write_text("{")  # written, never renamed: never answered
    (root / "worker-0" / "broken.json").write_text("{")
    # Two workers now: worker 1 takes up its own; worker 0 its own and worker 3's (which no longer runs).
    assert [e.transaction_uid for e in Journal(root, 1).take_up(2)] == ["1.2.1"]
    taken = Journal(root, 0).take_up(2)
    assert sorted((e.transaction_uid, e.calling_ae, e.references[0][1]) for e in taken) == [
        ("1.2.0", "AE0", "1.2.3.0"), ("1.2.3", "AE3", "1.2.3.3")]
    assert not list((root / "worker-3").glob("*.json"))
    assert (root / "worker-0" / "broken.bad").exists() and not (root / "worker-0" / ".half.json.tmp").exists()
    journal = Journal(root, 0)
    for entry in taken:
        journal.remove(entry.name)
    assert not list((root / "worker-0").glob("*.json"))
