"""CTR and retrieval losses. They take LOGITS/SCORES (never probabilities) and reduce like torch.

Pointwise losses accept ``logits``: float ``(B,)``, ``targets``: ``(B,)`` in {0, 1} (soft
targets in [0, 1] also work), optional ``weights``: ``(B,)`` per-example weights, and
``reduction`` in ``{"mean", "sum", "none"}``. ``"mean"`` is the plain mean of the weighted
per-example losses (as ``torch.nn.functional.binary_cross_entropy_with_logits`` does with
``weight=``), not a weight-normalised mean.

Pairwise losses (:func:`ranknet_loss`, :func:`combined_pair_loss`) compare examples WITHIN
the batch; their ``"none"`` output is per pair, not per example (see each docstring).
Non-finite targets or weights make every ranker loss NaN, as they make BCE NaN, so that a
caller can detect the batch and skip it.

:data:`LOSSES` registers the losses the ranker can train with, under one signature
``(logits, targets, weights=None, reduction="mean", *, <extra params with defaults>)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "RankerLoss",
    "bce_with_logits",
    "bpr_loss",
    "combined_pair_loss",
    "dfm_loss",
    "fnw_loss_with_logits",
    "focal_loss_with_logits",
    "info_nce_loss",
    "ranknet_loss",
    "sampled_softmax_loss",
    "weighted_bce_with_logits",
]

_REDUCTIONS = ("mean", "sum", "none")


class RankerLoss(Protocol):
    """The registry signature: ``logits``: (B,), ``targets``: (B,), ``weights``: (B,) | None."""

    def __call__(
        self,
        logits: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor: ...


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    _check_reduction(reduction)
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _nan_if_not_finite(logits: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
    """Scalar 0, or NaN when any target or weight is non-finite (0 * inf and 0 * nan are NaN).

    Pairwise losses select pairs by comparing targets, which silently drops NaN labels;
    adding this keeps them as detectable as in BCE.
    """
    guard = targets.to(logits.dtype).sum() * 0.0
    if weights is not None:
        guard = guard + weights.to(logits.dtype).sum() * 0.0
    return guard


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


def weighted_bce_with_logits(
    logits: Tensor,
    targets: Tensor,
    pos_weight: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """BCE with the positive term scaled: ``-(pos_weight t log p + (1 - t) log(1 - p))``.

    ``logits``: (B,) float, ``targets``: (B,) in [0, 1], ``pos_weight`` > 0 (e.g. the
    negative:positive ratio to rebalance sparse clicks; it biases probabilities upward, so
    recalibrate). ``pos_weight=1`` is :func:`bce_with_logits`.

    Example:
        >>> x, t = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
        >>> bool(torch.isclose(weighted_bce_with_logits(x, t), bce_with_logits(x, t)))
        True
        >>> round(float(weighted_bce_with_logits(x, t, pos_weight=3.0, reduction="sum")), 4)
        4.2064
    """
    if not pos_weight > 0:
        raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
    pw = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), pos_weight=pw, reduction="none"
    )
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


def fnw_loss_with_logits(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Fake-negative weighted BCE (FNW; Ktena et al., RecSys 2019), in nats.

    For the *fake-negative* stream (``JoinConfig(delayed_feedback="fake_negative")``): every
    impression is trained on at once as a negative, and again as a positive when its click
    arrives. That stream draws label 1 with probability ``b = p / (1 + p)`` where ``p`` is
    the true CTR, so plain BCE learns ``b``. FNW importance-weights each term by
    ``p(y|x) / b(y|x)``, with ``p`` replaced by the model's own ``f = sigmoid(logits)``
    treated as a constant (no gradient flows through the weights)::

        loss = -[ y (1 + f) log sigmoid(z) + (1 - y) (1 - f) (1 + f) log(1 - sigmoid(z)) ]

    The expected gradient under the fake-negative stream is ``(1 + f)(1 - f)(f - p)``, zero
    exactly at ``f = p``: the model is calibrated to the true CTR. On a stream WITHOUT fake
    negatives it over-predicts; see :func:`learners.delayed_feedback.check_loss_for_scheme`.

    ``logits``: (B,) float, ``targets``: (B,) in [0, 1], ``weights``: optional (B,)
    per-example weights; ``reduction`` as in :func:`bce_with_logits`.

    Example:
        >>> x, t = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
        >>> fnw_loss_with_logits(x, t, reduction="none")  # f = 1/2: weights 3/2 and 3/4
        tensor([1.0397, 0.5199])
    """
    t = targets.to(logits.dtype)
    f = torch.sigmoid(logits).detach()
    # softplus(-z) = -log sigmoid(z), softplus(z) = -log(1 - sigmoid(z)), stable for large |z|
    per = t * (1 + f) * F.softplus(-logits) + (1 - t) * (1 - f) * (1 + f) * F.softplus(logits)
    return _reduce(per, weights, reduction)


