"""Replay an impression log into Kafka in event-time order.

Each log row gives one ``impressions`` record at ``ts`` and, when clicked, one ``clicks``
record at ``click_ts``; both are keyed by user_id (so they are co-partitioned, and so is
the user's feature state; clicks carry the ``user_id``).
With ``fmt="envelope"`` (the default) the events travel in batched envelopes, one per
partition every few milliseconds (:class:`stream.producer.EventProducer`), partitioned
exactly as single-event records with the same key would be; ``fmt="json"`` sends one JSON
record per event (what a third-party producer does).
The two streams are merged by event time (an impression before a click at equal times).
Every ``watermark_every`` events and at the end, a :class:`~logs.events.Watermark` goes to
every partition of both topics; the final one is past the last event time by the join
window plus lateness, so the joiner can label every impression.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from logs.events import (
    MIN_TS,
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    InvalidEvent,
    Watermark,
    input_from_obj,
)
from logs.io import log_impressions, read_log_frame
from logs.log_format import LogFormatError

log = logging.getLogger(__name__)

#: Values of ``replay(fmt=...)``.
REPLAY_FORMATS = ("envelope", "json")


@dataclass
class ReplayStats:
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    watermarks: int = 0
    records: int = 0  # Kafka records sent (envelopes count once, watermarks per partition)
    seconds: float = 0.0
    first_ts: float = math.nan
    last_ts: float = math.nan

    @property
    def events_per_s(self) -> float:
        events = self.impressions + self.clicks + self.conversions
        return events / self.seconds if self.seconds > 0 else math.nan


#: event kinds of :func:`event_order` (with ``conversions``)
IMPRESSION, CLICK, CONVERSION = 0, 1, 2


def event_order(
    df: pd.DataFrame, *, conversions: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merged event-time order: arrays (event ts, row index, kind) sorted stably, kind
    :data:`IMPRESSION` (0) or :data:`CLICK` (1) as a bool ``is_click``; with
    ``conversions`` and a log with a ``conversion`` column, also :data:`CONVERSION` (2)
    events at ``conversion_ts`` (kind then int8). At equal times impressions go first,
    then clicks, then conversions."""
    n = len(df)
    ts = df["ts"].to_numpy(dtype=np.float64)
    clicked = df["click"].to_numpy() == 1
    click_ts = df["click_ts"].to_numpy(dtype=np.float64)
    click_rows = np.flatnonzero(clicked & np.isfinite(click_ts))
    parts_ts = [ts, click_ts[click_rows]]
    parts_row = [np.arange(n), click_rows]
    parts_kind = [np.zeros(n, np.int8), np.ones(len(click_rows), np.int8)]
    if conversions and "conversion" in df.columns:
        conv_ts = df["conversion_ts"].to_numpy(dtype=np.float64)
        conv_rows = np.flatnonzero((df["conversion"].to_numpy() == 1) & np.isfinite(conv_ts))
        parts_ts.append(conv_ts[conv_rows])
        parts_row.append(conv_rows)
        parts_kind.append(np.full(len(conv_rows), CONVERSION, np.int8))
    ev_ts, ev_row, ev_kind = map(np.concatenate, (parts_ts, parts_row, parts_kind))
    order = np.lexsort((ev_kind, ev_ts))  # by time, impressions first at ties
    kind = ev_kind[order]
    return ev_ts[order], ev_row[order], (kind if len(parts_kind) > 2 else kind.astype(bool))


