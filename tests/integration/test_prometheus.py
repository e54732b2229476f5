"""The Prometheus and Grafana files (ops/) against a real Prometheus (Debian's 2.42): a real appliance (TLS on, a
nearline tier with a scheduled policy run, a configured peer) serves DCMTK storescu, findscu, movescu and getscu, a
recall and a verify; Prometheus scrapes it every second; then every expression of every dashboard panel and of
every alert rule is evaluated through Prometheus's HTTP API and must be valid and return data, and every alert
fires with its thresholds lowered (and the certificate alert with its own: the test certificate lives 2 days).
Finally the appliance is stopped and `up == 0` shows it. docs/testing.md says how the alerts are proven."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.conftest import DCMTK_ENV, ROOT, ServerHandle, dcmtk, free_port, wait_for
from tests.peers import ct_instances
from tests.tls_pki import make_pki

DASHBOARD = ROOT / "ops/grafana/appliance.json"
ALERTS = ROOT / "ops/prometheus/alerts.yml"
EXAMPLE_CONFIG = ROOT / "ops/prometheus/prometheus.yml"

pytestmark = pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool")),
                                reason="prometheus/promtool not installed (make peers)")

# Each alert with its threshold lowered so that this test's appliance makes it fire (old -> new, in its expr; the
# old text must be there, so that a changed rule fails here instead of silently not being lowered). ApplianceDown
# is proven by stopping the appliance; the TLS alerts fire with their real thresholds (a 2-day certificate).
LOWERED = {
    "ApplianceVolumeAboveWatermark": ("> appliance_volume_high_watermark_ratio",
                                      "> 0 * appliance_volume_high_watermark_ratio"),
    "ApplianceNoVolumeAccepting": ("== 0", ">= 0"),
    "ApplianceIngestFailures": ("> 0.01", "> 0"),
    "ApplianceStoreLatencyHigh": ("> 1", "> 0"),
    "ApplianceTierMigrationStalled": ("> 6 * 3600", "> -60"),
    "ApplianceTierPaused": ("== 1", ">= 0"),
    "ApplianceRecallQueueOld": ("> 0 and", ">= 0 and"),
    "ApplianceScrubErrors": ("> 0", ">= 0"),
    "ApplianceScrubOverdue": ("> 8 * 86400", "> -60"),
    "ApplianceTLSCertificateExpiresSoon": ("", ""),
    "ApplianceTLSCertificateExpiresVerySoon": ("", ""),
}
# Grafana's variables, as Grafana would substitute them (all instances; a rate window of several 1 s scrapes).
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*", "${datasource}": "",
                "$datasource": ""}


# ---- the files on their own ---------------------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def comparisons_as_bool(expr: str) -> str:
    """The expression with every comparison turned into its ``bool`` form: the same series, valued 0 or 1 instead
    of filtered, so "returns data" means "its metrics exist and the expression is valid", whatever the threshold.
    Label matchers (inside braces) and strings are left alone."""
    out, depth, i = [], 0, 0
    while i < len(expr):
        ch = expr[i]
        if ch in "\"'":
            end = expr.index(ch, i + 1)
            out.append(expr[i : end + 1])
            i = end + 1
            continue
        depth += ch == "{"
        depth -= ch == "}"
        match = re.match(r"(==|!=|>=|<=|>|<)(?!\s*bool)", expr[i:]) if depth == 0 else None
        if match:
            out.append(f"{match.group(1)} bool")
            i += len(match.group(1))
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def test_dashboard_is_importable_and_uses_the_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels(dash):
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
    # What the issue asks the dashboard to show, by the metric each needs.
    exprs = " ".join(expr for _name, expr in panel_exprs(dash))
    for needed in ("appliance_instances_stored_total", "appliance_stored_bytes_total", "appliance_store_stage_seconds",
                   "appliance_associations_active", "appliance_store_failures_total", "appliance_commit_batch_size",
                   "appliance_volume_free_bytes", "appliance_tier_bytes", "appliance_tier_migration_bytes_total",
                   "appliance_recall_queue_depth", "appliance_query_duration_seconds",
                   "appliance_retrieve_duration_seconds"):
        assert needed in exprs, needed


def test_rules_and_example_config_pass_promtool(tmp_path: Path) -> None:
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(EXAMPLE_CONFIG)]):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert {r["alert"] for r in alert_rules()} == {"ApplianceDown", *LOWERED}


def test_comparisons_as_bool() -> None:
    assert comparisons_as_bool('a{x!="1"} > 0 and b{y=~"a|b"} <= c') == 'a{x!="1"} > bool 0 and b{y=~"a|b"} <= bool c'
    assert comparisons_as_bool("up == bool 0") == "up == bool 0"


# ---- against a real Prometheus --------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, root: Path, target_port: int, rule_files: list[Path]) -> None:
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(p) for p in rule_files],
                  "scrape_configs": [{"job_name": "appliance", "scrape_interval": "1s", "scrape_timeout": "1s",
                                      "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(root / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.ready, 60, interval=0.1, what="prometheus ready")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with the error as JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> list[Any]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        result: list[Any] = answer["data"]["result"]
        return result

    def alerts(self) -> dict[str, str]:
        """Alert name -> state (firing wins over pending)."""
        states: dict[str, str] = {}
        for alert in self.api("alerts")["data"]["alerts"]:
            name = alert["labels"]["alertname"]
            if states.get(name) != "firing":
                states[name] = alert["state"]
        return states

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def lowered_rules(path: Path) -> Path:
    """alerts.yml with every alert renamed Test<name>, its threshold lowered (LOWERED) and ``for`` dropped."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        group["name"] = "lowered"
        for rule in group["rules"]:
            old, new = LOWERED.get(rule["alert"], ("", ""))
            assert old in rule["expr"], f"{rule['alert']}: {old!r} is no longer in its expr"
            if old:
                rule["expr"] = rule["expr"].replace(old, new)
            rule["alert"] = "Test" + rule["alert"]
            rule.pop("for", None)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    port, out = free_port(), tmp_path / "dest"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "+B", "-od", str(out), "-aet", "DEST", str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: dcmtk("echoscu", "-aec", "DEST", "127.0.0.1", str(port)).returncode == 0, 30, interval=0.05,
                 what="storescp")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def tiering_toml(root: Path) -> str:
    # Every study goes to nearline, then to (virtual) tape, at the next scheduled runs (every second): a study on
    # tape is what a recall brings back.
    return f"""
[tiering]
audit_log = "{root}/audit.jsonl"
schedule_s = 1
rate_bytes_per_s = 1073741824

[[tiers]]
name = "nl"
kind = "nearline"
volumes = [{{name = "nl0", path = "{root}/nl0"}}]

[[tiers]]
name = "tape"
kind = "tape"
mode = "virtual"
path = "{root}/library"
cartridge_bytes = 67108864
cartridges = 2

[[policies]]
name = "to-nearline"
from = "online"
to = "nl"
received_days_min = 0

[[policies]]
name = "to-tape"
from = "nl"
to = "tape"
received_days_min = 0
"""


