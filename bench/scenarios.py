"""The scenarios of bench/driver.py: the instances each one sends (from bench/synth.py), with fresh SOP
Instance UIDs rewritten in the encoded bytes, and the workload of one run (streams, one association per instance,
open loop or closed loop for a duration)."""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import synth

SCENARIOS = ("ct-burst", "morning-rush", "sustained", "many-small-associations")
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
NOT_REWRITABLE = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
SOP_INSTANCE_TAG = b"\x08\x00\x18\x00"


# ---- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_bytes: bytes


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def rewrite_instance_uid(inst: Instance, uid: str) -> Instance:
    """The same dataset under another SOP Instance UID: the top-level (0008,0018) element is replaced in the
    encoded bytes (Explicit or Implicit VR Little Endian, encapsulated pixel data included)."""
    ts = inst.transfer_syntax_uid
    if ts in NOT_REWRITABLE:
        raise ValueError(f"cannot rewrite UIDs in transfer syntax {ts}")
    implicit = ts == IMPLICIT_LE
    data, old = inst.dataset_bytes, inst.sop_instance_uid.encode()
    pos = data.find(SOP_INSTANCE_TAG)
    while pos >= 0:
        if implicit:
            length, start = int.from_bytes(data[pos + 4:pos + 8], "little"), pos + 8
        elif data[pos + 4:pos + 6] == b"UI":
            length, start = int.from_bytes(data[pos + 6:pos + 8], "little"), pos + 8
        else:
            length, start = -1, pos
        if length >= 0 and data[start:start + length].rstrip(b"\x00 ") == old:
            break
        pos = data.find(SOP_INSTANCE_TAG, pos + 1)
    else:
        raise ValueError(f"SOP Instance UID {inst.sop_instance_uid} not found in the dataset")
    value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    header = SOP_INSTANCE_TAG + (len(value).to_bytes(4, "little") if implicit
                                 else b"UI" + len(value).to_bytes(2, "little"))
    return Instance(inst.sop_class_uid, uid, ts, data[:pos] + header + value + data[start + length:])


def _from_part10(path: Path) -> Instance:
    from pynetdicom.dsutils import split_dataset

    meta, offset = split_dataset(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    return Instance(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID), data)


def load_instances(profile: str, count: int, seed: int, transfer_syntax: str, cache: Path) -> tuple[
        list[Instance], str]:
    """``count`` instances of ``profile``: from bench/synth's streaming API when it has one (and knows the
    profile), else from its cached Part-10 bursts (ct and mr only). Returns (instances, source)."""
    iter_instances = getattr(synth, "iter_instances", None)
    if iter_instances is not None:
        try:
            items = [Instance(str(i.sop_class_uid), str(i.sop_instance_uid), str(i.transfer_syntax_uid),
                              bytes(i.dataset_bytes)) for i in iter_instances(profile, count, seed, transfer_syntax)]
            return items, "synth.iter_instances"
        except (KeyError, ValueError, TypeError, NotImplementedError) as exc:
            print(f"note: synth.iter_instances({profile!r}) failed ({exc}); using the fallback", file=sys.stderr)
    if transfer_syntax != EXPLICIT_LE:
        raise SystemExit(f"error: the fallback data source has only Explicit VR Little Endian, not {transfer_syntax}")
    if profile not in ("ct", "mr"):
        raise SystemExit(f"error: profile {profile!r} needs synth.iter_instances (the fallback has only ct and mr)")
    spec = synth.ct_spec(count, seed=seed) if profile == "ct" else synth.mr_spec(count, seed=seed)
    burst = synth.load_or_generate(spec, cache)
    return [_from_part10(p) for p in burst.files], "synth.load_or_generate"


