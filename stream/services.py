"""The worker's stages as plain objects; the Faust agents in :mod:`stream.app` are thin
wrappers that move bytes between topics and these objects. Everything here is testable
without Kafka.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.faiss_index import IndexHolder, build_snapshot
from index.hard_negatives import HardNegativePool
from learners.calibration import (
    Calibrator,
    PlattCalibrator,
    calibrator_from_dict,
    fit_if_better,
)
from learners.ranker import TorchRanker
from monitoring.calibration import CalibrationWindow
from monitoring.drift import CalibrationDriftDetector, DriftDetector, make_detector
from monitoring.metrics import StreamrecMetrics
from stream.events import (
    TOPIC_CLICKS,
    Click,
    DeadLetter,
    Impression,
    InvalidEvent,
    LabeledExample,
    ScoredBatch,
    Watermark,
    example_row,
    parse_input,
)
from stream.join import OnlineJoiner
from stream.settings import Settings

log = logging.getLogger(__name__)


def segment_of(position: int | None) -> str:
    """Bounded segment label: the slate position 1..9, ``10+`` or ``unknown``."""
    if position is None:
        return "unknown"
    return str(position) if position < 10 else "10+"


class JoinService:
    """One :class:`OnlineJoiner` per input partition; counts into the metrics."""

    def __init__(self, settings: Settings, metrics: StreamrecMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.joiners: dict[int, OnlineJoiner] = {}
        self._released_to = float("-inf")
        self.offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset

    def joiner(self, partition: int) -> OnlineJoiner:
        j = self.joiners.get(partition)
        if j is None:
            j = self.joiners[partition] = OnlineJoiner(self.settings.join)
            j.limit = self._released_to
        return j

    def _release(self) -> list[LabeledExample]:
        """Advance every partition to the minimum watermark of all of them (partitions idle
        longer than ``join.idle_timeout_s`` wall seconds do not hold the others back)."""
        if not self.joiners:
            return []
        timeout = self.settings.join.idle_timeout_s
        now = time.monotonic()
        marks = [(j.watermark, j.last_activity) for j in self.joiners.values()]
        live = [wm for wm, seen in marks if timeout is None or now - seen < timeout]
        low = min(live) if live else max(wm for wm, _ in marks)
        if low <= self._released_to:
            return []
        self._released_to = low
        out: list[LabeledExample] = []
        for j in self.joiners.values():
            out.extend(j.release(low))
        return out

    def handle(
        self, raw: bytes, topic: str, partition: int, offset: int
    ) -> tuple[list[LabeledExample], DeadLetter | None]:
        """Process one raw record; returns the labels it released, or a dead letter."""
        self.offsets[(topic, partition)] = offset
        try:
            event = parse_input(raw, topic)
        except InvalidEvent as exc:
            self.metrics.dead_letters.labels(reason=exc.reason).inc()
            return [], DeadLetter.of(topic, partition, offset, exc, raw)
        j = self.joiner(partition)
        before = (
            j.counters.duplicate_impressions,
            j.counters.duplicate_clicks,
            j.counters.late_clicks,
        )
        if isinstance(event, Watermark):
            source = "clicks" if topic == TOPIC_CLICKS else "impressions"
            out = j.on_watermark(event.ts, source)
        elif isinstance(event, Click):
            self.metrics.clicks.inc()
            out = j.on_click(event)
        else:
            assert isinstance(event, Impression)
            self.metrics.impressions.inc()
            out = j.on_impression(event)
        out.extend(self._release())
        c = j.counters
        self.metrics.duplicate_impressions.inc(c.duplicate_impressions - before[0])
        self.metrics.duplicate_clicks.inc(c.duplicate_clicks - before[1])
        self.metrics.late_clicks.inc(c.late_clicks - before[2])
        for e in out:
            self.metrics.labeled.labels(label="positive" if e.label else "negative").inc()
        return out, None

    def note_backlog(self, lags: Mapping[tuple[str, int], int]) -> None:
        """``lags``: (topic, partition) -> records not consumed yet. An input with a backlog
        is not idle, however long the consumer has been busy elsewhere: only a caught-up
        quiet input may stop holding the watermark back."""
        now = time.monotonic()
        for (topic, partition), lag in lags.items():
            j = self.joiners.get(partition)
            if j is not None and lag > 0:
                j.last_seen["clicks" if topic == TOPIC_CLICKS else "impressions"] = now

    def tick(self) -> list[LabeledExample]:
        """Called periodically: releases what became due because inputs went idle."""
        out = self._release()
        for e in out:
            self.metrics.labeled.labels(label="positive" if e.label else "negative").inc()
        return out

    def update_gauges(self) -> None:
        self.metrics.pending_impressions.set(sum(len(j.pending) for j in self.joiners.values()))
        wms = [j.watermark for j in self.joiners.values() if np.isfinite(j.watermark)]
        if wms:
            self.metrics.event_time_watermark_seconds.set(min(wms))


@dataclass
class Catalogue:
    """Items and users the trainer has seen (bounded, most recent kept) and user clicks."""

    max_items: int
    max_users: int
    items: OrderedDict[str, None] = field(default_factory=OrderedDict)
    users: OrderedDict[str, set[str]] = field(default_factory=OrderedDict)

    def add(self, user_id: str, item_id: str, clicked: bool) -> None:
        self.items[item_id] = None
        self.items.move_to_end(item_id)
        if len(self.items) > self.max_items:
            self.items.popitem(last=False)
        clicks = self.users.get(user_id)
        if clicks is None:
            clicks = self.users[user_id] = set()
        else:
            self.users.move_to_end(user_id)
        if clicked:
            clicks.add(item_id)
        if len(self.users) > self.max_users:
            self.users.popitem(last=False)


class TrainerService:
    """Micro-batches labelled examples, scores each batch, then learns from it.

    The scores are taken *before* the update (progressive validation) and are what the
    calibration monitor sees. The served score is the calibrator applied to the raw one.
    """

    def __init__(
        self, settings: Settings, metrics: StreamrecMetrics, ranker: TorchRanker | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        cfg = settings.trainer
        if ranker is None:
            if cfg.warm_start:
                ranker = TorchRanker.load(
                    cfg.warm_start, device=settings.ranker.device, online=True
                )
            else:
                ranker = TorchRanker(settings.ranker, seed=cfg.seed, online=True)
        self.ranker = ranker
        self.calibrator: Calibrator = PlattCalibrator()
        self.calibrator_version = 0
        self.model_version = 0
        self.buffer: list[LabeledExample] = []
        self.emitted_at: list[float | None] = []  # parallel to buffer
        self.buffer_since: float | None = None
        self.catalogue = Catalogue(settings.indexer.max_items, settings.indexer.max_users)
        self.n_examples = 0
        self.n_corrections = 0
        self._last_checkpoint = time.monotonic()
        metrics.model_version.set(0)
        metrics.calibrator_version.set(0)

    def add(self, examples: list[LabeledExample], emitted_at: float | None = None) -> None:
        """Buffer examples; ``emitted_at``: wall time (epoch s) the joiner sent them, for the
        label-to-update freshness histogram."""
        if examples and self.buffer_since is None:
            self.buffer_since = time.monotonic()
        self.buffer.extend(examples)
        self.emitted_at.extend([emitted_at] * len(examples))

    def drop_buffer(self) -> int:
        """Discard the buffered examples (after a failed step); returns how many."""
        n = len(self.buffer)
        self.buffer.clear()
        self.emitted_at.clear()
        self.buffer_since = None
        return n

    def due(self, now: float | None = None) -> bool:
        if len(self.buffer) >= self.settings.trainer.batch_size:
            return True
        now = time.monotonic() if now is None else now
        return (
            bool(self.buffer)
            and (now - (self.buffer_since or now)) >= self.settings.trainer.flush_s
        )

    def step(self) -> ScoredBatch | None:
        """Score then learn one micro-batch from the buffer; None if the buffer is empty."""
        bs = self.settings.trainer.batch_size
        batch, self.buffer = self.buffer[:bs], self.buffer[bs:]
        emitted, self.emitted_at = self.emitted_at[:bs], self.emitted_at[bs:]
        self.buffer_since = time.monotonic() if self.buffer else None
        if not batch:
            return None
        rows = [example_row(e.impression) for e in batch]
        y = np.fromiter((e.label for e in batch), dtype=np.float64, count=len(batch))
        w = np.fromiter((e.weight for e in batch), dtype=np.float64, count=len(batch))
        skipped_before = self.ranker.n_skipped_nonfinite
        t0 = time.perf_counter()
        p_raw = self.ranker.score_and_learn(rows, y, w)
        m = self.metrics
        m.train_step_seconds.observe(time.perf_counter() - t0)
        now = time.time()
        for e, sent in zip(batch, emitted, strict=True):
            m.label_delay_seconds.observe(max(0.0, e.label_ts - e.impression.ts))
            if sent is not None:
                m.update_freshness_seconds.observe(max(0.0, now - sent))
        if self.ranker.n_skipped_nonfinite > skipped_before:
            self.metrics.nonfinite_batches.inc()
        else:
            self.metrics.train_batches.inc()
            if self.ranker.last_loss is not None:
                self.metrics.train_loss.set(self.ranker.last_loss)
        self.model_version = self.ranker.n_updates
        self.metrics.model_version.set(self.model_version)
        p = self.calibrator.transform(p_raw)
        for e in batch:
            imp = e.impression
            self.catalogue.add(imp.user_id, imp.item_id, bool(e.label))
            if e.kind == "correction":
                self.n_corrections += 1
        self.n_examples += len(batch)
        self.metrics.scored.inc(len(batch))
        return ScoredBatch(
            model_version=self.model_version,
            calibrator_version=self.calibrator_version,
            impression_ids=[e.impression.impression_id for e in batch],
            ts=[e.impression.ts for e in batch],
            label=[int(e.label) for e in batch],
            p_raw=[float(x) for x in p_raw],
            p=[float(x) for x in p],
            segment=[segment_of(e.impression.position) for e in batch],
            true_p=[e.impression.true_p for e in batch],
        )

    def apply_control(self, msg: dict[str, object]) -> None:
        """Apply a ``control`` message (calibrator updates from the monitor)."""
        if msg.get("kind") == "calibrator":
            version = int(msg["version"])  # type: ignore[call-overload]  # validated by sender
            if version > self.calibrator_version:
                self.calibrator = calibrator_from_dict(msg["params"])  # type: ignore[arg-type]
                self.calibrator_version = version
                self.metrics.calibrator_version.set(version)
                log.info("calibrator v%d applied: %s", version, self.calibrator)

    def maybe_checkpoint(self, force: bool = False) -> Path | None:
        cfg = self.settings.trainer
        if not cfg.checkpoint_dir:
            return None
        now = time.monotonic()
        if not force and now - self._last_checkpoint < cfg.checkpoint_every_s:
            return None
        self._last_checkpoint = now
        d = Path(cfg.checkpoint_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"ranker-v{self.model_version:08d}.pt"
        self.ranker.save(path)
        tmp = d / ".latest.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, d / "LATEST")
        return path


class MonitorService:
    """Calibration gauges per window and segment, the drift test, and recalibration."""

    def __init__(self, settings: Settings, metrics: StreamrecMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        cfg = settings.monitor
        self.served = CalibrationWindow(size=cfg.window)
        self.raw = CalibrationWindow(size=max(cfg.window, cfg.recal_window))
        self.raw_gauge = (
            self.raw if cfg.window >= cfg.recal_window else CalibrationWindow(size=cfg.window)
        )
        self.segments: dict[str, CalibrationWindow] = {}
        self.detector: DriftDetector = (
            CalibrationDriftDetector(settings.drift)
            if cfg.detector == "window_z"
            else make_detector(cfg.detector)
        )
        self.calibrator: Calibrator = PlattCalibrator()
        self.calibrator_version = 0
        self.n_seen = 0
        self.n_alarms = 0
        self.n_recalibrations = 0
        self.n_rejected = 0
        self.events: list[dict[str, object]] = []
        self.window_label = f"{cfg.window // 1000}k" if cfg.window >= 1000 else str(cfg.window)

    def observe(self, batch: ScoredBatch) -> list[dict[str, object]]:
        """Update statistics with one scored batch; returns the control messages to
        publish: a ``drift`` record per alarm, and a ``calibrator`` when a recalibration
        was accepted."""
        p = np.asarray(batch.p, dtype=np.float64)
        p_raw = np.asarray(batch.p_raw, dtype=np.float64)
        y = np.asarray(batch.label, dtype=np.float64)
        self.served.update(predictions=p, labels=y)
        self.raw.update(predictions=p_raw, labels=y)
        if self.raw_gauge is not self.raw:
            self.raw_gauge.update(predictions=p_raw, labels=y)
        segs = np.asarray(batch.segment)
        for seg in np.unique(segs):
            win = self.segments.get(seg)
            if win is None:
                if len(self.segments) >= self.settings.monitor.max_segments:
                    continue
                win = self.segments[seg] = CalibrationWindow(size=self.settings.monitor.window)
            mask = segs == seg
            win.update(predictions=p[mask], labels=y[mask])
        self.detector.update_many(p, y)
        self.n_seen += len(y)
        self.metrics.drift_z.labels(segment="all").set(self.detector.statistic)
        if self.detector.drift_detected and self.n_seen >= self.settings.monitor.warmup:
            return self._on_drift(max(batch.ts) if batch.ts else 0.0)
        return []

    def apply_control(self, msg: dict[str, object]) -> None:
        """Adopt a newer calibrator seen on ``control`` (e.g. published before a restart),
        so that this monitor's next version number continues from it."""
        if msg.get("kind") == "calibrator":
            version = int(msg["version"])  # type: ignore[call-overload]  # validated by sender
            if version > self.calibrator_version:
                self.calibrator = calibrator_from_dict(msg["params"])  # type: ignore[arg-type]
                self.calibrator_version = version

    def publish(self) -> None:
        """Push window/lifetime/segment snapshots to the gauges (cheap enough per second)."""
        m = self.metrics
        m.publish_snapshot(self.served.window(), window=self.window_label)
        m.publish_snapshot(self.served.lifetime(), window="lifetime")
        m.publish_raw_snapshot(self.raw_gauge.window(), window=self.window_label)
        m.publish_raw_snapshot(self.raw.lifetime(), window="lifetime")
        for seg, win in self.segments.items():
            m.publish_snapshot(win.window(), window=self.window_label, segment=seg)

    def _on_drift(self, event_ts: float) -> list[dict[str, object]]:
        cfg = self.settings.monitor
        self.n_alarms += 1
        self.metrics.drift_alarms.inc()
        z = float(getattr(self.detector, "last_alarm_statistic", self.detector.statistic))
        self.detector.reset()  # starts the cooldown
        p_raw, y = self.raw.window_arrays()
        p_raw, y = p_raw[-cfg.recal_window :], y[-cfg.recal_window :]
        n_hold = max(1, int(len(y) * cfg.holdout_fraction))
        chosen, accepted, ll_old, ll_new = fit_if_better(
            p_raw[:-n_hold], y[:-n_hold], p_raw[-n_hold:], y[-n_hold:], self.calibrator,
            kind=cfg.calibrator,
        )  # fmt: skip
        event: dict[str, object] = {
            "kind": "drift",
            "event_ts": event_ts,
            "examples_seen": self.n_seen,
            "z": z,
            "accepted": accepted,
            "holdout_logloss_old": ll_old,
            "holdout_logloss_new": ll_new,
        }
        self.events.append(event)
        if not accepted:
            self.n_rejected += 1
            self.metrics.recalibrations_rejected.inc()
            log.info("drift z=%.1f: recalibration rejected (%.5f -> %.5f)", z, ll_old, ll_new)
            return [event]
        self.calibrator = chosen
        self.calibrator_version += 1
        self.n_recalibrations += 1
        self.metrics.recalibrations.inc()
        self.served.reset_window()
        log.info(
            "drift z=%.1f at event time %.0f: calibrator v%d %s (holdout log loss %.5f -> %.5f)",
            z, event_ts, self.calibrator_version, chosen, ll_old, ll_new,
        )  # fmt: skip
        return [
            event,
            {
                "kind": "calibrator",
                "version": self.calibrator_version,
                "params": chosen.to_dict(),
                "event_ts": event_ts,
            },
        ]


