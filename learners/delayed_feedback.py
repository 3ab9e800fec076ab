"""Training on streams with delayed clicks: fake negatives, FNW and FNC, and DFM.

A click can arrive long after its impression. The joiner (:mod:`stream.join`) offers three
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

* ``"dfm"`` (Chapelle, "Modeling Delayed Feedback in Display Advertising", KDD 2014): a
  click is trained on at click time as a positive with its delay ``d``; an impression
  still unclicked after the observation time ``T`` (``JoinConfig.dfm_observe_s``) is
  trained on once as "not clicked after ``e = T``". Each impression is one record, its
  observation censored at ``T``; the loss ``"dfm"`` (:func:`learners.losses.dfm_loss`)
  models the delay as Exponential(``lambda(x)``) with a delay head on the ranker, so the
  clicks still to come after ``T`` are accounted for (``p (1 - e^(-lambda T))`` is what
  the labels show, ``p`` what is learnt and served). A click after its impression was
  released unclicked is counted (late) and sent with weight 0: the monitor sees the final
  label, the model is not trained on it again (its censored record already has the
  likelihood of "no click by ``T``"; a second record would count the impression twice).

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

SCHEMES = ("window", "fake_negative", "dfm")
"""Labelling schemes, the values of ``stream.join.JoinConfig.delayed_feedback``."""

DELAYED_FEEDBACK_LOSS: dict[str, str | None] = {
    "window": None,
    "fake_negative": "fnw",
    "dfm": "dfm",
}
"""The loss to train each scheme with: ``None`` is any loss but ``"fnw"`` and ``"dfm"``; on
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
    * ``"window"``: any loss but ``"fnw"`` and ``"dfm"``, and no FNC (FNW and FNC assume
      fake negatives).
    * ``"dfm"``: loss ``"dfm"`` only, without FNC; and ``"dfm"`` on no other scheme (it
      needs the censored records and their elapsed times).

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
    if scheme == "dfm":
        if loss != "dfm":
            raise ValueError(
                f"delayed_feedback='dfm' releases unclicked impressions after "
                f"join.dfm_observe_s, before all their clicks: loss {loss!r} would learn "
                "the clicks seen so far, not the CTR; use loss 'dfm' (the delay model)"
            )
        if fnc:
            raise ValueError(
                "FNC (fnc_correct) inverts the fake-negative bias, which "
                "delayed_feedback='dfm' does not have: turn it off"
            )
        return
    if loss == "dfm":
        raise ValueError(
            f"loss 'dfm' needs delayed_feedback='dfm' (censored records with their elapsed "
            f"times); with delayed_feedback={scheme!r} use "
            f"{'fnw' if scheme == 'fake_negative' else 'bce'!r} or set delayed_feedback='dfm'"
        )
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
