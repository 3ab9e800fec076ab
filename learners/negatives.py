"""Negative sampling for the two-tower model (:class:`learners.two_tower.TwoTowerModel`):
what a training step scores a click against besides the other clicks of its batch, and
the logQ correction that keeps the sampled softmax unbiased.

* **Hard negatives** (:func:`draw_hard`): items ranked high for the user but not clicked,
  asked of a :data:`HardNegativeSource` (e.g. :meth:`index.hard_negatives.HardNegativePool.sample`);
  their share of a row's negatives follows a linear curriculum (:func:`target_hard_share`).
* **Uniform negatives** (:func:`draw_uniform`): items drawn uniformly from every item the
  model has seen shown (mixed negative sampling, Yang et al. 2020: in-batch negatives are
  only ever clicked items, so an item shown but never clicked would never be scored down).
* **logQ correction** (:func:`log_inclusion`, Yi et al. 2019): the log of the probability
  that an item is among a step's negatives, subtracted from its logit.

Plain functions over lists and arrays, called once per training step (never per example).

Example:

>>> draw_uniform(["a", "b", "c", "d"], 2, seed=0, step=0, taken={"a"}) == draw_uniform(
...     ["a", "b", "c", "d"], 2, seed=0, step=0, taken={"a"})
True
>>> target_hard_share(0.5, ramp_examples=1_000, n_examples=250)
0.125
>>> log_inclusion(np.array([0.5]), n_rows=1, n_uniform=0, n_remembered=10)  # log q
array([-0.69314718])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "HardNegativeSource",
    "draw_hard",
    "draw_uniform",
    "log_inclusion",
    "target_hard_share",
]

HardNegativeSource = Callable[[str, int], list[str]]
"""``hard_negatives(user_id, n) -> up to n item ids`` ranked high for the user, not clicked."""


def target_hard_share(max_hard_share: float, ramp_examples: int, n_examples: int) -> float:
    """The curriculum's hard-negative share after ``n_examples`` clicks: linear from 0 to
    ``max_hard_share`` over ``ramp_examples`` clicks, then capped (no ramp when 0)."""
    if ramp_examples == 0:
        return max_hard_share
    return max_hard_share * min(1.0, n_examples / ramp_examples)


def draw_hard(
    source: HardNegativeSource | None,
    users: list[str | None],
    n_random: int,
    batch_items: set[str],
    share: float,
    n_hard: int,
) -> tuple[list[str], list[int]]:
    """Hard negatives for one step and the row that asked for each one.

    At most ``floor(share / (1 - share) * n_random)`` of them, so that hard / (hard +
    random) never exceeds ``share``; at most ``n_hard`` per click; items already in the
    batch (``batch_items``: they are in-batch negatives already) or drawn for an earlier row
    are dropped; rows without a user ask for none.
    """
    if source is None or share <= 0.0 or n_random <= 0 or n_hard == 0:
        return [], []
    budget = min(math.floor(share / (1.0 - share) * n_random + 1e-9), n_hard * len(users))
    if budget <= 0:
        return [], []
    per_row = min(n_hard, -(-budget // len(users)))
    items: list[str] = []
    owners: list[int] = []
    taken: set[str] = set()
    for row, user in enumerate(users):
        if len(items) >= budget:
            break
        if user is None:
            continue
        for item in source(user, min(per_row, budget - len(items))):
            item = str(item)
            if item in batch_items or item in taken:
                continue
            taken.add(item)
            items.append(item)
            owners.append(row)
    return items[:budget], owners[:budget]


def draw_uniform(
    catalogue: Sequence[str], n: int, seed: int, step: int, taken: set[str]
) -> list[str]:
    """Up to ``n`` distinct items of ``catalogue``, uniformly, none in ``taken``; seeded by
    ``(seed, step)``, so a reloaded model at the same step draws the same ones."""
    size = len(catalogue)
    if n == 0 or size == 0:
        return []
    rng = np.random.default_rng((seed, step))
    picks = rng.choice(size, min(n, size), replace=False)
    return [it for it in (catalogue[int(i)] for i in picks) if it not in taken]


def log_inclusion(q: np.ndarray, n_rows: int, n_uniform: int, n_remembered: int) -> np.ndarray:
    """(N,) float64 log of the probability that each item is among a step's negatives, each
    listed once: in the batch (``n_rows`` clicks drawn in proportion to click share ``q``,
    (N,) in [0, 1]) or among the ``n_uniform`` uniform draws from the ``M = n_remembered``
    items, ``pi = 1 - (1 - q)^n_rows (1 - n_uniform / M)``. Subtracting ``log pi`` makes the
    sampled partition sum an unbiased estimate of the full one; for rare items and no
    uniform draws it is ``log q`` plus a constant (the softmax ignores the constant), and
    when the draws cover the catalogue it is 0: the full softmax."""
    miss_uniform = 1.0 - min(1.0, n_uniform / max(n_remembered, 1))
    if miss_uniform <= 0.0:
        return np.zeros(len(q), dtype=np.float64)
    log_miss = n_rows * np.log1p(-np.minimum(q, 1.0 - 1e-12)) + math.log(miss_uniform)
    return np.log(-np.expm1(log_miss))
