"""The Prometheus config and alert rules, checked by promtool and loaded by a real Prometheus
server that scrapes a real streamrec metrics endpoint."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import monitoring
from monitoring.dashboards import promql_metric_names
from monitoring.metrics import StreamrecMetrics, serve_metrics
from monitoring.windows import CalibrationWindow

pytestmark = pytest.mark.integration

PROM_DIR = Path(monitoring.__file__).resolve().parent / "prometheus"
INSTALL_HINT = "install the Debian/Ubuntu `prometheus` package: apt-get install -y prometheus"
ALERTS = {
    "StreamrecCalibrationOutOfBand",
    "StreamrecCalibrationDrift",
    "StreamrecDeadLettersRising",
    "StreamrecModelStale",
    "StreamrecIndexStale",
    "StreamrecWorkerDown",
    "StreamrecCrashLoop",
    "StreamrecStageErrors",
    "StreamrecControlRejected",
    "StreamrecMonitorPartitionStalled",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH: {INSTALL_HINT}")
    return path


def promtool(*args: str) -> str:
    proc = subprocess.run(
        [tool("promtool"), *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_accepts_the_prometheus_config() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_promtool_accepts_the_alert_rules() -> None:
    assert f"SUCCESS: {len(ALERTS)} rules found" in promtool("check", "rules", "alerts.yml")


def test_alert_rule_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


# --------------------------------------------------------------------------- real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@dataclass
class Server:
    url: str
    published_ratio: float
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": promql})
        body = get_json(f"{self.url}/api/v1/query?{q}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.25)
        pytest.fail(f"no series for {promql!r} within {timeout_s} s; log:\n{self.log.read_text()}")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The committed prometheus.yml and alerts.yml, pointed at a local metrics endpoint with
    1 s scrape and evaluation intervals, run by a real Prometheus server."""
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    metrics = StreamrecMetrics()
    window = CalibrationWindow(size=1000)
    window.update(predictions=[0.1, 0.2, 0.3, 0.05, 0.15, 0.4], labels=[0, 1, 0, 0, 0, 1])
    snapshot = window.window()
    metrics.publish_snapshot(snapshot, window="20k")
    metrics.impressions.inc(6)
    metrics_server, metrics_port = serve_metrics(metrics.registry)

    import yaml

    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "streamrec"
    # the compose services of every role, any replica (the GPU trainer included)
    assert job["dns_sd_configs"][0]["names"] == ["joiner", "trainer", "trainer-gpu", "serve"]
    assert job["dns_sd_configs"][0]["port"] == 9464
    assert job["relabel_configs"][0]["target_label"] == "role"
    # here: the same job and rules, pointed at a local endpoint, 1 s intervals
    del job["dns_sd_configs"], job["relabel_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    job["scrape_interval"] = "1s"
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROM_DIR / "alerts.yml", tmp / "alerts.yml")  # rule_files is relative
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not become ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(url=url, published_ratio=snapshot.ratio, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        metrics_server.shutdown()
        metrics_server.server_close()


def test_prometheus_scrapes_the_published_calibration_ratio(prometheus: Server) -> None:
    assert math.isfinite(prometheus.published_ratio)
    result = prometheus.wait_for('streamrec_calibration_ratio{window="20k",segment="all"}')
    assert len(result) == 1
    labels = result[0]["metric"]
    assert labels["job"] == "streamrec"
    assert float(result[0]["value"][1]) == prometheus.published_ratio
    up = prometheus.wait_for('up{job="streamrec"}')
    assert float(up[0]["value"][1]) == 1.0


def test_prometheus_loads_every_alert_rule_on_exported_metrics(prometheus: Server) -> None:
    deadline = time.monotonic() + 20
    while True:
        body = get_json(f"{prometheus.url}/api/v1/rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        if (rules and all(r["health"] == "ok" for r in rules)) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert {r["name"] for r in rules if r["type"] == "alerting"} == ALERTS
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    exported = StreamrecMetrics().metric_names() | {"up"}
    for rule in rules:
        used = promql_metric_names(rule["query"])
        assert used and used <= exported, (rule["name"], used - exported)
    # the healthy test worker must not trip the worker-down alert
    alerts = get_json(f"{prometheus.url}/api/v1/alerts")["data"]["alerts"]
    assert "StreamrecWorkerDown" not in {a["labels"]["alertname"] for a in alerts}
