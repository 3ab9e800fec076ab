"""Grafana dashboards of streamrec: built here as dicts, committed as JSON, uploaded on demand.

The JSON files in ``monitoring/grafana/dashboards/`` are the output of
:func:`build_dashboards`; regenerate them after editing a panel with::

    python -m monitoring.dashboards

Grafana provisions them from that folder (``provisioning/dashboards/streamrec.yml``);
:func:`publish_dashboards` uploads them to a running Grafana through its HTTP API instead.
Every query names the Prometheus data source by the provisioned uid ``prometheus``.

>>> boards = load_dashboards()
>>> sorted(boards)
['calibration', 'operations']
>>> boards["calibration"]["uid"]
'streamrec-calibration'
>>> sorted(dashboard_metric_names({"panels": [{"targets": [
...     {"expr": 'rate(streamrec_clicks_total[1m]) / rate(streamrec_impressions_total[1m])'},
...     {"expr": 'up{job="streamrec"}'}]}]}))
['streamrec_clicks_total', 'streamrec_impressions_total', 'up']
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monitoring.redact import redact

__all__ = [
    "DASHBOARD_DIR",
    "DATASOURCE",
    "DashboardPublishError",
    "build_dashboards",
    "calibration_dashboard",
    "dashboard_expressions",
    "dashboard_metric_names",
    "load_dashboards",
    "operations_dashboard",
    "promql_metric_names",
    "publish_dashboards",
    "render_dashboard",
    "write_dashboards",
]

Dashboard = dict[str, Any]

DASHBOARD_DIR = Path(__file__).resolve().parent / "grafana" / "dashboards"
"""Where the committed dashboard JSON files live (one ``<name>.json`` per dashboard)."""

DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "prometheus"}
"""The Prometheus data source as provisioned in ``provisioning/datasources/prometheus.yml``."""

SCHEMA_VERSION = 39
_GRID_WIDTH = 24

# PromQL: string literals (label values) are dropped, then every identifier that is a
# streamrec metric, or Prometheus' own `up`, is a metric name.
_STRING_RE = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)""")
_IDENT_RE = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


class DashboardPublishError(RuntimeError):
    """Grafana could not be reached, refused the credentials or rejected a dashboard."""


# --------------------------------------------------------------------------- building


