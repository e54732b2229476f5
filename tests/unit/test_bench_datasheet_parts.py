"""The datasheet's parts without a receiver: a site's configuration turned into a benchmark's (bench/bench_config.py),
the statistics every figure goes through, and the two renderings (Markdown, self-contained HTML)."""

from __future__ import annotations

import base64
import shutil
import tomllib
from pathlib import Path

import pytest

from appliance.config import load_config
from bench import datasheet
from bench.bench_config import BENCH_FOLDER, BenchConfigError, SiteConfig
from bench.datasheet_report import Block, spread, to_html, to_markdown

SITE = """
[server]
ae_title = "SITEPACS"
port = 104
workers = 3
max_associations_per_host = 8
max_associations = 200
refuse_unknown_calling_ae = true
unknown_peer_rights = []

[storage]
index_path = "{root}/meta/index"
commit_max_batch = 128

[[volumes]]
name = "raid-a"
path = "{root}/a"

[[volumes]]
name = "raid-b"
path = "{root}/b"
high_watermark = 0.97

[peers.ct1]
ae_title = "CT1"
host = "10.1.2.3"

[audit]
destination = "file"
path = "/var/log/appliance/audit.jsonl"
"""


def site_file(tmp_path: Path) -> Path:
    from appliance.store.volumes import init_volume

    for name in ("a", "b", "meta"):
        (tmp_path / name).mkdir()
    init_volume(tmp_path / "a", "raid-a")
    init_volume(tmp_path / "b", "raid-b")
    path = tmp_path / "appliance.toml"
    path.write_text(SITE.format(root=tmp_path))
    return path


def test_a_run_config_keeps_the_site_settings_and_changes_only_what_a_benchmark_must(tmp_path: Path) -> None:
    site = SiteConfig(site_file(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    path = site.write_run_config(work, "r1")
    doc = tomllib.loads(path.read_text())
    cfg = load_config(path)
    # the site's: AE title, workers, group commit, volume names and settings
    assert cfg.server.ae_title == "SITEPACS" and cfg.server.workers == 3 and cfg.storage.commit_max_batch == 128
    assert [(v.name, v.high_watermark) for v in cfg.volumes] == [("raid-a", 0.95), ("raid-b", 0.97)]
    # the benchmark's: a fresh folder in each volume, the index beside the site's, loopback and free ports
    assert [v.path for v in cfg.volumes] == [tmp_path / "a" / BENCH_FOLDER / "r1", tmp_path / "b" / BENCH_FOLDER / "r1"]
    assert cfg.storage.index_path == tmp_path / "meta" / BENCH_FOLDER / "r1" / "index"
    assert (cfg.server.host, cfg.server.port, cfg.server.metrics_port) == ("127.0.0.1", 0, 0)
    assert cfg.server.max_associations_per_host == 64 and cfg.server.max_associations == 200  # raised, never lowered
    assert not cfg.server.refuse_unknown_calling_ae and "store" in cfg.server.unknown_peer_rights
    assert cfg.audit.path == work / "audit" / "audit.jsonl"  # not the site's live audit trail
    assert "peers" not in doc and cfg.peers == ()
    for name in ("a", "b"):  # volume init'ed under the configured name, so serve accepts it
        assert (tmp_path / name / BENCH_FOLDER / "r1" / ".appliance-volume").exists()
    assert site.describe()["dropped_sections"] == ["peers"]
    site.remove_run("r1")
    assert not any((tmp_path / n / BENCH_FOLDER).exists() for n in ("a", "b", "meta"))
    assert (tmp_path / "a").is_dir()  # the site's own folders stay


def test_a_volume_that_is_not_there_is_refused_not_replaced_by_the_root_disk(tmp_path: Path) -> None:
    path = site_file(tmp_path)
    shutil.rmtree(tmp_path / "b")
    (tmp_path / "b").mkdir()  # the array is not mounted: its mount point is an empty folder on the root disk
    with pytest.raises(BenchConfigError, match=r"volume raid-b: .* has no .appliance-volume marker"):
        SiteConfig(path)
    (tmp_path / "b").rmdir()  # no folder at all
    with pytest.raises(BenchConfigError, match=r"volume raid-b: .* does not exist"):
        SiteConfig(path)


def test_a_bad_site_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(BenchConfigError) as err:
        SiteConfig(bad)
    assert "\n" not in str(err.value)


def test_stat_and_spread() -> None:
    s = datasheet.stat([300.0, None, 280.0, 310.0], 1)
    assert s == {"median": 300.0, "min": 280.0, "max": 310.0, "n": 3, "values": [300.0, 280.0, 310.0]}
    assert spread(s) == "300 (280-310)"
    assert spread(datasheet.stat([1.234], 2), 2) == "1.23"  # one run: no range
    assert spread(datasheet.stat([5.0, 5.0, 5.0]), 0) == "5"  # runs that agree: no range
    assert spread(datasheet.stat([])) == "-"


def sample(receiver: str, client: str, repeat: int, rate: float, ok: bool = True) -> dict[str, object]:
    return {"scenario": "mr-burst", "client": client, "receiver": receiver, "associations": 4, "repeat": repeat,
            "instances": 1000, "bytes": 132_000_000, "bytes_kind": "dataset", "ok": ok, "instances_per_s": rate,
            "mb_per_s": rate * 0.132, "receiver_cpu_s": rate / 1000}


def test_throughput_and_ratio_rows_are_over_the_ok_repeats_only() -> None:
    samples = [sample("appliance-w2", "driver", r, v) for r, v in enumerate((800.0, 900.0, 700.0))]
    samples += [sample("storescp", "driver", r, v) for r, v in enumerate((1600.0, 1500.0, 1400.0))]
    samples += [sample("storescp", "driver", 3, 99999.0, ok=False)]
    rows = {r["receiver"]: r for r in datasheet.throughput_rows(samples)}
    assert rows["appliance-w2"]["instances_per_s"]["median"] == 800.0
    assert rows["storescp"]["instances_per_s"]["max"] == 1600.0 and rows["storescp"]["runs"] == 4
    assert rows["storescp"]["ok_runs"] == 3
    assert rows["appliance-w2"]["cpu_ms_per_instance"]["median"] == pytest.approx(0.8)
    (ratio,) = datasheet.ratio_rows(samples)
    assert ratio["other"] == "storescp" and ratio["ratio"]["values"] == [0.5, 0.6, 0.5]


def test_parse_cpus() -> None:
    assert datasheet.parse_cpus("0") == {0} and datasheet.parse_cpus("0-2,5") == {0, 1, 2, 5}
    with pytest.raises(Exception, match="CPU list"):
        datasheet.parse_cpus("first")


def test_html_is_one_file_with_its_plots_and_escapes_what_it_prints(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    blocks = [Block("h1", "Box <X1> & co"), Block("p", "a < b"), Block("ul", items=["one"]),
              Block("table", header=["a", "b"], rows=[["1", "<2>"]]), Block("figure", text="plot", png=png,
                                                                           name="t")]
    page = to_html(blocks)
    assert "Box &lt;X1&gt; &amp; co" in page and "&lt;2&gt;" in page and "<2>" not in page
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    for external in ("<script", "<link", 'src="http', "url("):
        assert external not in page
    text = to_markdown(blocks, tmp_path)
    assert "![plot](datasheet-t.png)" in text and (tmp_path / "datasheet-t.png").read_bytes() == png
