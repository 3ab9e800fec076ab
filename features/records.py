"""Key records of the feature stage: one array row per key, slots by key string.

A :class:`KeyTable` holds every key's record (its decayed counts and buffer of recent
events; layout in :mod:`features.kernel`) in numpy arrays, and maps each key string to its
row (its slot). The dict keeps insertion order, as the stage's eviction order needs; freed
slots are reused; the arrays grow by half when full (so on average a sixth of their rows
are spare). A record converts to and from the plain
list the stage's ``state_dict`` writes (JSON)::

    [R, n_imp, imp_0..imp_{H-1}, clk_0..clk_{H-1}, last_imp, last_clk, horizon,
     evicted_last_imp, evicted_last_clk, buf]

>>> kt = KeyTable(half_lives=1, max_buffer=32)
>>> s = kt.slot("u\\x1fu1")
>>> math.isnan(kt.record(s)[TIME])  # a slot given to a new key, not yet written
True
>>> kt.load("u\\x1fu2", [100.0, 1.0, 1.0, 0.0, 100.0, -math.inf, -math.inf, -math.inf,
...                      -math.inf, [100.0]])
>>> kt.record(kt.slots["u\\x1fu2"])[-1], len(kt)
([100.0], 2)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["COUNT", "NEVER", "TIME", "KeyTable"]

TIME, COUNT = 0, 1  # a record's newest event time, its undecayed impression count
NEVER = -math.inf  # "no such event" in a record (state_dict writes it as None)


class KeyTable:
    """Records of ``half_lives`` (H) decayed counts per key, with buffers of at most
    ``max_buffer`` recent events (see the module docstring)."""

    def __init__(self, half_lives: int, max_buffer: int, capacity: int = 1024) -> None:
        self.h, self.max_buffer = half_lives, max_buffer
        self.width = 7 + 2 * half_lives
        #: key string -> slot (insertion order: the order of first arrival)
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 0
        self.F = np.empty((0, self.width))
        # buffers start at most 17 events wide and widen (up to max_buffer + 1) when one
        # fills (features.kernel.run_events stops there)
        self.B = np.empty((0, min(max_buffer + 1, 17)))
        self.BL = np.zeros(0, dtype=np.int64)
        self._grow(capacity)

    def __len__(self) -> int:
        return len(self.slots)

    def _grow(self, capacity: int) -> None:
        old = self.F.shape[0]
        F = np.full((capacity, self.width), math.nan)
        B = np.zeros((capacity, self.B.shape[1]))
        BL = np.zeros(capacity, dtype=np.int64)
        F[:old], B[:old], BL[:old] = self.F, self.B, self.BL
        self.F, self.B, self.BL = F, B, BL

    def widen(self) -> None:
        """Double the buffers' width (at most ``max_buffer + 1``)."""
        width = min(2 * self.B.shape[1], self.max_buffer + 1)
        B = np.zeros((self.B.shape[0], width))
        B[:, : self.B.shape[1]] = self.B
        self.B = B

    def slot(self, key: str) -> int:
        """``key``'s slot; a new key gets a fresh one (its ``R`` is ``NaN`` until the
        kernel writes it)."""
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = self._take()
        return s

    def _take(self) -> int:
        if self._free:
            s = self._free.pop()
            self.F[s, TIME] = math.nan  # the kernel starts the record (features.kernel)
            return s
        if self._next == self.F.shape[0]:
            self._grow(self._next + self._next // 2)  # new rows are NaN
        s = self._next
        self._next += 1
        return s

    def drop(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` (their slots are reused)."""
        for k in keys:
            self._free.append(self.slots.pop(k))

    def times(self) -> tuple[list[str], np.ndarray]:
        """Every key (insertion order) and its newest event time ``R`` (N,)."""
        keys = list(self.slots)
        idx = np.fromiter(self.slots.values(), dtype=np.int64, count=len(keys))
        return keys, self.F[idx, TIME]

    def record(self, s: int) -> list[Any]:
        """Slot ``s`` as a plain list (``-inf`` for "never")."""
        return [*self.F[s].tolist(), self.B[s, : self.BL[s]].tolist()]

    def load(self, key: str, rec: Sequence[Any]) -> None:
        """Set ``key``'s record from a plain list (as :meth:`record` gives)."""
        buf = list(rec[-1])
        if len(rec) != self.width + 1 or len(buf) > self.max_buffer:
            raise ValueError(f"feature state record of {key!r} does not fit this config")
        while len(buf) > self.B.shape[1]:
            self.widen()
        s = self.slot(key)
        self.F[s] = rec[:-1]
        self.B[s, : len(buf)] = buf
        self.BL[s] = len(buf)

    def clear(self) -> None:
        self.slots.clear()
        self._free.clear()
        self._next = 0
