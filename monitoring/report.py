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
:func:`render_png` and :func:`write_figures` give the figures as PNG images instead (one
stacked image, or one file per figure), e.g. ``streamrec report RUN --out report.png``.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (Agg canvas, no
``pyplot``), so rendering touches no global matplotlib state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from monitoring.calibration import (
    auc,
    calibration_ratio,
    expected_calibration_error,
    log_loss,
    normalized_entropy,
    reliability_bins,
)

__all__ = [
    "ReportData",
    "build_figures",
    "format_value",
    "load_run",
    "render_html",
    "render_png",
    "write_figures",
    "write_report",
]

FloatArray = npt.NDArray[np.float64]

RATIO_BAND = 0.10
"""Half-width of the shaded "calibrated" band around a calibration ratio of 1."""

_CLICKS_PER_WINDOW = 300
"""Target clicks per time-series window: ~6% relative noise on a windowed ratio."""

_RATIO_AXIS_MAX = 3.0
"""Upper limit of the calibration-ratio axis; larger windowed ratios run off the top."""

_COLORS = {
    "p": "#1f77b4",
    "y": "#222222",
    "true_p": "#2ca02c",
    "p_raw": "#ff7f0e",
    "drift": "#000000",
    "alarm": "#d62728",
    "recal": "#2ca02c",
}


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


@dataclass(frozen=True)
class _Series:
    """Windowed means in event order; ``x`` in minutes since the first event."""

    x: FloatArray
    window: int
    mean: dict[str, FloatArray]
    ratio: dict[str, FloatArray]