def test_prometheus_evaluates_every_panel_and_alert(make_server: Callable[..., ServerHandle], storescp: int,
                                                     tmp_path: Path) -> None:
    if not (shutil.which("storescu") and shutil.which("movescu")):
        pytest.skip("DCMTK not installed")
    pki = make_pki(tmp_path / "pki")
    server = make_server(
        start=False,
        peers={"scu": {"ae_title": "SCU", "port": 1, "allow_receive": False},
               "dest": {"ae_title": "DEST", "port": storescp}},
        tls={"enabled": True, "port": 0, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
             "ca_certificates": str(pki.ca)})
    with open(server.config_path, "a") as fh:
        fh.write(tiering_toml(server.root))
    for tier in ("nl", "tape"):
        server.cli("tier", "init", tier)
    server.start()

    # The exposition passes promtool's linter (metric names, units, _total, help strings).
    lint = subprocess.run(["promtool", "check", "metrics"], input=server.metrics(), capture_output=True, text=True,
                          timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    prom = Prometheus(tmp_path, server.metrics_port, [ALERTS, lowered_rules(tmp_path / "lowered.yml")])
    try:
        # A refused instance (no Series Instance UID: 0xC001) now and another one later: a counter's first sample is
        # its birth, not an increase, so only the second one makes rate() and the failure alert see something.
        files = ct_instances(tmp_path / "ct", 20, study_uid="1.2.826.0.1.3680043.8.498.1201")
        bad = pydicom.dcmread(files[1])
        del bad.SeriesInstanceUID
        bad.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1203"
        bad.save_as(tmp_path / "bad.dcm")

        def send_bad() -> None:
            dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port),
                  str(tmp_path / "bad.dcm"))

        send_bad()
        wait_for(lambda: prom.query("appliance_store_failures_total") and prom.query("appliance_store_stage_seconds_count"),
                 30, interval=0.2, what="the first scrapes")

        # Ingest: a DCMTK burst from the configured peer (two studies), one from an unknown AE, one refused instance.
        files += ct_instances(tmp_path / "ct2", 5, study_uid="1.2.826.0.1.3680043.8.498.1202")
        burst = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files))
        assert burst.returncode == 0, burst.stderr
        other = dcmtk("storescu", "-aet", "NOT_A_PEER", "-aec", "APPLIANCE", "127.0.0.1", str(server.port),
                      str(files[0]))
        assert other.returncode == 0, other.stderr
        send_bad()

        # Query and retrieve.
        find = dcmtk("findscu", "-S", "-aet", "SCU", "-aec", "APPLIANCE", "-k", "QueryRetrieveLevel=STUDY", "-k",
                     "StudyInstanceUID", "127.0.0.1", str(server.port))
        assert find.returncode == 0, find.stderr
        move = dcmtk("movescu", "-S", "-aet", "SCU", "-aem", "DEST", "-aec", "APPLIANCE", "-k",
                     "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.826.0.1.3680043.8.498.1202", "127.0.0.1",
                     str(server.port))
        assert move.returncode == 0, move.stderr
        (tmp_path / "got").mkdir()
        get = dcmtk("getscu", "-S", "-aet", "SCU", "-aec", "APPLIANCE", "-od", str(tmp_path / "got"), "-k",
                    "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.826.0.1.3680043.8.498.1202", "127.0.0.1",
                    str(server.port))
        assert get.returncode == 0, get.stderr

        # Tiering: the scheduled runs move the studies to nearline and tape; a recall brings one back; a verify
        # scrubs every tier.
        wait_for(lambda: 'to_tier="tape"' in server.metrics(), 60, interval=0.2,
                 what="the scheduled runs to move the studies to tape")
        server.cli("tier", "recall", "1.2.826.0.1.3680043.8.498.1202")
        wait_for(lambda: re.search(r"^appliance_recall_duration_seconds_count [1-9]", server.metrics(), re.M), 60,
                 interval=0.2, what="the recall")
        server.cli("verify")

        # Every panel expression and every alert expression (comparisons in their bool form) returns data.
        exprs = [(name, grafana(expr)) for name, expr in panel_exprs(json.loads(DASHBOARD.read_text()))]
        exprs += [(f"alert {r['alert']}", comparisons_as_bool(r["expr"])) for r in alert_rules()]

        def empty() -> list[str]:
            return [f"{name}: {expr}" for name, expr in exprs if not prom.query(expr)]

        def all_have_data() -> bool:
            return not empty()

        try:
            wait_for(all_have_data, 60, interval=0.5, what="every expression to return data")
        except TimeoutError:
            raise AssertionError("expressions without data:\n" + "\n".join(empty())) from None

        # Every alert fires: the lowered copy of each, and the certificate alerts with their real thresholds.
        wanted = {"Test" + name for name in LOWERED} | {"ApplianceTLSCertificateExpiresVerySoon"}

        def not_firing() -> set[str]:
            states = prom.alerts()
            return {name for name in wanted if states.get(name) != "firing"}

        try:
            wait_for(lambda: not not_firing(), 60, interval=0.5, what="the alerts to fire")
        except TimeoutError:
            raise AssertionError(f"not firing: {sorted(not_firing())}") from None
        states = prom.alerts()
        assert states.get("ApplianceTLSCertificateExpiresSoon") == "pending"  # its for: 1h holds it
        assert "ApplianceDown" not in states and "TestApplianceDown" not in states

        # The label rule: the configured peer by name, everything else "unknown".
        peers = {r["metric"]["calling_ae"] for r in prom.query("appliance_instances_stored_total")}
        assert peers == {"SCU", "unknown"}

        # Appliance down: stopped, its target's up goes to 0 and the alert fires.
        assert server.stop() == 0
        wait_for(lambda: prom.query('up{job="appliance"} == 0'), 30, interval=0.2, what="up == 0")
        wait_for(lambda: prom.alerts().get("TestApplianceDown") == "firing", 30, interval=0.2,
                 what="ApplianceDown to fire")
    finally:
        prom.stop()