#: log-rates beyond +-30 (a mean delay 1e13 times the time unit or 1e-13 of it) are clamped
DFM_LOG_RATE_CLAMP = 30.0
#: the hazard ``lambda * e`` of an unclicked example is clamped here: exp(-50) is 0 already
DFM_MAX_HAZARD = 50.0


def dfm_loss(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
    *,
    log_rate: Tensor | None = None,
    elapsed: Tensor | None = None,
) -> Tensor:
    """Delayed-feedback model loss (Chapelle, "Modeling Delayed Feedback in Display
    Advertising", KDD 2014), in nats.

    The click probability is ``p = sigmoid(logits)``, the click delay is Exponential with
    rate ``lam = exp(log_rate)`` (per unit of ``elapsed``). Per example, with ``t`` the label
    and ``e = elapsed`` (the click delay ``d`` when ``t = 1``, the time the example has been
    observed without a click when ``t = 0``)::

        t = 1: -log p - log lam + lam d             (clicked after d)
        t = 0: -log(1 - p + p exp(-lam e))          (not clicked after e)

    computed as ``softplus(-z) - g + exp(g) d`` and
    ``-logaddexp(logsigmoid(-z), logsigmoid(z) - lam e)`` (``z`` the logit, ``g`` the
    log-rate clamped to +-:data:`DFM_LOG_RATE_CLAMP`, ``lam e`` clamped to
    :data:`DFM_MAX_HAZARD` in the unclicked term), finite for any finite inputs. An
    unclicked example with ``e = 0`` carries no information (loss 0); as ``e`` grows it
    tends to BCE's ``-log(1 - p)``.

    ``logits``, ``targets`` (0/1), ``weights``: (B,) as in :func:`bce_with_logits`;
    ``log_rate``: (B,) float, the delay head's output; ``elapsed``: (B,) float >= 0, in the
    time unit of the rate (the ranker passes seconds / ``RankerConfig.delay_scale_s``).
    ``elapsed=None`` means the labels are final (observed for ever): the loss is then BCE
    on ``p`` and the delay head is not involved (``log_rate`` may be None), so that a DFM
    model pretrains on a log's final labels like any other.

    Example:
        >>> z, g = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])  # p = 1/2, lam = 1
        >>> dfm_loss(z, torch.tensor([1.0, 0.0]), log_rate=g,
        ...          elapsed=torch.tensor([1.0, 0.0]), reduction="none")
        tensor([1.6931, 0.0000])
        >>> round(float(dfm_loss(z, torch.tensor([0.0, 0.0]), log_rate=g,
        ...                      elapsed=torch.tensor([1.0, 1.0]))), 4)  # -log(1/2 + e^-1/2)
        0.3799
    """
    if elapsed is None:
        return bce_with_logits(logits, targets, weights, reduction)
    if log_rate is None:
        raise ValueError("dfm_loss with elapsed times needs log_rate (the delay head's output)")
    t = targets.to(logits.dtype)
    e = elapsed.to(logits.dtype)
    g = log_rate.to(logits.dtype).clamp(-DFM_LOG_RATE_CLAMP, DFM_LOG_RATE_CLAMP)
    rate = torch.exp(g)
    clicked = F.softplus(-logits) - g + rate * e
    hazard = (rate * e).clamp(max=DFM_MAX_HAZARD)
    unclicked = -torch.logaddexp(F.logsigmoid(-logits), F.logsigmoid(logits) - hazard)
    per = t * clicked + (1 - t) * unclicked
    return _reduce(per, weights, reduction)


