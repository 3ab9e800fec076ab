"""Calibration of predicted click probabilities: Platt, isotonic and histogram binning.

- :class:`PlattCalibrator` (``"platt"``): ``sigmoid(a * logit(clip(p)) + b)``.
- :class:`~learners.calibration_nonparametric.IsotonicCalibrator` (``"isotonic"``):
  pool-adjacent-violators, interpolated.
- :class:`~learners.calibration_nonparametric.HistogramBinningCalibrator` (``"histogram"``):
  per-bin click rate, Beta prior.

All satisfy :class:`Calibrator`; probabilities in [0, 1] in and out. ``to_dict`` carries a
``"kind"`` key that :func:`calibrator_from_dict` dispatches on. A new calibrator is accepted
only when it lowers held-out log loss (:func:`fit_if_better`).

:mod:`learners.recalibration` holds the streaming policy built on them
(:class:`~learners.recalibration.TrackingRecalibrator`); the non-parametric calibrators live
in :mod:`learners.calibration_nonparametric`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload, runtime_checkable

import numpy as np

from learners.calibration_nonparametric import (
    HistogramBinningCalibrator,
    IsotonicCalibrator,
    as_weights,
    check_kind,
)
from learners.util import logit, sigmoid
from monitoring.calibration import log_loss

__all__ = [
    "CALIBRATOR_KINDS",
    "Calibrator",
    "LogitShiftCalibrator",
    "OffsetCalibrator",
    "PlattCalibrator",
    "VersionedCalibrator",
    "calibrator_from_dict",
    "fit_if_better",
    "new_calibrator",
    "solve_offset",
]

_L2 = 1e-4  # pull toward the identity (a=1, b=0); keeps the fit finite when labels are constant


class PlattCalibrator:
    """Logit-affine calibrator ``p -> sigmoid(a * logit(p) + b)``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = rng.uniform(0.01, 0.5, 20_000)
        >>> y = rng.random(p.shape) < PlattCalibrator(1.5, 0.3).transform(p)
        >>> cal = PlattCalibrator().fit(p, y)
        >>> round(cal.a, 1), round(cal.b, 1)
        (1.5, 0.3)
    """

    def __init__(self, a: float = 1.0, b: float = 0.0) -> None:
        self.a = float(a)
        self.b = float(b)

    @property
    def is_identity(self) -> bool:
        """True when ``transform`` returns its input (up to clipping)."""
        return self.a == 1.0 and self.b == 0.0

    def transform(self, p: Any) -> np.ndarray:
        """Calibrated probabilities, float64 ``(N,)`` in [0, 1]."""
        return sigmoid(self.a * logit(p) + self.b)

    def fit(self, p: Any, y: Any, w: Any = None, max_iter: int = 50) -> PlattCalibrator:
        """Return a NEW calibrator fitted by damped Newton on weighted mean log loss.

        ``p``: (N,) probabilities, ``y``: (N,) 0/1 labels, ``w``: optional (N,) weights.
        A tiny L2 penalty toward (a=1, b=0) keeps the fit finite on degenerate data.
        """
        z = logit(p)
        t = np.asarray(y, dtype=np.float64).reshape(-1)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"len(y)={t.shape[0]} does not match len(p)={z.shape[0]}")
        ww = as_weights(w, z.shape[0])
        ok = np.isfinite(z) & np.isfinite(t) & np.isfinite(ww) & (ww > 0)
        z, t, ww = z[ok], t[ok], ww[ok]
        total = float(ww.sum())
        if total <= 0:
            return PlattCalibrator(self.a, self.b)
        ww = ww / total
        theta = np.array([1.0, 0.0])
        prior = np.array([1.0, 0.0])

        def objective(th: np.ndarray) -> float:
            s = th[0] * z + th[1]
            # log(1 + e^s) - t*s, computed stably
            nll = np.logaddexp(0.0, s) - t * s
            return float((ww * nll).sum() + 0.5 * _L2 * ((th - prior) ** 2).sum())

        f = objective(theta)
        for _ in range(max_iter):
            q = sigmoid(theta[0] * z + theta[1])
            r = ww * (q - t)
            grad = np.array([(r * z).sum(), r.sum()]) + _L2 * (theta - prior)
            h = ww * q * (1 - q)
            hess = np.array(
                [[(h * z * z).sum() + _L2, (h * z).sum()], [(h * z).sum(), h.sum() + _L2]]
            )
            try:
                step = np.linalg.solve(hess, grad)
            except np.linalg.LinAlgError:
                step = grad
            lr = 1.0
            while lr > 1e-8:
                cand = theta - lr * step
                fc = objective(cand)
                if fc <= f:
                    break
                lr *= 0.5
            else:
                break
            improvement = f - fc
            theta, f = cand, fc
            if improvement < 1e-12 and float(np.abs(step).max()) * lr < 1e-8:
                break
        return PlattCalibrator(float(theta[0]), float(theta[1]))

    def with_offset(self, delta: float) -> PlattCalibrator:
        """A NEW calibrator with ``delta`` added to the intercept (logit units)."""
        return PlattCalibrator(self.a, self.b + float(delta))

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "platt", "a": a, "b": b}``."""
        return {"kind": "platt", "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlattCalibrator:
        """Inverse of :meth:`to_dict`; also accepts the older ``{"a", "b"}`` without kind."""
        check_kind(d, "platt")
        return cls(float(d["a"]), float(d["b"]))

    def __repr__(self) -> str:
        return f"PlattCalibrator(a={self.a:.6g}, b={self.b:.6g})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlattCalibrator):
            return NotImplemented
        return self.a == other.a and self.b == other.b

    def __hash__(self) -> int:
        return hash((self.a, self.b))


@runtime_checkable
class Calibrator(Protocol):
    """A post-hoc map of predicted click probabilities; fitted copies, never in place."""

    @property
    def is_identity(self) -> bool:
        """True when ``transform`` returns its input (up to clipping)."""
        ...

    def fit(self, p: Any, y: Any, w: Any = None) -> Calibrator:
        """A NEW calibrator fitted to ``p`` (N,) in [0, 1], ``y`` (N,) 0/1, weights ``w``."""
        ...

    def transform(self, p: Any) -> np.ndarray:
        """Calibrated probabilities, float64 ``(N,)`` in [0, 1]."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters with a ``"kind"`` key (see :func:`calibrator_from_dict`)."""
        ...


@runtime_checkable
class OffsetCalibrator(Calibrator, Protocol):
    """A logit-affine calibrator whose output logit can be moved by a constant."""

    def with_offset(self, delta: float) -> Calibrator:
        """A NEW calibrator whose output logit is this one's plus ``delta``."""
        ...


class LogitShiftCalibrator:
    """Shift every logit by ``b``: ``p -> sigmoid(logit(p) + b)``, slope fixed at 1.

    One parameter, so it is stable on the small, recent windows a drift alarm leaves
    (a few hundred clicks), where Platt's slope is poorly determined. It corrects a change
    of the base rate, the commonest calibration drift.

    >>> rng = np.random.default_rng(0)
    >>> p = rng.uniform(0.02, 0.08, 20_000)
    >>> y = (rng.random(20_000) < np.minimum(1.6 * p, 1)).astype(float)
    >>> cal = LogitShiftCalibrator().fit(p, y)
    >>> 0.06 < float(cal.transform(np.array([0.04]))[0]) < 0.07  # 0.04 x 1.6 = 0.064
    True
    """

    kind = "shift"

    def __init__(self, b: float = 0.0) -> None:
        self.b = float(b)

    @property
    def is_identity(self) -> bool:
        return self.b == 0.0

    def transform(self, p: Any) -> np.ndarray:
        """``p``: (N,) probabilities -> (N,) shifted probabilities."""
        return sigmoid(logit(p) + self.b)

    def fit(self, p: Any, y: Any, w: Any = None, max_iter: int = 50) -> LogitShiftCalibrator:
        """Newton's method on the weighted log loss in ``b`` (a tiny L2 toward 0)."""
        z = logit(p)
        yy = np.asarray(y, dtype=np.float64)
        ww = as_weights(w, len(yy))
        b = 0.0
        for _ in range(max_iter):
            q = sigmoid(z + b)
            grad = float((ww * (q - yy)).sum()) + _L2 * b
            hess = float((ww * q * (1 - q)).sum()) + _L2
            step = grad / hess
            b -= step
            if abs(step) < 1e-10:
                break
        return LogitShiftCalibrator(b if np.isfinite(b) else 0.0)

    def with_offset(self, delta: float) -> LogitShiftCalibrator:
        """A NEW calibrator shifting by ``b + delta`` (logit units)."""
        return LogitShiftCalibrator(self.b + float(delta))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogitShiftCalibrator:
        return cls(float(d["b"]))

    def __repr__(self) -> str:
        return f"LogitShiftCalibrator(b={self.b:.6g})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogitShiftCalibrator) and self.b == other.b

    def __hash__(self) -> int:
        return hash(("shift", self.b))


_KINDS: dict[
    str,
    type[PlattCalibrator | IsotonicCalibrator | HistogramBinningCalibrator | LogitShiftCalibrator],
] = {
    "shift": LogitShiftCalibrator,
    "platt": PlattCalibrator,
    "isotonic": IsotonicCalibrator,
    "histogram": HistogramBinningCalibrator,
}
CALIBRATOR_KINDS = tuple(_KINDS)


def new_calibrator(kind: str) -> Calibrator:
    """An unfitted calibrator of ``kind`` (one of :data:`CALIBRATOR_KINDS`).

    >>> type(new_calibrator("shift")).__name__
    'LogitShiftCalibrator'
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown calibrator kind {kind!r}; expected one of {CALIBRATOR_KINDS}")
    return _KINDS[kind]()


@dataclass(frozen=True)
class VersionedCalibrator:
    """A served calibrator and its version: one immutable pair, replaced whole, so a
    reader on another thread never sees one's calibrator with the other's version.

    >>> cur = VersionedCalibrator(PlattCalibrator(), 0)
    >>> new = cur.newer(2, {"kind": "platt", "a": 1.5, "b": 0.0})
    >>> new.version, new.calibrator.a, new.newer(2, {"kind": "platt", "a": 9.0, "b": 0.0})
    (2, 1.5, None)
    """

    calibrator: Calibrator
    version: int

    def newer(self, version: int, params: dict[str, Any]) -> VersionedCalibrator | None:
        """The pair of a (validated) calibrator ``params`` at ``version`` when that is
        newer than this one's, else None."""
        if version <= self.version:
            return None
        return VersionedCalibrator(calibrator_from_dict(params), version)


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    """Rebuild any calibrator from its ``to_dict``; a dict without ``"kind"`` is Platt.

    >>> calibrator_from_dict({"a": 1.5, "b": 0.3})
    PlattCalibrator(a=1.5, b=0.3)
    >>> calibrator_from_dict(IsotonicCalibrator().to_dict())
    IsotonicCalibrator(knots=0, eps=0.0001)
    """
    kind = d.get("kind", "platt")
    if kind not in _KINDS:
        raise ValueError(f"unknown calibrator kind {kind!r}; expected one of {CALIBRATOR_KINDS}")
    return _KINDS[kind].from_dict(d)


@overload
def fit_if_better(
    p_fit: Any,
    y_fit: Any,
    p_holdout: Any,
    y_holdout: Any,
    current: PlattCalibrator,
    kind: Literal["platt"] = ...,
) -> tuple[PlattCalibrator, bool, float, float]: ...


@overload
def fit_if_better(
    p_fit: Any,
    y_fit: Any,
    p_holdout: Any,
    y_holdout: Any,
    current: Calibrator,
    kind: str = ...,
) -> tuple[Calibrator, bool, float, float]: ...


def fit_if_better(
    p_fit: Any,
    y_fit: Any,
    p_holdout: Any,
    y_holdout: Any,
    current: Calibrator,
    kind: str = "platt",
) -> tuple[Calibrator, bool, float, float]:
    """Fit on the fit slice; keep the new calibrator only if it lowers held-out log loss.

    ``kind`` (``"platt"``, ``"isotonic"`` or ``"histogram"``) is the candidate's type: when
    ``current`` is of that kind the candidate is ``current.fit(...)`` (keeping its settings),
    otherwise a default-constructed calibrator of that kind is fitted. The candidate maps the
    raw predictions (it replaces ``current``, it is not stacked on it).

    Returns ``(chosen, accepted, holdout_logloss_current, holdout_logloss_new)``.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown calibrator kind {kind!r}; expected one of {CALIBRATOR_KINDS}")
    cls = _KINDS[kind]
    base: Calibrator = current if isinstance(current, cls) else cls()
    candidate = base.fit(p_fit, y_fit)
    loss_current = log_loss(current.transform(p_holdout), y_holdout)
    loss_new = log_loss(candidate.transform(p_holdout), y_holdout)
    accepted = math.isfinite(loss_new) and (
        not math.isfinite(loss_current) or loss_new < loss_current
    )
    return (candidate if accepted else current), accepted, loss_current, loss_new


def solve_offset(logits: Any, target: float, start: float = 0.0) -> float:
    """The ``δ`` with ``mean(sigmoid(logits + δ)) == target`` (logit units).

    ``logits``: (N,) finite; ``target`` is clipped to ``[1e-6, 1 − 1e-6]``. The mean is
    increasing in ``δ``, so Newton's method from ``start`` with bisection safeguards
    converges; 0.0 for empty input.

    >>> round(solve_offset(np.zeros(4), 0.5), 12), round(solve_offset([0.0], 0.75), 6)
    (0.0, 1.098612)
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if z.size == 0:
        return 0.0
    t = min(max(float(target), 1e-6), 1.0 - 1e-6)
    lo, hi = -40.0 - float(z.max()), 40.0 - float(z.min())  # mean(sigmoid) ~0 / ~1 there
    d = min(max(float(start), lo), hi)
    for _ in range(100):
        q = sigmoid(z + d)
        g = float(q.mean()) - t
        if g == 0.0:
            return d
        if g > 0:
            hi = d
        else:
            lo = d
        h = float((q * (1.0 - q)).mean())
        nxt = d - g / h if h > 1e-300 else math.nan
        if not lo < nxt < hi:  # also catches nan
            nxt = 0.5 * (lo + hi)
        if abs(nxt - d) < 1e-12 or hi - lo < 1e-12:
            return nxt
        d = nxt
    return d
