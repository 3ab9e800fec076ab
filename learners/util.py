"""Small helpers every package shares, each written once: the logit and sigmoid of
probabilities, and the atomic file write (``learners`` imports nothing of the project, so
``stream``, ``modelstore`` and ``bench`` can all use them)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["PROB_EPS", "atomic_write", "logit", "sigmoid"]

PROB_EPS = 1e-7
"""Probabilities are clipped to ``[PROB_EPS, 1 - PROB_EPS]`` before a logit or a log."""


def logit(p: Any) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities (any shape, flattened to (N,) float64), ``p``
    clipped to ``[PROB_EPS, 1 - PROB_EPS]`` so 0 and 1 stay finite.

    >>> logit([0.5, 0.0, 1.0]).round(3).tolist()
    [0.0, -16.118, 16.118]
    """
    q = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), PROB_EPS, 1.0 - PROB_EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` elementwise, float64; ``exp(-|x|)`` never overflows.

    >>> sigmoid(np.array([0.0, -800.0, 800.0])).tolist()
    [0.5, 0.0, 1.0]
    """
    e = np.exp(-np.abs(x))
    out: np.ndarray = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return out


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[Any]], object],
    *,
    binary: bool = True,
    fsync: bool = True,
    prefix: str | None = None,
) -> None:
    """Write ``path`` all or nothing: ``write(f)`` fills a temp file in the same directory
    (a unique ``O_EXCL`` name, so a planted file or symlink is never written through),
    optionally fsynced, then renamed over ``path``. On any error (e.g. ENOSPC) the temp
    file is removed and ``path`` keeps its old content.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(d / "a.txt", lambda f: f.write("hi"), binary=False)
    >>> (d / "a.txt").read_text(), [p.name for p in d.iterdir()]
    ('hi', ['a.txt'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}." if prefix is None else prefix, suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
