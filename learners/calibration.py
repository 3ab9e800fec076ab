"""Platt (logit-affine) calibration of predicted click probabilities.

``transform(p) = sigmoid(a * logit(clip(p)) + b)``; probabilities in [0, 1] in and out.
A new calibrator is accepted only when it lowers held-out log loss (:func:`fit_if_better`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["PlattCalibrator", "fit_if_better", "log_loss"]

_EPS = 1e-7
_L2 = 1e-4  # pull toward the identity (a=1, b=0); keeps the fit finite when labels are constant


def _logit(p: Any) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _weights(w: Any, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n, dtype=np.float64)
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"len(w)={arr.shape[0]} does not match len(p)={n}")
    return arr


def log_loss(p: Any, y: Any, w: Any = None) -> float:
    """Weighted mean log loss (nats) of probabilities ``p`` (N,) against 0/1 labels ``y``."""
    q = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), _EPS, 1.0 - _EPS)
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    ww = _weights(w, q.shape[0])
    total = float(ww.sum())
    if total <= 0:
        return float("nan")
    return float(-(ww * (t * np.log(q) + (1 - t) * np.log1p(-q))).sum() / total)


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
        return _sigmoid(self.a * _logit(p) + self.b)

    def fit(self, p: Any, y: Any, w: Any = None, max_iter: int = 50) -> PlattCalibrator:
        """Return a NEW calibrator fitted by damped Newton on weighted mean log loss.

        ``p``: (N,) probabilities, ``y``: (N,) 0/1 labels, ``w``: optional (N,) weights.
        A tiny L2 penalty toward (a=1, b=0) keeps the fit finite on degenerate data.
        """
        z = _logit(p)
        t = np.asarray(y, dtype=np.float64).reshape(-1)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"len(y)={t.shape[0]} does not match len(p)={z.shape[0]}")
        ww = _weights(w, z.shape[0])
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
            q = _sigmoid(theta[0] * z + theta[1])
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

    def to_dict(self) -> dict[str, float]:
        """``{"a": a, "b": b}``."""
        return {"a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlattCalibrator:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["a"]), float(d["b"]))

    def __repr__(self) -> str:
        return f"PlattCalibrator(a={self.a:.6g}, b={self.b:.6g})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlattCalibrator):
            return NotImplemented
        return self.a == other.a and self.b == other.b

    def __hash__(self) -> int:
        return hash((self.a, self.b))


def fit_if_better(
    p_fit: Any,
    y_fit: Any,
    p_holdout: Any,
    y_holdout: Any,
    current: PlattCalibrator,
) -> tuple[PlattCalibrator, bool, float, float]:
    """Fit on the fit slice; keep the new calibrator only if it lowers held-out log loss.

    Returns ``(chosen, accepted, holdout_logloss_current, holdout_logloss_new)``.
    """
    candidate = current.fit(p_fit, y_fit)
    loss_current = log_loss(current.transform(p_holdout), y_holdout)
    loss_new = log_loss(candidate.transform(p_holdout), y_holdout)
    accepted = math.isfinite(loss_new) and (
        not math.isfinite(loss_current) or loss_new < loss_current
    )
    return (candidate if accepted else current), accepted, loss_current, loss_new
