"""The admins' SCU commands (`appliance find|move|get|echo`) against the appliance's own Query/Retrieve SCP: an
archive appliance holding two studies, a second appliance as the move destination, and an admin config whose
calling AE title the archive knows as a peer (or as one without the get right)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom

from appliance import errors
from tests.conftest import ServerHandle, dataset_bytes, write_config
from tests.integration.test_cli_scu import cli, cli_json
from tests.peers import ct_instances, sop_uids, store


def test_find_get_move_against_our_own_scp(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    destination = make_server(server={"ae_title": "DEST"})
    archive = make_server(peers={
        "admin": {"ae_title": "ADMIN", "port": 1, "allow_receive": False},
        "viewer": {"ae_title": "VIEWER", "port": 1, "allow_get": False, "allow_move": False},
        "dest": {"ae_title": "DEST", "port": destination.port},
    })
    doe = ct_instances(tmp_path / "doe", 3, patient_id="PID1", patient_name="DOE^JOHN")
    roe = ct_instances(tmp_path / "roe", 2, patient_id="PID2", patient_name="ROE^JANE")
    assert store(archive.port, doe + roe) == [0] * 5
    study = str(pydicom.dcmread(doe[0], stop_before_pixels=True).StudyInstanceUID)

    def admin_config(ae_title: str) -> Path:
        root = tmp_path / f"cli-{ae_title}"
        root.mkdir()
        return write_config(root, server={"ae_title": ae_title},
                            peers={"archive": {"ae_title": "APPLIANCE", "port": archive.port}})

    config = admin_config("ADMIN")
    assert cli_json(config, "echo", "archive")["status"] == 0
    rows = cli_json(config, "find", "archive", "-k", "PatientName=doe*")  # case-insensitive by default
    assert [(r["StudyInstanceUID"], r["PatientID"]) for r in rows] == [(study, "PID1")]
    assert rows[0]["NumberOfStudyRelatedInstances"] == "3" and rows[0]["ModalitiesInStudy"] == "CT"

    out = tmp_path / "got"
    got = cli_json(config, "get", "archive", "-k", f"StudyInstanceUID={study}", "--out", str(out))
    assert (got["status"], got["completed"], got["failed"]) == (0, 3, 0)
    for path in doe:  # byte for byte what was stored
        assert dataset_bytes(out / f"{sop_uids(path)[1]}.dcm") == dataset_bytes(path)

    moved = cli_json(config, "move", "archive", "-k", f"StudyInstanceUID={study}", "--dest", "DEST")
    assert (moved["status"], moved["completed"], moved["failed"]) == (0, 3, 0)
    for path in doe:
        assert destination.cli_json("show", sop_uids(path)[1])["calling_ae"] == "APPLIANCE"
    refused = cli(config, "move", "archive", "-k", f"StudyInstanceUID={study}", "--dest", "NOWHERE")
    assert refused.returncode == errors.EXIT_FAILURE and "Traceback" not in refused.stderr

    viewer = admin_config("VIEWER")  # may find, may not get or move: 0x0124, one line, exit 1
    assert len(cli_json(viewer, "find", "archive")) == 2
    for args in (("get", "archive", "-k", f"StudyInstanceUID={study}", "--out", str(tmp_path / "no")),
                 ("move", "archive", "-k", f"StudyInstanceUID={study}", "--dest", "DEST")):
        result = cli(viewer, *args)
        assert result.returncode == errors.EXIT_FAILURE, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "not allowed to get" in archive.log() and "DOE" not in archive.log()
