"""Output corrections for losses whose minimiser is not the click probability.

A pointwise loss ``L(y, q)`` trained to convergence outputs, for an example whose true click
probability is ``p``, the ``q`` minimising the expected loss ``p L(1, q) + (1 - p) L(0, q)``.
For BCE that ``q`` is ``p`` itself. For two of the ranker losses it is not, and the raw
``sigmoid(logit)`` is miscalibrated in a known way:

- ``focal`` (Lin et al. 2017) down-weights confident examples by ``(1 - p_t)^gamma``. Its
  minimiser is pulled towards 1/2 (under-confident): at a CTR of 5% and ``gamma=2`` the raw
  output is about 0.24, a calibration ratio near 4.6 (``bench/results/quality.json``).
  Setting the derivative of the expected loss to zero and solving for ``p`` gives the
  inverse in closed form (cf. Charoenphakdee et al., "Focal loss for classification:
  calibration", 2021), here in logit space with ``x`` the raw logit::

      logit(p) = (gamma - 1) x + log(e^x + gamma softplus(x))
                 - log(e^-x + gamma softplus(-x)) + log((1 - alpha) / alpha)

  (the last term only when ``alpha`` is set). It is strictly increasing in ``x``, so the
  ranking (AUC) is unchanged; ``gamma = 0, alpha = None`` is the identity.
- ``weighted_bce`` with ``pos_weight = k`` learns the odds ``k p / (1 - p)``:
  ``logit(p) = x - log k``.

:func:`calibrated_logits` applies the correction for a loss name and its parameters; the
ranker applies it to its outputs (``RankerConfig.loss_correction``).

One more output link does not come from the loss but from the labels: plain BCE on the
fake-negative stream (:mod:`learners.delayed_feedback`) learns ``b = p / (1 + p)``, and
**FNC** serves ``p = b / (1 - b)`` (:func:`fnc_correct`). It is applied in probability
space, after ``sigmoid`` of the (loss-corrected) logit, so that the ranker's scores are
exactly (bit for bit) ``fnc_correct`` of its uncorrected ones; the ranker applies it to
its outputs when ``RankerConfig.fnc`` is set (the stream layer sets it from
``trainer.fnc``). The model itself still learns ``b``: the link changes no training step.

Example:
    >>> x = np.array([-3.0, 0.0, 2.0])
    >>> np.allclose(calibrated_logits(x, "bce"), x)
    True
    >>> np.round(calibrated_logits(x, "weighted_bce", pos_weight=np.e), 6).tolist()
    [-4.0, -1.0, 1.0]
    >>> bool(np.all(np.diff(calibrated_logits(x, "focal", gamma=2.0)) > 0))  # monotone
    True
    >>> fnc_correct([0.2, 0.25, 0.5]).tolist()  # b -> b / (1 - b), 1 from b = 1/2 on
    [0.25, 0.3333333333333333, 1.0]
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["CORRECTED_LOSSES", "calibrated_logits", "fnc_correct", "focal_calibrated_logits"]

CORRECTED_LOSSES = ("focal", "weighted_bce")
"""Losses :func:`calibrated_logits` changes; every other loss maps logits to themselves."""

# Beyond |x| = 40 sigmoid is 0 or 1 in float64 anyway; clipping keeps exp() finite.
_CLIP = 40.0


def _log_softplus(x: np.ndarray) -> np.ndarray:
    """``log(softplus(x))``, accurate for very negative ``x`` (where softplus(x) ~ e^x)."""
    sp = np.logaddexp(0.0, x)
    with np.errstate(divide="ignore"):
        out = np.log(sp)
    return np.where(x < -30.0, x, out)


def focal_calibrated_logits(
    logits: np.ndarray, gamma: float = 2.0, alpha: float | None = None
) -> np.ndarray:
    """Raw logits ``(B,)`` of a focal-loss model -> logits of the implied click probability.

    The inverse of the focal loss's population minimiser (see the module docstring);
    float64 ``(B,)``. ``gamma >= 0``; ``alpha`` in ``(0, 1)`` or None.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    x = np.clip(np.asarray(logits, dtype=np.float64), -_CLIP, _CLIP)
    if gamma == 0:
        out = x.copy()
    else:
        log_g = math.log(gamma)
        pos = np.logaddexp(x, log_g + _log_softplus(x))  # log(e^x + g softplus(x))
        neg = np.logaddexp(-x, log_g + _log_softplus(-x))  # log(e^-x + g softplus(-x))
        out = (gamma - 1.0) * x + pos - neg
    if alpha is not None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) for the correction, got {alpha}")
        out = out + math.log((1.0 - alpha) / alpha)
    return out


def calibrated_logits(logits: np.ndarray, loss: str, **params: float | None) -> np.ndarray:
    """Logits ``(B,)`` of P(click) for a model trained with ``loss`` (a ``LOSSES`` name).

    ``params`` are the loss's keyword parameters (``focal``: ``gamma``, ``alpha``;
    ``weighted_bce``: ``pos_weight``); losses outside :data:`CORRECTED_LOSSES` return the
    logits unchanged. float64 ``(B,)``.
    """
    x = np.asarray(logits, dtype=np.float64)
    if loss == "focal":
        gamma = params.get("gamma")
        return focal_calibrated_logits(x, 2.0 if gamma is None else gamma, params.get("alpha"))
    if loss == "weighted_bce":
        k = params.get("pos_weight")
        return x - math.log(1.0 if k is None else k)
    return x


def fnc_correct(p_biased: npt.ArrayLike) -> np.ndarray:
    """Fake-negative calibration: ``p = b / (1 - b)`` clipped to [0, 1], float64.

    ``p_biased``: ``b``, the probabilities of a model trained with plain BCE on the
    fake-negative stream, in [0, 1], any shape (same shape out). It inverts
    :func:`learners.delayed_feedback.fake_negative_rate`. ``b >= 1/2`` means ``p >= 1``
    and maps to 1 (a model that has not converged can output it); NaN stays NaN.

    >>> fnc_correct([0.2, 0.5, 0.9]).tolist()
    [0.25, 1.0, 1.0]
    """
    b = np.asarray(p_biased, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = b / (1.0 - b)
    p = np.where(b >= 0.5, 1.0, p)  # also b == 1 (0 / 0 would be NaN)
    return np.clip(p, 0.0, 1.0)
