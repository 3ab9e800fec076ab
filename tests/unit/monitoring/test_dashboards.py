"""The committed Grafana dashboards and provisioning, and uploading them to a Grafana API."""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from monitoring.dashboards import (
    DASHBOARD_DIR,
    DashboardPublishError,
    build_dashboards,
    dashboard_expressions,
    dashboard_metric_names,
    load_dashboards,
    publish_dashboards,
    render_dashboard,
)
from monitoring.metrics import StreamrecMetrics

GRAFANA_DIR = DASHBOARD_DIR.parent
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
EXPECTED = {"calibration": "streamrec-calibration", "operations": "streamrec-operations"}
REQUIRED_KEYS = {
    "uid",
    "title",
    "tags",
    "schemaVersion",
    "panels",
    "time",
    "annotations",
    "templating",
}


def exported_metric_names() -> set[str]:
    return StreamrecMetrics().metric_names() | {"up"}


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return load_dashboards()


# --------------------------------------------------------------------------- files


def test_committed_dashboards_are_exactly_the_generator_output() -> None:
    built = build_dashboards()
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == [f"{n}.json" for n in built]
    for name, dashboard in built.items():
        committed = (DASHBOARD_DIR / f"{name}.json").read_text(encoding="utf-8")
        assert committed == render_dashboard(dashboard), (
            f"{name}.json is stale: regenerate with `python -m monitoring.dashboards`"
        )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dashboard_is_valid_json_with_grafana_model_keys(name: str) -> None:
    board = json.loads((DASHBOARD_DIR / f"{name}.json").read_text(encoding="utf-8"))
    assert REQUIRED_KEYS <= board.keys()
    assert board["uid"] == EXPECTED[name]
    assert board["title"]
    assert board["tags"] == ["streamrec"]
    assert board["schemaVersion"] == 39
    assert isinstance(board["panels"], list) and board["panels"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_panel_ids_are_unique_and_every_panel_is_placed_on_the_grid(
    dashboards: dict[str, dict[str, Any]], name: str
) -> None:
    panels = dashboards[name]["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_query_uses_the_provisioned_prometheus_datasource(
    dashboards: dict[str, dict[str, Any]], name: str
) -> None:
    board = dashboards[name]
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == DATASOURCE
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert target["expr"].strip()
    for annotation in board["annotations"]["list"]:
        assert annotation["datasource"] == DATASOURCE
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == DATASOURCE


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_metric_a_dashboard_names_is_exported(
    dashboards: dict[str, dict[str, Any]], name: str
) -> None:
    used = dashboard_metric_names(dashboards[name])
    assert used, "no metric found: the extractor is broken"
    unknown = used - exported_metric_names()
    assert not unknown, f"{name} names metrics that StreamrecMetrics does not export: {unknown}"


@pytest.mark.parametrize("where", ["panel", "annotation", "variable"])
def test_metric_check_catches_an_unexported_metric_anywhere(
    dashboards: dict[str, dict[str, Any]], where: str
) -> None:
    board = copy.deepcopy(dashboards["calibration"])
    expr = 'rate(streamrec_consumer_lag_total{topic="labeled"}[1m])'
    if where == "panel":
        board["panels"][-1]["targets"].append({"expr": expr, "datasource": DATASOURCE})
    elif where == "annotation":
        board["annotations"]["list"].append({"expr": expr, "datasource": DATASOURCE})
    else:
        board["templating"]["list"].append({"type": "query", "query": {"query": expr}})
    assert dashboard_metric_names(board) - exported_metric_names() == {
        "streamrec_consumer_lag_total"
    }


def test_metric_names_ignore_label_values_functions_and_grafana_variables() -> None:
    board = {
        "panels": [
            {
                "targets": [
                    {"expr": "sum by (reason) (rate(streamrec_dead_letters_total[$__range]))"},
                    {"expr": 'streamrec_auc{window="$window",segment!="streamrec_fake"}'},
                    {"expr": 'time() - streamrec_event_time_watermark_seconds + up{job="up"}'},
                ]
            }
        ]
    }
    assert dashboard_metric_names(board) == {
        "streamrec_dead_letters_total",
        "streamrec_auc",
        "streamrec_event_time_watermark_seconds",
        "up",
    }


def test_calibration_dashboard_shows_the_ratio_band_and_recalibration_events(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    board = dashboards["calibration"]
    ratio = next(p for p in board["panels"] if p["title"].startswith("Calibration ratio ("))
    steps = ratio["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 0.9, 1.1]
    assert ratio["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
    exprs = [a["expr"] for a in board["annotations"]["list"]]
    assert "changes(streamrec_recalibrations_total[1m]) > 0" in exprs
    per_segment = [e for e in dashboard_expressions(board) if 'segment!="all"' in e]
    assert {m for e in per_segment for m in re.findall(r"streamrec_\w+", e)} == {
        "streamrec_calibration_ratio",
        "streamrec_normalized_entropy",
        "streamrec_auc",
        "streamrec_drift_z",
    }


def test_calibration_dashboard_shows_reliability_bins_and_per_segment_drift(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    board = dashboards["calibration"]
    by_title = {p["title"]: p for p in board["panels"]}
    ratio = by_title["Reliability by bucket (predicted / actual)"]
    (target,) = ratio["targets"]
    assert target["expr"] == (
        'streamrec_reliability_predicted_ctr{window="$window"}'
        ' / streamrec_reliability_actual_ctr{window="$window"}'
    )
    assert target["legendFormat"] == "bin {{bin}}"
    table = by_title["Reliability bins (now)"]
    assert table["type"] == "table"
    assert all(t["instant"] and t["format"] == "table" for t in table["targets"])
    assert {m for t in table["targets"] for m in re.findall(r"streamrec_\w+", t["expr"])} == {
        "streamrec_reliability_predicted_ctr",
        "streamrec_reliability_actual_ctr",
        "streamrec_reliability_impressions",
    }
    drift = by_title["Drift statistic by slate position"]
    assert [t["expr"] for t in drift["targets"]] == ['streamrec_drift_z{segment!="all"}']
    exprs = dashboard_expressions(board)
    assert any("streamrec_segment_drift_alarms_total" in e for e in exprs)
    assert any("streamrec_calibrator_offset" in e for e in exprs)
    assert any("streamrec_served_offset" in e for e in exprs)


def test_operations_dashboard_shows_watermark_lag_and_rates(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    exprs = dashboard_expressions(dashboards["operations"])
    assert "time() - streamrec_event_time_watermark_seconds" in exprs
    for counter in ("impressions", "clicks", "labeled", "dead_letters"):
        assert any(f"rate(streamrec_{counter}_total[" in e for e in exprs), counter


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder() -> None:
    ds = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s+uid: prometheus$", ds, re.M)
    assert re.search(r"^\s+type: prometheus$", ds, re.M)
    assert re.search(r"^\s+url: http://prometheus:9090$", ds, re.M)
    assert re.search(r"^\s+isDefault: true$", ds, re.M)
    prov = (GRAFANA_DIR / "provisioning" / "dashboards" / "streamrec.yml").read_text()
    assert re.search(r"^\s+type: file$", prov, re.M)
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards$", prov, re.M)


# --------------------------------------------------------------------------- publishing


@dataclass
class FakeGrafana:
    """Answers ``POST /api/dashboards/db`` like Grafana and records every request."""

    url: str
    token: str | None
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)


@pytest.fixture
def fake_grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana(url="", token="s3cret")

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body: Any = json.loads(raw) if raw else None
            state.requests.append(("POST", self.path, dict(self.headers), body))
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self._reply(401, {"message": "invalid API key"})
            elif self.path != "/api/dashboards/db":
                self._reply(404, {"message": "Not found"})
            else:
                uid = body["dashboard"]["uid"]
                self._reply(
                    200,
                    {
                        "id": len(state.requests),
                        "uid": uid,
                        "url": f"/d/{uid}/x",
                        "status": "success",
                        "version": 1,
                        "slug": "x",
                    },
                )

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_publish_uploads_every_dashboard_with_overwrite(fake_grafana: FakeGrafana) -> None:
    uids = publish_dashboards(fake_grafana.url, "s3cret", folder="ops", timeout_s=5)
    assert uids == ["streamrec-calibration", "streamrec-operations"]
    committed = load_dashboards()
    assert [r[1] for r in fake_grafana.requests] == ["/api/dashboards/db"] * 2
    for (_, _, headers, body), name in zip(fake_grafana.requests, committed, strict=True):
        assert headers["Authorization"] == "Bearer s3cret"
        assert body["overwrite"] is True
        assert body["folderUid"] == "ops"
        assert body["dashboard"] == committed[name]


def test_publish_without_folder_uses_the_general_folder(fake_grafana: FakeGrafana) -> None:
    publish_dashboards(fake_grafana.url, "s3cret")
    assert all("folderUid" not in r[3] for r in fake_grafana.requests)


def test_publish_with_a_wrong_token_says_unauthorized(fake_grafana: FakeGrafana) -> None:
    with pytest.raises(DashboardPublishError, match="401 Unauthorized.*token"):
        publish_dashboards(fake_grafana.url, "wrong")
    assert len(fake_grafana.requests) == 1  # stops at the first rejection


def test_publish_to_a_refused_port_says_cannot_connect() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(DashboardPublishError, match=f"cannot connect to Grafana at {url}"):
        publish_dashboards(url, "s3cret", timeout_s=2)
    assert time.monotonic() - t0 < 10


def test_errors_never_echo_the_password_of_the_grafana_url(fake_grafana: FakeGrafana) -> None:
    with_password = fake_grafana.url.replace("http://", "http://admin:pa55word@")
    with pytest.raises(DashboardPublishError) as unauthorized:
        publish_dashboards(with_password, "wrong")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DashboardPublishError) as refused:
        publish_dashboards(f"http://admin:pa55word@127.0.0.1:{port}", None, timeout_s=2)
    for exc in (unauthorized.value, refused.value):
        assert "pa55word" not in str(exc)
        assert "admin:***@127.0.0.1" in str(exc)
        assert exc.__cause__ is None and exc.__suppress_context__  # no chained original
