"""Calibration drift detectors over a stream of (prediction, click) pairs.

Every detector satisfies :class:`DriftDetector`: ``update_many(p, y)`` with a batch of
predictions in [0, 1] and 0/1 labels, a read-only ``drift_detected`` that is True right after
the batch that raised an alarm, ``statistic`` (the current test statistic, signed: positive
means more clicks than predicted), a lifetime ``n_alarms`` and ``reset()`` (call it after
recalibrating: it restarts the statistic and starts the cooldown).

- :class:`CalibrationDriftDetector` (``"window_z"``): z-test over a sliding window.
- :class:`~monitoring.drift_sequential.CusumDriftDetector` (``"cusum"``): two-sided CUSUM on
  the standardized residual.
- :class:`~monitoring.drift_sequential.PageHinkleyDriftDetector` (``"page_hinkley"``):
  Page-Hinkley on the same residual.
- :class:`~monitoring.drift_sequential.RiverDriftDetector` (``"adwin"``,
  ``"river_page_hinkley"``): River's detectors fed one residual at a time.
- :class:`~monitoring.drift_wander.WanderDriftDetector` (``"wander_z"``): a window z-test
  over blocks sized by expected clicks whose variance adds the learning model's own wander,
  estimated from the stream.

:func:`make_detector` builds any of them by name. :class:`SegmentedDriftDetector` runs one of
these per segment (e.g. slate position) of a bounded set, so a drift confined to one segment
is seen even when the total hides it.

The sequential detectors (all but ``window_z``, in :mod:`monitoring.drift_sequential`) work
on the standardized click residual ``r = (y − p) / sqrt(p (1 − p))``
(:func:`~monitoring.drift_sequential.standardized_residual`), which has mean 0 and variance 1
per example under a calibrated model whatever the prediction. They test after every example,
but ``drift_detected`` is only seen per batch, so batch size still bounds the reaction
latency. ``bench/drift.py`` measures false alarms and detection delays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from monitoring.calibration import drift_z
from monitoring.drift_sequential import (
    AlarmState,
    CusumConfig,
    CusumDriftDetector,
    PageHinkleyConfig,
    PageHinkleyDriftDetector,
    RiverDriftDetector,
    validate,
)
from monitoring.drift_wander import WanderConfig, WanderDriftDetector

__all__ = [
    "DETECTOR_NAMES",
    "CalibrationDriftDetector",
    "DriftConfig",
    "DriftDetector",
    "SegmentedDriftDetector",
    "make_detector",
]


@runtime_checkable
class DriftDetector(Protocol):
    """What :class:`stream.services.MonitorService` needs from a calibration drift detector."""

    @property
    def drift_detected(self) -> bool:
        """True right after the ``update_many`` that raised an alarm."""
        ...

    @property
    def statistic(self) -> float:
        """Current test statistic; positive means more clicks than predicted."""
        ...

    @property
    def n_alarms(self) -> int:
        """Alarms raised over the detector's lifetime (kept by ``reset``)."""
        ...

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> None:
        """Add a batch: ``p`` (B,) predictions in [0, 1], ``y`` (B,) labels 0/1."""
        ...

    def reset(self) -> None:
        """Restart the statistic, clear ``drift_detected`` and start the cooldown."""
        ...


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


class CalibrationDriftDetector(AlarmState):
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
    >>> det.statistic == det.z
    True
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
    def z(self) -> float:
        """Current statistic over the window (0.0 while the window is empty)."""
        return drift_z(self._sum_y, self._sum_p, self._sum_var)

    @property
    def statistic(self) -> float:
        """Same as :attr:`z` (the :class:`DriftDetector` name)."""
        return self.z

    @property
    def positives(self) -> float:
        """Clicks in the current window."""
        return self._sum_y

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> None:
        """Add a batch: ``p`` (B,) predictions in [0, 1], ``y`` (B,) labels 0/1, then test."""
        pa, ya = validate(p, y)
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


DETECTOR_NAMES = ("window_z", "cusum", "page_hinkley", "adwin", "river_page_hinkley", "wander_z")


