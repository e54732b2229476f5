"""The console (ls/show/export/status/verify/index rebuild, exit codes) and the /metrics endpoint, against a
real server fed by pynetdicom; and the memory bound of one worker receiving one very large instance."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode

from appliance.index.db import StudyIndex
from appliance.index.records import part10_dataset_offset
from appliance.index.schema import Copy
from appliance.store.segments import parse_location
from tests.conftest import APPLIANCE, ServerHandle, dataset_bytes, wait_for, write_config

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
MakeServer = Callable[..., ServerHandle]


# ---- feeding the server -----------------------------------------------------------------------------


def make_instance(template: Path, patient: str, study: str, series: str, *, accession: str = "", date: str = "",
                  number: int = 1) -> Dataset:
    ds = pydicom.dcmread(template)
    ds.PatientID = patient
    ds.PatientName = f"Name^{patient}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    ds.StudyDate = date
    ds.InstanceNumber = number
    return ds


def send(port: int, datasets: list[Dataset], calling_ae: str = "CLITEST") -> list[int]:
    """One association; every dataset on an Explicit VR Little Endian context of its SOP class."""
    ae = AE(ae_title=calling_ae)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@dataclass
class Archive:
    """Two patients, three studies, four series, nine instances."""

    server: ServerHandle
    uids: dict[str, str] = field(default_factory=dict)  # S1..S3 studies, R1..R4 series
    instances: dict[str, list[Dataset]] = field(default_factory=dict)  # series label -> datasets

    def sops(self, *series: str) -> set[str]:
        return {str(ds.SOPInstanceUID) for label in series for ds in self.instances[label]}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("archive")
    server = ServerHandle(root, write_config(root)).start()
    data = Archive(server)
    data.uids = {label: generate_uid() for label in ("S1", "S2", "S3", "R1", "R2", "R3", "R4")}
    u = data.uids
    layout = [  # series label, template, patient, study, accession, date, count
        ("R1", CT, "P1", "S1", "ACC1", "20200115", 3),
        ("R2", MR, "P1", "S1", "ACC1", "20200115", 2),
        ("R3", MR, "P1", "S2", "ACC2", "20210610", 2),
        ("R4", CT, "P2", "S3", "ACC3", "20200301", 2),
    ]
    for series, template, patient, study, accession, date, count in layout:
        data.instances[series] = [make_instance(template, patient, u[study], u[series], accession=accession,
                                                date=date, number=i + 1) for i in range(count)]
    try:
        everything = [ds for datasets in data.instances.values() for ds in datasets]
        assert send(server.port, everything) == [0] * 9, server.log()
        yield data
    finally:
        server.stop()


def ls(archive: Archive, level: str, *args: str) -> list[dict]:
    """`appliance ls LEVEL ARGS --json`, run in-process (the filter matrix would cost a second per call in
    subprocesses; the other commands run as real processes)."""
    from typer.testing import CliRunner

    from appliance.cli import app

    result = CliRunner().invoke(app, ["ls", level, *args, "--json", "-c", str(archive.server.config_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


# ---- ls ---------------------------------------------------------------------------------------------


def test_ls_patients(archive: Archive) -> None:
    rows = {r["PatientID"]: r for r in ls(archive, "patients")}
    assert set(rows) == {"P1", "P2"}
    assert (rows["P1"]["NumberOfStudies"], rows["P1"]["NumberOfInstances"]) == (2, 7)
    assert (rows["P2"]["NumberOfStudies"], rows["P2"]["NumberOfInstances"]) == (1, 2)
    assert rows["P1"]["PatientName"] == "Name^P1"
    assert not any(k.startswith("_") for r in rows.values() for k in r)  # internals stay internal
    assert [r["PatientID"] for r in ls(archive, "patients", "--patient-id", "P2")] == ["P2"]
    assert ls(archive, "patients", "--patient-id", "P") == []


def test_ls_studies_with_filters(archive: Archive) -> None:
    u = archive.uids

    def studies(*args: str) -> set[str]:
        return {r["StudyInstanceUID"] for r in ls(archive, "studies", *args)}

    rows = {r["StudyInstanceUID"]: r for r in ls(archive, "studies")}
    assert set(rows) == {u["S1"], u["S2"], u["S3"]}
    s1 = rows[u["S1"]]
    assert (s1["NumberOfSeries"], s1["NumberOfInstances"], s1["ModalitiesInStudy"]) == (2, 5, ["CT", "MR"])
    assert (s1["PatientID"], s1["AccessionNumber"], s1["StudyDate"]) == ("P1", "ACC1", "20200115")
    assert studies("--patient-id", "P1") == {u["S1"], u["S2"]}
    assert studies("--patient-id", "P2") == {u["S3"]}
    assert studies("--accession", "ACC3") == {u["S3"]}
    assert studies("--accession", "ACC") == set()
    assert studies("--date", "20200101-20201231") == {u["S1"], u["S3"]}
    assert studies("--date", "20210610") == {u["S2"]}
    assert studies("--date", "20200116-20200229") == set()
    assert studies("--modality", "MR") == {u["S1"], u["S2"]}
    assert studies("--modality", "CT") == {u["S1"], u["S3"]}
    assert studies("--patient-id", "P1", "--modality", "CT") == {u["S1"]}
    assert studies("--study", u["S2"]) == {u["S2"]}
    assert len(ls(archive, "studies", "--limit", "2")) == 2


def test_ls_series_with_filters(archive: Archive) -> None:
    u = archive.uids

    def series(*args: str) -> set[str]:
        return {r["SeriesInstanceUID"] for r in ls(archive, "series", *args)}

    rows = ls(archive, "series", "--study", u["S1"])
    assert {r["SeriesInstanceUID"] for r in rows} == {u["R1"], u["R2"]}
    assert {r["StudyInstanceUID"] for r in rows} == {u["S1"]}
    by_uid = {r["SeriesInstanceUID"]: r for r in rows}
    assert (by_uid[u["R1"]]["Modality"], by_uid[u["R1"]]["NumberOfInstances"]) == ("CT", 3)
    assert series("--study", u["S1"], "--modality", "MR") == {u["R2"]}
    assert series("--modality", "CT") == {u["R1"], u["R4"]}
    assert series("--patient-id", "P2") == {u["R4"]}
    assert series("--accession", "ACC2") == {u["R3"]}
    assert series("--date", "20200101-20201231") == {u["R1"], u["R2"], u["R4"]}
    assert series() == {u["R1"], u["R2"], u["R3"], u["R4"]}


def test_ls_instances_with_filters(archive: Archive) -> None:
    u = archive.uids

    def instances(*args: str) -> set[str]:
        return {r["SOPInstanceUID"] for r in ls(archive, "instances", *args)}

    assert instances("--series", u["R1"]) == archive.sops("R1")
    assert instances("--study", u["S1"]) == archive.sops("R1", "R2")
    assert instances("--patient-id", "P1") == archive.sops("R1", "R2", "R3")
    assert instances("--date", "20200301") == archive.sops("R4")
    assert instances("--accession", "ACC2") == archive.sops("R3")
    assert instances() == archive.sops("R1", "R2", "R3", "R4")
    assert instances("--study", "1.2.3.4.5.6.7.8.9") == set()
    row = ls(archive, "instances", "--series", u["R2"])[0]
    assert row["TransferSyntaxUID"] == ExplicitVRLittleEndian and row["InstanceAvailability"] == "ONLINE"
    assert row["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.4" and row["calling_ae"] == "CLITEST"


def test_ls_human_output(archive: Archive) -> None:
    lines = archive.server.cli("ls", "studies").stdout.splitlines()
    assert lines[0].split()[:3] == ["StudyInstanceUID", "PatientID", "StudyDate"]
    assert len(lines) == 4
    s1 = next(line for line in lines if archive.uids["S1"] in line)
    assert "CT\\MR" in s1 and "ACC1" in s1


# ---- show / export ----------------------------------------------------------------------------------


def test_show_study_series_instance(archive: Archive) -> None:
    u = archive.uids
    study = archive.server.cli_json("show", u["S1"])
    assert study["level"] == "studies" and study["uid"] == u["S1"]
    assert (study["NumberOfSeries"], study["NumberOfInstances"], study["ModalitiesInStudy"]) == (2, 5, ["CT", "MR"])
    series = archive.server.cli_json("show", u["R3"])
    assert (series["level"], series["Modality"], series["NumberOfInstances"]) == ("series", "MR", 2)
    ds = archive.instances["R4"][1]
    inst = archive.server.cli_json("show", ds.SOPInstanceUID)
    assert inst["level"] == "instances"
    assert inst["SOPClassUID"] == ds.SOPClassUID and inst["InstanceNumber"] == "2"
    assert inst["TransferSyntaxUID"] == ExplicitVRLittleEndian and len(inst["digest"]) == 64
    human = archive.server.cli("show", u["S2"]).stdout
    assert f"StudyInstanceUID: {u['S2']}" in human and "level: studies" in human


def test_export_whole_study(archive: Archive, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = archive.server.cli_json("export", archive.uids["S1"], str(out))
    expected = {str(ds.SOPInstanceUID): ds for label in ("R1", "R2") for ds in archive.instances[label]}
    assert sorted(result["exported"]) == sorted(str(out / f"{uid}.dcm") for uid in expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{uid}.dcm" for uid in expected)
    digests = {r["SOPInstanceUID"]: r["digest"] for r in ls(archive, "instances", "--study", archive.uids["S1"])}
    for uid, ds in expected.items():
        path = out / f"{uid}.dcm"
        # Exactly the bytes pynetdicom put on the wire for this dataset.
        assert dataset_bytes(path) == encode(ds, False, True)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digests[uid]
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID == uid


# ---- exit codes -------------------------------------------------------------------------------------


def test_exit_codes(archive: Archive, tmp_path: Path) -> None:
    server = archive.server
    unknown = "1.2.826.0.1.3680043.8.498.999999"
    for args in (("show", unknown), ("export", unknown, str(tmp_path / "x"))):
        result = server.cli(*args, check=False)
        assert result.returncode == 3, result
        assert unknown in result.stderr and "not in the index" in result.stderr
    assert not (tmp_path / "x").exists()
    bad_level = server.cli("ls", "stuff", check=False)
    assert bad_level.returncode == 2 and "level must be one of" in bad_level.stderr
    missing_arg = server.cli("show", check=False)
    assert missing_arg.returncode == 2


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPLIANCE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_bad_config_exits_78(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[server]\nport = 'eleven'\n")
    for command in (["status"], ["ls", "studies"], ["serve"], ["verify"]):
        result = run_cli(tmp_path, *command, "-c", "bad.toml")
        assert result.returncode == 78, (command, result)
        assert "server.port" in result.stderr
    (tmp_path / "typo.toml").write_text("[storage]\nduplicate_policy = 'latest'\n")
    result = run_cli(tmp_path, "status", "-c", "typo.toml")
    assert result.returncode == 78 and "storage.duplicate_policy" in result.stderr
    # A config named by the environment is used too.
    result = subprocess.run([*APPLIANCE, "status"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "APPLIANCE_CONFIG": str(tmp_path / "bad.toml")})
    assert result.returncode == 78


def test_no_index_yet_is_not_found(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli(tmp_path, "ls", "studies", "-c", str(config))
    assert result.returncode == 3 and "no index" in result.stderr


def test_detached_volume_refuses_to_serve(tmp_path: Path) -> None:
    mount_point = tmp_path / "mnt/raid1"
    mount_point.mkdir(parents=True)  # exists, but no marker: an unmounted filesystem's mount point
    config = write_config(tmp_path, volumes=[{"name": "raid1", "path": str(mount_point)}])
    result = run_cli(tmp_path, "serve", "-c", str(config))
    assert result.returncode == 66, result  # EXIT_VOLUME_REFUSED: systemd does not restart it
    assert "volume init" in result.stderr and "raid1" in result.stderr
    assert list(mount_point.iterdir()) == []  # nothing written into the bare mount point
    status = run_cli(tmp_path, "status", "--json", "-c", str(config))
    assert status.returncode == 69
    (volume,) = json.loads(status.stdout)["volumes"]
    assert (volume["name"], volume["attached"], volume["accepting"]) == ("raid1", False, False)
    # After `volume init` it serves.
    init = run_cli(tmp_path, "volume", "init", str(mount_point), "--name", "raid1")
    assert init.returncode == 0, init.stderr
    handle = ServerHandle(tmp_path, config).start()
    try:
        assert handle.cli_json("status")["volumes"][0]["accepting"] is True
    finally:
        handle.stop()


def test_status_json(archive: Archive) -> None:
    status = archive.server.cli_json("status")
    assert status["ae_title"] == "APPLIANCE"
    assert status["port"] == 0  # as configured (the test config asks for a free port)
    assert status["counts"] == {"patients": 2, "studies": 3, "series": 4, "instances": 9}
    assert Path(status["index_path"]) == archive.server.root / "var/index"
    (volume,) = status["volumes"]
    assert volume["name"] == "vol0" and Path(volume["path"]) == archive.server.volume
    assert volume["attached"] is True and volume["accepting"] is True
    assert volume["high_watermark"] == 0.95
    assert volume["size_bytes"] >= volume["free_bytes"] > 0
    assert 0.0 <= volume["fill"] < 1.0


# ---- verify and rebuild -----------------------------------------------------------------------------


def named_copies(server: ServerHandle) -> list[tuple[str, Copy]]:
    """(digest, copy) of every blob the index names, in record order."""
    index = StudyIndex(server.root / "var/index")
    try:
        copies = [(d, c) for d, blob in index.blobs() for c in blob.copies]
    finally:
        index.close()
    return sorted(copies, key=lambda dc: (dc[1].container, parse_location(dc[1].location)[1]))


def test_verify_detects_corrupt_missing_and_orphaned_blobs(make_server: MakeServer) -> None:
    server = make_server()
    study, series = generate_uid(), generate_uid()
    datasets = [make_instance(CT, "PV", study, series, number=i) for i in range(4)]
    assert send(server.port, datasets) == [0] * 4
    clean = server.cli_json("verify")
    assert clean.pop("tiers")["online"]["checked"] == 4  # per tier since tiering (issue 10); the totals as before
    assert clean == {"checked": 4, "missing": [], "corrupt": [], "orphans": [], "dead_bytes": 0, "ok": True}

    copies = named_copies(server)
    assert len(copies) == 4 and len({c.container for _d, c in copies}) == 1  # one association: one segment
    segment = server.volume / "segments" / copies[0][1].container
    original = segment.read_bytes()
    (corrupt_digest, corrupt), (missing_digest, missing) = copies[0], copies[-1]
    _seg, _record, data, size = parse_location(corrupt.location)
    raw = bytearray(original)
    raw[data + size // 2] ^= 0x01  # one bit, in the middle of the first record's pixel data
    _seg, record, _data, _size = parse_location(missing.location)
    segment.write_bytes(raw[:record])  # the last record is gone (a torn copy of the file, say)
    orphan = server.volume / "segments" / "0000000000000001-deadbeef.tar"
    orphan.write_bytes(original)
    result = server.cli("verify", "--json", check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["checked"] == 4 and report["ok"] is False
    assert report["corrupt"] == [f"vol0/{corrupt.container} {corrupt_digest}"]
    assert report["missing"] == [f"vol0/{missing.container} {missing_digest}"]
    assert report["orphans"] == [f"vol0/{orphan.name}: not in the index"]
    human = server.cli("verify", check=False)
    assert human.returncode == 1 and f"CORRUPT vol0/{corrupt.container} {corrupt_digest}" in human.stdout

    segment.write_bytes(original)
    orphan.unlink()
    assert server.cli_json("verify")["ok"] is True


def live_dump(index_path: Path) -> dict:
    index = StudyIndex(index_path, readonly=True)
    try:
        return index.dump()
    finally:
        index.close()


def test_index_rebuild_reproduces_the_live_index(make_server: MakeServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # AE_THREE replaces an instance: overwrite, granted per peer since keep-first is the default.
    server = make_server(storage={"duplicate_policy": "overwrite"},
                         peers={"three": {"ae_title": "AE_THREE", "allow_overwrite": True}})
    study_a, study_b = generate_uid(), generate_uid()
    first = [make_instance(CT, "PR1", study_a, generate_uid(), accession="RB1", date="20220101", number=i)
             for i in range(3)]
    second = [make_instance(MR, "PR2", study_b, generate_uid(), accession="RB2", date="20220202", number=i)
              for i in range(3)]
    assert send(server.port, first, "AE_ONE") == [0] * 3
    assert send(server.port, second, "AE_TWO") == [0] * 3
    # An identical re-send, a replacement with other content, and one instance without a PatientID (deflated,
    # sent as its raw file bytes).
    changed = first[1].copy()
    changed.StudyDescription = "corrected"
    assert send(server.port, [first[0], changed], "AE_THREE") == [0, 0]
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    deflated = Path(get_testdata_file("image_dfl.dcm"))  # type: ignore[arg-type]
    ae = AE(ae_title="AE_FOUR")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", ["1.2.840.10008.1.2.1.99"])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert assoc.is_established
    assert assoc.send_c_store(deflated).Status == 0, server.log()
    assoc.release()

    index_path = server.root / "var/index"
    live = live_dump(index_path)
    assert len(live["instances"]) == 7 and live["gc"] == []
    assert {rec["calling_ae"] for _k, rec in live["instances"]} == {"AE_ONE", "AE_TWO", "AE_THREE", "AE_FOUR"}

    # --into works beside the running server.
    into = tmp_path / "rebuilt"
    stats = server.cli_json("index", "rebuild", "--into", str(into))
    # 9 records: the identical re-send and the replaced first version are dead records, replayed and dropped.
    assert (stats["blobs"], stats["instances"], stats["unreadable"]) == (9, 7, [])
    assert live_dump(into) == live

    # Replace mode refuses to swap the index under the running server...
    refused = server.cli("index", "rebuild", check=False)
    assert refused.returncode == 69 and "stop it first" in refused.stderr
    assert live_dump(index_path) == live
    # ...and works with the server stopped; the old index is kept beside it.
    assert server.stop() == 0
    stats = server.cli_json("index", "rebuild", "--rehash")
    assert (stats["blobs"], stats["instances"], stats["unreadable"]) == (9, 7, [])
    assert live_dump(index_path) == live
    assert (index_path.parent / "index.old" / "data.mdb").is_file()
    server.start()
    assert server.cli_json("status")["counts"]["instances"] == 7
    assert server.cli("verify").returncode == 0


# ---- /metrics ---------------------------------------------------------------------------------------


def scrape(server: ServerHandle) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(value for have, value in samples.get(name, []) if all(have.get(k) == v for k, v in labels.items()))


def test_metrics_with_two_workers(make_server: MakeServer) -> None:
    # Two of the calling AE titles are configured peers: only they become calling_ae labels, the rest "unknown".
    server = make_server(server={"workers": 2}, peers={"one": {"ae_title": "METRICS1", "port": 1},
                                                       "bad": {"ae_title": "METRICS_BAD", "port": 1}})
    assert len(server.worker_pids()) == 2
    study = generate_uid()
    associations, per_association = 4, 5
    batches = [[make_instance(CT if k % 2 else MR, "PM", study, generate_uid(), number=i)
                for i in range(per_association)] for k in range(associations)]
    with ThreadPoolExecutor(associations) as pool:
        statuses = list(pool.map(lambda kb: send(server.port, kb[1], f"METRICS{kb[0]}"), enumerate(batches)))
    assert statuses == [[0] * per_association] * associations
    n = associations * per_association
    sent_bytes = sum(len(encode(ds, False, True) or b"") for batch in batches for ds in batch)

    # One refused instance (no Series Instance UID: 0xC001), on its own association.
    bad = make_instance(CT, "PM", study, generate_uid())
    del bad.SeriesInstanceUID
    assert send(server.port, [bad], "METRICS_BAD") == [0xC001]
    # One rejected association (wrong called AE title).
    ae = AE(ae_title="METRICS_RJ")
    ae.add_requested_context("1.2.840.10008.1.1")
    assert not ae.associate("127.0.0.1", server.port, ae_title="SOMEONE_ELSE").is_established

    # Per-instance series are written by each worker every 0.5 s (appliance/metrics.py): poll until every one
    # of them adds up; a count that never arrives still fails, after the timeout.
    def settled() -> dict | None:
        samples = scrape(server)
        counts = [total(samples, "appliance_store_stage_seconds_count", stage=s)
                  for s in ("receive", "fsync", "queue", "index", "total")]
        counts += [total(samples, "appliance_instances_stored_total"),
                   total(samples, "appliance_commit_batch_size_sum")]
        return samples if counts == [n] * 7 and total(samples, "appliance_store_failures_total") >= 1 else None

    samples = wait_for(settled, 30, interval=0.1, what="metrics to add up")
    assert total(samples, "appliance_instances_stored_total") == n
    assert total(samples, "appliance_instances_stored_total", calling_ae="METRICS1") == per_association
    assert total(samples, "appliance_instances_stored_total", calling_ae="unknown") == n - per_association
    assert total(samples, "appliance_stored_bytes_total", calling_ae="unknown") > 0
    assert {labels["calling_ae"] for name in ("appliance_instances_stored_total", "appliance_associations_total")
            for labels, _ in samples[name]} == {"METRICS1", "METRICS_BAD", "unknown"}
    assert total(samples, "appliance_instances_stored_total", sop_class="CTImageStorage") == n // 2
    assert total(samples, "appliance_stored_bytes_total") == sent_bytes > 0
    for stage in ("receive", "fsync", "index", "total"):
        assert total(samples, "appliance_store_stage_seconds_count", stage=stage) == n, stage
        assert total(samples, "appliance_store_stage_seconds_bucket", stage=stage, le="+Inf") == n, stage
        assert total(samples, "appliance_store_stage_seconds_sum", stage=stage) > 0, stage
    assert total(samples, "appliance_commit_batch_size_sum") == n
    assert total(samples, "appliance_associations_total", result="accepted") == associations + 1
    assert total(samples, "appliance_associations_total", result="accepted", calling_ae="METRICS_BAD") == 1
    assert total(samples, "appliance_associations_total", result="rejected") == 1
    assert total(samples, "appliance_associations_total", result="rejected", calling_ae="unknown") == 1
    assert total(samples, "appliance_store_failures_total") == 1
    assert total(samples, "appliance_store_failures_total", status="0xC001") == 1
    assert total(samples, "appliance_volume_free_bytes", volume="vol0") > 0
    assert total(samples, "appliance_volume_size_bytes", volume="vol0") >= total(
        samples, "appliance_volume_free_bytes", volume="vol0")
    assert total(samples, "appliance_associations_active") == 0
    assert server.cli_json("status")["counts"]["instances"] == n


# ---- memory bound -----------------------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def write_large_instance(path: Path, pixel_bytes: int) -> Dataset:
    """A multi-frame CT-like instance of ``pixel_bytes`` of pixel data, written without ever holding it."""
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    frame = 512 * 512 * 2
    frames = pixel_bytes // frame
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, frames
    ds.save_as(path, enforce_file_format=True)
    chunk = os.urandom(1 << 20)
    length = frames * frame
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, length))  # Pixel Data, OB, explicit LE
        written = 0
        while written < length:
            n = min(len(chunk), length - written)
            fh.write(chunk[:n])
            written += n
    return ds


def check_memory_bound(make_server: MakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       pixel_bytes: int) -> None:
    server = make_server(server={"workers": 1})
    (worker,) = server.worker_pids()
    # Warm up the code paths (imports, first association, first commit) before taking the baseline.
    assert send(server.port, [make_instance(CT, "PBIG", generate_uid(), generate_uid())]) == [0]
    before = vm_hwm(worker)

    path = tmp_path / "large.dcm"
    ds = write_large_instance(path, pixel_bytes)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # stream the file: no Dataset in memory
    ae = AE(ae_title="BIGSCU")
    ae.dimse_timeout = ae.network_timeout = 600
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(path).Status == 0, server.log()[-3000:]
    finally:
        assoc.release()

    grown = vm_hwm(worker) - before
    assert grown < 64 << 20, f"worker peak RSS grew by {grown / 2**20:.1f} MiB for a {pixel_bytes / 2**20:.0f} MiB instance"
    shown = server.cli_json("show", ds.SOPInstanceUID)
    assert shown["NumberOfFrames"] == str(ds.NumberOfFrames)
    (copy,) = [c for d, c in named_copies(server) if d == shown["digest"]]
    segment = server.volume / "segments" / copy.container
    _seg, _record, data, size = parse_location(copy.location)
    assert shown["size"] == size
    with open(segment, "rb") as a, open(path, "rb") as b:  # the dataset part, compared without loading it
        a.seek(data + size - (64 << 20))
        b.seek(-(64 << 20), os.SEEK_END)
        assert a.read(64 << 20) == b.read()
        a.seek(data)
        meta_length, _ts = part10_dataset_offset(a.read(4096))
    assert size - meta_length == path.stat().st_size - len(dataset_head(path))


def dataset_head(path: Path) -> bytes:
    """Preamble + File Meta of a Part-10 file."""
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(path)
    with open(path, "rb") as fh:
        return fh.read(offset)


def test_memory_bound_200_mib(make_server: MakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_memory_bound(make_server, tmp_path, monkeypatch, 200 << 20)


@pytest.mark.slow
def test_memory_bound_1_gib(make_server: MakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_memory_bound(make_server, tmp_path, monkeypatch, 1 << 30)
