"""A fast logit offset ahead of the served score: recovery after a drift (issue 17).

:class:`LogitOffset` tracks the ratio ``m`` of the clicks that happened to the clicks the
score it corrects predicted, over the recent impressions, and serves
``sigmoid(logit(p) + log m)``. It composes with a learning ranker: each impression's
score is remembered as it was SERVED (before the offset), so as the ranker catches up
with a drift its own scores rise, the ratio falls back to 1 and the offset decays by
itself; old impressions leave with an exponential weight (``half_life`` impressions).

Clicks arrive late (delay ~ Exponential(``delay_mean_s``) capped at ``max_delay_s``), so
a recent impression's click is only partly known. The estimate weighs each impression's
predicted click by the probability ``F(age)`` that its click, if any, has arrived by
``now`` (a delay model, as in DFM): ``m = (A + k) / (B + k)`` with

- ``A = Σ_i w_i c_i`` (``c_i``: 1 once impression ``i``'s click has arrived),
- ``B = Σ_i w_i p_i F(now - ts_i)``, ``w_i = 2^{-(N - n_i) / half_life}``,
- ``k = prior_clicks`` (shrinks towards no offset while clicks are few).

``E[A] = B`` on a calibrated stream whatever the delays, so the offset does not move
there; after an abrupt change of the CTR the recent impressions' early clicks count at
once, instead of one mean delay later. It learns from impressions and clicks, not from
the joiner's fake-negative examples, so it is unbiased on them by construction.
``delay_mean_s=None``: no delay model (``F = 1``), the plain tracked ratio.

Estimated delays (``estimate_delay``, on by default; needs ``max_delay_s``): a fixed
``delay_mean_s`` biases the offset on a log whose clicks are slower or faster (clicks
slower than the model counted as missing: the offset falls). :class:`DelayCDF` learns
``F`` from the stream: each click's delay (its arrival time, the stream's newest event
time when it is observed, minus its impression's time) goes into a histogram of its
impression's time bucket (``max_delay_s / 4`` wide, 48 log-spaced delay bins). A bucket is
*complete* once ``max_delay_s`` has passed since its end: every click of its impressions
has arrived, so its delays are an unbiased sample of the capped delay distribution. The
newest complete buckets holding at least ``min_delay_clicks`` clicks (up to 24 windows
back) give ``F``. Until then (at least one window of event time, longer at few clicks)
only the remembered impressions whose window has closed count, on both sides of the ratio
(``F`` = 1 for them, 0 for the rest, and the rest's clicks left out): unbiased whatever
the delays, late by a window; when the ring holds none (a window's impressions exceed
``horizon``) there is no offset until the delays are learned. ``delay_mean_s`` then only
says that there is a delay model; its value serves when ``estimate_delay`` is off.

Shrinkage (``shrink=True``, issue 17): with few clicks in the window the ratio's noise
alone moves ``log m`` by more than a calibrated ranker's error (100 impressions a minute:
served 0.073 -> 0.083 mean ``|log ratio|``). The served offset is the positive-part
James-Stein estimate of ``log m`` from one noisy observation, shrunk toward 0 by its
variance under "no miscalibration": ``offset = max(0, 1 - v0 / g^2) * g`` with
``g = log m`` and ``v0 = Σ w_i^2 p_i F_i / (B + k)^2`` (the Poisson variance of ``A`` when
``E[A] = B``, by the delta method). While ``|g|`` is within the noise (``g^2 <= v0``) the
offset is exactly 0; a real change (``g^2 >> v0``) passes nearly unshrunk. No constant
is tuned to a world: the band scales with the clicks the window expects.

Gate (``gate_z``, off by default): the positive-part estimate still serves part of the
noise (about 0.4 of its standard deviation on average when nothing changed), and it
follows the ranker's own wander. With a gate the offset serves nothing until
``|z| = |log m| / sqrt(v0)`` reaches ``gate_z``, and serves the shrunk estimate until
``|z|`` falls below ``release_z`` (the ranker caught up: the scores it remembers are the
pre-offset ones, so ``z`` measures the ranker's miscalibration, not the served one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DelayCDF", "LogitOffset", "OffsetConfig"]


@dataclass(frozen=True)
class OffsetConfig:
    """Settings of :class:`LogitOffset`.

    Attributes:
        enabled: serve through the offset (off by default: see README "Recovery after a
            drift").
        half_life: impressions after which an impression's weight has halved (> 0).
        horizon: impressions remembered (>= half_life; older ones weigh nothing).
        delay_mean_s: mean click delay of the delay model, seconds (> 0); None: no delay
            model (every impression's click counted as arrived).
        max_delay_s: the attribution window, seconds (> 0 or None): an impression older
            than it has all its clicks in (``F = 1``).
        prior_clicks: pseudo-clicks on both sides of the ratio (>= 0).
        max_abs_offset: bound on ``|log m|`` (> 0).
        shrink: shrink ``log m`` toward 0 by its null variance (module doc, "Shrinkage").
        refresh_every: in the worker (``[offset]`` of the settings), impressions between
            two re-estimates of the offset (>= 1).
        min_change: in the worker, the change of the offset (nats, >= 0) that publishes a
            new served calibrator on ``control``; smaller moves are not sent.
        gate_z: serve an offset only once ``|log m|`` reaches ``gate_z`` null standard
            deviations (> 0), until it falls below ``release_z`` (module doc, "Gate");
            None: no gate.
        release_z: see ``gate_z`` (>= 0, <= gate_z).
        estimate_delay: learn the click-delay CDF from the stream (module doc,
            "Estimated delays"); needs ``max_delay_s`` (the worker sets it to the join
            window); ``delay_mean_s``'s value is then unused.
        min_delay_clicks: complete clicks the estimated CDF needs before it replaces the
            prior (>= 1).
    """

    enabled: bool = False
    half_life: int = 5_000
    horizon: int = 40_000
    delay_mean_s: float | None = 60.0
    max_delay_s: float | None = None
    prior_clicks: float = 1.0
    max_abs_offset: float = 1.0
    shrink: bool = True
    refresh_every: int = 500
    min_change: float = 0.01
    gate_z: float | None = None
    release_z: float = 1.0
    estimate_delay: bool = True
    min_delay_clicks: int = 200

    def __post_init__(self) -> None:
        if self.half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {self.half_life}")
        if self.horizon < self.half_life:
            raise ValueError(f"horizon must be >= half_life, got {self.horizon}")
        for name in ("delay_mean_s", "max_delay_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        if not (math.isfinite(self.prior_clicks) and self.prior_clicks >= 0):
            raise ValueError(f"prior_clicks must be >= 0, got {self.prior_clicks}")
        if not (math.isfinite(self.max_abs_offset) and self.max_abs_offset > 0):
            raise ValueError(f"max_abs_offset must be > 0, got {self.max_abs_offset}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if not (math.isfinite(self.min_change) and self.min_change >= 0):
            raise ValueError(f"min_change must be >= 0, got {self.min_change}")
        if self.gate_z is not None and not (math.isfinite(self.gate_z) and self.gate_z > 0):
            raise ValueError(f"gate_z must be > 0 or None, got {self.gate_z}")
        gate = math.inf if self.gate_z is None else self.gate_z
        if not (math.isfinite(self.release_z) and 0 <= self.release_z <= gate):
            raise ValueError(f"release_z must be in [0, gate_z], got {self.release_z}")
        if self.min_delay_clicks < 1:
            raise ValueError(f"min_delay_clicks must be >= 1, got {self.min_delay_clicks}")


class DelayCDF:
    """The click-delay CDF learned from complete impression-time buckets (module doc,
    "Estimated delays"). ``window_s``: the attribution window (every click arrives within
    it, seconds > 0)."""

    BINS = 48  # log-spaced delay bins from MIN_DELAY_S to the window
    MIN_DELAY_S = 0.5
    BUCKETS_PER_WINDOW = 4
    #: complete buckets kept (24 windows of impressions: at a few clicks a minute the
    #: newest ``min_clicks`` clicks span many windows); the newest ones holding
    #: ``min_clicks`` clicks make the estimate
    KEEP_COMPLETE = 96

    def __init__(self, window_s: float, min_clicks: int = 200) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s, self.min_clicks = float(window_s), int(min_clicks)
        self.width = self.window_s / self.BUCKETS_PER_WINDOW
        lo = min(self.MIN_DELAY_S, self.window_s / 2)
        #: upper edges of the delay bins (seconds); bin 0 also holds delays below lo
        self.edges = np.geomspace(lo, self.window_s, self.BINS)
        self._buckets: dict[int, npt.NDArray[np.float64]] = {}
        self.n_clicks = 0  # clicks in the complete buckets the last cdf() used

    def add(self, imp_ts: npt.ArrayLike, delay_s: npt.ArrayLike) -> None:
        """Clicks on impressions at ``imp_ts`` observed ``delay_s`` after them (seconds,
        shape ``(n,)``). A delay past the window (the pipeline's own lag) counts as the
        window; a negative one, or one past twice the window, cannot be a click's and is
        not counted, so only buckets near the stream's present are ever made."""
        ts = np.asarray(imp_ts, dtype=np.float64).reshape(-1)
        d = np.asarray(delay_s, dtype=np.float64).reshape(-1)
        ok = np.isfinite(ts) & np.isfinite(d) & (d >= 0.0) & (d <= 2.0 * self.window_s)
        ts, d = ts[ok], np.minimum(d[ok], self.window_s)
        if ts.size == 0:
            return
        b = np.floor(ts / self.width).astype(np.int64)
        k = np.minimum(np.searchsorted(self.edges, d), self.BINS - 1)
        for bucket in np.unique(b):
            counts = self._buckets.get(int(bucket))
            if counts is None:
                counts = self._buckets[int(bucket)] = np.zeros(self.BINS)
            counts += np.bincount(k[b == bucket], minlength=self.BINS)

    def cdf(self, now: float) -> npt.NDArray[np.float64] | None:
        """``F`` at :attr:`edges` from the newest complete buckets at event time ``now``
        (shape ``(BINS,)``), or None while they hold fewer than ``min_clicks`` clicks.
        Drops buckets older than the ones it keeps."""
        last_complete = math.floor((now - self.window_s) / self.width) - 1
        complete = sorted((b for b in self._buckets if b <= last_complete), reverse=True)
        for b in complete[self.KEEP_COMPLETE :]:
            del self._buckets[b]
        counts = np.zeros(self.BINS)
        for b in complete[: self.KEEP_COMPLETE]:  # newest first, until min_clicks
            counts += self._buckets[b]
            if counts.sum() >= self.min_clicks:
                break
        self.n_clicks = int(counts.sum())
        if self.n_clicks < self.min_clicks:
            return None
        return np.asarray(np.cumsum(counts) / counts.sum())

    def at(self, cdf: npt.NDArray[np.float64], age_s: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``F(age_s)`` from :meth:`cdf`'s values, linear in log delay between the bin
        edges (0 at age 0, 1 from the window on)."""
        a = np.asarray(age_s, dtype=np.float64)
        x = np.log(np.maximum(a, 1e-9))
        f = np.interp(x, np.log(self.edges), cdf, left=0.0, right=1.0)
        lo = self.edges[0]
        # below the first edge: linear in age from 0 at 0 to cdf[0] at the edge
        f = np.where(a < lo, cdf[0] * np.clip(a, 0.0, None) / lo, f)
        return np.asarray(np.where(a >= self.window_s, 1.0, f))


class LogitOffset:
    """The online offset (see the module doc). Feed it, in event-time order,
    :meth:`observe_impressions` (the score each impression was served with before the
    offset) and :meth:`observe_clicks`; :meth:`refresh` at event time ``now`` updates
    :attr:`offset`; :meth:`transform` applies it."""

    def __init__(self, config: OffsetConfig | None = None) -> None:
        self.config = config or OffsetConfig(enabled=True)
        h = self.config.horizon
        self._ts = np.zeros(h)
        self._p = np.zeros(h)
        self._c = np.zeros(h)
        self._slot: dict[str, int] = {}  # impression id -> ring slot (while remembered)
        self._ids: list[str | None] = [None] * h
        self.n_seen = 0  # impressions observed (ring position = n_seen % horizon)
        self.offset = 0.0  # log m, nats on the logit scale
        self.null_var = 0.0  # variance of log m under no miscalibration (last refresh)
        self.z = 0.0  # log m in null standard deviations (last refresh)
        self.engaged = False  # with a gate: serving an offset
        c = self.config
        #: the learned click-delay CDF (None: no delay model, or estimate_delay off)
        self.delays: DelayCDF | None = (
            DelayCDF(c.max_delay_s, c.min_delay_clicks)
            if c.estimate_delay and c.delay_mean_s is not None and c.max_delay_s is not None
            else None
        )
        #: where the last refresh's F came from: "none" (no delay model), "prior" (the
        #: exponential with delay_mean_s, estimate_delay off), "complete" (delays not
        #: learned yet: only impressions whose window has closed) or "estimated"
        #: (:attr:`delays`)
        self.delay_source = "none" if c.delay_mean_s is None else "prior"

    def observe_impressions(self, ids: Sequence[str], ts: npt.ArrayLike, p: npt.ArrayLike) -> None:
        """Impressions ``ids`` at event times ``ts`` (seconds, shape ``(n,)``) served with
        scores ``p`` (probabilities before the offset, shape ``(n,)``). Skipped: an id
        already remembered (a redelivery: its first score and click flag stay), and, once
        the window is full, an impression older than its oldest (one that already left it,
        e.g. a late positive record of an evicted impression: remembered again as new, its
        click would count against the predictions of impressions it does not belong to)."""
        ts_a = np.asarray(ts, dtype=np.float64).reshape(-1)
        p_a = np.asarray(p, dtype=np.float64).reshape(-1)
        if not (len(ids) == ts_a.size == p_a.size):
            raise ValueError(f"ids, ts and p differ in length: {len(ids)}, {ts_a.size}, {p_a.size}")
        if not (np.all(np.isfinite(ts_a)) and np.all((p_a >= 0) & (p_a <= 1))):
            raise ValueError("ts must be finite and p within [0, 1]")
        h = self.config.horizon
        for iid, t, q in zip(ids, ts_a, p_a, strict=True):
            if iid in self._slot:
                continue
            k = self.n_seen % h
            if self.n_seen >= h and t < self._ts[k]:  # slot k holds the oldest remembered
                continue
            old = self._ids[k]
            if old is not None:
                self._slot.pop(old, None)
            self._ids[k], self._slot[iid] = iid, k
            self._ts[k], self._p[k], self._c[k] = t, q, 0.0
            self.n_seen += 1

    def observe_clicks(self, ids: Sequence[str]) -> int:
        """Clicks on impressions ``ids``; returns how many were counted (a click on an
        impression no longer remembered, or a duplicate, is not)."""
        counted = 0
        for iid in ids:
            k = self._slot.get(iid)
            if k is not None and self._c[k] == 0.0:
                self._c[k] = 1.0
                counted += 1
        return counted

    def observe_delays(self, imp_ts: npt.ArrayLike, now: float) -> None:
        """Clicks on impressions at ``imp_ts`` (seconds, shape ``(n,)``) observed at event
        time ``now``: their delays feed :attr:`delays` (every click, remembered impression
        or not, so that the sample is not cut at the window's span). No-op without it."""
        if self.delays is not None:
            ts = np.asarray(imp_ts, dtype=np.float64).reshape(-1)
            self.delays.add(ts, now - ts)

    def remembers(self, impression_id: str) -> bool:
        """True while impression ``impression_id`` is in the window."""
        return impression_id in self._slot

    def refresh(self, now: float) -> float:
        """Re-estimate the offset at event time ``now`` (seconds); returns it."""
        c = self.config
        n = min(self.n_seen, c.horizon)
        if n == 0:
            self.offset = 0.0
            return 0.0
        h = c.horizon
        # ring slots newest first -> age in impressions 0..n-1
        pos = (self.n_seen - 1 - np.arange(n)) % h
        w = np.exp2(-np.arange(n) / c.half_life)
        age = np.maximum(now - self._ts[pos], 0.0)
        cdf = None if self.delays is None else self.delays.cdf(now)
        clicks = self._c[pos]
        if c.delay_mean_s is None:
            f = np.ones(n)
        elif self.delays is not None:
            if cdf is not None:
                f = self.delays.at(cdf, age)
                self.delay_source = "estimated"
            else:
                # delays not learned yet: only impressions whose window has closed count
                # (all their clicks are in), on both sides of the ratio; none in the ring:
                # no offset
                f = (age >= self.delays.window_s).astype(np.float64)
                clicks = clicks * f
                self.delay_source = "complete"
        else:
            f = -np.expm1(-age / c.delay_mean_s)
            self.delay_source = "prior"
            if c.max_delay_s is not None:
                # the capped delay: everything in once the window has closed; before it
                # the exponential's mass beyond the cap arrives at the cap
                f = np.where(age >= c.max_delay_s, 1.0, f)
        a = float(np.dot(w, clicks))
        b = float(np.dot(w, self._p[pos] * f))
        m = (a + c.prior_clicks) / (b + c.prior_clicks) if b + c.prior_clicks > 0 else 1.0
        g = math.log(m) if m > 0 else -c.max_abs_offset
        if (c.shrink or c.gate_z is not None) and g != 0.0:
            # null variance of log m (Poisson A with mean B)
            self.null_var = float(np.dot(w * w, self._p[pos] * f)) / (b + c.prior_clicks) ** 2
            self.z = g / math.sqrt(self.null_var) if self.null_var > 0 else 0.0
            if c.shrink:  # positive-part James-Stein
                g *= max(0.0, 1.0 - self.null_var / (g * g))
        else:
            self.z = 0.0
        if c.gate_z is not None:
            self.engaged = abs(self.z) >= (c.release_z if self.engaged else c.gate_z)
            if not self.engaged:
                g = 0.0
        self.offset = float(np.clip(g, -c.max_abs_offset, c.max_abs_offset))
        return self.offset

    def transform(self, p: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``sigmoid(logit(p) + offset)``, shape of ``p``."""
        q = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
        z = np.log(q) - np.log1p(-q) + self.offset
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (for a snapshot); :meth:`from_state` restores it."""
        n = min(self.n_seen, self.config.horizon)
        pos = [(self.n_seen - n + i) % self.config.horizon for i in range(n)]
        return {
            "n_seen": self.n_seen,
            "offset": self.offset,
            "engaged": self.engaged,
            "ids": [self._ids[k] for k in pos],
            "ts": self._ts[pos].tolist(),
            "p": self._p[pos].tolist(),
            "c": self._c[pos].tolist(),
            "delay_buckets": (
                {}
                if self.delays is None
                else {str(b): v.tolist() for b, v in self.delays._buckets.items()}
            ),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], config: OffsetConfig | None = None) -> LogitOffset:
        """The offset of :meth:`state_dict` ``state`` under ``config``."""
        o = cls(config)
        ids = list(state["ids"])
        o.observe_impressions(ids, state["ts"], state["p"])
        c = np.asarray(state["c"], dtype=np.float64)
        o.observe_clicks([iid for iid, ci in zip(ids, c, strict=True) if ci > 0])
        o.offset = float(state["offset"])
        if o.delays is not None:
            for b, v in state.get("delay_buckets", {}).items():
                counts = np.asarray(v, dtype=np.float64)
                if counts.shape == (DelayCDF.BINS,):
                    o.delays._buckets[int(b)] = counts
        o.engaged = bool(state.get("engaged", False))
        return o
