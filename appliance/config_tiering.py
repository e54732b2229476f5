"""The tiering sections of the config: ``[tiering]`` (scheduling, rates, recall waits), ``[[tiers]]`` (the storage
tiers below the online volumes) and ``[[policies]]`` (what moves where, when). Parsed by config.py, validated here
so config.py stays about the node itself. docs/tiering.md explains each key to a storage admin."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

ONLINE_TIER = "online"  # the [[volumes]]: reserved, a [[tiers]] entry may not take the name
# `to = "delete"`: a retention rule (expired studies are deleted, tiering/expire.py); reserved like ONLINE_TIER.
# Without `from`, the rule applies on every tier (ANY_TIER).
DELETE = "delete"
ANY_TIER = ""
TIER_KINDS = ("nearline", "s3", "tape")
# Where a kind stands from fastest to slowest (after online = 0): reads try copies in this order and policies only
# move studies to a higher rank. S3 is nearline in latency (a read starts in milliseconds to seconds) but sits
# below a site's own nearline disks: it is the shared, growable, slower layer (docs/scale-out.md).
KIND_RANK = {"nearline": 1, "s3": 2, "tape": 3}
TAPE_MODES = ("virtual", "ltfs", "st")


@dataclass(frozen=True)
class TierVolumeConfig:
    """One filesystem of a nearline tier (a NAS export, a RAID 6 set), mounted at ``path``."""

    name: str
    path: Path
    high_watermark: float = 0.95  # fill above which this volume takes no new archive


@dataclass(frozen=True)
class TierConfig:
    name: str
    kind: str  # one of TIER_KINDS
    # -- nearline: per-study archives on one or more volumes
    volumes: tuple[TierVolumeConfig, ...] = ()
    compression_level: int = 3  # zstd level (0: members stored uncompressed)
    frame_bytes: int = 4 << 20  # a member is cut into independent zstd frames of this many original bytes
    fsync: bool = True
    # -- tape: large sequential pax archives on cartridges
    mode: str = "virtual"  # virtual (file-backed library), ltfs (a mounted LTFS cartridge), st (/dev/nst*)
    path: Path | None = None  # virtual: the library folder; ltfs: the mount point; st: the device (/dev/nst0)
    changer: Path | None = None  # st: the changer's SCSI generic device (mtx); none: cartridges loaded by hand
    cartridge_bytes: int = 2_500_000_000_000  # capacity of a (virtual) cartridge; LTO-6 native
    cartridges: int = 8  # virtual: cartridges in the library (label creates them)
    load_s: float = 0.0  # virtual: simulated load + thread time (a real LTO drive: ~15 s)
    seek_s_per_gib: float = 0.0  # virtual: simulated positioning time per GiB skipped (LTO: ~0.3 s)
    archive_bytes_max: int = 16 << 30  # a tape archive is closed after this many bytes
    # -- s3: per-study archives as objects in a bucket of an S3-compatible object store (tiering/s3.py)
    endpoint: str = ""  # e.g. https://s3.example.org:8333 ("" = AWS's endpoint for the region)
    bucket: str = ""
    prefix: str = ""  # every object of this tier lies under <prefix>/: one prefix per appliance (scale-out.md)
    region: str = "us-east-1"
    credentials_file: Path | None = None  # TOML access_key_id + secret_access_key, mode 0600; else the environment
    tls_verify: bool = True  # verify the endpoint's certificate (against ca_file, else the system's CAs)
    ca_file: Path | None = None
    allow_plain_http: bool = False  # an http:// endpoint other than the loopback needs this (PHI in clear text)
    part_bytes: int = 16 << 20  # archives larger than this go up as multipart uploads of parts this size
    uploads_parallel: int = 4  # parts of one upload in flight at once (memory: part_bytes x this)
    verify_upload: bool = True  # read each uploaded object back and compare its SHA-256 with what was sent
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0  # per socket read: with retries_max, how long a read waits on a hung store
    retries_max: int = 2  # retries per request (after the first attempt) on 503 SlowDown, 5xx, dropped connections
    unreachable_retry_s: float = 30.0  # after the store could not be reached, fail at once for this long
    capacity_bytes: int = 0  # the bucket's quota for this tier, for tier status and watermark rules (0: none)
    # Not a TOML key: the appliance's AE title ([server] ae_title), written into the prefix's marker by `tier init`
    # so that a second appliance configured onto the same prefix is refused (docs/scale-out.md).
    owner: str = ""


@dataclass(frozen=True)
class PolicyConfig:
    """One rule: studies on ``source`` matching every filter given move to ``target``. Filters left at their
    default do not filter. With ``high_watermark`` set, the rule only runs while the source tier is fuller than it,
    and moves the least recently accessed matching studies until the tier is under ``low_watermark``."""

    name: str
    source: str  # TOML key "from": "online" or a tier name (ANY_TIER: a retention rule without `from`)
    target: str  # TOML key "to": a tier name, or DELETE (a retention rule)
    received_days_min: float = 0.0  # days since the study's last instance was received
    accessed_days_min: float = 0.0  # days since it was last retrieved or exported (else since received)
    modalities: tuple[str, ...] = ()  # any of these in ModalitiesInStudy
    calling_aes: tuple[str, ...] = ()  # sent by one of these AE titles
    study_bytes_min: int = 0
    study_bytes_max: int = 0  # 0: no upper bound
    high_watermark: float = 0.0  # 0: not a watermark rule
    low_watermark: float = 0.0


@dataclass(frozen=True)
class TieringConfig:
    schedule_s: float = 0.0  # the server runs the policies every this many seconds (0: only `appliance tier run`)
    rate_bytes_per_s: int = 100 << 20  # migration read+write budget, so that ingest keeps its rate
    run_studies_max: int = 10_000  # studies one run moves at most (the rest waits for the next run)
    # A run that would delete more studies than this (retention rules) deletes none of them and fails: a clock
    # far in the future or a mistyped age would otherwise expire the archive (tiering/run.py retention_guard).
    retention_studies_max: int = 1000
    study_instances_max: int = 100_000  # a larger study is refused by the mover (reported, never half-moved)
    recall_wait_s: float = 60.0  # a C-MOVE/C-GET of an offline study waits this long for its recall
    recall_queue_max: int = 10_000  # studies queued for recall at once; more are refused
    recall_batch_max: int = 64  # studies recalled per tape pass (ordered by cartridge and position)
    access_flush_s: float = 30.0  # last-access times are written to the index in batches this often
    audit_log: Path = Path("var/log/tiering-audit.jsonl")  # one JSON line per move, recall, scrub finding
    scrub_bytes_per_s: int = 50 << 20  # `appliance verify` read budget per tier


@dataclass(frozen=True)
class TieringSections:
    tiering: TieringConfig = field(default_factory=TieringConfig)
    tiers: tuple[TierConfig, ...] = ()
    policies: tuple[PolicyConfig, ...] = ()


Build = Callable[[type, str, dict[str, Any], Path], Any]


def parse_tiering(raw: dict[str, Any], base: Path, build: Build, owner: str = "") -> TieringSections:
    tiering = build(TieringConfig, "tiering", raw.get("tiering", {}), base)
    if not tiering.audit_log.is_absolute():
        tiering = _replace(tiering, audit_log=base / tiering.audit_log)
    tiers = []
    for i, table in enumerate(_list(raw, "tiers")):
        table = dict(table)
        if "owner" in table:
            raise ConfigError(f"tiers[{i}].owner: not a key: an s3 tier's owner is [server] ae_title")
        volumes = tuple(build(TierVolumeConfig, f"tiers[{i}].volumes[{j}]", v, base)
                        for j, v in enumerate(table.pop("volumes", []) or []))
        tier = build(TierConfig, f"tiers[{i}]", table, base)
        path = tier.path
        if isinstance(path, str):
            path = Path(path).expanduser()
            path = path if path.is_absolute() else base / path
        changer = Path(tier.changer) if isinstance(tier.changer, str) else tier.changer
        files = {key: _path(getattr(tier, key), base) for key in ("credentials_file", "ca_file")}
        tiers.append(_replace(tier, volumes=volumes, path=path, changer=changer, owner=owner, **files))
    policies = []
    for i, table in enumerate(_list(raw, "policies")):
        table = dict(table)
        for toml_key, name in (("from", "source"), ("to", "target")):
            if toml_key in table:
                table[name] = table.pop(toml_key)
        if table.get("target") == DELETE:
            table.setdefault("source", ANY_TIER)
        policies.append(build(PolicyConfig, f"policies[{i}]", table, base))
    sections = TieringSections(tiering, tuple(tiers), tuple(policies))
    validate_tiering(sections)
    return sections


def _path(value: Any, base: Path) -> Path | None:
    if value is None or value == "":
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _list(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key}: expected [[{key}]] tables")
    return value


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def validate_tiering(s: TieringSections, volume_names: tuple[str, ...] = ()) -> None:
    t = s.tiering
    if t.schedule_s < 0:
        raise ConfigError("tiering.schedule_s: 0 (never) or a positive number of seconds")
    if t.rate_bytes_per_s < 1 << 20:
        raise ConfigError("tiering.rate_bytes_per_s: at least 1 MiB/s")
    for key in ("run_studies_max", "retention_studies_max", "study_instances_max", "recall_queue_max",
                "recall_batch_max"):
        if getattr(t, key) < 1:
            raise ConfigError(f"tiering.{key}: at least 1")
    if t.recall_wait_s < 0 or t.access_flush_s <= 0:
        raise ConfigError("tiering.recall_wait_s >= 0 and tiering.access_flush_s > 0")
    if t.scrub_bytes_per_s < 1 << 20:
        raise ConfigError("tiering.scrub_bytes_per_s: at least 1 MiB/s")
    names: set[str] = set()
    for i, tier in enumerate(s.tiers):
        where = f"tiers[{i}] ({tier.name})"
        if not tier.name or not tier.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"tiers[{i}].name: letters, digits, - and _ only, got {tier.name!r}")
        if tier.name in (ONLINE_TIER, DELETE) or tier.name in names or tier.name in volume_names:
            raise ConfigError(f"{where}.name: {tier.name!r} is taken (by 'online', 'delete', a volume or another tier)")
        names.add(tier.name)
        if tier.kind not in TIER_KINDS:
            raise ConfigError(f"{where}.kind: one of {', '.join(TIER_KINDS)}, got {tier.kind!r}")
        if tier.kind == "nearline":
            if not tier.volumes:
                raise ConfigError(f"{where}.volumes: a nearline tier needs at least one volume")
            vnames = [v.name for v in tier.volumes]
            if len(set(vnames)) != len(vnames):
                raise ConfigError(f"{where}.volumes: a volume name is used twice")
            if not 0 <= tier.compression_level <= 22:
                raise ConfigError(f"{where}.compression_level: 0 (none) to 22")
            if not 64 << 10 <= tier.frame_bytes <= 256 << 20:
                raise ConfigError(f"{where}.frame_bytes: 64 KiB to 256 MiB")
            for v in tier.volumes:
                if not 0.0 < v.high_watermark <= 1.0:
                    raise ConfigError(f"{where}.volumes.{v.name}.high_watermark: a fraction in (0, 1]")
        if tier.kind == "tape":
            if tier.mode not in TAPE_MODES:
                raise ConfigError(f"{where}.mode: one of {', '.join(TAPE_MODES)}, got {tier.mode!r}")
            if tier.path is None:
                raise ConfigError(f"{where}.path: required (library folder, LTFS mount point or tape device)")
            if tier.cartridge_bytes < 1 << 20 or tier.cartridges < 1:
                raise ConfigError(f"{where}: cartridge_bytes >= 1 MiB and cartridges >= 1")
            if tier.load_s < 0 or tier.seek_s_per_gib < 0:
                raise ConfigError(f"{where}: load_s and seek_s_per_gib are >= 0")
            if tier.archive_bytes_max < 1 << 20:
                raise ConfigError(f"{where}.archive_bytes_max: at least 1 MiB")
        if tier.kind == "s3":
            _validate_s3(tier, where)
    places = {ONLINE_TIER} | names
    # Where a tier stands from fastest to slowest (tiering.tiers.tier_order): a policy only moves down.
    by_speed = sorted(s.tiers, key=lambda t: KIND_RANK[t.kind])
    speed_rank = {name: i for i, name in enumerate([ONLINE_TIER, *[t.name for t in by_speed]])}
    pnames: set[str] = set()
    for i, p in enumerate(s.policies):
        where = f"policies[{i}] ({p.name})"
        if not p.name or p.name in pnames:
            raise ConfigError(f"policies[{i}].name: missing or used twice")
        pnames.add(p.name)
        if p.target == DELETE:
            _validate_retention(p, where, places)
            continue
        if p.source not in places or p.target not in names:
            raise ConfigError(f"{where}: from must be 'online' or a tier, to a tier (tiers: "
                              f"{', '.join(sorted(names)) or 'none configured'}); got {p.source!r} -> {p.target!r}")
        if p.source == p.target:
            raise ConfigError(f"{where}: from and to are the same tier")
        if speed_rank[p.target] <= speed_rank[p.source]:
            raise ConfigError(f"{where}: {p.source!r} -> {p.target!r} is not a move to a slower tier (online, then "
                              "nearline, then s3, then tape tiers); policies only move studies down, a study comes back "
                              "up with `appliance tier recall`")
        if p.received_days_min < 0 or p.accessed_days_min < 0 or p.study_bytes_min < 0 or p.study_bytes_max < 0:
            raise ConfigError(f"{where}: ages and sizes are >= 0")
        if p.study_bytes_max and p.study_bytes_max < p.study_bytes_min:
            raise ConfigError(f"{where}: study_bytes_max < study_bytes_min")
        if p.high_watermark:
            source_tier = next((t for t in s.tiers if t.name == p.source), None)
            if source_tier is not None and source_tier.kind == "s3" and not source_tier.capacity_bytes:
                raise ConfigError(f"{where}: a watermark rule on the s3 tier {p.source!r} needs its capacity_bytes "
                                  "(the quota the fill is measured against: a bucket has no size of its own)")
            if not 0.0 < p.low_watermark < p.high_watermark <= 1.0:
                raise ConfigError(f"{where}: a watermark rule needs 0 < low_watermark < high_watermark <= 1")
        elif p.low_watermark:
            raise ConfigError(f"{where}: low_watermark without high_watermark")


def _validate_retention(p: PolicyConfig, where: str, places: set[str]) -> None:
    """A retention rule deletes: it must name an age, and never runs on fill (space is never a reason to delete)."""
    if p.source != ANY_TIER and p.source not in places:
        raise ConfigError(f"{where}: from must be 'online' or a tier (or left out: every tier); got {p.source!r}")
    if p.received_days_min <= 0:
        raise ConfigError(f"{where}: a retention rule (to = \"delete\") needs received_days_min > 0")
    if p.high_watermark or p.low_watermark:
        raise ConfigError(f"{where}: a retention rule cannot be a watermark rule (fill is never a reason to delete)")
    if p.accessed_days_min < 0 or p.study_bytes_min < 0 or p.study_bytes_max < 0:
        raise ConfigError(f"{where}: ages and sizes are >= 0")


S3_PART_BYTES_MIN = 5 << 20  # the S3 API's smallest part (but the last)
S3_PART_BYTES_MAX = 5 << 30
S3_PARTS_MAX = 10_000  # parts per upload: with part_bytes, bounds an archive's size
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _validate_s3(tier: TierConfig, where: str) -> None:
    import re
    from urllib.parse import urlsplit

    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", tier.bucket):
        raise ConfigError(f"{where}.bucket: an S3 bucket name (3-63 lowercase letters, digits, '.' and '-'), got "
                          f"{tier.bucket!r}")
    if tier.prefix.startswith("/") or tier.prefix.endswith("/") or "//" in tier.prefix or \
            not re.fullmatch(r"[A-Za-z0-9._/-]*", tier.prefix):
        raise ConfigError(f"{where}.prefix: letters, digits, '.', '_', '-' and inner '/', no leading or trailing "
                          f"'/', got {tier.prefix!r}")
    if tier.endpoint:
        url = urlsplit(tier.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise ConfigError(f"{where}.endpoint: an http(s)://host[:port] URL, got {tier.endpoint!r}")
        if url.scheme == "http" and url.hostname not in LOOPBACK_HOSTS and not tier.allow_plain_http:
            raise ConfigError(f"{where}.endpoint: {tier.endpoint} is plain HTTP to another machine: the archives "
                              "(patient data) and the credentials' signatures would cross the network in clear. Use "
                              "https://, or set allow_plain_http = true on a network you trust")
    if not S3_PART_BYTES_MIN <= tier.part_bytes <= S3_PART_BYTES_MAX:
        raise ConfigError(f"{where}.part_bytes: 5 MiB to 5 GiB (the S3 API's part sizes)")
    if not 1 <= tier.uploads_parallel <= 64:
        raise ConfigError(f"{where}.uploads_parallel: 1 to 64")
    if not 0 <= tier.compression_level <= 22:
        raise ConfigError(f"{where}.compression_level: 0 (none) to 22")
    if not 64 << 10 <= tier.frame_bytes <= 256 << 20:
        raise ConfigError(f"{where}.frame_bytes: 64 KiB to 256 MiB")
    if tier.connect_timeout_s <= 0 or tier.read_timeout_s <= 0 or tier.unreachable_retry_s < 0:
        raise ConfigError(f"{where}: connect_timeout_s and read_timeout_s > 0, unreachable_retry_s >= 0")
    if not 1 <= tier.retries_max <= 20:
        raise ConfigError(f"{where}.retries_max: 1 to 20 retries")
    if tier.capacity_bytes < 0:
        raise ConfigError(f"{where}.capacity_bytes: 0 (no quota) or a positive number of bytes")
