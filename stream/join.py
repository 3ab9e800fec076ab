"""The online joiner: impressions + clicks -> labelled examples, in event time.

A plain object (no Kafka): the ``joiner`` agent keeps one :class:`OnlineJoiner` per input
partition (impressions and clicks are co-partitioned by impression_id) and feeds it.

Semantics (all times are event times, epoch seconds):

* An impression waits in ``pending`` for its attribution window ``W``.
* A click at ``t_click <= ts + W`` on a pending impression makes it a **positive**. With
  ``emit_positives="window_close"`` (the default) the positive is emitted when the window
  closes, like the negatives: examples then leave the joiner in impression-time order and
  any slice of the labelled stream has the true click rate (no delayed-feedback bias, at
  the price of W of label latency). With ``"click"`` it is emitted at once (fresher, but
  a stream whose recent part is enriched in positives; see issue on delayed feedback).
* The watermark is ``min(max ts seen on impressions, max ts seen on clicks) - lateness``
  (each input's event time can run ahead of the other's when consumers lag). An impression
  whose window closed (``ts + W < watermark``) is emitted as a **negative**.
* A click that arrives before its impression waits in ``orphan_clicks`` (bounded by
  ``orphan_grace_s`` of event time, and by ``max_orphans`` / ``max_orphan_bytes``: beyond
  them the oldest gives up early), then is counted as an orphan.
* Memory is bounded by bytes, not only counts: waiting impressions by ``max_pending_bytes``
  (the oldest is emitted early, as for ``max_pending``), labelled impressions remembered
  for duplicates and corrections by ``max_done_bytes`` (the oldest is forgotten early).
  :attr:`OnlineJoiner.state_bytes` is the estimate (:func:`impression_bytes`).
* Duplicate impressions and duplicate clicks are counted once (the ids of recently
  labelled impressions are remembered for ``dedup_horizon_s``).
* A click inside the window on an impression already emitted as a negative (possible only
  when a click is later than the lateness bound) is a **late click**; it is counted and, if
  ``emit_corrections``, emitted as a ``correction`` positive.

``delayed_feedback`` picks the labelling scheme. ``"window"`` is all of the above.
``"fake_negative"`` (Ktena et al., RecSys 2019) trades label correctness for freshness:
every new impression is emitted AT ONCE as a negative of kind ``fake_negative`` (label 0,
``label_ts = ts``; with ``align_fake_negatives``, as soon as the clicks input has reached
its event time: the newest click or click watermark at or after ``ts``, or at once when
that input is idle), and every in-window click (even one that arrives after the watermark
passed ``ts + W``, up to ``dedup_horizon_s`` later) emits the impression again as a
``positive`` when the click arrives. An orphan click still waits for its impression, which
then emits its negative and its positive together. Nothing is emitted when a window
closes and there are no corrections (``emit_positives`` and ``emit_corrections`` are not
used). The stream over-represents positives (label 1 with probability ``p / (1 + p)``):
train it with the ``fnw`` loss, or with BCE and
:func:`learners.delayed_feedback.fnc_correct` on the scores. Holding each fake negative
until the clicks have caught up (``align_fake_negatives``, the worker's default) keeps
the trainer's mix of negatives and positives event-time fair when one input runs ahead of
the other (a replayed log read faster than the pipeline, a lagging clicks partition):
emitted at arrival, a burst of impressions
trained as negatives long before their clicks pulled the model's CTR down (``make demo``:
normalised entropy 1.2 instead of 0.98). After a restart every pending impression newer
than the restored clicks time is held again (at-least-once: a few may be sent twice).

**Start-up compensation** (``startup_compensation``, fake negatives only). A FRESH joiner
(nothing restored) never sees the clicks of the impressions before its start (the
pretrain's log), so for about one click delay its stream carries every negative but only
a share ``F(a)`` of the positives, ``F`` the click-delay CDF and ``a`` the time since the
start: FNW is then biased down, and a warm-started ranker lost a third of its predicted
CTR in two minutes and needed minutes more to climb back (``bench.calibration_worlds``,
3,000 a minute: raw Σp/Σtrue_p 0.66). With it on, the fake negative of an impression
``a`` seconds after the start weighs ``F(a) = 1 - exp(-a / m)`` (exponential delays, ``m``
their mean fitted to the delays seen so far, each truncated at its impression's age,
with ``startup_prior_clicks`` pseudo-clicks of ``startup_delay_prior_s``), so negatives
and positives stay balanced in expectation; from ``window_s`` after the start on (every
click counted by then) the weight is 1. A restored joiner holds the clicks of its pending
impressions: no compensation.

``"dfm"`` (the delayed-feedback model, Chapelle 2014; :mod:`learners.delayed_feedback`):
every impression is emitted once. A click within the observation time ``T``
(``dfm_observe_s``, <= ``W``) emits it at once as a ``positive`` (``label_ts`` the click
time, so its delay is ``label_ts - ts``); an impression still unclicked when the
watermark passes ``ts + T`` is emitted as a ``negative`` with ``label_ts = ts + T`` (the
elapsed time the loss needs is ``label_ts - ts``; the ``labeled`` record needs no new
field). A click later than ``T`` (and within ``W``) is a **late click**: counted
(``late_clicks``) and emitted as a ``late_click`` with label 1 and WEIGHT 0, so that the
monitor judges the final label while the model is not trained on the impression again
(its censored record stands; ``emit_corrections`` is not used).

**The second label** (``conversion_window_s`` set; None, the default: conversion events
are counted in ``conversions_ignored`` and dropped). A conversion is a ``clicks`` record
with ``conversion`` set (``"type": "conversion"``), at most ``conversion_window_s`` after
its impression's click. Every record the joiner sends gains ``label2``, the impression's
"clicked and converted" label, where this record knows it: 0 on the records of an
impression not clicked (its ``negative`` or ``fake_negative``: final or provisional as its
click label is), None on a click's records. A clicked impression waits in ``converting``
(its deadline ``click_ts + conversion_window_s``) and is sent once more, with label 1 and
weight 0 (its click was sent already): as a ``conversion`` (``label2=1``, ``label_ts`` the
conversion time) when its conversion comes, or, when the watermark passes the deadline, as
a ``no_conversion`` (``label2=0``) unless a record of it carried ``label2=0`` already (a
fake negative, a DFM negative, a negative before a late click: under those schemes the
second label is provisional too, 0 first and 1 on conversion, like the click's). With
``"window"`` (final labels) every clicked impression's second label leaves when its
conversion window ends, converted or not, like its click label when its attribution window
ends: on its positive (``label2`` 1 or 0) if the conversion window ended first, else in
its own record at the conversion window's end. Any slice of that stream then has the true
conversion rate; sent at once, conversions would run ahead of the non-conversions of
their time, and the first minutes would teach the second task a rate near 1. A
conversion for an impression not waiting is counted: ``late_conversions`` (its impression
was clicked: after the window, or a duplicate) and dropped; one whose click is not known
yet waits for it like an orphan click (``orphan_grace_s``, ``max_orphans``), and is
counted in ``orphan_conversions`` and dropped if it never comes. ``converting`` holds at
most ``max_pending`` impressions (beyond it the oldest closes early). ``JoinService``
journals both, and the ids that leave them (``conversions_left``, ``early_left``), in the
durable state, and :meth:`OnlineJoiner.restore` reloads them after a restart.

>>> j = OnlineJoiner(JoinConfig(window_s=60, lateness_s=0))
>>> j.on_impression(Impression("a", 100.0, "u", "i"))
[]
>>> [e.kind for e in j.on_click(Click("a", 130.0))]
[]
>>> j.on_impression(Impression("b", 200.0, "u", "i"))
[]
>>> [e.impression.impression_id for e in j.on_watermark(300.0, source="impressions")]
[]
>>> [(e.impression.impression_id, e.kind) for e in j.on_watermark(300.0, source="clicks")]
[('a', 'positive'), ('b', 'negative')]
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from logs.events import Click, Impression, LabeledExample
from stream.join_memory import (
    DONE_OVERHEAD,
    ORPHAN_OVERHEAD,
    PackedImpression,
    Schema,
    impression_bytes,
    pack_impression,
    packed_bytes,
)

__all__ = ["DELAYED_FEEDBACK_SCHEMES", "JoinConfig", "JoinCounters", "OnlineJoiner", "offline_join"]

#: ``startup_compensation``: the click delays kept for its delay estimate, at most
STARTUP_MAX_DELAYS = 5_000
#: Values of ``JoinConfig.delayed_feedback`` (see the module doc).
DELAYED_FEEDBACK_SCHEMES = ("window", "fake_negative", "dfm")


@dataclass(slots=True)
class _Converting:
    """A clicked impression waiting for its conversion (the second label)."""

    impression: Impression
    click_ts: float
    zero_sent: bool  # a record of it carried label2=0 (no no_conversion record then)
    conversion_ts: float | None = None  # "window": came while the impression was pending


@dataclass(frozen=True)
class JoinConfig:
    """Joiner settings, seconds of event time.

    Args:
        window_s: attribution window W: a click counts if ``t_click - ts <= window_s``.
        lateness_s: allowed lateness: the watermark trails the max event time by this much.
        orphan_grace_s: how long a click may wait for its impression.
        dedup_horizon_s: how long labelled ids are remembered for duplicate detection.
        max_pending: bound on waiting impressions; beyond it the oldest is emitted early.
        max_pending_bytes: the same bound in bytes (:func:`impression_bytes`).
        max_orphans: bound on clicks waiting for their impression; beyond it the oldest
            gives up early (an ``orphan_click``).
        max_orphan_bytes: the same bound in bytes.
        max_done_bytes: bound on the labelled impressions remembered within
            ``dedup_horizon_s`` (ids, and negatives' impressions for corrections); beyond
            it the oldest is forgotten early (a duplicate of it is then not recognised).
        emit_corrections: emit a ``correction`` positive for a late click.
        emit_positives: ``"window_close"`` or ``"click"`` (see the module doc).
        idle_timeout_s: WALL seconds after which an input that sent nothing (no event, no
            watermark) stops holding the watermark back, so a quiet click stream or an
            empty partition cannot stall labelling forever; None: pure event time.
        delayed_feedback: ``"window"``, ``"fake_negative"`` or ``"dfm"`` (see the module
            doc).
        align_fake_negatives: hold each fake negative until the clicks input reaches its
            event time (see the module doc; the worker's default).
        dfm_observe_s: ``delayed_feedback="dfm"``: the observation time ``T`` after which
            an unclicked impression is trained on as "not clicked after T" (0 < T <=
            ``window_s``; other schemes ignore it). 300 s: negatives 6x fresher than the
            30-minute window, while T is still a few typical click delays (minutes), so
            most clicks come before it and the delay model only extrapolates the tail
            (with delays ~Exp(mean 120 s), 8% of the clicks).
        startup_compensation: fake_negative: weigh the fake negatives of the first
            ``window_s`` after a fresh start by the estimated click-delay CDF (see the
            module doc).
        startup_delay_prior_s: the prior mean click delay of that estimate, seconds (> 0).
        startup_prior_clicks: its weight, in clicks (>= 0; 0: the observed mean alone, 1
            s until the first click).
        conversion_window_s: the second label's window: a conversion counts if it comes at
            most this long after its impression's click (None: conversions are ignored,
            no record carries ``label2``; see the module doc).
    """

    window_s: float = 1800.0
    lateness_s: float = 60.0
    orphan_grace_s: float = 600.0
    dedup_horizon_s: float = 7200.0
    max_pending: int = 2_000_000
    max_pending_bytes: int = 1 << 30
    max_orphans: int = 1_000_000
    max_orphan_bytes: int = 128 << 20
    max_done_bytes: int = 1 << 30
    emit_corrections: bool = True
    emit_positives: str = "window_close"  # "window_close" | "click"
    idle_timeout_s: float | None = 60.0
    delayed_feedback: str = "window"  # one of DELAYED_FEEDBACK_SCHEMES
    align_fake_negatives: bool = False
    dfm_observe_s: float = 300.0
    startup_compensation: bool = False
    startup_delay_prior_s: float = 60.0
    startup_prior_clicks: float = 10.0
    conversion_window_s: float | None = None

    def __post_init__(self) -> None:
        if self.conversion_window_s is not None and not self.conversion_window_s > 0:
            raise ValueError(
                f"JoinConfig.conversion_window_s must be > 0 or None, got "
                f"{self.conversion_window_s}"
            )
        if not (self.startup_delay_prior_s > 0 and self.startup_prior_clicks >= 0):
            raise ValueError(
                "JoinConfig.startup_delay_prior_s must be > 0 and startup_prior_clicks >= 0"
            )
        for name in ("window_s", "lateness_s", "orphan_grace_s", "dedup_horizon_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"JoinConfig.{name} must be >= 0")
        for name in ("max_pending", "max_pending_bytes", "max_orphans", "max_orphan_bytes",
                     "max_done_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"JoinConfig.{name} must be >= 1")
        if self.emit_positives not in ("window_close", "click"):
            raise ValueError("JoinConfig.emit_positives must be 'window_close' or 'click'")
        if self.delayed_feedback not in DELAYED_FEEDBACK_SCHEMES:
            raise ValueError(
                f"JoinConfig.delayed_feedback must be one of {DELAYED_FEEDBACK_SCHEMES}, "
                f"got {self.delayed_feedback!r}"
            )
        if not self.dfm_observe_s > 0:
            raise ValueError(f"JoinConfig.dfm_observe_s must be > 0, got {self.dfm_observe_s}")
        if self.delayed_feedback == "dfm" and self.dfm_observe_s > self.window_s:
            raise ValueError(
                f"JoinConfig.dfm_observe_s={self.dfm_observe_s} exceeds window_s="
                f"{self.window_s}: a click after the attribution window never counts, so "
                "observing longer than it only delays the negatives"
            )


@dataclass
class JoinCounters:
    impressions: int = 0
    clicks: int = 0
    positives: int = 0
    negatives: int = 0
    corrections: int = 0
    duplicate_impressions: int = 0
    duplicate_clicks: int = 0
    late_clicks: int = 0
    orphan_clicks: int = 0
    forced_negatives: int = 0
    fake_negatives: int = 0  # delayed_feedback="fake_negative": negatives sent at impression
    conversions: int = 0  # conversions attached (label2=1: own record, or on the positive)
    no_conversions: int = 0  # clicked, window closed unconverted (label2=0 sent)
    late_conversions: int = 0  # for a clicked impression no longer waiting: dropped
    orphan_conversions: int = 0  # for an impression with no click known: dropped
    conversions_ignored: int = 0  # conversion_window_s None: dropped


class OnlineJoiner:
    """Event-time join of one partition's impressions and clicks (see the module doc)."""

    def __init__(
        self, config: JoinConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or JoinConfig()
        self._clock = clock
        created = clock()
        self.last_seen = {"impressions": created, "clicks": created}  # wall clock
        self.pending: dict[str, Impression] = {}
        self.clicked: dict[str, float] = {}  # pending impression id -> first click ts
        self._deadlines: list[tuple[float, str]] = []  # (ts + W, impression_id) min-heap
        self.orphan_clicks: OrderedDict[str, float] = OrderedDict()  # id -> click ts
        # impression_id -> (label, label time, the impression if negative); insertion order
        # is emission order. Negatives keep their impression so a late click can correct it.
        #: labelled ids -> (label, label ts, the negative packed for a late click or None)
        self.done: OrderedDict[str, tuple[int, float, PackedImpression | None]] = OrderedDict()
        self._schemas: dict[Schema, Schema] = {}
        self.max_ts = {"impressions": float("-inf"), "clicks": float("-inf")}
        self.counters = JoinCounters()
        self.limit = float("inf")
        #: (impression_id, click ts) of orphan clicks given up on since the last drain; the
        #: caller dead-letters them (reason ``orphan_click``) and clears the list.
        self.expired_orphans: list[tuple[str, float]] = []
        #: fake_negative: impressions whose fake negative waits for the clicks input to reach
        #: their event time (arrival order), and their ids (an id leaves the set when sent)
        self.held: deque[Impression] = deque()
        self._held_ids: set[str] = set()
        #: startup_compensation: the first impression's event time (None: none yet; -inf
        #: after a restore: no compensation) and the click delays seen (sum, count)
        self._start_ts: float | None = None
        self._delays: list[tuple[float, float]] = []  # (impression ts, click delay)
        self._delay_mean: tuple[float, float] | None = None  # (fitted at ts, mean delay)
        #: labelled impression ids that left the dedup horizon since the last drain
        self.forgotten: list[str] = []
        #: estimated bytes of ``pending``, ``done`` and ``orphan_clicks``
        #: (:func:`impression_bytes`), kept up to date by every change
        self.pending_bytes = 0
        self.done_bytes = 0
        self.orphan_bytes = 0
        #: impression_id -> its :func:`impression_bytes` while pending (computed once: an
        #: impression with history features has ~50 of them)
        self._pending_size: dict[str, int] = {}
        #: the second label: clicked impressions waiting for their conversion, id ->
        #: (impression, click ts, a record of it carried label2=0), and their deadlines
        self.converting: dict[str, _Converting] = {}
        self._conv_deadlines: list[tuple[float, str]] = []
        #: conversions whose click has not come yet (the clicks input ran ahead of the
        #: impressions: the click waits as an orphan), id -> conversion ts; bounded like
        #: orphan clicks (``orphan_grace_s``, ``max_orphans``)
        self.early_conversions: OrderedDict[str, float] = OrderedDict()
        #: ids that left ``converting`` / ``early_conversions`` since the last drain (the
        #: caller's durable state forgets them; see ``JoinService``)
        self.conversions_left: list[str] = []
        self.early_left: list[str] = []

    @property
    def state_bytes(self) -> int:
        """Estimated bytes of this joiner's state: pending, labelled and orphan entries."""
        return self.pending_bytes + self.done_bytes + self.orphan_bytes

    # -- every change of pending / done / orphan_clicks goes through these (byte counts)
    def _add_pending(self, iid: str, imp: Impression) -> None:
        self.pending[iid] = imp
        size = self._pending_size[iid] = impression_bytes(imp)
        self.pending_bytes += size

    def _pop_pending(self, iid: str) -> Impression | None:
        imp = self.pending.pop(iid, None)
        if imp is not None:
            size = self._pending_size.pop(iid, None)
            self.pending_bytes -= impression_bytes(imp) if size is None else size
        return imp

    @staticmethod
    def _done_bytes(iid: str, negative: PackedImpression | None) -> int:
        return DONE_OVERHEAD + len(iid) + (0 if negative is None else packed_bytes(negative))

    def _set_done(
        self, iid: str, label: int, label_ts: float, negative: Impression | PackedImpression | None
    ) -> None:
        old = self.done.get(iid)
        if old is not None:
            self.done_bytes -= self._done_bytes(iid, old[2])
        packed = (
            negative
            if negative is None or isinstance(negative, PackedImpression)
            else pack_impression(negative, self._schemas)
        )
        self.done[iid] = (label, label_ts, packed)
        self.done_bytes += self._done_bytes(iid, packed)

    def _pop_oldest_done(self) -> str:
        iid, (_, _, negative) = self.done.popitem(last=False)
        self.done_bytes -= self._done_bytes(iid, negative)
        return iid

    def _add_orphan(self, iid: str, ts: float) -> None:
        if iid not in self.orphan_clicks:
            self.orphan_clicks[iid] = ts
            self.orphan_bytes += ORPHAN_OVERHEAD + len(iid)

    def _pop_orphan(self, iid: str) -> float | None:
        ts = self.orphan_clicks.pop(iid, None)
        if ts is not None:
            self.orphan_bytes -= ORPHAN_OVERHEAD + len(iid)
        return ts

    def _pop_oldest_orphan(self) -> tuple[str, float]:
        iid, ts = self.orphan_clicks.popitem(last=False)
        self.orphan_bytes -= ORPHAN_OVERHEAD + len(iid)
        return iid, ts

    def restore(
        self,
        pending: list[tuple[Impression, float | None]],
        orphans: list[tuple[str, float]],
        max_ts: dict[str, float],
        done: Iterable[tuple[str, int, float, Impression | PackedImpression | None]] = (),
        converting: Iterable[tuple[Impression, float, bool, float | None]] = (),
        early_conversions: Iterable[tuple[str, float]] = (),
    ) -> None:
        """Reload durable state after a restart or a rebalance (see ``JoinService``):
        ``pending`` impressions with their in-window click time (or None), waiting orphan
        clicks (impression_id, click ts), the event time reached on each input, and the
        labelled impressions still inside the dedup horizon (id, label, label ts, the
        impression if negative), so that records read again after a crash are duplicates
        rather than new impressions; and the second label's clicked impressions waiting
        for their conversion (impression, click ts, a record carried label2=0, the
        conversion ts if it came) and conversions waiting for their click (id, ts)."""
        self._start_ts = float("-inf")  # the restored state holds the in-flight clicks
        for iid, label, lts, negative in sorted(done, key=lambda d: d[2]):
            if iid not in self.pending:
                self._set_done(iid, label, lts, negative)
        for imp, click_ts in pending:
            iid = imp.impression_id
            if iid in self.pending:
                continue
            self._add_pending(iid, imp)
            if click_ts is not None:
                self.clicked[iid] = click_ts
            heapq.heappush(self._deadlines, (imp.ts + self._horizon, iid))
        for iid, ts in sorted(orphans, key=lambda o: o[1]):
            self._add_orphan(iid, ts)
        window = self.config.conversion_window_s
        if window is not None:
            for imp, click_ts, zero_sent, conv_ts in converting:
                iid = imp.impression_id
                if iid not in self.converting:
                    self.converting[iid] = _Converting(imp, click_ts, zero_sent, conv_ts)
                    heapq.heappush(self._conv_deadlines, (click_ts + window, iid))
            for iid, ts in sorted(early_conversions, key=lambda e: e[1]):
                self.early_conversions.setdefault(iid, ts)
        for source, ts in max_ts.items():
            if source in self.max_ts and ts > self.max_ts[source]:
                self.max_ts[source] = ts
        if self.config.delayed_feedback == "fake_negative" and self.config.align_fake_negatives:
            # held before the restart (or sent after the last saved clicks time: resent)
            frontier = self.max_ts["clicks"]
            for imp, click_ts in sorted(pending, key=lambda e: e[0].ts):
                iid = imp.impression_id
                if imp.ts > frontier and click_ts is None and iid not in self._held_ids:
                    self.held.append(imp)
                    self._held_ids.add(iid)

    @property
    def last_activity(self) -> float:
        """Wall-clock time of the newest record on either input."""
        return max(self.last_seen.values())

    @property
    def watermark(self) -> float:
        """The lower of the two inputs' newest event times, less ``lateness_s``; an input
        idle for ``idle_timeout_s`` wall seconds does not hold it back, and with both idle
        the newer holds. Read on every event (written out for the two inputs: the generic
        form was ~5% of a worker's samples)."""
        cfg = self.config
        timeout = cfg.idle_timeout_s
        imps, clicks = self.max_ts["impressions"], self.max_ts["clicks"]
        low = imps if imps < clicks else clicks
        if timeout is None:
            return low - cfg.lateness_s
        now = self._clock()
        imps_live = now - self.last_seen["impressions"] < timeout
        clicks_live = now - self.last_seen["clicks"] < timeout
        if imps_live and clicks_live:
            base = low
        elif imps_live or clicks_live:
            base = imps if imps_live else clicks
        else:  # every input idle: nothing new is coming, the newest time seen anywhere holds
            base = clicks if imps < clicks else imps
        return base - cfg.lateness_s

    def _see(self, source: str, ts: float) -> None:
        self.last_seen[source] = self._clock()
        if ts > self.max_ts[source]:
            self.max_ts[source] = ts

    def on_impression(self, imp: Impression) -> list[LabeledExample]:
        self._see("impressions", imp.ts)
        iid = imp.impression_id
        if iid in self.pending or iid in self.done:
            self.counters.duplicate_impressions += 1
            return self._expire()
        self.counters.impressions += 1
        out: list[LabeledExample] = []
        click_ts = self._pop_orphan(iid)
        in_window = click_ts is not None and click_ts - imp.ts <= self.config.window_s
        observe = self.config.dfm_observe_s
        if click_ts is not None and in_window and self._dfm and click_ts - imp.ts > observe:
            # dfm: its click came after T (the impression was late): unclicked at T, then late
            self._label(imp, 0, imp.ts + observe, "negative", out)
            self._late_click(imp, click_ts, out)
            out.extend(self._expire())
            return out
        if self.config.delayed_feedback == "fake_negative":
            if self._start_ts is None:
                self._start_ts = imp.ts
            self.held.append(imp)
            self._held_ids.add(iid)
            self._release_held(out)  # at once unless align_fake_negatives
        if click_ts is not None and in_window and self._positives_at_click:
            self._label(imp, 1, max(click_ts, imp.ts), "positive", out)
            self._converting(imp, click_ts, self._fake_negatives, out)
        else:
            self._add_pending(iid, imp)
            if click_ts is not None and in_window:
                self.clicked[iid] = click_ts
                self._converting(imp, click_ts, False, out)
            heapq.heappush(self._deadlines, (imp.ts + self._horizon, iid))
            cfg = self.config
            while self.pending and (len(self.pending) > cfg.max_pending
                                    or self.pending_bytes > cfg.max_pending_bytes):  # fmt: skip
                self._force_oldest(out)
        out.extend(self._expire())
        return out

    def on_click(self, click: Click) -> list[LabeledExample]:
        """A click, or a conversion (``click.conversion``: see the module doc)."""
        self._see("clicks", click.ts)
        iid = click.impression_id
        out: list[LabeledExample] = []
        self._release_held(out)  # negatives up to this click's time go before its positive
        if click.conversion:
            self._on_conversion(click, out)
            out.extend(self._expire())
            return out
        imp = self.pending.get(iid)
        if imp is not None:
            if iid in self.clicked:
                self.counters.duplicate_clicks += 1
            else:
                self.counters.clicks += 1
                if click.ts - imp.ts <= self.config.window_s:
                    if self._dfm and click.ts - imp.ts > self.config.dfm_observe_s:
                        # pending only because the watermark has not passed ts + T yet
                        self._pop_pending(iid)
                        self._label(imp, 0, imp.ts + self.config.dfm_observe_s, "negative", out)
                        self._late_click(imp, click.ts, out)
                    elif self._positives_at_click:
                        self._pop_pending(iid)
                        self._label(imp, 1, click.ts, "positive", out)
                        self._converting(imp, click.ts, self._fake_negatives, out)
                    else:
                        self.clicked[iid] = click.ts
                        self._converting(imp, click.ts, False, out)
            # a click after the window on a pending impression: the negative will follow
        elif iid in self.done:
            label, _, packed = self.done[iid]
            if label == 1 or packed is None:
                self.counters.duplicate_clicks += 1
            elif click.ts - packed.ts > self.config.window_s:
                self.counters.clicks += 1  # a click after the window: the negative stands
            elif self.config.delayed_feedback == "fake_negative":
                self.counters.clicks += 1  # the negative was provisional: add the positive
                imp = packed.unpack()
                self._label(imp, 1, click.ts, "positive", out)
                self._converting(imp, click.ts, True, out)
            elif self._dfm:
                self.counters.clicks += 1  # after T: its censored record stands
                self._late_click(packed.unpack(), click.ts, out)
            else:
                self.counters.clicks += 1
                self.counters.late_clicks += 1
                self._set_done(iid, 1, click.ts, None)
                imp = packed.unpack()
                if self.config.emit_corrections:
                    self.counters.corrections += 1
                    out.append(LabeledExample(imp, 1, click.ts, 1.0, "correction"))
                self._converting(imp, click.ts, True, out)  # its negative carried label2=0
        elif iid in self.orphan_clicks:
            self.counters.duplicate_clicks += 1
        else:
            self.counters.clicks += 1
            self._add_orphan(iid, click.ts)
            cfg = self.config
            while self.orphan_clicks and (len(self.orphan_clicks) > cfg.max_orphans
                                          or self.orphan_bytes > cfg.max_orphan_bytes):  # fmt: skip
                # the oldest gives up early: an orphan like one past its grace
                self.counters.orphan_clicks += 1
                self.expired_orphans.append(self._pop_oldest_orphan())
        out.extend(self._expire())
        return out

    def release(self, limit: float) -> list[LabeledExample]:
        """Cap emission at event time ``limit`` (``inf`` removes the cap) and emit what is due.

        A worker that owns several partitions caps each one at the minimum watermark of
        all of them, so the labelled stream leaves in (near) event-time order even when the
        consumer reads some partitions ahead of others.
        """
        self.limit = limit
        return self._expire()

    def on_watermark(self, ts: float, source: str) -> list[LabeledExample]:
        """A producer watermark on ``source`` ("impressions" or "clicks")."""
        self._see(source, ts)
        return self._expire()

    def _label(
        self, imp: Impression, label: int, label_ts: float, kind: str, out: list[LabeledExample],
        label2: int | None = None,
    ) -> None:  # fmt: skip
        if label == 0 and self.config.conversion_window_s is not None:
            label2 = 0
        out.append(LabeledExample(imp, label, label_ts, 1.0, kind, label2))
        self._set_done(imp.impression_id, label, label_ts, None if label else imp)
        if label:
            self.counters.positives += 1
            if (
                self.config.startup_compensation
                and self._start_ts is not None
                and imp.ts - self._start_ts < self.config.window_s
                and label_ts >= imp.ts
                and len(self._delays) < STARTUP_MAX_DELAYS
            ):
                self._delays.append((imp.ts, label_ts - imp.ts))
        else:
            self.counters.negatives += 1

    @property
    def _positives_at_click(self) -> bool:
        c = self.config
        return c.emit_positives == "click" or c.delayed_feedback in ("fake_negative", "dfm")

    @property
    def _dfm(self) -> bool:
        return self.config.delayed_feedback == "dfm"

    @property
    def _fake_negatives(self) -> bool:
        return self.config.delayed_feedback == "fake_negative"

    # -- the second label (conversion_window_s; see the module doc)
    def _converting(
        self, imp: Impression, click_ts: float, zero_sent: bool, out: list[LabeledExample]
    ) -> None:
        """A click on ``imp`` counted: it waits for its conversion (or takes the one that
        came first and waited). ``zero_sent``: a record of it carried ``label2=0`` already
        (no ``no_conversion`` record then)."""
        window = self.config.conversion_window_s
        iid = imp.impression_id
        if window is None or iid in self.converting:
            return
        entry = self.converting[iid] = _Converting(imp, click_ts, zero_sent)
        heapq.heappush(self._conv_deadlines, (click_ts + window, iid))
        early = self.early_conversions.pop(iid, None)
        if early is not None:
            self.early_left.append(iid)
            self._attach(iid, entry, early, out)

    def _on_conversion(self, conv: Click, out: list[LabeledExample]) -> None:
        c = self.counters
        window = self.config.conversion_window_s
        if window is None:
            c.conversions_ignored += 1
            return
        iid = conv.impression_id
        waiting = self.converting.get(iid)
        if waiting is not None and waiting.conversion_ts is None:
            self._attach(iid, waiting, conv.ts, out)
            return
        known = self.done.get(iid)
        if (
            waiting is not None
            or (known is not None and known[0] == 1)
            or (iid in self.early_conversions)
        ):
            c.late_conversions += 1  # a duplicate, or after its window closed
        else:  # its click (or impression) has not come yet: it waits, like an orphan click
            self.early_conversions[iid] = conv.ts
            while len(self.early_conversions) > self.config.max_orphans:
                self.early_left.append(self.early_conversions.popitem(last=False)[0])
                c.orphan_conversions += 1

    def _attach(self, iid: str, waiting: _Converting, conv_ts: float,
                out: list[LabeledExample]) -> None:  # fmt: skip
        """A conversion at ``conv_ts`` for the clicked impression ``waiting``."""
        window = self.config.conversion_window_s
        assert window is not None
        if conv_ts - waiting.click_ts > window:
            self.counters.late_conversions += 1  # its no_conversion (if any) follows
            return
        self.counters.conversions += 1
        if self.config.delayed_feedback == "window":  # sent when its window ends
            waiting.conversion_ts = conv_ts
            return
        del self.converting[iid]
        self.conversions_left.append(iid)
        ts = max(conv_ts, waiting.click_ts)
        out.append(LabeledExample(waiting.impression, 1, ts, 0.0, "conversion", 1))

    def _label2_at_close(self, iid: str, click_ts: float) -> int | None:
        """``"window"``: the second label a clicked impression's positive carries when its
        attribution window closes, if its conversion window ended by then
        (``click_ts + conversion_window_s <= ts + window_s``): 1 if its conversion came,
        else 0; otherwise None (it keeps waiting and follows in a record of its own at
        its conversion window's end, whatever the outcome)."""
        waiting = self.converting.get(iid)
        window = self.config.conversion_window_s
        if waiting is None or window is None:
            return None
        if click_ts + window > waiting.impression.ts + self.config.window_s:
            return None
        del self.converting[iid]
        self.conversions_left.append(iid)
        if waiting.conversion_ts is not None:
            return 1
        self.counters.no_conversions += 1
        return 0

    def _close_conversions(self, wm: float, out: list[LabeledExample]) -> None:
        """Close the conversion windows that ended before ``wm`` (and the oldest beyond
        ``max_pending`` waiting): a ``no_conversion`` record unless one carried label2=0.
        An impression still pending (``"window"``) is left to its positive."""
        dl, waiting = self._conv_deadlines, self.converting
        kept: list[tuple[float, str]] = []  # pending, popped for the bound only
        while dl and (dl[0][0] < wm or len(waiting) > self.config.max_pending):
            deadline, iid = heapq.heappop(dl)
            entry = waiting.get(iid)
            if entry is None:
                continue  # converted
            if iid in self.pending:  # its positive decides: rides on it if due, else
                if deadline >= wm:  # it waits on (pending is bounded by max_pending too)
                    kept.append((deadline, iid))
                continue
            del waiting[iid]
            self.conversions_left.append(iid)
            if entry.conversion_ts is not None:  # "window": held until its window's end
                out.append(LabeledExample(entry.impression, 1, entry.conversion_ts, 0.0,
                                          "conversion", 1))  # fmt: skip
            elif not entry.zero_sent:
                self.counters.no_conversions += 1
                out.append(LabeledExample(entry.impression, 1, deadline, 0.0, "no_conversion", 0))
        for item in kept:
            heapq.heappush(dl, item)

    @property
    def _horizon(self) -> float:
        """Seconds after its ``ts`` at which an unclicked impression is labelled: ``T`` for
        ``"dfm"``, the window ``W`` otherwise."""
        c = self.config
        return c.dfm_observe_s if c.delayed_feedback == "dfm" else c.window_s

    def _late_click(self, imp: Impression, click_ts: float, out: list[LabeledExample]) -> None:
        """dfm: a click after ``T`` on an impression released unclicked: counted, and sent
        with weight 0 (final label for the monitor; nothing for the model to learn)."""
        self.counters.late_clicks += 1
        self._set_done(imp.impression_id, 1, click_ts, None)
        out.append(LabeledExample(imp, 1, click_ts, 0.0, "late_click"))
        self._converting(imp, click_ts, True, out)  # its negative carried label2=0

    def _release_held(self, out: list[LabeledExample]) -> None:
        """Send the held fake negatives whose event time the clicks input has reached (all
        of them when that input is idle), in arrival order."""
        held = self.held
        if not held:
            return
        frontier = self.max_ts["clicks"] if self.config.align_fake_negatives else float("inf")
        timeout = self.config.idle_timeout_s
        if timeout is not None and self._clock() - self.last_seen["clicks"] >= timeout:
            frontier = float("inf")
        while held and (held[0].ts <= frontier or len(held) > self.config.max_pending):
            imp = held.popleft()
            if imp.impression_id in self._held_ids:
                self._send_fake_negative(imp, out)

    def _send_fake_negative(self, imp: Impression, out: list[LabeledExample]) -> None:
        self._held_ids.discard(imp.impression_id)
        self.counters.fake_negatives += 1
        label2 = None if self.config.conversion_window_s is None else 0
        out.append(LabeledExample(imp, 0, imp.ts, self._startup_weight(imp.ts), "fake_negative",
                                  label2))  # fmt: skip

    def _startup_weight(self, ts: float) -> float:
        """The weight of a fake negative at event time ``ts``: 1, or with
        ``startup_compensation`` the estimated share of its clicks' cohort seen so far,
        ``1 - exp(-a / m)`` for ``a`` seconds after a fresh start (see the module doc)."""
        c = self.config
        if not c.startup_compensation or self._start_ts is None:
            return 1.0
        a = ts - self._start_ts
        if a >= c.window_s:
            return 1.0
        if self._delay_mean is None or ts - self._delay_mean[0] >= 1.0:
            self._delay_mean = (ts, self._fit_delay_mean())
        return -math.expm1(-max(a, 0.0) / self._delay_mean[1])

    def _fit_delay_mean(self) -> float:
        """Mean click delay (seconds) of an exponential fitted to the delays seen so far,
        each TRUNCATED at its impression's age ``T`` (the clicks input's time minus ``ts``;
        a click later than that is not seen yet): the fixed point of
        ``m = (k m0 + sum(d + T / (exp(T / m) - 1))) / (k + n)`` (the truncated
        exponential's likelihood equation, ``k`` prior clicks of mean ``m0``), in
        (0, ``window_s``]."""
        c = self.config
        k, m0 = c.startup_prior_clicks, c.startup_delay_prior_s
        cap = max(c.window_s, 2e-3)
        if not self._delays:
            return min(m0, cap) if k > 0 else 1.0
        arr = np.asarray(self._delays, dtype=np.float64)
        d = arr[:, 1]
        t = np.maximum(self.max_ts["clicks"] - arr[:, 0], d)
        lo, hi = 1e-3, cap  # h(m) = rhs(m) - m changes sign once: bisect in log space
        if self._delay_rhs(hi, d, t) >= hi:
            return hi
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            if self._delay_rhs(mid, d, t) > mid:
                lo = mid
            else:
                hi = mid
        return math.sqrt(lo * hi)

    def _delay_rhs(self, m: float, d: np.ndarray, t: np.ndarray) -> float:
        """The right-hand side of :meth:`_fit_delay_mean`'s equation at mean ``m``."""
        k, m0 = self.config.startup_prior_clicks, self.config.startup_delay_prior_s
        x = np.maximum(t / m, 1e-12)
        corr = np.where(x < 700.0, t / np.expm1(np.minimum(x, 700.0)), 0.0)
        return (k * m0 + float(d.sum() + corr.sum())) / (k + d.size)

    def _close(self, imp: Impression, deadline: float, out: list[LabeledExample]) -> None:
        if imp.impression_id in self._held_ids:  # closed (forced) before the clicks caught up
            self._send_fake_negative(imp, out)
        click_ts = self.clicked.pop(imp.impression_id, None)
        if click_ts is None and self.config.delayed_feedback == "fake_negative":
            # its (fake) negative left at the impression; remembered so that a click later
            # than the lateness bound still yields its positive, and for duplicates
            self._set_done(imp.impression_id, 0, deadline, imp)
        elif click_ts is None:
            self._label(imp, 0, deadline, "negative", out)
        else:
            self._label(imp, 1, click_ts, "positive", out,
                        self._label2_at_close(imp.impression_id, click_ts))  # fmt: skip

    def _force_oldest(self, out: list[LabeledExample]) -> None:
        while self._deadlines:
            _, iid = heapq.heappop(self._deadlines)
            imp = self._pop_pending(iid)
            if imp is not None:
                self.counters.forced_negatives += 1
                self._close(imp, imp.ts + self._horizon, out)
                return

    def _expire(self) -> list[LabeledExample]:
        wm = min(self.watermark, self.limit)
        out: list[LabeledExample] = []
        self._release_held(out)
        dl = self._deadlines
        while dl and dl[0][0] < wm:
            deadline, iid = heapq.heappop(dl)
            imp = self._pop_pending(iid)
            if imp is not None:
                self._close(imp, deadline, out)
        if self._conv_deadlines:
            self._close_conversions(wm, out)
        grace = wm - self.config.orphan_grace_s
        early = self.early_conversions
        while early:  # conversions whose click never came: given up like orphan clicks
            iid, cts = next(iter(early.items()))
            if cts >= grace:
                break
            early.popitem(last=False)
            self.early_left.append(iid)
            self.counters.orphan_conversions += 1
        while self.orphan_clicks:
            iid, cts = next(iter(self.orphan_clicks.items()))
            if cts >= grace:
                break
            self._pop_oldest_orphan()
            self.counters.orphan_clicks += 1
            self.expired_orphans.append((iid, cts))
        horizon = wm - self.config.dedup_horizon_s
        while self.done:
            iid, (_, lts, _) = next(iter(self.done.items()))
            if lts >= horizon and self.done_bytes <= self.config.max_done_bytes:
                break
            self._pop_oldest_done()
            self.forgotten.append(iid)
        return out


def offline_join(
    impressions: list[Impression], clicks: list[Click], window_s: float
) -> dict[str, int]:
    """Reference batch join: impression_id -> label (1 iff some click within ``window_s``).

    Duplicate impressions keep the first occurrence; clicks on unknown ids are ignored.
    """
    first: dict[str, float] = {}
    for imp in impressions:
        first.setdefault(imp.impression_id, imp.ts)
    labels = dict.fromkeys(first, 0)
    for c in clicks:
        ts = first.get(c.impression_id)
        if ts is not None and c.ts - ts <= window_s:
            labels[c.impression_id] = 1
    return labels
