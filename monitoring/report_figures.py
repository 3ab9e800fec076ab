"""The figures of the calibration report (:mod:`monitoring.report`): a reliability diagram,
predicted vs actual click-through rate over event time and the calibration ratio over event
time, each with the planted drift, the drift alarms and the accepted recalibrations marked.
:func:`build_figures` returns them as :class:`matplotlib.figure.Figure` objects,
:func:`render_png` stacks them into one PNG image and :func:`write_figures` writes one PNG
file per figure.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (Agg canvas, no
``pyplot``), so rendering touches no global matplotlib state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from monitoring.calibration import reliability_bins

if TYPE_CHECKING:
    # only for annotations: monitoring.report imports this module
    from monitoring.report import ReportData

__all__ = [
    "RATIO_BAND",
    "build_figures",
    "distinct_raw",
    "figures_with_window",
    "render_png",
    "write_figures",
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


# --- time series --------------------------------------------------------------------------


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


def distinct_raw(data: ReportData) -> bool:
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
    if distinct_raw(data):
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
    if data.p_raw is not None and distinct_raw(data):
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
    return figures_with_window(data, n_points, n_bins)[0]


def figures_with_window(
    data: ReportData, n_points: int, n_bins: int
) -> tuple[dict[str, Figure], int]:
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
