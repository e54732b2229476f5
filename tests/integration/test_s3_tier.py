"""The S3 tier (tiering/s3.py) against a real SeaweedFS (tests/seaweed.py): both upload paths byte-exact, ranged
reads, the bucket alone enough to list everything, crash and recovery, read-back verification, the owner marker,
credentials, a read-only identity, a store that hangs or is down, and a fault proxy (tests/s3_faults.py) for 503
storms and connections cut mid-upload. No S3 mock anywhere."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config_tiering import TierConfig
from appliance.errors import BlobCorrupt, BlobMissing, ConfigError, TierUnavailable, VolumeError
from appliance.store.backend import Location
from tests.conformance.test_backends import BytesSource, meta_for
from tests.s3_faults import FaultProxy
from tests.seaweed import READER_KEY
from tiering.archive import parse_location
from tiering.s3 import S3Backend, init_tier, open_s3

MiB = 1 << 20
OWNER = "NODE_A"


def s3_tier(seaweed: Any, bucket: str, tmp_path: Path, **extra: Any) -> TierConfig:
    """An s3 tier on the session's SeaweedFS: 5 MiB parts (the API's smallest), 64 KiB frames, fast timeouts."""
    creds = tmp_path / "s3-admin.toml"
    if not creds.exists():
        seaweed.credentials_file(creds)
    table = seaweed.tier("s3t", bucket, "site/node-a", creds, part_bytes=5 * MiB, frame_bytes=64 << 10)
    table.update(owner=OWNER)
    table.update(extra)
    return TierConfig(**table)


@pytest.fixture
def backends() -> Iterator[list[S3Backend]]:
    opened: list[S3Backend] = []
    yield opened
    for backend in opened:
        backend.close()


def opened(backends: list[S3Backend], tier: TierConfig) -> S3Backend:
    backend = open_s3(tier)
    backends.append(backend)
    return backend


def put_archive(backend: S3Backend, blobs: list[bytes], hint: str = "study") -> list[Location]:
    backend.begin_container(hint)
    locations = [backend.put(meta_for(b), BytesSource(b)) for b in blobs]
    backend.sync()
    backend.publish(locations)
    return locations


def archive_keys(seaweed: Any, bucket: str) -> list[str]:
    return seaweed.keys(bucket, "site/node-a/archives/")


@pytest.fixture
def proxy(seaweed: Any) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(seaweed.s3_port).start()
    yield fault_proxy
    fault_proxy.stop()


# ---- write paths, reads, listing ---------------------------------------------------------------------------------


def test_multipart_and_single_put_archives_are_byte_exact(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                         backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, compression_level=0)  # stored raw: the archive > 3 parts
    init_tier(tier)
    backend = opened(backends, tier)
    large = [os.urandom(4 * MiB + 123 * i) for i in range(4)]  # ~16 MiB: four 5 MiB parts
    small = [b"small instance" * 100, b"", os.urandom(70_001)]
    large_locs = put_archive(backend, large, "large study")
    small_locs = put_archive(backend, small, "small study")
    assert seaweed.uploads(s3_bucket) == []
    keys = archive_keys(seaweed, s3_bucket)
    assert len(keys) == 2
    client = seaweed.client()
    etags = {key: client.head_object(Bucket=s3_bucket, Key=key)["ETag"] for key in keys}
    large_key = backend.object_key(backend.container_of(large_locs[0]))
    small_key = backend.object_key(backend.container_of(small_locs[0]))
    assert "-" in etags[large_key] and "-" not in etags[small_key]  # multipart vs one PutObject
    for data, loc in zip(large + small, large_locs + small_locs, strict=True):
        assert backend.read(loc) == data
        assert b"".join(backend.iter_read(loc, 1 << 20)) == data
        assert backend.sha256(loc) == hashlib.sha256(data).hexdigest()
    # Ranged reads, across the 5 MiB part boundaries of the object too.
    for offset, length in [(0, 1), (5 * MiB - 3, 10), (4 * MiB - 1, 2), (123, 64 << 10), (4 * MiB + 300, -1)]:
        want = large[3][offset:] if length < 0 else large[3][offset : offset + length]
        assert backend.read(large_locs[3], offset, length) == want
    with backend.open(large_locs[1], len(large[1])) as fh:
        fh.seek(3 * MiB + 7)
        assert fh.read(1000) == large[1][3 * MiB + 7 : 3 * MiB + 1007]
    # The object is a tar archive stock tools read: members named by digest, the catalog last.
    raw = client.get_object(Bucket=s3_bucket, Key=large_key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
        names = archive.getnames()
    assert names == [hashlib.sha256(d).hexdigest() + ".dcm" for d in large] + ["catalog.json"]
    meta = client.head_object(Bucket=s3_bucket, Key=large_key)["Metadata"]
    assert meta["tier"] == "s3t" and meta["owner"] == OWNER and meta["format"].startswith("appliance-archive")


def test_the_bucket_alone_lists_every_blob_with_its_provenance(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                              backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path)
    init_tier(tier)
    writer = opened(backends, tier)
    blobs = {f"study {s}": [f"{s}/{i}".encode() * (50 + i) for i in range(5)] for s in range(3)}
    expected = {}
    for hint, data in blobs.items():
        for loc, blob in zip(put_archive(writer, data, hint), data, strict=True):
            expected[loc] = meta_for(blob)
    writer.close()
    fresh = opened(backends, tier)  # a new node: nothing in memory, only the bucket
    assert {s.location: s.meta for s in fresh.list()} == expected
    assert fresh.usage()[0].used_bytes == sum(size for _c, size in fresh.archives())
    assert fresh.usage()[0].capacity_bytes == 0 and fresh.usage()[0].accepting


def test_a_small_instance_costs_one_ranged_get(seaweed: Any, s3_bucket: str, tmp_path: Path, proxy: FaultProxy,
                                               backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path)
    init_tier(tier)
    (loc, other) = put_archive(opened(backends, tier), [os.urandom(300_000), b"x" * 1000])
    reader = opened(backends, s3_tier(seaweed, s3_bucket, tmp_path, endpoint=proxy.endpoint))
    proxy.seen.clear()
    assert len(reader.read(loc)) == 300_000
    assert len(proxy.seen) == 1 and proxy.seen[0].startswith("GET /")
    assert reader.stat(other) == meta_for(b"x" * 1000)
    assert len(proxy.seen) == 2  # stat: the header alone
    assert reader.read(other) == b"x" * 1000  # header cached: the frames only
    assert len(proxy.seen) == 3


def test_missing_objects_and_ranges_raise_blob_missing(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                       backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path)
    init_tier(tier)
    backend = opened(backends, tier)
    (loc,) = put_archive(backend, [b"payload" * 10])
    container, record, data, stored, size = parse_location(loc)
    for bogus in (loc.replace(container, "0123456789abcdef-0000000000000000-00000000.tar"),
                  f"{container}:{record + 1 << 20}:{data + 1 << 20}:{stored}:{size}"):
        with pytest.raises(BlobMissing) as caught:
            backend.read(bogus)
        assert not isinstance(caught.value, TierUnavailable)
    backend.remove_container(container)
    backend.remove_container(container)  # harmless when gone
    fresh = opened(backends, tier)
    with pytest.raises(BlobMissing):
        fresh.read(loc)
    assert list(fresh.list()) == []


# ---- crash, recovery, verification -----------------------------------------------------------------------------


def test_an_upload_cut_by_a_crash_is_invisible_and_recover_aborts_it(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                                    backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, compression_level=0)
    init_tier(tier)
    backend = opened(backends, tier)
    backend.begin_container("crashing study")
    backend.put(meta_for(big := os.urandom(11 * MiB)), BytesSource(big))  # two parts went up
    backend.close()  # no sync: what a crash leaves
    assert seaweed.uploads(s3_bucket) != [] and archive_keys(seaweed, s3_bucket) == []
    fresh = opened(backends, tier)
    assert list(fresh.list()) == []
    result = fresh.recover(lambda _c: None)
    assert result.counts["aborted_uploads"] == 1 and result.tail == []
    assert seaweed.uploads(s3_bucket) == [] and list(fresh.list()) == []


CRASHING_WRITER = """
import os, sys
from appliance.config_tiering import TierConfig
from tests.conformance.test_backends import BytesSource, meta_for
from tiering.s3 import open_s3
tier = TierConfig(**eval(sys.argv[1]))
backend = open_s3(tier)
backend.begin_container("killed")
blob = os.urandom(12 << 20)
backend.put(meta_for(blob), BytesSource(blob))
print("put", flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_writer_killed_mid_upload_leaves_only_an_upload_recover_aborts(seaweed: Any, s3_bucket: str,
                                                                         tmp_path: Path,
                                                                         backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, compression_level=0)
    init_tier(tier)
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in tier.__dict__.items() if k != "volumes"}
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, repr(fields)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])
    assert proc.returncode == -9 and "put" in proc.stdout, proc.stderr
    assert seaweed.uploads(s3_bucket) and archive_keys(seaweed, s3_bucket) == []
    fresh = opened(backends, tier)
    assert fresh.recover(lambda _c: None).counts["aborted_uploads"] == 1
    assert seaweed.uploads(s3_bucket) == [] and list(fresh.list()) == []


