"""A calibration drift test that knows the model is learning: ``"wander_z"``.

The window z-test (:class:`monitoring.drift.CalibrationDriftDetector`) takes click noise as
the only source of variance: ``z = (Σy − Σp) / sqrt(Σp(1 − p))``. A model that learns
online also *wanders*: its calibration moves by several percent from one stretch of
traffic to the next with no change in the world (issue 17: raw Σp/Σtrue_p 0.85-1.10 in the
worker). Click noise shrinks with traffic, the wander does not, so the same test that is
quiet at 100 impressions a minute fires on noise at 3,000 or 30,000.

This test estimates the wander from the stream itself and adds it to the variance:

- The stream is cut into **blocks of** ``block_clicks`` **expected clicks** (Σp), or
  ``max_block`` examples, whichever comes first: a block is sized by clicks, not by time,
  so 70 and 70,000 impressions a minute give blocks of the same statistical weight.
- For each block ``i``: observed clicks ``O_i = Σy``, expected ``E_i = Σp`` and binomial
  variance ``V_i = Σp(1 − p)``. Without wander ``E[(O_i − E_i)^2] = V_i``; with a relative
  miscalibration ``b_i`` of the block, ``E[(O_i − E_i)^2] = V_i + b_i^2 E_i^2``. So over the
  ``ref_blocks`` blocks before the tested window, ``tau2 = mean(((O_i − E_i)^2 − V_i) /
  E_i^2)`` (at least ``tau_floor^2``) estimates the squared relative wander (a method of
  moments, as in random-effects meta-analysis).
- The tested window is the newest ``window_blocks`` blocks:
  ``z = (ΣO − ΣE) / sqrt(ΣV + tau2 (ΣE)^2)``, the wander taken as common to the whole
  window (a slow wander is: conservative when it is not). For a large window ``z → b /
  tau``: an alarm says "the served model is off by more than ``threshold_z`` times its
  usual wander", which is what a recalibration could fix.

The test runs at every block's end; no alarm before ``min_ref_blocks`` reference blocks
exist, within a cooldown of ``cooldown`` examples after an alarm or a :meth:`reset`, or
while the window holds fewer than ``min_positives`` clicks. ``bench/drift.py`` and
``bench/calibration_worlds.py`` measure it beside the other detectors.

>>> import numpy as np
>>> rng = np.random.default_rng(3)
>>> det = WanderDriftDetector(WanderConfig(block_clicks=25, window_blocks=4, ref_blocks=40))
>>> for _ in range(120):  # 120k examples calibrated at 4%: ~190 blocks of 25 clicks
...     p = np.full(1000, 0.04)
...     det.update_many(p, rng.random(1000) < 0.04)
>>> det.n_alarms
0
>>> for step in range(1, 21):  # the CTR doubles, the predictions stay at 4%
...     det.update_many(p, rng.random(1000) < 0.08)
...     if det.drift_detected:
...         break
>>> det.drift_detected, step <= 5, det.statistic > 5.0
(True, True, True)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from monitoring.drift_sequential import AlarmState, validate

__all__ = ["CHI2_1_TRIMMED_MEAN", "TRIM_KEEP", "WanderConfig", "WanderDriftDetector"]

TRIM_KEEP = 0.9
"""Share of the reference blocks (the smallest squared residuals) the wander is fitted on."""
CHI2_1_TRIMMED_MEAN = 0.6230154841346819
"""Mean of a chi-square(1) variable below its 90% quantile (2.7055): ``P(chi2(3) < q) / 0.9``."""


@dataclass(frozen=True)
class WanderConfig:
    """Settings of :class:`WanderDriftDetector`.

    Attributes:
        threshold_z: alarm when ``|z| >= threshold_z``.
        block_clicks: a block ends when its expected clicks (Σp) reach this.
        max_block: ... or when it holds this many examples (very low CTRs).
        window_blocks: blocks in the tested window (the newest ones).
        ref_blocks: blocks before the window that estimate the wander.
        min_ref_blocks: no test until this many reference blocks exist.
        tau_floor: the smallest relative wander assumed (unitless, e.g. 0.02 = 2%).
        min_positives: no alarm while the window holds fewer clicks.
        cooldown: examples after an alarm or a reset during which no alarm fires.
    """

    threshold_z: float = 5.0
    block_clicks: float = 25.0
    max_block: int = 20_000
    window_blocks: int = 4
    ref_blocks: int = 60
    min_ref_blocks: int = 12
    tau_floor: float = 0.02
    min_positives: int = 50
    cooldown: int = 2_500

    def __post_init__(self) -> None:
        if not (self.threshold_z > 0 and self.block_clicks > 0 and self.tau_floor >= 0):
            raise ValueError("threshold_z and block_clicks must be > 0, tau_floor >= 0")
        if min(self.max_block, self.window_blocks, self.ref_blocks, self.min_ref_blocks) < 1:
            raise ValueError("max_block, window_blocks, ref_blocks, min_ref_blocks must be >= 1")
        if self.min_ref_blocks > self.ref_blocks:
            raise ValueError("min_ref_blocks must be <= ref_blocks")
        if self.min_positives < 0 or self.cooldown < 0:
            raise ValueError("min_positives and cooldown must be >= 0")


class WanderDriftDetector(AlarmState):
    """The over-dispersed window z-test of this module (see its docstring).

    Satisfies :class:`monitoring.drift.DriftDetector`. State: the open block's sums and at
    most ``window_blocks + ref_blocks`` closed blocks ``(O, E, V)``; O(1) memory.
    """

    def __init__(self, config: WanderConfig | None = None) -> None:
        self.config = config if config is not None else WanderConfig()
        self._blocks: deque[tuple[float, float, float]] = deque(
            maxlen=self.config.window_blocks + self.config.ref_blocks
        )
        self._o = self._e = self._v = 0.0
        self._n = 0
        self._z = 0.0
        self._tau2 = math.nan
        self._cooldown_left = 0
        self._drift = False
        self.n_alarms = 0

    @property
    def statistic(self) -> float:
        """z at the last block's end (0.0 before the first test); positive: more clicks
        than predicted."""
        return self._z

    @property
    def wander(self) -> float:
        """The estimated relative wander ``sqrt(tau2)`` at the last test (nan before)."""
        return math.sqrt(self._tau2) if math.isfinite(self._tau2) else math.nan

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> None:
        """Add a batch: ``p`` (B,) predictions in [0, 1], ``y`` (B,) labels 0/1; tests at
        every block that ends inside it."""
        pa, ya = validate(p, y)
        self._drift = False
        cfg = self.config
        cp = np.cumsum(pa)
        start = 0
        b = pa.size
        while start < b:
            base = cp[start - 1] if start else 0.0
            # first index whose cumulative expected clicks close the open block
            end = int(np.searchsorted(cp, base + (cfg.block_clicks - self._e), side="left"))
            end = min(end, start + (cfg.max_block - self._n) - 1)
            last = min(end, b - 1)
            seg_p, seg_y = pa[start : last + 1], ya[start : last + 1]
            self._o += float(seg_y.sum())
            self._e += float(seg_p.sum())
            self._v += float(np.dot(seg_p, 1.0 - seg_p))
            self._n += seg_p.size
            self._cooldown_left = max(0, self._cooldown_left - seg_p.size)
            if end >= b:  # the block stays open
                break
            self._blocks.append((self._o, self._e, self._v))
            self._o = self._e = self._v = 0.0
            self._n = 0
            self._test()
            start = last + 1

    def _test(self) -> None:
        cfg = self.config
        blocks = list(self._blocks)
        ref, win = blocks[: -cfg.window_blocks], blocks[-cfg.window_blocks :]
        if len(ref) < cfg.min_ref_blocks:
            return
        o, e, v = (np.asarray(col, dtype=np.float64) for col in zip(*ref, strict=True))
        ok = (e > 0) & (v > 0)
        tau2 = 0.0
        if ok.any():
            # (O - E)^2 / V is chi2(1) times phi = 1 + tau2 E^2 / V under Gaussian wander.
            # The mean of its lower 90% over blocks, over chi2(1)'s, estimates phi and is
            # not moved by the few drifted blocks that enter the reference before an alarm
            # Minus one standard error of that mean: with few blocks the estimate's own noise
            # would otherwise pass for wander and blunt the test (a lower confidence bound)
            r = np.sort((o[ok] - e[ok]) ** 2 / v[ok])
            kept = r[: max(2, int(TRIM_KEEP * r.size))]
            lcb = float(kept.mean() - kept.std(ddof=1) / math.sqrt(kept.size))
            tau2 = (lcb / CHI2_1_TRIMMED_MEAN - 1.0) * float(np.mean(v[ok] / e[ok] ** 2))
        self._tau2 = max(cfg.tau_floor**2, tau2)
        so = sum(w[0] for w in win)
        se = sum(w[1] for w in win)
        sv = sum(w[2] for w in win)
        var = sv + self._tau2 * se * se
        self._z = (so - se) / math.sqrt(var) if var > 0 else 0.0
        if self._cooldown_left > 0 or so < cfg.min_positives:
            return
        if abs(self._z) >= cfg.threshold_z:
            self._drift = True
            self.n_alarms += 1
            self._cooldown_left = cfg.cooldown

    def reset(self) -> None:
        """Forget the blocks (they were scored by the old calibration), clear
        ``drift_detected`` and start the cooldown; ``n_alarms`` is kept."""
        self._blocks.clear()
        self._o = self._e = self._v = 0.0
        self._n = 0
        self._z = 0.0
        self._drift = False
        self._cooldown_left = self.config.cooldown
