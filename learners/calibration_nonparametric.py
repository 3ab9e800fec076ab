"""The non-parametric calibrators of :mod:`learners.calibration`: isotonic regression
(:class:`IsotonicCalibrator`, ``"isotonic"``, by :func:`pool_adjacent_violators`) and
histogram binning with a Beta prior (:class:`HistogramBinningCalibrator`, ``"histogram"``),
with the input checks every calibrator shares (:func:`as_weights`, :func:`check_kind`).
Probabilities in [0, 1] in and out; both satisfy :class:`~learners.calibration.Calibrator`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from learners.util import PROB_EPS

__all__ = [
    "HistogramBinningCalibrator",
    "IsotonicCalibrator",
    "as_weights",
    "check_kind",
    "pool_adjacent_violators",
]

_EPS = PROB_EPS


def as_weights(w: Any, n: int) -> np.ndarray:
    """Weights float64 ``(n,)``: ones when ``w`` is None, else ``w`` flattened (checked to
    have length ``n``)."""
    if w is None:
        return np.ones(n, dtype=np.float64)
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"len(w)={arr.shape[0]} does not match len(p)={n}")
    return arr


def check_kind(d: dict[str, Any], kind: str) -> None:
    """Raise ValueError unless ``d["kind"]`` (default ``"platt"``) is ``kind``."""
    got = d.get("kind", "platt")
    if got != kind:
        raise ValueError(f"expected a {kind!r} calibrator dict, got kind={got!r}")


def _prepare(p: Any, y: Any, w: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened float64 ``(p, y, w)`` restricted to finite rows with positive weight."""
    pa = np.asarray(p, dtype=np.float64).reshape(-1)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if ya.shape[0] != pa.shape[0]:
        raise ValueError(f"len(y)={ya.shape[0]} does not match len(p)={pa.shape[0]}")
    wa = as_weights(w, pa.shape[0])
    ok = np.isfinite(pa) & np.isfinite(ya) & np.isfinite(wa) & (wa > 0)
    return np.clip(pa[ok], 0.0, 1.0), ya[ok], wa[ok]


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
    wa = as_weights(w, ya.shape[0])
    starts: list[int] = []
    sums: list[float] = []
    wts: list[float] = []
    for i, (yi, wi) in enumerate(zip(ya.tolist(), wa.tolist(), strict=True)):
        starts.append(i)
        sums.append(yi * wi)
        wts.append(wi)
        # Merge while the last block's mean falls below its predecessor's. Compared as the
        # very quotients returned below: a cross-multiplied test can pass two blocks whose
        # rounded means then decrease by an ulp (0.46875 after 0.46875 * w / w).
        while len(wts) > 1 and sums[-1] / wts[-1] < sums[-2] / wts[-2]:
            s_last, w_last = sums.pop(), wts.pop()
            starts.pop()
            sums[-1] += s_last
            wts[-1] += w_last
    w_out = np.asarray(wts, dtype=np.float64)
    return np.asarray(starts, dtype=np.intp), np.asarray(sums) / w_out, w_out


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
        check_kind(d, "isotonic")
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
        check_kind(d, "histogram")
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
