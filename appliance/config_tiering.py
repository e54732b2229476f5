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
TIER_KINDS = ("nearline", "tape")  # "s3" comes with the S3 issue
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


@dataclass(frozen=True)
class PolicyConfig:
    """One rule: studies on ``source`` matching every filter given move to ``target``. Filters left at their
    default do not filter. With ``high_watermark`` set, the rule only runs while the source tier is fuller than it,
    and moves the least recently accessed matching studies until the tier is under ``low_watermark``."""

    name: str
    source: str  # TOML key "from": "online" or a tier name
    target: str  # TOML key "to": a tier name
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


def parse_tiering(raw: dict[str, Any], base: Path, build: Build) -> TieringSections:
    tiering = build(TieringConfig, "tiering", raw.get("tiering", {}), base)
    if not tiering.audit_log.is_absolute():
        tiering = _replace(tiering, audit_log=base / tiering.audit_log)
    tiers = []
    for i, table in enumerate(_list(raw, "tiers")):
        table = dict(table)
        volumes = tuple(build(TierVolumeConfig, f"tiers[{i}].volumes[{j}]", v, base)
                        for j, v in enumerate(table.pop("volumes", []) or []))
        tier = build(TierConfig, f"tiers[{i}]", table, base)
        path = tier.path
        if isinstance(path, str):
            path = Path(path).expanduser()
            path = path if path.is_absolute() else base / path
        changer = Path(tier.changer) if isinstance(tier.changer, str) else tier.changer
        tiers.append(_replace(tier, volumes=volumes, path=path, changer=changer))
    policies = []
    for i, table in enumerate(_list(raw, "policies")):
        table = dict(table)
        for toml_key, name in (("from", "source"), ("to", "target")):
            if toml_key in table:
                table[name] = table.pop(toml_key)
        policies.append(build(PolicyConfig, f"policies[{i}]", table, base))
    sections = TieringSections(tiering, tuple(tiers), tuple(policies))
    validate_tiering(sections)
    return sections


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
    for key in ("run_studies_max", "study_instances_max", "recall_queue_max", "recall_batch_max"):
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
        if tier.name == ONLINE_TIER or tier.name in names or tier.name in volume_names:
            raise ConfigError(f"{where}.name: {tier.name!r} is taken (by 'online', a volume or another tier)")
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
    places = {ONLINE_TIER} | names
    # Where a tier stands from fastest to slowest (tiering.tiers.tier_order): a policy only moves down.
    by_speed = sorted(s.tiers, key=lambda t: 1 if t.kind == "nearline" else 2)
    speed_rank = {name: i for i, name in enumerate([ONLINE_TIER, *[t.name for t in by_speed]])}
    pnames: set[str] = set()
    for i, p in enumerate(s.policies):
        where = f"policies[{i}] ({p.name})"
        if not p.name or p.name in pnames:
            raise ConfigError(f"policies[{i}].name: missing or used twice")
        pnames.add(p.name)
        if p.source not in places or p.target not in names:
            raise ConfigError(f"{where}: from must be 'online' or a tier, to a tier (tiers: "
                              f"{', '.join(sorted(names)) or 'none configured'}); got {p.source!r} -> {p.target!r}")
        if p.source == p.target:
            raise ConfigError(f"{where}: from and to are the same tier")
        if speed_rank[p.target] <= speed_rank[p.source]:
            raise ConfigError(f"{where}: {p.source!r} -> {p.target!r} is not a move to a slower tier (online, then "
                              "nearline tiers, then tape tiers); policies only move studies down, a study comes back "
                              "up with `appliance tier recall`")
        if p.received_days_min < 0 or p.accessed_days_min < 0 or p.study_bytes_min < 0 or p.study_bytes_max < 0:
            raise ConfigError(f"{where}: ages and sizes are >= 0")
        if p.study_bytes_max and p.study_bytes_max < p.study_bytes_min:
            raise ConfigError(f"{where}: study_bytes_max < study_bytes_min")
        if p.high_watermark:
            if not 0.0 < p.low_watermark < p.high_watermark <= 1.0:
                raise ConfigError(f"{where}: a watermark rule needs 0 < low_watermark < high_watermark <= 1")
        elif p.low_watermark:
            raise ConfigError(f"{where}: low_watermark without high_watermark")