def _target(expr: str, legend: str = "__auto", ref_id: str = "A") -> dict[str, Any]:
    return {
        "datasource": dict(DATASOURCE),
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref_id,
    }


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    """Absolute threshold steps; the first step's value is None (from minus infinity)."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def _band(low: float, high: float) -> dict[str, Any]:
    """Red outside ``[low, high]``, transparent inside: drawn as a shaded band."""
    return _thresholds((None, "red"), (low, "transparent"), (high, "red"))


class _Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to a new row,
    and numbers them 1, 2, ... so that ids are unique within a dashboard."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_h = 0

    def add(self, body: dict[str, Any], w: int, h: int) -> None:
        if self._x + w > _GRID_WIDTH:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        grid = {"h": h, "w": w, "x": self._x, "y": self._y}
        self.panels.append({"id": len(self.panels) + 1, "gridPos": grid, **body})
        self._x += w
        self._row_h = max(self._row_h, h)

    def timeseries(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        w: int,
        h: int = 8,
        unit: str = "short",
        description: str = "",
        thresholds: dict[str, Any] | None = None,
        soft_range: tuple[float, float] | None = None,
    ) -> None:
        custom: dict[str, Any] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 0,
            "showPoints": "never",
            "spanNulls": False,
            "thresholdsStyle": {"mode": "line+area" if thresholds else "off"},
        }
        if soft_range is not None:
            custom["axisSoftMin"], custom["axisSoftMax"] = soft_range
        body = {
            "type": "timeseries",
            "title": title,
            "description": description,
            "datasource": dict(DATASOURCE),
            "targets": [_target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(targets)],
            "fieldConfig": {
                "defaults": {
                    "unit": unit,
                    "color": {"mode": "palette-classic"},
                    "custom": custom,
                    "thresholds": thresholds or _thresholds((None, "green")),
                },
                "overrides": [],
            },
            "options": {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "none"},
            },
        }
        self.add(body, w, h)

    def stat(
        self,
        title: str,
        expr: str,
        *,
        w: int,
        h: int = 4,
        unit: str = "none",
        description: str = "",
        thresholds: dict[str, Any] | None = None,
    ) -> None:
        body = {
            "type": "stat",
            "title": title,
            "description": description,
            "datasource": dict(DATASOURCE),
            "targets": [_target(expr, "__auto")],
            "fieldConfig": {
                "defaults": {
                    "unit": unit,
                    "color": {"mode": "thresholds"},
                    "thresholds": thresholds or _thresholds((None, "blue")),
                },
                "overrides": [],
            },
            "options": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "none",
                "justifyMode": "auto",
                "textMode": "auto",
            },
        }
        self.add(body, w, h)

    def table(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        w: int,
        h: int = 8,
        description: str = "",
    ) -> None:
        """Instant queries as table columns, merged into one row per label set."""
        body = {
            "type": "table",
            "title": title,
            "description": description,
            "datasource": dict(DATASOURCE),
            "targets": [
                {
                    **_target(e, lg, chr(ord("A") + i)),
                    "format": "table",
                    "instant": True,
                    "range": False,
                }
                for i, (e, lg) in enumerate(targets)
            ],
            "transformations": [
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {
                            "Time": True,
                            "__name__": True,
                            "job": True,
                            "instance": True,
                            "window": True,
                        },
                        "renameByName": {
                            f"Value #{chr(ord('A') + i)}": lg for i, (_, lg) in enumerate(targets)
                        },
                    },
                },
            ],
            "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
            "options": {"showHeader": True, "sortBy": [{"displayName": "bin", "desc": False}]},
        }
        self.add(body, w, h)


def _annotation(name: str, expr: str, color: str, title: str) -> dict[str, Any]:
    return {
        "name": name,
        "datasource": dict(DATASOURCE),
        "enable": True,
        "hide": False,
        "iconColor": color,
        "expr": expr,
        "step": "15s",
        "titleFormat": title,
        "textFormat": "",
        "useValueForTime": False,
    }


def _dashboard(
    uid: str,
    title: str,
    description: str,
    layout: _Layout,
    annotations: list[dict[str, Any]],
    variables: list[dict[str, Any]],
) -> Dashboard:
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["streamrec"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "links": [
            {
                "type": "dashboards",
                "title": "streamrec",
                "tags": ["streamrec"],
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
            }
        ],
        "annotations": {"list": annotations},
        "templating": {"list": variables},
        "panels": layout.panels,
    }


def calibration_dashboard() -> Dashboard:
    """Predicted vs actual CTR, calibration ratio, ECE, drift z, NE and AUC, overall and per
    slate position, with drift alarms and recalibrations as annotations."""
    window_var = {
        "name": "window",
        "label": "Count window",
        "type": "query",
        "datasource": dict(DATASOURCE),
        "definition": "label_values(streamrec_calibration_ratio, window)",
        "query": "label_values(streamrec_calibration_ratio, window)",
        "refresh": 2,
        "current": {"selected": True, "text": "20k", "value": "20k"},
        "includeAll": False,
        "multi": False,
        "sort": 1,
        "hide": 0,
    }
    w = 'window="$window"'
    ratio_band = _band(0.9, 1.1)
    lay = _Layout()
    lay.timeseries(
        "Predicted vs actual CTR",
        [
            (f'streamrec_predicted_ctr{{{w},segment="all"}}', "predicted"),
            (f'streamrec_actual_ctr{{{w},segment="all"}}', "actual"),
        ],
        w=12,
        unit="percentunit",
        description="Mean served prediction and observed click rate over the count window.",
    )
    lay.timeseries(
        "Calibration ratio (predicted / actual clicks)",
        [
            ('streamrec_calibration_ratio{segment="all"}', "served {{window}}"),
            ('streamrec_raw_calibration_ratio{segment="all"}', "raw ranker {{window}}"),
        ],
        w=12,
        description="sum(p)/sum(y) of served (calibrated) and raw ranker scores; 1 is ideal. "
        "The shaded area is outside 1 ± 0.1, where "
        "StreamrecCalibrationOutOfBand fires after 5 minutes on the 20k window.",
        thresholds=ratio_band,
        soft_range=(0.8, 1.2),
    )
    lay.timeseries(
        "Expected calibration error",
        [('streamrec_expected_calibration_error{segment="all"}', "{{window}}")],
        w=6,
        description="Equal-mass-bin ECE, in [0, 1]; lower is better.",
    )
    lay.timeseries(
        "Drift z",
        [('streamrec_drift_z{segment="all"}', "z")],
        w=6,
        description="(sum y - sum p)/sqrt(sum p(1-p)) over the drift window; shaded beyond ±4, "
        "where StreamrecCalibrationDrift fires after 2 minutes.",
        thresholds=_band(-4.0, 4.0),
        soft_range=(-5.0, 5.0),
    )
    lay.timeseries(
        "Drift alarms and recalibrations",
        [
            ("increase(streamrec_drift_alarms_total[5m])", "drift alarms"),
            ("increase(streamrec_recalibrations_total[5m])", "recalibrations accepted"),
            ("increase(streamrec_recalibrations_rejected_total[5m])", "recalibrations rejected"),
            ("increase(streamrec_calibrator_updates_total[5m])", "calibrator versions"),
        ],
        w=6,
        description="Events per 5 minutes. While the calibrator tracks the model after an "
        "alarm it publishes a version per refit: accepted refits and level updates.",
    )
    lay.timeseries(
        "Log loss",
        [('streamrec_log_loss{segment="all"}', "{{window}}")],
        w=6,
        description="Mean binary cross-entropy of served predictions, nats.",
    )
    lay.timeseries(
        "Calibration ratio by slate position",
        [(f'streamrec_calibration_ratio{{{w},segment!="all"}}', "position {{segment}}")],
        w=24,
        h=9,
        description="Per-segment windows; a position far from 1 while the total is fine "
        "means position bias the model does not capture.",
        thresholds=ratio_band,
        soft_range=(0.5, 1.5),
    )
    lay.timeseries(
        "Normalised entropy",
        [('streamrec_normalized_entropy{segment="all"}', "{{window}}")],
        w=12,
        description="Log loss over the base-rate entropy; below 1 beats predicting the prior.",
        thresholds=_thresholds((None, "transparent"), (1.0, "red")),
    )
    lay.timeseries(
        "Normalised entropy by slate position",
        [(f'streamrec_normalized_entropy{{{w},segment!="all"}}', "position {{segment}}")],
        w=12,
    )
    lay.timeseries(
        "AUC",
        [('streamrec_auc{segment="all"}', "{{window}}")],
        w=12,
        unit="percentunit",
        description="ROC AUC of served predictions against clicks; 0.5 is random.",
        thresholds=_thresholds((None, "red"), (0.5, "transparent")),
    )
    lay.timeseries(
        "AUC by slate position",
        [(f'streamrec_auc{{{w},segment!="all"}}', "position {{segment}}")],
        w=12,
        unit="percentunit",
    )
    lay.timeseries(
        "Reliability by bucket (predicted / actual)",
        [
            (
                f"streamrec_reliability_predicted_ctr{{{w}}}"
                f" / streamrec_reliability_actual_ctr{{{w}}}",
                "bin {{bin}}",
            )
        ],
        w=12,
        h=9,
        description="Mean prediction over click rate per reliability bin (bin 01 holds the "
        "lowest predictions): equal-mass bins on the count window, fixed bins on the time "
        "window. 1 is calibrated; a fanning out of the bins with a total near 1 is a slope "
        "problem that a base-rate shift cannot fix.",
        thresholds=ratio_band,
        soft_range=(0.5, 1.5),
    )
    lay.table(
        "Reliability bins (now)",
        [
            (f"streamrec_reliability_predicted_ctr{{{w}}}", "mean prediction"),
            (f"streamrec_reliability_actual_ctr{{{w}}}", "click rate"),
            (f"streamrec_reliability_impressions{{{w}}}", "impressions"),
        ],
        w=12,
        h=9,
        description="The reliability diagram of the selected window as a table: per bin the "
        "mean served prediction, the observed click rate and the impressions.",
    )
    lay.timeseries(
        "Drift statistic by slate position",
        [('streamrec_drift_z{segment!="all"}', "position {{segment}}")],
        w=12,
        description="One drift detector per position on the served predictions (the "
        "configured test; window z by default, shaded beyond ±4). A position alarming "
        "alone is counted but does not recalibrate.",
        thresholds=_band(-4.0, 4.0),
        soft_range=(-5.0, 5.0),
    )
    lay.timeseries(
        "Drift alarms by slate position (per 5m)",
        [
            (
                "sum by (segment) (increase(streamrec_segment_drift_alarms_total[5m]))",
                "position {{segment}}",
            )
        ],
        w=12,
    )
    lay.timeseries(
        "Tracking calibrator: target base rate",
        [
            ("streamrec_calibration_target_ctr", "target (accepted window click rate)"),
            (f'streamrec_predicted_ctr{{{w},segment="all"}}', "served mean prediction"),
            (f'streamrec_raw_predicted_ctr{{{w},segment="all"}}', "raw mean prediction"),
        ],
        w=12,
        unit="percentunit",
        description="After a drift alarm the calibrator brings the served base rate to the "
        "target while the model adapts; empty when it is not tracking.",
    )
    lay.timeseries(
        "Logit offsets",
        [
            ("streamrec_calibrator_offset", "tracking calibrator"),
            ("streamrec_served_offset", "fast offset"),
        ],
        w=12,
        description="Tracking calibrator: the logit offset added to the raw scores; it "
        "shrinks as the model learns the new base rate, and the calibrator returns to "
        "identity near 0. Fast offset (offset.enabled): the offset after the calibrator, "
        "from the clicks that arrived against the clicks the served scores predicted; it "
        "decays as the ranker catches up.",
    )
    lay.timeseries(
        "Second label (clicked and converted): predicted vs conversions",
        [
            ("streamrec_second_label_ratio", "lifetime predicted / conversions"),
            ("streamrec_second_label_window_ratio", "newest window predicted / conversions"),
        ],
        w=12,
        thresholds=_band(0.9, 1.1),
        description="A two-task ranker with join.conversion_window_s set: its P(clicked and "
        "converted), summed over the impressions judged on their final second label (once "
        "join.window_s + conversion_window_s have closed), over their conversions (1 = "
        "calibrated); empty without a second label.",
    )
    lay.timeseries(
        "Conversions by outcome (per 5m)",
        [
            (
                "sum by (outcome) (increase(streamrec_conversions_total[5m]))",
                "{{outcome}}",
            )
        ],
        w=12,
        description="Conversion events the joiner attached to a clicked impression, late "
        "(after the conversion window, or duplicates), orphan (no click came) or ignored "
        "(no conversion window set).",
    )
    annotations = [
        _annotation(
            "Recalibrations",
            "changes(streamrec_recalibrations_total[1m]) > 0",
            "green",
            "Calibrator refit accepted",
        ),
        _annotation(
            "Drift alarms",
            "changes(streamrec_drift_alarms_total[1m]) > 0",
            "red",
            "Calibration drift alarm",
        ),
    ]
    return _dashboard(
        "streamrec-calibration",
        "streamrec / Calibration",
        "Predicted vs actual CTR of the online ranker, by window and slate position.",
        lay,
        annotations,
        [window_var],
    )


def operations_dashboard() -> Dashboard:
    """Throughput, dead letters, join state, watermark lag, versions, index and training."""
    ri = "$__rate_interval"
    lay = _Layout()
    lay.timeseries(
        "Throughput (events/s)",
        [
            (f"rate(streamrec_impressions_total[{ri}])", "impressions"),
            (f"rate(streamrec_clicks_total[{ri}])", "clicks"),
            (f"sum by (label) (rate(streamrec_labeled_total[{ri}]))", "labelled {{label}}"),
            (f"rate(streamrec_scored_total[{ri}])", "scored"),
            (f"rate(streamrec_monitored_total[{ri}])", "monitored"),
            (f"rate(streamrec_monitor_late_positives_total[{ri}])", "clicks too late to judge"),
        ],
        w=12,
        unit="reqps",
    )
    lay.timeseries(
        "Dead letters by reason (/s)",
        [(f"sum by (reason) (rate(streamrec_dead_letters_total[{ri}]))", "{{reason}}")],
        w=12,
        unit="reqps",
        description="Malformed records sent to the dead-letter topic; see "
        "StreamrecDeadLettersRising.",
    )
    lay.timeseries(
        "Pending impressions",
        [
            ("streamrec_pending_impressions", "pending in the join"),
            ("streamrec_monitor_pending_impressions", "awaiting their final label (monitor)"),
        ],
        w=8,
        description="Impressions waiting in the join window for a click, and those the "
        "calibration monitor holds until the lowest partition mark closes their window.",
    )
    lay.timeseries(
        "Event-time watermark lag",
        [
            ("time() - streamrec_event_time_watermark_seconds", "joiner"),
            ("time() - streamrec_monitor_mark_seconds", "monitor, partition {{partition}}"),
        ],
        w=8,
        unit="s",
        description="Wall clock minus the joiner's event-time watermark, and minus each "
        "partition's mark at the monitor (the lowest closes its windows: one partition "
        "falling behind the others is a stalled joiner). Replayed logs lag by their age; "
        "what matters is that it does not grow.",
    )
    lay.timeseries(
        "Duplicates and late clicks (/s)",
        [
            (f"rate(streamrec_duplicate_impressions_total[{ri}])", "duplicate impressions"),
            (f"rate(streamrec_duplicate_clicks_total[{ri}])", "duplicate clicks"),
            (f"rate(streamrec_late_clicks_total[{ri}])", "late clicks"),
        ],
        w=8,
        unit="reqps",
    )
    lay.stat(
        "Worker up",
        'up{job="streamrec"}',
        w=4,
        thresholds=_thresholds((None, "red"), (1.0, "green")),
    )
    lay.stat("Model version", "streamrec_model_version", w=4)
    lay.stat("Calibrator version", "streamrec_calibrator_version", w=4)
    lay.stat("Index version", "streamrec_index_version", w=4)
    lay.stat("Index items", "streamrec_index_items", w=4)
    lay.stat("Hard-negative pool users", "streamrec_hard_negative_pool_users", w=4)
    lay.timeseries(
        "Train loss",
        [("streamrec_train_loss", "loss")],
        w=8,
        description="Loss of the latest training micro-batch.",
    )
    lay.timeseries(
        "Train batches (/s)",
        [(f"rate(streamrec_train_batches_total[{ri}])", "batches")],
        w=8,
        unit="reqps",
        description="Micro-batches applied; see StreamrecModelStale.",
    )
    lay.timeseries(
        "Non-finite batches (per 5m)",
        [("increase(streamrec_nonfinite_batches_total[5m])", "skipped")],
        w=8,
        description="Micro-batches skipped for a non-finite loss; should stay at 0.",
        thresholds=_thresholds((None, "transparent"), (1.0, "red")),
    )
    lay.timeseries(
        "Versions",
        [
            ("streamrec_model_version", "model"),
            ("streamrec_calibrator_version", "calibrator"),
            ("streamrec_index_version", "index"),
        ],
        w=12,
    )
    for title, metric, unit in (
        ("Label-to-update freshness (wall)", "streamrec_update_freshness_seconds", "s"),
        ("Train step duration", "streamrec_train_step_seconds", "s"),
        ("Label delay (event time)", "streamrec_label_delay_seconds", "s"),
    ):
        lay.timeseries(
            title,
            [
                (
                    f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{ri}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ],
            w=8,
            unit=unit,
        )
    lay.timeseries(
        "Garbage collection (s of pause per s)",
        [
            (
                f"sum by (generation) (rate(streamrec_gc_pause_seconds_sum[{ri}]))",
                "generation {{generation}}",
            )
        ],  # fmt: skip
        w=12,
        unit="s",
        description="Python's collector pauses every thread of a worker, requests included;"
        " generation 2 passes are the long ones (settings gc_gen0_threshold, gc_freeze).",
    )
    lay.timeseries(
        "Index refreshes (/s)",
        [(f"rate(streamrec_index_refreshes_total[{ri}])", "refreshes")],
        w=12,
        unit="reqps",
        description="FAISS rebuilds swapped in; see StreamrecIndexStale.",
    )
    lay.timeseries(
        "Candidate fusion setting",
        [
            ("streamrec_fusion_weight", "{{source}} weight"),
            ("streamrec_fusion_beta", "prior beta"),
            ("streamrec_fusion_adapted", "online pick"),
        ],
        w=12,
        description="The weights /recommend fuses its candidate sources with, the prior on "
        "the model's candidates, and whether an online pick replaced the configured setting "
        "(it moves only on evidence from the clicks it scores).",
    )
    lay.timeseries(
        "Candidate fusion state",
        [
            ("streamrec_fusion_observed_clicks", "observed clicks"),
            ("streamrec_fusion_covisit_entries", "co-visit entries"),
            ("streamrec_fusion_uncounted_clicks", "uncounted clicks: {{reason}}"),
            ("streamrec_fusion_repeated_pairs", "co-visits a user had made"),
        ],
        w=12,
        description="Clicks scored for the online pick, co-visited pairs kept (bounded "
        "by fusion.covisit_max_entries), and what the fusion did not count: repeats, one "
        "user's clicks past fusion.max_user_share in popularity, and co-visits of a pair a "
        "user had already made (a flood).",
    )
    return _dashboard(
        "streamrec-operations",
        "streamrec / Operations",
        "Throughput, dead letters, join state, versions, index and training of the worker.",
        lay,
        [],
        [],
    )


def build_dashboards() -> dict[str, Dashboard]:
    """Every dashboard by file stem (``calibration`` → ``calibration.json``)."""
    return {"calibration": calibration_dashboard(), "operations": operations_dashboard()}


def render_dashboard(dashboard: Dashboard) -> str:
    """The committed text of ``dashboard``: 2-space indented JSON and a final newline."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def write_dashboards(directory: Path = DASHBOARD_DIR) -> list[Path]:
    """(Re)write ``<name>.json`` for every dashboard of :func:`build_dashboards`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dashboard in build_dashboards().items():
        path = directory / f"{name}.json"
        path.write_text(render_dashboard(dashboard), encoding="utf-8")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- reading


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, Dashboard]:
    """The committed dashboards, by file stem, parsed from ``directory/*.json``."""
    boards: dict[str, Dashboard] = {}
    for path in sorted(directory.glob("*.json")):
        boards[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return boards


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions(dashboard: Dashboard) -> list[str]:
    """Every PromQL expression of ``dashboard``: panel targets, annotations, variables."""
    exprs = [
        t["expr"]
        for p in _panels(dashboard.get("panels", []))
        for t in p.get("targets", [])
        if "expr" in t
    ]
    exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and var.get("type") == "query":
            exprs.append(query)
    return exprs


def dashboard_metric_names(dashboard: Dashboard) -> set[str]:
    """Metric names (``streamrec_*`` and ``up``) used by any expression of ``dashboard``."""
    return {name for expr in dashboard_expressions(dashboard) for name in promql_metric_names(expr)}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names (``streamrec_*`` and ``up``) in the PromQL expression ``expr``.

    >>> sorted(promql_metric_names('abs(streamrec_drift_z{segment="streamrec_x"}) > up'))
    ['streamrec_drift_z', 'up']
    """
    idents = _IDENT_RE.findall(_STRING_RE.sub('""', expr))
    return {i for i in idents if i.startswith("streamrec_") or i == "up"}


# --------------------------------------------------------------------------- publishing


def publish_dashboards(
    url: str, token: str | None = None, *, folder: str | None = None, timeout_s: float = 10
) -> list[str]:
    """Upload every committed dashboard to the Grafana at ``url`` (overwriting same uids).

    Args:
        url: Grafana base URL, e.g. ``http://grafana:3000`` (``http://user:pass@host:3000``
            for basic auth).
        token: service-account token sent as ``Authorization: Bearer``; None for none.
        folder: uid of the Grafana folder to put them in; None for the General folder.
        timeout_s: per-request timeout, seconds.

    Returns:
        The uids Grafana reports for the uploaded dashboards, in upload order.

    Raises:
        DashboardPublishError: Grafana unreachable, credentials refused, upload rejected;
            its message never holds a password (:func:`monitoring.redact.redact`).
    """
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException, GrafanaUnauthorizedError

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    shown = redact(url)  # errors never echo a password given in the URL
    uids: list[str] = []
    for dashboard in load_dashboards().values():
        body: dict[str, Any] = {"dashboard": dashboard, "overwrite": True}
        if folder is not None:
            body["folderUid"] = folder
        where = f"dashboard {dashboard['uid']!r} to Grafana at {shown}"
        try:
            response = api.dashboard.update_dashboard(body)
        except GrafanaUnauthorizedError:
            raise DashboardPublishError(
                f"cannot upload {where}: 401 Unauthorized (check the API token)"
            ) from None
        except GrafanaException as e:
            # status_code 0: the request itself failed (HTTP error below the API).
            raise DashboardPublishError(
                f"cannot upload {where}: {redact(str(e.message))}"
            ) from None
        except OSError as e:  # connection refused, DNS, TLS: niquests errors are OSErrors
            # the exception text and its chain may hold the URL with its credentials
            raise DashboardPublishError(
                f"cannot connect to Grafana at {shown}: {redact(str(e))}"
            ) from None
        if not isinstance(response, dict) or response.get("status") != "success":
            raise DashboardPublishError(f"Grafana rejected {where}: {redact(repr(response))}")
        uids.append(str(response.get("uid", dashboard["uid"])))
    return uids


if __name__ == "__main__":
    for written in write_dashboards():
        print(written)
