"""Pointwise CTR losses. They take LOGITS (never probabilities) and reduce like torch.

All functions accept ``logits``: float ``(B,)``, ``targets``: ``(B,)`` in {0, 1} (soft
targets in [0, 1] also work), optional ``weights``: ``(B,)`` per-example weights, and
``reduction`` in ``{"mean", "sum", "none"}``. ``"mean"`` is the plain mean of the weighted
per-example losses (as ``torch.nn.functional.binary_cross_entropy_with_logits`` does with
``weight=``), not a weight-normalised mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "bce_with_logits", "focal_loss_with_logits"]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def bce_with_logits(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Binary cross-entropy on logits, in nats.

    Example:
        >>> loss = bce_with_logits(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
        >>> round(float(loss), 4)
        1.41
    """
    per = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return _reduce(per, weights, reduction)


def focal_loss_with_logits(
    logits: Tensor,
    targets: Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log(p_t)`` on logits.

    ``p_t`` is the predicted probability of the true class. ``alpha`` (when given) weights
    positives by ``alpha`` and negatives by ``1 - alpha``. ``gamma=0, alpha=None`` is BCE.

    Example:
        >>> x, t = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
        >>> bool(torch.isclose(focal_loss_with_logits(x, t, gamma=0.0), bce_with_logits(x, t)))
        True
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    t = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    if gamma != 0:
        p = torch.sigmoid(logits)
        p_t = p * t + (1 - p) * (1 - t)
        ce = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        ce = ce * (alpha * t + (1 - alpha) * (1 - t))
    return _reduce(ce, weights, reduction)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "bce": bce_with_logits,
    "focal": focal_loss_with_logits,
}
