"""The summary, goal and table of :mod:`bench.calibration`: the learners it compares
(:data:`LEARNERS`), medians over seeds per learner and scenario (:func:`summarise`), the
issue #8 goal (:func:`goal`) and the markdown row per learner (:func:`table`,
:func:`goal_line`). Recoveries and delays are counted in impressions; ``None`` means the
learner never got there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "BANDS",
    "CONTINUOUS",
    "LEARNERS",
    "PEERS",
    "RAW",
    "RECAL",
    "goal",
    "goal_line",
    "summarise",
    "table",
]

RECAL = "streamrec (recalibrated)"
CONTINUOUS = "streamrec (continuous)"
RAW = "streamrec raw"
PEERS = ("river_logreg", "vw_logistic")
LEARNERS = (RECAL, CONTINUOUS, RAW, *PEERS)
BANDS = (0.10, 0.05)


def _median(values: list[int | None]) -> float | None:
    """Median with None as +inf; None when the median itself is infinite."""
    if not values:
        return None
    x = np.array([math.inf if v is None else v for v in values], dtype=float)
    med = float(np.quantile(x, 0.5, method="higher"))
    return med if math.isfinite(med) else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per learner: medians over seeds per scenario, false alarms over every pre-drift part."""
    summary: dict[str, dict[str, Any]] = {}
    for name in LEARNERS:
        rows = [(r["scenario"], r["learners"][name]) for r in runs]
        alarms = sum(m["alarms_before_drift"] for _, m in rows)
        monitored = sum(m["monitored_before_drift"] for _, m in rows)
        s: dict[str, Any] = {
            "false_alarms": alarms,
            "monitored_impressions": monitored,
            "false_alarms_per_million": alarms / monitored * 1e6 if monitored else None,
        }
        nd = [m for sc, m in rows if sc == "no_drift"]
        if nd:
            s["no_drift_max_abs_dev"] = max(m["max_abs_dev_before_drift"] or 0.0 for m in nd)
            for band in BANDS:
                key = f"share_within_{round(band * 100)}_before_drift"
                s[f"no_drift_{key.removesuffix('_before_drift')}"] = float(
                    np.mean([m[key] for m in nd])
                )
        for scenario in ("abrupt", "gradual"):
            ms = [m for sc, m in rows if sc == scenario]
            if not ms:
                continue
            block: dict[str, Any] = {"seeds": len(ms)}
            for key in ("detection_delay", "recovery_10", "recovery_5"):
                block[key] = [m[key] for m in ms]
                block[f"{key}_median"] = _median(block[key])
            for key in ("ratio_after", "ratio_after_second_half", "log_loss_after"):
                block[f"{key}_mean"] = float(np.mean([m[key] for m in ms]))
            devs = [m["max_abs_dev_from_30k"] for m in ms if m["max_abs_dev_from_30k"] is not None]
            block["max_abs_dev_from_30k"] = max(devs) if devs else None
            s[scenario] = block
        summary[name] = s
    return summary


def goal(summary: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Median abrupt recovery within ±10% of streamrec (recalibrated) vs the fastest peer."""
    if "abrupt" not in summary[RECAL]:
        return None
    inf = math.inf

    def rec(name: str) -> float:
        v = summary[name]["abrupt"]["recovery_10_median"]
        return inf if v is None else float(v)

    ours = rec(RECAL)
    fastest = min(PEERS, key=rec)
    return {
        "target": "streamrec (recalibrated) back within ±10% of true_p and staying there in "
        "fewer impressions than the fastest peer (median over the abrupt seeds)",
        "streamrec_recovery_10": None if ours == inf else ours,
        "fastest_peer": fastest,
        "fastest_peer_recovery_10": None if rec(fastest) == inf else rec(fastest),
        "met": ours < rec(fastest),
    }


def _n(x: float | int | None) -> str:
    return "never" if x is None else f"{x:,.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _seeds(xs: list[int | None]) -> str:
    return ", ".join(_n(x) for x in xs)


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per learner."""
    head = (
        "| learner | detection delay, abrupt (per seed) | back within ±10%, abrupt (per seed)"
        " | back within ±5%, abrupt (per seed) | back within ±10% / ±5%, gradual"
        " | Σp/Σtrue_p after drift, 2nd half | max dev from +30k | false alarms / M (count)"
        " | no drift: share within ±5% | log loss after drift |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, s in report["learners"].items():
        ab, gr = s.get("abrupt"), s.get("gradual")

        def cell(block: dict[str, Any] | None, key: str) -> str:
            if block is None:
                return "-"
            return f"{_n(block[f'{key}_median'])} ({_seeds(block[key])})"

        gradual = (
            "-" if gr is None else f"{_n(gr['recovery_10_median'])} / {_n(gr['recovery_5_median'])}"
        )
        fa = s["false_alarms_per_million"]
        dev = None if ab is None else ab["max_abs_dev_from_30k"]
        lines.append(
            f"| {name} | {cell(ab, 'detection_delay')} | {cell(ab, 'recovery_10')} "
            f"| {cell(ab, 'recovery_5')} | {gradual} "
            f"| {'-' if ab is None else format(ab['ratio_after_second_half_mean'], '.3f')} "
            f"| {'-' if dev is None else format(dev, '.3f')} "
            f"| {'-' if fa is None else format(fa, '.1f')} ({s['false_alarms']}) "
            f"| {_pct(s.get('no_drift_share_within_5'))} "
            f"| {'-' if ab is None else format(ab['log_loss_after_mean'], '.5f')} |"
        )
    return "\n".join(lines)


def goal_line(g: dict[str, Any]) -> str:
    return (
        f"Goal: {g['target']}. Measured: streamrec {_n(g['streamrec_recovery_10'])} vs "
        f"{g['fastest_peer']} {_n(g['fastest_peer_recovery_10'])} impressions "
        f"({'met' if g['met'] else 'not met'})."
    )
