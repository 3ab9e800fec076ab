"""Shared helpers of the OnlineJoiner tests: events at ``T0 + ts`` and compact outputs."""

from __future__ import annotations

from logs.events import Click, Impression, LabeledExample
from stream.join import OnlineJoiner

T0 = 1_700_000_000.0
W = 60.0


def imp(iid: str, ts: float) -> Impression:
    return Impression(iid, T0 + ts, "u", "i")


def click(iid: str, ts: float) -> Click:
    return Click(iid, T0 + ts)


def both(j: OnlineJoiner, ts: float) -> list[LabeledExample]:
    """Producer watermarks at ``T0 + ts`` on both inputs."""
    return j.on_watermark(T0 + ts, "impressions") + j.on_watermark(T0 + ts, "clicks")


def kinds(out: list[LabeledExample]) -> list[tuple[str, int, str]]:
    return [(e.impression.impression_id, e.label, e.kind) for e in out]
