"""One frozen configuration object, loaded from TOML with environment overrides and validated.

Every key has a default, so ``appliance serve`` with no file serves AE ``APPLIANCE`` on port 11112 with data
under ``./var``. The object is passed explicitly to whatever needs it; there is no module-level config.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom.sop_class import _STORAGE_CLASSES

from appliance.config_ops import LOG_FORMATS, AuditConfig, validate_audit
from appliance.config_template import DEFAULT_CONFIG_TOML  # noqa: F401  (re-exported: init, tests)
from appliance.config_tiering import (
    PolicyConfig,
    TierConfig,
    TieringConfig,
    parse_tiering,
    validate_tiering,
)
from appliance.dicom.uids import QUERY_RETRIEVE_MODELS, STORAGE_COMMITMENT_PUSH, VERIFICATION
from appliance.errors import ConfigError

# Transfer syntaxes accepted by default. When a requestor proposes several in one presentation context, its
# own first choice among these wins (the encoding the modality holds, so it need not convert to send).
# Whatever is negotiated is stored bit-preserved; nothing is ever transcoded.
DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112",  # JPEG XL
    "1.2.840.10008.1.2.4.100",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101",  # MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 HP@4.1
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD
    "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 HP@4.2 2D
    "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 HP@4.2 3D
    "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo HP@4.2
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main
    "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10
)

DUPLICATE_POLICIES = ("overwrite", "reject", "keep-first")
LOG_LEVELS = ("debug", "info", "warning", "error")
# The rights a peer can be given (PeerConfig.allow_*, server.unknown_peer_rights).
RIGHTS = ("echo", "store", "find", "move", "get", "storage_commitment")


def all_storage_sop_classes() -> tuple[str, ...]:
    return tuple(sorted({str(uid) for uid in _STORAGE_CLASSES.values()}))


def service_sop_classes() -> tuple[str, ...]:
    """The non-storage SOP classes served: Verification, Query/Retrieve (FIND, MOVE, GET in the Patient Root and
    Study Root models) and Storage Commitment Push Model."""
    return (VERIFICATION, *QUERY_RETRIEVE_MODELS, STORAGE_COMMITMENT_PUSH)


@dataclass(frozen=True)
class PeerConfig:
    """A known remote modality/AE, in the spirit of Orthanc's ``DicomModalities``."""

    name: str
    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    allow_echo: bool = True
    allow_store: bool = True
    allow_find: bool = True
    allow_move: bool = True
    allow_get: bool = True
    allow_storage_commitment: bool = True
    # May we send instances to this peer (a C-MOVE destination, the target of a Storage Commitment report on a new
    # association)? Only configured peers can be: a C-MOVE to an AE title not under [peers] is refused (0xA801).
    allow_receive: bool = True
    # True: the associations we open to this peer (C-MOVE sub-operations, a Storage Commitment report on a new
    # association) use DICOM TLS with [tls]'s certificates, and ``port`` is the peer's TLS port.
    tls: bool = False
    # May this peer replace an instance already stored with other bytes (same SOP Instance UID)? Only when the
    # peer is named here and this is true does ``storage.duplicate_policy = "overwrite"`` apply to it; everyone
    # else gets keep-first, so an unknown host on the network can never replace (and so delete) stored images.
    allow_overwrite: bool = False


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    path: Path
    # Fraction of the filesystem in use above which this volume takes no new writes.
    high_watermark: float = 0.95


