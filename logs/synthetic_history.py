"""The history world of :mod:`logs.synthetic` (``SyntheticConfig(history=True)``): what a
model can only learn from history, on top of the classic world's click model.

Three effects, drawn from their own ``default_rng([seed, 1])`` so the classic world and its
numbers are unchanged when ``history`` is off:

- *drifting taste*: each user has a favourite category, which changes to a random one with
  probability ``taste_drift`` at each of their requests; items of it get ``+taste_effect``
  in the logit, so the user's recent clicks reveal it;
- *popularity waves*: item ``j`` peaks at a random time ``tau_j`` (spread over the log and
  a little beyond); its logit gets ``popularity_wave * (exp(-((t - tau_j) / w)^2 / 2) -
  0.5)`` with ``w`` a sixth of the log's span, so recent item CTRs predict current ones;
- *fatigue*: each earlier unclicked exposure of the pair lowers the logit by ``fatigue``
  (drawn request by request, so ``true_p`` depends on the realised past clicks);
  recommenders show items again: each slot re-shows, with probability
  ``repeat_exposure``, one of the user's last 20 shown items.

:func:`history_plan` draws what is known before any click (and re-shows items in the
slates), :func:`add_history_terms` adds taste and waves to the logits, and
:func:`fatigued_clicks` draws the clicks request by request.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from logs.synthetic import SyntheticConfig

__all__ = ["HistoryPlan", "add_history_terms", "fatigued_clicks", "history_plan"]


@dataclass(frozen=True)
class HistoryPlan:
    """What the history world knows before any click."""

    favourite: np.ndarray  # (n_requests,) favourite category index of the request's user
    peak: np.ndarray  # (n_items,) popularity peak time of each item, epoch us
    width: float  # popularity wave width, us


def history_plan(
    c: SyntheticConfig,
    rng: np.random.Generator,
    n_categories: int,
    req_user: np.ndarray,
    req_ts_us: np.ndarray,
    slates: np.ndarray,
) -> HistoryPlan:
    """Draw each request's favourite category of its user (a slow random walk per user over
    ``n_categories``), each item's popularity peak time (epoch us) and the wave width (us);
    re-show items of the user's recent exposures in ``slates`` (n_requests, slate_size) in
    place. ``req_user`` (n_requests,) are user indices, ``req_ts_us`` (n_requests,) the
    request times in epoch us."""
    n_req, s = slates.shape
    favourite = np.empty(n_req, dtype=np.int64)
    fav_now = np.asarray(rng.integers(n_categories, size=c.n_users))
    change = np.asarray(rng.random(n_req) < c.taste_drift)
    new_fav = np.asarray(rng.integers(n_categories, size=n_req))
    n_repeat = np.asarray(rng.binomial(s, c.repeat_exposure, size=n_req))
    shown: dict[int, deque[int]] = {}
    for r in range(n_req):
        u = int(req_user[r])
        if change[r]:
            fav_now[u] = new_fav[r]
        favourite[r] = fav_now[u]
        recent = shown.get(u)
        if recent is None:
            recent = shown[u] = deque(maxlen=20)
        if n_repeat[r] and recent:
            pool = list(dict.fromkeys(recent))
            k = min(int(n_repeat[r]), len(pool))
            again = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
            rest = [int(i) for i in slates[r] if int(i) not in again]
            slates[r] = (again + rest)[:s]
        recent.extend(int(i) for i in slates[r])
    span = float(req_ts_us[-1] - req_ts_us[0]) or 1.0
    peak = req_ts_us[0] + rng.uniform(-0.2, 1.2, size=c.n_items) * span
    return HistoryPlan(favourite, peak, span / 6.0)


def add_history_terms(
    c: SyntheticConfig,
    plan: HistoryPlan,
    logit: np.ndarray,
    category: np.ndarray,
    item: np.ndarray,
    req: np.ndarray,
    ts_us: np.ndarray,
) -> np.ndarray:
    """``logit`` (n,) plus the taste term (``+taste_effect`` where the row's item
    ``category`` is its user's favourite) and then the popularity wave of the row's
    ``item`` at ``ts_us`` (epoch us); ``req`` (n,) is each row's request index."""
    logit = logit + c.taste_effect * (category == plan.favourite[req])
    logit = logit + c.popularity_wave * (
        np.exp(-0.5 * ((ts_us - plan.peak[item]) / plan.width) ** 2) - 0.5
    )
    return logit


def fatigued_clicks(
    c: SyntheticConfig,
    uniform: np.ndarray,
    logit: np.ndarray,
    scale: np.ndarray,
    true_p: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    req: np.ndarray,
) -> np.ndarray:
    """Draw clicks (n,) 0/1 in request order: ``true_p = min(sigmoid(logit - fatigue * k) *
    scale, 0.99)`` with ``k`` the pair's unclicked exposures in earlier requests (``true_p``
    is updated in place where ``k > 0``); ``uniform`` (n,) are the draws in [0, 1)."""
    n = len(logit)
    click = np.zeros(n, dtype=np.int64)
    unclicked: dict[tuple[int, int], int] = {}
    start = 0
    while start < n:  # one request (same ts) at a time
        end = start
        while end < n and req[end] == req[start]:
            end += 1
        for j in range(start, end):
            k = unclicked.get((int(user[j]), int(item[j])), 0)
            if k:
                p = scale[j] / (1.0 + math.exp(-(logit[j] - c.fatigue * k)))
                true_p[j] = min(p, 0.99)
            click[j] = uniform[j] < true_p[j]
        for j in range(start, end):
            if not click[j]:
                key = (int(user[j]), int(item[j]))
                unclicked[key] = unclicked.get(key, 0) + 1
        start = end
    return click
