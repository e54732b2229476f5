"""The commented default configuration that ``appliance init`` writes and docs/configuration.md shows verbatim
(tests/unit/test_docs.py). Kept beside config.py, which validates it, so that file stays about the rules."""

DEFAULT_CONFIG_TOML = """\
# DICOM storage appliance configuration. Every key is optional; the values shown are the defaults.
# Relative paths are relative to this file's folder. Environment variables override [server] and
# [storage] keys: APPLIANCE_SERVER_PORT=11113, APPLIANCE_STORAGE_DUPLICATE_POLICY='"reject"'.

[server]
ae_title = "APPLIANCE"          # our AE title; associations calling another title are rejected
host = "127.0.0.1"              # bind address; "0.0.0.0" (or "::") to take associations from the network
port = 11112                    # DICOM port
max_associations = 64           # concurrent associations (over all workers); more are rejected (transient)
max_pdu = 1048576               # largest P-DATA-TF PDU we receive (bytes); bounds memory per association
max_connections_per_worker = 128  # open connections per worker, associated or not; more are reset at once
max_associations_per_ae = 32    # associations open at once per calling AE title (over all workers)
max_associations_per_host = 32  # associations open at once per source address (over all workers)
max_associate_rq_bytes = 65536  # largest A-ASSOCIATE-RQ accepted; read into a buffer of this size
max_presentation_contexts = 128 # presentation contexts per A-ASSOCIATE-RQ (128 is the most PS3.8 allows)
min_peer_pdu = 4096             # smallest non-zero Maximum Length Received a peer may announce
message_timeout = 600.0         # seconds one DIMSE message (command + dataset) may take to arrive
write_buffer_high = 1048576     # unsent bytes per association above which we stop reading from the peer
write_timeout = 60.0            # seconds a peer may leave that output unread before it is reset
workers = 0                     # processes sharing the port (SO_REUSEPORT); 0 = one per CPU
acse_timeout = 30.0             # seconds a new connection has to request an association (ARTIM)
idle_timeout = 300.0            # seconds of silence after which an association is aborted
refuse_unknown_calling_ae = false  # true: only AE titles listed under [peers] may associate
unknown_peer_rights = ["echo", "store"]  # what an AE title not under [peers] may do (echo store find move get
                                # storage_commitment)
check_peer_host = false         # true: a [peers] AE title is only accepted from that peer's host
metrics_enabled = true          # Prometheus /metrics endpoint, aggregated over the workers
metrics_host = "127.0.0.1"
metrics_port = 9110
log_level = "info"              # debug logs UIDs; patient data is never logged
log_format = "text"             # text | json (one JSON object per line); journald priorities either way
drain_timeout_s = 30.0          # SIGTERM: associations in progress get this long, then A-ABORT

[storage]
index_path = "var/index"        # LMDB index folder
duplicate_policy = "keep-first" # same SOP Instance UID, different bytes: keep-first | reject | overwrite
                                # (overwrite applies only to [peers] with allow_overwrite = true)
commit_max_batch = 256          # group commit: most instances per fsync batch / index transaction
commit_max_wait_ms = 2.0        # group commit: longest wait for more instances to join a batch
index_map_size = 268435456      # initial LMDB map size; it doubles when full
fsync = true                    # never switch off in production: acknowledgements would not be durable
segment_bytes_max = 1073741824  # a worker's active segment is sealed at this size (tar file per segment)
spool_memory_bytes = 4194304    # an instance waits in memory up to this size; larger ones spill to <volume>/tmp
spool_memory_total_bytes = 268435456  # memory all of one worker's waiting instances may hold
commit_queue_max = 1024         # instances waiting for the group commit per worker; more get 0xA700
writer_lanes = 1                # writer threads per worker, each with its own segment: more flushes in flight
max_instance_bytes = 8589934592 # largest dataset accepted; a larger one is refused (0xA700) as it arrives
compaction_dead_ratio = 0.5     # rewrite a sealed segment once this share of it is dead (overwritten/duplicate)
compaction_interval_s = 3600.0  # how often the server compacts (0 = only `appliance compact`)
compaction_bytes_per_s = 67108864  # compaction's copy rate limit

[dicom]
# sop_classes = ["all"]         # "all" = Verification, Query/Retrieve, Storage Commitment and every storage
                                # SOP class; "storage" = Verification + storage only; or a list of UIDs
# transfer_syntaxes = [...]     # default: uncompressed + every common compressed syntax, stored as received

# DICOM over TLS on a second port (docs/security.md); the plain port stays open beside it.
# Environment variables override these keys too: APPLIANCE_TLS_ENABLED=true.
[tls]
enabled = false                 # true: also listen on port, with the certificate and key below
port = 2762                     # DICOM's registered TLS port; 0 = a free port (written to serve's --port-file)
# certificate = "tls/server.crt"  # PEM: our certificate, then any intermediate CA certificates
# private_key = "tls/server.key"  # PEM, not encrypted; mode 0600 (0640 warns, readable by others refuses)
# ca_certificates = "tls/ca.crt"  # PEM bundle: the CAs whose client certificates are trusted
# client_certificate = "tls/client.crt"  # presented to [peers] with tls = true (default: certificate)
# client_private_key = "tls/client.key"  # its key (default: private_key)
require_client_certificate = true  # the handshake fails without a client certificate signed by those CAs
min_version = "1.2"             # "1.2" or "1.3"
# ciphers = "..."               # TLS 1.2 suites, OpenSSL syntax; default: BCP 195 (ECDHE with AES-GCM or
                                # ChaCha20-Poly1305 only; docs/security.md); every TLS 1.3 suite is allowed
handshake_timeout_s = 10.0      # a handshake not done by then is dropped
handshakes_pending_max = 64     # handshakes in progress per worker; more connections are reset at once
[retrieve]
move_associations = 2           # associations one C-MOVE opens to its destination at once ...
move_instances_per_association_min = 50  # ... one more only per this many instances
connect_timeout_s = 10.0        # C-MOVE: seconds to connect to the destination ...
association_timeout_s = 30.0    # ... and then to get its A-ASSOCIATE-AC
sub_operation_timeout_s = 300.0 # seconds one C-STORE sub-operation may take (sending + response)
pending_interval_ms = 500.0     # at most one Pending C-MOVE/C-GET response per interval
matches_max = 100000            # instances one C-MOVE/C-GET may select; more: 0xA701
concurrent_max = 8              # C-MOVE/C-GET served at once per worker; more: 0xA702
identifier_bytes_max = 1048576  # largest C-MOVE/C-GET identifier; larger: 0xC000
transcode_bytes_max = 268435456 # largest instance converted (decompressed) in memory for a destination
read_threads = 4                # threads per worker reading (and converting) instances for retrieves
[query]
results_max = 10000             # C-FIND matches per query; beyond, the query ends with 0xA700 (narrow it)
identifier_bytes_max = 65536    # largest C-FIND identifier accepted; larger ones get 0xC000
batch_rows_max = 512            # index rows a C-FIND examines per read transaction (in a worker thread)
search_s_max = 60.0             # longest a C-FIND may search; then it ends with 0xA700
threads_max = 2                 # threads per worker running C-FIND searches (queries queue for them)
case_sensitive_person_names = false  # false: DOE*, doe* and Doe* match alike
combined_date_time_matching = false  # true: StudyDate + StudyTime ranges match as one date-time range

# Volumes: RAID arrays / iSCSI LUNs mounted somewhere. New instances go to the volume with most free space
# below its high watermark. A volume folder that exists without its marker file (a mount point whose
# filesystem is not mounted) is never written into: run `appliance volume init PATH` on a new volume.
[[volumes]]
name = "vol0"
path = "var/volumes/vol0"
high_watermark = 0.95

# Known peers (like Orthanc's DicomModalities): their rights, and where C-MOVE and Storage Commitment reports go.
# [peers.ct1]
# ae_title = "CT1"
# host = "10.0.0.21"
# port = 104
# allow_echo = true
# allow_store = true
# allow_find = true
# allow_move = true
# allow_get = true
# allow_storage_commitment = true
# allow_receive = true          # may be a C-MOVE destination / get Storage Commitment reports on a new association
# tls = false                   # true: our associations to this peer use DICOM TLS ([tls] certificates; port = its
                                # TLS port)
# allow_overwrite = false       # true: this peer may replace stored instances (duplicate_policy = "overwrite")

[commitment]
# Storage Commitment Push Model SCP (docs/storage-commitment.md).
references_per_request_max = 10000  # SOP instances per N-ACTION; more are refused (0x0213)
request_bytes_max = 16777216    # largest N-ACTION dataset; a larger one is refused (0x0213)
pending_per_worker_max = 64     # requests verifying or reporting at once per worker; more get 0x0213
verify_concurrency_max = 2      # instances re-hashed at once per worker
report_timeout_s = 30.0         # wait for the N-EVENT-REPORT-RSP
connect_timeout_s = 10.0        # connect + associate, when the report goes on a new association
report_attempts_max = 3         # new associations tried per report
report_retry_wait_s = 10.0      # wait between two of them
journal_path = "var/commitments"  # requests answered and not yet reported, taken up again after a restart

# Tiering (docs/tiering.md): slower, cheaper tiers below the volumes, and policies that move whole studies there.
# [tiering]
# schedule_s = 0                # the server runs the policies every this many seconds (0: only `appliance tier run`)
# rate_bytes_per_s = 104857600  # migration read+write budget, so that ingest keeps its rate (`tier run --rate`)
# run_studies_max = 10000       # studies one run moves at most; the rest waits for the next run
# retention_studies_max = 1000  # a run whose retention rules would delete more studies deletes none and fails
#                               # (a clock far ahead, a mistyped age); raise it for a first run on an old archive
# study_instances_max = 100000  # a larger study is refused by the mover (reported, never half-moved)
# recall_wait_s = 60.0          # a C-MOVE/C-GET of a study on tape waits this long for its recall
# recall_queue_max = 10000      # studies queued for recall at once; more are refused
# recall_batch_max = 64         # studies recalled per tape pass
# access_flush_s = 30.0         # last-access times are written to the index this often
# audit_log = "var/log/tiering-audit.jsonl"  # one JSON line per move, recall and scrub finding
# scrub_bytes_per_s = 52428800  # `appliance verify` read budget per tier
#
# [[tiers]]                     # per-study compressed archives on a NAS or a big RAID 6
# name = "nearline"
# kind = "nearline"
# volumes = [{name = "nas0", path = "/mnt/nas0", high_watermark = 0.95}]
# compression_level = 3
#
# [[tiers]]                     # an S3 object store (SeaweedFS, Ceph RGW, MinIO, a cloud bucket): the same
# name = "cloud"                # archives as objects; several appliances share one store, one prefix each
# kind = "s3"
# endpoint = "https://s3.example.org:8333"
# bucket = "dicom-archive"
# prefix = "site-a/node-1"
# credentials_file = "/etc/appliance/s3-credentials.toml"  # mode 0600; else AWS_ACCESS_KEY_ID/... from the env
#
# [[tiers]]                     # LTO tape: large tar archives on cartridges (virtual | ltfs | st)
# name = "tape"
# kind = "tape"
# mode = "virtual"
# path = "/srv/tape-library"
#
# [[policies]]                  # applied in this order; a study moves once per run, only to a slower tier
# name = "old-to-nearline"
# from = "online"
# to = "nearline"
# received_days_min = 30        # days since the study's last instance was received
# accessed_days_min = 14        # days since it was last retrieved or exported (or received, if later)
#
# [[policies]]                  # watermark rule: above 85% full, least recently accessed first until under 70%
# name = "online-full"
# from = "online"
# to = "nearline"
# high_watermark = 0.85
# low_watermark = 0.70
#
# [[policies]]
# name = "cold-to-tape"
# from = "nearline"
# to = "tape"
# accessed_days_min = 365
# modalities = ["CT", "MR"]     # also: calling_aes = ["CT1"], study_bytes_min, study_bytes_max (bytes)
#
# [[policies]]                  # retention: expired studies are deleted (never one under `appliance hold`)
# name = "expire-10y"
# to = "delete"                 # without `from`: on every tier
# received_days_min = 3650

[audit]                         # one JSON line per association and per study stored/queried/retrieved/moved/deleted
destination = "file"            # file | journald | off
path = "var/audit/audit.jsonl"  # destination = "file": rotated at file_bytes_max, files_max kept
file_bytes_max = 67108864
files_max = 10
"""