@dataclass(frozen=True)
class ServerConfig:
    ae_title: str = "APPLIANCE"
    # Loopback by default: a fresh install should not take PHI from the whole network before anyone has looked
    # at its config. Set "0.0.0.0" (or "::") to serve modalities.
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 64
    max_pdu: int = 1_048_576
    # Limits against hostile or broken peers (issue 8). Each one bounds a resource one peer could otherwise take.
    # Connections open in one worker, associated or not (a connection that never associates is counted too).
    max_connections_per_worker: int = 128
    # Associations open at once from one calling AE title / one source address, over all workers.
    max_associations_per_ae: int = 32
    max_associations_per_host: int = 32
    # Largest A-ASSOCIATE-RQ read before the association exists (the full max_pdu buffer comes only after).
    max_associate_rq_bytes: int = 65536
    # Presentation contexts one A-ASSOCIATE-RQ may propose (PS3.8: odd IDs 1..255, so 128 at most).
    max_presentation_contexts: int = 128
    # Smallest Maximum Length Received a peer may announce (0 = unlimited is always fine). Below it the
    # association is rejected: we must not send PDUs larger than the peer announced, so we cannot clamp.
    min_peer_pdu: int = 4096
    # Seconds one DIMSE message (command and dataset) may take to arrive, from its first byte to its last.
    message_timeout: float = 600.0
    # Pending output per association above which we stop reading from the peer until it drains (bytes).
    write_buffer_high: int = 1_048_576
    # Seconds output may stay above write_buffer_high (the peer is not reading) before the connection is
    # reset (aborted, not closed: a close would wait for the buffer to drain, forever).
    write_timeout: float = 60.0
    # Worker processes sharing the port through SO_REUSEPORT; 0 means one per CPU (2 workers measured 4-20% faster
    # than 1 on two cores, docs/benchmarks-history.md "Results: ingest bursts").
    workers: int = 0
    # ARTIM: how long an opened connection may take to send its A-ASSOCIATE-RQ (and a release to finish).
    acse_timeout: float = 30.0
    # An established association with no traffic for this long is aborted.
    idle_timeout: float = 300.0
    refuse_unknown_calling_ae: bool = False
    # Rights of a calling AE title not under [peers] (like Orthanc's DicomAlwaysAllow*): echo and store by default,
    # so modalities can send without configuration while nobody unknown can query or pull patient data.
    unknown_peer_rights: tuple[str, ...] = ("echo", "store")
    # True: a configured peer's associations must come from its configured host (name or address), so that a
    # known AE title cannot be borrowed from another machine (Orthanc's DicomCheckModalityHost).
    check_peer_host: bool = False
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    # 0 picks a free port (written to the --port-file), like port = 0 for DICOM.
    metrics_port: int = 9110
    log_level: str = "info"
    # "text": "LEVEL name: message" lines, with a syslog <N> prefix when stderr goes to journald (JOURNAL_STREAM);
    # "json": one JSON object per line (time, level, logger, pid, message). At info a busy node logs per
    # association, never per instance.
    log_format: str = "text"
    # SIGTERM: stop accepting, let associations in progress finish for up to this long, then A-ABORT the rest
    # (a second SIGTERM aborts at once). Keep below the unit's TimeoutStopSec.
    drain_timeout_s: float = 30.0


@dataclass(frozen=True)
class StorageConfig:
    index_path: Path = Path("var/index")
    # keep-first by default: a stored instance is never replaced unless a named peer has allow_overwrite.
    duplicate_policy: str = "keep-first"
    # Group commit: one batch holds at most this many instances and waits at most this long for company.
    commit_max_batch: int = 256
    commit_max_wait_ms: float = 2.0
    # Initial LMDB map size; it grows by doubling when full.
    index_map_size: int = 256 * 1024 * 1024
    # fsync blobs and the index before acknowledging. Switching it off voids the durability contract and exists
    # only for measuring what fsync costs; serve logs a warning when it is off.
    fsync: bool = True
    # Segments: a worker appends every instance to its active segment, which is sealed at this size.
    segment_bytes_max: int = 1 << 30
    # An instance waits in memory until it is appended, up to this size; larger ones spill to <volume>/tmp/.
    spool_memory_bytes: int = 4 << 20
    # ... and while one worker's spooled instances hold less than this in all.
    spool_memory_total_bytes: int = 256 << 20
    # Instances handed to the group commit and not yet answered, per worker; more are refused with 0xA700.
    commit_queue_max: int = 1024
    # Writer threads per worker, each with its own active segment per volume: while one waits in fdatasync the
    # next takes the instances that arrived meanwhile, so several flushes are in flight. 1 by default: 2 gained
    # nothing measurable on a disk whose flush takes ~0.5 ms (docs/configuration.md); try 2-4 where a flush is a
    # network round trip (iSCSI) and many associations send at once.
    writer_lanes: int = 1
    # The largest dataset accepted (bytes); a larger one is refused with 0xA700 while it arrives. 8 GiB: more than
    # any single instance a modality sends (a 2 GiB element is the most most toolkits write).
    max_instance_bytes: int = 8 << 30
    # Compaction: a sealed segment whose dead share (overwritten, duplicate, failed records) reaches this fraction
    # is rewritten; its live records are copied to a new segment, then it is deleted.
    compaction_dead_ratio: float = 0.5
    # How often the server compacts (seconds; 0 = never, only `appliance compact`), and how fast it copies.
    compaction_interval_s: float = 3600.0
    compaction_bytes_per_s: int = 64 << 20


