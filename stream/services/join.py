"""Join room: impressions and clicks in, labelled examples out."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from features.config import FeatureConfig
from features.stage import FeatureStage
from logs.events import (
    HISTORY_PREFIX,
    MAX_TS,
    MIN_TS,
    TASK1_KINDS,
    TOPIC_CLICKS,
    Click,
    DeadLetter,
    Impression,
    InvalidEvent,
    LabeledExample,
    Watermark,
    parse_input,
    parse_stored_impression,
    with_history,
    without_history,
)
from monitoring.metrics import StreamrecMetrics
from stream.envelope import decode_envelope, is_envelope
from stream.join import OnlineJoiner
from stream.services.join_state import (
    JoinState,
    MemoryJoinState,
    delta_chunks,
    load_json,
    pending_value,
    replay_features,
    snapshot_json,
    state_json,
)
from stream.settings import Settings

log = logging.getLogger(__name__)


def feature_config(settings: Settings) -> FeatureConfig:
    """The feature stage settings of one input partition on a worker (the joiner's, and a
    :class:`stream.services.follower.FeatureFollower`'s): ``feature_max_bytes /
    partitions`` each, at least 1 MiB."""
    return FeatureConfig(max_bytes=max(2**20, settings.feature_max_bytes // settings.partitions))


#: a gap between two beats of the worker (JoinService.beat: every input record, and the
#: flush timer every 0.2 s) longer than this is a stall, not quiet time (seconds)
STALL_S = 1.0


def joiner_mark(j: OnlineJoiner) -> float:
    """One input partition's event-time mark (see :meth:`JoinService.marks`): its joiner's
    watermark, capped where its releases are capped; ``MIN_TS`` while it is not a time a
    ``labeled`` header may carry."""
    w = min(j.watermark, j.limit)
    return w if MIN_TS <= w < MAX_TS else MIN_TS


def segment_of(position: int | None) -> str:
    """Bounded segment label: the slate position 1..9, ``10+`` or ``unknown``."""
    if position is None:
        return "unknown"
    return str(position) if position < 10 else "10+"


def _stage_attrs(features: Mapping[str, object]) -> dict[str, str]:
    """The impression attributes the feature stage reads (``item_*`` strings)."""
    return {k: v for k, v in features.items() if k.startswith("item_") and isinstance(v, str)}


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
        # the labelled counters' children, looked up once (labels() takes a lock and builds
        # a key: ~3% of a worker's samples when called for every emitted batch)
        self._labeled_pos = metrics.labeled.labels(label="positive")
        #: streamrec_conversions_total by outcome, as last exported (_export_conversions)
        self._conversions_exported: tuple[int, ...] = (0, 0, 0, 0)
        self._labeled_neg = metrics.labeled.labels(label="negative")
        self.state: JoinState = state if state is not None else MemoryJoinState()
        self.joiners: dict[int, OnlineJoiner] = {}
        self._released_to = float("-inf")
        self._beat_at = time.monotonic()  # the last beat() (a record or the timer)
        #: assigned input partitions without a joiner yet -> wall time first seen (marks)
        self._unseen_since: dict[int, float] = {}
        self.offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset
        self.outbox: dict[int, list[LabeledExample]] = {}  # partition -> labels to send
        self.orphans: list[DeadLetter] = []  # orphan clicks given up on, to dead-letter
        self._wm_saved: dict[int, float] = {}  # partition -> wall time of the last save
        self.n_restored = 0
        self._since_release = 0
        #: partition -> its feature stage (historical features, ``Settings.features``)
        self.features: dict[int, FeatureStage] = {}
        self.feature_config: FeatureConfig | None = (
            feature_config(settings) if settings.features else None
        )
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
        converting: list[tuple[Impression, float, bool, float | None]] = []
        early: list[tuple[str, float]] = []
        max_ts: dict[str, float] = {}
        feature_pieces = 0
        feature_deltas = 0
        pieces: dict[int, bytes] = {}
        deltas: dict[int, bytes] = {}
        for key, value in self.state.items(partition):
            try:
                if key.startswith("i/"):
                    d = json.loads(value)
                    # validated as a stored impression: with its historical features, it
                    # may hold more than an input's features and bytes
                    imp = (parse_stored_impression(json.dumps(d["i"], ensure_ascii=False))
                           if "i" in d else None)  # fmt: skip
                    if "d" in d:
                        done.append((key[2:], int(d["d"]), float(d["t"]), imp))
                    elif imp is not None:
                        pending.append((imp, d["c"]))
                elif key.startswith("c/"):
                    orphans.append((key[2:], float(value)))
                elif key.startswith("v/"):  # the second label: a click awaiting conversion
                    d = json.loads(value)
                    imp = parse_stored_impression(json.dumps(d["i"], ensure_ascii=False))
                    x = d["x"]
                    converting.append((imp, float(d["c"]), bool(d["z"]),
                                       None if x is None else float(x)))  # fmt: skip
                elif key.startswith("e/"):  # a conversion awaiting its click
                    early.append((key[2:], float(value)))
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
                    stage.load_state_dict(load_json(raw))
                for k in range(feature_deltas):  # the journal: replay the calls in order
                    replay_features(stage, load_json(deltas[k]))
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
        if pending or orphans or max_ts or done or converting or early:
            j.restore(pending, orphans, max_ts, done, converting, early)
            self.n_restored += len(pending)
            log.info("partition %d: restored %d pending impressions, %d labelled ones, %d"
                     " orphan clicks, %d clicks awaiting a conversion and %d conversions"
                     " awaiting a click", partition, len(pending), len(done), len(orphans),
                     len(converting), len(early))  # fmt: skip

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
            self._unseen_since.pop(p, None)
        self.state.drop(partitions)

    def _release(self) -> list[LabeledExample]:
        """Advance every partition to the minimum watermark of all of them (partitions idle
        longer than ``join.idle_timeout_s`` wall seconds do not hold the others back)."""
        if not self.joiners:
            return []
        now = time.monotonic()
        marks = [(j.watermark, j.last_activity) for j in self.joiners.values()]
        live = [wm for wm, seen in marks if not self._quiet(seen, now)]
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
        if j.forgotten or j.conversions_left:
            # a label still in the outbox stays pending in the state until it is sent
            unsent = {e.impression.impression_id for e in self.outbox.get(partition, ())}
            for iid in j.forgotten:
                if iid not in unsent:
                    self.state.delete(partition, "i/" + iid)
            j.forgotten.clear()
            for iid in j.conversions_left:  # closed; one with a record unsent: at sent()
                if iid not in unsent and iid not in j.converting:
                    self.state.delete(partition, "v/" + iid)
            j.conversions_left.clear()
        for iid in j.early_left:
            if iid not in j.early_conversions:
                self.state.delete(partition, "e/" + iid)
        j.early_left.clear()
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
        out: list[LabeledExample] = []
        try:
            staged = self._stage_features([event], partition)
            out = self._apply(event, raw, topic, partition,
                              None if staged is None else staged[0])  # fmt: skip
        finally:  # an event that raised was received all the same
            self._count_inputs((event,), out)
        return out, None

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
        self.beat()
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
        valid: list[Impression | Click] = []
        dead: list[DeadLetter] = []
        for event, b in decoded:
            if not isinstance(event, InvalidEvent):
                event = self._time_error(event) or event
            if isinstance(event, InvalidEvent):
                self.metrics.dead_letters.labels(reason=event.reason).inc()
                dead.append(DeadLetter.of(topic, partition, offset, event, b))
            else:
                valid.append(event)
        staged = self._stage_features(valid, partition)
        out: list[LabeledExample] = []
        done = 0
        try:
            for k, event in enumerate(valid):
                done = k + 1
                out.extend(self._apply(event, None, topic, partition,
                                       None if staged is None else staged[k]))  # fmt: skip
        finally:  # the events taken so far, also when one raised
            self._count_inputs(valid[:done], out)
        return out, dead

    def _count_inputs(
        self, events: Sequence[Impression | Click | Watermark], out: list[LabeledExample]
    ) -> None:
        """The input counters (impressions, clicks, conversion events) and the labels of
        ``out``, for the events of one record or envelope at once (a counter takes a lock
        per increment: per event, ~5% of an envelope's join)."""
        imps = clicks = conversions = 0
        for e in events:
            if isinstance(e, Impression):
                imps += 1
            elif isinstance(e, Click):
                if e.conversion:
                    conversions += 1
                else:
                    clicks += 1
        m = self.metrics
        if imps:
            m.impressions.inc(imps)
        if clicks:
            m.clicks.inc(clicks)
        if conversions:
            m.conversion_events.inc(conversions)
        if out:
            self._count_labels(out)

    def _stage_features(
        self, events: Sequence[Impression | Click | Watermark], partition: int
    ) -> list[tuple[dict[str, object] | None]] | None:
        """The feature stage over a record's (or an envelope's) valid events in one batch
        (:meth:`features.stage.FeatureStage.process`: the same values and state as one
        event at a time, its compiled kernel called once per envelope): per event a
        1-tuple, the impression's features (None: a duplicate; for a click, a conversion
        or a watermark, which the stage does not take or takes without output: None).
        None without a feature stage."""
        self.joiner(partition)  # the partition's stage, restored, exists from here on
        stage = self.features.get(partition)
        if stage is None or not events:
            return None
        takes = [
            isinstance(e, Impression) or (isinstance(e, Click) and not e.conversion) for e in events
        ]
        got = iter(stage.process([e for e, t in zip(events, takes, strict=True) if t]))
        return [(next(got),) if t else (None,) for t in takes]

    def _apply(
        self, event: Impression | Click | Watermark, raw: bytes | None, topic: str,
        partition: int, staged: tuple[dict[str, object] | None] | None = None,
    ) -> list[LabeledExample]:  # fmt: skip
        """Apply one validated input event; ``raw`` is its JSON (None: re-encode it).
        ``staged``: the feature stage's result for it (:meth:`_stage_features`, which has
        taken it already); None without a feature stage."""
        j = self.joiner(partition)
        c = j.counters
        before = (c.duplicate_impressions, c.duplicate_clicks, c.late_clicks)
        conv_before = (
            self._conversion_entry(j, event.impression_id)
            if self.settings.join.conversion_window_s is not None
            and not isinstance(event, Watermark)
            else None
        )
        state = self.state
        if isinstance(event, Watermark):
            source = "clicks" if topic == TOPIC_CLICKS else "impressions"
            out = j.on_watermark(event.ts, source)
            self._save_watermark(partition, j, force=True)
        elif isinstance(event, Click) and event.conversion:
            # the second label: no feature-stage click; its state is journalled below
            # (_save_conversion)
            out = j.on_click(event)
            self._save_watermark(partition, j)
        elif isinstance(event, Click):
            iid = event.impression_id
            stage = self.features.get(partition)
            if stage is not None:  # it took the click (_stage_features)
                self._feature_log.setdefault(partition, []).append(["c", iid, event.ts])
            had_orphan = iid in j.orphan_clicks
            out = j.on_click(event)
            imp = j.pending.get(iid)
            if imp is not None and iid in j.clicked:
                state.put(partition, "i/" + iid, pending_value(imp, j.clicked[iid]))
            elif not had_orphan and iid in j.orphan_clicks:
                state.put(partition, "c/" + iid, repr(event.ts).encode())
            self._save_watermark(partition, j)
        else:
            assert isinstance(event, Impression)
            iid = event.impression_id
            stage = self.features.get(partition)
            if stage is not None:
                assert staged is not None  # it took the impression (_stage_features)
                hist = staged[0]
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
                    if any(k.startswith(HISTORY_PREFIX) for k in event.features):
                        self.metrics.history_fields_dropped.labels(where="stream").inc(
                            without_history(event.features)[1]
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
                    raw if isinstance(raw, bytes) else state_json(event)))  # fmt: skip
            if had_orphan and iid not in j.orphan_clicks:
                state.delete(partition, "c/" + iid)
            self._save_watermark(partition, j)
        if self.settings.join.conversion_window_s is not None and not isinstance(event, Watermark):
            self._save_conversion(partition, j, event.impression_id, conv_before)
        if out:
            self.outbox.setdefault(partition, []).extend(out)
        if j.expired_orphans or j.forgotten or j.conversions_left or j.early_left:
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
        return out  # counted by the caller (_count_inputs)

    @staticmethod
    def _conversion_entry(j: OnlineJoiner, iid: str) -> tuple[object, ...] | None:
        """What the durable state holds of ``iid``'s second label: its clicked impression
        awaiting a conversion (click ts, zero sent, conversion ts), or its conversion
        awaiting the click (ts); None: neither."""
        entry = j.converting.get(iid)
        if entry is not None:
            return ("v", entry.click_ts, entry.zero_sent, entry.conversion_ts)
        early = j.early_conversions.get(iid)
        return None if early is None else ("e", early)

    def _save_conversion(
        self, partition: int, j: OnlineJoiner, iid: str, before: tuple[object, ...] | None
    ) -> None:
        """Journal a change of ``iid``'s second-label state made by its event (entries
        that leave are deleted by :meth:`_drain_orphans` and :meth:`sent`)."""
        now = self._conversion_entry(j, iid)
        if now == before or now is None:
            return
        if now[0] == "e":
            self.state.put(partition, "e/" + iid, repr(now[1]).encode())
            return
        entry = j.converting[iid]
        x = b"null" if entry.conversion_ts is None else repr(entry.conversion_ts).encode()
        self.state.put(partition, "v/" + iid, b'{"c":%r,"z":%d,"x":%s,"i":%s}' % (
            entry.click_ts, entry.zero_sent, x, state_json(entry.impression)))  # fmt: skip

    def _export_conversions(self) -> None:
        """``streamrec_conversions_total`` by outcome: the joiners' counters (a conversion
        is attached or given up on by a later click, impression or watermark too), on
        every :meth:`tick` and :meth:`update_gauges` (not per event: a sum over the
        joiners)."""
        js = self.joiners.values()
        now = (
            sum(j.counters.conversions for j in js),
            sum(j.counters.late_conversions for j in js),
            sum(j.counters.orphan_conversions for j in js),
            sum(j.counters.conversions_ignored for j in js),
        )
        for k, outcome in enumerate(("attached", "late", "orphan", "ignored")):
            if now[k] > self._conversions_exported[k]:
                self.metrics.conversions.labels(outcome=outcome).inc(
                    now[k] - self._conversions_exported[k]
                )
        # a joiner dropped on a rebalance takes its counts along: never count down
        self._conversions_exported = now

    def _count_labels(self, out: list[LabeledExample]) -> None:
        """``streamrec_labeled_total`` counts the click records; a clicked impression's
        second label (its own record, :data:`logs.events.TASK1_KINDS`, or on its
        positive) counts in ``streamrec_second_labels_total``."""
        own = 0
        if self.settings.join.conversion_window_s is not None:
            second = [e.label2 for e in out if e.label and e.label2 is not None]
            if second:
                ones = sum(second)
                if ones:
                    self.metrics.second_labels.labels(label="1").inc(ones)
                if len(second) > ones:
                    self.metrics.second_labels.labels(label="0").inc(len(second) - ones)
                own = sum(e.kind in TASK1_KINDS for e in out)
        positives = sum(e.label for e in out) - own  # a second label's own record: 1
        if positives:
            self._labeled_pos.inc(positives)
        if len(out) - own > positives:
            self._labeled_neg.inc(len(out) - own - positives)

    def _save_watermark(self, partition: int, j: OnlineJoiner, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._wm_saved.get(partition, -1e18) < self.WATERMARK_PERSIST_S:
            return
        self._wm_saved[partition] = now
        marks = {k: v for k, v in j.max_ts.items() if np.isfinite(v)}
        if marks:
            self.state.put(partition, "w", json.dumps(marks).encode())

    def take_in_flight(self) -> list[Any]:
        """The durable store's writes not yet confirmed, made since the last call (futures;
        empty for a store that writes synchronously, like the in-process one)."""
        store = getattr(self.state, "store", self.state)  # under a SegmentedState
        take = getattr(store, "take_in_flight", None)
        return [] if take is None else list(take())

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
            chunks = delta_chunks(calls, size)
            new_bytes = sum(len(c) for c in chunks)
            if delta_bytes + new_bytes > max(snap_bytes // 4, self.FEATURE_SNAPSHOT_MIN_BYTES):
                raw = snapshot_json(stage)
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

    def marks(self, assigned: Iterable[int] = ()) -> dict[int, float]:
        """Each owned input partition's event-time mark (:func:`logs.batches.encode_marks`):
        its watermark, capped where releases are capped. Read right after
        :meth:`take_ready` took everything: every label a partition emitted up to now is
        in what was taken, or sent before.

        A quiet partition (the idle rule of :meth:`_release`: no record and no backlog for
        ``join.idle_timeout_s`` wall seconds, and no fake negative held back) is marked
        where this worker released everything: it stops holding the monitor back as it
        stops holding the other partitions back here (Flink's idle sources). Only the
        joiner can tell quiet from stalled, so the monitor has no wall-clock rule of its
        own: a stalled joiner's marks stand still and the monitor waits for them.
        ``assigned``: input partitions this worker owns that may have no event yet. Such
        a partition is marked ``MIN_TS`` ("a joiner that sends marks": the monitor waits
        for it) until it has been assigned without a record for ``idle_timeout_s``, then
        where this worker released everything: not at once, because a partition the
        consumer has not fetched yet may hold a backlog of old impressions whose clicks
        would reach the monitor after their windows were judged (late positives)."""
        released = self._released_to if MIN_TS <= self._released_to < MAX_TS else MIN_TS
        now = time.monotonic()
        out: dict[int, float] = {}
        for p in assigned:
            if p not in self.joiners:
                quiet = self._quiet(self._unseen_since.setdefault(p, now), now)
                out[p] = released if quiet else MIN_TS
        for p, j in self.joiners.items():
            mark = joiner_mark(j)
            if self._quiet(j.last_activity, now) and not j.held:
                mark = max(mark, released)
            out[p] = mark
        return out

    def _quiet(self, since: float, now: float) -> bool:
        """The joiner's idle rule: an input partition whose last record (or backlog, or
        assignment) was at wall time ``since`` is quiet at ``now`` after
        ``join.idle_timeout_s`` (never without a timeout)."""
        timeout = self.settings.join.idle_timeout_s
        return timeout is not None and now - since >= timeout

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
        conversions = self.settings.join.conversion_window_s is not None
        for e in examples:
            iid = e.impression.impression_id
            if conversions and e.label and iid not in j.converting:
                self.state.delete(partition, "v/" + iid)  # its second label is out
            if e.kind in TASK1_KINDS:  # its click's record set the impression's entry
                continue
            if iid in j.pending:  # a fake negative: the impression still waits for a click
                continue
            if iid not in j.done:  # already past the dedup horizon: forgotten
                self.state.delete(partition, "i/" + iid)
                continue
            imp = b"" if e.label else b',"i":' + state_json(e.impression)
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

    def beat(self) -> None:
        """The worker runs: called for every input record and by the flush timer (every
        0.2 s), so a gap of more than :data:`STALL_S` between two beats is a stall of
        the worker (a stop, a long pause, an event loop held), taken off the inputs'
        idleness by :meth:`note_stall` before the record or the timer acts on it."""
        now = time.monotonic()
        gap, self._beat_at = now - self._beat_at, now
        if gap > STALL_S:
            self.note_stall(gap)

    def note_stall(self, seconds: float) -> None:
        """The worker stood still for ``seconds`` (its timer ran that much late: a stop, a
        long pause, an event loop held): that time does not count as any input being
        quiet. Idleness is the wall time since an input's last record, with the backlog
        read at the consumer's last fetch; after a stall both are stale (records may wait
        that no fetch has seen yet), and a partition judged quiet then would be marked
        past clicks still in its backlog. So every input's last-seen time (and an
        assigned partition's without events) moves forward by the stall, at most to now."""
        if seconds <= 0:
            return
        now = time.monotonic()
        for j in self.joiners.values():
            seen = j.last_seen
            for k, t in seen.items():
                seen[k] = min(now, t + seconds)
        for p, t in self._unseen_since.items():
            self._unseen_since[p] = min(now, t + seconds)

    def tick(self) -> list[LabeledExample]:
        """Called periodically: releases what became due (inputs went idle, or the records
        since the last release moved the watermarks)."""
        out = self._release()
        if out:
            self._count_labels(out)
        self._export_conversions()
        return out

    def update_gauges(self) -> None:
        self._export_conversions()
        self.metrics.pending_impressions.set(sum(len(j.pending) for j in self.joiners.values()))
        js = list(self.joiners.values())
        m = self.metrics
        m.join_state_bytes.labels(kind="pending").set(sum(j.pending_bytes for j in js))
        m.join_state_bytes.labels(kind="done").set(sum(j.done_bytes for j in js))
        m.join_state_bytes.labels(kind="orphans").set(sum(j.orphan_bytes for j in js))
        m.orphan_clicks_waiting.set(sum(len(j.orphan_clicks) for j in js))
        stages = list(self.features.values())
        if stages:
            m.feature_state_bytes.set(sum(st.approx_bytes() for st in stages))
            for kind in (
                "expired_keys",
                "evicted_keys",
                "evicted_impressions",
                "evicted_sequences",
                "skipped_attributes",
            ):
                m.feature_state_shed.labels(kind=kind).set(sum(st.stats[kind] for st in stages))
        store = getattr(self.state, "store", self.state)  # under a SegmentedState
        native = getattr(store, "native_memory", None)
        if native is not None:
            for kind, n in native().items():
                m.rocksdb_memory_bytes.labels(kind=kind).set(n)
        wms = [j.watermark for j in self.joiners.values() if np.isfinite(j.watermark)]
        if wms:
            self.metrics.event_time_watermark_seconds.set(min(wms))
