"""``appliance tape verify``: read every archive of a cartridge, re-hash every member, check the catalog on tape
against what the tape holds, and (given the index's copies) that every copy the index names is there."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from appliance.errors import BlobMissing
from tiering.archive import Member, make_location, parse_location, read_catalog
from tiering.tape.backend import TapeBackend
from tiering.tape.stream import FileReader


@dataclass
class Finding:
    where: str  # a container or a location
    problem: str


@dataclass
class CartridgeReport:
    label: str
    archives: int = 0
    members: int = 0
    bytes_read: int = 0
    index_copies: int = 0  # copies the index names on this cartridge, checked
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def _key(member: Member) -> tuple[int, int, int, str]:
    return member.record_offset, member.data_offset, member.stored_bytes, member.meta.digest


def verify_cartridge(backend: TapeBackend, label: str,
                     index_copies: Iterable[tuple[str, str]] | None = None) -> CartridgeReport:
    """``index_copies``: (digest, location) of every copy the index names on this tier (others are skipped)."""
    report = CartridgeReport(label)
    on_tape: dict[str, str] = {}  # location -> digest
    number = 1
    while True:
        scanned = backend.scan_file(label, number)
        if scanned is None:
            break
        members, complete, total = scanned
        container = f"{label}/{number}"
        report.archives += 1
        report.members += len(members)
        report.bytes_read += total
        with backend.library.session(label) as drive:
            reader = FileReader(drive, number)
            if not complete:
                report.findings.append(Finding(container, "archive ends without its catalog (left open by a "
                                                          "crash or still being written; recover closes it)"))
            else:
                try:
                    # The zeros padding the last drive block after the end-of-archive are allowed.
                    catalog = read_catalog(reader.read_at, total, container)
                except BlobMissing as exc:
                    catalog = []
                    report.findings.append(Finding(container, f"catalog unreadable: {exc}"))
                listed = {_key(m) for m in catalog}
                found = {_key(m) for m in members}
                for key in sorted(found - listed):
                    report.findings.append(Finding(f"{container}:{key[0]}", "member on tape, not in the catalog"))
                for key in sorted(listed - found):
                    report.findings.append(Finding(f"{container}:{key[0]}", "in the catalog, not on tape"))
            for member in members:
                location = make_location(container, member)
                on_tape[location] = member.meta.digest
                if not backend.member_is_whole(reader, member, container):
                    report.findings.append(Finding(location, "bytes do not hash to the member's digest"))
        number += 1
    for digest, location in index_copies or ():
        try:
            copy_label = parse_location(location)[0].partition("/")[0]
        except BlobMissing:
            continue
        if copy_label != label:
            continue
        report.index_copies += 1
        if on_tape.get(location) != digest:
            report.findings.append(Finding(location, f"the index names blob {digest[:12]}... here; the tape "
                                                     "does not hold it"))
    return report