@dataclass(frozen=True)
class RetrieveConfig:
    """C-MOVE and C-GET (services/move.py, services/get.py): what one retrieve may hold and how long it waits."""

    # Associations one C-MOVE opens to its destination at once, each sending its share of the instances ...
    move_associations: int = 2
    # ... but one more only per this many instances (a 10-instance move uses one association).
    move_instances_per_association_min: int = 50
    # Seconds to open the TCP connection to a move destination, and then to get its A-ASSOCIATE-AC.
    connect_timeout_s: float = 10.0
    association_timeout_s: float = 30.0
    # Seconds one C-STORE sub-operation may take, from its first byte sent to the destination's response.
    sub_operation_timeout_s: float = 300.0
    # At most one Pending response per this interval (a 1,000-instance move sends a handful, not 1,000).
    pending_interval_ms: float = 500.0
    # Instances one C-MOVE/C-GET may select; more are refused (0xA701) before anything is sent.
    matches_max: int = 100_000
    # C-MOVE/C-GET requests one worker serves at once (each holds its selection and, for a move, its
    # associations); more are refused with 0xA702 until one ends.
    concurrent_max: int = 8
    # Largest C-MOVE/C-GET identifier accepted (a list of UIDs at the retrieve level); larger: 0xC000.
    identifier_bytes_max: int = 1 << 20
    # Largest instance converted in memory when the destination did not accept its stored transfer syntax; a
    # larger one is a failed sub-operation. Decompression holds the file and its pixels: up to ~4x this size.
    transcode_bytes_max: int = 256 << 20
    # Threads per worker reading blobs (and converting) for retrieves, shared by all of them.
    read_threads: int = 4


@dataclass(frozen=True)
class CommitmentConfig:
    """Storage Commitment Push Model SCP (PS3.4 Annex J, services/commitment.py): what one request may ask and
    how hard we try to deliver its report."""

    # SOP instances one N-ACTION may reference; a longer Referenced SOP Sequence is refused (0x0213).
    references_per_request_max: int = 10000
    # Largest N-ACTION dataset held in memory while it arrives; a larger one is refused (0x0213).
    request_bytes_max: int = 16 << 20
    # Commitment requests being verified or waiting to report, per worker; more are refused (0x0213).
    pending_per_worker_max: int = 64
    # Instances re-hashed at once per worker (each in a thread: their reads compete with C-GET/C-MOVE).
    verify_concurrency_max: int = 2
    # Seconds to wait for the N-EVENT-REPORT-RSP, on the same association or a new one.
    report_timeout_s: float = 30.0
    # Seconds to connect and associate when the report goes on a new association.
    connect_timeout_s: float = 10.0
    # New associations tried to deliver one report, and the wait between two tries.
    report_attempts_max: int = 3
    report_retry_wait_s: float = 10.0
    # Requests answered and not yet reported, one small file each, taken up again when a worker restarts.
    journal_path: Path = Path("var/commitments")


