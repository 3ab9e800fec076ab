"""The interface every learner shares (River style): :class:`Learner`, and the one
:data:`Rows` type its methods take.

A learner keeps its state inside, takes its ``seed`` explicitly, scores a batch with
``predict_proba_many`` and learns it with ``learn_many``; ``score_and_learn`` does both in
that order (progressive validation: a batch is scored before any of it is learned);
``clone`` gives an untrained copy with the same settings and ``save`` an atomic
checkpoint (each class loads its own with ``load``). The ranker, the two-tower, the river
and the Vowpal Wabbit peers all satisfy it; the shared check suite
(``tests/unit/learners/test_learner_checks.py``) asserts it for every one.

    >>> from learners.river_peers import RiverLogisticRegression
    >>> isinstance(RiverLogisticRegression(seed=0), Learner)
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Learner", "Rows", "labels_and_weights"]

Rows = Sequence[Mapping[str, object]]
"""A batch of B flat example rows (``learners.encoding``): field name -> str, number or
list (``hist_seq``)."""


@runtime_checkable
class Learner(Protocol):
    seed: int

    def predict_proba_many(self, X: Rows) -> np.ndarray:
        """(B,) float64 scores in [0, 1] (P(click) for a CTR learner)."""
        ...

    def learn_many(self, X: Rows, y: Any, w: Any = None) -> None:
        """Learn B rows with labels ``y`` (B,) and optional weights ``w`` (B,)."""
        ...

    def score_and_learn(self, X: Rows, y: Any, w: Any = None) -> np.ndarray:
        """``predict_proba_many(X)`` before ``learn_many(X, y, w)``."""
        ...

    def clone(self) -> Learner:
        """An untrained copy with the same settings and seed."""
        ...

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint atomically."""
        ...


def labels_and_weights(X: Rows, y: Any, w: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``y`` and ``w`` of a ``learn_many(X, y, w)`` call as float64 ``(B,)`` arrays
    (``w`` None: ones), checked against ``len(X)``; values are not filtered here.

    >>> labels_and_weights([{}, {}], [1, 0])[1].tolist()
    [1.0, 1.0]
    >>> labels_and_weights([{}], [1, 0])
    Traceback (most recent call last):
    ...
    ValueError: len(y)=2 does not match len(X)=1
    """
    y_arr = np.asarray(y, dtype=np.float64).reshape(-1)
    if y_arr.shape[0] != len(X):
        raise ValueError(f"len(y)={y_arr.shape[0]} does not match len(X)={len(X)}")
    w_arr = np.ones(len(X)) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    if w_arr.shape[0] != len(X):
        raise ValueError(f"len(w)={w_arr.shape[0]} does not match len(X)={len(X)}")
    return y_arr, w_arr
