"""The worker's stages as plain objects; the Faust agents in :mod:`stream.app` are thin
wrappers that move bytes between topics and these objects. Everything here is testable
without Kafka.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from features.stage import FeatureConfig, FeatureStage
from index.faiss_index import IndexHolder, IndexSnapshot, build_snapshot
from index.hard_negatives import HardNegativePool
from learners.calibration import (
    Calibrator,
    PlattCalibrator,
    calibrator_from_dict,
    fit_if_better,
)
from learners.delayed_feedback import fnc_correct
from learners.ranker import TorchRanker
from learners.two_tower import TwoTowerModel
from learners.weighting import time_decay_weights
from modelstore.snapshot import publish_snapshot
from modelstore.store import DirectoryStore, Manifest, StoreError
from monitoring.calibration import CalibrationWindow
from monitoring.drift import CalibrationDriftDetector, DriftDetector, make_detector
from monitoring.metrics import StreamrecMetrics
from monitoring.outcomes import FinalOutcomes
from stream.envelope import decode_envelope, is_envelope
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
    parse_impression,
    parse_input,
    with_history,
)
from stream.join import OnlineJoiner
from stream.settings import Settings

log = logging.getLogger(__name__)


def segment_of(position: int | None) -> str:
    """Bounded segment label: the slate position 1..9, ``10+`` or ``unknown``."""
    if position is None:
        return "unknown"
    return str(position) if position < 10 else "10+"


class JoinState(Protocol):
    """The joiner's durable state, per input partition: a Faust table with a changelog in the
    worker (:class:`stream.app.TableJoinState`), :class:`MemoryJoinState` in process.

    Keys inside a partition: ``i/<impression_id>`` a pending impression (value: JSON
    ``{"i": impression, "c": in-window click ts or null}``) or, once its label is sent, a
    labelled one kept for the dedup horizon (``{"d": label, "t": label ts, "i": impression
    (negatives only, for a late click's correction)}``), ``c/<impression_id>`` an orphan
    click waiting for its impression (value: the click ts), ``w`` the event time reached on
    each input (value: JSON ``{"impressions": ts, "clicks": ts}``).
    """

    def put(self, partition: int, key: str, value: bytes) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def items(self, partition: int) -> Iterable[tuple[str, bytes]]: ...

    def flush(self, partitions: Iterable[int] | None = None) -> int:
        """Make buffered changes durable (:class:`stream.segments.SegmentedState`); the
        inputs that caused them may be committed after it. Returns records written."""
        ...

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget what this worker holds of revoked partitions (not their durable state)."""
        ...


class MemoryJoinState:
    """:class:`JoinState` in a dict (tests, in-process runs); not durable."""

    def __init__(self) -> None:
        self.data: dict[int, dict[str, bytes]] = {}

    def put(self, partition: int, key: str, value: bytes) -> None:
        self.data.setdefault(partition, {})[key] = value

    def delete(self, partition: int, key: str) -> None:
        self.data.get(partition, {}).pop(key, None)

    def items(self, partition: int) -> Iterable[tuple[str, bytes]]:
        return list(self.data.get(partition, {}).items())

    def flush(self, partitions: Iterable[int] | None = None) -> int:
        return 0  # every change is in place at once

    def drop(self, partitions: Iterable[int]) -> None:
        pass  # the dict plays the durable store: it outlives the worker's view of it

    def __len__(self) -> int:
        return sum(len(d) for d in self.data.values())


def _pending_value(imp: Impression, click_ts: float | None) -> bytes:
    return b'{"c":%s,"i":%s}' % (b"null" if click_ts is None else repr(click_ts).encode(),
                                 imp.to_json())  # fmt: skip


def _stage_attrs(features: Mapping[str, object]) -> dict[str, str]:
    """The impression attributes the feature stage reads (``item_*`` strings)."""
    return {k: v for k, v in features.items() if k.startswith("item_") and isinstance(v, str)}


def _delta_chunks(calls: list[list[Any]], size: int) -> list[bytes]:
    """``calls`` as JSON lists of at most about ``size`` bytes each (a call over it alone)."""
    out: list[bytes] = []
    part: list[bytes] = []
    n = 0
    for call in calls:
        b = json.dumps(call, separators=(",", ":"), ensure_ascii=False).encode()
        if part and n + len(b) + 1 > size:
            out.append(b"[" + b",".join(part) + b"]")
            part, n = [], 0
        part.append(b)
        n += len(b) + 1
    if part:
        out.append(b"[" + b",".join(part) + b"]")
    return out


def _replay_features(stage: FeatureStage, calls: list[list[Any]]) -> None:
    """Apply journalled stage calls (see :meth:`JoinService.save_features`) in order."""
    for c in calls:
        if c[0] == "i":
            stage.impression(c[1], float(c[2]), c[3], c[4], c[5], c[6])
        elif c[0] == "c":
            stage.click(c[1], float(c[2]))
        else:
            raise ValueError(f"unknown feature journal call {c[0]!r}")


class JoinService:
    """One :class:`OnlineJoiner` per input partition, its durable state, and the outbox.

    Durability (at-least-once, see the README): every change to a partition's pending
    impressions and orphan clicks is written to :class:`JoinState` while the input record
    that caused it is processed, so it is in the changelog before that record's offset is
    committed. A pending impression's entry is deleted only once its label has been handed
    to the producer (:meth:`sent`), so a crash between labelling and sending re-emits the
    label after the restart instead of losing it. A restarted (or newly assigned) partition
    is rebuilt from the state by :meth:`joiner`.
    """

    #: wall seconds between persisted input event times of a partition (key ``w``)
    WATERMARK_PERSIST_S = 1.0
    #: records between two global releases (see :meth:`handle`; :meth:`tick` releases too)
    RELEASE_EVERY = 256
    #: the feature journal writes a full snapshot of a partition's stage once the deltas
    #: since the last one exceed a quarter of it (and this many bytes): saving is O(new
    #: events) amortised, and a restore replays at most about a quarter-snapshot of events
    FEATURE_SNAPSHOT_MIN_BYTES = 1 << 20

    def __init__(
        self, settings: Settings, metrics: StreamrecMetrics, state: JoinState | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state: JoinState = state if state is not None else MemoryJoinState()
        self.joiners: dict[int, OnlineJoiner] = {}
        self._released_to = float("-inf")
        self.offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset
        self.outbox: dict[int, list[LabeledExample]] = {}  # partition -> labels to send
        self.orphans: list[DeadLetter] = []  # orphan clicks given up on, to dead-letter
        self._wm_saved: dict[int, float] = {}  # partition -> wall time of the last save
        self.n_restored = 0
        self._since_release = 0
        #: partition -> its feature stage (historical features, ``Settings.features``)
        self.features: dict[int, FeatureStage] = {}
        self.feature_config: FeatureConfig | None = FeatureConfig() if settings.features else None
        self._features_pieces: dict[int, int] = {}
        #: partition -> the stage's calls since the last save (the journal's next delta)
        self._feature_log: dict[int, list[list[Any]]] = {}
        #: partition -> [snapshot bytes, delta bytes since it, delta entries since it]
        self._feature_journal: dict[int, list[int]] = {}
        self.n_feature_snapshots = 0  # journal writes: full snapshots / deltas
        self.n_feature_deltas = 0

    def joiner(self, partition: int) -> OnlineJoiner:
        """The partition's joiner, rebuilt from the durable state on first use."""
        j = self.joiners.get(partition)
        if j is None:
            j = self.joiners[partition] = OnlineJoiner(self.settings.join)
            j.limit = self._released_to
            if self.feature_config is not None:
                self.features[partition] = FeatureStage(self.feature_config)
            self._restore(partition, j)
        return j

    def _restore(self, partition: int, j: OnlineJoiner) -> None:
        pending: list[tuple[Impression, float | None]] = []
        done: list[tuple[str, int, float, Impression | None]] = []
        orphans: list[tuple[str, float]] = []
        max_ts: dict[str, float] = {}
        feature_pieces = 0
        feature_deltas = 0
        pieces: dict[int, bytes] = {}
        deltas: dict[int, bytes] = {}
        for key, value in self.state.items(partition):
            try:
                if key.startswith("i/"):
                    d = json.loads(value)
                    # ensure_ascii=False: the size limit is on UTF-8 bytes, and \u escapes
                    # would grow a valid non-ASCII impression past it
                    imp = (parse_impression(json.dumps(d["i"], ensure_ascii=False))
                           if "i" in d else None)  # fmt: skip
                    if "d" in d:
                        done.append((key[2:], int(d["d"]), float(d["t"]), imp))
                    elif imp is not None:
                        pending.append((imp, d["c"]))
                elif key.startswith("c/"):
                    orphans.append((key[2:], float(value)))
                elif key == "w":
                    max_ts = {k: float(v) for k, v in json.loads(value).items()}
                elif key == "f":
                    meta = json.loads(value)
                    feature_pieces = int(meta["n"])
                    feature_deltas = int(meta.get("d", 0))
                elif key.startswith("f/"):
                    pieces[int(key[2:])] = value
                elif key.startswith("fd/"):
                    deltas[int(key[3:])] = value
            except (ValueError, KeyError, TypeError, InvalidEvent) as exc:
                log.error("join state of partition %d: unreadable entry %r: %s", partition,
                          key, exc)  # fmt: skip
        stage = self.features.get(partition)
        if stage is not None and (feature_pieces or feature_deltas):
            try:
                raw = b"".join(pieces[i] for i in range(feature_pieces))
                if feature_pieces:
                    stage.load_state_dict(json.loads(raw))
                for k in range(feature_deltas):  # the journal: replay the calls in order
                    _replay_features(stage, json.loads(deltas[k]))
                self._features_pieces[partition] = feature_pieces
                self._feature_journal[partition] = [
                    len(raw),
                    sum(len(deltas[k]) for k in range(feature_deltas)),
                    feature_deltas,
                ]
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.error("feature state of partition %d unreadable, starting empty: %s",
                          partition, exc)  # fmt: skip
                self.features[partition] = FeatureStage(stage.config)
                self._feature_journal.pop(partition, None)
        if pending or orphans or max_ts or done:
            j.restore(pending, orphans, max_ts, done)
            self.n_restored += len(pending)
            log.info("partition %d: restored %d pending impressions, %d labelled ones and %d"
                     " orphan clicks", partition, len(pending), len(done),
                     len(orphans))  # fmt: skip

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget revoked partitions (their state stays in the changelog for the next
        owner); labels not sent yet stay pending in the state and are emitted again there."""
        partitions = list(partitions)
        for p in partitions:
            self.joiners.pop(p, None)
            self.features.pop(p, None)
            self._feature_log.pop(p, None)
            self._feature_journal.pop(p, None)
            self.outbox.pop(p, None)
            self._wm_saved.pop(p, None)
        self.state.drop(partitions)

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
        self._since_release = 0
        if low <= self._released_to:
            return []
        self._released_to = low
        out: list[LabeledExample] = []
        for p, j in self.joiners.items():
            released = j.release(low)
            if released:
                self.outbox.setdefault(p, []).extend(released)
                out.extend(released)
            self._drain_orphans(p, j)
        return out

    def _drain_orphans(self, partition: int, j: OnlineJoiner) -> None:
        if j.forgotten:
            # a label still in the outbox stays pending in the state until it is sent
            unsent = {e.impression.impression_id for e in self.outbox.get(partition, ())}
            for iid in j.forgotten:
                if iid not in unsent:
                    self.state.delete(partition, "i/" + iid)
            j.forgotten.clear()
        for iid, cts in j.expired_orphans:
            self.state.delete(partition, "c/" + iid)
            self.metrics.dead_letters.labels(reason="orphan_click").inc()
            exc = InvalidEvent("orphan_click", f"no impression within {j.config.orphan_grace_s}"
                               " s of event time after the click")  # fmt: skip
            self.orphans.append(
                DeadLetter.of(TOPIC_CLICKS, partition, -1, exc, Click(iid, cts).to_json())
            )
        j.expired_orphans.clear()

    def handle(
        self, raw: bytes | None, topic: str, partition: int, offset: int
    ) -> tuple[list[LabeledExample], DeadLetter | None]:
        """Process one raw record; returns the labels it released (also queued in
        :attr:`outbox`), or a dead letter."""
        self.offsets[(topic, partition)] = offset
        try:
            event = parse_input(raw, topic)
            self._check_time(event)
        except InvalidEvent as exc:
            self.metrics.dead_letters.labels(reason=exc.reason).inc()
            return [], DeadLetter.of(topic, partition, offset, exc, raw)
        return self._apply(event, raw, topic, partition), None

    def _time_error(self, event: Impression | Click | Watermark) -> InvalidEvent | None:
        """A ``future_ts`` error for an event (or watermark) whose time is beyond the wall
        clock by more than ``max_future_skew_s``: one such record would move the watermark
        into the future and label every later impression negative at once. Replayed logs
        carry past times, so a replay passes (set the skew to ``inf`` to replay a log
        recorded ahead of this clock)."""
        skew = self.settings.max_future_skew_s
        if event.ts > time.time() + skew:
            return InvalidEvent("future_ts", f"ts={event.ts!r} is more than {skew:g} s ahead"
                                " of this worker's clock")  # fmt: skip
        return None

    def _check_time(self, event: Impression | Click | Watermark) -> None:
        exc = self._time_error(event)
        if exc is not None:
            raise exc

    def handle_record(
        self, raw: bytes | None, topic: str, partition: int, offset: int
    ) -> tuple[list[LabeledExample], list[DeadLetter]]:
        """Process one raw record: a single JSON event or an envelope of many
        (:mod:`stream.envelope`). Returns the labels released and the dead letters (one
        per rejected event of an envelope, or one for the whole record)."""
        if not is_envelope(raw):
            released, dl = self.handle(raw, topic, partition, offset)
            return released, [] if dl is None else [dl]
        assert raw is not None
        self.offsets[(topic, partition)] = offset
        try:
            decoded = decode_envelope(raw, topic)
        except InvalidEvent as exc:
            self.metrics.dead_letters.labels(reason=exc.reason).inc()
            return [], [DeadLetter.of(topic, partition, offset, exc, raw)]
        out: list[LabeledExample] = []
        dead: list[DeadLetter] = []
        for event, b in decoded:
            if not isinstance(event, InvalidEvent):
                event = self._time_error(event) or event
            if isinstance(event, InvalidEvent):
                self.metrics.dead_letters.labels(reason=event.reason).inc()
                dead.append(DeadLetter.of(topic, partition, offset, event, b))
            else:
                out.extend(self._apply(event, None, topic, partition))
        return out, dead

    def _apply(
        self, event: Impression | Click | Watermark, raw: bytes | None, topic: str,
        partition: int,
    ) -> list[LabeledExample]:  # fmt: skip
        """Apply one validated input event; ``raw`` is its JSON (None: re-encode it)."""
        j = self.joiner(partition)
        c = j.counters
        before = (c.duplicate_impressions, c.duplicate_clicks, c.late_clicks)
        state = self.state
        if isinstance(event, Watermark):
            source = "clicks" if topic == TOPIC_CLICKS else "impressions"
            out = j.on_watermark(event.ts, source)
            self._save_watermark(partition, j, force=True)
        elif isinstance(event, Click):
            self.metrics.clicks.inc()
            iid = event.impression_id
            stage = self.features.get(partition)
            if stage is not None:
                stage.click(iid, event.ts)
                self._feature_log.setdefault(partition, []).append(["c", iid, event.ts])
            had_orphan = iid in j.orphan_clicks
            out = j.on_click(event)
            imp = j.pending.get(iid)
            if imp is not None and iid in j.clicked:
                state.put(partition, "i/" + iid, _pending_value(imp, j.clicked[iid]))
            elif not had_orphan and iid in j.orphan_clicks:
                state.put(partition, "c/" + iid, repr(event.ts).encode())
            self._save_watermark(partition, j)
        else:
            assert isinstance(event, Impression)
            self.metrics.impressions.inc()
            iid = event.impression_id
            stage = self.features.get(partition)
            if stage is not None:
                hist = stage.impression(iid, event.ts, event.user_id, event.item_id,
                                        event.position, event.features)  # fmt: skip
                if hist is not None:  # None: a duplicate (the joiner drops it too)
                    self._feature_log.setdefault(partition, []).append(
                        [
                            "i",
                            iid,
                            event.ts,
                            event.user_id,
                            event.item_id,
                            event.position,
                            _stage_attrs(event.features),
                        ]  # fmt: skip
                    )
                    event = with_history(event, hist)
                    raw = None
            had_orphan = iid in j.orphan_clicks
            known = iid in j.pending
            out = j.on_impression(event)
            if not known and iid in j.pending:
                click_ts = j.clicked.get(iid)
                state.put(partition, "i/" + iid, b'{"c":%s,"i":%s}' % (
                    b"null" if click_ts is None else repr(click_ts).encode(),
                    raw if isinstance(raw, bytes) else event.to_json()))  # fmt: skip
            if had_orphan and iid not in j.orphan_clicks:
                state.delete(partition, "c/" + iid)
            self._save_watermark(partition, j)
        if out:
            self.outbox.setdefault(partition, []).extend(out)
        if j.expired_orphans or j.forgotten:
            self._drain_orphans(partition, j)
        # the global release looks at every partition's watermark: every RELEASE_EVERY
        # records and on producer watermarks is plenty (windows are minutes long)
        self._since_release += 1
        if self._since_release >= self.RELEASE_EVERY or isinstance(event, Watermark):
            out.extend(self._release())
        m = self.metrics
        after = (c.duplicate_impressions, c.duplicate_clicks, c.late_clicks)
        if after != before:
            m.duplicate_impressions.inc(after[0] - before[0])
            m.duplicate_clicks.inc(after[1] - before[1])
            m.late_clicks.inc(after[2] - before[2])
        if out:
            self._count_labels(out)
        return out

    def _count_labels(self, out: list[LabeledExample]) -> None:
        positives = sum(e.label for e in out)
        if positives:
            self.metrics.labeled.labels(label="positive").inc(positives)
        if len(out) > positives:
            self.metrics.labeled.labels(label="negative").inc(len(out) - positives)

    def _save_watermark(self, partition: int, j: OnlineJoiner, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._wm_saved.get(partition, -1e18) < self.WATERMARK_PERSIST_S:
            return
        self._wm_saved[partition] = now
        marks = {k: v for k, v in j.max_ts.items() if np.isfinite(v)}
        if marks:
            self.state.put(partition, "w", json.dumps(marks).encode())

    def save_features(self) -> int:
        """Journal what each partition's feature stage did since its last save; call it
        right before the state is flushed and input offsets are committed, so that a
        restarted worker's stage is exactly the one of the committed records and
        redelivered ones replay onto it. Returns the bytes written.

        The journal is a snapshot (the whole stage as JSON in entries ``f/0``, ``f/1``,
        ... that each fit a changelog record) plus deltas ``fd/0``, ``fd/1``, ... (the
        stage's calls since, in order); ``f`` holds their counts. A save writes one delta;
        once the deltas outgrow a quarter of the snapshot (and
        :attr:`FEATURE_SNAPSHOT_MIN_BYTES`) it writes a new snapshot and drops them, so a
        commit costs O(new events), not O(state) (the whole stage at every commit made the
        worker quadratic: 36 MB of JSON per save after 50k impressions)."""
        written = 0
        size = max(1024, self.settings.max_message_bytes // 2)
        for p, stage in self.features.items():
            calls = self._feature_log.pop(p, None)
            if not calls:
                continue
            snap_bytes, delta_bytes, n_deltas = self._feature_journal.get(p, [0, 0, 0])
            chunks = _delta_chunks(calls, size)
            new_bytes = sum(len(c) for c in chunks)
            if delta_bytes + new_bytes > max(snap_bytes // 4, self.FEATURE_SNAPSHOT_MIN_BYTES):
                raw = json.dumps(stage.state_dict(), separators=(",", ":")).encode()
                pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
                for i, piece in enumerate(pieces):
                    self.state.put(p, f"f/{i}", piece)
                for i in range(len(pieces), self._features_pieces.get(p, 0)):
                    self.state.delete(p, f"f/{i}")
                for k in range(n_deltas):
                    self.state.delete(p, f"fd/{k}")
                self._features_pieces[p] = len(pieces)
                self._feature_journal[p] = [len(raw), 0, 0]
                self.n_feature_snapshots += 1
                written += len(raw)
            else:
                for k, chunk in enumerate(chunks, start=n_deltas):
                    self.state.put(p, f"fd/{k}", chunk)
                self._feature_journal[p] = [snap_bytes, delta_bytes + new_bytes,
                                            n_deltas + len(chunks)]  # fmt: skip
                self.n_feature_deltas += 1
                written += new_bytes
            n, d = self._features_pieces.get(p, 0), self._feature_journal[p][2]
            self.state.put(p, "f", json.dumps({"n": n, "d": d}).encode())
        return written

    def take_outbox(self) -> dict[int, list[LabeledExample]]:
        """Hand over the queued labels (partition -> examples); call :meth:`sent` once the
        producer has them."""
        out, self.outbox = self.outbox, {}
        return out

    def take_ready(self, min_size: int | None = None) -> dict[int, list[LabeledExample]]:
        """Hand over the queued labels of every partition holding at least ``min_size``
        (None: any) of them; the others stay queued. Taken at once, so two flushers that
        interleave on an event loop never send (or drop) the same labels twice."""
        ready = {
            p: buf
            for p, buf in self.outbox.items()
            if buf and (min_size is None or len(buf) >= min_size)
        }
        for p in ready:
            del self.outbox[p]
        return ready

    def sent(self, partition: int, examples: Iterable[LabeledExample]) -> None:
        """The labels are with the producer: their impressions turn from pending into
        labelled in the durable state (kept for the dedup horizon, then deleted)."""
        j = self.joiners.get(partition)
        if j is None:  # revoked meanwhile: the new owner re-emits them
            return
        for e in examples:
            iid = e.impression.impression_id
            if iid in j.pending:  # a fake negative: the impression still waits for a click
                continue
            if iid not in j.done:  # already past the dedup horizon: forgotten
                self.state.delete(partition, "i/" + iid)
                continue
            imp = b"" if e.label else b',"i":' + e.impression.to_json()
            self.state.put(partition, "i/" + iid,
                           b'{"d":%d,"t":%r%s}' % (e.label, e.label_ts, imp))  # fmt: skip

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
        """Called periodically: releases what became due (inputs went idle, or the records
        since the last release moved the watermarks)."""
        out = self._release()
        if out:
            self._count_labels(out)
        return out

    def update_gauges(self) -> None:
        self.metrics.pending_impressions.set(sum(len(j.pending) for j in self.joiners.values()))
        js = list(self.joiners.values())
        m = self.metrics
        m.join_state_bytes.labels(kind="pending").set(sum(j.pending_bytes for j in js))
        m.join_state_bytes.labels(kind="done").set(sum(j.done_bytes for j in js))
        m.join_state_bytes.labels(kind="orphans").set(sum(j.orphan_bytes for j in js))
        m.orphan_clicks_waiting.set(sum(len(j.orphan_clicks) for j in js))
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
    #: user id -> the newest ``max_seen`` items shown to them (clicked or not), for the
    #: hard-negative pools ("seen without a click")
    seen: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    max_seen: int = 50

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
        shown = self.seen.setdefault(user_id, OrderedDict())
        shown[item_id] = None
        shown.move_to_end(item_id)
        if len(shown) > self.max_seen:
            shown.popitem(last=False)
        if len(self.users) > self.max_users:
            gone, _ = self.users.popitem(last=False)
            self.seen.pop(gone, None)

    def seen_sets(self) -> dict[str, set[str]]:
        return {u: set(items) for u, items in self.seen.items()}


class _FncThen:
    """``calibrator.transform(fnc_correct(p))`` (serving with fake-negative calibration)."""

    def __init__(self, calibrator: Calibrator) -> None:
        self.calibrator = calibrator

    def transform(self, p: np.ndarray) -> np.ndarray:
        return self.calibrator.transform(fnc_correct(p))

    def __getattr__(self, name: str) -> object:
        return getattr(self.calibrator, name)


class SeenKeys:
    """The newest ``horizon`` keys seen, to drop redelivered records (delivery is
    at-least-once).

    >>> seen = SeenKeys(horizon=2)
    >>> [seen.first_time(k) for k in ("a", "a", "b", "c", "a")]
    [True, False, True, True, True]
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def first_time(self, key: Hashable) -> bool:
        keys = self._keys
        if key in keys:
            return False
        keys[key] = None
        if len(keys) > self.horizon:
            keys.popitem(last=False)
        return True

    def filter(self, examples: Iterable[LabeledExample]) -> list[LabeledExample]:
        """The examples whose (impression_id, label) is new: a correction (label 1 after a
        label 0) or a fake negative's positive is not a duplicate.

        >>> seen = SeenKeys(horizon=10)
        >>> imp = Impression("a", 0.0, "u", "i")
        >>> neg = LabeledExample(imp, 0, 1.0, kind="negative")
        >>> fix = LabeledExample(imp, 1, 2.0, kind="correction")
        >>> [e.kind for e in seen.filter([neg, neg, fix])]
        ['negative', 'correction']
        """
        return [e for e in examples if self.first_time((e.impression.impression_id, e.label))]

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class TakenBatch:
    """A micro-batch :meth:`TrainerService.take` removed from the buffer."""

    examples: list[LabeledExample]
    emitted_at: list[float | None]  # wall time the joiner sent each, parallel


@dataclass(frozen=True)
class StepResult:
    """What :meth:`TrainerService.compute` gives back: scores taken before learning."""

    p_raw: np.ndarray  # (N,) float64, the ranker's
    p: np.ndarray  # (N,) float64, calibrated
    seconds: float  # wall seconds of the score-and-learn
    skipped_nonfinite: bool  # the update was skipped (non-finite loss or gradient)


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
                # the online loss follows the labelling scheme (e.g. "fnw" on fake
                # negatives), whatever loss the checkpoint was pretrained with
                ranker = TorchRanker.load(
                    cfg.warm_start,
                    device=settings.ranker.device,
                    online=True,
                    loss=settings.ranker.loss,
                )
            else:
                ranker = TorchRanker(settings.ranker, seed=cfg.seed, online=True)
        self.ranker = ranker
        #: the retrieval model (``settings.retrieval == "two_tower"``), trained on the
        #: positives of every micro-batch after the ranker; None: serving retrieves with
        #: the ranker's own user and item embeddings
        self.two_tower: TwoTowerModel | None = (
            TwoTowerModel(settings.two_tower, seed=cfg.seed)
            if settings.retrieval == "two_tower"
            else None
        )
        self.calibrator: Calibrator = PlattCalibrator()
        self.calibrator_version = 0
        self.model_version = 0
        self.buffer: list[LabeledExample] = []
        self.emitted_at: list[float | None] = []  # parallel to buffer
        self.buffer_since: float | None = None
        self.catalogue = Catalogue(settings.indexer.max_items, settings.indexer.max_users)
        self.applied = SeenKeys(cfg.dedup_horizon)
        self.checkpoints: list[Path] = []
        self.n_examples = 0
        self.n_corrections = 0
        self._last_checkpoint = time.monotonic()
        #: the model store this worker publishes to (trainer/all roles with a store)
        self.store: DirectoryStore | None = (
            DirectoryStore(settings.model_store, keep=settings.store.keep)
            if settings.model_store and settings.role in ("trainer", "all")
            else None
        )
        self.published: Manifest | None = None
        self._published_key: tuple[object, ...] = ()
        self._last_publish = time.monotonic()
        if self.store is not None:  # a restart continues from the store, not the warm start
            self._resume_from_store(self.store)
        metrics.model_version.set(0)
        metrics.calibrator_version.set(0)

    def add(self, examples: list[LabeledExample], emitted_at: float | None = None) -> int:
        """Buffer examples; ``emitted_at``: wall time (epoch s) the joiner sent them, for the
        label-to-update freshness histogram. Returns how many were buffered.

        Idempotent within a horizon: an example whose (impression_id, label) this trainer
        already applied (a redelivery after a crash or a rebalance, delivery being
        at-least-once) is dropped and counted in ``streamrec_duplicate_examples_total``.
        A correction (label 1 after a label 0) and a fake negative's positive are not
        duplicates.
        """
        fresh = self.applied.filter(examples)
        if len(fresh) < len(examples):
            self.metrics.duplicate_examples.labels(stage="trainer").inc(len(examples) - len(fresh))
        examples = fresh
        if examples and self.buffer_since is None:
            self.buffer_since = time.monotonic()
        self.buffer.extend(examples)
        self.emitted_at.extend([emitted_at] * len(examples))
        return len(examples)

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
        """Score then learn one micro-batch from the buffer; None if the buffer is empty.

        The same as :meth:`take`, :meth:`compute` and :meth:`finish` in a row; a worker
        runs :meth:`compute` on a thread, the other two on its event loop.
        """
        taken = self.take()
        return None if taken is None else self.finish(taken, self.compute(taken))

    def take(self) -> TakenBatch | None:
        """Remove the next micro-batch (up to ``trainer.batch_size`` examples) from the
        buffer; None if it is empty."""
        bs = self.settings.trainer.batch_size
        batch, self.buffer = self.buffer[:bs], self.buffer[bs:]
        emitted, self.emitted_at = self.emitted_at[:bs], self.emitted_at[bs:]
        self.buffer_since = time.monotonic() if self.buffer else None
        return TakenBatch(batch, emitted) if batch else None

    def compute(self, taken: TakenBatch) -> StepResult:
        """Score then learn ``taken`` with the ranker (and the two-tower model on its
        clicks): the models' state only, so it may run off the event loop (one call at a
        time). Returns the raw and calibrated scores (N,) float64 and the step's seconds."""
        batch = taken.examples
        rows = [example_row(e.impression) for e in batch]
        y = np.fromiter((e.label for e in batch), dtype=np.float64, count=len(batch))
        w = np.fromiter((e.weight for e in batch), dtype=np.float64, count=len(batch))
        if (half_life := self.settings.trainer.time_decay_half_life_s) is not None:
            ts = np.fromiter((e.impression.ts for e in batch), dtype=np.float64, count=len(batch))
            w *= time_decay_weights(ts, float(ts.max()), half_life)
        skipped_before = self.ranker.n_skipped_nonfinite
        t0 = time.perf_counter()
        p_raw = self.ranker.score_and_learn(rows, y, w)
        if self.settings.trainer.fnc:  # the model learnt p / (1 + p) from fake negatives
            p_raw = fnc_correct(p_raw)
        if self.two_tower is not None and y.any():
            self.two_tower.learn_many(rows, y)
        seconds = time.perf_counter() - t0
        p = self.calibrator.transform(p_raw)
        skipped = self.ranker.n_skipped_nonfinite > skipped_before
        return StepResult(np.asarray(p_raw, dtype=np.float64), np.asarray(p, np.float64),
                          seconds, skipped)  # fmt: skip

    def finish(self, taken: TakenBatch, result: StepResult) -> ScoredBatch:
        """Metrics, catalogue and counters after :meth:`compute`; the ``scored`` batch."""
        batch, emitted = taken.examples, taken.emitted_at
        m = self.metrics
        tt = self.two_tower
        if tt is not None:
            if tt.mean_hard_score is not None:
                m.retrieval_negative_cosine.labels(kind="hard").set(tt.mean_hard_score)
            if tt.mean_random_score is not None:
                m.retrieval_negative_cosine.labels(kind="random").set(tt.mean_random_score)
            m.retrieval_hard_share.set(tt.hard_share)
        m.train_step_seconds.observe(result.seconds)
        now = time.time()
        for e, sent in zip(batch, emitted, strict=True):
            m.label_delay_seconds.observe(max(0.0, e.label_ts - e.impression.ts))
            if sent is not None:
                m.update_freshness_seconds.observe(max(0.0, now - sent))
        if result.skipped_nonfinite:
            m.nonfinite_batches.inc()
        else:
            m.train_batches.inc()
            if self.ranker.last_loss is not None:
                m.train_loss.set(self.ranker.last_loss)
        self.model_version = self.ranker.n_updates
        m.model_version.set(self.model_version)
        for e in batch:
            imp = e.impression
            self.catalogue.add(imp.user_id, imp.item_id, bool(e.label))
            if e.kind == "correction":
                self.n_corrections += 1
        self.n_examples += len(batch)
        m.scored.inc(len(batch))
        return ScoredBatch(
            model_version=self.model_version,
            calibrator_version=self.calibrator_version,
            impression_ids=[e.impression.impression_id for e in batch],
            ts=[e.impression.ts for e in batch],
            label=[int(e.label) for e in batch],
            p_raw=[float(x) for x in result.p_raw],
            p=[float(x) for x in result.p],
            segment=[segment_of(e.impression.position) for e in batch],
            true_p=[e.impression.true_p for e in batch],
        )

    def apply_control(self, msg: dict[str, object]) -> None:
        """Apply a ``control`` message: a calibrator from the monitor. A ``model``
        announcement is not loaded here: a ``serve`` worker loads it from the model store
        (:class:`modelstore.snapshot.ModelReplica`, path confined to the store and checked
        against the manifest's digest); nothing loads a file a record points at."""
        if msg.get("kind") == "model":
            return
        elif msg.get("kind") == "calibrator":
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
        path = d / f"ranker-v{self.model_version:08d}.pt"
        tmp = ""
        try:
            d.mkdir(parents=True, exist_ok=True)
            self.ranker.save(path)  # atomic: a temp file, fsync, rename (removed on error)
            # a unique temp name (O_EXCL): a planted symlink is never followed
            fd, tmp = tempfile.mkstemp(prefix=".LATEST.", suffix=".tmp", dir=d)
            with os.fdopen(fd, "w") as f:
                f.write(path.name)
            os.replace(tmp, d / "LATEST")
        except OSError as exc:
            # e.g. ENOSPC: the previous checkpoint and LATEST stay as they were; training
            # goes on (a raise here would drop the micro-batch) and the next one is tried
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            log.error("checkpoint %s not written (%s); the previous one is kept", path,
                      exc.strerror or exc)  # fmt: skip
            self.metrics.store_failures.labels(reason="checkpoint").inc()
            return None
        if path not in self.checkpoints:
            self.checkpoints.append(path)
        # retention by count: the newest ``keep_checkpoints`` files of this naming stay
        keep = cfg.keep_checkpoints
        old = sorted(p for p in d.glob("ranker-v*.pt") if p.is_file() and not p.is_symlink())
        for stale in old[:-keep] if len(old) > keep else []:
            stale.unlink(missing_ok=True)
        self.checkpoints = [p for p in self.checkpoints if p.exists()]
        return path

    def _resume_from_store(self, store: DirectoryStore) -> None:
        """A restarted trainer continues from the newest good version of its store (ranker,
        two-tower, calibrator), ahead of ``trainer.warm_start`` (which only seeds an empty
        store); a version that fails its checksums is skipped."""
        from modelstore.snapshot import load_snapshot

        for version in reversed(store.versions()):
            try:
                loaded = load_snapshot(
                    store, version, device=self.settings.ranker.device, optimizer=True
                )
            except StoreError as exc:
                log.warning("model store: cannot resume from version %d: %s", version, exc)
                continue
            self.ranker = loaded.ranker
            if self.two_tower is not None and loaded.two_tower is not None:
                self.two_tower = loaded.two_tower
            self.calibrator, self.calibrator_version = loaded.calibrator, loaded.calibrator_version
            self.model_version = self.ranker.n_updates
            self.metrics.model_version.set(self.model_version)
            self.metrics.calibrator_version.set(self.calibrator_version)
            log.info("resumed from model store version %d (model %d)", version,
                     self.model_version)  # fmt: skip
            return

    def _published_state(self, index: IndexSnapshot | None) -> tuple[object, ...]:
        tt = self.two_tower
        return (self.ranker.n_updates, None if tt is None else tt.n_updates,
                None if index is None else index.version, self.calibrator_version)  # fmt: skip

    def publish_due(self, index: IndexSnapshot | None = None, force: bool = False) -> bool:
        """True when a snapshot should go to the model store now: ``store.publish_every_s``
        passed (or ``force``) and a model, ``index`` or the calibrator changed since the
        last one (an idle trainer writes nothing)."""
        if self.store is None or self.n_examples == 0:
            return False
        if self.published is not None and self._published_key == self._published_state(index):
            return False
        every = self.settings.store.publish_every_s
        return force or time.monotonic() - self._last_publish >= every

    def publish(self, index: IndexSnapshot | None) -> Manifest | None:
        """Publish ranker, two-tower, ``index``, calibrator to the model store (blocking:
        run it where no training step can run meanwhile). None without a store or when the
        write failed (logged and counted; the next one is tried on schedule)."""
        if self.store is None:
            return None
        self._last_publish = time.monotonic()
        t0 = time.perf_counter()
        try:
            m = publish_snapshot(self.store, self.ranker, self.two_tower, index,
                                 self.calibrator, self.calibrator_version)  # fmt: skip
        except (OSError, ValueError) as exc:
            log.error("model store: publishing failed: %s", exc)
            self.metrics.store_failures.labels(reason="publish").inc()
            return None
        self.published = m
        self._published_key = self._published_state(index)
        mt = self.metrics
        mt.store_publish_seconds.observe(time.perf_counter() - t0)
        mt.store_version.set(m.version)
        mt.store_bytes.set(m.total_bytes)
        return m

    def store_announcement(self, m: Manifest) -> dict[str, object]:
        """The ``control`` record of a published version: store version, its directory,
        the manifest's SHA-256 (replicas accept nothing else) and the model versions."""
        return {"kind": "model", "version": m.version, "path": str(m.path.resolve()),
                "digest": m.digest, "model_version": m.meta.get("model_version"),
                "index_version": m.meta.get("index_version"),
                "created_at": m.created_at}  # fmt: skip

    def serving_calibrator(self) -> Calibrator:
        """What /recommend applies to the ranker's scores: the calibrator, after the FNC
        correction when ``trainer.fnc`` is on (as :meth:`step` does for the monitor)."""
        if not self.settings.trainer.fnc:
            return self.calibrator
        return _FncThen(self.calibrator)  # type: ignore[return-value]  # transform only


class MonitorService:
    """Calibration gauges per window and segment, the drift tests, and recalibration.

    Windows (served and raw scores): the newest ``monitor.window`` examples (gauge label
    e.g. ``"20k"``; equal-mass reliability bins), the newest ``monitor.time_window_s`` seconds
    of event time (label e.g. ``"1h"``; fixed reliability bins) and the lifetime; one count
    window and one drift detector per segment (slate position; at most ``max_segments``).
    An alarm of the drift test on all examples after the warm-up recalibrates by
    ``monitor.recalibration`` (see :class:`stream.settings.MonitorConfig` and
    :class:`learners.calibration.TrackingRecalibrator`); a per-segment alarm is counted
    (``streamrec_segment_drift_alarms_total``) but recalibrates nothing.
    """

    def __init__(self, settings: Settings, metrics: StreamrecMetrics) -> None:
        # Imported here rather than at the top: this class is the only user in the module.
        from learners.calibration import TrackingConfig, TrackingRecalibrator
        from learners.guarded import GuardConfig, GuardedRecalibrator
        from monitoring.calibration import TimeCalibrationWindow
        from monitoring.drift import SegmentedDriftDetector

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
        self.tracker = TrackingRecalibrator(
            TrackingConfig(
                kind=cfg.calibrator,
                recal_window=cfg.recal_window,
                max_window=cfg.recal_max_window,
                refit_every=cfg.refit_every,
                holdout_fraction=cfg.holdout_fraction,
                trend=cfg.level_trend,
                identity_tolerance=cfg.identity_tolerance,
                settle_refits=0 if cfg.recalibration == "continuous" else cfg.settle_refits,
            )
        )
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
        #: final labels of a fake-negative stream (None: the labels are final already)
        self.outcomes: FinalOutcomes | None = (
            FinalOutcomes(settings.join.window_s, settings.join.lateness_s)
            if settings.join.delayed_feedback == "fake_negative"
            else None
        )
        self.n_seen = 0
        self.n_alarms = 0
        self.n_recalibrations = 0
        self.n_rejected = 0
        self.events: list[dict[str, object]] = []
        self.window_label = f"{cfg.window // 1000}k" if cfg.window >= 1000 else str(cfg.window)
        s = cfg.time_window_s
        self.time_label = (
            f"{s / 3600:g}h" if s % 3600 == 0 else f"{s / 60:g}m" if s % 60 == 0 else f"{s:g}s"
        )

    def _new_detector(self) -> DriftDetector:
        cfg = self.settings.monitor
        if cfg.detector == "window_z":
            return CalibrationDriftDetector(self.settings.drift)
        return make_detector(cfg.detector)

    def observe(self, batch: ScoredBatch) -> list[dict[str, object]]:
        """Update statistics with one scored batch; returns the control messages to
        publish: a ``drift`` record per alarm, and a ``calibrator`` whenever a new version
        is published (an accepted refit, or a level update while tracking).

        With ``join.delayed_feedback="fake_negative"`` the batch's labels are provisional:
        each impression is judged once, on its final label, when its attribution window
        has closed (:class:`monitoring.outcomes.FinalOutcomes`), with the scores of its
        first record (taken when it reached the trainer, at its impression time)."""
        if self.outcomes is None:
            return self._observe(
                np.asarray(batch.p, dtype=np.float64),
                np.asarray(batch.p_raw, dtype=np.float64),
                np.asarray(batch.label, dtype=np.float64),
                np.asarray(batch.ts, dtype=np.float64),
                np.asarray(batch.segment),
            )
        self.outcomes.add(
            batch.impression_ids,
            ts=batch.ts,
            label=batch.label,
            columns={"p": batch.p, "p_raw": batch.p_raw, "segment": batch.segment},
        )
        done = self.outcomes.resolve()
        if not done:
            return []
        return self._observe(done["p"], done["p_raw"], done["label"], done["ts"], done["segment"])

    def _observe(
        self, p: np.ndarray, p_raw: np.ndarray, y: np.ndarray, ts: np.ndarray, segs: np.ndarray
    ) -> list[dict[str, object]]:
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
        out: list[dict[str, object]] = []
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

    def _on_guard(
        self, p_raw: np.ndarray, y: np.ndarray, event_ts: float
    ) -> list[dict[str, object]]:
        """recalibration="guarded": judge a waiting refit on these forward labels, or the
        served calibrator against the raw ranker (rollback); a calibrator when it changes."""
        assert self.guard is not None
        out: list[dict[str, object]] = []
        for ev in self.guard.update(p_raw, y):
            if ev.kind == "rollback":
                self.n_rollbacks += 1
                self.metrics.recalibration_rollbacks.inc()
                log.info("recalibration rolled back (served lost %.5f nats to raw)", ev.gain)
                out.append(self._refit_record(None, event_ts, "rollback"))
            else:
                out.append(self._count_refit(ev.kind == "accepted", event_ts, "guarded"))
            out[-1].update(gain_nats=ev.gain, se_nats=ev.se)
            if ev.kind != "rejected":
                out.append(self._calibrator_message(ev.calibrator, event_ts, ev.kind))
                self.served.reset_window()
        return out

    def apply_control(self, msg: dict[str, object]) -> None:
        """Adopt a newer calibrator seen on ``control`` (e.g. published before a restart),
        so that this monitor's next version number continues from it; tracking resumes
        from it when it is not the identity."""
        if msg.get("kind") == "calibrator":
            version = int(msg["version"])  # type: ignore[call-overload]  # validated by sender
            if version > self.calibrator_version:
                self.calibrator = calibrator_from_dict(msg["params"])  # type: ignore[arg-type]
                self.calibrator_version = version
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

    def _calibrator_message(
        self, calibrator: Calibrator, event_ts: float, reason: str
    ) -> dict[str, object]:
        self.calibrator = calibrator
        self.calibrator_version += 1
        self.metrics.calibrator_updates.inc()
        return {
            "kind": "calibrator",
            "version": self.calibrator_version,
            "params": calibrator.to_dict(),
            "event_ts": event_ts,
            "reason": reason,
        }

    def _refit_record(
        self, accepted: bool | None, event_ts: float, reason: str
    ) -> dict[str, object]:
        decision = "rollback" if accepted is None else "accepted" if accepted else "rejected"
        record: dict[str, object] = {
            "kind": "recalibration",
            "event_ts": event_ts,
            "examples_seen": self.n_seen,
            "decision": decision,
            "reason": reason,
        }
        return record

    def _count_refit(self, accepted: bool, event_ts: float, reason: str) -> dict[str, object]:
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

    def _on_refit(self, event_ts: float) -> list[dict[str, object]]:
        """A periodic refit while tracking: counted, and published when it changes."""
        result = self.tracker.refit()
        if result.accepted is None:  # too few clicks in the window yet
            return []
        record = self._count_refit(result.accepted, event_ts, "periodic")
        if result.published is None:
            return [record]
        reason = "identity" if result.disarmed else "refit" if result.accepted else "level"
        return [record, self._calibrator_message(result.published, event_ts, reason)]

    def _on_drift(self, event_ts: float) -> list[dict[str, object]]:
        cfg = self.settings.monitor
        self.n_alarms += 1
        self.metrics.drift_alarms.inc()
        z = float(getattr(self.detector, "last_alarm_statistic", self.detector.statistic))
        self.detector.reset()  # starts the cooldown
        published: Calibrator | None
        if cfg.recalibration in ("off", "guarded"):
            # guarded: a refit fitted now is judged on the labels that come after it
            proposed = self.guard.propose() if self.guard is not None else False
            alarm: dict[str, object] = {
                "kind": "drift",
                "event_ts": event_ts,
                "examples_seen": self.n_seen,
                "z": z,
                "accepted": None,
                "proposed": proposed,
            }
            self.events.append(alarm)
            return [alarm]
        if cfg.recalibration == "alarm":
            p_raw, y = self.raw.window_arrays()
            p_raw, y = p_raw[-cfg.recal_window :], y[-cfg.recal_window :]
            n_hold = max(1, int(len(y) * cfg.holdout_fraction))
            chosen, accepted, ll_old, ll_new = fit_if_better(
                p_raw[:-n_hold], y[:-n_hold], p_raw[-n_hold:], y[-n_hold:], self.calibrator,
                kind=cfg.calibrator,
            )  # fmt: skip
            published = chosen if accepted else None
        else:
            self.tracker.restart()
            result = self.tracker.refit()
            accepted = bool(result.accepted)
            ll_old, ll_new = result.holdout_logloss_old, result.holdout_logloss_new
            published = result.published
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
        self.built_at_update = 0  # the retrieval model's update count at the last build
        self.built_items = 0  # catalogue items at the last build

    def due(self, ranker: TorchRanker, two_tower: TwoTowerModel | None) -> bool:
        """True when ``indexer.refresh_updates`` model updates happened since the last
        build (the timer refreshes every ``indexer.refresh_s`` seconds as well)."""
        every = self.settings.indexer.refresh_updates
        updates = ranker.n_updates if two_tower is None else two_tower.n_updates
        return every > 0 and updates - self.built_at_update >= every

    def refresh(
        self, ranker: TorchRanker, catalogue: Catalogue, two_tower: TwoTowerModel | None = None
    ) -> dict[str, object] | None:
        """Build a new snapshot off the serving path from the retrieval model's item
        vectors (``two_tower``, else the ranker's embeddings), verify it (size, unit norms,
        recall@K against exact search on a sample) and swap it in atomically; a snapshot
        that fails keeps the old one serving and is counted. Then refresh the hard-negative
        pools from it. Returns the ``control`` message (``index`` or ``index_rejected``), or
        None when there is nothing to index or nothing changed since the last build (same
        model update count and catalogue size)."""
        items = list(catalogue.items)
        if not items:
            return None
        model: TorchRanker | TwoTowerModel = two_tower if two_tower is not None else ranker
        if self.version > 0 and (model.n_updates, len(items)) == (
            self.built_at_update,
            self.built_items,
        ):
            return None  # the same model over the same catalogue: nothing to rebuild
        t0 = time.perf_counter()
        vectors = model.item_vectors(items)
        m = self.metrics
        try:
            snapshot = build_snapshot(
                items, vectors, version=self.version + 1, config=self.settings.index
            )
        except ValueError as exc:  # e.g. non-finite vectors from a diverged model
            m.index_rejected.inc()
            log.warning("index v%d not built, v%d keeps serving: %s", self.version + 1,
                        self.version, exc)  # fmt: skip
            return {"kind": "index_rejected", "version": self.version + 1, "reasons": [str(exc)]}
        check = self.holder.swap_if_valid(snapshot)
        if not check.ok:
            m.index_rejected.inc()
            log.warning("index v%d rejected, v%d keeps serving: %s", snapshot.version,
                        self.version, "; ".join(check.reasons))  # fmt: skip
            return {"kind": "index_rejected", "version": snapshot.version,
                    "reasons": list(check.reasons)}  # fmt: skip
        self.version = snapshot.version
        self.built_at_update = model.n_updates
        self.built_items = len(items)
        users = list(reversed(catalogue.users))  # most recent first
        now = time.time()
        if users:
            self.pool.refresh(snapshot, users, model.user_vectors(users), catalogue.users,
                              now=now, seen=catalogue.seen_sets())  # fmt: skip
        m.index_refreshes.inc()
        m.index_version.set(self.version)
        m.index_items.set(len(snapshot))
        m.hard_negative_pool_users.set(self.pool.n_users)
        m.hard_negative_pool_items.set(self.pool.size)
        return {
            "kind": "index",
            "version": self.version,
            "items": len(snapshot),
            "index_kind": snapshot.kind,
            "recall_check": check.recall,
            "retrieval_model": "ranker_embeddings" if two_tower is None else "two_tower",
            "pool_users": self.pool.n_users,
            "build_s": time.perf_counter() - t0,
        }


def control_bytes(msg: dict[str, object]) -> bytes:
    return json.dumps(msg).encode()