@dataclass(frozen=True)
class QueryConfig:
    """C-FIND SCP (docs/query.md)."""

    # Matches one C-FIND may return; beyond it the query ends with 0xA700 and an Error Comment saying so (the
    # matches already sent stand): a peer asking for every study of the archive gets a bounded answer.
    results_max: int = 10_000
    # Largest identifier accepted (bytes); a larger one is answered 0xC000 without being parsed.
    identifier_bytes_max: int = 65_536
    # Index rows examined per read transaction (one batch, in a worker thread): bounds how long one reader pins
    # LMDB pages and how long the event loop waits for nothing.
    batch_rows_max: int = 512
    # Longest one C-FIND may search before it ends with 0xA700 (seconds).
    search_s_max: float = 60.0
    # Threads per worker running C-FIND searches; more concurrent queries wait their turn batch by batch.
    threads_max: int = 2
    # Person names: false matches DOE*, doe* and Doe* alike (Orthanc's CaseSensitivePN = false).
    case_sensitive_person_names: bool = False
    # True: StudyDate and StudyTime ranges given together match as one date-time range (PS3.4 C.2.2.2.5.1, which
    # asks for it when the SCU negotiated combined matching); false: each is matched on its own.
    combined_date_time_matching: bool = False


@dataclass(frozen=True)
class DicomConfig:
    sop_classes: tuple[str, ...] = field(default_factory=lambda: (*service_sop_classes(), *all_storage_sop_classes()))
    transfer_syntaxes: tuple[str, ...] = DEFAULT_TRANSFER_SYNTAXES


