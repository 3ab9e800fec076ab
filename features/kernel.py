"""The feature stage's compiled arithmetic: key records in arrays, events in batches.

A key's record is one row of ``F`` (float64, ``(capacity, 7 + 2H)`` for ``H``
half-lives)::

    [R, n_imp, imp_0..imp_{H-1}, clk_0..clk_{H-1}, last_imp, last_clk, horizon,
     evicted_last_imp, evicted_last_clk]

and its buffer of recent events is ``B[slot, :BL[slot]]`` (``+t`` an impression, ``-t`` a
click; event times are > 0). ``R`` is the key's newest event time (``NaN``: a slot given to
a new key and not yet written), ``imp_j`` / ``clk_j`` the counts decayed to ``R`` with
half-life ``h_j``, ``n_imp`` the undecayed impression count. Buffered events let a read at
``t <= R`` subtract what came at or after ``t``: exact unless an evicted event lies there
(``t <= horizon``). The layout, the decisions and every float operation (and its order) are
those of the pure-Python stage this replaces (``bench.features_vs_ref`` compares outputs
bit for bit), compiled with numba: the stage (:mod:`features.stage`) maps string keys to
slots and runs a batch of events through :func:`run_events` in one call.

An impression's row of slots has one entry per key position: 0 the user, 1 the item, 2 the
user x item pair, 3 the item x position, 4.. the user x ``item_*`` attributes; ``-2``: no
such key (no position, fewer attributes, or a part left out), ``-1``: a key the state does
not hold (a read only). Its features are written to ``out[e]`` in feature order: per key
position present, per half-life ``(log1p(imp), log1p(clk), ctr)``, then for the user
``(log1p(since last impression), log1p(since last click))`` and for the pair
``(log1p(n_imp), log1p(since last impression))``, ``NaN`` where there is no such event.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "APPROXIMATE",
    "EXPIRED",
    "IMPRESSION",
    "CLICK",
    "APPLY",
    "READ",
    "read_rows",
    "run_events",
]

#: event kinds of :func:`run_events`: an impression (features, then counted), a click
#: (counted into its impression's keys), an impression counted without features (counters
#: off), a read (features, nothing changes)
IMPRESSION, CLICK, APPLY, READ = 0, 1, 2, 3
#: indices of :func:`run_events`' ``stats``
APPROXIMATE, EXPIRED = 0, 1

_NEG_INF = -math.inf


@njit(cache=True)
def _new(F: np.ndarray, BL: np.ndarray, s: int, te: float, h: int) -> None:  # pragma: no cover
    """An empty record at event time ``te`` in slot ``s``."""
    F[s, 0] = te
    for j in range(1, 2 + 2 * h):
        F[s, j] = 0.0
    for j in range(2 + 2 * h, 7 + 2 * h):
        F[s, j] = _NEG_INF
    BL[s] = 0


@njit(cache=True)
def _evict(F: np.ndarray, s: int, h: int, v: float) -> None:  # pragma: no cover
    """Fold the buffered event ``v`` of slot ``s`` into its horizon and evicted times."""
    te = abs(v)
    if te > F[s, 4 + 2 * h]:
        F[s, 4 + 2 * h] = te
    if v > 0:
        if te > F[s, 5 + 2 * h]:
            F[s, 5 + 2 * h] = te
    elif te > F[s, 6 + 2 * h]:
        F[s, 6 + 2 * h] = te


@njit(cache=True)
def _prune(
    F: np.ndarray, B: np.ndarray, BL: np.ndarray, s: int, h: int, lateness: float, max_buffer: int
) -> None:  # pragma: no cover
    """Fold buffered events older than ``lateness`` (and the oldest past half of
    ``max_buffer``) into the evicted-time fields and the horizon."""
    n = BL[s]
    cut = F[s, 0] - lateness
    keep = np.empty(n)
    nk = 0
    for k in range(n):
        v = B[s, k]
        if abs(v) > cut:
            keep[nk] = v
            nk += 1
        else:
            _evict(F, s, h, v)
    start = 0
    half = max_buffer // 2
    if nk > half:
        # a stable sort by |v| (insertion sort: at most max_buffer + 1 entries)
        for a in range(1, nk):
            x = keep[a]
            b = a - 1
            while b >= 0 and abs(keep[b]) > abs(x):
                keep[b + 1] = keep[b]
                b -= 1
            keep[b + 1] = x
        start = nk - half
        for k in range(start):
            _evict(F, s, h, keep[k])
    for k in range(start, nk):
        B[s, k - start] = keep[k]
    BL[s] = nk - start


@njit(cache=True)
def _apply(
    F: np.ndarray,
    B: np.ndarray,
    BL: np.ndarray,
    s: int,
    te: float,
    is_click: bool,
    rates: np.ndarray,
    lateness: float,
    max_buffer: int,
) -> None:  # pragma: no cover
    """Count an impression (or a click) at event time ``te`` into slot ``s``."""
    h = rates.shape[0]
    r = F[s, 0]
    off = 2 + h if is_click else 2
    if te >= r:
        if te > r:
            dt = te - r
            for j in range(h):
                f = math.exp(-dt * rates[j])
                F[s, 2 + j] *= f
                F[s, 2 + h + j] *= f
            F[s, 0] = te
        for j in range(h):
            F[s, off + j] += 1.0
    else:
        dt = r - te
        for j in range(h):
            F[s, off + j] += math.exp(-dt * rates[j])
    if is_click:
        if te > F[s, 3 + 2 * h]:
            F[s, 3 + 2 * h] = te
    else:
        F[s, 1] += 1.0
        if te > F[s, 2 + 2 * h]:
            F[s, 2 + 2 * h] = te
    n = BL[s]
    B[s, n] = -te if is_click else te
    n += 1
    BL[s] = n
    if (n > 4 and abs(B[s, 0]) <= F[s, 0] - lateness) or n > max_buffer:
        _prune(F, B, BL, s, h, lateness, max_buffer)


@njit(cache=True)
def _apply_ttl(
    F: np.ndarray,
    B: np.ndarray,
    BL: np.ndarray,
    s: int,
    te: float,
    is_click: bool,
    rates: np.ndarray,
    lateness: float,
    max_buffer: int,
    ttl: float,
    stats: np.ndarray,
) -> None:  # pragma: no cover
    """:func:`_apply`, a new record first when the slot is new or idle past the TTL
    (counted in ``stats[EXPIRED]``)."""
    r = F[s, 0]
    if r != r or r < te - ttl:
        if r == r:
            stats[1] += 1
        _new(F, BL, s, te, rates.shape[0])
    _apply(F, B, BL, s, te, is_click, rates, lateness, max_buffer)


@njit(cache=True)
def _features(
    F: np.ndarray,
    B: np.ndarray,
    BL: np.ndarray,
    row: np.ndarray,
    t: float,
    update: bool,
    rates: np.ndarray,
    params: np.ndarray,
    max_buffer: int,
    out: np.ndarray,
    stats: np.ndarray,
    scratch: np.ndarray,
) -> int:  # pragma: no cover
    """The features at ``t`` of the keys in ``row`` into ``out`` (see the module
    docstring); ``update``: count the impression into each key right after reading it.
    Returns the number of values written."""
    h = rates.shape[0]
    lateness, ttl, prior, strength = params[0], params[1], params[2], params[3]
    ctr_prior = params[4]
    stale = t - ttl
    nan = math.nan
    li, lc, hz, ei, ec = 2 + 2 * h, 3 + 2 * h, 4 + 2 * h, 5 + 2 * h, 6 + 2 * h
    col = 0
    for j in range(row.shape[0]):
        s = row[j]
        if s == -2:
            continue
        empty = s < 0
        if not empty:
            r = F[s, 0]
            if r != r:
                empty = True
            elif r < stale:  # idle past the TTL: expired
                empty = True
                if update:
                    stats[1] += 1
        if empty:
            for _ in range(h):
                out[col] = 0.0
                out[col + 1] = 0.0
                out[col + 2] = ctr_prior
                col += 3
            if j == 0:
                out[col] = nan
                out[col + 1] = nan
                col += 2
            elif j == 2:
                out[col] = 0.0
                out[col + 1] = nan
                col += 2
            if update:
                _new(F, BL, s, t, h)
                _apply(F, B, BL, s, t, False, rates, lateness, max_buffer)
            continue
        r = F[s, 0]
        if t > r:  # in order: the aggregates decayed to t (the common case)
            mdt = r - t
            for k in range(h):
                f = math.exp(mdt * rates[k])
                im = F[s, 2 + k] * f
                cl = F[s, 2 + h + k] * f
                out[col] = math.log1p(im)
                out[col + 1] = math.log1p(cl)
                out[col + 2] = (cl + prior) / (im + strength)
                col += 3
                if update:  # and _apply(..., t, False), sharing the decay
                    F[s, 2 + k] = im + 1.0
                    F[s, 2 + h + k] = cl
            n, last_imp, last_clk = F[s, 1], F[s, li], F[s, lc]
            if update:
                F[s, 0] = t
                F[s, 1] = n + 1.0
                if t > last_imp:
                    F[s, li] = t
                nb = BL[s]
                B[s, nb] = t
                nb += 1
                BL[s] = nb
                if (nb > 4 and abs(B[s, 0]) <= t - lateness) or nb > max_buffer:
                    _prune(F, B, BL, s, h, lateness, max_buffer)
        else:
            # t <= R: take out the buffered events at or after t (as time differences, in
            # buffer order); exact unless an evicted event may lie at or after t
            if t <= F[s, hz]:
                stats[0] += 1
            last_imp, last_clk = F[s, ei], F[s, ec]
            if last_imp >= t:
                last_imp = _NEG_INF
            if last_clk >= t:
                last_clk = _NEG_INF
            nb = BL[s]
            later_i = scratch[0]
            later_c = scratch[1]
            ni = 0
            nc = 0
            for k in range(nb):
                v = B[s, k]
                if v > 0.0:
                    if v >= t:
                        later_i[ni] = v - t
                        ni += 1
                    elif v > last_imp:
                        last_imp = v
                else:
                    w = -v
                    if w >= t:
                        later_c[nc] = w - t
                        nc += 1
                    elif w > last_clk:
                        last_clk = w
            for k in range(h):
                a = rates[k]
                g = math.exp((r - t) * a)
                x = F[s, 2 + k] * g
                for q in range(ni):
                    x = x - math.exp(later_i[q] * a)
                im = x if x > 0.0 else 0.0
                x = F[s, 2 + h + k] * g
                for q in range(nc):
                    x = x - math.exp(later_c[q] * a)
                cl = x if x > 0.0 else 0.0
                out[col] = math.log1p(im)
                out[col + 1] = math.log1p(cl)
                out[col + 2] = (cl + prior) / (im + strength)
                col += 3
            n = F[s, 1] - ni
            if update:
                _apply(F, B, BL, s, t, False, rates, lateness, max_buffer)
        if j == 0:
            out[col] = math.log1p(t - last_imp) if last_imp > _NEG_INF else nan
            out[col + 1] = math.log1p(t - last_clk) if last_clk > _NEG_INF else nan
            col += 2
        elif j == 2:
            out[col] = math.log1p(n)
            out[col + 1] = math.log1p(t - last_imp) if last_imp > _NEG_INF else nan
            col += 2
    return col


@njit(cache=True)
def run_events(
    F: np.ndarray,
    B: np.ndarray,
    BL: np.ndarray,
    kinds: np.ndarray,
    ts: np.ndarray,
    slots: np.ndarray,
    rates: np.ndarray,
    params: np.ndarray,
    max_buffer: int,
    out: np.ndarray,
    stats: np.ndarray,
    start: int,
) -> int:  # pragma: no cover
    """Run events ``start..E-1`` in order: ``kinds`` (E,) int8 (:data:`IMPRESSION`,
    :data:`CLICK`, :data:`APPLY`, :data:`READ`), ``ts`` (E,) event times (s), ``slots``
    (E, K) int64 (the module docstring). Features go to ``out[e]`` (E, >= 3H K + 4) for
    impressions and reads; ``stats`` (2,) int64 gains the approximate reads and the
    expired keys. ``params``: ``[lateness_s, ttl_s, ctr_prior * ctr_strength,
    ctr_strength, ctr_prior]``.

    Returns the index of the first event not run: ``E``, or an event one of whose keys'
    buffers is full (``B`` holds fewer than ``max_buffer + 1`` events a key): the caller
    widens ``B`` and runs on from there.
    """
    lateness, ttl = params[0], params[1]
    width = B.shape[1]
    scratch = np.empty((2, width))
    for e in range(start, kinds.shape[0]):
        k = kinds[e]
        t = ts[e]
        if k != 3 and width <= max_buffer:
            for j in range(slots.shape[1]):
                s = slots[e, j]
                if s >= 0 and BL[s] >= width:
                    return e
        if k == 0 or k == 3:
            _features(
                F, B, BL, slots[e], t, k == 0, rates, params, max_buffer, out[e], stats, scratch
            )
        else:
            for j in range(slots.shape[1]):
                s = slots[e, j]
                if s >= 0:
                    _apply_ttl(F, B, BL, s, t, k == 1, rates, lateness, max_buffer, ttl, stats)
    return kinds.shape[0]


@njit(cache=True)
def read_rows(
    F: np.ndarray,
    B: np.ndarray,
    BL: np.ndarray,
    slots: np.ndarray,
    t: float,
    rates: np.ndarray,
    params: np.ndarray,
    max_buffer: int,
    out: np.ndarray,
) -> None:  # pragma: no cover
    """The features at ``t`` of each row of ``slots`` (N, K) into ``out[:N]``; changes
    nothing (serving's reads: :data:`READ` events of one time, fewer arguments to check
    per call than :func:`run_events`)."""
    stats = np.zeros(2, dtype=np.int64)
    scratch = np.empty((2, B.shape[1]))
    for e in range(slots.shape[0]):
        _features(F, B, BL, slots[e], t, False, rates, params, max_buffer, out[e], stats, scratch)
