"""A self-contained HTML calibration report of a demo run, for readers without Grafana.

:func:`write_report` turns the run directory written by ``streamrec demo``
(``report.json`` and ``scored.npz``) into ``report.html``: one file, no external assets and
no JavaScript, with the figures embedded as base64 PNG. It holds

1. a summary table (overall, and before / after the planted drift when there is one),
2. a reliability diagram (equal-mass bins, served and raw predictions),
3. predicted vs actual click-through rate over event time, and
4. the calibration ratio ``Σp / Σy`` over event time with a ±10% band,

with the planted drift, every drift alarm and every accepted recalibration marked on the
time axes. :func:`render_html` does the same from a :class:`ReportData` in memory;
:func:`~monitoring.report_figures.render_png` and
:func:`~monitoring.report_figures.write_figures` give the figures as PNG images instead (one
stacked image, or one file per figure), e.g. ``streamrec report RUN --out report.png``.

The figures are drawn by :mod:`monitoring.report_figures`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from monitoring.calibration import (
    auc,
    calibration_ratio,
    expected_calibration_error,
    log_loss,
    normalized_entropy,
)
from monitoring.report_figures import (
    RATIO_BAND,
    distinct_raw,
    figures_with_window,
    render_png,
    write_figures,
)

__all__ = [
    "ReportData",
    "format_value",
    "load_run",
    "render_html",
    "write_report",
]


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, for ``N`` scored impressions in any order.

    Args:
        ts: (N,) float, event time of each impression in epoch seconds.
        y: (N,) float, click label, 0 or 1.
        p: (N,) float, served (calibrated) P(click) in [0, 1].
        p_raw: (N,) float, the model's P(click) before calibration in [0, 1]; ``None`` if
            not recorded.
        true_p: (N,) float, the simulator's true P(click) in [0, 1], ``nan`` where unknown;
            ``None`` if not known at all.
        drift_ts: epoch seconds of the planted CTR shift, ``None`` when there is none.
        alarms: drift alarms, dicts with at least ``event_ts`` (epoch s); ``z`` and
            ``accepted`` are shown when present.
        recalibrations: accepted calibrator refits, dicts with ``event_ts`` (epoch s).
        title: heading of the report.

    Raises:
        ValueError: if the arrays are not 1-D of one length.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.uniform(0.01, 0.2, 2_000)
    >>> data = ReportData(ts=np.arange(2_000.0), y=(rng.random(2_000) < p).astype(float),
    ...                   p=p, p_raw=None, true_p=None, drift_ts=None, alarms=[],
    ...                   recalibrations=[])
    >>> page = render_html(data, n_points=50)
    >>> page.count("<img ")
    3
    """

    ts: np.ndarray
    y: np.ndarray
    p: np.ndarray
    p_raw: np.ndarray | None
    true_p: np.ndarray | None
    drift_ts: float | None
    alarms: list[dict[str, Any]] = field(default_factory=list)
    recalibrations: list[dict[str, Any]] = field(default_factory=list)
    title: str = "streamrec calibration report"

    def __post_init__(self) -> None:
        shape = np.shape(self.ts)
        if len(shape) != 1:
            raise ValueError(f"ts must be 1-D, got shape {shape}")
        for name in ("y", "p", "p_raw", "true_p"):
            arr = getattr(self, name)
            if arr is not None and np.shape(arr) != shape:
                raise ValueError(f"{name} must have shape {shape} like ts, got {np.shape(arr)}")


# --- numbers ------------------------------------------------------------------------------


def format_value(v: float | int | np.integer[Any]) -> str:
    """How the report prints a number: ints with thousands separators, floats to 4 decimals.

    >>> format_value(12345), format_value(0.123456), format_value(float("nan"))
    ('12,345', '0.1235', 'n/a')
    """
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if math.isnan(v):
        return "n/a"
    return f"{v:.4f}"


def _summary(data: ReportData, mask: npt.NDArray[np.bool_], n_bins: int) -> dict[str, float | int]:
    p = np.asarray(data.p, dtype=np.float64)[mask]
    y = np.asarray(data.y, dtype=np.float64)[mask]
    n = int(p.size)
    row: dict[str, float | int] = {
        "examples": n,
        "clicks": int(round(float(y.sum()))),
        "ctr": float(y.mean()) if n else math.nan,
        "mean_p": float(p.mean()) if n else math.nan,
        "auc": auc(p, y),
        "log_loss": log_loss(p, y),
        "ne": normalized_entropy(p, y),
        "ece": expected_calibration_error(p, y, n_bins=n_bins) if n else math.nan,
        "ratio": calibration_ratio(p, y),
    }
    if data.p_raw is not None:
        row["ratio_raw"] = calibration_ratio(np.asarray(data.p_raw, np.float64)[mask], y)
    if data.true_p is not None:
        tp = np.asarray(data.true_p, dtype=np.float64)[mask]
        known = np.isfinite(tp)
        tp_sum = float(tp[known].sum())
        row["ratio_true"] = float(p[known].sum()) / tp_sum if tp_sum > 0 else math.nan
    return row