# TLS 1.2 cipher suites allowed by default, as BCP 195 (RFC 9325) recommends: ephemeral ECDH key exchange (forward secrecy,
# no static RSA) and AEAD encryption (AES-GCM, ChaCha20-Poly1305; no CBC, no SHA-1 MAC). TLS 1.3 suites are not set
# by this string: every TLS 1.3 suite meets the same bar.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class TlsConfig:
    """DICOM over TLS (PS3.15 Annex B, BCP 195) on a second port beside the plain one; net/tls.py builds the context."""

    enabled: bool = False
    # DICOM's registered TLS port. 0 picks a free port (written to serve's --port-file as tls_port), as server.port.
    port: int = 2762
    certificate: Path | None = None  # PEM: our certificate, then any intermediate CA certificates
    private_key: Path | None = None  # PEM, not encrypted, readable by the service account only
    ca_certificates: Path | None = None  # PEM bundle of the CAs whose client certificates are trusted
    # What we present when we open a TLS association ourselves (to a [peers] entry with tls = true): default the
    # certificate and key above, which then need the clientAuth purpose too. The peer's server certificate is
    # verified against ca_certificates and its host name or address.
    client_certificate: Path | None = None
    client_private_key: Path | None = None
    # True: a client must present a certificate signed by one of ca_certificates, else the handshake fails.
    require_client_certificate: bool = True
    min_version: str = "1.2"
    ciphers: str = BCP195_CIPHERS  # OpenSSL cipher list for TLS 1.2
    handshake_timeout_s: float = 10.0
    # Handshakes in progress per worker; one more connection to the TLS port is reset at once. A connection in
    # its handshake holds no association slot, so this is what bounds them.
    handshakes_pending_max: int = 64


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    volumes: tuple[VolumeConfig, ...] = (VolumeConfig("vol0", Path("var/volumes/vol0")),)
    peers: tuple[PeerConfig, ...] = ()
    source: Path | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    commitment: CommitmentConfig = field(default_factory=CommitmentConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    tiering: TieringConfig = field(default_factory=TieringConfig)
    tiers: tuple[TierConfig, ...] = ()
    policies: tuple[PolicyConfig, ...] = ()
    audit: AuditConfig = field(default_factory=AuditConfig)
    # True when the file has no [[volumes]]: the built-in default volume, which `serve` may create (`make run`);
    # a configured volume it never creates (appliance/store/volumes.py).
    volumes_builtin: bool = False

    def tier(self, name: str) -> TierConfig | None:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return None

    def peer_by_ae(self, ae_title: str) -> PeerConfig | None:
        for peer in self.peers:
            if peer.ae_title == ae_title:
                return peer
        return None

    def allows(self, peer: PeerConfig | None, right: str) -> bool:
        """May ``peer`` (None: a calling AE title not under [peers]) use the service ``right`` (one of RIGHTS)?"""
        assert right in RIGHTS, right
        if peer is None:
            return right in self.server.unknown_peer_rights
        return bool(getattr(peer, f"allow_{right}"))

    def duplicate_policy_for(self, peer: PeerConfig | None) -> str:
        """The duplicate policy that applies to instances sent by ``peer`` (None: a calling AE not in [peers]).
        "overwrite" is granted per peer; everyone else keeps the first instance stored."""
        policy = self.storage.duplicate_policy
        if policy == "overwrite" and (peer is None or not peer.allow_overwrite):
            return "keep-first"
        return policy

    def effective_workers(self) -> int:
        return self.server.workers or (os.cpu_count() or 1)


def _check_ae(key: str, value: Any) -> str:
    if not isinstance(value, str) or not (1 <= len(value.strip()) <= 16) or "\\" in value:
        raise ConfigError(f"{key}: an AE title is 1 to 16 characters without backslash, got {value!r}")
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ConfigError(f"{key}: an AE title is printable ASCII, got {value!r}")
    return value.strip()


def _build(cls: type, section: str, raw: dict[str, Any], base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{section}.{key}: unknown key (known keys: {known})")
        default = fields[key].default
        factory = fields[key].default_factory
        if default is dataclasses.MISSING and callable(factory):
            default = factory()
        elif default is dataclasses.MISSING and fields[key].type in ("Path", Path):
            # A required path (VolumeConfig.path) has no default to infer its type from: without this it stayed
            # a str, relative paths were not resolved against the config's folder, and serve crashed on it.
            default = Path()
        values[key] = _coerce(f"{section}.{key}", value, default, base)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from None


def _coerce(key: str, value: Any, default: Any, base: Path) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, str) or default is None:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


ENV_PREFIX = "APPLIANCE_"


def _env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> None:
    """``APPLIANCE_SERVER_PORT=11113`` overrides ``[server] port`` (also ``[storage]`` and ``[tls]`` keys); values are
    parsed as TOML scalars."""
    sections = {"server": ServerConfig, "storage": StorageConfig, "tls": TlsConfig}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section in sections:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                try:
                    value = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError:
                    value = text
                raw.setdefault(section, {})[key] = value
                break


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load and validate. ``path=None`` means the embedded defaults (relative paths against the cwd)."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist (appliance init writes one)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8; a Latin-1 byte from an old editor lands here
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
        except OSError as exc:  # a folder, no permission, an I/O error: one line, not a traceback
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
        base = path.resolve().parent
    _env_overrides(raw, dict(os.environ) if environ is None else environ)
    known = {"server", "storage", "dicom", "volumes", "peers", "tls", "retrieve", "commitment", "query", "tiering",
             "tiers", "policies", "audit"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(known))})")

    server = _build(ServerConfig, "server", raw.get("server", {}), base)
    storage = _build(StorageConfig, "storage", raw.get("storage", {}), base)
    # The default index_path is relative: resolve it against the config file's folder like every other path
    # (it was only resolved when there was no file, so a file without index_path put the index under the cwd).
    if not storage.index_path.is_absolute():
        storage = dataclasses.replace(storage, index_path=base / storage.index_path)
    dicom_raw = dict(raw.get("dicom", {}))
    if dicom_raw.get("sop_classes") == ["storage"]:
        dicom_raw["sop_classes"] = [VERIFICATION, *all_storage_sop_classes()]
    elif dicom_raw.get("sop_classes") == ["all"]:
        dicom_raw["sop_classes"] = [*service_sop_classes(), *all_storage_sop_classes()]
    dicom = _build(DicomConfig, "dicom", dicom_raw, base)
    retrieve = _build(RetrieveConfig, "retrieve", raw.get("retrieve", {}), base)

    volumes_raw = raw.get("volumes")
    if volumes_raw is None:
        volumes: tuple[VolumeConfig, ...] = (VolumeConfig("vol0", base / "var/volumes/vol0"),)
    else:
        if not isinstance(volumes_raw, list) or not volumes_raw:
            raise ConfigError("volumes: expected at least one [[volumes]] table")
        volumes = tuple(
            _build(VolumeConfig, f"volumes[{i}]", v, base) for i, v in enumerate(volumes_raw)
        )
    peers_raw = raw.get("peers", {})
    if not isinstance(peers_raw, dict):
        raise ConfigError("peers: expected tables [peers.NAME]")
    peers = tuple(
        _build(PeerConfig, f"peers.{name}", {"name": name, **table}, base) for name, table in peers_raw.items()
    )
    tls = _build(TlsConfig, "tls", raw.get("tls", {}), base)
    # The file keys default to None, so _coerce left them strings: resolve them against the config's folder.
    tls = dataclasses.replace(tls, **{
        key: (base / Path(value).expanduser()) if isinstance(value, str) else value
        for key in ("certificate", "private_key", "ca_certificates", "client_certificate", "client_private_key")
        if (value := getattr(tls, key)) is not None
    })
    commitment = _build(CommitmentConfig, "commitment", raw.get("commitment", {}), base)
    if not commitment.journal_path.is_absolute():
        commitment = dataclasses.replace(commitment, journal_path=base / commitment.journal_path)
    query = _build(QueryConfig, "query", raw.get("query", {}), base)
    tiering = parse_tiering(raw, base, _build, owner=server.ae_title)
    audit = _build(AuditConfig, "audit", raw.get("audit", {}), base)
    if not audit.path.is_absolute():
        audit = dataclasses.replace(audit, path=base / audit.path)
    config = Config(server=server, storage=storage, dicom=dicom, volumes=volumes, peers=peers,
                    source=path, query=query, retrieve=retrieve, commitment=commitment, tls=tls,
                    tiering=tiering.tiering, tiers=tiering.tiers, policies=tiering.policies, audit=audit,
                    volumes_builtin=volumes_raw is None)
    validate(config)
    validate_audit(audit)
    validate_tiering(tiering, tuple(v.name for v in volumes))
    return config


