"""Per-example sample weights for training.

:func:`time_decay_weights` makes older history weigh less, exponentially in its age: used by
``logs.offline.pretrain(half_life_s=...)`` and the streaming trainer
(``TrainerConfig.time_decay_half_life_s``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["time_decay_weights"]


def time_decay_weights(ts: np.ndarray, now: float, half_life_s: float) -> np.ndarray:
    """``0.5 ** (age / half_life_s)`` with ``age = max(now - ts, 0)``: float64 ``(B,)`` in (0, 1].

    ``ts``: ``(B,)`` event times, epoch seconds; ``now``: epoch seconds (e.g. the newest
    ``ts``); ``half_life_s``: seconds, positive and finite. An example at ``now`` (or later)
    weighs 1, one ``half_life_s`` older weighs 1/2. Weights are floored at the smallest
    normal float64, never 0, so a very old example still counts (and never divides to NaN).

    Example:
        >>> time_decay_weights(np.array([100.0, 90.0, 80.0, 110.0]), now=100.0, half_life_s=10.0)
        array([1.  , 0.5 , 0.25, 1.  ])
    """
    if not (math.isfinite(half_life_s) and half_life_s > 0):
        raise ValueError(f"half_life_s must be a positive finite number, got {half_life_s}")
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now}")
    age = np.maximum(float(now) - np.asarray(ts, dtype=np.float64), 0.0)
    w = np.exp2(-age / half_life_s)
    return np.maximum(w, np.finfo(np.float64).tiny)
