"""Monitor room: scored batches in, calibration and drift out."""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

import numpy as np

from learners.calibration import (
    Calibrator,
    OffsetCalibrator,
    PlattCalibrator,
    VersionedCalibrator,
)
from learners.recalibration import refit_on_alarm
from logs.batches import ScoredBatch
from monitoring.drift import CalibrationDriftDetector, DriftDetector, make_detector
from monitoring.drift_wander import WanderDriftDetector
from monitoring.metrics import StreamrecMetrics
from monitoring.offset import LogitOffset
from monitoring.outcomes import FinalOutcomes
from monitoring.windows import CalibrationWindow
from stream.control import CalibratorUpdate, ControlRecord, DriftAlarm, Recalibration
from stream.settings import Settings

log = logging.getLogger(__name__)


class MonitorService:
    """Calibration gauges per window and segment, the drift tests, and recalibration.

    Windows (served and raw scores): the newest ``monitor.window`` examples (gauge label
    e.g. ``"20k"``; equal-mass reliability bins), the newest ``monitor.time_window_s`` seconds
    of event time (label e.g. ``"1h"``; fixed reliability bins) and the lifetime; one count
    window and one drift detector per segment (slate position; at most ``max_segments``).
    An alarm of the drift test on all examples after the warm-up recalibrates by
    ``monitor.recalibration`` (see :class:`stream.settings.MonitorConfig` and
    :class:`learners.recalibration.TrackingRecalibrator`); a per-segment alarm is counted
    (``streamrec_segment_drift_alarms_total``) but recalibrates nothing.

    With ``offset.enabled`` (issue 17, off by default) a fast logit offset
    (:class:`monitoring.offset.LogitOffset`) follows the calibrator: it learns from each
    impression's first record (its score before the offset: the current calibrator on
    its raw score) and from the clicks as they arrive, not from final labels, and every
    ``offset.refresh_every`` impressions a move of at least ``offset.min_change`` nats
    publishes the calibrator with the offset inside (``CalibratorUpdate.offset`` says how
    much of it is the offset). The served score the windows and drift tests judge is the
    one served, offset included.
    """

    def __init__(self, settings: Settings, metrics: StreamrecMetrics) -> None:
        # Imported here rather than at the top: this class is the only user in the module.
        from learners.guarded import GuardConfig, GuardedRecalibrator
        from learners.recalibration import TrackingRecalibrator
        from monitoring.drift import SegmentedDriftDetector
        from monitoring.windows import TimeCalibrationWindow

        self.settings = settings
        self.metrics = metrics
        cfg = settings.monitor
        self.served = CalibrationWindow(size=cfg.window)
        self.raw = CalibrationWindow(size=max(cfg.window, cfg.recal_window))
        self.raw_gauge = (
            self.raw if cfg.window >= cfg.recal_window else CalibrationWindow(size=cfg.window)
        )
        self.served_time = TimeCalibrationWindow(cfg.time_window_s, cfg.time_bucket_s)
        self.raw_time = TimeCalibrationWindow(cfg.time_window_s, cfg.time_bucket_s)
        self.segments: dict[str, CalibrationWindow] = {}
        self.detector: DriftDetector = self._new_detector()
        self.segment_detector = SegmentedDriftDetector(self._new_detector, cfg.max_segments)
        self.tracker = TrackingRecalibrator(cfg.tracking())
        #: recalibration="guarded": forward-holdout acceptance and rollback
        self.guard: GuardedRecalibrator | None = (
            GuardedRecalibrator(
                GuardConfig(
                    kind=cfg.calibrator,
                    fit_window=cfg.recal_window,
                    holdout=cfg.recal_window,
                    z=cfg.guard_z,
                )
            )
            if cfg.recalibration == "guarded"
            else None
        )
        self.n_rollbacks = 0
        self.calibrator: Calibrator = PlattCalibrator()
        self.calibrator_version = 0
        #: final labels of a fake-negative or DFM stream (None: the labels are final already)
        scheme = settings.join.delayed_feedback
        self.outcomes: FinalOutcomes | None = (
            FinalOutcomes(
                settings.join.window_s,
                settings.join.lateness_s,
                positives_first=scheme == "dfm",
                max_pending=settings.monitor.max_pending,
            )
            if scheme in ("fake_negative", "dfm")
            else None
        )
        #: input partition -> the newest event-time mark the joiner sent for it
        self.marks: dict[int, float] = {}
        ocfg = settings.offset
        if ocfg.enabled and ocfg.max_delay_s is None:  # delays are capped by the window
            ocfg = dataclasses.replace(ocfg, max_delay_s=settings.join.window_s)
        #: the fast offset after the calibrator (None: offset.enabled is off)
        self.offset: LogitOffset | None = LogitOffset(ocfg) if ocfg.enabled else None
        self.served_offset = 0.0  #: nats of the offset inside the published calibrator
        self.n_offset_updates = 0
        self._offset_pending = 0  # impressions observed since the offset's last refresh
        self._offset_now = -np.inf  # newest impression time seen (event seconds)
        self.n_seen = 0
        #: the second label (join.conversion_window_s): Σ P(clicked and converted) of the
        #: impressions judged, how many, and their conversions (:meth:`_observe_second`)
        self.second_predicted = 0.0
        self.second_judged = 0
        self.second_outcomes = 0
        cw = settings.join.conversion_window_s
        #: the second label's final outcomes (None: no conversion window)
        self.second: FinalOutcomes | None = (
            None
            if cw is None
            else FinalOutcomes(
                settings.join.window_s + cw,
                settings.join.lateness_s,
                max_pending=settings.monitor.max_pending,
            )
        )
        #: (Σp2, conversions, impressions) of the newest judged chunks
        self._second_recent: deque[tuple[float, float, int]] = deque()
        self.n_alarms = 0
        self.n_recalibrations = 0
        self.n_rejected = 0
        self.events: list[DriftAlarm] = []
        self.window_label = f"{cfg.window // 1000}k" if cfg.window >= 1000 else str(cfg.window)
        s = cfg.time_window_s
        self.time_label = (
            f"{s / 3600:g}h" if s % 3600 == 0 else f"{s / 60:g}m" if s % 60 == 0 else f"{s:g}s"
        )

    def _new_detector(self) -> DriftDetector:
        cfg = self.settings.monitor
        if cfg.detector == "window_z":
            return CalibrationDriftDetector(self.settings.drift)
        if cfg.detector == "wander_z":
            return WanderDriftDetector(self.settings.drift_wander)
        return make_detector(cfg.detector)

    def observe(self, batch: ScoredBatch) -> list[ControlRecord]:
        """Update statistics with one scored batch; returns the control messages to
        publish: a ``drift`` record per alarm, and a ``calibrator`` whenever a new version
        is published (an accepted refit, a level update while tracking, or a move of the
        fast offset).

        With ``join.delayed_feedback="fake_negative"`` the batch's labels are provisional:
        each impression is judged once, on its final label, when its attribution window
        has closed (:class:`monitoring.outcomes.FinalOutcomes`), with the scores of its
        first record (taken when it reached the trainer, at its impression time). With
        ``"dfm"`` likewise: an impression's first record is its positive (click before
        ``join.dfm_observe_s``) or its unclicked record, and a later click (a weight-0
        ``late_click``) makes its final label 1.

        The batch's ``marks`` (the joiner's event-time marks, see
        :func:`logs.batches.encode_marks`) move the final labels' clock: once every input
        partition has a mark, an impression whose window closed before the lowest mark is
        judged even when no later impression came (the end of a replay, a quiet hour). A
        batch may carry only marks."""
        if batch.marks:
            self._take_marks(batch.marks)
        if self.second is not None:
            self._observe_second(batch)
        if not batch.impression_ids:
            return self._observe_labels(batch) if self.outcomes is not None else []
        out = self._feed_offset(batch) if self.offset is not None else []
        return out + self._observe_labels(batch)

    def _take_marks(self, marks: dict[int, float]) -> None:
        """Keep each input partition's newest mark. From the first mark on, the final
        labels' clock follows the marks only: once every partition has one, the lowest
        (plus the lateness: a mark is a watermark, lateness taken off). No wall-clock rule
        here: a quiet partition's joiner moves its mark itself (its idle rule, see
        :meth:`stream.services.JoinService.marks`), so a partition whose mark stands still
        is one whose joiner is stalled (a rebalance, a restart, a slow start), and the
        windows wait for it rather than judge clicks it has not sent yet."""
        n = self.settings.partitions
        kept = self.marks
        clocks = [fo for fo in (self.outcomes, self.second) if fo is not None]
        for fo in clocks:
            # the joiners send marks: from now on only they close windows (the newest
            # impression time ran ahead of the clicks of partitions read more slowly)
            fo.marked = True
        for p, w in marks.items():
            if 0 <= p < n and w > kept.get(p, -np.inf):
                kept[p] = w
        if not clocks or len(kept) < n:
            return
        low = min(kept.values())
        for fo in clocks:
            fo.advance(low + self.settings.join.lateness_s)

    def _feed_offset(self, batch: ScoredBatch) -> list[ControlRecord]:
        """Feed the fast offset with a batch's new impressions (first records) and
        clicks; re-estimate it every ``offset.refresh_every`` impressions once it holds
        ``half_life`` of them; a ``calibrator`` record when it moved enough."""
        off = self.offset
        assert off is not None
        cfg = off.config
        ids = batch.impression_ids
        ts = np.asarray(batch.ts, dtype=np.float64)
        # an impression's first record: with fake negatives always its label-0 record (a
        # positive of an impression not remembered belongs to one that left the window, or
        # to one seen before a restart); otherwise the first record of any label
        first_is_negative = self.settings.join.delayed_feedback == "fake_negative"
        new = [
            i
            for i, (iid, y) in enumerate(zip(ids, batch.label, strict=True))
            if not (off.remembers(iid) or (first_is_negative and y > 0))
        ]
        if ts.size:
            self._offset_now = max(self._offset_now, float(ts.max()))
        if new:
            p_pre = self.calibrator.transform(np.asarray(batch.p_raw, dtype=np.float64)[new])
            before = off.n_seen  # it also skips impressions older than its window
            off.observe_impressions([ids[i] for i in new], ts[new], p_pre)
            self._offset_pending += off.n_seen - before
        clicked = np.asarray(batch.label) > 0
        off.observe_clicks([iid for iid, c in zip(ids, clicked, strict=True) if c])
        if clicked.any():
            # each click's delay: the stream's newest event time when its positive arrives
            # (fresh labels: about its click time) minus its impression's time
            off.observe_delays(ts[clicked], self._offset_now)
        if self._offset_pending < cfg.refresh_every or off.n_seen < cfg.half_life:
            return []
        self._offset_pending = 0
        value = off.refresh(self._offset_now)
        moved = abs(value - self.served_offset)
        if moved < cfg.min_change and not (value == 0.0 and self.served_offset != 0.0):
            return []
        self.served_offset = value
        self.n_offset_updates += 1
        return [self._calibrator_message(self.calibrator, self._offset_now, "offset")]

    def _observe_labels(self, batch: ScoredBatch) -> list[ControlRecord]:
        """The windows, drift tests and recalibration of :meth:`observe`."""
        if self.outcomes is None:
            return self._observe(
                np.asarray(batch.p, dtype=np.float64),
                np.asarray(batch.p_raw, dtype=np.float64),
                np.asarray(batch.label, dtype=np.float64),
                np.asarray(batch.ts, dtype=np.float64),
                np.asarray(batch.segment),
            )
        late, forced = self.outcomes.late_positives, self.outcomes.forced
        self.outcomes.add(
            batch.impression_ids,
            ts=batch.ts,
            label=batch.label,
            columns={"p": batch.p, "p_raw": batch.p_raw, "segment": batch.segment},
        )
        if self.outcomes.late_positives > late:
            self.metrics.monitor_late_positives.inc(self.outcomes.late_positives - late)
        done = self.outcomes.resolve()
        if self.outcomes.forced > forced:
            self._count_forced(self.outcomes.forced - forced)
        if not done:
            return []
        return self._observe(done["p"], done["p_raw"], done["label"], done["ts"], done["segment"])

    def _count_forced(self, n: int) -> None:
        """``n`` impressions judged before their window closed (``monitor.max_pending``)."""
        self.metrics.monitor_forced.inc(n)
        log.warning("the monitor held monitor.max_pending = %d impressions (is a joiner"
                    " stalled? see streamrec_monitor_mark_seconds): judged the %d oldest"
                    " early", self.settings.monitor.max_pending, n)  # fmt: skip

    def _observe_second(self, batch: ScoredBatch) -> None:
        """The second label's calibration, on final labels: every impression with a task-1
        score (its first record's ``p2``) waits until its attribution and conversion
        windows have closed (:class:`~monitoring.outcomes.FinalOutcomes` over
        ``join.window_s + join.conversion_window_s``, the same event-time clock as the
        click's), then is judged once, converted or not. ``streamrec_second_label_*``:
        Σp2, the impressions and their conversions, the lifetime ratio and the ratio over
        the newest ``monitor.window`` impressions judged."""
        fo = self.second
        assert fo is not None
        if batch.p2:
            n = len(batch.p2)
            fo.add(batch.impression_ids, ts=batch.ts, label=np.zeros(n),
                   columns={"p2": np.asarray(batch.p2, dtype=np.float64)})  # fmt: skip
        ones = [iid for iid, y in zip(batch.label2_ids, batch.label2, strict=True) if y]
        if ones:  # their impressions' records are waiting (or were judged: late)
            now = max([fo.clock, *batch.ts]) if batch.ts else fo.clock
            fo.add(ones, ts=np.full(len(ones), now), label=np.ones(len(ones)),
                   columns={"p2": np.full(len(ones), np.nan)})  # fmt: skip
        forced = fo.forced
        done = fo.resolve()
        if fo.forced > forced:
            self._count_forced(fo.forced - forced)
        if not done:
            return
        p2, y = done["p2"], done["label"]
        ok = np.isfinite(p2)
        if not ok.all():  # a ranker without a task 1 scored them: nothing to judge
            p2, y = p2[ok], y[ok]
        if not p2.size:
            return
        m = self.metrics
        sums = (float(p2.sum()), float(y.sum()), int(p2.size))
        self.second_predicted += sums[0]
        self.second_outcomes += int(sums[1])
        self.second_judged += sums[2]
        m.second_label_predicted.inc(sums[0])
        m.second_label_outcomes.inc(sums[1])
        m.second_label_judged.inc(sums[2])
        if self.second_outcomes:
            m.second_label_ratio.set(self.second_predicted / self.second_outcomes)
        recent = self._second_recent
        recent.append(sums)
        size = self.settings.monitor.window
        while len(recent) > 1 and sum(c[2] for c in recent) - recent[0][2] >= size:
            recent.popleft()
        outcomes = sum(c[1] for c in recent)
        if outcomes:
            m.second_label_window_ratio.set(sum(c[0] for c in recent) / outcomes)

    def _observe(
        self, p: np.ndarray, p_raw: np.ndarray, y: np.ndarray, ts: np.ndarray, segs: np.ndarray
    ) -> list[ControlRecord]:
        """:meth:`observe` on final labels: (N,) served and raw scores, labels, impression
        times and segments."""
        cfg = self.settings.monitor
        self.served.update(predictions=p, labels=y)
        self.raw.update(predictions=p_raw, labels=y)
        if self.raw_gauge is not self.raw:
            self.raw_gauge.update(predictions=p_raw, labels=y)
        self.served_time.update(predictions=p, labels=y, ts=ts)
        self.raw_time.update(predictions=p_raw, labels=y, ts=ts)
        for seg in np.unique(segs):
            win = self.segments.get(seg)
            if win is None:
                if len(self.segments) >= cfg.max_segments:
                    continue
                win = self.segments[seg] = CalibrationWindow(size=cfg.window)
            mask = segs == seg
            win.update(predictions=p[mask], labels=y[mask])
        self.segment_detector.update_many(p, y, segs)
        self.detector.update_many(p, y)
        out: list[ControlRecord] = []
        event_ts = float(ts.max()) if ts.size else 0.0
        if self.guard is not None:
            out += self._on_guard(p_raw, y, event_ts)
        elif cfg.recalibration in ("track", "continuous"):
            self.tracker.update(p_raw=p_raw, labels=y)
        self.n_seen += len(y)
        self.metrics.monitored.inc(len(y))
        self.metrics.drift_z.labels(segment="all").set(self.detector.statistic)
        for seg, stat in self.segment_detector.statistics.items():
            self.metrics.drift_z.labels(segment=seg).set(stat)
        if self.n_seen < cfg.warmup:
            return out
        for seg in self.segment_detector.drifted_segments:
            self.metrics.segment_drift_alarms.labels(segment=seg).inc()
            log.info("drift alarm on segment %s (no recalibration)", seg)
        if self.detector.drift_detected:
            return out + self._on_drift(event_ts)
        if cfg.recalibration not in ("track", "continuous"):
            return out
        if cfg.recalibration == "continuous" and not self.tracker.armed:
            self.tracker.arm()
        if self.tracker.due:
            return out + self._on_refit(event_ts)
        return out

    def _on_guard(self, p_raw: np.ndarray, y: np.ndarray, event_ts: float) -> list[ControlRecord]:
        """recalibration="guarded": judge a waiting refit on these forward labels, or the
        served calibrator against the raw ranker (rollback); a calibrator when it changes."""
        assert self.guard is not None
        out: list[ControlRecord] = []
        for ev in self.guard.update(p_raw, y):
            if ev.kind == "rollback":
                self.n_rollbacks += 1
                self.metrics.recalibration_rollbacks.inc()
                log.info("recalibration rolled back (served lost %.5f nats to raw)", ev.gain)
                record = self._refit_record(None, event_ts, "rollback")
            else:
                record = self._count_refit(ev.kind == "accepted", event_ts, "guarded")
            out.append(dataclasses.replace(record, gain_nats=ev.gain, se_nats=ev.se))
            if ev.kind != "rejected":
                out.append(self._calibrator_message(ev.calibrator, event_ts, ev.kind))
                self.served.reset_window()
        return out

    def apply_control(self, record: ControlRecord) -> None:
        """Adopt a newer calibrator seen on ``control`` (e.g. published before a restart),
        so that this monitor's next version number continues from it; tracking resumes
        from it when it is not the identity."""
        if not isinstance(record, CalibratorUpdate):
            return
        current = VersionedCalibrator(self.calibrator, self.calibrator_version)
        newer = current.newer(record.version, record.params)
        if newer is not None:
            base = newer.calibrator
            if record.offset and isinstance(base, OffsetCalibrator):
                base = base.with_offset(-record.offset)  # the offset is not the calibrator's
            if self.offset is not None:
                # served as published until the offset, re-learning from its own window,
                # moves by offset.min_change
                self.served_offset = float(record.offset or 0.0)
            self.calibrator, self.calibrator_version = base, newer.version
            if self.guard is not None:
                self.guard.serving = self.calibrator
            elif self.settings.monitor.recalibration in ("track", "continuous"):
                self.tracker.adopt(self.calibrator)

    def publish(self) -> None:
        """Push window/lifetime/segment snapshots and reliability bins to the gauges (cheap
        enough per second)."""
        m, cfg = self.metrics, self.settings.monitor
        m.publish_snapshot(self.served.window(), window=self.window_label)
        m.publish_snapshot(self.served.lifetime(), window="lifetime")
        m.publish_snapshot(self.served_time.window(), window=self.time_label)
        m.publish_raw_snapshot(self.raw_gauge.window(), window=self.window_label)
        m.publish_raw_snapshot(self.raw.lifetime(), window="lifetime")
        m.publish_raw_snapshot(self.raw_time.window(), window=self.time_label)
        reliability = self.served.reliability(cfg.reliability_bins)
        m.publish_reliability(reliability, window=self.window_label)
        m.publish_reliability(self.served_time.reliability(), window=self.time_label)
        for seg, win in self.segments.items():
            m.publish_snapshot(win.window(), window=self.window_label, segment=seg)
        tracking = self.tracker.armed and self.tracker.target is not None
        m.calibrator_offset.set(self.tracker.offset if tracking else 0.0)
        target = self.tracker.target if tracking else None
        m.calibration_target_ctr.set(float("nan") if target is None else target)
        m.served_offset.set(self.served_offset if self.offset is not None else 0.0)
        off = self.offset
        delays = off.delays if off is not None and off.delay_source == "estimated" else None
        m.offset_delay_clicks.set(0 if delays is None else delays.n_clicks)
        m.monitor_pending_impressions.set(0 if self.outcomes is None else self.outcomes.pending)
        for p, w in self.marks.items():
            m.monitor_mark_seconds.labels(partition=str(p)).set(w)

    def _calibrator_message(
        self, calibrator: Calibrator, event_ts: float, reason: str
    ) -> CalibratorUpdate:
        """Publish ``calibrator`` as the next version: with the fast offset inside
        (``offset.enabled``), the served one is ``calibrator`` shifted by it."""
        self.calibrator = calibrator
        self.calibrator_version += 1
        self.metrics.calibrator_updates.inc()
        offset: float | None = None
        served = calibrator
        if self.offset is not None and isinstance(calibrator, OffsetCalibrator):
            offset = self.served_offset
            served = calibrator.with_offset(offset) if offset else calibrator
        return CalibratorUpdate(
            self.calibrator_version, served.to_dict(), event_ts=event_ts, reason=reason,
            offset=offset,
        )  # fmt: skip

    def _refit_record(self, accepted: bool | None, event_ts: float, reason: str) -> Recalibration:
        decision = "rollback" if accepted is None else "accepted" if accepted else "rejected"
        return Recalibration(event_ts, self.n_seen, decision, reason)

    def _count_refit(self, accepted: bool, event_ts: float, reason: str) -> Recalibration:
        """Count a judged refit (``streamrec_recalibrations_total`` or ``_rejected_total``)
        and return its ``recalibration`` control record: one record per count, so that the
        report (which draws these records) and the CLI table (which reads the counters)
        agree (issue 17, item 5)."""
        if accepted:
            self.n_recalibrations += 1
            self.metrics.recalibrations.inc()
        else:
            self.n_rejected += 1
            self.metrics.recalibrations_rejected.inc()
        return self._refit_record(accepted, event_ts, reason)

    def _on_refit(self, event_ts: float) -> list[ControlRecord]:
        """A periodic refit while tracking: counted, and published when it changes."""
        result = self.tracker.refit()
        if result.accepted is None:  # too few clicks in the window yet
            return []
        record = self._count_refit(result.accepted, event_ts, "periodic")
        if result.published is None:
            return [record]
        reason = "identity" if result.disarmed else "refit" if result.accepted else "level"
        return [record, self._calibrator_message(result.published, event_ts, reason)]

    def _on_drift(self, event_ts: float) -> list[ControlRecord]:
        cfg = self.settings.monitor
        self.n_alarms += 1
        self.metrics.drift_alarms.inc()
        z = float(getattr(self.detector, "last_alarm_statistic", self.detector.statistic))
        self.detector.reset()  # starts the cooldown
        published: Calibrator | None
        if cfg.recalibration in ("off", "guarded"):
            # guarded: a refit fitted now is judged on the labels that come after it
            proposed = self.guard.propose() if self.guard is not None else False
            alarm = DriftAlarm(event_ts, self.n_seen, z, accepted=None, proposed=proposed)
            self.events.append(alarm)
            return [alarm]
        if cfg.recalibration == "alarm":
            p_raw, y = self.raw.window_arrays()
            result = refit_on_alarm(
                p_raw, y, self.calibrator, kind=cfg.calibrator, recal_window=cfg.recal_window,
                holdout_fraction=cfg.holdout_fraction,
            )  # fmt: skip
        else:  # "track" / "continuous"
            self.tracker.restart()
            result = self.tracker.refit()
        accepted = bool(result.accepted)
        ll_old, ll_new = result.holdout_logloss_old, result.holdout_logloss_new
        published = result.published
        event = DriftAlarm(event_ts, self.n_seen, z, accepted=accepted,
                           holdout_logloss_old=ll_old, holdout_logloss_new=ll_new)  # fmt: skip
        self.events.append(event)
        record = self._count_refit(accepted, event_ts, "alarm")
        if not accepted:
            log.info("drift z=%.1f: recalibration rejected (%.5f -> %.5f)", z, ll_old, ll_new)
        else:
            self.served.reset_window()  # its examples were served by the old calibrator
        if published is None:
            return [event, record]
        msg = self._calibrator_message(published, event_ts, "alarm")
        log.info(
            "drift z=%.1f at event time %.0f: calibrator v%d %s (holdout log loss %.5f -> %.5f)",
            z, event_ts, self.calibrator_version, published, ll_old, ll_new,
        )  # fmt: skip
        return [event, record, msg]