def ranknet_loss(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """RankNet (Burges et al. 2005) over all in-batch pairs: ``softplus(-(s_i - s_j))``.

    The pairs are all ``(i, j)`` with ``targets[i] > targets[j]``; for 0/1 labels, every
    (positive i, negative j) pair, ``P = n_pos * n_neg`` of them. A pair's weight is
    ``weights[i] * weights[j]``. ``"mean"`` averages the ``P`` weighted pair losses,
    ``"sum"`` adds them, ``"none"`` returns them, ``(P,)``, in row-major order of ``(i, j)``.
    With no pairs (a batch of one class) the loss is 0 (``"none"``: shape ``(0,)``) and still
    has a graph to the logits, so ``backward()`` works and gives zero gradients.

    Memory is ``O(B^2)``: the pair matrix is ``(B, B)``.

    Example:
        >>> s, t = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
        >>> ranknet_loss(s, t, reduction="none")  # pairs (0, 1) and (0, 2)
        tensor([0.1269, 0.3133])
        >>> float(ranknet_loss(s, torch.zeros(3)))
        0.0
    """
    _check_reduction(reduction)
    t = targets.to(logits.dtype)
    pair = t[:, None] > t[None, :]  # (B, B): i preferred over j
    per = F.softplus(-(logits[:, None] - logits[None, :]))  # (B, B)
    if weights is not None:
        w = weights.to(logits.dtype)
        per = per * (w[:, None] * w[None, :])
    per = per[pair]  # (P,)
    per = per + _nan_if_not_finite(logits, targets, weights)
    if reduction == "none":
        return per
    total = per.sum() + logits.sum() * 0.0  # the graph survives P == 0
    if reduction == "sum":
        return total
    return total / max(int(per.shape[0]), 1)


def combined_pair_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Combined-Pair loss: ``alpha * BCE + (1 - alpha) * RankNet`` within the batch.

    From Shi et al., KDD'24, "Understanding the Ranking Loss for Recommendation with Sparse
    User Feedback": with sparse positives the BCE gradient of a negative's logit is
    ``sigmoid(s_j)``, tiny when CTR is small (gradient vanishing); the RankNet term gives each
    negative ``sigmoid(s_j - s_i)`` per pair, about 1/2 while scores are close, and so larger
    updates, while BCE keeps the outputs calibrated. ``alpha`` in [0, 1]; ``alpha=1`` is BCE,
    ``alpha=0`` is RankNet.

    Each term reduces as its own function does (``"mean"``: BCE over ``B`` examples plus
    RankNet over ``P`` pairs). ``reduction="none"`` is rejected: the terms are per example
    and per pair.

    Example:
        >>> s, t = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
        >>> bool(torch.isclose(combined_pair_loss(s, t, alpha=1.0), bce_with_logits(s, t)))
        True
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if reduction == "none":
        raise ValueError(
            "combined_pair_loss mixes per-example and per-pair terms; "
            "reduction must be 'mean' or 'sum'"
        )
    pointwise = bce_with_logits(logits, targets, weights=weights, reduction=reduction)
    pairwise = ranknet_loss(logits, targets, weights=weights, reduction=reduction)
    return alpha * pointwise + (1.0 - alpha) * pairwise


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor, reduction: str = "mean") -> Tensor:
    """Bayesian personalised ranking (Rendle et al. 2009): ``-log sigmoid(pos - neg)``.

    ``pos_scores``: (B,) float; ``neg_scores``: (B,) or (B, K) float, K negatives per
    positive. ``"none"`` returns the shape of ``neg_scores``; ``"mean"`` averages over all
    ``B`` (or ``B * K``) terms.

    Example:
        >>> round(float(bpr_loss(torch.tensor([1.0]), torch.tensor([[1.0, 1.0]]))), 4)  # log 2
        0.6931
    """
    _check_reduction(reduction)
    if neg_scores.dim() == 2:
        diff = pos_scores[:, None] - neg_scores
    elif neg_scores.dim() == 1:
        diff = pos_scores - neg_scores
    else:
        raise ValueError(f"neg_scores must be (B,) or (B, K), got {tuple(neg_scores.shape)}")
    return _reduce(F.softplus(-diff), None, reduction)


