"""Dedupe room: the idempotency horizon of keys already seen."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterable

from logs.events import (
    LabeledExample,
)

log = logging.getLogger(__name__)


class SeenKeys:
    """The newest ``horizon`` keys seen, to drop redelivered records (delivery is
    at-least-once).

    >>> seen = SeenKeys(horizon=2)
    >>> [seen.first_time(k) for k in ("a", "a", "b", "c", "a")]
    [True, False, True, True, True]
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def first_time(self, key: Hashable) -> bool:
        keys = self._keys
        if key in keys:
            return False
        keys[key] = None
        if len(keys) > self.horizon:
            keys.popitem(last=False)
        return True

    def filter(self, examples: Iterable[LabeledExample]) -> list[LabeledExample]:
        """The examples whose (impression_id, label) is new: a correction (label 1 after a
        label 0) or a fake negative's positive is not a duplicate.

        >>> from logs.events import Impression, LabeledExample
        >>> seen = SeenKeys(horizon=10)
        >>> imp = Impression("a", 0.0, "u", "i")
        >>> neg = LabeledExample(imp, 0, 1.0, kind="negative")
        >>> fix = LabeledExample(imp, 1, 2.0, kind="correction")
        >>> [e.kind for e in seen.filter([neg, neg, fix])]
        ['negative', 'correction']
        """
        return [e for e in examples if self.first_time((e.impression.impression_id, e.label))]

    def __len__(self) -> int:
        return len(self._keys)
