"""Training on streams with delayed clicks: fake negatives, FNW and FNC.

A click can arrive long after its impression. The joiner (:mod:`stream.join`) offers two
labelling schemes, ``JoinConfig.delayed_feedback``:

* ``"window"``: wait the attribution window ``W`` before labelling. Labels are correct
  for "click within ``W``" but arrive ``W`` late; a click later than ``W`` is lost, so a
  short ``W`` (fresher labels) under-counts clicks and biases the model low.
* ``"fake_negative"`` (Ktena et al., "Addressing Delayed Feedback for Continuous Training
  with Neural Networks in CTR prediction", RecSys 2019): every impression is trained on at
  once as a negative, and again as a positive when (if) its click arrives. Labels are
  immediate and no click within ``W`` is lost, but the stream is biased: an impression of
  true CTR ``p`` yields one negative and, with probability ``p``, one positive, so the
  stream's label-1 rate is ``b = p / (1 + p)`` and plain BCE converges to ``b``. Two fixes:

  - **FNW** (fake-negative weighting), loss ``"fnw"``
    (:func:`learners.losses.fnw_loss_with_logits`): importance weights ``1 + f`` on
    positives and ``(1 - f)(1 + f)`` on negatives (``f`` the model's own prediction, no
    gradient through it) make the expected gradient vanish at ``f = p``.
  - **FNC** (fake-negative calibration): train plain BCE, which learns ``b``, and serve
    ``p = b / (1 - b)`` (:func:`fnc_correct`, the inverse of ``b = p / (1 + p)``). It is
    one of the ranker's output links (:mod:`learners.links`, ``RankerConfig.fnc``) and is
    importable from here.

:func:`check_loss_for_scheme` rejects the combinations that train a biased model; the
stream layer calls it on its settings.

>>> b = fake_negative_rate([0.0, 0.04, 0.5, 1.0])
>>> b.round(4).tolist()
[0.0, 0.0385, 0.3333, 0.5]
>>> fnc_correct(b).round(4).tolist()
[0.0, 0.04, 0.5, 1.0]
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from learners.links import fnc_correct
from learners.losses import LOSSES

__all__ = [
    "DELAYED_FEEDBACK_LOSS",
    "SCHEMES",
    "check_loss_for_scheme",
    "fake_negative_rate",
    "fnc_correct",
]

SCHEMES = ("window", "fake_negative")
"""Labelling schemes, the values of ``stream.join.JoinConfig.delayed_feedback``."""

DELAYED_FEEDBACK_LOSS: dict[str, str | None] = {"window": None, "fake_negative": "fnw"}
"""The loss to train each scheme with: ``None`` is any loss but ``"fnw"``; on
``"fake_negative"``, ``"bce"`` is the alternative when the scores go through
:func:`fnc_correct` (see :func:`check_loss_for_scheme`)."""


def fake_negative_rate(p: npt.ArrayLike) -> np.ndarray:
    """Label-1 rate of the fake-negative stream, ``b = p / (1 + p)``, float64 in [0, 1/2].

    ``p``: true click probabilities in [0, 1], any shape; the result has the same shape.
    """
    pa = np.asarray(p, dtype=np.float64)
    return pa / (1.0 + pa)


def check_loss_for_scheme(scheme: str, loss: str, *, fnc: bool = False) -> None:
    """Raise ValueError unless ranker loss ``loss`` trains calibrated on ``scheme``.

    ``scheme``: one of :data:`SCHEMES`; ``loss``: a key of :data:`learners.losses.LOSSES`;
    ``fnc``: whether served scores go through :func:`fnc_correct`.

    * ``"fake_negative"``: ``"fnw"`` (without FNC), or ``"bce"`` with ``fnc=True``.
    * ``"window"``: any loss but ``"fnw"``, and no FNC (both assume fake negatives).

    >>> check_loss_for_scheme("fake_negative", "fnw")
    >>> check_loss_for_scheme("fake_negative", "bce", fnc=True)
    >>> check_loss_for_scheme("fake_negative", "bce")
    Traceback (most recent call last):
    ...
    ValueError: delayed_feedback='fake_negative' with loss 'bce' learns p / (1 + p), not the CTR: use loss 'fnw', or keep 'bce' and correct the scores with FNC (fnc_correct)
    """  # noqa: E501 - a doctest's expected output is one line
    if scheme not in SCHEMES:
        raise ValueError(f"unknown delayed_feedback scheme {scheme!r}; expected one of {SCHEMES}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {tuple(LOSSES)}")
    if scheme == "window":
        if loss == "fnw":
            raise ValueError(
                "loss 'fnw' assumes the fake-negative stream (every impression also sent as "
                "a negative); with delayed_feedback='window' it over-predicts: use "
                "delayed_feedback='fake_negative' or another loss"
            )
        if fnc:
            raise ValueError(
                "FNC (fnc_correct) inverts the fake-negative bias, which "
                "delayed_feedback='window' does not have: turn it off"
            )
        return
    if loss == "fnw":
        if fnc:
            raise ValueError(
                "loss 'fnw' already learns the CTR on the fake-negative stream; FNC "
                "(fnc_correct) on top of it would correct twice: turn FNC off"
            )
        return
    if loss == "bce" and fnc:
        return
    if loss == "bce":
        raise ValueError(
            "delayed_feedback='fake_negative' with loss 'bce' learns p / (1 + p), not the CTR: "
            "use loss 'fnw', or keep 'bce' and correct the scores with FNC (fnc_correct)"
        )
    raise ValueError(
        f"delayed_feedback='fake_negative' needs loss 'fnw' (or 'bce' with FNC); loss "
        f"{loss!r} has no correction for the fake negatives"
    )