def test_verify_upload_detects_an_object_that_is_not_what_was_sent(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                                  backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path)
    init_tier(tier)
    backend = opened(backends, tier)
    client = seaweed.client()

    def overwrite(key: str) -> None:  # the store hands back other bytes than it acknowledged
        raw = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        raw[len(raw) // 3] ^= 0xFF
        client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(raw))

    backend.after_complete = overwrite
    backend.begin_container("study")
    backend.put(meta_for(ODD), BytesSource(ODD))
    with pytest.raises(BlobCorrupt, match="another SHA-256"):
        backend.sync()
    assert archive_keys(seaweed, s3_bucket) == []  # deleted: the move is redone by the next run
    backend.after_complete = None
    (loc,) = put_archive(backend, [ODD])
    assert backend.read(loc) == ODD


ODD = bytes((i * 7 + 3) % 251 for i in range(100_003))


# ---- owner, credentials, rights ------------------------------------------------------------------------------


def test_the_owner_marker_guards_writes_and_adopt_takes_a_prefix_over(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                                      backends: list[S3Backend]) -> None:
    unmarked = opened(backends, s3_tier(seaweed, s3_bucket, tmp_path))
    with pytest.raises(VolumeError, match="tier init s3t"):
        unmarked.begin_container("study")
    tier_a = s3_tier(seaweed, s3_bucket, tmp_path)
    assert "initialised" in init_tier(tier_a)
    assert "already initialised" in init_tier(tier_a)
    (loc,) = put_archive(opened(backends, tier_a), [ODD])

    tier_b = s3_tier(seaweed, s3_bucket, tmp_path, owner="NODE_B")
    node_b = opened(backends, tier_b)
    with pytest.raises(VolumeError) as refused:
        node_b.begin_container("study")
    assert "NODE_A" in str(refused.value) and "NODE_B" in str(refused.value) and "--adopt" in str(refused.value)
    with pytest.raises(VolumeError):
        node_b.remove_container(parse_location(loc)[0])
    assert node_b.recover(lambda _c: None).counts["not_owner"] == 1  # not ours to clean
    assert node_b.read(loc) == ODD  # reads need no marker
    with pytest.raises(VolumeError, match="--adopt"):
        init_tier(tier_b)
    assert "adopted from 'NODE_A'" in init_tier(tier_b, adopt=True)
    put_archive(opened(backends, tier_b), [b"written by B"])
    with pytest.raises(VolumeError, match="belongs to 'NODE_B'"):
        opened(backends, tier_a).begin_container("study")


