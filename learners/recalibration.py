"""The streaming recalibration policy, built on the calibrators of :mod:`learners.calibration`.

:class:`TrackingRecalibrator`: after a drift alarm it refits continuously, validating every
refit on the newest slice, and between refits it keeps the served base rate on target while
the online model itself moves (so that a calibrator fitted on old raw scores does not
over-correct once the model has adapted). :class:`TrackingConfig` holds its settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from learners.calibration import (
    CALIBRATOR_KINDS,
    Calibrator,
    OffsetCalibrator,
    fit_if_better,
    new_calibrator,
    solve_offset,
)
from learners.util import logit
from monitoring.calibration import log_loss

__all__ = ["RefitResult", "TrackingConfig", "TrackingRecalibrator", "refit_on_alarm"]


@dataclass(frozen=True)
class TrackingConfig:
    """Settings of :class:`TrackingRecalibrator`.

    Attributes:
        kind: calibrator fitted at each refit: ``"shift"``, ``"platt"`` (both logit-affine,
            so they also get the level tracking), ``"isotonic"`` or ``"histogram"`` (refitted
            only).
        recal_window: examples a :meth:`TrackingRecalibrator.restart` keeps (the label
            window then grows from there).
        max_window: most examples the label window holds; the window slides beyond it.
        refit_every: examples between refits while armed.
        holdout_fraction: share of the label window held out to validate a refit, at most
            ``refit_every`` examples (the newest ones).
        trend: weight in ``[0, 1)`` of the newest raw-level change in its moving average;
            0 turns the one-step extrapolation off.
        max_trend: bound on the extrapolated level change per refit, logit units.
        identity_tolerance: the calibrator counts as settled at identity when it moves the
            newest mean prediction by less than this fraction.
        settle_refits: disarm (publish identity, stop refitting) after this many settled
            refits in a row; 0 never disarms.
        min_positives: a refit needs this many clicks in its fit slice; fewer skip it.
    """

    kind: str = "shift"
    recal_window: int = 2_500
    max_window: int = 50_000
    refit_every: int = 1_024
    holdout_fraction: float = 0.25
    trend: float = 0.5
    max_trend: float = 0.25
    identity_tolerance: float = 0.02
    settle_refits: int = 20
    min_positives: int = 20

    def __post_init__(self) -> None:
        if self.kind not in CALIBRATOR_KINDS:
            raise ValueError(f"kind must be one of {CALIBRATOR_KINDS}, got {self.kind!r}")
        if not 1 <= self.recal_window <= self.max_window:
            raise ValueError("need 1 <= recal_window <= max_window")
        if self.refit_every < 1:
            raise ValueError(f"refit_every must be >= 1, got {self.refit_every}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.trend < 1.0:
            raise ValueError(f"trend must be in [0, 1), got {self.trend}")
        if not self.max_trend >= 0.0:
            raise ValueError(f"max_trend must be >= 0, got {self.max_trend}")
        if not self.identity_tolerance >= 0.0:
            raise ValueError(f"identity_tolerance must be >= 0, got {self.identity_tolerance}")
        if self.settle_refits < 0 or self.min_positives < 0:
            raise ValueError("settle_refits and min_positives must be >= 0")


@dataclass(frozen=True)
class RefitResult:
    """What one :meth:`TrackingRecalibrator.refit` did.

    ``accepted``: the refit lowered held-out log loss (None: skipped, too few clicks);
    ``holdout_logloss_old`` / ``_new``: nats, current vs candidate on the held-out slice;
    ``published``: the calibrator to publish now (a refit or a level update), or None when
    the served one stays; ``target``: accepted base rate in [0, 1] (None before the first
    accepted refit); ``offset``: mean logit shift the current calibrator applies to the
    newest raw scores (0 when not tracking; it shrinks as the model catches up);
    ``n_fit`` / ``n_holdout``: examples used; ``disarmed``: it settled back to identity.
    """

    accepted: bool | None
    holdout_logloss_old: float
    holdout_logloss_new: float
    published: Calibrator | None
    target: float | None
    offset: float
    n_fit: int
    n_holdout: int
    disarmed: bool = False


class TrackingRecalibrator:
    """Recalibration that follows an online model instead of fixing it once.

    The problem: when the true CTR jumps, a calibrator fitted on the raw scores right after
    the alarm corrects the gap *at that moment*; the online model then learns the new CTR
    itself and the fixed calibrator over-corrects (and the model may overshoot and swing
    back). The policy separates what needs labels from what does not:

    1. **Base rate (labels, validated).** The label window restarts at an alarm with the
       newest ``recal_window`` examples (:meth:`restart`) and grows to ``max_window``. Every
       ``refit_every`` examples (:meth:`due`), a candidate is fitted on the window less its
       newest slice (``holdout_fraction`` of it, at most ``refit_every`` examples): the
       ``kind`` map and the window's click rate (the target base rate). It is **accepted only
       if its log loss on the held-out newest slice is lower** than the current one's (both
       levelled to that slice's raw scores as in 2., which uses no labels); else the
       current map and target are kept and the refit counts as rejected.
    2. **Level (raw scores, no labels).** After every refit the published calibrator is the
       accepted map plus the logit offset that brings the mean calibrated prediction of the
       newest ``refit_every`` raw scores to the target (:func:`solve_offset`), plus the
       smoothed change of that offset since the previous slice (``trend``, at most
       ``max_trend``): the model keeps moving while the calibrator is in flight. As the
       model catches up the offset shrinks by itself; after ``settle_refits`` refits in a
       row within ``identity_tolerance`` of identity the policy publishes the identity and
       disarms until the next :meth:`restart`. Only ``shift`` and ``platt`` (logit-affine,
       :class:`OffsetCalibrator`) are levelled; ``isotonic`` and ``histogram`` are refitted
       on the window only (they lag a moving model by half a window).

    The caller feeds every scored batch to :meth:`update` and asks :meth:`refit` when
    :meth:`due`; ``refit`` returns the calibrator to publish, if any.

    Args:
        config: the settings (:class:`TrackingConfig`).

    >>> rng = np.random.default_rng(0)
    >>> rec = TrackingRecalibrator(TrackingConfig(refit_every=2_000, recal_window=8_000))
    >>> p_raw = np.full(2_000, 0.04)
    >>> for _ in range(4):  # the true CTR is 1.6x the raw score
    ...     rec.update(p_raw=p_raw, labels=rng.random(2_000) < 0.064)
    >>> rec.restart()  # a drift alarm: track from the newest 8,000 examples
    >>> result = rec.refit()
    >>> result.accepted, 0.058 < float(result.published.transform([0.04])[0]) < 0.07
    (True, True)
    >>> for step in range(10):  # the model learns the new rate: raw scores rise to 6.4%
    ...     p_raw = np.full(2_000, 0.04 + 0.0024 * (step + 1))
    ...     rec.update(p_raw=p_raw, labels=rng.random(2_000) < 0.064)
    ...     if rec.due:
    ...         _ = rec.refit()
    >>> 0.058 < float(rec.calibrator.transform([0.064])[0]) < 0.07  # no overshoot
    True
    """

    def __init__(self, config: TrackingConfig | None = None) -> None:
        self.config = config if config is not None else TrackingConfig()
        cfg = self.config
        self._kind = cfg.kind
        self.calibrator: Calibrator = new_calibrator(cfg.kind)
        self.map: Calibrator = new_calibrator(cfg.kind)
        self.target: float | None = None
        self.offset = 0.0
        self.armed = False
        self._trend = 0.0
        self._settled = 0
        self._force = False
        size = cfg.max_window + cfg.refit_every  # the level uses two slices of raw scores
        self._p = np.zeros(size)
        self._y = np.zeros(size)
        self._head = 0
        self._count = 0
        self._in_window = 0  # examples since the label window (re)started
        self._since_refit = 0
        self.n_accepted = 0
        self.n_rejected = 0
        self.n_published = 0

    @property
    def levelled(self) -> bool:
        """True when the kind is logit-affine, so the level is tracked between refits."""
        return self.config.kind in ("shift", "platt")

    @property
    def due(self) -> bool:
        """True when armed and ``refit_every`` examples (or a restart) call for a refit."""
        return self.armed and (self._force or self._since_refit >= self.config.refit_every)

    def update(self, *, p_raw: Any, labels: Any) -> None:
        """Add a scored batch: ``p_raw`` (B,) raw model probabilities in [0, 1] (before any
        calibration), ``labels`` (B,) 0/1."""
        p = np.clip(np.asarray(p_raw, dtype=np.float64).reshape(-1), 0.0, 1.0)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if p.shape != y.shape:
            raise ValueError(f"p_raw and labels must have one length, got {p.shape}, {y.shape}")
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
            raise ValueError("p_raw and labels must be finite")
        size = self._p.size
        if p.size >= size:
            p, y = p[-size:], y[-size:]
        idx = (self._head + np.arange(p.size)) % size
        self._p[idx], self._y[idx] = p, y
        self._head = (self._head + p.size) % size
        self._count = min(self._count + p.size, size)
        self._in_window += p.size
        self._since_refit += p.size

    def _newest(self, n: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The newest ``n`` examples before the newest ``skip`` ones, oldest first."""
        n = max(0, min(n, self._count - skip))
        idx = (self._head - skip - n + np.arange(n)) % self._p.size
        return self._p[idx], self._y[idx]

    def restart(self) -> None:
        """A drift alarm: the label window restarts with the newest ``recal_window``
        examples; arm the policy and make a refit due now."""
        self._in_window = min(self._in_window, self.config.recal_window)
        self.armed = True
        self._force = True

    def arm(self) -> None:
        """Start refitting every ``refit_every`` examples without restarting the window."""
        self.armed = True

    def adopt(self, calibrator: Calibrator) -> None:
        """Take over a calibrator published earlier (e.g. before a restart) as the current
        one; the next refit is validated against it. Arms unless it is the identity; a
        calibrator of another kind is served but the refits keep this policy's kind."""
        self.calibrator = calibrator
        if not calibrator.is_identity:
            self.armed = True

    def _levelled(self, m: Calibrator, target: float, p: np.ndarray) -> tuple[Calibrator, float]:
        if not isinstance(m, OffsetCalibrator) or p.size == 0:
            return m, 0.0
        delta = solve_offset(logit(m.transform(p)), target)
        return m.with_offset(delta), delta

    def refit(self) -> RefitResult:
        """Validate a refit on the newest slice, then update the level (see the class)."""
        cfg = self.config
        self._force = False
        self._since_refit = 0
        n = min(self._in_window, cfg.max_window, self._count)
        h = max(1, min(cfg.refit_every, int(n * cfg.holdout_fraction)))
        p, y = self._newest(n)
        p_fit, y_fit, p_h, y_h = p[:-h], y[:-h], p[-h:], y[-h:]
        nan = math.nan
        if n <= h or float(y_fit.sum()) < max(cfg.min_positives, 1):
            return RefitResult(None, nan, nan, None, self.target, self.offset, 0, 0)
        cand_map = self.map.fit(p_fit, y_fit)
        cand_target = float(y_fit.mean())
        cand_h, _ = self._levelled(cand_map, cand_target, p_h)
        if self.target is None:
            cur_h = self.calibrator
        else:
            cur_h, _ = self._levelled(self.map, self.target, p_h)
        ll_old = log_loss(cur_h.transform(p_h), y_h)
        ll_new = log_loss(cand_h.transform(p_h), y_h)
        accepted = math.isfinite(ll_new) and (not math.isfinite(ll_old) or ll_new < ll_old)
        if accepted:
            self.map, self.target = cand_map, cand_target
            self.n_accepted += 1
        else:
            self.n_rejected += 1
        published = self._next_calibrator(accepted)
        disarmed = False
        p_new, _ = self._newest(cfg.refit_every)
        if cfg.settle_refits and self.target is not None and p_new.size:
            mean_raw = float(p_new.mean())
            moved = float(published.transform(p_new).mean()) / mean_raw - 1 if mean_raw else 0
            self._settled = self._settled + 1 if abs(moved) < cfg.identity_tolerance else 0
            if self._settled >= cfg.settle_refits:
                published, disarmed = new_calibrator(self._kind), True
                self._disarm()
        changed = _moves(published, self.calibrator, p_new)
        if changed:
            self.calibrator = published
            self.n_published += 1
        if p_new.size and self.target is not None:
            self.offset = float(np.mean(logit(self.calibrator.transform(p_new)) - logit(p_new)))
        else:
            self.offset = 0.0
        return RefitResult(
            accepted,
            ll_old,
            ll_new,
            published if changed else None,
            self.target,
            self.offset,
            int(n - h),
            int(h),
            disarmed,
        )

    def _next_calibrator(self, accepted: bool) -> Calibrator:
        """The accepted map, levelled to the newest raw scores plus the trend."""
        cfg = self.config
        if self.target is None:
            return self.calibrator
        if not self.levelled:
            return self.map if accepted else self.calibrator
        p_new, _ = self._newest(cfg.refit_every)
        p_prev, _ = self._newest(cfg.refit_every, skip=cfg.refit_every)
        levelled, delta = self._levelled(self.map, self.target, p_new)
        if p_prev.size and cfg.trend > 0:
            _, delta_prev = self._levelled(self.map, self.target, p_prev)
            step = cfg.trend * (delta - delta_prev) + (1.0 - cfg.trend) * self._trend
            self._trend = float(np.clip(step, -cfg.max_trend, cfg.max_trend))
        assert isinstance(levelled, OffsetCalibrator)
        return levelled.with_offset(self._trend)

    def _disarm(self) -> None:
        self.armed = False
        self.map = new_calibrator(self._kind)
        self.target = None
        self.offset = 0.0
        self._trend = 0.0
        self._settled = 0