def chunks(items: list[Instance], n: int) -> list[list[Instance]]:
    """n contiguous, near-equal runs (empty ones dropped), like a modality splitting a series."""
    return [part for i in range(n) if (part := items[i * len(items) // n:(i + 1) * len(items) // n])]


# ---- workloads ----------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What one run sends. ``mode``: streams (one association per stream, closed loop), per-instance (one
    association per instance, ``concurrency`` at a time), open-loop (``rate``/s for ``duration`` s over
    ``concurrency`` associations) or for-duration (closed loop over ``concurrency`` associations for
    ``duration`` s)."""

    scenario: str
    mode: str
    n: int  # the N asked for (associations; per modality in morning-rush)
    streams: list[tuple[str, list[Instance]]] = field(default_factory=list)
    pool: list[Instance] = field(default_factory=list)
    calling_ae: str = "BENCH"
    concurrency: int = 1
    rate: float = 0.0
    duration: float = 0.0

    @property
    def planned(self) -> int:
        if self.mode == "open-loop":
            return int(self.rate * self.duration)
        if self.mode == "for-duration":
            return 0  # open-ended: whatever fits in the time
        return sum(len(items) for _, items in self.streams)


@dataclass
class Scenario:
    name: str
    groups: list[tuple[str, list[Instance]]]  # (calling AE, instances) per modality
    rate: float = 0.0
    duration: float = 0.0

    def workload(self, n: int, unique: bool) -> Workload:
        def fresh(items: list[Instance]) -> list[Instance]:
            if not unique or any(i.transfer_syntax_uid in NOT_REWRITABLE for i in items):
                return items  # big endian or deflated: sent as generated (see --keep-uids)
            return [rewrite_instance_uid(i, new_uid()) for i in items]

        if self.name == "sustained":
            ae, pool = self.groups[0]
            return Workload(self.name, "open-loop", n, pool=pool, calling_ae=ae, concurrency=n, rate=self.rate,
                            duration=self.duration)
        if self.name == "many-small-associations":
            ae, items = self.groups[0]
            return Workload(self.name, "per-instance", n, streams=[(ae, [i]) for i in fresh(items)], calling_ae=ae,
                            concurrency=n)
        streams = [(ae, part) for ae, items in self.groups for part in chunks(fresh(items), n)]
        return Workload(self.name, "streams", n, streams=streams, concurrency=len(streams))

    def ceiling(self, n: int, seconds: float) -> Workload:
        if self.name == "sustained":
            ae, pool = self.groups[0]
            return Workload(self.name, "for-duration", n, pool=pool, calling_ae=ae, concurrency=n,
                            duration=min(self.duration, seconds))
        return self.workload(n, unique=False)  # the discard receiver does not care about duplicates


def build_scenario(args: argparse.Namespace) -> tuple[Scenario, dict[str, Any]]:
    """Load the data of ``args.scenario``; returns it and the report's ``data`` section."""
    data: dict[str, Any] = {}

    def load(label: str, profile: str, count: int, seed: int) -> list[Instance]:
        items, source = load_instances(profile, count, seed, args.transfer_syntax, args.cache)
        total = sum(len(i.dataset_bytes) for i in items)
        data[label] = {"profile": profile, "source": source, "instances": len(items), "bytes": total,
                       "mean_bytes": total / len(items) if items else 0, "seed": seed}
        return items

    name, seed = args.scenario, args.seed
    if name == "ct-burst":
        count = args.count or 1000
        profile = args.profile or "ct"
        return Scenario(name, [(args.calling_ae or "CT01", load("CT01", profile, count, seed))]), data
    if name == "morning-rush":
        count = args.count or 200
        rooms = [("CT01", "ct", count, seed), ("CT02", "ct", count, seed + 1), ("CT03", "ct", count, seed + 2),
                 ("MR01", "mr", count, seed + 10), ("MR02", "mr", count, seed + 11),
                 ("DX01", "dx", max(1, count // 10), seed + 20)]
        return Scenario(name, [(ae, load(ae, profile, n, s)) for ae, profile, n, s in rooms]), data
    if name == "sustained":
        total = int(args.rate * args.duration)
        if total < 1:
            raise SystemExit("error: --rate x --duration must be at least one instance")
        pool = min(args.count or 100, total)
        ae = args.calling_ae or "MR01"
        items = load(ae, args.profile or "mr", pool, seed)
        if any(i.transfer_syntax_uid in NOT_REWRITABLE for i in items):
            raise SystemExit("error: sustained rewrites SOP Instance UIDs: not possible in big endian or deflated data")
        return Scenario(name, [(ae, items)], args.rate, args.duration), data
    count = args.count or 200
    ae = args.calling_ae or "US01"
    return Scenario(name, [(ae, load(ae, args.profile or "mr", count, seed))]), data
