"""C-FIND latency at archive scale: build an index of N synthetic instances directly (no blobs: C-FIND reads
only the index), serve it with ``appliance serve``, and time study-level C-FIND queries over DICOM.

    appliance bench find [--instances 1000000] [--per-study 100] [--queries 100] [--out DIR] [--keep]

The index is written through StudyIndex.apply, the one ingest write path, with synthetic headers (patients with
two studies each, 4 series per study, names drawn from 200 surnames x 50 given names, study dates spread over
ten years, one of eight modalities per study) and a fake copy per instance (backend ``synthetic``): building
1,000,000 instances takes minutes, not the hours storing them over DICOM would. Queries, each ``--queries``
times with random values, one association, pynetdicom as the SCU, from the request to the final response:

=============  ============================================================  ===============================
name           identifier (Study Root, STUDY level)                          matches at the default shape
=============  ============================================================  ===============================
patient_id     PatientID=<an existing one>                                   2
date_range     StudyDate=<a random 7-day range>                              ~20 at 10,000 studies
name_wildcard  PatientName=<SURNAME>*                                        ~50 at 10,000 studies
modality       ModalitiesInStudy=<one of 8>                                  ~1,250 at 10,000 studies
=============  ============================================================  ===============================

With ``--orthanc-instances M`` the same kinds of queries also go to Orthanc holding the first M of those
instances (Part-10 files written with pydicom and stored with storescu: Orthanc has no bulk index import, so M
stays small: 20,000 takes minutes). Orthanc's numbers are for M instances; run ``--instances M`` for the
appliance at the same size.

Output: a markdown table on stdout, JSON and markdown in --out (results.json, results.md). Not run by the
tests at full scale: the integrator schedules benchmarks one at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SURNAMES = [f"{a}{b}{c}" for a in ("MAR", "BEL", "COR", "DAN", "FIS", "GAR", "HOL", "KEN", "LOP", "NOR")
            for b in ("AN", "ER", "IN", "OL", "US") for c in ("DT", "KS", "MO", "ZY")]  # 200
GIVEN = [f"{a}{b}" for a in ("AL", "BE", "CA", "DO", "EM", "FR", "GI", "HA", "IS", "JO") for b in
         ("NA", "RT", "XI", "MA", "LU")]  # 50
MODALITIES = ("CT", "MR", "US", "CR", "DX", "MG", "NM", "PT")
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
OTHER_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
ROOT = "1.2.826.0.1.3680043.9.7780"
SERIES_PER_STUDY = 4
FIRST_DAY = 737425  # 2020-01-01 as a proleptic ordinal
DAYS = 3650


def _date(ordinal: int) -> str:
    import datetime

    return datetime.date.fromordinal(ordinal).strftime("%Y%m%d")


def study_shape(number: int) -> dict[str, str]:
    """The study and patient attributes of synthetic study ``number`` (deterministic)."""
    rng = random.Random(number)
    patient = number // 2
    name_rng = random.Random(patient * 7919)
    return {
        "PatientID": f"P{patient:07d}",
        "PatientName": f"{name_rng.choice(SURNAMES)}^{name_rng.choice(GIVEN)}",
        "PatientBirthDate": _date(FIRST_DAY - 30 * 365 + name_rng.randrange(20000)),
        "PatientSex": name_rng.choice("MF"),
        "StudyInstanceUID": f"{ROOT}.{number}",
        "StudyDate": _date(FIRST_DAY - DAYS + rng.randrange(DAYS)),
        "StudyTime": f"{rng.randrange(24):02d}{rng.randrange(60):02d}00",
        "AccessionNumber": f"A{number:08d}",
        "StudyID": str(number),
        "StudyDescription": "SYNTHETIC",
        "Modality": MODALITIES[rng.randrange(len(MODALITIES))],
    }


def build_index(index_path: Path, instances: int, per_study: int, progress: Callable[[str], None] = print) -> int:
    """Write ``instances`` synthetic instances (``per_study`` per study) into a fresh index; returns the number of
    studies."""
    from appliance.index.db import IndexEntry, StudyIndex
    from appliance.index.records import Header
    from appliance.index.schema import Copy

    studies = max(1, instances // per_study)
    index = StudyIndex(index_path, 1 << 30, sync=False)
    batch: list[IndexEntry] = []
    written = 0
    try:
        for number in range(studies):
            shape = study_shape(number)
            sop_class = SOP_CLASSES.get(shape["Modality"], OTHER_SOP_CLASS)
            patient = {k: shape[k] for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")}
            study = {k: shape[k] for k in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                                           "StudyDescription")}
            for i in range(per_study):
                s = i % SERIES_PER_STUDY
                series = {"SeriesInstanceUID": f"{shape['StudyInstanceUID']}.{s + 1}", "Modality": shape["Modality"],
                          "SeriesNumber": str(s + 1)}
                sop = f"{series['SeriesInstanceUID']}.{i + 1}"
                header = Header(patient, study, series, {"SOPInstanceUID": sop, "SOPClassUID": sop_class,
                                                         "InstanceNumber": str(i + 1)})
                copy = Copy("synthetic", "synthetic", sop, 600_000, received_ns=written)
                batch.append(IndexEntry(header, f"{written:064x}", 600_000, "1.2.840.10008.1.2.1", written, "SYNTH",
                                        copy))
                written += 1
                if len(batch) >= 5000:
                    index.apply(batch, "keep-first")
                    batch = []
            if number and number % 1000 == 0:
                progress(f"  {written} instances, {number} studies")
        if batch:
            index.apply(batch, "keep-first")
        index.sync()
    finally:
        index.close()
    return studies


def _queries(studies: int, count: int, seed: int = 1) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    out: dict[str, list[dict[str, str]]] = {"patient_id": [], "date_range": [], "name_wildcard": [], "modality": []}
    for _ in range(count):
        shape = study_shape(rng.randrange(studies))
        out["patient_id"].append({"PatientID": shape["PatientID"]})
        start = FIRST_DAY - DAYS + rng.randrange(DAYS - 7)
        out["date_range"].append({"StudyDate": f"{_date(start)}-{_date(start + 6)}"})
        out["name_wildcard"].append({"PatientName": shape["PatientName"].split("^")[0] + "*"})
        out["modality"].append({"ModalitiesInStudy": rng.choice(MODALITIES)})
    return out


def run_queries(port: int, queries: dict[str, list[dict[str, str]]], ae_title: str = "BENCHFIND",
                called: str = "APPLIANCE") -> dict[str, dict[str, Any]]:
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    from appliance.dicom.uids import STUDY_ROOT_FIND as STUDY_ROOT

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(STUDY_ROOT)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"association to {called} on port {port} refused")
    # pynetdicom leaves Nagle on: its command and identifier PDVs, two writes, would wait for our delayed ACK
    # (40 ms per query on Linux), which measures the TCP stack, not the search. DCMTK is run with TCP_NODELAY=1.
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, identifiers in queries.items():
            latencies: list[float] = []
            matches: list[int] = []
            statuses: set[int] = set()
            for keys in identifiers:
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID = ds.PatientID = ds.PatientName = ds.StudyDate = ""
                ds.ModalitiesInStudy = ds.AccessionNumber = ""
                for keyword, value in keys.items():
                    setattr(ds, keyword, value)
                start = time.perf_counter()
                found = 0
                for status, _identifier in assoc.send_c_find(ds, STUDY_ROOT):
                    if status is None or "Status" not in status:
                        # pynetdicom's way of saying no response came within dimse_timeout (or the association
                        # ended): counted, and the run stops rather than timing a dead association.
                        statuses.add(-1)
                        break
                    if status.Status in (0xFF00, 0xFF01):
                        found += 1
                    else:
                        statuses.add(int(status.Status))
                if -1 in statuses or not assoc.is_established:
                    raise RuntimeError(f"{name}: no response to query {len(latencies) + 1} within "
                                       f"{ae.dimse_timeout} s, or the association ended")
                latencies.append((time.perf_counter() - start) * 1000)
                matches.append(found)
            latencies.sort()
            results[name] = {
                "queries": len(latencies),
                "p50_ms": round(statistics.median(latencies), 2),
                "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
                "max_ms": round(latencies[-1], 2),
                "matches_mean": round(statistics.mean(matches), 1),
                "final_statuses": sorted(f"0x{s:04X}" for s in statuses),
            }
    finally:
        assoc.release()
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = [f"C-FIND latency, {report['instances']:,} instances / {report['studies']:,} studies "
             f"(index built in {report['build_s']:.1f} s, {report['index_bytes'] / 1e6:.0f} MB)", ""]
    runs = [("appliance", report["results"])]
    if "orthanc" in report:
        runs.append((f"orthanc ({report['orthanc']['instances']:,} instances)", report["orthanc"]["results"]))
    lines += ["| receiver | query | n | p50 ms | p99 ms | max ms | matches (mean) | final |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for label, results in runs:
        for name, r in results.items():
            lines.append(f"| {label} | {name} | {r['queries']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | "
                         f"{r['matches_mean']} | {', '.join(r['final_statuses'])} |")
    return "\n".join(lines) + "\n"


def write_part10(folder: Path, instances: int, per_study: int) -> int:
    """The first ``instances`` synthetic instances as small Part-10 files (2x2 pixels); returns the studies."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    studies = max(1, instances // per_study)
    for number in range(studies):
        shape = study_shape(number)
        sop_class = SOP_CLASSES.get(shape["Modality"], OTHER_SOP_CLASS)
        for i in range(per_study):
            ds = Dataset()
            for keyword, value in shape.items():
                setattr(ds, keyword, value)
            s = i % SERIES_PER_STUDY
            ds.SeriesInstanceUID = f"{shape['StudyInstanceUID']}.{s + 1}"
            ds.SeriesNumber, ds.InstanceNumber = s + 1, i + 1
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, f"{ds.SeriesInstanceUID}.{i + 1}"
            ds.Rows = ds.Columns = 2
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit, ds.PixelRepresentation, ds.PixelData = 7, 0, b"\x00\x01\x02\x03"
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"{number}-{i}.dcm", enforce_file_format=True)
    return studies