def test_tier_init_creates_a_missing_bucket(seaweed: Any, tmp_path: Path, backends: list[S3Backend]) -> None:
    name = f"created-by-init-{os.getpid()}"
    tier = s3_tier(seaweed, name, tmp_path)
    try:
        assert f"bucket {name} did not exist: created it" in init_tier(tier)
        assert f"bucket {name} exists" in init_tier(tier)
        (loc,) = put_archive(opened(backends, tier), [b"in a new bucket"])
        assert opened(backends, tier).read(loc) == b"in a new bucket"
    finally:
        seaweed.drop_bucket(name)


def test_a_credentials_file_others_can_read_is_refused(seaweed: Any, s3_bucket: str, tmp_path: Path) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path)
    assert tier.credentials_file is not None
    os.chmod(tier.credentials_file, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        init_tier(tier)
    with pytest.raises(ConfigError, match="lets other users read"):
        open_s3(tier)  # refused when the tier is opened (no network I/O yet): tier status names the tier's error
    os.chmod(tier.credentials_file, 0o400)
    open_s3(tier).close()


def test_a_read_only_identity_refuses_writes_and_still_reads(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                             backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path)
    init_tier(tier)
    (loc,) = put_archive(opened(backends, tier), [ODD])
    reader_creds = seaweed.credentials_file(tmp_path / "s3-reader.toml", READER_KEY)
    read_only = opened(backends, s3_tier(seaweed, s3_bucket, tmp_path, credentials_file=reader_creds))
    assert read_only.read(loc) == ODD
    assert [s.location for s in read_only.list()] == [loc]
    read_only.begin_container("study")  # the marker is readable: the refusal comes from the write itself
    read_only.put(meta_for(b"small"), BytesSource(b"small"))
    with pytest.raises(TierUnavailable) as refused:
        read_only.sync()
    assert str(refused.value).startswith("object store s3t refused put_object: AccessDenied")
    read_only.begin_container("large study")
    with pytest.raises(TierUnavailable, match="refused create_multipart_upload"):
        read_only.put(meta_for(big := os.urandom(6 * MiB)), BytesSource(big))
    assert read_only.read(loc) == ODD
    assert archive_keys(seaweed, s3_bucket) == [read_only.object_key(parse_location(loc)[0])]


# ---- a store that hangs or is down -----------------------------------------------------------------------------


def test_a_hanging_store_fails_within_the_timeouts_then_at_once_until_retry(seaweed: Any, s3_bucket: str,
                                                                            tmp_path: Path,
                                                                            backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, connect_timeout_s=1.0, read_timeout_s=1.0, retries_max=2,
                   unreachable_retry_s=3.0)
    init_tier(tier)
    first, second = put_archive(opened(backends, tier), [ODD, b"second"])
    reader = opened(backends, tier)
    seaweed.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(TierUnavailable) as hung:
            reader.read(first)
        timed_out_s = time.monotonic() - t0
        t1 = time.monotonic()
        with pytest.raises(TierUnavailable) as fast:
            reader.read(second)
        fast_fail_s = time.monotonic() - t1
    finally:
        seaweed.resume()
    print(f"hanging store: first read failed after {timed_out_s:.2f} s, the next in {fast_fail_s * 1000:.1f} ms")
    assert str(hung.value).startswith("object store s3t unreachable (read timeout")
    assert len(str(hung.value)) <= 64
    # read_timeout x attempts (retries_max retries after the first) plus the backoff between them (standard mode:
    # a jittered wait of at most 2^retry s: 1 + 2 here)
    assert 1.0 <= timed_out_s < 1.0 * (2 + 1) + 3.0 + 0.5
    assert fast_fail_s < 0.05 and "unreachable" in str(fast.value) and "next try in" in str(fast.value)
    # Once unreachable_retry_s has passed the breaker lets calls through again, and a SeaweedFS just continued may
    # answer its first requests late (its own heartbeats catch up): polled, not slept.
    assert read_when_back(reader, first, 15.0) == ODD and reader.read(second) == b"second"


def read_when_back(backend: S3Backend, location: Location, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return backend.read(location)
        except TierUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_store_that_is_down_fails_fast_and_is_used_again_when_back(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                                     proxy: FaultProxy,
                                                                     backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, endpoint=proxy.endpoint, retries_max=3, unreachable_retry_s=2.0)
    init_tier(tier)
    (loc,) = put_archive(opened(backends, tier), [ODD])
    reader = opened(backends, tier)
    proxy.refuse()
    try:
        t0 = time.monotonic()
        with pytest.raises(TierUnavailable, match="unreachable .connection refused"):
            reader.read(loc)
        refused_s = time.monotonic() - t0
        t1 = time.monotonic()
        with pytest.raises(TierUnavailable, match="next try in"):
            reader.stat(loc)
        fast_s = time.monotonic() - t1
    finally:
        proxy.accept()
    print(f"store down: refused after {refused_s:.2f} s (4 attempts), then failing in {fast_s * 1000:.1f} ms")
    assert refused_s < 1 + 2 + 4 + 0.5 and fast_s < 0.05  # refused at once: only the backoff of 3 retries
    assert read_when_back(reader, loc, 10.0) == ODD  # polled until the breaker's 2 s have passed


# ---- 503 storms and cut uploads (the fault proxy) --------------------------------------------------------------

UPLOAD_PART = r"partNumber="


def test_a_short_503_storm_is_ridden_out_by_retries(seaweed: Any, s3_bucket: str, tmp_path: Path, proxy: FaultProxy,
                                                    backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, endpoint=proxy.endpoint, compression_level=0, retries_max=4)
    init_tier(tier)
    backend = opened(backends, tier)
    blobs = [os.urandom(6 * MiB), os.urandom(5 * MiB)]
    proxy.add("slow_down", 3, method="PUT", path_pattern=UPLOAD_PART)
    proxy.add("slow_down", 2, method="GET")
    locations = put_archive(backend, blobs)  # the read-back verify's GET gets the two 503s
    assert proxy.injected == 5
    assert [backend.read(loc) for loc in locations] == blobs
    assert seaweed.uploads(s3_bucket) == [] and len(archive_keys(seaweed, s3_bucket)) == 1


def test_a_503_storm_longer_than_the_retries_leaves_nothing_half_visible(seaweed: Any, s3_bucket: str,
                                                                         tmp_path: Path, proxy: FaultProxy,
                                                                         backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, endpoint=proxy.endpoint, compression_level=0, retries_max=3)
    init_tier(tier)
    backend = opened(backends, tier)
    proxy.add("slow_down", 1000, method="PUT", path_pattern=UPLOAD_PART)
    proxy.add("slow_down", 1000, method="DELETE")  # the abort of the failed upload fails too: recover's job
    with pytest.raises(TierUnavailable) as storm:
        put_archive(backend, [os.urandom(6 * MiB), os.urandom(6 * MiB)])
    assert str(storm.value).startswith("object store s3t") and "SlowDown" in str(storm.value)
    assert archive_keys(seaweed, s3_bucket) == [] and seaweed.uploads(s3_bucket) != []
    proxy.clear()
    fresh = opened(backends, tier)
    assert fresh.recover(lambda _c: None).counts["aborted_uploads"] == 1
    assert seaweed.uploads(s3_bucket) == [] and list(fresh.list()) == []


def test_a_connection_cut_mid_part_is_retried_and_no_torn_object_is_ever_listed(seaweed: Any, s3_bucket: str,
                                                                                tmp_path: Path, proxy: FaultProxy,
                                                                                backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path, endpoint=proxy.endpoint, compression_level=0, retries_max=3)
    init_tier(tier)
    backend = opened(backends, tier)
    blobs = [os.urandom(7 * MiB), os.urandom(3 * MiB)]
    proxy.add("cut", 2, method="PUT", path_pattern=UPLOAD_PART)
    locations = put_archive(backend, blobs)
    assert proxy.injected == 2
    assert [opened(backends, tier).read(loc) for loc in locations] == blobs
    # Cut every attempt: the upload fails cleanly, and what the bucket lists is only the whole first archive.
    proxy.add("cut", 1000, method="PUT", path_pattern=UPLOAD_PART)
    with pytest.raises(TierUnavailable, match="connection dropped"):
        put_archive(backend, [os.urandom(6 * MiB), os.urandom(6 * MiB)])
    proxy.clear()
    fresh = opened(backends, tier)
    fresh.recover(lambda _c: None)
    assert seaweed.uploads(s3_bucket) == []
    assert sorted(s.location for s in fresh.list()) == sorted(locations)


# ---- the admin's commands ----------------------------------------------------------------------------------------


def test_tier_init_adopt_and_status_from_the_command_line(seaweed: Any, s3_bucket: str, tmp_path: Path) -> None:
    """`appliance tier init` writes the marker, refuses another appliance's prefix without --adopt; `tier status`
    shows the bytes in the bucket and "no quota" (capacity_bytes 0 is not "full")."""
    import json

    from appliance.index.db import StudyIndex
    from tests.integration.test_tier_cli import tier as run_tier
    from tests.tier_rig import make_config

    creds = seaweed.credentials_file(tmp_path / "s3.toml")
    tiers = f"""
[[tiers]]
name = "s3t"
kind = "s3"
endpoint = "{seaweed.endpoint}"
bucket = "{s3_bucket}"
prefix = "site/node"
credentials_file = "{creds}"
connect_timeout_s = 2.0
retries_max = 2
"""
    configs = {}
    for node in ("NODE_A", "NODE_B"):
        root = tmp_path / node
        root.mkdir()
        config = make_config(root, tiers=tiers)
        path = root / "appliance.toml"
        path.write_text(path.read_text().replace("[server]\n", f'[server]\nae_title = "{node}"\n', 1))
        StudyIndex(config.storage.index_path).close()
        configs[node] = path
    assert "initialised (owner 'NODE_A')" in run_tier(configs["NODE_A"], "init", "s3t").stdout
    refused = run_tier(configs["NODE_B"], "init", "s3t", check=False)
    assert refused.returncode == 69 and "belongs to 'NODE_A'" in refused.stderr and "--adopt" in refused.stderr
    adopted = run_tier(configs["NODE_B"], "init", "s3t", "--adopt")
    assert "adopted from 'NODE_A'" in adopted.stdout
    backend = open_s3(TierConfig(**{**seaweed.tier("s3t", s3_bucket, "site/node", creds), "owner": "NODE_B"}))
    try:
        put_archive(backend, [ODD])
        stored = sum(size for _c, size in backend.archives())
    finally:
        backend.close()
    status = json.loads(run_tier(configs["NODE_B"], "status", "--json").stdout)
    (s3,) = [t for t in status["tiers"] if t["name"] == "s3t"]
    assert s3["used_bytes"] == stored and s3["capacity_bytes"] == 0 and s3["fill"] is None and not s3["error"]
    assert s3["volumes"][0]["accepting"] and s3["volumes"][0]["fill"] is None
    human = run_tier(configs["NODE_B"], "status").stdout
    assert "no quota" in human and f"s3://{s3_bucket}/site/node" in human


def test_an_answer_cut_mid_body_is_read_again(seaweed: Any, s3_bucket: str, tmp_path: Path, proxy: FaultProxy,
                                              backends: list[S3Backend]) -> None:
    tier = s3_tier(seaweed, s3_bucket, tmp_path)
    init_tier(tier)
    data = os.urandom(300_000)
    (loc,) = put_archive(opened(backends, tier), [data])
    reader = opened(backends, s3_tier(seaweed, s3_bucket, tmp_path, endpoint=proxy.endpoint, retries_max=2))
    proxy.add("cut_answer", 2, method="GET")
    assert reader.read(loc) == data and proxy.injected == 2
    proxy.add("cut_answer", 100, method="GET")
    with pytest.raises(TierUnavailable, match="connection dropped"):
        opened(backends, reader.tier).read(loc)


def test_tier_run_moves_old_studies_to_s3_and_they_read_back(seaweed: Any, s3_bucket: str, tmp_path: Path) -> None:
    """The mover on an s3 target, end to end: `tier run` copies, verifies and switches; every instance reads back
    byte-exact through BlobStore; the bucket holds one archive per study moved; nothing is left unfinished."""
    import json

    from appliance.index.db import StudyIndex
    from tests.integration.test_tier_cli import tier as run_tier
    from tests.tier_rig import DAY_NS, ingest, make_config, read_everything
    from tiering.tiers import init_tier as init_any_tier

    creds = seaweed.credentials_file(tmp_path / "s3.toml")
    tiers = f"""
[[tiers]]
name = "cloud"
kind = "s3"
endpoint = "{seaweed.endpoint}"
bucket = "{s3_bucket}"
prefix = "site/node"
credentials_file = "{creds}"
part_bytes = 5242880
"""
    policies = """
[[policies]]
name = "old-to-cloud"
from = "online"
to = "cloud"
received_days_min = 30
"""
    config = make_config(tmp_path, tiers=tiers, policies=policies)
    for tier in config.tiers:
        init_any_tier(tier)
    index = StudyIndex(config.storage.index_path)
    try:
        now = time.time_ns()
        data = ingest(config, index, {"1.1": 3, "1.2": 2}, t0=now - 60 * DAY_NS)
        data.update(ingest(config, index, {"1.3": 2}, t0=now))
    finally:
        index.close()
    path = tmp_path / "appliance.toml"
    result = json.loads(run_tier(path, "run", "--json").stdout)
    assert result["moved"] == 2 and result["failed"] == 0, result
    before = read_everything(path)
    assert before[0] == data
    assert len(seaweed.keys(s3_bucket, "site/node/archives/")) == 2 and seaweed.uploads(s3_bucket) == []
    status = json.loads(run_tier(path, "status", "--json").stdout)
    (cloud,) = [t for t in status["tiers"] if t["name"] == "cloud"]
    assert cloud["studies"] == 2 and cloud["instances"] == 5 and cloud["used_bytes"] > 0
    verify = subprocess.run([sys.executable, "-m", "appliance", "verify", "--json", "--tier", "cloud", "-c", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    checked = json.loads(verify.stdout)["tiers"]["cloud"]
    assert checked["checked"] == 5 and checked["missing_count"] == 0 and checked["corrupt_count"] == 0, checked


def test_a_tls_failure_is_unavailable_and_says_what_to_check(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                            backends: list[S3Backend]) -> None:
    """https:// to a port that speaks plain HTTP: the handshake fails, the tier says so (and fails fast after)."""
    tier = s3_tier(seaweed, s3_bucket, tmp_path, endpoint=f"https://127.0.0.1:{seaweed.s3_port}", retries_max=1)
    backend = opened(backends, tier)
    with pytest.raises(TierUnavailable, match="TLS failed") as failed:
        list(backend.list())
    assert "tls_verify / ca_file" in str(failed.value)
    with pytest.raises(TierUnavailable, match="next try in"):
        list(backend.list())


def test_https_is_verified_against_ca_file(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                           backends: list[S3Backend]) -> None:
    """An HTTPS endpoint (the proxy, with a certificate of a private CA): trusted through ca_file, refused without
    it, accepted unverified only with tls_verify = false."""
    import ssl

    from tests.tls_pki import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    tls_proxy = FaultProxy(seaweed.s3_port, tls=context).start()
    try:
        endpoint = f"https://127.0.0.1:{tls_proxy.port}"
        tier = s3_tier(seaweed, s3_bucket, tmp_path, endpoint=endpoint, ca_file=pki.ca)
        init_tier(tier)
        (loc,) = put_archive(opened(backends, tier), [ODD])
        assert opened(backends, tier).read(loc) == ODD
        untrusted = opened(backends, s3_tier(seaweed, s3_bucket, tmp_path, endpoint=endpoint, retries_max=1))
        with pytest.raises(TierUnavailable, match="TLS failed"):
            untrusted.read(loc)
        unverified = opened(backends, s3_tier(seaweed, s3_bucket, tmp_path, endpoint=endpoint, tls_verify=False))
        assert unverified.read(loc) == ODD
    finally:
        tls_proxy.stop()


def test_the_real_store_stopped_then_started_again(seaweed: Any, s3_bucket: str, tmp_path: Path,
                                                   backends: list[S3Backend]) -> None:
    """SeaweedFS itself taken away (stop) and brought back on the same ports and data (start): the read fails
    within the retries' backoff (connections are refused), the next at once, and reads work again after."""
    tier = s3_tier(seaweed, s3_bucket, tmp_path, retries_max=2, unreachable_retry_s=2.0)
    init_tier(tier)
    (loc,) = put_archive(opened(backends, tier), [ODD])
    reader = opened(backends, tier)
    seaweed.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(TierUnavailable, match="unreachable .connection refused") as down:
            reader.read(loc)
        down_s = time.monotonic() - t0
        t1 = time.monotonic()
        with pytest.raises(TierUnavailable, match="next try in"):
            reader.read(loc)
        fast_s = time.monotonic() - t1
    finally:
        seaweed.start()
    print(f"store stopped: read failed after {down_s:.2f} s, the next in {fast_s * 1000:.1f} ms")
    assert str(down.value).startswith("object store s3t unreachable") and len(str(down.value)) <= 64
    assert down_s < tier.connect_timeout_s * (tier.retries_max + 1) + 3.0 and fast_s < 0.05
    assert read_when_back(reader, loc, 30.0) == ODD
    assert [s.location for s in opened(backends, tier).list()] == [loc]