def _moves(new: Calibrator, old: Calibrator, p: np.ndarray, tol: float = 1e-4) -> bool:
    """True when ``new`` changes the mean prediction on ``p`` by more than ``tol`` (relative)
    or the two differ in kind."""
    if type(new) is not type(old):
        return True
    if p.size == 0:
        return new != old
    a, b = float(new.transform(p).mean()), float(old.transform(p).mean())
    return abs(a - b) > tol * max(abs(b), 1e-12)


def refit_on_alarm(
    p_raw: Any,
    y: Any,
    current: Calibrator,
    *,
    kind: str,
    recal_window: int,
    holdout_fraction: float,
) -> RefitResult:
    """The ``"alarm"`` policy: one validated refit per drift alarm, then fixed until the
    next. A ``kind`` calibrator is fitted on the newest ``recal_window`` of ``p_raw`` /
    ``y`` (N,) but the newest ``holdout_fraction`` of them (at least one), and published
    only if it beats ``current`` on those (:func:`learners.calibration.fit_if_better`).
    The same :class:`RefitResult` as :meth:`TrackingRecalibrator.refit` (no level
    tracking: ``target`` None, ``offset`` 0).

    >>> rng = np.random.default_rng(0)
    >>> p = rng.uniform(0.02, 0.2, 4_000)
    >>> y = (rng.random(4_000) < 2 * p).astype(float)  # the model under-predicts 2x
    >>> r = refit_on_alarm(p, y, new_calibrator("shift"), kind="shift", recal_window=2_000,
    ...                    holdout_fraction=0.25)
    >>> r.accepted, r.n_fit, r.n_holdout, r.published is not None
    (True, 1500, 500, True)
    """
    p_raw = np.asarray(p_raw, dtype=np.float64)[-recal_window:]
    y = np.asarray(y, dtype=np.float64)[-recal_window:]
    n_hold = max(1, int(len(y) * holdout_fraction))
    chosen, accepted, ll_old, ll_new = fit_if_better(
        p_raw[:-n_hold], y[:-n_hold], p_raw[-n_hold:], y[-n_hold:], current, kind=kind
    )
    return RefitResult(
        accepted=accepted, holdout_logloss_old=ll_old, holdout_logloss_new=ll_new,
        published=chosen if accepted else None, target=None, offset=0.0,
        n_fit=len(y) - n_hold, n_holdout=n_hold,
    )  # fmt: skip