def info_nce_loss(
    query: Tensor, keys: Tensor, temperature: float = 0.1, reduction: str = "mean"
) -> Tensor:
    """In-batch softmax (InfoNCE): row ``b`` of ``keys`` is query ``b``'s positive.

    ``query``, ``keys``: (B, D) float; logits ``query @ keys.T / temperature`` (B, B), the
    other rows are negatives. Per row: ``-log softmax(logits)[b, b]``; ``"none"`` gives (B,).
    Vectors are used as given; L2-normalise them first for a cosine similarity.

    Example:
        >>> q = torch.eye(2)
        >>> bool(info_nce_loss(q, q, temperature=0.1) < info_nce_loss(q, q.flip(0)))
        True
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_reduction(reduction)
    logits = query @ keys.T / temperature  # (B, B)
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def sampled_softmax_loss(
    query: Tensor,
    pos_keys: Tensor,
    neg_keys: Tensor,
    log_q_pos: Tensor,
    log_q_neg: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
    exclude: Tensor | None = None,
) -> Tensor:
    """Sampled softmax with the logQ correction (Yi et al. 2019, RecSys).

    ``query``, ``pos_keys``: (B, D); ``neg_keys``: (N, D) negatives shared by every query;
    ``log_q_pos``: (B,), ``log_q_neg``: (N,) natural-log probabilities that each item is
    sampled (e.g. log of its in-batch frequency). The logits ``(B, 1 + N)`` are
    ``<query, key> / temperature - log_q``, the positive at index 0; per row the loss is
    cross-entropy towards index 0 (``"none"``: (B,)). The correction removes the bias towards
    popular items that sampling negatives in proportion to ``q`` otherwise causes.
    ``exclude``: optional (B, N) bool, True where a negative must not count for that row
    (an accidental hit: the negative is the row's own positive item); None keeps them all.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> k_pos, k_neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
        >>> # the same score, but the negative is sampled 4x as often: the correction favours
        >>> # the positive, so the loss is below log 2.
        >>> loss = sampled_softmax_loss(q, k_pos, k_neg, torch.log(torch.tensor([0.1])),
        ...                             torch.log(torch.tensor([0.4])))
        >>> round(float(loss), 4)
        0.2231
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_reduction(reduction)
    pos = (query * pos_keys).sum(-1) / temperature - log_q_pos.to(query.dtype)  # (B,)
    neg = query @ neg_keys.T / temperature - log_q_neg.to(query.dtype)[None, :]  # (B, N)
    if exclude is not None:
        if exclude.shape != neg.shape:
            raise ValueError(
                f"exclude must have shape {tuple(neg.shape)}, got {tuple(exclude.shape)}"
            )
        neg = neg.masked_fill(exclude, float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


# -- registry: one signature; extra parameters are keyword-only with defaults ---------------
def _weighted_bce_entry(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
    *,
    pos_weight: float = 1.0,
) -> Tensor:
    return weighted_bce_with_logits(logits, targets, pos_weight, weights, reduction)


def _focal_entry(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
) -> Tensor:
    return focal_loss_with_logits(logits, targets, gamma, alpha, weights, reduction)


def _combined_pair_entry(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
    *,
    alpha: float = 0.5,
) -> Tensor:
    return combined_pair_loss(logits, targets, alpha, weights, reduction)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "bce": bce_with_logits,
    "weighted_bce": _weighted_bce_entry,
    "focal": _focal_entry,
    "ranknet": ranknet_loss,
    "combined_pair": _combined_pair_entry,
    "fnw": fnw_loss_with_logits,
    "dfm": dfm_loss,
}
"""Ranker losses: ``LOSSES[name](logits, targets, weights=None, reduction="mean")``.

Extra parameters are keyword-only with defaults (``weighted_bce``: ``pos_weight``;
``focal``: ``gamma``, ``alpha``; ``combined_pair``: ``alpha``; ``dfm``: ``log_rate``,
``elapsed``, per batch), so ``functools.partial(LOSSES[name], **params)`` keeps the common
signature. ``fnw`` is for the fake-negative stream only, ``dfm`` for the ``"dfm"`` scheme
(or final labels, where it is BCE); see :mod:`learners.delayed_feedback`.
"""