def _window_size(n: int, ctr: float, n_points: int) -> int:
    lower = max(math.ceil(n / max(n_points, 1)), n // 50, 1)
    upper = max(n // 4, lower)
    target = math.ceil(_CLICKS_PER_WINDOW / ctr) if ctr > 0 else upper
    return int(min(max(target, lower), upper))


def _windowed(
    values: FloatArray, starts: npt.NDArray[np.intp], ends: npt.NDArray[np.intp]
) -> tuple[FloatArray, FloatArray]:
    """Per-window (sum over finite values, count of finite values) via cumulative sums."""
    finite = np.isfinite(values)
    cs = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    cn = np.concatenate([[0], np.cumsum(finite)])
    return cs[ends] - cs[starts], (cn[ends] - cn[starts]).astype(np.float64)


def _distinct_raw(data: ReportData) -> bool:
    """Whether ``p_raw`` is given and differs from ``p`` (else it is not drawn).

    An identity calibrator can still change the last bits, hence the tolerance.
    """
    return data.p_raw is not None and not np.allclose(data.p_raw, data.p, rtol=1e-9, atol=1e-12)


def _series(data: ReportData, n_points: int) -> _Series:
    order = np.argsort(np.asarray(data.ts, dtype=np.float64), kind="stable")
    ts = np.asarray(data.ts, dtype=np.float64)[order]
    y = np.asarray(data.y, dtype=np.float64)[order]
    n = ts.size
    w = _window_size(n, float(y.mean()), n_points)
    ends = np.unique(np.linspace(w, n, num=max(1, min(n_points, n - w + 1))).astype(np.intp))
    starts = ends - w
    x = (ts[(starts + ends - 1) // 2] - ts[0]) / 60.0

    columns: dict[str, FloatArray] = {"y": y, "p": np.asarray(data.p, dtype=np.float64)[order]}
    if _distinct_raw(data):
        columns["p_raw"] = np.asarray(data.p_raw, dtype=np.float64)[order]
    if data.true_p is not None and np.isfinite(data.true_p).any():
        columns["true_p"] = np.asarray(data.true_p, dtype=np.float64)[order]

    sums = {k: _windowed(v, starts, ends) for k, v in columns.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = {k: np.where(c > 0, s / c, np.nan) for k, (s, c) in sums.items()}
        sum_y = sums["y"][0]
        ratio: dict[str, FloatArray] = {
            k: np.where(sum_y > 0, sums[k][0] / sum_y, np.nan) for k in ("p", "p_raw") if k in sums
        }
        if "true_p" in sums:
            # Over the impressions with a known true_p only, so both sums cover the same rows.
            known = np.isfinite(columns["true_p"])
            p_known = np.where(known, columns["p"], np.nan)
            sp, _ = _windowed(p_known, starts, ends)
            st = sums["true_p"][0]
            ratio["true_p"] = np.where(st > 0, sp / st, np.nan)
    return _Series(x=x, window=w, mean=mean, ratio=ratio)


# --- figures ------------------------------------------------------------------------------


def _event_minutes(events: Sequence[dict[str, Any]], t0: float) -> list[float]:
    return [(float(e["event_ts"]) - t0) / 60.0 for e in events if "event_ts" in e]


def _mark_events(ax: Axes, data: ReportData, t0: float) -> list[Line2D | Patch]:
    """Vertical markers for drift, alarms and recalibrations; returns legend handles."""
    handles: list[Line2D | Patch] = []
    if data.drift_ts is not None:
        ax.axvline(
            (data.drift_ts - t0) / 60.0, color=_COLORS["drift"], ls="--", lw=1.6, gid="drift"
        )
        handles.append(
            Line2D([], [], color=_COLORS["drift"], ls="--", lw=1.6, label="planted drift")
        )
    alarm_x = _event_minutes(data.alarms, t0)
    for x in alarm_x:
        ax.axvline(x, color=_COLORS["alarm"], ls=":", lw=1.4, gid="alarm")
    if alarm_x:
        handles.append(
            Line2D(
                [],
                [],
                color=_COLORS["alarm"],
                ls=":",
                lw=1.4,
                label=f"drift alarm ({len(alarm_x)})",
            )
        )
    recal_x = _event_minutes(data.recalibrations, t0)
    for x in recal_x:
        # A triangle on the top edge: a recalibration usually shares its alarm's time.
        ax.plot(
            [x],
            [1.0],
            marker="v",
            ms=9,
            color=_COLORS["recal"],
            ls="none",
            clip_on=False,
            transform=ax.get_xaxis_transform(),
            gid="recalibration",
        )
    if recal_x:
        handles.append(
            Line2D(
                [],
                [],
                marker="v",
                ms=9,
                color=_COLORS["recal"],
                ls="none",
                label=f"recalibration accepted ({len(recal_x)})",
            )
        )
    return handles


def _reliability_figure(data: ReportData, n_bins: int) -> Figure:
    fig = Figure(figsize=(6.4, 5.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    hi = 0.0
    curves: list[tuple[str, np.ndarray, str, str]] = [
        ("served p (95% interval)", data.p, _COLORS["p"], "o")
    ]
    if data.p_raw is not None and _distinct_raw(data):
        curves.append(("raw p (before calibration)", data.p_raw, _COLORS["p_raw"], "s"))
    for label, p, color, marker in curves:
        bins = reliability_bins(p, data.y, n_bins=n_bins)
        mp = np.array([b[0] for b in bins])
        my = np.array([b[1] for b in bins])
        cnt = np.array([b[2] for b in bins], dtype=np.float64)
        served = marker == "o"
        # 95% binomial interval of the observed rate, so noise is not read as miscalibration
        # (served curve only: two sets of bars overlap into clutter).
        err = 1.96 * np.sqrt(np.clip(my * (1 - my), 1e-12, None) / cnt) if served else 0 * my
        ax.errorbar(
            mp,
            my,
            yerr=err if served else None,
            color=color,
            marker=marker,
            ms=5,
            lw=1.3,
            capsize=2,
            ls="-" if served else "--",
            label=label,
        )
        hi = max(hi, float(mp.max()), float((my + err).max()))
    hi = min(1.0, hi * 1.08) if hi > 0 else 1.0
    ax.plot([0, hi], [0, hi], color="#888888", lw=1, ls="-", label="perfect calibration")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted P(click) in bin (probability)")
    ax.set_ylabel("observed click rate in bin (clicks / impressions)")
    ax.set_title(f"Reliability diagram ({n_bins} equal-mass bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return fig


def _time_figure(data: ReportData, s: _Series, t0: float) -> Figure:
    fig = Figure(figsize=(11, 4.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    lines = [
        ("y", "observed CTR (mean y)", "-", 2.0),
        ("p", "predicted CTR (mean served p)", "-", 1.6),
        ("true_p", "true CTR (mean true_p)", "-", 1.2),
        ("p_raw", "raw predicted CTR (mean p_raw)", "--", 1.2),
    ]
    for key, label, ls, lw in lines:
        if key in s.mean:
            ax.plot(s.x, s.mean[key], color=_COLORS[key], ls=ls, lw=lw, label=label)
    handles, _ = ax.get_legend_handles_labels()
    handles += _mark_events(ax, data, t0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("event time (minutes since the first event)")
    ax.set_ylabel("click-through rate (clicks / impressions)")
    ax.set_title(f"Predicted vs actual CTR over time (rolling {s.window:,} impressions)", pad=14)
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    return fig


def _ratio_figure(data: ReportData, s: _Series, t0: float) -> Figure:
    fig = Figure(figsize=(11, 4.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    band = ax.axhspan(1 - RATIO_BAND, 1 + RATIO_BAND, color="#2ca02c", alpha=0.12, lw=0)
    band.set_label(f"±{RATIO_BAND:.0%} band")
    ax.axhline(1.0, color="#888888", lw=1)
    lines = [
        ("p", "served Σp / Σy", "-", 1.8),
        ("p_raw", "raw Σp_raw / Σy", "--", 1.2),
        ("true_p", "served Σp / Σtrue_p (noise-free)", "-", 1.2),
    ]
    finite: list[FloatArray] = []
    for key, label, ls, lw in lines:
        if key in s.ratio:
            color = _COLORS["true_p"] if key == "true_p" else _COLORS[key]
            ax.plot(s.x, s.ratio[key], color=color, ls=ls, lw=lw, label=label)
            finite.append(s.ratio[key][np.isfinite(s.ratio[key])])
    handles, _ = ax.get_legend_handles_labels()
    handles += _mark_events(ax, data, t0)
    values = np.concatenate(finite) if finite else np.empty(0)
    # Windows with very few clicks can give huge ratios; cap the axis to keep the band legible.
    top = float(values.max()) if values.size else 1.5
    bottom = float(values.min()) if values.size else 0.5
    ax.set_ylim(
        max(0.0, min(bottom, 1 - 2 * RATIO_BAND) * 0.95),
        min(_RATIO_AXIS_MAX, max(top, 1 + 2 * RATIO_BAND) * 1.05),
    )
    ax.set_xlabel("event time (minutes since the first event)")
    ax.set_ylabel("calibration ratio (predicted / actual clicks)")
    ax.set_title(
        f"Calibration ratio over time (rolling {s.window:,} impressions; 1 = calibrated)",
        pad=14,
    )
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    return fig


def build_figures(data: ReportData, *, n_points: int = 200, n_bins: int = 15) -> dict[str, Figure]:
    """The report's figures: ``reliability``, ``ctr_over_time`` and ``ratio_over_time``.

    Time-series points average ``W`` consecutive impressions in event order (``W`` chosen
    for about 300 clicks per window, between ``N / n_points`` and ``N / 4``), plotted at the
    window's middle; ``n_points`` is the number of windows (fewer for tiny inputs). Markers
    carry ``gid`` ``"drift"``, ``"alarm"`` (one per alarm) and ``"recalibration"``.

    Raises:
        ValueError: if ``data`` holds no examples.
    """
    return _figures(data, n_points, n_bins)[0]


def _figures(data: ReportData, n_points: int, n_bins: int) -> tuple[dict[str, Figure], int]:
    """The figures and the time-series window size in impressions."""
    if np.size(data.ts) == 0:
        raise ValueError("no scored examples to report on")
    t0 = float(np.min(data.ts))
    s = _series(data, n_points)
    figs = {
        "reliability": _reliability_figure(data, n_bins),
        "ctr_over_time": _time_figure(data, s, t0),
        "ratio_over_time": _ratio_figure(data, s, t0),
    }
    return figs, s.window


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
    figs, s_window = _figures(data, n_points, n_bins)
    ts = np.asarray(data.ts, dtype=np.float64)
    t0, t1 = float(ts.min()), float(ts.max())
    n_alarms, n_recal = len(data.alarms), len(data.recalibrations)
    identical = data.p_raw is not None and not _distinct_raw(data)
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


def _figure_pixels(fig: Figure, dpi: int) -> FloatArray:
    """The figure rendered as an RGBA array (H, W, 4) of floats in [0, 1]."""
    from matplotlib.image import imread

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return np.asarray(imread(buf, format="png"), dtype=np.float64)


def render_png(data: ReportData, *, n_points: int = 200, n_bins: int = 15, dpi: int = 100) -> bytes:
    """The report's figures (reliability, CTR over time, ratio over time) stacked top to
    bottom in one PNG image on a white background.

    Raises:
        ValueError: if ``data`` holds no examples.
    """
    from matplotlib.image import imsave

    images = [_figure_pixels(fig, dpi) for fig in build_figures(data, n_points=n_points,
                                                               n_bins=n_bins).values()]  # fmt: skip
    width = max(img.shape[1] for img in images)
    padded = []
    for img in images:
        canvas = np.ones((img.shape[0], width, 4))
        canvas[:, : img.shape[1]] = img
        padded.append(canvas)
    buf = io.BytesIO()
    imsave(buf, np.concatenate(padded, axis=0), format="png")
    return buf.getvalue()


def write_figures(
    data: ReportData,
    directory: str | Path,
    *,
    n_points: int = 200,
    n_bins: int = 15,
    dpi: int = 100,
) -> list[Path]:
    """Write each figure as ``<directory>/<name>.png`` (``reliability``, ``ctr_over_time``,
    ``ratio_over_time``); the paths, in that order."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in build_figures(data, n_points=n_points, n_bins=n_bins).items():
        path = out / f"{name}.png"
        fig.savefig(path, format="png", dpi=dpi)
        paths.append(path)
    return paths


def load_run(run_dir: str | Path) -> ReportData:
    """The :class:`ReportData` of a ``streamrec demo`` run directory (``report.json`` and
    ``scored.npz``).

    Alarms are the ``drift_alarm_events`` of kind ``"drift"`` (events without a kind count
    as drift alarms); recalibrations are those with ``accepted`` true. An all-``nan``
    ``true_p`` is treated as unknown.

    Raises:
        FileNotFoundError: naming whichever of the two input files is missing.
        ValueError: if ``scored.npz`` lacks ``ts``, ``y`` or ``p``.
    """
    run = Path(run_dir)
    report_path, scored_path = run / "report.json", run / "scored.npz"
    missing = [p.name for p in (report_path, scored_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot write a report for {run}: missing {' and '.join(missing)} "
            "(a run directory from `streamrec demo` holds report.json and scored.npz)"
        )
    report = json.loads(report_path.read_text())
    with np.load(scored_path) as npz:
        arrays = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
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
