"""The sequential calibration drift detectors of :mod:`monitoring.drift`, which test after
every example on the standardized click residual ``r = (y − p) / sqrt(p (1 − p))``
(:func:`standardized_residual`):

- :class:`CusumDriftDetector` (``"cusum"``): two-sided CUSUM.
- :class:`PageHinkleyDriftDetector` (``"page_hinkley"``): Page-Hinkley.
- :class:`RiverDriftDetector` (``"adwin"``, ``"river_page_hinkley"``): River's detectors fed
  one residual at a time.

Also the parts every detector shares, the window z-test of :mod:`monitoring.drift` included:
the input check (:func:`validate`) and the alarm flag and cooldown (:class:`AlarmState`).
:func:`monitoring.drift.make_detector` builds any of them by name.

Each stays quiet on ~51k calibrated examples, then alarms once within 5k impressions
(20k for ADWIN) after the true CTR jumps from 4% to 6.4% while the predictions stay at 4%:

>>> import numpy as np
>>> p = np.full(1024, 0.04)
>>> detectors = {
...     "cusum": CusumDriftDetector(CusumConfig()),
...     "page_hinkley": PageHinkleyDriftDetector(PageHinkleyConfig()),
...     "adwin": RiverDriftDetector("adwin"),
... }
>>> for name, det in detectors.items():
...     rng = np.random.default_rng(7)
...     for _ in range(50):  # ~51k calibrated examples
...         det.update_many(p, rng.random(1024) < 0.04)
...     quiet = det.n_alarms
...     for step in range(1, 41):  # true CTR jumps to 6.4%, predictions stay at 4%
...         det.update_many(p, rng.random(1024) < 0.064)
...         if det.drift_detected:
...             break
...     delay_ok = step * 1024 <= (20_000 if name == "adwin" else 5_000)
...     print(name, quiet, det.drift_detected, det.n_alarms, delay_ok)
cusum 0 True 1 True
page_hinkley 0 True 1 True
adwin 0 True 1 True
>>> [detectors[name].last_alarm_statistic > 120 for name in ("cusum", "page_hinkley")]
[True, True]
>>> det = detectors["cusum"]
>>> det.reset()
>>> det.drift_detected, det.statistic, det.in_cooldown
(False, 0.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "RESIDUAL_P_MIN",
    "AlarmState",
    "CusumConfig",
    "CusumDriftDetector",
    "PageHinkleyConfig",
    "PageHinkleyDriftDetector",
    "RiverDriftDetector",
    "standardized_residual",
    "validate",
]

FloatArray = npt.NDArray[np.float64]

RESIDUAL_P_MIN = 1e-3
"""Predictions are clipped to ``[RESIDUAL_P_MIN, 1 − RESIDUAL_P_MIN]`` in the residual, so one
click can move it by at most ``sqrt(1/RESIDUAL_P_MIN) ≈ 31.6``: without the floor a single
click on a 1e-6 prediction (residual 1000) would raise an alarm on its own."""


def validate(p: npt.ArrayLike, y: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """``p`` and ``y`` as float64 arrays; ValueError unless 1-D of one length and finite."""
    pa = np.asarray(p, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if pa.ndim != 1 or pa.shape != ya.shape:
        raise ValueError(f"p and y must be 1-D of one length, got {pa.shape}, {ya.shape}")
    if not (np.all(np.isfinite(pa)) and np.all(np.isfinite(ya))):
        raise ValueError("p and y must be finite")
    return pa, ya


def standardized_residual(p: npt.ArrayLike, y: npt.ArrayLike) -> FloatArray:
    """Per-example ``(y − p) / sqrt(p (1 − p))``, float64 ``(B,)``, unitless.

    ``p`` (B,) in [0, 1] is clipped to ``[RESIDUAL_P_MIN, 1 − RESIDUAL_P_MIN]`` first. Under
    calibration each value has mean 0 and variance 1; a CTR that is a factor ``m`` above a
    prediction ``p`` shifts the mean by about ``(m − 1) · sqrt(p)`` (0.12 for 4% → 6.4%).

    >>> standardized_residual([0.2, 0.2], [1, 0]).round(3).tolist()
    [2.0, -0.5]
    """
    pa, ya = validate(p, y)
    q = np.clip(pa, RESIDUAL_P_MIN, 1.0 - RESIDUAL_P_MIN)
    return (ya - q) / np.sqrt(q * (1.0 - q))


class AlarmState:
    """Alarm bookkeeping every detector shares: the one-shot alarm flag and the cooldown."""

    _drift: bool
    _cooldown_left: int

    @property
    def drift_detected(self) -> bool:
        """True right after the ``update_many`` that raised an alarm; read-only."""
        return self._drift

    @property
    def in_cooldown(self) -> bool:
        """True while alarms are suppressed after a reset or an alarm."""
        return self._cooldown_left > 0

    def update(self, p: float, y: float) -> None:
        """Add one example: prediction ``p`` in [0, 1] and label ``y`` in {0, 1}."""
        self.update_many(np.array([p]), np.array([y]))

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> None:
        raise NotImplementedError


class _SequentialDetector(AlarmState):
    """Shared alarm logic of the per-example detectors on the standardized residual.

    Subclasses implement ``_scan(r)``: the statistic after each example of ``r`` (B,) from the
    current state, plus a function that commits the state as of a given index; and
    ``_restart()``. An alarm fires at the first example where ``|statistic| > threshold``,
    at least ``min_positives`` clicks have arrived since the last restart and the cooldown has
    run out; the statistic then restarts from that example on (the usual sequential-test
    practice) and a cooldown of ``cooldown`` examples starts, during which the statistic
    accumulates but cannot alarm.
    """

    def __init__(self, threshold: float, min_positives: int, cooldown: int) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if min_positives < 0 or cooldown < 0:
            raise ValueError("min_positives and cooldown must be >= 0")
        self._threshold = float(threshold)
        self._min_positives = min_positives
        self._cooldown = cooldown
        self._cooldown_left = 0
        self._positives = 0.0
        self._drift = False
        self._statistic = 0.0
        self._last_alarm = 0.0
        self._n_alarms = 0

    @property
    def statistic(self) -> float:
        """Statistic after the latest example, signed: ``+`` for the upward test, ``−`` for
        the downward one. It restarts at an alarm, so read :attr:`last_alarm_statistic` for
        the value that crossed the threshold."""
        return self._statistic

    @property
    def last_alarm_statistic(self) -> float:
        """Signed statistic at the most recent alarm (0.0 before the first)."""
        return self._last_alarm

    @property
    def n_alarms(self) -> int:
        """Lifetime alarm count (kept by :meth:`reset`)."""
        return self._n_alarms

    @property
    def positives(self) -> float:
        """Clicks since the last restart (alarm or :meth:`reset`)."""
        return self._positives

    def _scan(self, r: FloatArray) -> tuple[FloatArray, Callable[[int], None]]:
        raise NotImplementedError

    def _restart(self) -> None:
        raise NotImplementedError

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> None:
        """Add a batch: ``p`` (B,) predictions in [0, 1], ``y`` (B,) labels 0/1; test each."""
        pa, ya = validate(p, y)
        self._drift = False
        r = standardized_residual(pa, ya)
        start = 0
        while start < r.size:
            seg_r, seg_y = r[start:], ya[start:]
            stat, commit = self._scan(seg_r)
            clicks = self._positives + np.cumsum(seg_y)
            seen = np.arange(1, seg_r.size + 1)
            ok = (
                (np.abs(stat) > self._threshold)
                & (clicks >= self._min_positives)
                & (seen >= self._cooldown_left)
            )
            hit = int(np.argmax(ok))  # the segment is non-empty
            if not ok[hit]:
                commit(seg_r.size - 1)
                self._statistic = float(stat[-1])
                self._positives = float(clicks[-1])
                self._cooldown_left = max(0, self._cooldown_left - seg_r.size)
                return
            self._drift = True
            self._n_alarms += 1
            self._last_alarm = float(stat[hit])
            self._restart()
            self._positives = 0.0
            self._cooldown_left = self._cooldown
            start += hit + 1

    def reset(self) -> None:
        """Restart the statistic, clear ``drift_detected`` and start the cooldown.

        ``n_alarms`` is kept (it is a lifetime count).
        """
        self._restart()
        self._positives = 0.0
        self._drift = False
        self._statistic = 0.0
        self._cooldown_left = self._cooldown


def _lindley(x: FloatArray, s0: float) -> FloatArray:
    """``s_t = max(0, s_{t−1} + x_t)`` for every t, vectorised: ``C_t − min(−s0, min C_≤t)``."""
    c = np.cumsum(x)
    low = np.minimum.accumulate(np.concatenate(([-s0], c)))[1:]
    return c - low


@dataclass(frozen=True)
class CusumConfig:
    """Settings of :class:`CusumDriftDetector`.

    Attributes:
        k: reference value (allowance) per example, in residual standard deviations. CUSUM is
            quickest for a mean shift of ``2k``; the default 0.05 targets ``0.1 σ``, which at
            a 4% CTR is a ×1.5 change (shift ``(m − 1)·sqrt(p)``). A larger ``k`` (e.g. the
            textbook 0.25–0.5) would make the statistic drift *down* under a ×1.6 change at
            4% (shift 0.12 < k) and miss it.
        h: decision threshold in residual standard deviations. Roughly, false alarms come
            every ``exp(2k·h)/(2k²)`` examples per side; the default 120 gave 0.2 false alarms
            per million calibrated impressions (2 in 10M) and a median delay of 1.9k
            impressions for 4% → 6.4% in batches of 1024 (``bench/drift.py``); h=60 gives
            ~20 false alarms per million.
        min_positives: no alarm until this many clicks have arrived since the last restart.
        cooldown: examples after an alarm or ``reset()`` during which no alarm fires.
    """

    k: float = 0.05
    h: float = 120.0
    min_positives: int = 50
    cooldown: int = 10_000


class CusumDriftDetector(_SequentialDetector):
    """Two-sided CUSUM on the standardized click residual ``r`` (:func:`standardized_residual`).

    ``S⁺_t = max(0, S⁺_{t−1} + r_t − k)`` accumulates click surplus (under-prediction) and
    ``S⁻_t = max(0, S⁻_{t−1} − r_t − k)`` click deficit; an alarm fires when either exceeds
    ``h`` (and the ``min_positives``/``cooldown`` rules allow it), after which both restart at
    0. ``statistic`` is ``S⁺`` or ``−S⁻``, whichever is larger in size. Computed per example,
    vectorised over the batch (Lindley recursion as a running minimum of a cumulative sum).

    The module docstring shows it detecting a CTR jump.
    """

    def __init__(self, config: CusumConfig | None = None) -> None:
        self.config = config if config is not None else CusumConfig()
        if self.config.k < 0:
            raise ValueError(f"k must be >= 0, got {self.config.k}")
        super().__init__(self.config.h, self.config.min_positives, self.config.cooldown)
        self._s_up = 0.0
        self._s_down = 0.0

    @property
    def s_up(self) -> float:
        """``S⁺``: accumulated click surplus beyond the allowance (>= 0)."""
        return self._s_up

    @property
    def s_down(self) -> float:
        """``S⁻``: accumulated click deficit beyond the allowance (>= 0)."""
        return self._s_down

    def _scan(self, r: FloatArray) -> tuple[FloatArray, Callable[[int], None]]:
        k = self.config.k
        up = _lindley(r - k, self._s_up)
        down = _lindley(-r - k, self._s_down)

        def commit(i: int) -> None:
            if i >= 0:
                self._s_up, self._s_down = float(up[i]), float(down[i])

        return np.where(up >= down, up, -down), commit

    def _restart(self) -> None:
        self._s_up = self._s_down = 0.0


def _fading_sum(u: FloatArray, alpha: float, y0: float) -> FloatArray:
    """``y_t = alpha · y_{t−1} + u_t`` for every t (``y_0 = y0``), vectorised in blocks.

    Within a block ``y_i = alpha^i (y0 + Σ_{j≤i} alpha^{−j} u_j)``; blocks are short enough
    that ``alpha^{−j} <= e``, so no term is amplified enough to lose precision.
    """
    if alpha == 1.0:
        return y0 + np.cumsum(u)
    out = np.empty_like(u)
    block = max(1, int(1.0 / -math.log(alpha)))
    prev = y0
    for s in range(0, u.size, block):
        c = u[s : s + block]
        pw = alpha ** np.arange(1, c.size + 1, dtype=np.float64)
        out[s : s + c.size] = pw * (prev + np.cumsum(c / pw))
        prev = float(out[s + c.size - 1])
    return out


@dataclass(frozen=True)
class PageHinkleyConfig:
    """Settings of :class:`PageHinkleyDriftDetector` (River's parametrisation).

    Attributes:
        delta: tolerated change of the residual mean per example, in residual standard
            deviations (the CUSUM allowance; same 0.05 as :class:`CusumConfig`).
        threshold: lambda, the decision threshold in residual standard deviations (as
            CUSUM's ``h``).
        alpha: forgetting factor in (0, 1] of the cumulative sums. The default 1 (no
            forgetting) is deliberate: with ``alpha < 1`` the sum settles where the forgetting
            cancels the ``−delta`` drift (``−delta / (1 − alpha)``) and then wanders like an
            AR(1) process with standard deviation ``1 / sqrt(2 (1 − alpha))``, so after about
            ``1 / (1 − alpha)`` examples the allowance is gone and false alarms follow (River's
            stock ``alpha = 0.9999`` gives several per million impressions here).
        min_positives: no alarm until this many clicks have arrived since the last restart.
        cooldown: examples after an alarm or ``reset()`` during which no alarm fires.
    """

    delta: float = 0.05
    threshold: float = 120.0
    alpha: float = 1.0
    min_positives: int = 50
    cooldown: int = 10_000


class PageHinkleyDriftDetector(_SequentialDetector):
    """Two-sided Page-Hinkley test on the standardized click residual.

    The same recursion as ``river.drift.PageHinkley``: with ``x̄_t`` the running mean of the
    residuals since the last restart, ``U_t = α U_{t−1} + (x_t − x̄_t) − δ`` and
    ``D_t = α D_{t−1} + (x_t − x̄_t) + δ``; alarm when ``U_t − min U`` or ``max D − D_t``
    exceeds ``threshold``. Unlike CUSUM it measures change relative to the stream's own mean,
    so it detects a *change* of calibration, not a miscalibration present from the start.
    (River starts ``max D`` at −1 rather than −inf; this only matters for the first few
    examples after a restart.) ``statistic`` is the larger test, signed like CUSUM's.

    The module docstring shows it detecting a CTR jump.
    """

    def __init__(self, config: PageHinkleyConfig | None = None) -> None:
        self.config = config if config is not None else PageHinkleyConfig()
        if not 0.0 < self.config.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.config.alpha}")
        super().__init__(self.config.threshold, self.config.min_positives, self.config.cooldown)
        self._restart()

    def _restart(self) -> None:
        self._n = 0
        self._sum = 0.0
        self._inc = 0.0
        self._dec = 0.0
        self._min_inc = math.inf
        self._max_dec = -math.inf

    def _scan(self, r: FloatArray) -> tuple[FloatArray, Callable[[int], None]]:
        cfg = self.config
        n = self._n + np.arange(1, r.size + 1)
        sums = self._sum + np.cumsum(r)
        dev = r - sums / n
        inc = _fading_sum(dev - cfg.delta, cfg.alpha, self._inc)
        dec = _fading_sum(dev + cfg.delta, cfg.alpha, self._dec)
        min_inc = np.minimum.accumulate(np.minimum(inc, self._min_inc))
        max_dec = np.maximum.accumulate(np.maximum(dec, self._max_dec))
        t_up = inc - min_inc
        t_down = max_dec - dec

        def commit(i: int) -> None:
            if i >= 0:
                self._n = int(n[i])
                self._sum = float(sums[i])
                self._inc, self._dec = float(inc[i]), float(dec[i])
                self._min_inc, self._max_dec = float(min_inc[i]), float(max_dec[i])

        return np.where(t_up >= t_down, t_up, -t_down), commit


_RIVER_DEFAULTS: dict[str, dict[str, Any]] = {
    # River's stock delta=0.002 gives ~6 false alarms per million impressions on the
    # residual: its cut bound's range term assumes values in [0, 1], and one click moves the
    # residual by ~5. delta=1e-6 gives none in 5M for ~2k extra impressions of delay.
    "adwin": {"delta": 1e-6},
    # River's stock delta=0.005, threshold=50, alpha=0.9999 alarm hundreds of times per million
    # impressions on the unit-variance residual (bench/README.md); use PageHinkleyConfig's.
    "page_hinkley": {
        "delta": PageHinkleyConfig.delta,
        "threshold": PageHinkleyConfig.threshold,
        "alpha": PageHinkleyConfig.alpha,
    },
}


class RiverDriftDetector(AlarmState):
    """A ``river.drift`` detector (ADWIN or Page-Hinkley) fed the standardized residual.

    River detectors take one value at a time (``update(x)``, ``drift_detected``), so this
    loops in Python (~0.3 µs per example for ADWIN, ~1 µs for Page-Hinkley). An alarm is
    raised when River flags drift on an example, at least ``min_positives`` clicks have
    arrived since the last alarm/reset and no cooldown runs. River resets its own state after
    a detection; :meth:`reset` replaces the River object with a fresh clone.

    Args:
        kind: ``"adwin"`` (``river.drift.ADWIN``) or ``"page_hinkley"``
            (``river.drift.PageHinkley``).
        min_positives: clicks required since the last alarm/reset before an alarm.
        cooldown: examples after an alarm or ``reset()`` during which no alarm fires.
        **params: passed to the River constructor, overriding this adapter's defaults:
            ``delta=1e-6`` for ADWIN (River's 0.002 false-alarms on the heavy-tailed
            residual) and :class:`PageHinkleyConfig`'s values for Page-Hinkley (River's
            stock ``threshold=50, alpha=0.9999`` are far too low for a unit-variance
            residual).

    ADWIN and Page-Hinkley detect a *change* in the residual's mean: a miscalibration that
    is there from the first example, or persists after an alarm, is not re-detected, and a
    change River detects inside a cooldown is lost (River has already reset itself).

    ``statistic`` is the running mean of the residual River's window holds (ADWIN's
    ``estimation``) or the larger Page-Hinkley test (signed).

    The module docstring shows it detecting a CTR jump.
    """

    def __init__(
        self,
        kind: str = "adwin",
        *,
        min_positives: int = 50,
        cooldown: int = 10_000,
        **params: Any,
    ) -> None:
        if kind not in _RIVER_DEFAULTS:
            raise ValueError(f"kind must be 'adwin' or 'page_hinkley', got {kind!r}")
        if min_positives < 0 or cooldown < 0:
            raise ValueError("min_positives and cooldown must be >= 0")
        from river import drift  # imported here: River is slow to import and only needed here

        self.kind = kind
        self.min_positives = min_positives
        self.cooldown = cooldown
        self.params = {**_RIVER_DEFAULTS[kind], **params}
        factory = drift.ADWIN if kind == "adwin" else drift.PageHinkley
        self._river: Any = factory(**self.params)
        self._cooldown_left = 0
        self._positives = 0.0
        self._drift = False
        self._n_alarms = 0

    @property
    def n_alarms(self) -> int:
        """Lifetime alarm count (kept by :meth:`reset`)."""
        return self._n_alarms

    @property
    def statistic(self) -> float:
        """ADWIN: mean residual over its window; Page-Hinkley: the larger test, signed."""
        det = self._river
        if self.kind == "adwin":
            return float(det.estimation)
        up = det._sum_increase - det._min_increase  # River keeps these private
        down = det._max_decrease - det._sum_decrease
        if not (math.isfinite(up) and math.isfinite(down)):
            return 0.0
        return float(up) if up >= down else -float(down)

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> None:
        """Add a batch: ``p`` (B,) predictions in [0, 1], ``y`` (B,) labels 0/1; test each."""
        pa, ya = validate(p, y)
        self._drift = False
        r = standardized_residual(pa, ya).tolist()
        clicks = ya.tolist()
        det = self._river
        for x, c in zip(r, clicks, strict=True):
            det.update(x)
            self._positives += c
            if self._cooldown_left > 0:
                self._cooldown_left -= 1
            if (
                det.drift_detected
                and self._cooldown_left == 0
                and self._positives >= self.min_positives
            ):
                self._drift = True
                self._n_alarms += 1
                self._positives = 0.0
                self._cooldown_left = self.cooldown

    def reset(self) -> None:
        """Fresh River detector, clear ``drift_detected`` and start the cooldown."""
        self._river = self._river.clone()
        self._positives = 0.0
        self._drift = False
        self._cooldown_left = self.cooldown