class IndexerService:
    """Rebuilds the FAISS index over item embeddings and the hard-negative pools."""

    def __init__(self, settings: Settings, metrics: StreamrecMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.holder = IndexHolder()
        self.pool = HardNegativePool(
            per_user=settings.indexer.pool_per_user, max_users=settings.indexer.max_users
        )
        self.version = 0

    def refresh(self, ranker: TorchRanker, catalogue: Catalogue) -> dict[str, object] | None:
        items = list(catalogue.items)
        if not items:
            return None
        t0 = time.perf_counter()
        vectors = ranker.item_vectors(items)
        snapshot = build_snapshot(
            items, vectors, version=self.version + 1, config=self.settings.index
        )
        self.holder.swap(snapshot)
        self.version = snapshot.version
        users = list(reversed(catalogue.users))  # most recent first
        if users:
            self.pool.refresh(
                snapshot, users, ranker.user_vectors(users), catalogue.users, now=time.time()
            )
        m = self.metrics
        m.index_refreshes.inc()
        m.index_version.set(self.version)
        m.index_items.set(len(snapshot))
        m.hard_negative_pool_users.set(self.pool.n_users)
        return {
            "kind": "index",
            "version": self.version,
            "items": len(snapshot),
            "pool_users": self.pool.n_users,
            "build_s": time.perf_counter() - t0,
        }


def control_bytes(msg: dict[str, object]) -> bytes:
    return json.dumps(msg).encode()