def check_replayable(
    df: pd.DataFrame,
    source: str | Path,
    *,
    final_watermark_gap_s: float,
    max_future_skew_s: float = 300.0,
    now: float | None = None,
) -> None:
    """Refuse, before anything is sent, a log whose events a worker would refuse: it
    dead-letters every event time before 1990-01-01 (``bad_timestamp``: relative seconds)
    and every event or watermark more than ``max_future_skew_s`` ahead of its clock
    (``future_ts``). Replayed anyway, such a log is labelled partly or not at all, and
    ``streamrec demo`` waits for labels that never come. The final watermark is the last
    event time plus ``final_watermark_gap_s``, so a log that ended less than that long ago
    cannot be replayed whole yet (its last impressions would never be labelled).

    Every other check of the worker's (id lengths, feature counts and names, ...) runs on
    a sample of :data:`CHECK_SAMPLE` impressions (the first, the last and random ones): a
    log the worker would refuse in at least half of the sample is refused, naming the first
    refused row and the reason; a smaller share is a warning (those rows become dead
    letters with their reasons, as in production). A full check would cost ~5 µs a row.

    A log with a second outcome (``conversion``) is replayed with it: its conversions go
    to ``clicks`` as conversion records (:class:`logs.events.Click`), at ``conversion_ts``.

    ``df``: a log in normal form (:func:`logs.io.read_log_frame`); ``now``: epoch seconds
    (default: this machine's clock). Raises :class:`~logs.log_format.LogFormatError`."""
    if df.empty:
        return
    ts = df["ts"].to_numpy(dtype=np.float64)
    if ts[0] < MIN_TS:
        raise LogFormatError(
            f"{source}: ts {float(ts[0])!r} (row 1) is before 1990-01-01 as epoch seconds; a "
            "worker refuses such event times (bad_timestamp: relative seconds are not event "
            "times). Add an epoch offset to ts and click_ts (e.g. the time the log starts) "
            "before replaying; `streamrec evaluate` reads the log as it is"
        )
    click_ts = df["click_ts"].to_numpy(dtype=np.float64)
    last = max(float(ts[-1]), float(np.nanmax(click_ts)) if np.isfinite(click_ts).any() else -1.0)
    now = time.time() if now is None else now
    final = last + final_watermark_gap_s
    if final > now + max_future_skew_s:
        ahead = final - now
        raise LogFormatError(
            f"{source}: the log's last event is at {last!r} epoch s, {last - now:+,.0f} s from "
            f"this clock; the final watermark (last event + {final_watermark_gap_s:,.0f} s, so "
            f"that every impression's window closes) would be {ahead:,.0f} s ahead of it, and "
            f"a worker refuses event times more than max_future_skew_s = "
            f"{max_future_skew_s:g} s ahead (future_ts): the log's last impressions would never "
            "be labelled. Replay it once the clock has passed the final watermark, or set "
            "max_future_skew_s = inf in the config of the worker and of the replay"
        )
    _check_sample(df, source)


#: impressions of a log that :func:`check_replayable` runs through the worker's validation
CHECK_SAMPLE = 1_000


def _check_sample(df: pd.DataFrame, source: str | Path) -> None:
    n = len(df)
    rows = np.arange(n)
    if n > CHECK_SAMPLE:
        rng = np.random.default_rng(0)
        rows = np.unique(np.r_[0, n - 1, rng.choice(n, CHECK_SAMPLE - 2, replace=False)])
    refused: list[tuple[int, str]] = []
    for row, imp in zip(rows.tolist(), log_impressions(df.iloc[rows]), strict=True):
        try:
            input_from_obj(imp.to_dict(), TOPIC_IMPRESSIONS)
        except InvalidEvent as exc:
            refused.append((row, f"{exc.reason}: {exc.detail}"))
    if not refused:
        return
    row, why = refused[0]
    msg = (
        f"{source}: a worker would refuse {len(refused):,} of {len(rows):,} impressions "
        f"checked (row {row + 1}: {why})"
    )
    if 2 * len(refused) >= len(rows):
        raise LogFormatError(msg + "; fix the log before replaying it")
    log.warning("%s; they will be dead-lettered with their reasons", msg)


