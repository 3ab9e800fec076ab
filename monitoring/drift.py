"""Calibration drift: a sliding-window test of observed clicks against predicted clicks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from monitoring.calibration import drift_z

__all__ = ["CalibrationDriftDetector", "DriftConfig"]


@dataclass(frozen=True)
class DriftConfig:
    """Settings of :class:`CalibrationDriftDetector`.

    Attributes:
        threshold_z: alarm when ``|z| >= threshold_z`` (z is ~N(0, 1) under calibration).
        min_positives: no alarm until the window holds at least this many clicks.
        cooldown: examples after a recalibration/alarm during which no alarm fires.
        window: number of most recent examples the statistic is computed over.
    """

    threshold_z: float = 5.0
    min_positives: int = 50
    cooldown: int = 10_000  # examples after a recalibration/alarm during which no alarm fires
    window: int = 20_000


class CalibrationDriftDetector:
    """Alarms when recent clicks stray from predicted clicks: ``z = (Σy − Σp) / sqrt(Σp(1−p))``.

    The sums run over the last ``config.window`` examples (a ring buffer with O(1)-per-example
    running sums, re-summed exactly once per ``window`` examples to stop rounding drift).
    The test runs once at the end of each ``update_many`` call, so batch size bounds the
    detection latency. An alarm fires when ``|z| >= threshold_z``, the window holds at least
    ``min_positives`` clicks and no cooldown is running; it sets ``drift_detected`` (until the
    next update or ``reset()``), increments ``n_alarms`` and starts a cooldown of
    ``config.cooldown`` examples. Call ``reset()`` after recalibrating: it empties the window
    (old examples were scored by the old calibration) and also starts the cooldown.

    >>> import numpy as np
    >>> rng = np.random.default_rng(7)
    >>> det = CalibrationDriftDetector(DriftConfig(window=20_000))
    >>> p = np.full(500, 0.04)
    >>> for _ in range(40):  # 20k calibrated examples
    ...     det.update_many(p, rng.random(500) < 0.04)
    >>> det.drift_detected
    False
    >>> for step in range(1, 41):  # true CTR jumps to 6.4%, predictions stay at 4%
    ...     det.update_many(p, rng.random(500) < 0.064)
    ...     if det.drift_detected:
    ...         break
    >>> det.drift_detected, det.n_alarms, step * 500 <= 10_000, det.z > 5.0
    (True, 1, True, True)
    >>> det.reset()
    >>> det.drift_detected, det.z
    (False, 0.0)
    """

    def __init__(self, config: DriftConfig | None = None) -> None:
        self.config = config if config is not None else DriftConfig()
        if self.config.window < 1:
            raise ValueError(f"window must be >= 1, got {self.config.window}")
        size = self.config.window
        # Unfilled slots hold 0.0 so evicting them subtracts nothing.
        self._p = np.zeros(size, dtype=np.float64)
        self._y = np.zeros(size, dtype=np.float64)
        self._head = 0
        self._count = 0
        self._sum_p = 0.0
        self._sum_y = 0.0
        self._sum_var = 0.0
        self._since_resum = 0
        self._cooldown_left = 0
        self._drift = False
        self.n_alarms = 0

    @property
    def drift_detected(self) -> bool:
        """True right after the ``update_many`` that raised an alarm; read-only."""
        return self._drift

    @property
    def z(self) -> float:
        """Current statistic over the window (0.0 while the window is empty)."""
        return drift_z(self._sum_y, self._sum_p, self._sum_var)

    @property
    def positives(self) -> float:
        """Clicks in the current window."""
        return self._sum_y

    @property
    def in_cooldown(self) -> bool:
        """True while alarms are suppressed after a reset or an alarm."""
        return self._cooldown_left > 0

    def update(self, p: float, y: float) -> None:
        """Add one example: prediction ``p`` in [0, 1] and label ``y`` in {0, 1}."""
        self.update_many(np.array([p]), np.array([y]))

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> None:
        """Add a batch: ``p`` (B,) predictions in [0, 1], ``y`` (B,) labels 0/1, then test."""
        pa = np.asarray(p, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        if pa.ndim != 1 or pa.shape != ya.shape:
            raise ValueError(f"p and y must be 1-D of one length, got {pa.shape}, {ya.shape}")
        if not (np.all(np.isfinite(pa)) and np.all(np.isfinite(ya))):
            raise ValueError("p and y must be finite")
        self._drift = False
        b = pa.size
        if b == 0:
            return
        size = self.config.window
        if b >= size:
            self._p[:] = pa[-size:]
            self._y[:] = ya[-size:]
            self._head = 0
            self._count = size
            self._resum()
        else:
            idx = (self._head + np.arange(b)) % size
            old_p, old_y = self._p[idx], self._y[idx]
            self._sum_p += float(pa.sum() - old_p.sum())
            self._sum_y += float(ya.sum() - old_y.sum())
            self._sum_var += float(np.dot(pa, 1.0 - pa) - np.dot(old_p, 1.0 - old_p))
            self._p[idx] = pa
            self._y[idx] = ya
            self._head = (self._head + b) % size
            self._count = min(self._count + b, size)
            self._since_resum += b
            if self._since_resum >= size:
                self._resum()
        self._cooldown_left = max(0, self._cooldown_left - b)
        self._test()

    def _resum(self) -> None:
        self._sum_p = float(self._p.sum())
        self._sum_y = float(self._y.sum())
        self._sum_var = float(np.dot(self._p, 1.0 - self._p))
        self._since_resum = 0

    def _test(self) -> None:
        cfg = self.config
        if self._cooldown_left > 0 or self._sum_y < cfg.min_positives:
            return
        if abs(self.z) >= cfg.threshold_z:
            self._drift = True
            self.n_alarms += 1
            self._cooldown_left = cfg.cooldown

    def reset(self) -> None:
        """Empty the window, clear ``drift_detected`` and start the cooldown.

        ``n_alarms`` is kept (it is a lifetime count).
        """
        self._p[:] = 0.0
        self._y[:] = 0.0
        self._head = 0
        self._count = 0
        self._sum_p = self._sum_y = self._sum_var = 0.0
        self._since_resum = 0
        self._drift = False
        self._cooldown_left = self.config.cooldown
