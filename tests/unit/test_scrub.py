"""`appliance verify` across tiers (tiering/scrub.py) on a real index and segment stores (tests/tiering_site.py):
every copy re-hashed and marked, a corrupt nearline copy found, reported, audited, and never served."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import BlobMissing
from appliance.index.schema import COPY_OK, COPY_SUSPECT
from tests.tiering_site import Site
from tests.unit.test_blobstore_tiers import _corrupt
from tiering.scrub import scrub


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site.open(tmp_path)
    yield s
    s.close()


def test_clean_scrub_of_every_tier(site: Site) -> None:
    online, _ = site.ingest(2)
    nearline, _ = site.ingest(2)
    tape, _ = site.ingest(1)
    site.to_tier(nearline, "nas")
    site.to_tier(tape, "lto")
    report = scrub(site.config, site.index, site.store)
    assert report.ok
    assert {t: r.checked for t, r in report.tiers.items()} == {"online": 2, "nas": 2, "lto": 1}
    assert all(r.bytes_read > 0 for r in report.tiers.values())
    for _digest, blob in site.index.blobs():
        assert all(c.state == COPY_OK and c.verified_ns for c in blob.copies)
    # --tier: only that tier's copies.
    only = scrub(site.config, site.index, site.store, {"lto"})
    assert list(only.tiers) == ["lto"] and only.tiers["lto"].checked == 1


def test_corrupt_nearline_copy_found_reported_never_served(site: Site) -> None:
    study, data = site.ingest(1)
    site.to_tier(study, "nas")
    [(_d, blob)] = list(site.index.blobs())
    _corrupt(site.store.tiers["nas"], blob.copies[0])
    report = scrub(site.config, site.index, site.store)
    assert not report.ok and len(report.tiers["nas"].corrupt) == 1 and report.tiers["online"].ok
    [(_d, blob)] = list(site.index.blobs())
    assert blob.copies[0].state == COPY_SUSPECT
    with pytest.raises(BlobMissing, match="does not hash"):
        site.read_study(study)
    findings = [json.loads(line) for line in site.config.tiering.audit_log.read_text().splitlines()]
    assert any(f.get("finding") == "corrupt" and f["tier"] == "nas" for f in findings)
    assert not any(uid in json.dumps(findings) for uid in data)  # no SOP Instance UIDs in the audit log


def test_a_copy_missing_from_the_tier_listing_is_reported(site: Site) -> None:
    study, _ = site.ingest(1)
    site.to_tier(study, "lto")
    backend = site.store.tiers["lto"]
    [(_d, blob)] = list(site.index.blobs())
    segment = blob.copies[0].container
    (Path(backend.dir) / segment).unlink()  # type: ignore[attr-defined]
    report = scrub(site.config, site.index, site.store, {"lto"})
    assert report.tiers["lto"].missing and report.tiers["lto"].orphans and not report.ok


def test_unknown_tier_is_refused(site: Site) -> None:
    with pytest.raises(Exception, match="no tier named"):
        scrub(site.config, site.index, site.store, {"glacier"})


def test_reads_are_rate_limited_per_tier(site: Site) -> None:
    import time

    site.ingest(3)
    started = time.monotonic()
    report = scrub(site.config, site.index, site.store, {"online"}, bytes_per_s=200_000)
    elapsed = time.monotonic() - started
    read = report.tiers["online"].bytes_read
    assert read > 100_000 and elapsed >= read / 200_000 * 0.9, (read, elapsed)


def test_findings_are_all_counted_and_listed_up_to_a_bound() -> None:
    from tiering.scrub import FINDINGS_LISTED_MAX, TierReport

    rep = TierReport("nas")
    for i in range(FINDINGS_LISTED_MAX + 5):
        rep.note("missing", f"nas/a{i}.tar {i:064x}")
    rep.note("corrupt", "nas/b.tar 00")
    assert rep.missing_count == FINDINGS_LISTED_MAX + 5 and len(rep.missing) == FINDINGS_LISTED_MAX
    assert rep.corrupt_count == 1 and rep.corrupt == ["nas/b.tar 00"] and not rep.ok