# The relative data paths of DEFAULT_CONFIG_TOML and where each goes under `appliance init --data-dir DIR`.
DATA_PATHS = (
    ('index_path = "var/index"', 'index_path = {index}'),
    ('path = "var/volumes/vol0"', 'path = {volume}'),
    ('journal_path = "var/commitments"', 'journal_path = {commitments}'),
    ('path = "var/audit/audit.jsonl"', 'path = {audit}'),
    # [tiering] is commented out in the template; its audit log is the one data path it holds, so it is written
    # out (the rest of [tiering] keeps its defaults), else it would land next to the config.
    ('# [tiering]\n', '[tiering]\n'),
    ('# audit_log = "var/log/tiering-audit.jsonl"', 'audit_log = {tiering_audit}'),
)


def config_for_data_dir(data_dir: str) -> str:
    """DEFAULT_CONFIG_TOML with every data path absolute under ``data_dir`` (the layout of systemd/tmpfiles.d)."""
    import json

    def quoted(path: str) -> str:
        return json.dumps(path)  # a JSON string is a TOML basic string for any path

    values = {"index": quoted(f"{data_dir}/index"), "volume": quoted(f"{data_dir}/volumes/vol0"),
              "commitments": quoted(f"{data_dir}/commitments"), "audit": quoted(f"{data_dir}/audit/audit.jsonl"),
              "tiering_audit": quoted(f"{data_dir}/audit/tiering-audit.jsonl")}
    text = DEFAULT_CONFIG_TOML
    for old, new in DATA_PATHS:
        # Exactly once each: a template edit that moves one fails the tests instead of leaving a relative path.
        assert text.count(old) == 1, old
        text = text.replace(old, new.format(**values))
    return text