def replay(
    log_path: str | Path,
    bootstrap: str,
    *,
    speedup: float | None = None,
    watermark_every: int = 2000,
    final_watermark_gap_s: float = 1860.0,
    limit: int | None = None,
    progress: bool = True,
    on_progress: Callable[[int], None] | None = None,
    fmt: str = "envelope",
    client_options: Mapping[str, Any] | None = None,
    max_future_skew_s: float = 300.0,
    frame: pd.DataFrame | None = None,
) -> ReplayStats:
    """Publish a canonical log to ``impressions`` and ``clicks``.

    Args:
        log_path: a canonical log (CSV, CSV.gz, JSONL or Parquet).
        bootstrap: Kafka bootstrap ``host:port[,...]``.
        speedup: event-time seconds per wall second; None replays as fast as possible.
        watermark_every: send watermarks to every partition after this many events.
        final_watermark_gap_s: the final watermark is ``last_ts`` plus this (set it to at
            least the join window + lateness so that every impression gets labelled).
        limit: replay only the first ``limit`` rows.
        fmt: ``"envelope"`` (batched envelopes, see :mod:`stream.envelope`) or ``"json"``
            (one JSON record per event).
        max_future_skew_s: the workers' ``Settings.max_future_skew_s``: a log they would
            refuse is refused here first (:func:`check_replayable`).
        frame: the log already read by :func:`logs.io.read_log_frame` (it is then not read
            again from ``log_path``, which only names it in messages).
    """
    from kafka import KafkaProducer
    from tqdm import tqdm

    from stream.producer import EventProducer

    if fmt not in REPLAY_FORMATS:
        raise ValueError(f"fmt must be one of {REPLAY_FORMATS}, got {fmt!r}")
    df = read_log_frame(log_path) if frame is None else frame
    if limit is not None:
        df = df.iloc[:limit].reset_index(drop=True)
    check_replayable(
        df, log_path, final_watermark_gap_s=final_watermark_gap_s,
        max_future_skew_s=max_future_skew_s,
    )  # fmt: skip
    stats = ReplayStats()
    if df.empty:
        log.warning("%s has no rows; nothing to replay", log_path)
        return stats
    imps = log_impressions(df)
    ids = df["impression_id"].to_numpy(dtype=object)
    users = df["user_id"].to_numpy(dtype=object)
    ev_ts, ev_row, ev_kind = event_order(df, conversions=True)
    # acks=1 (at-least-once; Tansu has no transactions): kafka-python >= 2.1 defaults to an
    # idempotent producer and warns at the user that acks=1 turns it off; say so instead
    no_idempotence = (
        {"enable_idempotence": False}
        if "enable_idempotence" in KafkaProducer.DEFAULT_CONFIG
        else {}
    )
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split("://", 1)[-1].split(","),
        client_id="streamrec-replay",
        **no_idempotence,
        acks=1,
        linger_ms=20,
        batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        **(client_options or {}),  # SASL (Settings.kafka_client_options)
    )
    try:
        parts = {
            t: sorted(producer.partitions_for(t) or []) for t in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)
        }
        for t, p in parts.items():
            if not p:
                raise RuntimeError(f"topic {t!r} does not exist on {bootstrap}; create it first")

        events = EventProducer(producer, key_field="user_id")

        def watermark(ts: float) -> None:
            events.send_pending()  # the watermark follows the events it covers
            wm = Watermark(ts).to_json()
            for t, ps in parts.items():
                for p in ps:
                    producer.send(t, value=wm, partition=p)
                    stats.records += 1
            stats.watermarks += 1

        t0 = time.monotonic()
        ts0 = float(ev_ts[0])
        stats.first_ts = ts0
        bar = tqdm(total=len(ev_ts), unit="ev", disable=not progress, desc="replay")
        for k, (ts, row, kind) in enumerate(_iter(ev_ts, ev_row, ev_kind)):
            if speedup:
                delay = (ts - ts0) / speedup - (time.monotonic() - t0)
                if delay > 0:
                    events.send_pending()  # what is due leaves now, not after the sleep
                    time.sleep(delay)
            if fmt == "envelope":
                if kind == IMPRESSION:
                    events.send_impression(imps[row].to_dict())
                else:
                    event = {"impression_id": str(ids[row]), "ts": ts, "user_id": str(users[row])}
                    if kind == CONVERSION:
                        event["type"] = "conversion"
                    events.send_click(event)
            else:
                key = str(users[row]).encode()
                if kind == IMPRESSION:
                    producer.send(TOPIC_IMPRESSIONS, key=key, value=imps[row].to_json())
                else:
                    click = Click(str(ids[row]), ts, str(users[row]), kind == CONVERSION)
                    producer.send(TOPIC_CLICKS, key=key, value=click.to_json())
                stats.records += 1
            if kind == IMPRESSION:
                stats.impressions += 1
            elif kind == CLICK:
                stats.clicks += 1
            else:
                stats.conversions += 1
            if (k + 1) % watermark_every == 0:
                watermark(ts)
            if (k + 1) % 1000 == 0:
                bar.update(1000)
                if on_progress:
                    on_progress(k + 1)
        stats.last_ts = float(ev_ts[-1])
        watermark(stats.last_ts + final_watermark_gap_s)
        events.flush()
        stats.records += events.envelopes
        bar.update(len(ev_ts) % 1000)
        bar.close()
        stats.seconds = time.monotonic() - t0
    finally:
        producer.close(timeout=10)
    return stats


def _iter(
    ev_ts: np.ndarray, ev_row: np.ndarray, ev_kind: np.ndarray
) -> Iterator[tuple[float, int, int]]:
    return zip(ev_ts.tolist(), ev_row.tolist(), ev_kind.astype(np.int8).tolist(), strict=True)
