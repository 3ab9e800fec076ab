"""Dedupe room: the idempotency horizon of keys already seen.

Keys are remembered as their 64-bit hash in generations: the newest generation is a
Python set, and each full one is frozen into a sorted ``int64`` array, so a remembered key
costs 8 bytes once frozen instead of ~226 (an ``OrderedDict`` entry, its tuple and the
impression-id string it kept alive: ``bench/results/memory_probe_400k.json``). The
trainer's default horizon of 1M keys holds ~8 MB rather than ~220 MB.

Two distinct keys that hash alike make the second look like a redelivery: with ``n`` keys
remembered the odds per lookup are about ``n / 2**64`` (5e-14 at 1M keys).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable, Iterable

import numpy as np

from logs.events import TASK1_KINDS, LabeledExample

log = logging.getLogger(__name__)

#: Generations that together hold the horizon; each holds ``horizon / GENERATIONS`` keys.
GENERATIONS = 8


class SeenKeys:
    """At least the newest ``horizon`` keys seen, to drop redelivered records (delivery is
    at-least-once). Up to ``horizon / GENERATIONS`` older keys are remembered too: a key
    is forgotten when the generation it was added to is dropped, a whole one at a time.

    >>> seen = SeenKeys(horizon=8)
    >>> [seen.first_time(k) for k in ("a", "a", "b", "c", "a")]
    [True, False, True, True, False]
    >>> for k in range(16):
    ...     _ = seen.first_time(k)
    >>> seen.first_time("a")  # 16 newer keys: forgotten
    True
    """

    def __init__(self, horizon: int) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self._generation = max(1, -(-horizon // GENERATIONS))  # keys per generation
        self._keep = -(-horizon // self._generation)  # frozen generations kept
        self._current: set[int] = set()
        self._frozen: deque[np.ndarray] = deque()

    def _known(self, h: int) -> bool:
        if h in self._current:
            return True
        for gen in self._frozen:
            i = int(gen.searchsorted(h))
            if i < len(gen) and int(gen[i]) == h:
                return True
        return False

    def _rotate(self) -> None:
        if len(self._current) >= self._generation:  # full: freeze it
            self._frozen.append(np.sort(np.fromiter(self._current, np.int64,
                                                    len(self._current))))  # fmt: skip
            self._current = set()
            while len(self._frozen) > self._keep:
                self._frozen.popleft()

    def first_time(self, key: Hashable) -> bool:
        h = hash(key)
        if self._known(h):
            return False
        self._current.add(h)
        self._rotate()
        return True

    def filter(self, examples: Iterable[LabeledExample]) -> list[LabeledExample]:
        """The examples whose (impression_id, label) is new (a record of the second label
        alone is keyed by its kind instead of its label): a correction (label 1 after a
        label 0) or a fake negative's positive is not a duplicate. One vectorised lookup
        per frozen generation for the whole batch.

        >>> from logs.events import Impression, LabeledExample
        >>> seen = SeenKeys(horizon=10)
        >>> imp = Impression("a", 0.0, "u", "i")
        >>> neg = LabeledExample(imp, 0, 1.0, kind="negative")
        >>> fix = LabeledExample(imp, 1, 2.0, kind="correction")
        >>> [e.kind for e in seen.filter([neg, neg, fix])]
        ['negative', 'correction']
        """
        batch = list(examples)
        # a record of the second label alone (TASK1_KINDS) has label 1 like its click's:
        # keyed apart (2), so that it is not taken for a redelivered click
        hashes = [hash((e.impression.impression_id, 2 if e.kind in TASK1_KINDS else e.label))
                  for e in batch]  # fmt: skip
        old = np.zeros(len(batch), dtype=bool)
        if self._frozen and batch:
            arr = np.asarray(hashes, dtype=np.int64)
            for gen in self._frozen:
                i = np.minimum(gen.searchsorted(arr), len(gen) - 1)
                old |= gen[i] == arr
        current = self._current
        fresh = []
        taken: list[int] = []
        in_batch: set[int] = set()
        for e, h, known in zip(batch, hashes, old.tolist(), strict=True):
            if known or h in current or h in in_batch:
                continue
            in_batch.add(h)
            taken.append(h)
            fresh.append(e)
        for h in taken:  # generations fill to their size exactly, oldest key first
            self._current.add(h)
            self._rotate()
        return fresh

    def __len__(self) -> int:
        """Keys remembered (at least ``min(horizon, keys seen)``)."""
        return len(self._current) + sum(len(g) for g in self._frozen)

    @property
    def nbytes(self) -> int:
        """Approximate bytes held: 8 per frozen key, ~60 per key in the open set."""
        return 60 * len(self._current) + sum(g.nbytes for g in self._frozen)