def validate(config: Config) -> None:
    s = config.server
    _check_ae("server.ae_title", s.ae_title)
    for key, port in (("server.port", s.port), ("server.metrics_port", s.metrics_port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a TCP port (0..65535)")
    if s.max_associations < 1:
        raise ConfigError("server.max_associations: must be at least 1")
    if not 4096 <= s.max_pdu <= 16 * 1024 * 1024:
        raise ConfigError(f"server.max_pdu: {s.max_pdu} is outside 4096..16777216")
    if s.workers < 0 or s.workers > 64:
        raise ConfigError("server.workers: 0 (one per CPU) to 64")
    if s.acse_timeout <= 0 or s.idle_timeout <= 0:
        raise ConfigError("server.acse_timeout and server.idle_timeout must be positive")
    for key in ("max_connections_per_worker", "max_associations_per_ae", "max_associations_per_host",
                "max_presentation_contexts"):
        if getattr(s, key) < 1:
            raise ConfigError(f"server.{key}: must be at least 1")
    if s.max_presentation_contexts > 128:
        raise ConfigError("server.max_presentation_contexts: at most 128 (PS3.8: odd context IDs 1..255)")
    if not 1024 <= s.max_associate_rq_bytes <= 16 * 1024 * 1024:
        raise ConfigError(f"server.max_associate_rq_bytes: {s.max_associate_rq_bytes} is outside 1024..16777216")
    if not 1024 <= s.min_peer_pdu <= s.max_pdu:
        raise ConfigError(f"server.min_peer_pdu: {s.min_peer_pdu} is outside 1024..max_pdu ({s.max_pdu})")
    if s.message_timeout <= 0 or s.write_timeout <= 0:
        raise ConfigError("server.message_timeout and server.write_timeout must be positive")
    if s.write_buffer_high < 65536:
        raise ConfigError("server.write_buffer_high: at least 65536 bytes")
    for right in s.unknown_peer_rights:
        if right not in RIGHTS:
            raise ConfigError(f"server.unknown_peer_rights: {right!r} is not one of {', '.join(RIGHTS)}")
    if s.log_level not in LOG_LEVELS:
        raise ConfigError(f"server.log_level: one of {', '.join(LOG_LEVELS)}, got {s.log_level!r}")
    if s.log_format not in LOG_FORMATS:
        raise ConfigError(f"server.log_format: one of {', '.join(LOG_FORMATS)}, got {s.log_format!r}")
    if not 0 < s.drain_timeout_s <= 3600:
        raise ConfigError(f"server.drain_timeout_s: {s.drain_timeout_s} is outside (0, 3600]")
    st = config.storage
    if st.duplicate_policy not in DUPLICATE_POLICIES:
        raise ConfigError(f"storage.duplicate_policy: one of {', '.join(DUPLICATE_POLICIES)}, got {st.duplicate_policy!r}")
    if st.commit_max_batch < 1 or st.commit_max_wait_ms < 0:
        raise ConfigError("storage.commit_max_batch must be >= 1 and storage.commit_max_wait_ms >= 0")
    if st.index_map_size < 1024 * 1024:
        raise ConfigError("storage.index_map_size: at least 1 MiB")
    if not 1 << 20 <= st.segment_bytes_max <= 1 << 40:
        raise ConfigError("storage.segment_bytes_max: 1 MiB to 1 TiB")
    if not 64 << 10 <= st.spool_memory_bytes <= st.spool_memory_total_bytes:
        raise ConfigError("storage.spool_memory_bytes: at least 64 KiB and at most storage.spool_memory_total_bytes")
    if st.max_instance_bytes < 1 << 20:
        raise ConfigError("storage.max_instance_bytes: at least 1 MiB")
    if not 1 <= st.writer_lanes <= 16:
        raise ConfigError("storage.writer_lanes: 1 to 16")
    if st.commit_queue_max < st.commit_max_batch:
        raise ConfigError("storage.commit_queue_max: at least storage.commit_max_batch")
    if not 0.0 < st.compaction_dead_ratio <= 1.0:
        raise ConfigError("storage.compaction_dead_ratio: a fraction in (0, 1]")
    if st.compaction_interval_s < 0 or st.compaction_bytes_per_s < 1 << 20:
        raise ConfigError("storage.compaction_interval_s >= 0 and storage.compaction_bytes_per_s >= 1 MiB/s")
    _validate_retrieve(config.retrieve)
    _validate_commitment(config.commitment)
    q = config.query
    if not 1 <= q.results_max <= 1_000_000:
        raise ConfigError("query.results_max: 1 to 1000000")
    if not 1024 <= q.identifier_bytes_max <= 16 << 20:
        raise ConfigError("query.identifier_bytes_max: 1024 to 16777216")
    if not 16 <= q.batch_rows_max <= 100_000:
        raise ConfigError("query.batch_rows_max: 16 to 100000")
    if q.search_s_max <= 0:
        raise ConfigError("query.search_s_max: must be positive")
    if not 1 <= q.threads_max <= 32:
        raise ConfigError("query.threads_max: 1 to 32")
    names = set()
    for i, vol in enumerate(config.volumes):
        if vol.name in names:
            raise ConfigError(f"volumes[{i}].name: {vol.name!r} is used twice")
        names.add(vol.name)
        if not 0.0 < vol.high_watermark <= 1.0:
            raise ConfigError(f"volumes[{i}].high_watermark: a fraction in (0, 1], got {vol.high_watermark}")
    if not config.dicom.sop_classes:
        raise ConfigError("dicom.sop_classes: empty list accepts nothing")
    if not config.dicom.transfer_syntaxes:
        raise ConfigError("dicom.transfer_syntaxes: empty list accepts nothing")
    for key, uids in (("dicom.sop_classes", config.dicom.sop_classes),
                      ("dicom.transfer_syntaxes", config.dicom.transfer_syntaxes)):
        for uid in uids:
            if not uid or len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid):
                raise ConfigError(f"{key}: {uid!r} is not a UID")
    _validate_tls(config)
    for peer in config.peers:
        _check_ae(f"peers.{peer.name}.ae_title", peer.ae_title)
        if not 1 <= peer.port <= 65535:
            raise ConfigError(f"peers.{peer.name}.port: {peer.port} is not a TCP port")
        if peer.tls and (config.tls.ca_certificates is None
                         or (config.tls.client_certificate or config.tls.certificate) is None
                         or (config.tls.client_private_key or config.tls.private_key) is None):
            raise ConfigError(f"peers.{peer.name}.tls: needs tls.ca_certificates (to verify the peer) and a "
                              "certificate and key to present (tls.client_certificate/client_private_key, or "
                              "tls.certificate/private_key)")
        if peer.allow_overwrite and st.duplicate_policy != "overwrite":
            # Said so rather than ignored: whoever wrote it expects this peer's re-sends to replace.
            raise ConfigError(f"peers.{peer.name}.allow_overwrite: needs storage.duplicate_policy = \"overwrite\"")


def _validate_tls(config: Config) -> None:
    """The static checks; the files themselves (present, readable, private, key matching certificate) are checked
    when the server starts (net/tls.py server_context), since a config may be written before its certificates."""
    t = config.tls
    if not 0 <= t.port <= 65535:
        raise ConfigError(f"tls.port: {t.port} is not a TCP port (0..65535)")
    if t.enabled and t.port and t.port == config.server.port:
        raise ConfigError(f"tls.port: {t.port} is server.port too; TLS needs a port of its own")
    if t.min_version not in TLS_VERSIONS:
        raise ConfigError(f"tls.min_version: \"1.2\" or \"1.3\", got {t.min_version!r} (BCP 195 forbids TLS 1.0 and 1.1)")
    if not t.ciphers.strip():
        raise ConfigError("tls.ciphers: empty (the default is the BCP 195 list)")
    if t.handshake_timeout_s <= 0 or t.handshakes_pending_max < 1:
        raise ConfigError("tls.handshake_timeout_s must be positive and tls.handshakes_pending_max at least 1")
    if not t.enabled:
        return
    for key in ("certificate", "private_key"):
        if getattr(t, key) is None:
            raise ConfigError(f"tls.{key}: required when tls.enabled = true")
    if t.require_client_certificate and t.ca_certificates is None:
        raise ConfigError("tls.ca_certificates: required with require_client_certificate = true (the CAs whose "
                          "client certificates are trusted); or set require_client_certificate = false")
def _validate_retrieve(r: RetrieveConfig) -> None:
    if not 1 <= r.move_associations <= 16:
        raise ConfigError("retrieve.move_associations: 1 to 16")
    if r.move_instances_per_association_min < 1:
        raise ConfigError("retrieve.move_instances_per_association_min: at least 1")
    for key in ("connect_timeout_s", "association_timeout_s", "sub_operation_timeout_s"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"retrieve.{key}: must be positive")
    if r.pending_interval_ms < 10:
        raise ConfigError("retrieve.pending_interval_ms: at least 10")
    if not 1 <= r.concurrent_max <= 1024:
        raise ConfigError("retrieve.concurrent_max: 1 to 1024")
    if not 1 <= r.matches_max <= 10_000_000:
        raise ConfigError("retrieve.matches_max: 1 to 10000000")
    if not 1024 <= r.identifier_bytes_max <= 64 << 20:
        raise ConfigError("retrieve.identifier_bytes_max: 1 KiB to 64 MiB")
    if r.transcode_bytes_max < 0:
        raise ConfigError("retrieve.transcode_bytes_max: at least 0 (0: never convert)")
    if not 1 <= r.read_threads <= 64:
        raise ConfigError("retrieve.read_threads: 1 to 64")
def _validate_commitment(c: CommitmentConfig) -> None:
    if not 1 <= c.references_per_request_max <= 1_000_000:
        raise ConfigError("commitment.references_per_request_max: 1 to 1000000")
    if not 64 << 10 <= c.request_bytes_max <= 1 << 30:
        raise ConfigError("commitment.request_bytes_max: 64 KiB to 1 GiB")
    if not 1 <= c.pending_per_worker_max <= 10_000:
        raise ConfigError("commitment.pending_per_worker_max: 1 to 10000")
    if not 1 <= c.verify_concurrency_max <= 64:
        raise ConfigError("commitment.verify_concurrency_max: 1 to 64")
    if c.report_timeout_s <= 0 or c.connect_timeout_s <= 0 or c.report_retry_wait_s < 0:
        raise ConfigError("commitment.report_timeout_s and connect_timeout_s must be positive, "
                          "report_retry_wait_s >= 0")
    if not 1 <= c.report_attempts_max <= 100:
        raise ConfigError("commitment.report_attempts_max: 1 to 100")
