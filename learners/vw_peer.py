"""Vowpal Wabbit peer behind the ranker's interface (the registry of every peer is
:data:`learners.peers.PEERS`).

:class:`VowpalWabbitLogistic` is online logistic regression in ``vowpalwabbit.Workspace``
(VW's defaults: adaptive, normalised, invariant SGD on hashed features) with
``--loss_function logistic --link logistic`` so that predictions are P(click). Rows become
VW text examples with three namespaces by key prefix: ``u`` (keys starting with
``user``), ``i`` (``item``) and ``c`` (everything else: position, device, ...).
Categorical values become ``key=value`` indicator features, numeric values ``key:x`` with
``x`` the signed ``log1p`` (as in :func:`learners.river_peers.river_features`).
``VWConfig.interactions=("ui",)`` adds VW's quadratic user x item features (``-q ui``).

Everything is in-process (no files but the checkpoint, no network). A batch is scored
before any of it is learned (test-then-train), then learned one example at a time, in order.

"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import vowpalwabbit

from learners.base import Rows, labels_and_weights
from learners.util import atomic_write

__all__ = ["VWConfig", "VowpalWabbitLogistic", "vw_example"]


_MAGIC = b"streamrec-vw-1\n"
_UNSAFE = str.maketrans({" ": "_", "\t": "_", "\n": "_", "\r": "_", "|": "_", ":": "_"})


@dataclass(frozen=True)
class VWConfig:
    """Vowpal Wabbit settings; the defaults are VW's own.

    ``bits``: hash space ``2**bits`` weights (``-b``); ``learning_rate`` (``-l``);
    ``power_t`` (learning-rate decay exponent); ``l1``, ``l2`` regularisation (per example);
    ``interactions``: VW quadratic namespace pairs (``-q``), e.g. ``("ui",)`` for user x
    item; ``categorical_keys``: numeric-looking keys that are categorical.
    """

    bits: int = 18
    learning_rate: float = 0.5
    power_t: float = 0.5
    l1: float = 0.0
    l2: float = 0.0
    interactions: tuple[str, ...] = ()
    categorical_keys: tuple[str, ...] = ("position",)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 30:
            raise ValueError(f"bits must be in [1, 30], got {self.bits}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive finite, got {self.learning_rate}")
        for name in ("power_t", "l1", "l2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for pair in self.interactions:
            if len(pair) != 2 or not all(c in "uic" for c in pair):
                raise ValueError(f"interactions are pairs of the namespaces u, i, c; got {pair!r}")
        # Accept lists (e.g. from JSON) but store the immutable form.
        object.__setattr__(self, "interactions", tuple(self.interactions))
        object.__setattr__(self, "categorical_keys", tuple(self.categorical_keys))

    def arguments(self, seed: int) -> list[str]:
        """The VW command line (without ``-i``/``-f``)."""
        args = [
            "--quiet",
            "--loss_function=logistic",
            "--link=logistic",
            f"--bit_precision={self.bits}",
            f"--learning_rate={self.learning_rate!r}",
            f"--power_t={self.power_t!r}",
            f"--random_seed={int(seed)}",
        ]
        if self.l1:
            args.append(f"--l1={self.l1!r}")
        if self.l2:
            args.append(f"--l2={self.l2!r}")
        for pair in self.interactions:
            args.append(f"--quadratic={pair}")
        return args


def _namespace(key: str) -> str:
    if key.startswith("user"):
        return "u"
    if key.startswith("item"):
        return "i"
    return "c"


def vw_example(
    row: Mapping[str, object],
    label: float | None = None,
    weight: float = 1.0,
    categorical_keys: tuple[str, ...] = ("position",),
) -> str:
    """One row -> a VW text example (``label`` 0/1 -> -1/+1; None: unlabelled).

    Absent (None) and non-finite numeric values are left out; characters VW reserves
    (space, ``|``, ``:``) in names are replaced by ``_``. The row is not modified.

    Example:
        >>> vw_example({"user_id": "u 1", "item_price": 9.0, "position": 2.0}, 1.0)
        '1 1 |u user_id=u_1 |i item_price:2.302585093 |c position=2'
    """
    spaces: dict[str, list[str]] = {"u": [], "i": [], "c": []}
    for key, value in row.items():
        if value is None:
            continue
        name = key.translate(_UNSAFE)
        if key in categorical_keys or not isinstance(value, numbers.Real):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            spaces[_namespace(key)].append(f"{name}={str(value).translate(_UNSAFE)}")
        else:
            x = float(value)
            if math.isfinite(x) and x != 0.0:
                spaces[_namespace(key)].append(
                    f"{name}:{math.copysign(math.log1p(abs(x)), x):.10g}"
                )
    body = " ".join(f"|{ns} {' '.join(feats)}" for ns, feats in spaces.items() if feats)
    head = "" if label is None else f"{1 if label > 0.5 else -1} {weight:.10g} "
    return head + (body or "|c")


class VowpalWabbitLogistic:
    """Vowpal Wabbit logistic regression with the ranker's batch interface.

    Example:
        >>> m = VowpalWabbitLogistic(VWConfig(bits=12, interactions=("ui",)), seed=0)
        >>> rows = [{"user_id": "u1", "item_id": "i1"}, {"user_id": "u2", "item_id": "i2"}]
        >>> p = m.score_and_learn(rows, np.array([1, 0]))
        >>> p.tolist(), m.n_updates  # an untrained VW model predicts 1/2
        ([0.5, 0.5], 1)
    """

    def __init__(
        self,
        config: VWConfig = VWConfig(),  # noqa: B008 - frozen, immutable default
        seed: int = 0,
    ) -> None:
        self.config = config
        self.seed = seed
        self.n_updates = 0
        self.workspace = vowpalwabbit.Workspace(arg_list=config.arguments(seed))

    def _example(self, row: Mapping[str, object], label: float | None, weight: float) -> str:
        return vw_example(row, label, weight, self.config.categorical_keys)

    def predict_proba_many(self, X: Rows) -> np.ndarray:
        """P(click), float64 ``(B,)`` in [0, 1]."""
        ws = self.workspace
        return np.fromiter(
            (ws.predict(self._example(r, None, 1.0)) for r in X), dtype=np.float64, count=len(X)
        )

    def _labelled(self, X: Rows, y: Any, w: Any) -> list[str | None]:
        """VW examples for learning; None where the label or weight is unusable."""
        y_arr, w_arr = labels_and_weights(X, y, w)
        out: list[str | None] = []
        for row, label, weight in zip(X, y_arr.tolist(), w_arr.tolist(), strict=True):
            ok = math.isfinite(label) and math.isfinite(weight) and weight > 0
            out.append(self._example(row, label, weight) if ok else None)
        return out

    def learn_many(self, X: Rows, y: Any, w: Any = None) -> None:
        """One VW update per example, in order (``y``: (B,) 0/1, ``w``: optional (B,)).

        Examples with a non-finite label or a non-finite or non-positive weight are skipped.
        """
        ws = self.workspace
        for line in self._labelled(X, y, w):
            if line is not None:
                ws.learn(line)
        self.n_updates += 1

    def score_and_learn(self, X: Rows, y: Any, w: Any = None) -> np.ndarray:
        """Progressive validation: P(click) (B,) for the whole batch BEFORE learning it.

        Each example is parsed once, predicted, and learned after the whole batch is scored.
        """
        lines = self._labelled(X, y, w)
        ws = self.workspace
        scores = np.empty(len(X), dtype=np.float64)
        parsed = []
        for i, (row, line) in enumerate(zip(X, lines, strict=True)):
            if line is None:
                scores[i] = ws.predict(self._example(row, None, 1.0))
                continue
            ex = ws.parse(line)
            scores[i] = ws.predict(ex)
            parsed.append(ex)
        for ex in parsed:
            ws.learn(ex)
            ws.finish_example(ex)
        self.n_updates += 1
        return scores

    def clone(self) -> VowpalWabbitLogistic:
        """An untrained copy with the same config and seed."""
        return VowpalWabbitLogistic(self.config, seed=self.seed)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write a checkpoint: a header line, a JSON line, then VW's model file.

        VW writes its model (with ``--save_resume`` state, so learning continues exactly) to
        a temp file in the same directory; the checkpoint is written to another temp file,
        fsynced and moved into place.
        """
        path = Path(path)
        header = {
            "config": dataclasses.asdict(self.config),
            "seed": self.seed,
            "n_updates": self.n_updates,
        }
        fd, model_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".vw", dir=path.parent)
        os.close(fd)
        try:
            self.workspace.save(model_tmp)
            model = Path(model_tmp).read_bytes()
            atomic_write(
                path, lambda f: f.write(_MAGIC + json.dumps(header).encode() + b"\n" + model)
            )
        finally:
            Path(model_tmp).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VowpalWabbitLogistic:
        """Load a checkpoint written by :meth:`save`."""
        with open(path, "rb") as f:
            if f.readline() != _MAGIC:
                raise ValueError(f"{path} is not a streamrec Vowpal Wabbit checkpoint")
            header = json.loads(f.readline())
            model = f.read()
        learner = cls(VWConfig(**header["config"]), seed=int(header["seed"]))
        learner.n_updates = int(header["n_updates"])
        with tempfile.TemporaryDirectory() as tmp:
            model_path = Path(tmp) / "model.vw"
            model_path.write_bytes(model)
            # VW does not store the loss, link or seed in the model file: pass them again.
            args = [*learner.config.arguments(learner.seed), f"--initial_regressor={model_path}"]
            learner.workspace.finish()
            learner.workspace = vowpalwabbit.Workspace(arg_list=args)
        return learner
