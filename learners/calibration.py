"""Calibration of predicted click probabilities: Platt, isotonic and histogram binning.

- :class:`PlattCalibrator` (``"platt"``): ``sigmoid(a * logit(clip(p)) + b)``.
- :class:`IsotonicCalibrator` (``"isotonic"``): pool-adjacent-violators, interpolated.
- :class:`HistogramBinningCalibrator` (``"histogram"``): per-bin click rate, Beta prior.

All satisfy :class:`Calibrator`; probabilities in [0, 1] in and out. ``to_dict`` carries a
``"kind"`` key that :func:`calibrator_from_dict` dispatches on. A new calibrator is accepted
only when it lowers held-out log loss (:func:`fit_if_better`).

:mod:`learners.recalibration` holds the streaming policy built on them
(:class:`~learners.recalibration.TrackingRecalibrator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload, runtime_checkable

import numpy as np

from learners.util import PROB_EPS, logit, sigmoid
from monitoring.calibration import log_loss

__all__ = [
    "CALIBRATOR_KINDS",
    "Calibrator",
    "HistogramBinningCalibrator",
    "IsotonicCalibrator",
    "LogitShiftCalibrator",
    "OffsetCalibrator",
    "PlattCalibrator",
    "VersionedCalibrator",
    "calibrator_from_dict",
    "fit_if_better",
    "new_calibrator",
    "solve_offset",
]

_EPS = PROB_EPS
_L2 = 1e-4  # pull toward the identity (a=1, b=0); keeps the fit finite when labels are constant


def _weights(w: Any, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n, dtype=np.float64)
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"len(w)={arr.shape[0]} does not match len(p)={n}")
    return arr


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
        _check_kind(d, "platt")
        return cls(float(d["a"]), float(d["b"]))

    def __repr__(self) -> str:
        return f"PlattCalibrator(a={self.a:.6g}, b={self.b:.6g})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlattCalibrator):
            return NotImplemented
        return self.a == other.a and self.b == other.b

    def __hash__(self) -> int:
        return hash((self.a, self.b))


def _prepare(p: Any, y: Any, w: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened float64 ``(p, y, w)`` restricted to finite rows with positive weight."""
    pa = np.asarray(p, dtype=np.float64).reshape(-1)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if ya.shape[0] != pa.shape[0]:
        raise ValueError(f"len(y)={ya.shape[0]} does not match len(p)={pa.shape[0]}")
    wa = _weights(w, pa.shape[0])
    ok = np.isfinite(pa) & np.isfinite(ya) & np.isfinite(wa) & (wa > 0)
    return np.clip(pa[ok], 0.0, 1.0), ya[ok], wa[ok]


def _check_kind(d: dict[str, Any], kind: str) -> None:
    got = d.get("kind", "platt")
    if got != kind:
        raise ValueError(f"expected a {kind!r} calibrator dict, got kind={got!r}")


def pool_adjacent_violators(y: Any, w: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted isotonic (non-decreasing) regression of ``y`` (N,) in the given order.

    Returns ``(starts, values, weights)`` of the blocks: block ``j`` covers positions
    ``starts[j] .. starts[j+1] − 1`` and fits them all with ``values[j]`` (the weighted
    mean of its ``y``); ``values`` is non-decreasing. O(N) amortised.

    >>> s, v, _ = pool_adjacent_violators([1.0, 3.0, 2.0, 4.0])
    >>> s.tolist(), v.tolist()
    ([0, 1, 3], [1.0, 2.5, 4.0])
    """
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    wa = _weights(w, ya.shape[0])
    starts: list[int] = []
    sums: list[float] = []
    wts: list[float] = []
    for i, (yi, wi) in enumerate(zip(ya.tolist(), wa.tolist(), strict=True)):
        starts.append(i)
        sums.append(yi * wi)
        wts.append(wi)
        # Merge while the last block's mean falls below its predecessor's (cross-multiplied).
        while len(wts) > 1 and sums[-1] * wts[-2] < sums[-2] * wts[-1]:
            s_last, w_last = sums.pop(), wts.pop()
            starts.pop()
            sums[-1] += s_last
            wts[-1] += w_last
    w_out = np.asarray(wts, dtype=np.float64)
    return np.asarray(starts, dtype=np.intp), np.asarray(sums) / w_out, w_out


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


class IsotonicCalibrator:
    """Monotone calibration by isotonic regression (pool-adjacent-violators).

    ``fit`` sorts by ``p`` (equal predictions are pooled first), runs weighted PAV on the
    labels and keeps one knot per block: ``x`` = the block's weighted mean prediction,
    ``y`` = its click rate. ``transform`` interpolates linearly between knots (constant
    beyond the end knots) and clips to ``[eps, 1 − eps]`` so that a block without clicks
    does not predict 0 (a click there would cost ``-log(eps)`` nats, not infinity).
    Unfitted (no knots) it is the identity up to that clipping. Non-decreasing in ``p``.

    Args:
        x: knot positions (K,), strictly increasing in [0, 1]; ``None`` for unfitted.
        y: knot values (K,), non-decreasing in [0, 1].
        eps: output clip in (0, 0.5).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = rng.uniform(0.01, 0.3, 20_000)
        >>> y = rng.random(p.shape) < np.minimum(1.0, 1.6 * p)  # under-predicted by 1.6x
        >>> cal = IsotonicCalibrator().fit(p, y)
        >>> bool(np.all(np.diff(cal.transform(np.linspace(0, 1, 101))) >= 0))
        True
        >>> round(float(cal.transform([0.1])[0]), 2)
        0.16
    """

    def __init__(self, x: Any = None, y: Any = None, eps: float = 1e-4) -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.eps = float(eps)
        xs = np.asarray([] if x is None else x, dtype=np.float64).reshape(-1)
        ys = np.asarray([] if y is None else y, dtype=np.float64).reshape(-1)
        if xs.shape != ys.shape:
            raise ValueError(f"x and y must have one length, got {xs.shape} and {ys.shape}")
        if xs.size > 1 and not np.all(np.diff(xs) > 0):
            raise ValueError("knot positions x must be strictly increasing")
        self.x = xs
        self.y = ys

    @property
    def is_identity(self) -> bool:
        """True when unfitted (no knots)."""
        return self.x.size == 0

    def fit(self, p: Any, y: Any, w: Any = None) -> IsotonicCalibrator:
        """Return a NEW calibrator fitted by weighted isotonic regression of ``y`` on ``p``.

        ``p``: (N,) probabilities, ``y``: (N,) 0/1 labels, ``w``: optional (N,) weights.
        Rows with non-finite values or non-positive weight are dropped; with none left the
        result equals ``self``.
        """
        pa, ya, wa = _prepare(p, y, w)
        if pa.size == 0:
            return IsotonicCalibrator(self.x, self.y, self.eps)
        # Pool equal predictions first: PAV must give tied inputs one fitted value.
        uniq, inv = np.unique(pa, return_inverse=True)
        w_u = np.bincount(inv, weights=wa)
        y_u = np.bincount(inv, weights=wa * ya) / w_u
        starts, values, weights = pool_adjacent_violators(y_u, w_u)
        centres = np.add.reduceat(uniq * w_u, starts) / weights
        return IsotonicCalibrator(centres, values, self.eps)

    def transform(self, p: Any) -> np.ndarray:
        """Calibrated probabilities, float64 ``(N,)`` in ``[eps, 1 − eps]``."""
        pa = np.asarray(p, dtype=np.float64).reshape(-1)
        out = pa if self.x.size == 0 else np.interp(pa, self.x, self.y)
        return np.clip(out, self.eps, 1.0 - self.eps)

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "isotonic", "x": [...], "y": [...], "eps": eps}`` (JSON-ready)."""
        return {"kind": "isotonic", "x": self.x.tolist(), "y": self.y.tolist(), "eps": self.eps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IsotonicCalibrator:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, "isotonic")
        return cls(d["x"], d["y"], float(d.get("eps", 1e-4)))

    def __repr__(self) -> str:
        return f"IsotonicCalibrator(knots={self.x.size}, eps={self.eps:g})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IsotonicCalibrator):
            return NotImplemented
        return (
            self.eps == other.eps
            and np.array_equal(self.x, other.x)
            and np.array_equal(self.y, other.y)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: equal but not hashable


class HistogramBinningCalibrator:
    """Histogram binning: each bin of ``p`` maps to its smoothed click rate.

    ``fit`` cuts ``[0, 1]`` into ``n_bins`` bins (``strategy="mass"``: at quantiles of the
    fitted ``p``, suited to CTRs bunched near 0; ``"width"``: equal widths) and sets each
    bin's rate to the posterior mean under a Beta prior centred on the bin's mean
    prediction ``m_b`` with ``prior_strength`` pseudo-impressions:
    ``(Σw·y + s·m_b) / (Σw + s)``. Small bins thus stay near their predictions and an empty
    bin (``m_b`` = its midpoint) maps to about its own predictions. Outputs are clipped to
    ``[eps, 1 − eps]``. Unfitted it is the identity up to that clipping. Piecewise
    constant, so not strictly monotone.

    Args:
        n_bins: number of bins (>= 1).
        strategy: ``"mass"`` (equal counts) or ``"width"`` (equal widths).
        prior_strength: Beta prior weight in impressions (>= 0; 0 gives raw bin rates).
        edges: fitted bin edges (n_bins + 1,) from 0 to 1, or ``None`` for unfitted.
        rates: fitted per-bin rates (n_bins,), or ``None``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = rng.uniform(0.01, 0.3, 20_000)
        >>> y = rng.random(p.shape) < np.minimum(1.0, 1.6 * p)  # under-predicted by 1.6x
        >>> cal = HistogramBinningCalibrator(n_bins=10).fit(p, y)
        >>> len(cal.rates), round(float(cal.transform([0.15])[0]), 2)
        (10, 0.22)
    """

    def __init__(
        self,
        n_bins: int = 15,
        strategy: Literal["mass", "width"] = "mass",
        prior_strength: float = 100.0,
        edges: Any = None,
        rates: Any = None,
    ) -> None:
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if strategy not in ("mass", "width"):
            raise ValueError(f"strategy must be 'mass' or 'width', got {strategy!r}")
        if not prior_strength >= 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        if (edges is None) != (rates is None):
            raise ValueError("edges and rates must be given together")
        self.n_bins = int(n_bins)
        self.strategy: Literal["mass", "width"] = strategy
        self.prior_strength = float(prior_strength)
        self.edges: np.ndarray | None = None
        self.rates: np.ndarray | None = None
        if edges is not None:
            e = np.asarray(edges, dtype=np.float64).reshape(-1)
            r = np.asarray(rates, dtype=np.float64).reshape(-1)
            if e.size != self.n_bins + 1 or r.size != self.n_bins:
                raise ValueError(f"need {self.n_bins + 1} edges and {self.n_bins} rates")
            if np.any(np.diff(e) < 0):
                raise ValueError("edges must be non-decreasing")
            self.edges, self.rates = e, r

    eps = _EPS  # output clip; the Beta prior already keeps fitted rates off 0 and 1

    @property
    def is_identity(self) -> bool:
        """True when unfitted."""
        return self.rates is None

    def _bins(self, p: np.ndarray, edges: np.ndarray) -> np.ndarray:
        # Bin b holds [edges[b], edges[b+1]); p == 1 and anything above goes to the last bin.
        return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, self.n_bins - 1)

    def fit(self, p: Any, y: Any, w: Any = None) -> HistogramBinningCalibrator:
        """Return a NEW calibrator with bins and smoothed rates fitted to the data.

        ``p``: (N,) probabilities, ``y``: (N,) 0/1 labels, ``w``: optional (N,) weights.
        Rows with non-finite values or non-positive weight are dropped; with none left the
        result equals ``self``.
        """
        pa, ya, wa = _prepare(p, y, w)
        if pa.size == 0:
            return HistogramBinningCalibrator(
                self.n_bins, self.strategy, self.prior_strength, self.edges, self.rates
            )
        if self.strategy == "mass":
            edges = np.quantile(pa, np.linspace(0.0, 1.0, self.n_bins + 1))
        else:
            edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        edges[0], edges[-1] = 0.0, 1.0
        which = self._bins(pa, edges)
        n = np.bincount(which, weights=wa, minlength=self.n_bins)
        clicks = np.bincount(which, weights=wa * ya, minlength=self.n_bins)
        sum_p = np.bincount(which, weights=wa * pa, minlength=self.n_bins)
        mid = 0.5 * (edges[:-1] + edges[1:])
        mean_p = np.divide(sum_p, n, out=mid.copy(), where=n > 0)
        s = self.prior_strength
        den = n + s
        rates = np.divide(clicks + s * mean_p, den, out=mean_p.copy(), where=den > 0)
        return HistogramBinningCalibrator(self.n_bins, self.strategy, s, edges, rates)

    def transform(self, p: Any) -> np.ndarray:
        """Calibrated probabilities, float64 ``(N,)`` in ``[eps, 1 − eps]``."""
        pa = np.asarray(p, dtype=np.float64).reshape(-1)
        if self.edges is None or self.rates is None:
            out = pa
        else:
            out = self.rates[self._bins(pa, self.edges)]
        return np.clip(out, self.eps, 1.0 - self.eps)

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "histogram", "n_bins", "strategy", "prior_strength", "edges",
        "rates"}`` (the last two ``None`` when unfitted); JSON-ready."""
        return {
            "kind": "histogram",
            "n_bins": self.n_bins,
            "strategy": self.strategy,
            "prior_strength": self.prior_strength,
            "edges": None if self.edges is None else self.edges.tolist(),
            "rates": None if self.rates is None else self.rates.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HistogramBinningCalibrator:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, "histogram")
        return cls(
            int(d["n_bins"]),
            d["strategy"],
            float(d["prior_strength"]),
            d.get("edges"),
            d.get("rates"),
        )

    def __repr__(self) -> str:
        state = "unfitted" if self.rates is None else "fitted"
        return (
            f"HistogramBinningCalibrator(n_bins={self.n_bins}, strategy={self.strategy!r}, "
            f"prior_strength={self.prior_strength:g}, {state})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HistogramBinningCalibrator):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: equal but not hashable


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
        ww = _weights(w, len(yy))
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
