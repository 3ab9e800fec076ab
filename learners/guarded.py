"""Recalibration that never makes things worse: forward-holdout acceptance and rollback.

:class:`GuardedRecalibrator` serves a calibrator on top of an online ranker that keeps
learning. Three rules:

1. **Forward holdout.** A refit (:meth:`propose`, e.g. on a drift alarm) is fitted on
   the newest ``fit_window`` (raw score, final label) pairs and then *waits*: it is
   judged on the next ``holdout`` pairs, which come after the fit in time and were not
   fitted on. It replaces the serving calibrator only if its mean per-example log loss
   there beats the serving one's by more than ``z`` standard errors of the paired
   differences (the holdout's own noise, estimated from the data).
2. **Composition.** Candidates are fitted on the current ranker's raw scores only and
   replace (never stack on) the served calibrator, so the calibrator corrects what the
   ranker has not learnt yet, not what it learnt meanwhile.
3. **Rollback.** Every ``holdout`` pairs, the served calibrator is compared, paired, with
   the raw ranker (identity) on those pairs; when it is worse by more than ``z``
   standard errors (the ranker caught up, or the refit was noise), it is rolled back to
   the identity.

Pure numpy on arrays; the caller (``stream.services.MonitorService``) publishes what
:meth:`update` returns.

>>> rng = np.random.default_rng(0)
>>> g = GuardedRecalibrator(GuardConfig(fit_window=4000, holdout=4000))
>>> p = np.full(20_000, 0.04)
>>> y = (rng.random(20_000) < 0.064).astype(float)  # the CTR rose x1.6
>>> g.update(p[:4000], y[:4000]), g.propose()
([], True)
>>> [e.kind for e in g.update(p[4000:], y[4000:])]
['accepted']
>>> 0.06 < float(g.serving.transform(np.array([0.04]))[0]) < 0.07
True
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from learners.calibration import CALIBRATOR_KINDS, Calibrator, LogitShiftCalibrator, new_calibrator

__all__ = ["GuardConfig", "GuardEvent", "GuardedRecalibrator"]

_EPS = 1e-7


@dataclass(frozen=True)
class GuardConfig:
    """``kind``: the candidate calibrator (``learners.calibration.CALIBRATOR_KINDS``);
    ``fit_window``: newest pairs a candidate is fitted on; ``holdout``: forward pairs it
    is judged on (and the rollback check's window); ``z``: standard errors of the paired
    log-loss difference a change must clear; ``min_clicks``: clicks a fit or a judgement
    needs (fewer: wait)."""

    kind: str = "shift"
    fit_window: int = 5_000
    holdout: int = 5_000
    z: float = 2.0
    min_clicks: int = 30

    def __post_init__(self) -> None:
        if self.kind not in CALIBRATOR_KINDS:
            raise ValueError(f"unknown calibrator kind {self.kind!r}")
        if self.fit_window < 1 or self.holdout < 1 or not self.z >= 0:
            raise ValueError("GuardConfig: need fit_window >= 1, holdout >= 1, z >= 0")


@dataclass(frozen=True)
class GuardEvent:
    """What :meth:`GuardedRecalibrator.update` decided: ``kind`` is ``"accepted"``,
    ``"rejected"`` or ``"rollback"``; ``gain``: mean log-loss gain (nats) of the new
    serving calibrator over the old one on the judged pairs; ``se``: its standard error;
    ``calibrator``: the serving calibrator afterwards."""

    kind: str
    gain: float
    se: float
    n: int
    calibrator: Calibrator


def _ll(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1 - _EPS)
    out: np.ndarray = -(y * np.log(q) + (1 - y) * np.log1p(-q))
    return out


def _paired(old: np.ndarray, new: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean log-loss gain of ``new`` over ``old`` (N,) on labels ``y`` and its std error."""
    d = _ll(old, y) - _ll(new, y)
    n = d.size
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")


class GuardedRecalibrator:
    """See the module doc. ``serving`` starts as the identity."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.identity: Calibrator = LogitShiftCalibrator()
        self.serving: Calibrator = self.identity
        self.candidate: Calibrator | None = None
        self._recent: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._n_recent = 0
        self._fwd_p: list[np.ndarray] = []
        self._fwd_y: list[np.ndarray] = []
        self._n_fwd = 0
        self.n_accepted = 0
        self.n_rejected = 0
        self.n_rollbacks = 0

    def _remember(self, p: np.ndarray, y: np.ndarray) -> None:
        self._recent.append((p, y))
        self._n_recent += p.size
        while self._recent and self._n_recent - self._recent[0][0].size >= self.config.fit_window:
            self._n_recent -= self._recent.popleft()[0].size

    def propose(self) -> bool:
        """Fit a candidate on the newest ``fit_window`` pairs; it waits for its forward
        holdout. False (nothing proposed) with too few clicks or one already waiting."""
        if self.candidate is not None or not self._recent:
            return False
        p = np.concatenate([c[0] for c in self._recent])[-self.config.fit_window :]
        y = np.concatenate([c[1] for c in self._recent])[-self.config.fit_window :]
        if y.sum() < self.config.min_clicks:
            return False
        self.candidate = new_calibrator(self.config.kind).fit(p, y)
        self._fwd_p, self._fwd_y, self._n_fwd = [], [], 0
        return True

    def update(self, p_raw: np.ndarray, y: np.ndarray) -> list[GuardEvent]:
        """Feed (N,) raw scores and FINAL 0/1 labels, oldest first; returns the decisions
        (a changed ``serving`` calibrator comes with an ``accepted`` or ``rollback``)."""
        p_raw = np.asarray(p_raw, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        self._remember(p_raw, y)
        self._fwd_p.append(p_raw)
        self._fwd_y.append(y)
        self._n_fwd += p_raw.size
        if self._n_fwd < self.config.holdout:
            return []
        p = np.concatenate(self._fwd_p)
        t = np.concatenate(self._fwd_y)
        self._fwd_p, self._fwd_y, self._n_fwd = [], [], 0
        if t.sum() < self.config.min_clicks:
            return []
        z = self.config.z
        if self.candidate is not None:
            cand, self.candidate = self.candidate, None
            gain, se = _paired(self.serving.transform(p), cand.transform(p), t)
            if gain > z * se:
                self.serving = cand
                self.n_accepted += 1
                return [GuardEvent("accepted", gain, se, t.size, cand)]
            self.n_rejected += 1
            return [GuardEvent("rejected", gain, se, t.size, self.serving)]
        if self.serving is not self.identity:
            # the served calibrator against the raw ranker: a loss is a rollback
            gain, se = _paired(self.serving.transform(p), p, t)
            if gain > z * se:
                self.serving = self.identity
                self.n_rollbacks += 1
                return [GuardEvent("rollback", gain, se, t.size, self.identity)]
        return []
