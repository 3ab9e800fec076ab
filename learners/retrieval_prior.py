"""Serving-time popularity prior for two-tower retrieval (the logQ correction, added back).

Trained with the sampled-softmax logQ correction (:mod:`learners.two_tower`), the logit
``<u, v> / temperature`` estimates ``log p(item | user) - log q(item)`` up to a constant: a
PMI-like score with popularity taken out. For retrieval recall the popularity is
standardly added back at query time (Yi et al. 2019 discuss the correction):

    score(u, i) = <u, v_i> / temperature + beta * log q(i)

where ``q(i)`` is the item's share of recent clicks, decayed by click count and known at
query time (:class:`DecayedClicks`, point-in-time: it holds only the clicks given to it,
in order). ``beta = 0`` is plain cosine retrieval; ``beta = 1`` undoes the correction in
full. In cosine units (what the index ranks by) the term is ``temperature * beta *
log q(i)`` (:func:`prior_bias`), and :func:`with_prior` folds it into the vectors so an
inner-product index (FAISS) ranks by the prior'd score exactly.

``beta`` and the half-life are picked on a validation split *inside* the training period
(:class:`ServingPrior`, used by :func:`learners.retrieval_eval.evaluate_retrieval`), never
on the test clicks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DecayedClicks", "ServingPrior", "prior_bias", "with_prior"]

_FLOOR = 0.5  # an item with fewer decayed clicks is scored as if it had this many


@dataclass(frozen=True)
class ServingPrior:
    """How :func:`learners.retrieval_eval.evaluate_retrieval` adds the popularity prior.

    Attributes:
        betas: the ``beta`` grid (each finite, >= 0; 0 = no prior, today's retrieval).
        half_lives: the grid of half-lives of :class:`DecayedClicks`, as fractions of the
            training period's clicks (each > 0; e.g. 0.05 = a click counts half after 5% of
            the training clicks). The decayed ``popularity_decayed`` reference row picks
            its half-life from the same grid on the same validation split.
        validation_fraction: the last share of the training period (in (0, 1)) whose clicks
            pick ``beta`` and the half-life; the model has learned only the rows before it
            when they are scored, then learns them.
    """

    betas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    half_lives: tuple[float, ...] = (0.02, 0.05, 0.2, 1.0)
    validation_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not self.betas or any(not (math.isfinite(b) and b >= 0) for b in self.betas):
            raise ValueError(f"betas must be a non-empty tuple of finite values >= 0, got "
                             f"{self.betas}")  # fmt: skip
        if not self.half_lives or any(not (math.isfinite(h) and h > 0) for h in self.half_lives):
            raise ValueError(f"half_lives must be a non-empty tuple of positive finite values, "
                             f"got {self.half_lives}")  # fmt: skip
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "half_lives", tuple(float(h) for h in self.half_lives))


class DecayedClicks:
    """Point-in-time, exponentially decayed click counts per item.

    Each :meth:`update` adds its clicks in order; every click already counted is
    multiplied by ``0.5 ** (1 / half_life)`` per later click, so a click counts half after
    ``half_life`` more clicks. :meth:`log_q` reads only the clicks given so far: the counts
    never see the future of the stream they are fed from.

    Example:
        >>> c = DecayedClicks(half_life=1.0)
        >>> c.update(["a", "b", "b"])
        >>> {k: round(v, 3) for k, v in c.counts.items()}
        {'a': 0.25, 'b': 1.5}
        >>> [round(float(x), 3) for x in c.log_q(["b", "a", "new"])]
        [-0.154, -1.253, -1.253]
    """

    def __init__(self, half_life: float) -> None:
        if not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be a positive finite number, got {half_life}")
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self._scale = 1.0  # counts are stored multiplied by 1 / decay ** clicks (rescaled)
        self._raw: dict[str, float] = {}
        self._sum = 0.0  # sum of self._raw, kept as clicks arrive (log_q is O(N), not O(items))
        self.n_clicks = 0

    def update(self, items: Iterable[str], weights: Iterable[float] | None = None) -> None:
        """Count ``items`` (clicked item ids, oldest first). ``weights``: what each click
        counts, in [0, 1] (None: 1 each); the clock moves by the weight too, so a click
        counting ``w`` ages the others as ``w`` clicks would, and one counting 0 changes
        nothing (:class:`~learners.retrieval_fusion.FusedRetrieval` credits a user's clicks
        past a share of the recent ones this way)."""
        if weights is None:
            for item in items:
                self._add(str(item), self.decay, 1.0)
            return
        for item, w in zip(items, weights, strict=True):
            w = float(w)
            if w > 0.0:
                self._add(str(item), self.decay if w == 1.0 else self.decay**w, w)

    def _add(self, key: str, decay: float, w: float) -> None:
        self._scale /= decay
        x = w * self._scale
        self._raw[key] = self._raw.get(key, 0.0) + x
        self._sum += x
        self.n_clicks += 1
        if self._scale > 1e150:  # keep the stored values finite
            self._raw = {k: v / self._scale for k, v in self._raw.items()}
            self._sum = math.fsum(self._raw.values())
            self._scale = 1.0

    def count(self, key: str) -> float:
        """Decayed clicks of ``key`` now (0 when never counted or pruned)."""
        return self._raw.get(key, 0.0) / self._scale

    def prune(self, below: float = _FLOOR) -> int:
        """Forget the items with fewer than ``below`` decayed clicks (by default the floor
        :meth:`log_q` gives them anyway, so their ``log_q`` is unchanged; the total keeps
        their mass); returns how many. Keeps a stream of ever new items bounded."""
        cut = below * self._scale
        keep = {k: v for k, v in self._raw.items() if v >= cut}
        n = len(self._raw) - len(keep)
        self._raw = keep
        return n

    def state(self) -> tuple[float, dict[str, float], int]:
        """``(scale, stored counts, clicks)``, for a snapshot (:meth:`load_state`)."""
        return self._scale, self._raw, self.n_clicks

    def load_state(self, state: Sequence[Any]) -> None:
        """Restore :meth:`state` (its first three values; the total is recomputed)."""
        self._scale, raw, self.n_clicks = state[0], state[1], state[2]
        self._raw = dict(raw)
        self._sum = math.fsum(self._raw.values())

    @property
    def counts(self) -> Mapping[str, float]:
        """Decayed clicks per item now (the latest click counts 1)."""
        return {k: v / self._scale for k, v in self._raw.items()}

    @property
    def total(self) -> float:
        """Sum of the decayed counts."""
        return self._sum / self._scale

    def log_q(self, items: Sequence[str]) -> np.ndarray:
        """float64 ``(N,)`` natural-log share of the decayed clicks of each item; an item
        with fewer than 0.5 decayed clicks (never clicked included) counts as 0.5, so the
        log is finite. Without any click every item gets 0."""
        if not self._raw:
            return np.zeros(len(items), dtype=np.float64)
        raw = np.array([self._raw.get(str(i), 0.0) for i in items], dtype=np.float64)
        floor = _FLOOR * self._scale
        return np.log(np.maximum(raw, floor)) - math.log(self._sum)


def prior_bias(log_q: np.ndarray, beta: float, temperature: float) -> np.ndarray:
    """float32 ``(M,)`` additive term in cosine units, ``temperature * beta * log_q``: with
    it a cosine ``<u, v>`` ranks as the logit ``<u, v> / temperature + beta * log q``.

    Example:
        >>> prior_bias(np.log(np.array([0.5, 0.25])), beta=1.0, temperature=0.2).round(4)
        array([-0.1386, -0.2773], dtype=float32)
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite value >= 0, got {beta}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    lq = np.asarray(log_q, dtype=np.float64)
    if not np.isfinite(lq).all():
        raise ValueError("log_q must be finite")
    return (temperature * beta * lq).astype(np.float32)


def with_prior(
    users: np.ndarray, items: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an item bias into the vectors for an inner-product index: users ``(Q, D)``
    gain a column of ones, items ``(M, D)`` a column ``bias`` ``(M,)``, so ``<u', v'> =
    <u, v> + bias``. Both returned float32 ``(., D + 1)``.

    Example:
        >>> u, v = with_prior(np.ones((1, 2)), np.eye(2), np.array([0.5, -1.0]))
        >>> (u @ v.T).tolist()
        [[1.5, 0.0]]
    """
    users = np.asarray(users, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32).reshape(-1)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"users (Q, D) and items (M, D) needed, got {users.shape}, "
                         f"{items.shape}")  # fmt: skip
    if len(bias) != len(items):
        raise ValueError(f"bias has {len(bias)} values for {len(items)} items")
    ones = np.ones((len(users), 1), dtype=np.float32)
    return np.hstack([users, ones]), np.hstack([items, bias[:, None]])