def make_detector(name: str, **params: Any) -> DriftDetector:
    """Build a detector by name; ``params`` go to its config (or River constructor).

    Names: ``"window_z"`` (:class:`DriftConfig` fields), ``"cusum"``
    (:class:`~monitoring.drift_sequential.CusumConfig`), ``"page_hinkley"``
    (:class:`~monitoring.drift_sequential.PageHinkleyConfig`), ``"adwin"`` and
    ``"river_page_hinkley"`` (:class:`~monitoring.drift_sequential.RiverDriftDetector`
    keywords and River parameters), ``"wander_z"``
    (:class:`~monitoring.drift_wander.WanderConfig`).

    >>> make_detector("cusum", h=40.0).config.h
    40.0
    >>> sorted(type(make_detector(n)).__name__ for n in DETECTOR_NAMES)[:2]
    ['CalibrationDriftDetector', 'CusumDriftDetector']
    """
    if name == "window_z":
        return CalibrationDriftDetector(DriftConfig(**params))
    if name == "cusum":
        return CusumDriftDetector(CusumConfig(**params))
    if name == "page_hinkley":
        return PageHinkleyDriftDetector(PageHinkleyConfig(**params))
    if name == "adwin":
        return RiverDriftDetector("adwin", **params)
    if name == "river_page_hinkley":
        return RiverDriftDetector("page_hinkley", **params)
    if name == "wander_z":
        return WanderDriftDetector(WanderConfig(**params))
    raise ValueError(f"unknown detector {name!r}; expected one of {DETECTOR_NAMES}")


class SegmentedDriftDetector:
    """One drift detector per segment (slate position, device, ...) of a bounded set.

    ``update_many(p, y, segments)`` routes each example to its segment's detector, created
    by ``factory`` on the segment's first example; examples of new segments beyond
    ``max_segments`` are not tested (counted in :attr:`n_dropped`), which keeps memory and
    the exported label cardinality bounded. After an update, :attr:`drifted_segments` lists
    the segments whose detector raised an alarm on it and :attr:`drift_detected` is True if
    any did; each alarming detector is ``reset()`` right away (it restarts its statistic and
    starts its cooldown), since a per-segment alarm triggers no recalibration that would.

    Args:
        factory: builds a fresh detector, e.g. ``lambda: make_detector("cusum")``.
        max_segments: most segments tested (>= 1).

    >>> import numpy as np
    >>> rng = np.random.default_rng(3)
    >>> det = SegmentedDriftDetector(lambda: make_detector("cusum"), max_segments=4)
    >>> seg = np.array(["1", "2", "3"] * 400)
    >>> p = np.full(seg.size, 0.05)
    >>> for _ in range(30):  # 36k calibrated examples, 12k per position
    ...     det.update_many(p, rng.random(p.size) < p, seg)
    >>> det.n_alarms
    {'1': 0, '2': 0, '3': 0}
    >>> alarmed = set()
    >>> for _ in range(30):  # position 3 alone now clicks 1.6x as often as predicted
    ...     det.update_many(p, rng.random(p.size) < np.where(seg == "3", 0.08, 0.05), seg)
    ...     alarmed |= set(det.drifted_segments)
    >>> sorted(alarmed), det.n_alarms["3"] >= 1
    (['3'], True)
    """

    def __init__(self, factory: Callable[[], DriftDetector], max_segments: int = 16) -> None:
        if max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {max_segments}")
        self.factory = factory
        self.max_segments = max_segments
        self.detectors: dict[str, DriftDetector] = {}
        self.drifted_segments: list[str] = []
        self.n_dropped = 0

    @property
    def drift_detected(self) -> bool:
        """True if any segment raised an alarm on the latest update; read-only."""
        return bool(self.drifted_segments)

    @property
    def statistics(self) -> dict[str, float]:
        """Current statistic of each tested segment (see :attr:`DriftDetector.statistic`)."""
        return {seg: float(d.statistic) for seg, d in self.detectors.items()}

    @property
    def n_alarms(self) -> dict[str, int]:
        """Lifetime alarms of each tested segment."""
        return {seg: int(d.n_alarms) for seg, d in self.detectors.items()}

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike, segments: npt.ArrayLike) -> None:
        """Add a batch: ``p`` (B,) predictions in [0, 1], ``y`` (B,) labels 0/1 and
        ``segments`` (B,) segment labels (strings); test each segment's detector."""
        pa, ya = validate(p, y)
        sa = np.asarray(segments).reshape(-1)
        if sa.shape != pa.shape:
            raise ValueError(f"segments must have shape {pa.shape}, got {sa.shape}")
        self.drifted_segments = []
        for seg in np.unique(sa).tolist():
            key = str(seg)
            mask = sa == seg
            det = self.detectors.get(key)
            if det is None:
                if len(self.detectors) >= self.max_segments:
                    self.n_dropped += int(mask.sum())
                    continue
                det = self.detectors[key] = self.factory()
            det.update_many(pa[mask], ya[mask])
            if det.drift_detected:
                self.drifted_segments.append(key)
                det.reset()

    def reset(self) -> None:
        """Reset every segment's detector (lifetime alarm counts are kept)."""
        for det in self.detectors.values():
            det.reset()
        self.drifted_segments = []
