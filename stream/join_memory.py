"""What the joiner's state costs in memory, and the packed form of the negatives it keeps.

:func:`impression_bytes` estimates the bytes an impression holds (the unit of
``JoinConfig``'s byte bounds); ``*_OVERHEAD`` are the per-entry costs beyond the strings.
A labelled negative waits for late clicks as a :class:`PackedImpression` (shared feature
names, float values in one array); :func:`packed_bytes` is its estimate. Used by
``stream.join.OnlineJoiner``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from logs.events import Impression

#: bytes an entry costs beyond its strings: the objects, dict and heap slots. Calibrated
#: with tracemalloc (CPython 3.11, 50k impressions of 3 features, distinct strings): a
#: pending impression 857 bytes real vs 842 estimated, a labelled negative 948 vs 936, an
#: orphan click 178 vs 174
IMPRESSION_OVERHEAD = 250
FEATURE_OVERHEAD = 40
ORPHAN_OVERHEAD = 160
DONE_OVERHEAD = 80


def _value_bytes(v: object) -> int:
    if isinstance(v, str):
        return 49 + len(v)
    if isinstance(v, list | tuple):  # e.g. hist_seq (ids) and hist_seq_age (floats)
        n = 56 + 8 * len(v)
        for x in v:
            if isinstance(x, str):
                n += 49 + len(x)
            elif isinstance(x, list | tuple):
                n += _value_bytes(x)
            else:
                n += 24
        return n
    return 24


def impression_bytes(imp: Impression) -> int:
    """Estimated bytes an impression holds in memory (strings by length, numbers, lists,
    object overheads): the unit of the joiner's byte bounds. Cheap: no encoding.

    >>> impression_bytes(Impression("i1", 1.0, "u1", "x1", features={"dev": "ios"}))
    547
    """
    n = IMPRESSION_OVERHEAD + 3 * 49 + len(imp.impression_id) + len(imp.user_id)
    n += len(imp.item_id)
    feats = imp.features
    n += len(feats) * (FEATURE_OVERHEAD + 49) + sum(map(len, feats))
    for v in feats.values():  # numbers first: most of them are (the hist_* features)
        t = type(v)
        n += 24 if t is float or t is int else _value_bytes(v)
    return n


#: bytes a packed negative costs beyond its id strings, its float array and its other
#: values (tracemalloc, CPython 3.11: see tests/unit/stream/test_join_packed.py)
PACKED_OVERHEAD = 330
_MAX_SCHEMAS = 4096  # distinct feature key lists shared per joiner before the cache resets
Schema = tuple[tuple[str, ...], tuple[bool, ...]]


@dataclass(frozen=True, slots=True)
class PackedImpression:
    """A labelled negative as the joiner remembers it for late clicks: the impression with
    its feature names shared by every impression of the same schema and its float
    feature values in one ``array("d")``. About 1/4 of an :class:`Impression` with 50
    ``hist_*`` features (each float an object, each decoded key a string of its own).
    ``unpack()`` gives back an equal :class:`Impression` (same keys, order and values)."""

    impression_id: str
    ts: float
    user_id: str
    item_id: str
    position: int | None
    served_score: float | None
    model_version: int | None
    true_p: float | None
    schema: Schema  # (keys in order, is-float per key), shared
    floats: array
    others: tuple[Any, ...]

    def unpack(self) -> Impression:
        keys, is_float = self.schema
        f = iter(self.floats)
        o = iter(self.others)
        features = {k: next(f) if fl else next(o) for k, fl in zip(keys, is_float, strict=True)}
        return Impression(
            self.impression_id, self.ts, self.user_id, self.item_id, self.position, features,
            self.served_score, self.model_version, self.true_p,
        )  # fmt: skip


def pack_impression(imp: Impression, schemas: dict[Schema, Schema]) -> PackedImpression:
    """``imp`` packed (see :class:`PackedImpression`); ``schemas`` caches the shared
    schemas (cleared past a few thousand distinct ones, so it stays bounded)."""
    is_float: list[bool] = []
    floats: list[float] = []
    others: list[Any] = []
    for v in imp.features.values():  # one pass: most values are floats (the hist_* ones)
        if type(v) is float:
            is_float.append(True)
            floats.append(v)
        else:
            is_float.append(False)
            others.append(v)
    schema = (tuple(imp.features), tuple(is_float))
    shared = schemas.get(schema)
    if shared is None:
        if len(schemas) >= _MAX_SCHEMAS:
            schemas.clear()
        shared = schemas[schema] = schema
    return PackedImpression(
        imp.impression_id, imp.ts, imp.user_id, imp.item_id, imp.position, imp.served_score,
        imp.model_version, imp.true_p, shared, array("d", floats), tuple(others),
    )  # fmt: skip


def packed_bytes(p: PackedImpression) -> int:
    """Estimated bytes a packed negative holds (its shared schema not counted)."""
    n = PACKED_OVERHEAD + len(p.impression_id) + len(p.user_id) + len(p.item_id)
    n += 8 * len(p.floats) + 8 * len(p.others)
    return n + sum(map(_value_bytes, p.others))