def _summary_rows(n_bins: int) -> list[tuple[str, str]]:
    return [
        ("examples", "impressions scored"),
        ("clicks", "clicks"),
        ("ctr", "observed CTR (clicks / impressions)"),
        ("mean_p", "mean served P(click)"),
        ("auc", "AUC (progressive)"),
        ("log_loss", "log loss (nats)"),
        ("ne", "normalised entropy (< 1 beats the base rate)"),
        ("ece", f"ECE (equal-mass, {n_bins} bins)"),
        ("ratio", "calibration ratio Σp / Σy, served (1 = calibrated)"),
        ("ratio_raw", "calibration ratio Σp_raw / Σy, before calibration"),
        ("ratio_true", "Σp / Σtrue_p (known true_p only)"),
    ]


# --- HTML ---------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1150px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 0.6rem 0; }
th, td { padding: 0.25rem 0.8rem; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92rem; margin-top: 0.3rem; }
"""


def _fixed(v: float, digits: int) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(head: list[str], rows: list[list[str]], row_class: str | None = None) -> str:
    cls = f' class="{row_class}"' if row_class else ""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "\n".join(
        f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _summary_html(data: ReportData, n_bins: int) -> str:
    ts = np.asarray(data.ts, dtype=np.float64)
    columns = [("overall", np.ones(ts.size, dtype=bool))]
    if data.drift_ts is not None:
        before = ts < data.drift_ts
        columns += [("before drift", before), ("after drift", ~before)]
    stats = [_summary(data, mask, n_bins) for _, mask in columns]
    rows = [
        [label, *(format_value(st[key]) for st in stats)]
        for key, label in _summary_rows(n_bins)
        if key in stats[0]
    ]
    return _table(["metric", *(name for name, _ in columns)], rows)


def _events_html(data: ReportData, t0: float) -> str:
    if not data.alarms:
        return "<p>No drift alarms were raised.</p>"
    rows = []
    for e in data.alarms:
        ets = float(e.get("event_ts", math.nan))
        accepted = e.get("accepted")
        rows.append(
            [
                f"{(ets - t0) / 60.0:.1f}",
                _utc(ets) if math.isfinite(ets) else "n/a",
                _fixed(float(e.get("z", math.nan)), 2),
                "n/a" if accepted is None else ("accepted" if accepted else "rejected"),
                format_value(float(e.get("holdout_logloss_old", math.nan))),
                format_value(float(e.get("holdout_logloss_new", math.nan))),
            ]
        )
    head = [
        "minutes since first event",
        "event time",
        "z",
        "recalibration",
        "holdout log loss, old",
        "holdout log loss, new",
    ]
    return _table(head, rows, row_class="alarm")


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_html(b64: str, alt: str, caption: str) -> str:
    return (
        f'<figure>\n<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">\n'
        f"<figcaption>{html.escape(caption)}</figcaption>\n</figure>"
    )


def render_html(data: ReportData, *, n_points: int = 200, n_bins: int = 15) -> str:
    """The whole report as one self-contained HTML page (figures as base64 PNG, no JS).

    Args:
        data: the scored examples and events.
        n_points: number of rolling windows in the time-series figures (about).
        n_bins: equal-mass bins of the reliability diagram and the ECE.

    Raises:
        ValueError: if ``data`` holds no examples.
    """
    figs, s_window = figures_with_window(data, n_points, n_bins)
    ts = np.asarray(data.ts, dtype=np.float64)
    t0, t1 = float(ts.min()), float(ts.max())
    n_alarms, n_recal = len(data.alarms), len(data.recalibrations)
    identical = data.p_raw is not None and not distinct_raw(data)
    raw_note = (
        " Raw and served predictions are identical (no calibrator applied)." if identical else ""
    )
    markers = (
        "Dashed black line: planted drift; dotted red lines: drift alarms; green triangles "
        "on the top edge: accepted recalibrations."
    )
    drift_line = (
        f"planted drift at {_utc(data.drift_ts)} "
        f"({(data.drift_ts - t0) / 60.0:.1f} min after the first event)"
        if data.drift_ts is not None
        else "no planted drift"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(data.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(data.title)}</h1>",
        f'<p class="meta">{ts.size:,} scored impressions from {_utc(t0)} to {_utc(t1)} '
        f"({(t1 - t0) / 60.0:.1f} min of event time); {html.escape(drift_line)}; "
        f"{n_alarms} drift alarm(s), {n_recal} accepted recalibration(s).</p>",
        "<h2>Summary</h2>",
        _summary_html(data, n_bins),
        "<p>Scores are progressive (each impression scored before the model learned from "
        "it). A calibration ratio above 1 means the model over-predicts clicks.</p>",
        "<h2>Reliability</h2>",
        _figure_html(
            _png_base64(figs["reliability"]),
            f"Reliability diagram, {n_bins} equal-mass bins",
            "Each point is one bin of equally many impressions: its mean predicted P(click) "
            "against its observed click rate, with a 95% binomial interval. Points on the "
            "grey diagonal are calibrated; above it the model under-predicts." + raw_note,
        ),
        "<h2>Predicted vs actual CTR over time</h2>",
        _figure_html(
            _png_base64(figs["ctr_over_time"]),
            f"CTR over time with {n_alarms} drift alarm marker(s)",
            f"Each point averages {s_window:,} consecutive impressions in event order, "
            f"plotted at the window's middle. {markers}",
        ),
        "<h2>Calibration ratio over time</h2>",
        _figure_html(
            _png_base64(figs["ratio_over_time"]),
            f"Calibration ratio over time with {n_alarms} drift alarm marker(s)",
            f"Σp / Σy over the same windows; the shaded band is 1 ± {RATIO_BAND:.0%}. "
            f"Σp / Σtrue_p, when the simulator's true P(click) is known, shows calibration "
            f"without click noise. {markers}",
        ),
        "<h2>Drift alarms</h2>",
        _events_html(data, t0),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


# --- run directories ----------------------------------------------------------------------


def load_run(run_dir: str | Path) -> ReportData:
    """The :class:`ReportData` of a ``streamrec demo`` run directory (``report.json`` and
    ``scored.npz``).

    Alarms are the ``drift_alarm_events`` of kind ``"drift"`` (events without a kind count
    as drift alarms); recalibrations are those with ``accepted`` true. An all-``nan``
    ``true_p`` is treated as unknown.

    Raises:
        FileNotFoundError: naming whichever of the two input files is missing.
        ValueError: if ``report.json`` is not a JSON object, or ``scored.npz`` is not a
            readable array file holding ``ts``, ``y`` and ``p``.
    """
    run = Path(run_dir)
    report_path, scored_path = run / "report.json", run / "scored.npz"
    missing = [p.name for p in (report_path, scored_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot write a report for {run}: missing {' and '.join(missing)} "
            "(a run directory from `streamrec demo` holds report.json and scored.npz)"
        )
    try:
        report = json.loads(report_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{report_path} is not valid JSON ({exc})") from None
    if not isinstance(report, dict):
        raise ValueError(f"{report_path} holds a {type(report).__name__}, not a run's report")
    try:
        # allow_pickle stays off: a run directory may come from anywhere
        with np.load(scored_path) as npz:
            arrays = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        why = "not an .npz array file" if "pickle" in str(exc) else str(exc)
        raise ValueError(f"{scored_path} is not a readable scored.npz ({why})") from None
    lacking = [k for k in ("ts", "y", "p") if k not in arrays]
    if lacking:
        raise ValueError(f"{scored_path} lacks the array(s) {', '.join(lacking)}")
    true_p = arrays.get("true_p")
    if true_p is not None and not np.isfinite(true_p).any():
        true_p = None
    events = report.get("drift_alarm_events") or []
    alarms = [e for e in events if e.get("kind", "drift") == "drift"]
    drift_ts = report.get("drift_ts")
    return ReportData(
        ts=arrays["ts"],
        y=arrays["y"],
        p=arrays["p"],
        p_raw=arrays.get("p_raw"),
        true_p=true_p,
        drift_ts=None if drift_ts is None else float(drift_ts),
        alarms=alarms,
        recalibrations=_accepted_refits(report, alarms),
        title=f"streamrec calibration report: {run.resolve().name}",
    )


def _accepted_refits(report: dict[str, Any], alarms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The accepted refits of a run: its ``recalibration_events`` with decision
    ``"accepted"`` (one per ``streamrec_recalibrations_total`` count, periodic refits while
    tracking included); runs written before those records existed: the accepted alarms."""
    refits = report.get("recalibration_events")
    if refits is None:
        return [e for e in alarms if e.get("accepted")]
    return [e for e in refits if e.get("decision") == "accepted"]


def write_report(
    run_dir: str | Path, out: str | Path | None = None, *, png_dir: str | Path | None = None
) -> Path:
    """Render a ``streamrec demo`` run directory (see :func:`load_run`) to a report.

    Args:
        run_dir: a run directory written by ``streamrec demo``.
        out: where to write; default ``run_dir/report.html``. A name ending in ``.png``
            writes the figures stacked in one PNG image (:func:`render_png`) instead of the
            HTML page.
        png_dir: also write each figure as a PNG file into this folder
            (:func:`write_figures`).

    Returns:
        The path of the page (or image) written.

    Raises:
        FileNotFoundError: naming whichever of the two input files is missing.
        ValueError: if ``scored.npz`` lacks ``ts``, ``y`` or ``p``.
    """
    run = Path(run_dir)
    data = load_run(run)
    target = Path(out) if out is not None else run / "report.html"
    if target.suffix.lower() == ".png":
        target.write_bytes(render_png(data))
    else:
        target.write_text(render_html(data), encoding="utf-8")
    if png_dir is not None:
        write_figures(data, png_dir)
    return target
