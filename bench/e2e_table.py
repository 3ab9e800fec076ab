"""The tables :mod:`bench.e2e` prints and writes to the README: the headline numbers of a
report (:func:`table`, with the profile's top costs from :func:`profile_table`) and the goal
line (:func:`goal_line`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["goal_line", "profile_table", "table"]


def _f(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float | int):
        return f"{v:,.{digits}f}"
    return str(v)


def table(report: dict[str, Any]) -> str:
    """Markdown table of the headline numbers (and the profile's top costs, if any)."""
    a, p, r = report["producer_alone"], report["pipeline"], report["ratios"]
    lat, lag = p["latency_s"], p["lag"]
    cpu = p["cpu_seconds"]
    rows = [
        ("impressions scored / replayed",
         f"{_f(p['scored_examples'])} / {_f(p['impressions'])}"
         + ("" if p.get("complete", True) else " (timed out waiting)")),
        ("pipeline impressions/s (first record -> last scored)", _f(p["impressions_per_s"])),
        ("pipeline steady impressions/s (10%-90% scored)", _f(p["steady_impressions_per_s"])),
        ("joiner ingest impressions/s (10%-90%)", _f(p["ingest_impressions_per_s"])),
        ("replay impressions/s while the worker runs", _f(p["replay_impressions_per_s"])),
        ("producer alone: events/s (records/s)",
         f"{_f(a['events_per_s'])} ({_f(a['records_per_s'])})"),
        ("plain aiokafka consume: records/s (impressions/s)",
         f"{_f(a['raw_consume']['records_per_s'])} ({_f(a['raw_consume']['impressions_per_s'])})"),
        ("aiokafka consume + decode: impressions/s",
         _f(a["consume_parse"]["impressions_per_s"])),
        ("pipeline / producer alone", _f(r["pipeline_over_producer_alone"], 3)),
        ("pipeline with single-event JSON records: impressions/s",
         _f((report.get("pipeline_json") or {}).get("impressions_per_s"))),
        ("envelopes / JSON records: pipeline, replay",
         f"{_f(r.get('envelope_over_json_pipeline'), 2)}, "
         f"{_f(r.get('envelope_over_json_replay'), 2)}"),
        ("pipeline / plain consume", _f(r["pipeline_over_raw_consume"], 3)),
        ("lag grows during replay (slope, events/s)",
         f"{_f(lag['grows'])} ({_f(lag['slope_events_per_s_during_replay'])})"),
        ("max lag (events)", _f(lag["max_events"])),
        ("replay end -> all scored (s)", _f(p["seconds_replay_end_to_all_scored"], 1)),
        ("click -> model update p50 / p99 (s, wall)",
         f"{_f(lat['click_to_update']['p50'], 2)} / {_f(lat['click_to_update']['p99'], 2)}"),
        ("impression -> model update p50 / p99 (s, wall)",
         f"{_f(lat['impression_to_update']['p50'], 2)} / "
         f"{_f(lat['impression_to_update']['p99'], 2)}"),
        ("label -> update p50 / p99 (s, histogram)",
         f"{_f(lat['label_to_update_histogram']['p50'], 3)} / "
         f"{_f(lat['label_to_update_histogram']['p99'], 3)}"),
        ("impression -> label p50 / p99 (s, event time, histogram)",
         f"{_f(lat['impression_to_label_event_time_histogram']['p50'])} / "
         f"{_f(lat['impression_to_label_event_time_histogram']['p99'])}"),
        ("CPU s: worker / broker / producer process",
         " / ".join(_f(v, 1) for v in cpu.values())),
    ]  # fmt: skip
    for key, label in (("scale_out", None), ("split", "joiner + trainer workers")):
        rows += _phase_rows(report, key, label)
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if report.get("profile"):
        lines += ["", profile_table(report["profile"])]
    return "\n".join(lines)


def _phase_rows(report: dict[str, Any], key: str, label: str | None) -> list[tuple[str, str]]:
    """Table rows of a multi-worker phase (``scale_out`` or ``split``), if it ran."""
    s = report.get(key)
    if not s:
        return []
    k = label or f"{s['workers']} workers"
    ratio = report["ratios"].get(f"{key}_over_one_worker")
    lat = s["latency_s"]["click_to_update"]
    fresh = s["latency_s"]["label_to_update_histogram"]
    return [
        (f"{k}: pipeline impressions/s (x one worker)",
         f"{_f(s['impressions_per_s'])} ({_f(ratio, 2)}x)"),
        (f"{k}: steady / joiner ingest impressions/s",
         f"{_f(s['steady_impressions_per_s'])} / {_f(s['ingest_impressions_per_s'])}"),
        (f"{k}: click -> model update p50 / p99 (s, wall)",
         f"{_f(lat['p50'], 2)} / {_f(lat['p99'], 2)}"),
        (f"{k}: label -> update p50 / p99 (s, histogram)",
         f"{_f(fresh['p50'], 3)} / {_f(fresh['p99'], 3)}"),
        (f"{k}: CPU s workers / broker / producer process",
         " / ".join(_f(v, 1) for v in s["cpu_seconds"].values())),
    ]  # fmt: skip


def profile_table(prof: dict[str, Any], k: int = 12) -> str:
    lines = [
        f"Worker profile (py-spy, {prof['samples']:,} samples at {prof['rate_hz']} Hz, busy "
        f"{_f(prof['busy_share_of_wall'], 2)} of wall; profiled run "
        f"{_f(prof.get('profiled_run_impressions_per_s'))} impressions/s):",
        "",
        "| top self frames | share | | library (leaf frame) | share |",
        "|---|---|---|---|---|",
    ]
    libs = prof["by_library_self"]
    for i, s in enumerate(prof["top_self"][:k]):
        lib = libs[i] if i < len(libs) else None
        lines.append(
            f"| `{s['frame']}` | {s['share']:.1%} | | "
            + (f"{lib['frame']} | {lib['share']:.1%} |" if lib else " | |")
        )
    return "\n".join(lines)


def goal_line(goal: dict[str, Any]) -> str:
    return (
        f"Goal: {goal['target']}. Measured: {goal['impressions_per_s']:,.0f} impressions/s "
        f"= {goal['ratio']:.2f}x the goal."
    )
