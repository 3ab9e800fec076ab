"""Calibration statistics: pure ``compute``-style functions (the stateful trackers over a
stream are in :mod:`monitoring.windows`).

Conventions shared by every function here:

- ``p``: predicted click probabilities, float array of shape ``(N,)``, values in ``[0, 1]``.
- ``y``: labels, array of shape ``(N,)``, values 0/1 (soft labels in ``[0, 1]`` are accepted).
- ``w``: optional non-negative example weights of shape ``(N,)``; ``None`` means all ones.

A statistic that is undefined for the input (empty input, a missing class, a base rate of 0
or 1) is returned as ``math.nan`` rather than raising, so a monitor can export it as-is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "EMPTY_SNAPSHOT",
    "check_edges",
    "log_loss_terms",
    "validate_arrays",
    "DEFAULT_RELIABILITY_EDGES",
    "CalibrationSnapshot",
    "Reliability",
    "auc",
    "binned_sums",
    "calibration_ratio",
    "compute_reliability",
    "compute_snapshot",
    "drift_z",
    "expected_calibration_error",
    "log_loss",
    "normalized_entropy",
    "reliability_bins",
]

EPS = 1e-7
"""Probabilities are clipped to ``[EPS, 1 - EPS]`` before taking logs."""

DEFAULT_RELIABILITY_EDGES: tuple[float, ...] = (
    0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
)  # fmt: skip
"""Fixed reliability-bin edges in [0, 1], dense where click-through rates live (near 0)."""

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]


def validate_arrays(
    p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return ``(p, y, w)`` as float64 1-D arrays of one length, ``w`` filled with ones."""
    pa = np.asarray(p, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if pa.ndim != 1 or ya.ndim != 1:
        raise ValueError(f"p and y must be 1-D, got shapes {pa.shape} and {ya.shape}")
    if pa.shape != ya.shape:
        raise ValueError(f"p and y must have the same length, got {pa.shape} and {ya.shape}")
    if w is None:
        wa = np.ones_like(pa)
    else:
        wa = np.asarray(w, dtype=np.float64)
        if wa.shape != pa.shape:
            raise ValueError(f"w must have shape {pa.shape}, got {wa.shape}")
        if np.any(wa < 0):
            raise ValueError("weights must be non-negative")
    return pa, ya, wa


def _entropy(rate: float) -> float:
    """Binary entropy in nats of a Bernoulli(rate); nan unless ``0 < rate < 1``."""
    if not 0.0 < rate < 1.0:
        return math.nan
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def log_loss_terms(p: FloatArray, y: FloatArray) -> FloatArray:
    pc = np.clip(p, EPS, 1.0 - EPS)
    return -(y * np.log(pc) + (1.0 - y) * np.log1p(-pc))


def calibration_ratio(p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> float:
    """Predicted over actual clicks, ``Σw·p / Σw·y`` (1.0 is perfect; > 1 over-predicts).

    Returns ``math.nan`` when ``Σw·y == 0``.

    >>> calibration_ratio([0.5, 0.5], [1, 0])
    1.0
    """
    pa, ya, wa = validate_arrays(p, y, w)
    den = float(np.dot(wa, ya))
    if den == 0.0:
        return math.nan
    return float(np.dot(wa, pa)) / den


def log_loss(p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> float:
    """Weighted mean binary cross-entropy in nats, ``p`` clipped to ``[1e-7, 1 - 1e-7]``.

    Returns ``math.nan`` for empty input or zero total weight.
    """
    pa, ya, wa = validate_arrays(p, y, w)
    sw = float(wa.sum())
    if sw == 0.0:
        return math.nan
    return float(np.dot(wa, log_loss_terms(pa, ya))) / sw


def normalized_entropy(p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> float:
    """Log loss divided by the entropy of the empirical (weighted) base rate ``Σw·y / Σw``.

    Below 1.0 means the model beats always predicting the base rate. Returns ``math.nan``
    when the base rate is 0 or 1 (or the input is empty).
    """
    pa, ya, wa = validate_arrays(p, y, w)
    sw = float(wa.sum())
    if sw == 0.0:
        return math.nan
    h = _entropy(float(np.dot(wa, ya)) / sw)
    if math.isnan(h):
        return math.nan
    return log_loss(pa, ya, wa) / h


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(p: ArrayLike, y: ArrayLike) -> float:
    """ROC AUC by the Mann-Whitney U statistic, ties counted as half (average ranks).

    Labels are thresholded at 0.5. Returns ``math.nan`` when either class is missing.

    >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    pa, ya, _ = validate_arrays(p, y)
    pos = ya >= 0.5
    n_pos = int(pos.sum())
    n_neg = pa.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(pa)
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _bin_indices(p: FloatArray, n_bins: int, strategy: str) -> list[npt.NDArray[np.intp]]:
    """Index arrays of the non-empty bins of ``p`` (equal-mass or equal-width)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "mass":
        order = np.argsort(p, kind="mergesort")
        return [b for b in np.array_split(order, n_bins) if b.size]
    if strategy == "width":
        # Bin b holds [b/n, (b+1)/n); p == 1.0 goes into the last bin.
        which = np.minimum((p * n_bins).astype(np.intp), n_bins - 1)
        which = np.maximum(which, 0)
        return [idx for b in range(n_bins) if (idx := np.flatnonzero(which == b)).size]
    raise ValueError(f"strategy must be 'mass' or 'width', got {strategy!r}")


def expected_calibration_error(
    p: ArrayLike,
    y: ArrayLike,
    n_bins: int = 10,
    strategy: Literal["mass", "width"] = "mass",
) -> float:
    """ECE: ``Σ_b (n_b / N) · |mean p_b − mean y_b|`` over ``n_bins`` bins, in ``[0, 1]``.

    ``strategy="mass"`` (default) makes equal-count bins over the sorted predictions, which
    suits CTRs concentrated near 0; ``"width"`` uses equal-width bins on ``[0, 1]``. Empty
    bins are skipped. Returns ``math.nan`` for empty input.
    """
    pa, ya, _ = validate_arrays(p, y)
    if pa.size == 0:
        return math.nan
    total = 0.0
    for idx in _bin_indices(pa, n_bins, strategy):
        total += idx.size * abs(float(pa[idx].mean()) - float(ya[idx].mean()))
    return total / pa.size


def reliability_bins(
    p: ArrayLike,
    y: ArrayLike,
    n_bins: int = 10,
    strategy: Literal["mass", "width"] = "mass",
    edges: ArrayLike | None = None,
) -> list[tuple[float, float, int]]:
    """Reliability diagram data: ``(mean p, mean y, count)`` per bin, ascending p.

    Bins are equal-mass (``strategy="mass"``, the default: equally many examples each),
    equal-width on ``[0, 1]`` (``"width"``) or, when ``edges`` is given, the fixed bins
    ``[edges[k], edges[k+1])`` (``n_bins`` and ``strategy`` are then ignored; see
    :func:`binned_sums`). Empty bins are omitted, so the list may be shorter than the
    number of bins.

    >>> reliability_bins([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_bins=2)
    [(0.15000000000000002, 0.0, 2), (0.8500000000000001, 1.0, 2)]
    >>> reliability_bins([0.01, 0.02, 0.03], [0, 0, 1], edges=[0.0, 0.025, 1.0])
    [(0.015, 0.0, 2), (0.03, 1.0, 1)]
    """
    pa, ya, _ = validate_arrays(p, y)
    if edges is not None:
        rel = compute_reliability(*binned_sums(pa, ya, edges=edges), edges=edges)
        keep = rel.count > 0
        return [
            (float(mp), float(my), int(n))
            for mp, my, n in zip(rel.mean_p[keep], rel.mean_y[keep], rel.count[keep], strict=True)
        ]
    return [
        (float(pa[idx].mean()), float(ya[idx].mean()), int(idx.size))
        for idx in _bin_indices(pa, n_bins, strategy)
    ]


def check_edges(edges: ArrayLike) -> FloatArray:
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    if e.size < 2 or not np.all(np.diff(e) > 0) or e[0] < 0.0 or e[-1] > 1.0:
        raise ValueError(f"edges must be >= 2 strictly increasing values in [0, 1], got {e}")
    return e


def binned_sums(
    p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None, *, edges: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per fixed bin ``[edges[k], edges[k+1])``: ``(Σw, Σw·p, Σw·y)``, each ``(K,)`` float64.

    ``edges``: ``K + 1`` strictly increasing values in ``[0, 1]``; predictions below
    ``edges[0]`` go to the first bin and those at or above ``edges[-1]`` to the last, so every
    example is counted. Sums add up over batches, which is what makes fixed bins suit
    running (time-bucketed) windows where equal-mass bins would need the examples.

    >>> [s.tolist() for s in binned_sums([0.01, 0.02, 0.5], [0, 1, 1], edges=[0, 0.1, 1])]
    [[2.0, 1.0], [0.03, 0.5], [1.0, 1.0]]
    """
    pa, ya, wa = validate_arrays(p, y, w)
    e = check_edges(edges)
    k = e.size - 1
    which = np.clip(np.searchsorted(e, pa, side="right") - 1, 0, k - 1)
    sums = [
        np.bincount(which, weights=v, minlength=k).astype(np.float64)
        for v in (wa, wa * pa, wa * ya)
    ]
    return sums[0], sums[1], sums[2]


@dataclass(frozen=True, eq=False)  # array fields: compare them with numpy, not ==
class Reliability:
    """Reliability-diagram bins, ascending in predicted probability; ``K`` bins.

    ``mean_p``, ``mean_y``: (K,) weighted mean prediction and click rate per bin, in
    ``[0, 1]`` (``nan`` for an empty bin); ``count``: (K,) summed weight (the example count
    for unit weights); ``edges``: (K + 1,) fixed bin edges, or ``None`` for equal-mass bins.
    """

    mean_p: FloatArray
    mean_y: FloatArray
    count: FloatArray
    edges: FloatArray | None = None

    @property
    def ece(self) -> float:
        """``Σ_k (n_k / N) |mean_p_k − mean_y_k|`` over the non-empty bins; ``nan`` if none."""
        keep = self.count > 0
        total = float(self.count[keep].sum())
        if total == 0.0:
            return math.nan
        gap = np.abs(self.mean_p[keep] - self.mean_y[keep])
        return float(np.dot(self.count[keep], gap)) / total


def compute_reliability(
    count: ArrayLike, sum_p: ArrayLike, sum_y: ArrayLike, edges: ArrayLike | None = None
) -> Reliability:
    """:class:`Reliability` from per-bin sums ``Σw``, ``Σw·p``, ``Σw·y`` (each ``(K,)``).

    >>> r = compute_reliability([2.0, 0.0], [0.03, 0.0], [1.0, 0.0], edges=[0, 0.1, 1])
    >>> r.mean_p.tolist(), r.mean_y.tolist(), r.count.tolist(), r.ece
    ([0.015, nan], [0.5, nan], [2.0, 0.0], 0.485)
    """
    n = np.asarray(count, dtype=np.float64).reshape(-1)
    sp = np.asarray(sum_p, dtype=np.float64).reshape(-1)
    sy = np.asarray(sum_y, dtype=np.float64).reshape(-1)
    if not n.shape == sp.shape == sy.shape:
        raise ValueError(f"count, sum_p, sum_y must have one shape, got {n.shape}, {sp.shape}")
    e = None if edges is None else check_edges(edges)
    if e is not None and e.size != n.size + 1:
        raise ValueError(f"need {n.size + 1} edges for {n.size} bins, got {e.size}")
    nan = np.full(n.shape, math.nan)
    mean_p = np.divide(sp, n, out=nan.copy(), where=n > 0)
    mean_y = np.divide(sy, n, out=nan.copy(), where=n > 0)
    return Reliability(mean_p=mean_p, mean_y=mean_y, count=n, edges=e)


def drift_z(sum_y: float, sum_p: float, sum_var: float) -> float:
    """Standardised click surplus ``(Σy − Σp) / sqrt(Σp(1−p))``; 0.0 when ``sum_var <= 0``.

    Under a calibrated model it is approximately N(0, 1); positive means more clicks than
    predicted (under-prediction).

    >>> drift_z(sum_y=60.0, sum_p=40.0, sum_var=16.0)
    5.0
    """
    if sum_var <= 0.0:
        return 0.0
    return (sum_y - sum_p) / math.sqrt(sum_var)


@dataclass(frozen=True)
class CalibrationSnapshot:
    """Calibration statistics of a set of examples (a window or the lifetime).

    ``n`` is the example count; ``positives`` the weighted click count ``Σw·y``; ``mean_p``
    and ``actual_ctr`` are weighted means in ``[0, 1]``; ``ratio = Σw·p / Σw·y``; ``ece`` in
    ``[0, 1]``; ``ne`` normalised entropy (< 1 beats the base rate); ``auc`` in ``[0, 1]``;
    ``log_loss`` in nats; ``z`` the drift statistic (see :func:`drift_z`). Undefined values
    are ``nan`` (``z`` is 0.0 when undefined).
    """

    n: int
    positives: float
    mean_p: float
    actual_ctr: float
    ratio: float
    ece: float
    ne: float
    auc: float
    log_loss: float
    z: float


EMPTY_SNAPSHOT = CalibrationSnapshot(
    n=0,
    positives=0.0,
    mean_p=math.nan,
    actual_ctr=math.nan,
    ratio=math.nan,
    ece=math.nan,
    ne=math.nan,
    auc=math.nan,
    log_loss=math.nan,
    z=0.0,
)


def compute_snapshot(
    n: int,
    sum_w: float,
    sum_wp: float,
    sum_wy: float,
    sum_var: float,
    sum_wll: float,
    *,
    ece: float = math.nan,
    auc: float = math.nan,
) -> CalibrationSnapshot:
    """A :class:`CalibrationSnapshot` from running sums (pure; O(1)).

    ``n`` examples with ``Σw``, ``Σw·p``, ``Σw·y``, ``Σw²·p(1−p)`` (the drift variance) and
    ``Σw·logloss`` (nats). ``ece`` and ``auc`` need more than sums and are passed through.

    >>> s = compute_snapshot(4, 4.0, 0.4, 0.5, 0.3, 1.2)
    >>> s.mean_p, s.actual_ctr, s.ratio, s.log_loss
    (0.1, 0.125, 0.8, 0.3)
    """
    if n == 0:
        return EMPTY_SNAPSHOT
    ll = sum_wll / sum_w if sum_w else math.nan
    h = _entropy(sum_wy / sum_w) if sum_w else math.nan
    return CalibrationSnapshot(
        n=int(n),
        positives=sum_wy,
        mean_p=sum_wp / sum_w if sum_w else math.nan,
        actual_ctr=sum_wy / sum_w if sum_w else math.nan,
        ratio=sum_wp / sum_wy if sum_wy else math.nan,
        ece=ece,
        ne=ll / h if not math.isnan(h) else math.nan,
        auc=auc,
        log_loss=ll,
        z=drift_z(sum_wy, sum_wp, sum_var),
    )
