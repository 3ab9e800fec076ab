"""River peers behind the same interface as :class:`learners.ranker.TorchRanker`."""

from __future__ import annotations

import math
import numbers
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from river import linear_model, optim

from learners.models import INITIAL_CTR

__all__ = ["RiverLogisticRegression", "river_features"]

Rows = Sequence[Mapping[str, object]]

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


class RiverLogisticRegression:
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

    def predict_proba_many(self, X: Rows) -> np.ndarray:
        """P(click), float64 ``(B,)`` in [0, 1]."""
        return np.fromiter(
            (self.model.predict_proba_one(river_features(r)).get(True, 0.0) for r in X),
            dtype=np.float64,
            count=len(X),
        )

    def learn_many(self, X: Rows, y: Any, w: Any = None) -> None:
        """One SGD step per example, in order (``y``: (B,) 0/1, ``w``: optional (B,))."""
        y_arr = np.asarray(y).reshape(-1)
        if y_arr.shape[0] != len(X):
            raise ValueError(f"len(y)={y_arr.shape[0]} does not match len(X)={len(X)}")
        w_arr = None if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
        for i, row in enumerate(X):
            weight = 1.0 if w_arr is None else float(w_arr[i])
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

    def clone(self) -> RiverLogisticRegression:
        """An untrained copy with the same settings."""
        return RiverLogisticRegression(seed=self.seed, lr=self.lr)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically pickle the learner (temp file in the same directory, fsync, replace)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RiverLogisticRegression:
        """Load a learner written by :meth:`save` (pickle: only load trusted files)."""
        with open(path, "rb") as f:
            obj = pickle.load(f)
        if not isinstance(obj, cls):
            raise TypeError(f"{path} holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj
