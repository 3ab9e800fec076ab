"""A read-only copy of the joiners' historical-feature stages, for workers that serve but
do not join (``serve`` and ``trainer`` roles).

:class:`FeatureFollower` is fed the raw records of ``impressions`` and ``clicks`` (every
partition, read outside any consumer group by :class:`stream.agents.FeatureFollowerAgent`)
and decodes them with the joiner's code: envelopes (:func:`stream.envelope.decode_envelope`)
and single JSON events (:func:`logs.events.parse_input`), the same ``future_ts`` check as
:class:`stream.services.JoinService`. Each partition's events go, in arrival order, to its
own :class:`features.stage.FeatureStage` built with the worker's
:class:`features.config.FeatureConfig` (the joiner's byte budget per partition), so
:meth:`FeatureStage.peek` gives the values the owning joiner's stage gives. Records and
events that do not decode are skipped and counted by reason (:attr:`skipped`), never
raised; producer watermarks are ignored (the stage does not read them).

No Kafka here: tests feed it records directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from features.config import FeatureConfig
from features.stage import FeatureStage
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    InvalidEvent,
    parse_input,
)
from stream.envelope import decode_envelope, is_envelope
from stream.producer import partition_of
from stream.services.join import feature_config
from stream.settings import Settings

__all__ = ["FOLLOW_FROM", "FeatureFollower", "feature_config"]

#: where a follower starts reading when it starts: the whole retained topics (the
#: joiners' state is rebuilt, exact) or only new records (history starts empty)
FOLLOW_FROM = ("earliest", "latest")


class FeatureFollower:
    """One :class:`FeatureStage` per input partition, fed from raw input records.

    Args:
        config: each partition stage's settings (:func:`feature_config` on a worker).
        partitions: the input topics' partition count (users map to partitions with
            :func:`stream.producer.partition_of`, as the producers key them).
        max_future_skew_s: an event more than this many seconds ahead of ``clock()`` is
            skipped (``future_ts``), as the joiner dead-letters it (it never reaches the
            joiner's stage either).
        clock: wall clock, seconds since the epoch (staleness and the skew check).

    >>> from stream.settings import Settings
    >>> f = FeatureFollower.from_settings(Settings(partitions=1))
    >>> imp = b'{"impression_id": "a", "ts": 1.7e9, "user_id": "u", "item_id": "i"}'
    >>> f.apply_record(imp, "impressions", 0, 0)
    1
    >>> f.apply_record(b"{not json", "impressions", 0, 1), f.skipped
    (0, {'bad_json': 1})
    >>> f.stage_for("u").peek(1.7e9 + 10, "u", "i")["hist_ui_n"] > 0
    True
    """

    def __init__(
        self,
        config: FeatureConfig,
        partitions: int,
        *,
        max_future_skew_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if not max_future_skew_s >= 0:  # NaN fails too
            raise ValueError(f"max_future_skew_s must be >= 0, got {max_future_skew_s}")
        self.config = config
        self.partitions = partitions
        self.max_future_skew_s = max_future_skew_s
        self.clock = clock
        #: partition -> its stage (created on the partition's first event)
        self.stages: dict[int, FeatureStage] = {}
        #: partition -> the newest event time (ts of an impression or a click) applied
        self.newest_ts: dict[int, float] = {}
        #: (topic, partition) -> the offset of the next record to read
        self.positions: dict[tuple[str, int], int] = {}
        #: reason -> records (whole records) or events (inside an envelope) skipped
        self.skipped: dict[str, int] = {}
        self.n_records = 0  # records handed to apply_record
        self.n_events = 0  # impressions and clicks applied to a stage

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Callable[[], float] = time.time
    ) -> FeatureFollower:
        """A follower with the worker's feature settings, partitions and skew check."""
        return cls(
            feature_config(settings),
            settings.partitions,
            max_future_skew_s=settings.max_future_skew_s,
            clock=clock,
        )

    # ------------------------------------------------------------------ feeding
    def apply_record(self, raw: bytes | None, topic: str, partition: int, offset: int) -> int:
        """Apply one record of ``impressions`` or ``clicks`` (an envelope or one JSON
        event) read from ``partition`` at ``offset``. Returns the events applied; a bad
        record (or a bad event inside an envelope) is counted in :attr:`skipped`.

        Raises:
            ValueError: ``topic`` is not an input topic or ``partition`` is out of range
                (a wiring bug, not bad data).
        """
        if topic not in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
            raise ValueError(f"a follower reads {TOPIC_IMPRESSIONS!r} and {TOPIC_CLICKS!r}, "
                             f"not {topic!r}")  # fmt: skip
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} outside 0..{self.partitions - 1}")
        self.n_records += 1
        self.positions[(topic, partition)] = offset + 1
        if not is_envelope(raw):
            try:
                event = parse_input(raw, topic)
            except InvalidEvent as exc:
                self._skip(exc.reason)
                return 0
            if not isinstance(event, (Impression, Click)):
                return 0  # a producer watermark: the stage has no use for it
            return self._apply(event, partition)
        assert raw is not None
        try:
            decoded = decode_envelope(raw, topic)
        except InvalidEvent as exc:
            self._skip(exc.reason)
            return 0
        n = 0
        for ev, _ in decoded:
            if isinstance(ev, InvalidEvent):
                self._skip(ev.reason)
            else:
                n += self._apply(ev, partition)
        return n

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _apply(self, event: Impression | Click, partition: int) -> int:
        if event.ts > self.clock() + self.max_future_skew_s:
            self._skip("future_ts")
            return 0
        stage = self.stages.get(partition)
        if stage is None:
            stage = self.stages[partition] = FeatureStage(self.config)
        if isinstance(event, Click):
            stage.click(event.impression_id, event.ts)  # as JoinService._apply does
        else:
            stage.impression(event.impression_id, event.ts, event.user_id, event.item_id,
                             event.position, event.features)  # fmt: skip
        if event.ts > self.newest_ts.get(partition, -math.inf):
            self.newest_ts[partition] = event.ts
        self.n_events += 1
        return 1

    # ------------------------------------------------------------------ reading
    def stage(self, partition: int) -> FeatureStage | None:
        """The partition's stage (read it only: ``peek``); None before its first event."""
        return self.stages.get(partition)

    def stage_for(self, user_id: str) -> FeatureStage | None:
        """The stage of the partition ``user_id``'s events are keyed to."""
        return self.stages.get(partition_of(user_id.encode(), self.partitions))

    def staleness_s(self, now: float | None = None) -> float:
        """Seconds between ``now`` (default ``clock()``) and the newest event time applied
        over all partitions; ``inf`` before the first event. On a caught-up follower of an
        idle stream it grows with the idle time (read it beside the records' lag)."""
        if not self.newest_ts:
            return math.inf
        return (self.clock() if now is None else now) - max(self.newest_ts.values())

    def approx_bytes(self) -> int:
        """Estimated bytes of every stage (:meth:`FeatureStage.approx_bytes`)."""
        return sum(st.approx_bytes() for st in self.stages.values())
