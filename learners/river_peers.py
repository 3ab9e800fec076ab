"""River peers behind the same interface as :class:`learners.ranker.TorchRanker`.

:class:`RiverLogisticRegression` (plain SGD) and :class:`RiverFTRLProximal` (the same
logistic regression trained with FTRL-Proximal, McMahan et al. 2013, the classic online
CTR learner) share one implementation: rows become river feature dicts
(:func:`river_features`), each batch is scored before any of it is learned (test-then-train)
and then learned one example at a time, in order. The Vowpal Wabbit peer is in
:mod:`learners.vw_peer` (the registry of all: :mod:`learners.peers`).
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
from collections.abc import Mapping
from typing import Any, Self

import numpy as np
from river import linear_model, optim

from learners.base import Rows, labels_and_weights
from learners.models import INITIAL_CTR
from learners.util import atomic_write

__all__ = ["RiverFTRLProximal", "RiverLogisticRegression", "river_features"]


_INTERCEPT_INIT = math.log(INITIAL_CTR / (1 - INITIAL_CTR))


def river_features(
    row: Mapping[str, object], categorical_keys: tuple[str, ...] = ("position",)
) -> dict[str, float]:
    """One row -> river features: categoricals one-hot as ``"k=v"``, numerics signed log1p.

    Absent (None) and non-finite numeric values are left out. The row is not modified.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        if value is None:
            continue
        if key in categorical_keys or not isinstance(value, numbers.Real):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            out[f"{key}={value}"] = 1.0
        else:
            x = float(value)
            if math.isfinite(x):
                out[key] = math.copysign(math.log1p(abs(x)), x)
    return out


class _RiverPeer:
    """A river binary classifier (``self.model``) behind the ranker's batch interface.

    Subclasses build ``self.model`` and set ``n_updates = 0`` in ``__init__``, and define
    :meth:`clone`.
    """

    model: Any
    n_updates: int

    def predict_proba_many(self, X: Rows) -> np.ndarray:
        """P(click), float64 ``(B,)`` in [0, 1]."""
        return np.fromiter(
            (self.model.predict_proba_one(river_features(r)).get(True, 0.0) for r in X),
            dtype=np.float64,
            count=len(X),
        )

    def learn_many(self, X: Rows, y: Any, w: Any = None) -> None:
        """One update per example, in order (``y``: (B,) 0/1, ``w``: optional (B,) weights).

        Examples with a non-finite label or weight are skipped.
        """
        y_arr, w_arr = labels_and_weights(X, y, w)
        for i, row in enumerate(X):
            weight = float(w_arr[i])
            label = float(y_arr[i])
            if not (math.isfinite(weight) and math.isfinite(label)):
                continue
            self.model.learn_one(river_features(row), bool(label), w=weight)
        self.n_updates += 1

    def score_and_learn(self, X: Rows, y: Any, w: Any = None) -> np.ndarray:
        """Progressive validation: scores (B,) for the whole batch BEFORE learning it."""
        scores = self.predict_proba_many(X)
        self.learn_many(X, y, w)
        return scores

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically pickle the learner (temp file in the same directory, fsync, replace)."""
        atomic_write(path, lambda f: pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Load a learner written by :meth:`save` (pickle: only load trusted files)."""
        with open(path, "rb") as f:
            obj = pickle.load(f)
        if not isinstance(obj, cls):
            raise TypeError(f"{path} holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj


class RiverLogisticRegression(_RiverPeer):
    """``river.linear_model.LogisticRegression`` with the ranker's batch interface.

    ``seed`` is kept for interface parity (the model is deterministic); ``lr`` is the SGD
    learning rate.

    Example:
        >>> m = RiverLogisticRegression(seed=0, lr=0.05)
        >>> p = m.score_and_learn([{"user_id": "u1", "item_id": "i1", "price": 3.0}],
        ...                       np.array([1]))
        >>> p.shape, bool(0 <= p[0] <= 1)
        ((1,), True)
    """

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        self.seed = seed
        self.lr = lr
        self.model = linear_model.LogisticRegression(
            optimizer=optim.SGD(lr), intercept_init=_INTERCEPT_INIT
        )
        self.n_updates = 0

    def clone(self) -> RiverLogisticRegression:
        """An untrained copy with the same settings."""
        return RiverLogisticRegression(seed=self.seed, lr=self.lr)


class RiverFTRLProximal(_RiverPeer):
    """``river.linear_model.LogisticRegression`` trained by ``river.optim.FTRLProximal``.

    ``alpha``, ``beta``, ``l1``, ``l2`` are FTRL-Proximal's per-coordinate learning-rate and
    regularisation settings (river's defaults). The intercept is learned by river's own
    SGD (``intercept_lr`` 0.01) from ``logit(INITIAL_CTR)``. ``seed`` is kept for interface
    parity (the model is deterministic).

    Example:
        >>> m = RiverFTRLProximal(seed=0)
        >>> p = m.score_and_learn([{"user_id": "u1", "item_id": "i1", "price": 3.0}],
        ...                       np.array([1]))
        >>> p.shape, bool(0 <= p[0] <= 1), m.n_updates
        ((1,), True, 1)
    """

    def __init__(
        self,
        seed: int = 0,
        alpha: float = 0.05,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 1.0,
    ) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name, value in (("l1", l1), ("l2", l2)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.seed = seed
        self.alpha, self.beta, self.l1, self.l2 = alpha, beta, l1, l2
        self.model = linear_model.LogisticRegression(
            optimizer=optim.FTRLProximal(alpha=alpha, beta=beta, l1=l1, l2=l2),
            intercept_init=_INTERCEPT_INIT,
        )
        self.n_updates = 0

    def clone(self) -> RiverFTRLProximal:
        """An untrained copy with the same settings."""
        return RiverFTRLProximal(self.seed, self.alpha, self.beta, self.l1, self.l2)
