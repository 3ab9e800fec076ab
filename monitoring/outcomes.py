"""Final labels for the monitor when the training stream's labels are provisional.

With fake negatives (Ktena et al. 2019; ``stream.join`` ``delayed_feedback="fake_negative"``)
every impression reaches the trainer at once as a negative, and again as a positive if its
click comes within the attribution window. Trained on, that stream is what the model needs;
judged as it is, it double counts every clicked impression and counts every impression as a
non-click until its click arrives, so calibration statistics, drift tests and refits would
act on a biased number (the stream's label-1 rate is ``p / (1 + p)``).

:class:`FinalOutcomes` turns it back into one record per impression with its final label:
the score of its first (provisional) record, the score it was served with at impression
time, and label 1 iff a positive for it arrived before its window closed. An impression's
window closes when the clock passes ``ts + window_s + lateness_s`` (the joiner's own rule):
the newest impression time seen, or, once :meth:`FinalOutcomes.advance` was called, only
what it says (the worker's monitor calls it with the joiner's event-time marks).
Positives that arrive after their impression was resolved are counted in
:attr:`FinalOutcomes.late_positives` (the stream lagged by more than the lateness), not
applied.

With the DFM scheme (``delayed_feedback="dfm"``) an impression's FIRST record may be its
positive (a click before the observation time, sent at click time), and a click after it
follows the impression's label-0 record as a weight-0 ``late_click``:
``FinalOutcomes(..., positives_first=True)`` keeps a positive whose impression has no record
yet as that impression's record (label 1 at once), so every impression is still judged once,
on its final label, with the score of its first record.

Memory: the provisional records of one window (``window_s`` of event time) as numpy
columns, plus the ids of the clicked ones; with ``max_pending``, at most that many records
however long the clock stands still (a stalled joiner's partition holds the marks): beyond
it the oldest are judged early on the clicks known then, and counted in
:attr:`FinalOutcomes.forced`.

>>> fo = FinalOutcomes(window_s=60.0, lateness_s=0.0)
>>> fo.add(["a", "b"], ts=[0.0, 1.0], label=[0, 0], columns={"p": [0.1, 0.2]})
>>> fo.add(["a"], ts=[0.0], label=[1], columns={"p": [0.15]})  # a's click, scored later
>>> fo.add(["c"], ts=[100.0], label=[0], columns={"p": [0.3]})  # the clock moves on
>>> out = fo.resolve()
>>> out["label"].tolist(), out["p"].tolist(), fo.pending
([1.0, 0.0], [0.1, 0.2], 1)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["FinalOutcomes"]

FloatArray = npt.NDArray[np.float64]


class FinalOutcomes:
    """One record per impression with its final label, from a fake-negative stream.

    Args:
        window_s: the attribution window, seconds of event time.
        lateness_s: extra seconds of event time before an impression is resolved.
        positives_first: a label-1 record of an impression with no record yet is its
            record (the ``"dfm"`` stream); False: label-1 records only mark clicks.
        max_pending: bound on the records waiting for their window (None: none); beyond
            it :meth:`resolve` judges the oldest at once (:attr:`forced` counts them).

    >>> fo = FinalOutcomes(window_s=60.0, positives_first=True)
    >>> fo.add(["a", "b"], ts=[0.0, 1.0], label=[1, 0], columns={"p": [0.4, 0.2]})
    >>> fo.add(["b"], ts=[1.0], label=[1], columns={"p": [0.3]})  # b's late click
    >>> fo.add(["c"], ts=[100.0], label=[0], columns={"p": [0.3]})
    >>> out = fo.resolve()
    >>> out["label"].tolist(), out["p"].tolist()
    ([1.0, 1.0], [0.4, 0.2])
    """

    def __init__(
        self,
        window_s: float,
        lateness_s: float = 0.0,
        *,
        positives_first: bool = False,
        max_pending: int | None = None,
    ) -> None:
        if window_s < 0 or lateness_s < 0:
            raise ValueError("window_s and lateness_s must be >= 0")
        if max_pending is not None and max_pending < 1:
            raise ValueError("max_pending must be >= 1 (or None)")
        self.max_pending = max_pending
        self.horizon_s = float(window_s) + float(lateness_s)
        self.positives_first = positives_first
        self._chunks: deque[tuple[list[str], FloatArray, dict[str, np.ndarray]]] = deque()
        self._clicked: dict[str, float] = {}  # impression id -> its ts
        self._pending_ids: set[str] = set()
        self.clock = float("-inf")
        #: the clock follows :meth:`advance` only (set by its first call)
        self.marked = False
        self.pending = 0
        self.late_positives = 0
        self.duplicates = 0
        self.resolved = 0
        #: records judged before their window closed, to stay within ``max_pending``
        self.forced = 0

    def advance(self, clock: float) -> None:
        """Move the clock (newest-impression-time scale, epoch s) forward to ``clock``
        without a record: the stream says no label for an impression older than ``clock -
        horizon_s`` is still to come (the joiner's event-time marks), so those resolve
        even when no later impression arrives. An earlier ``clock`` changes nothing.

        From the first call on, only this moves the clock: the newest impression time
        ran ahead of the clicks of input partitions read more slowly, and resolved their
        impressions before their positives came (late positives, a lower CTR).

        >>> fo = FinalOutcomes(window_s=60.0)
        >>> fo.add(["a"], ts=[0.0], label=[0], columns={"p": [0.1]})
        >>> fo.resolve(), fo.pending
        ({}, 1)
        >>> fo.advance(60.5)
        >>> fo.resolve()["label"].tolist(), fo.pending
        ([0.0], 0)
        """
        self.marked = True
        if clock > self.clock:
            self.clock = float(clock)

    def add(
        self,
        ids: Sequence[str],
        *,
        ts: npt.ArrayLike,
        label: npt.ArrayLike,
        columns: Mapping[str, npt.ArrayLike],
    ) -> None:
        """A scored batch: ``ids`` (B,) impression ids, ``ts`` (B,) impression times (epoch
        s), ``label`` (B,) 0 (provisional negative) or 1 (its click), ``columns`` (B,)
        arrays kept for the label-0 records (e.g. served and raw scores, segment)."""
        t = np.asarray(ts, dtype=np.float64).reshape(-1)
        lab = np.asarray(label).reshape(-1)
        if t.size != len(ids) or lab.size != len(ids):
            raise ValueError("ids, ts and label must have one length")
        neg = lab == 0
        pos = np.flatnonzero(~neg)
        # the batch's own label-0 records count as known: a positive that shares a batch
        # with its impression's provisional record is not late, however old (a trainer
        # batch may span more than a window of event time)
        known = {ids[int(k)] for k in np.flatnonzero(neg)} if pos.size else set()
        for k in pos:
            iid = ids[int(k)]
            mine = iid in self._pending_ids or iid in known
            if mine or t[k] > self.clock - self.horizon_s:
                if self.positives_first and not mine:
                    neg[k] = True  # its first record: kept below (label 1 on resolving)
                self._clicked[iid] = float(t[k])
            else:
                self.late_positives += 1
        if neg.any():
            keep = np.flatnonzero(neg)
            new_ids = []
            fresh = []
            for k in keep:
                iid = ids[int(k)]
                if iid in self._pending_ids:
                    self.duplicates += 1  # a redelivered provisional record
                    continue
                self._pending_ids.add(iid)
                new_ids.append(iid)
                fresh.append(k)
            if fresh:
                sel = np.asarray(fresh)
                cols = {name: np.asarray(v)[sel] for name, v in columns.items()}
                self._chunks.append((new_ids, t[sel], cols))
                self.pending += len(new_ids)
        if t.size and not self.marked:
            self.clock = max(self.clock, float(t.max()))

    def _take_oldest(self, n: int) -> list[tuple[list[str], FloatArray, dict[str, np.ndarray]]]:
        """The ``n`` oldest waiting records (arrival order), taken out of the chunks."""
        out: list[tuple[list[str], FloatArray, dict[str, np.ndarray]]] = []
        chunks = self._chunks
        while n > 0 and chunks:
            ids_c, ts_c, cols_c = chunks.popleft()
            if len(ids_c) > n:  # split: the rest goes back in front
                chunks.appendleft((ids_c[n:], ts_c[n:], {k: v[n:] for k, v in cols_c.items()}))
                ids_c, ts_c, cols_c = ids_c[:n], ts_c[:n], {k: v[:n] for k, v in cols_c.items()}
            out.append((ids_c, ts_c, cols_c))
            n -= len(ids_c)
        return out

    def resolve(self, *, flush: bool = False) -> dict[str, np.ndarray]:
        """The records whose window closed (all of them when ``flush``), oldest first:
        the kept columns plus ``ts`` and ``label`` (float64 0/1). Each record is resolved
        once it is due, whatever else its micro-batch holds (a batch may span more than a
        window of event time at low traffic)."""
        due = self.clock - self.horizon_s
        parts: list[tuple[list[str], FloatArray, dict[str, np.ndarray]]] = []
        if flush:
            parts, self._chunks = list(self._chunks), deque()
        elif self._chunks and float(min(float(c[1].min()) for c in self._chunks)) < due:
            keep: deque[tuple[list[str], FloatArray, dict[str, np.ndarray]]] = deque()
            for ids_c, ts_c, cols_c in self._chunks:
                ready = ts_c < due
                if ready.all():
                    parts.append((ids_c, ts_c, cols_c))
                elif not ready.any():
                    keep.append((ids_c, ts_c, cols_c))
                else:
                    for mask, dest in ((ready, parts), (~ready, keep)):
                        sel = np.flatnonzero(mask)
                        dest.append(([ids_c[int(k)] for k in sel], ts_c[sel],
                                     {n: v[sel] for n, v in cols_c.items()}))  # fmt: skip
            self._chunks = keep
        over = 0 if self.max_pending is None else self.pending - self.max_pending
        over -= sum(len(c[0]) for c in parts)
        if over > 0:
            self.forced += over
            parts.extend(self._take_oldest(over))
        if not parts:
            return {}
        ids = [iid for p in parts for iid in p[0]]
        labels = np.fromiter(
            (iid in self._clicked for iid in ids), dtype=np.float64, count=len(ids)
        )
        for iid in ids:
            self._clicked.pop(iid, None)
            self._pending_ids.discard(iid)
        if not flush:  # clicks on impressions never seen provisional: keep one horizon
            stale = [k for k, t in self._clicked.items() if t < due - self.horizon_s]
            for k in stale:
                del self._clicked[k]
        self.pending -= len(ids)
        self.resolved += len(ids)
        out = {name: np.concatenate([p[2][name] for p in parts]) for name in parts[0][2]}
        out["ts"] = np.concatenate([p[1] for p in parts])
        out["label"] = labels
        return out