def run_orthanc(workdir: Path, instances: int, per_study: int, count: int) -> dict[str, Any]:
    """Orthanc holding ``instances`` synthetic instances, queried as the appliance is."""
    import subprocess

    from bench.receivers import DCMTK_ENV, OrthancReceiver

    class _Orthanc(OrthancReceiver):
        def command(self) -> list[str]:
            cmd = super().command()
            path = self.workdir / "orthanc.json"
            config = json.loads(path.read_text())
            config["DicomModalities"] = {"bench": ["BENCHFIND", "127.0.0.1", 104]}  # may query (AllowFind)
            config["LimitFindResults"] = 0  # no limit, as the appliance's results_max here
            path.write_text(json.dumps(config, indent=2))
            return cmd

    files = workdir / "orthanc-files"
    studies = write_part10(files, instances, per_study)
    receiver = _Orthanc(workdir / "orthanc")
    receiver.workdir.mkdir(parents=True, exist_ok=True)
    receiver.start()
    try:
        stored = subprocess.run(["storescu", "+sd", "+r", "-aec", receiver.ae, "127.0.0.1", str(receiver.port),
                                 str(files)], env=DCMTK_ENV, capture_output=True, text=True)
        if stored.returncode != 0:
            raise RuntimeError(f"storescu to Orthanc failed: {stored.stderr[-2000:]}")
        results = run_queries(receiver.port, _queries(studies, count), called=receiver.ae)
    finally:
        receiver.stop()
    return {"instances": studies * per_study, "studies": studies, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1_000_000, help="synthetic instances (default 1,000,000)")
    parser.add_argument("--per-study", type=int, default=100, help="instances per study (default 100)")
    parser.add_argument("--queries", type=int, default=100, help="queries of each kind (default 100)")
    parser.add_argument("--out", type=Path, help="write results.json and results.md here")
    parser.add_argument("--workdir", type=Path, help="build the index here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--orthanc-instances", type=int, default=0,
                        help="also query Orthanc holding this many of the instances (default 0: not run)")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.per_study < SERIES_PER_STUDY or args.queries < 1:
        print("error: --instances >= 1, --per-study >= 4, --queries >= 1", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-find-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building {args.instances:,} instances in {workdir} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    studies = build_index(workdir / "index", args.instances, args.per_study,
                          progress=lambda m: print(m, file=sys.stderr, flush=True))
    build_s = time.perf_counter() - started
    receiver = FindReceiver(workdir)
    receiver.start()
    try:
        results = run_queries(receiver.port, _queries(studies, args.queries))
    finally:
        receiver.stop()
    report = {"instances": studies * args.per_study, "studies": studies, "build_s": round(build_s, 1),
              "index_bytes": sum(p.stat().st_size for p in (workdir / "index").iterdir()), "results": results}
    if args.orthanc_instances > 0:
        print(f"storing {args.orthanc_instances:,} instances into Orthanc ...", file=sys.stderr, flush=True)
        report["orthanc"] = run_orthanc(workdir, args.orthanc_instances, args.per_study, args.queries)
    print(markdown(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "results.md").write_text(markdown(report))
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _receiver_class() -> type:
    from bench.receivers import ApplianceReceiver

    class _FindReceiver(ApplianceReceiver):
        """The benchmark's appliance with the SCU's AE title allowed to query, one worker (one search at a time
        is what is measured), and no result limit below what the modality query returns."""

        def __init__(self, workdir: Path) -> None:
            super().__init__(workdir, workers=1, fsync=False)

        def command(self) -> list[str]:
            cmd = super().command()
            with open(self.config_path, "a") as fh:
                fh.write('[query]\nresults_max = 1000000\nsearch_s_max = 600.0\n'
                         '[peers.bench]\nae_title = "BENCHFIND"\nallow_find = true\n')
            return cmd

    return _FindReceiver


def FindReceiver(workdir: Path) -> Any:  # noqa: N802 - a class built lazily (bench.receivers imports little)
    return _receiver_class()(workdir)


if __name__ == "__main__":
    raise SystemExit(main())
