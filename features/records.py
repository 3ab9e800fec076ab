"""Key records of the feature stage: decayed counts plus a buffer of recent events.

One record per key (user, item, user x item, ...), a plain list so that the stage's
``state_dict`` is JSON::

    [R, n_imp, imp_0..imp_{H-1}, clk_0..clk_{H-1}, last_imp, last_clk, horizon,
     evicted_last_imp, evicted_last_clk, buf]

``R`` (:data:`TIME`) is the key's newest event time; ``imp_j`` / ``clk_j`` the counts of
impressions and clicks decayed to ``R`` with half-life ``h_j``; ``n_imp`` (:data:`COUNT`)
the undecayed impression count; ``buf`` a flat list of recent event times, ``+t`` for an
impression and ``-t`` for a click (event times are > 0). Buffered events let a query at
``t <= R`` subtract what came at or after ``t``: exact unless an evicted event lies there
(``t <= horizon``). :class:`KeyRecords` holds the layout and the arithmetic; the stage
(:mod:`features.stage`) keeps the records and decides which keys an event touches.

>>> kr = KeyRecords((3600.0,), lateness_s=600.0, max_buffer=32)
>>> rec = kr.new(100.0)
>>> kr.apply(rec, 100.0, False); kr.apply(rec, 130.0, True)
>>> imps, clks, n, last_imp, last_clk, approx = kr.query(rec, 120.0)
>>> round(imps[0], 6), clks[0], n, last_imp, last_clk, approx  # the click at 130 is after t
(0.996157, 0.0, 1.0, 100.0, -inf, False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from itertools import repeat
from operator import mul, sub
from typing import Any

__all__ = ["COUNT", "NEVER", "TIME", "KeyRecords"]

TIME, COUNT = 0, 1  # a record's newest event time, its undecayed impression count
NEVER = -math.inf  # "no such event" in a record (state_dict writes it as None)
_LN2 = math.log(2.0)


class KeyRecords:
    """Layout and arithmetic of key records for ``half_lives_s`` (H of them, seconds);
    buffered events older than ``lateness_s`` are folded away, at most ``max_buffer``
    kept."""

    def __init__(self, half_lives_s: Sequence[float], lateness_s: float, max_buffer: int) -> None:
        self.h = h = len(half_lives_s)
        self.rates = [_LN2 / x for x in half_lives_s]
        self.lateness_s, self.max_buffer = lateness_s, max_buffer
        self.i0, self.c0 = 2, 2 + h
        self.last_imp, self.last_clk = 2 + 2 * h, 3 + 2 * h
        self.horizon, self.ev_imp, self.ev_clk = 4 + 2 * h, 5 + 2 * h, 6 + 2 * h
        self.buf = 7 + 2 * h

    def new(self, te: float) -> list[Any]:
        """An empty record at event time ``te``."""
        return [te, 0.0] + [0.0] * (2 * self.h) + [NEVER] * 5 + [[]]

    def apply(self, rec: list[Any], te: float, is_click: bool) -> None:
        """Count an impression (or a click) at event time ``te`` into ``rec``."""
        h = self.h
        r = rec[TIME]
        off = self.c0 if is_click else self.i0
        if te >= r:
            if te > r:
                dt = te - r
                for j, a in enumerate(self.rates):
                    f = math.exp(-dt * a)
                    rec[2 + j] *= f
                    rec[2 + h + j] *= f
                rec[TIME] = te
            for j in range(h):
                rec[off + j] += 1.0
        else:
            dt = r - te
            for j, a in enumerate(self.rates):
                rec[off + j] += math.exp(-dt * a)
        if is_click:
            if te > rec[self.last_clk]:
                rec[self.last_clk] = te
        else:
            rec[COUNT] += 1.0
            if te > rec[self.last_imp]:
                rec[self.last_imp] = te
        buf = rec[self.buf]
        buf.append(-te if is_click else te)
        if len(buf) > 4 and abs(buf[0]) <= rec[TIME] - self.lateness_s:
            self.prune(rec)
        elif len(buf) > self.max_buffer:
            self.prune(rec)

    def query(
        self, rec: list[Any], t: float
    ) -> tuple[list[float], list[float], float, float, float, bool]:
        """``rec``'s decayed impression and click counts ``(H,)`` each, impression count,
        last impression and last click times as of ``t``, and whether the answer is
        approximate (an evicted event may lie at or after ``t``)."""
        h, i0, c0 = self.h, self.i0, self.c0
        r = rec[TIME]
        if t > r:
            dt = t - r
            fs = [math.exp(-dt * a) for a in self.rates]
            imps = [rec[i0 + j] * fs[j] for j in range(h)]
            clks = [rec[c0 + j] * fs[j] for j in range(h)]
            return imps, clks, rec[COUNT], rec[self.last_imp], rec[self.last_clk], False
        # t <= R: take out the buffered events at or after t (impressions v > 0, clicks
        # v < 0), as time differences; each count's subtractions run in buffer order
        approximate = t <= rec[self.horizon]
        last_imp, last_clk = rec[self.ev_imp], rec[self.ev_clk]
        if last_imp >= t:  # only when approximate: an evicted event at or after t
            last_imp = NEVER
        if last_clk >= t:
            last_clk = NEVER
        # one pass over the buffer: the later events as time differences (buffer order),
        # the newest earlier ones
        later_imps: list[float] = []
        later_clks: list[float] = []
        for v in rec[self.buf]:
            if v > 0.0:
                if v >= t:
                    later_imps.append(v - t)
                elif v > last_imp:
                    last_imp = v
            else:
                w = -v
                if w >= t:
                    later_clks.append(w - t)
                elif w > last_clk:
                    last_clk = w
        # x - exp(d0 * a) - exp(d1 * a) - ... left to right (reduce runs the same float
        # operations in the same order as a Python loop, without its overhead)
        exp = math.exp
        imps, clks = [], []
        for j, a in enumerate(self.rates):
            g = exp((r - t) * a)
            x = rec[i0 + j] * g
            if later_imps:
                x = reduce(sub, map(exp, map(mul, later_imps, repeat(a))), x)
            imps.append(x if x > 0.0 else 0.0)
            x = rec[c0 + j] * g
            if later_clks:
                x = reduce(sub, map(exp, map(mul, later_clks, repeat(a))), x)
            clks.append(x if x > 0.0 else 0.0)
        n = rec[COUNT] - len(later_imps)
        return imps, clks, n, last_imp, last_clk, approximate

    def prune(self, rec: list[Any]) -> None:
        """Fold buffered events older than ``lateness_s`` (and the oldest past half of
        ``max_buffer``) into the evicted-time fields and the horizon."""
        buf = rec[self.buf]
        cut = rec[TIME] - self.lateness_s
        keep = [v for v in buf if abs(v) > cut]
        drop = [v for v in buf if abs(v) <= cut]
        if len(keep) > self.max_buffer // 2:
            keep.sort(key=abs)
            extra = len(keep) - self.max_buffer // 2
            drop.extend(keep[:extra])
            keep = keep[extra:]
        for v in drop:
            te = abs(v)
            if te > rec[self.horizon]:
                rec[self.horizon] = te
            if v > 0:
                if te > rec[self.ev_imp]:
                    rec[self.ev_imp] = te
            elif te > rec[self.ev_clk]:
                rec[self.ev_clk] = te
        rec[self.buf] = keep
