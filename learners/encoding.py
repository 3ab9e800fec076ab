"""Hashing feature encoder: flat example dicts ("rows") -> fixed-width integer/float arrays.

A row is a flat mapping such as ``{"user_id": "u17", "item_id": "i230", "position": 1,
"item_price": 12.5}``. A ``str`` value is categorical, an ``int``/``float`` value is numeric,
except keys listed in ``EncoderConfig.categorical_keys`` which are always categorical. A
missing key or a ``None`` value means the feature is absent.

Each field owns a column ("slot"). Slots are assigned in first-seen order (the fields of a
row taken in sorted key order), separately for categorical and numeric fields; ``user_id``
and ``item_id`` always own categorical slots 0 and 1. The slot assignment is state and is
saved by :meth:`FeatureEncoder.state_dict`.

Serving cannot change the model: inside :func:`frozen_fields` (every predict path of the
learners, see :func:`inference`) a field without a slot is ignored and counted
(``n_unknown_fields``), never assigned. While learning, a new field name is admitted only
once ``admit_after`` rows carried it, and at most ``max_candidates`` names wait for that
(``n_rejected_fields`` counts rows whose field was not admitted).

Behaviour sequence (the history contract): the list keys ``hist_seq`` (the user's last
clicked item ids, most recent first) and ``hist_seq_age`` (their ages in seconds) never take
a slot; with ``EncoderConfig.max_seq_len > 0`` they fill the optional sequence block of
:class:`EncodedBatch` (item ids hashed exactly as ``item_id``, so a model can look them up
in the same embedding rows as the candidate item).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import operator
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import numpy as np

__all__ = [
    "CandidateRows",
    "EncodedBatch",
    "EncoderConfig",
    "FeatureEncoder",
    "bucket_of",
    "frozen_fields",
    "inference",
]

USER_FIELD = "user_id"
ITEM_FIELD = "item_id"
SEQ_FIELD = "hist_seq"
SEQ_AGE_FIELD = "hist_seq_age"
#: Row keys that are lists (the behaviour sequence), never categorical or numeric slots.
SEQ_FIELDS = frozenset({SEQ_FIELD, SEQ_AGE_FIELD})
_DROPPED = -1
_NUMERIC_TYPES = frozenset({int, float, bool})
_CACHE_MAX = 1 << 17  # entries per field before the bucket cache is dropped


#: Serialises slot assignment (rare: only a never-seen field takes it).
_SLOTS_LOCK = threading.Lock()
#: Per thread: True while encoding for inference (a serving thread and the training thread
#: encode at once, so this is not a flag on the encoder).
_MODE = threading.local()
_F = TypeVar("_F", bound=Callable[..., Any])


@contextlib.contextmanager
def frozen_fields() -> Iterator[None]:
    """Inside it, encoding on this thread assigns no slot and admits no field name: a
    field without a slot is ignored and counted in ``n_unknown_fields``."""
    before = getattr(_MODE, "frozen", False)
    _MODE.frozen = True
    try:
        yield
    finally:
        _MODE.frozen = before


def inference(fn: _F) -> _F:
    """Decorator of a predict path: the call runs inside :func:`frozen_fields`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with frozen_fields():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]  # same signature


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder settings.

    ``num_buckets`` is the size of the shared hash space (bucket 0 is reserved for
    padding/absent); ``max_cat_fields`` / ``max_num_fields`` are the array widths.
    ``max_seq_len``: width N of the behaviour-sequence block (the first N entries of
    ``hist_seq``, most recent first); 0 = no sequence block.
    """

    num_buckets: int = 2**18
    max_cat_fields: int = 12
    max_num_fields: int = 8
    categorical_keys: tuple[str, ...] = ("position",)
    #: a new field name gets a slot once this many training rows carried it (1: at once)
    admit_after: int = 1
    #: new field names counted towards admission at most; more are not admitted, and at
    #: most this many names past full slots are remembered as dropped
    max_candidates: int = 1024
    max_seq_len: int = 20

    def __post_init__(self) -> None:
        if self.num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {self.num_buckets}")
        if self.max_cat_fields < 2:
            raise ValueError(
                f"max_cat_fields must be >= 2 (user_id and item_id), got {self.max_cat_fields}"
            )
        if self.max_num_fields < 0:
            raise ValueError(f"max_num_fields must be >= 0, got {self.max_num_fields}")
        if self.admit_after < 1 or self.max_candidates < 0:
            raise ValueError("admit_after must be >= 1 and max_candidates >= 0")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0, got {self.max_seq_len}")


@dataclass
class EncodedBatch:
    """An encoded batch.

    ``cat``: int64 ``(B, max_cat_fields)`` bucket ids, 0 = padding/absent.
    ``num``: float32 ``(B, max_num_fields)`` signed-log1p values, 0 when absent.
    ``seq``: int64 ``(B, max_seq_len)`` item buckets of ``hist_seq`` (hashed as ``item_id``),
    most recent first, 0 = padding; None when the encoder has no sequence block.
    ``seq_age``: float32 ``(B, max_seq_len)`` ages in seconds of those items, 0 at padding,
    -1 where the age is unknown (missing, negative or non-finite); None with ``seq``.
    """

    cat: np.ndarray
    num: np.ndarray
    seq: np.ndarray | None = None
    seq_age: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.cat.shape[0])


class CandidateRows(Sequence[Mapping[str, object]]):
    """The rows ``{**bases[q], "item_id": item}`` for each ``item`` of ``items[q]``, query
    after query, built only when read: a serving batch ranks ~200 candidates per request
    that differ only in ``item_id``. Any learner takes it as rows; at inference
    :meth:`FeatureEncoder.encode` encodes each base once (:meth:`~FeatureEncoder.
    encode_candidates`) instead of every row.

    ``extras`` (optional, one list per query, one mapping per item): the candidate's own
    features besides its id (e.g. the item's and the user x item pair's historical
    counters); the row is then ``{**bases[q], **extras[q][n], "item_id": item}``. Their
    names must not be in the query's base (ValueError when encoded).

    Example:
        >>> rows = CandidateRows([{"user_id": "u1"}, {"user_id": "u2"}], [["i1", "i2"], ["i3"]])
        >>> len(rows), rows[2], rows[-3]["item_id"]
        (3, {'user_id': 'u2', 'item_id': 'i3'}, 'i1')
        >>> CandidateRows([{"user_id": "u1"}], [["i1"]], [[{"hist_x": 2.0}]])[0]
        {'user_id': 'u1', 'hist_x': 2.0, 'item_id': 'i1'}
    """

    def __init__(
        self,
        bases: Sequence[Mapping[str, object]],
        items: Sequence[Sequence[str]],
        extras: Sequence[Sequence[Mapping[str, object]]] | None = None,
    ) -> None:
        if len(bases) != len(items):
            raise ValueError(f"{len(bases)} bases but {len(items)} item lists")
        if extras is not None and (
            len(extras) != len(items)
            or any(len(e) != len(it) for e, it in zip(extras, items, strict=True))
        ):
            raise ValueError("extras must hold one mapping per item of every query")
        self.bases = bases
        self.items = items
        self.extras = extras
        self._query = np.repeat(np.arange(len(bases)), [len(it) for it in items])
        self._start = np.concatenate([[0], np.cumsum([len(it) for it in items])]).astype(int)

    def __len__(self) -> int:
        return int(self._query.shape[0])

    @overload
    def __getitem__(self, i: int) -> Mapping[str, object]: ...

    @overload
    def __getitem__(self, i: slice) -> list[Mapping[str, object]]: ...

    def __getitem__(self, i: int | slice) -> Mapping[str, object] | list[Mapping[str, object]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        q = int(self._query[i])
        n = i - int(self._start[q])
        if self.extras is None:
            return {**self.bases[q], ITEM_FIELD: self.items[q][n]}
        return {**self.bases[q], **self.extras[q][n], ITEM_FIELD: self.items[q][n]}


def _value_str(value: object) -> str:
    # 1 and 1.0 (e.g. a position read from a float column) must hash to the same bucket.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def bucket_of(field: str, value: object, num_buckets: int) -> int:
    """Bucket in ``[1, num_buckets)`` of ``field=value``; stable across processes (crc32)."""
    key = f"{field}={_value_str(value)}"
    return 1 + zlib.crc32(key.encode("utf-8")) % (num_buckets - 1)


def _age(value: object) -> float:
    """An age in seconds, or -1.0 (unknown) for anything but a finite number >= 0."""
    if type(value) is float:  # the stream's case, without the ABC check below
        return value if 0.0 <= value < math.inf else -1.0
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        a = float(value)
        if 0.0 <= a < math.inf:
            return a
    return -1.0


def _signed_log1p(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column (N,) float64 as the encoder stores it: ``(ok, sign(x) *
    log1p(|x|))``; ``ok`` marks the finite values (the others stay 0 in the batch)."""
    ok = np.isfinite(x)
    x = np.where(ok, x, 0.0)
    return ok, np.sign(x) * np.log1p(np.abs(x))


class FeatureEncoder:
    """Encode rows into hashed categorical buckets and squashed numerics.

    Fields beyond ``max_cat_fields`` / ``max_num_fields`` are ignored; the number of such
    distinct fields is ``n_dropped_fields``.

    Example:
        >>> enc = FeatureEncoder(EncoderConfig(num_buckets=1000, max_cat_fields=4,
        ...                                    max_num_fields=2))
        >>> batch = enc.encode([{"user_id": "u1", "item_id": "i9", "position": 2,
        ...                      "item_price": 12.5}, {"item_id": "i3"}])
        >>> batch.cat.shape, batch.num.shape
        ((2, 4), (2, 2))
        >>> int(batch.cat[1, 0])  # user_id absent in row 1
        0
        >>> round(float(batch.num[0, 0]), 4)  # log1p(12.5)
        2.6027
    """

    def __init__(self, config: EncoderConfig = EncoderConfig()) -> None:  # noqa: B008
        self.config = config
        self._cat_slots: dict[str, int] = {USER_FIELD: 0, ITEM_FIELD: 1}
        self._num_slots: dict[str, int] = {}
        self._n_cat = 2
        self._n_num = 0
        self.n_dropped_fields = 0
        self.n_unknown_fields = 0  # (batch, field) pairs ignored at inference
        self.n_rejected_fields = 0  # rows whose new field was not admitted while learning
        self._candidates: dict[str, int] = {}  # new field -> training rows seen with it
        self.n_bad_sequences = 0
        self._cat_keys = frozenset(config.categorical_keys)
        # value -> bucket per field; derived data, not state.
        self._cache: dict[str, dict[object, int]] = {}

    # -- slot assignment -------------------------------------------------------------------
    def _is_categorical(self, key: str, value: object) -> bool:
        if key in self._cat_keys:
            return True
        t = type(value)
        if t is float or t is int or t is bool:
            return False
        return not isinstance(value, numbers.Real)

    def _assign_slots(self, row: Mapping[str, object], keys: set[str]) -> None:
        # check-then-assign: a worker encodes on its training and serving threads at once
        with _SLOTS_LOCK:
            self._assign_slots_locked(row, keys)

    def _admit(self, new: set[str], rows_with: Mapping[str, int]) -> set[str]:
        """The names of ``new`` admitted now (``rows_with``: rows of this batch carrying
        each); the others wait in the bounded candidates and are counted."""
        need, cap = self.config.admit_after, self.config.max_candidates
        admitted: set[str] = set()
        with _SLOTS_LOCK:
            for key in new:
                seen = self._candidates.get(key)
                if seen is None and need > 1 and len(self._candidates) >= cap:
                    self.n_rejected_fields += rows_with[key]
                    continue
                seen = (seen or 0) + rows_with[key]
                if seen >= need:
                    self._candidates.pop(key, None)
                    admitted.add(key)
                else:
                    self._candidates[key] = seen
                    self.n_rejected_fields += rows_with[key]
        return admitted

    def _assign_slots_locked(self, row: Mapping[str, object], keys: set[str]) -> None:
        for key in sorted(row):
            value = row[key]
            if value is None or key not in keys or key in SEQ_FIELDS:
                continue
            if self._is_categorical(key, value):
                if key not in self._cat_slots:
                    if self._n_cat < self.config.max_cat_fields:
                        self._cat_slots[key] = self._n_cat
                        self._n_cat += 1
                    elif self.n_dropped_fields < self.config.max_candidates:
                        self._cat_slots[key] = _DROPPED  # remembered (bounded), counted
                        self.n_dropped_fields += 1
            elif key not in self._num_slots:
                if self._n_num < self.config.max_num_fields:
                    self._num_slots[key] = self._n_num
                    self._n_num += 1
                elif self.n_dropped_fields < self.config.max_candidates:
                    self._num_slots[key] = _DROPPED
                    self.n_dropped_fields += 1

    @property
    def cat_fields(self) -> list[str]:
        """Categorical field names in slot order (length <= max_cat_fields)."""
        return [k for k, s in sorted(self._cat_slots.items(), key=lambda kv: kv[1]) if s >= 0]

    @property
    def num_fields(self) -> list[str]:
        """Numeric field names in slot order (length <= max_num_fields)."""
        return [k for k, s in sorted(self._num_slots.items(), key=lambda kv: kv[1]) if s >= 0]

    # -- encoding --------------------------------------------------------------------------
    def encode(self, rows: Sequence[Mapping[str, object]]) -> EncodedBatch:
        """Encode ``B`` rows into an :class:`EncodedBatch`. Rows are not modified."""
        if isinstance(rows, CandidateRows) and getattr(_MODE, "frozen", False):
            return self.encode_candidates(rows.bases, rows.items, rows.extras)
        cfg = self.config
        n = len(rows)
        cat = np.zeros((n, cfg.max_cat_fields), dtype=np.int64)
        num = np.zeros((n, cfg.max_num_fields), dtype=np.float32)
        # Column-wise: rows are grouped by their key tuple (a stream's rows share a few),
        # each group is transposed in C (zip), then each column is converted in bulk (a
        # per-value loop with type checks is ~5x slower in CPython).
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, row in enumerate(rows):
            if type(row) is not dict and not isinstance(row, Mapping):
                raise TypeError(f"row {i} is {type(row).__name__}, expected a mapping")
            keys = tuple(row)
            group = groups.get(keys)
            if group is None:
                groups[keys] = [i]
            else:
                group.append(i)
        columns: dict[str, tuple[list[int], list[object]]] = {}
        alone: list[int] = []  # rows whose key tuple no other row has: value by value
        for keys, idx in groups.items():
            if len(idx) == 1:
                alone.append(idx[0])
                continue
            values = zip(*[tuple(rows[i].values()) for i in idx], strict=True)
            for key, got in zip(keys, values, strict=True):
                col = columns.get(key)
                if col is None:
                    columns[key] = (idx.copy(), list(got))
                else:
                    col[0].extend(idx)
                    col[1].extend(got)
        for i in alone:
            for key, value in rows[i].items():
                col = columns.get(key)
                if col is None:
                    col = columns[key] = ([], [])
                col[0].append(i)
                col[1].append(value)
        split: list[tuple[str, bool, list[int], list[object]]] = []
        for key, (idx, vals) in columns.items():
            if key not in SEQ_FIELDS:
                split.extend(self._split_column(key, idx, vals))
        new = {k for k, c, _, _ in split if k not in (self._cat_slots if c else self._num_slots)}
        if new and getattr(_MODE, "frozen", False):  # inference: ignored, counted
            self.n_unknown_fields += len(new)
        elif new:
            admitted = self._admit(new, {k: len(columns[k][0]) for k in new})
            for row in rows:
                if not admitted.isdisjoint(row):
                    self._assign_slots(row, admitted)
        for key, categorical, idx, vals in split:
            slot = (self._cat_slots if categorical else self._num_slots).get(key, _DROPPED)
            if slot < 0:
                continue
            rows_idx = np.asarray(idx, dtype=np.int64)
            if categorical:
                cat[rows_idx, slot] = self._buckets(key, vals)
            else:
                ok, y = _signed_log1p(np.asarray(vals, dtype=np.float64))
                num[rows_idx[ok], slot] = y[ok]
        if cfg.max_seq_len == 0:
            return EncodedBatch(cat=cat, num=num)
        seq, seq_age = self.encode_sequence(rows, cfg.max_seq_len)
        return EncodedBatch(cat=cat, num=num, seq=seq, seq_age=seq_age)

    def encode_candidates(
        self,
        bases: Sequence[Mapping[str, object]],
        items: Sequence[Sequence[str]],
        extras: Sequence[Sequence[Mapping[str, object]]] | None = None,
    ) -> EncodedBatch:
        """At inference (:func:`frozen_fields`): the :meth:`encode` of the rows
        ``{**bases[q], "item_id": item}`` for each ``item`` of ``items[q]``, query after
        query (``N = sum(len(items[q]))`` rows), each base encoded once: serving ranks
        ~200 candidates per request that differ only in ``item_id``. With ``extras`` (see
        :class:`CandidateRows`) the rows are ``{**bases[q], **extras[q][n], "item_id":
        item}``: the extras are encoded as rows of their own and their slots copied in.

        The arrays are equal to :meth:`encode` of those rows, and so is the count of unknown
        fields; ``n_bad_sequences`` counts a bad ``hist_seq`` once per base, not once per row.
        An extra named like a field of its query's base, the item field or a sequence field
        raises ValueError.

        Example:
            >>> enc = FeatureEncoder(EncoderConfig(num_buckets=1000, max_cat_fields=4))
            >>> bases = [{"user_id": "u1", "position": 1}, {"user_id": "u2", "position": 1}]
            >>> b = enc.encode_candidates(bases, [["i1", "i2"], ["i3"]])
            >>> rows = [{**bases[0], "item_id": "i1"}, {**bases[0], "item_id": "i2"},
            ...         {**bases[1], "item_id": "i3"}]
            >>> bool((b.cat == enc.encode(rows).cat).all()), b.cat.shape
            (True, (3, 4))
        """
        if len(bases) != len(items):
            raise ValueError(f"{len(bases)} bases but {len(items)} item lists")
        kept = [q for q, it in enumerate(items) if it]  # a base without rows adds no field
        base = self.encode([bases[q] for q in kept])
        rep = np.repeat(np.arange(len(kept)), [len(items[q]) for q in kept])
        cat = base.cat[rep]
        flat: list[object] = [item for it in items for item in it]
        cat[:, self._cat_slots[ITEM_FIELD]] = self._buckets(ITEM_FIELD, flat)
        num = base.num[rep]
        if extras is not None:
            self._encode_extras(bases, extras, kept, cat, num)
        if base.seq is None or base.seq_age is None:
            return EncodedBatch(cat=cat, num=num)
        return EncodedBatch(cat=cat, num=num, seq=base.seq[rep],
                            seq_age=base.seq_age[rep])  # fmt: skip

    def _encode_extras(
        self,
        bases: Sequence[Mapping[str, object]],
        extras: Sequence[Sequence[Mapping[str, object]]],
        kept: Sequence[int],
        cat: np.ndarray,
        num: np.ndarray,
    ) -> None:
        """Write the slots of the candidates' ``extras`` (queries ``kept``, in order) into
        ``cat`` (N, Fc) and ``num`` (N, Fn): slots the bases do not use, so zero there."""
        rows = [e for q in kept for e in extras[q]]
        names: set[str] = set()
        for e in rows:
            names.update(e)
        for q in kept:
            clash = names.intersection(bases[q])
            if clash:
                raise ValueError(f"extras {sorted(clash)[:5]} are also in the query's base")
        if ITEM_FIELD in names or not names.isdisjoint(SEQ_FIELDS):
            raise ValueError("extras must not hold the item id or the behaviour sequence")
        if not names:
            return
        take: np.ndarray | slice = slice(None)
        if getattr(_MODE, "frozen", False):
            # a row is encoded alone, so one dict shared by several candidates (the part of
            # an item no user of the batch saw, features.stage.PeekCache) is encoded once;
            # at inference nothing else depends on how many rows hold a field
            first: dict[int, int] = {}
            uniq: list[Mapping[str, object]] = []
            inv = []
            for e in rows:
                k = first.get(id(e))
                if k is None:
                    k = first[id(e)] = len(uniq)
                    uniq.append(e)
                inv.append(k)
            if len(uniq) < len(rows):
                rows, take = uniq, np.asarray(inv, dtype=np.int64)
            if self._encode_float_extras(rows, names, take, num):
                return
        ext = self.encode(rows)  # the extras alone: slots of no base field
        for key in names:
            slot = self._cat_slots.get(key, _DROPPED)
            if slot >= 0:
                cat[:, slot] = ext.cat[take, slot]
            slot = self._num_slots.get(key, _DROPPED)
            if slot >= 0:
                num[:, slot] = ext.num[take, slot]

    def _encode_float_extras(
        self,
        rows: Sequence[Mapping[str, object]],
        names: set[str],
        take: np.ndarray | slice,
        num: np.ndarray,
    ) -> bool:
        """At inference, extras whose values are all Python floats (the historical
        features of :mod:`features`) as numerics without :meth:`encode`'s per-value
        gathering: rows with the same keys in the same order are read as one (R, K)
        matrix. Writes ``num[:, slot]`` of each name from ``rows[take]``, equal to
        :meth:`encode`'s (the same float64 transform; a non-finite value stays 0) and
        counts the names without a slot; False (nothing done) for any other value or
        a name declared categorical."""
        if not names.isdisjoint(self._cat_keys) or not names.isdisjoint(self._cat_slots):
            return False
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(tuple(row), []).append(i)
        mats: list[tuple[tuple[str, ...], np.ndarray, np.ndarray]] = []
        for keys, idx in groups.items():
            if not keys:  # rows without extras (a user without a feature stage)
                continue
            get = operator.itemgetter(*keys)
            vals = [get(rows[i]) for i in idx] if len(keys) > 1 else [
                (rows[i][keys[0]],) for i in idx
            ]  # fmt: skip
            if not set(map(type, itertools.chain.from_iterable(vals))) <= {float}:
                return False
            mats.append((keys, np.asarray(idx, dtype=np.int64), np.array(vals, np.float64)))
        ext = np.zeros((len(rows), num.shape[1]), dtype=np.float32)
        slots = self._num_slots
        for keys, rows_idx, mat in mats:
            for j, key in enumerate(keys):
                slot = slots.get(key, _DROPPED)
                if slot < 0:
                    continue
                ok, y = _signed_log1p(mat[:, j])
                ext[rows_idx[ok], slot] = y[ok]
        self.n_unknown_fields += sum(1 for k in names if k not in slots)
        for key in names:
            slot = slots.get(key, _DROPPED)
            if slot >= 0:
                num[:, slot] = ext[take, slot]
        return True

    def encode_sequence(
        self, rows: Sequence[Mapping[str, object]], max_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The behaviour-sequence block of ``rows``: ``(seq, seq_age)``, int64 and float32
        ``(B, max_len)`` as in :class:`EncodedBatch` (``seq`` hashed as ``item_id``).

        A row without ``hist_seq`` (or with one that is not a list/tuple/array of ids) has
        an all-padding row; ``None`` entries are skipped; ``hist_seq_age`` missing, shorter,
        or with bad entries gives age -1 (unknown) there. The number of rows whose
        ``hist_seq`` was present but unusable is added to ``n_bad_sequences``.
        """
        n = len(rows)
        seq = np.zeros((n, max_len), dtype=np.int64)
        age = np.zeros((n, max_len), dtype=np.float32)
        if max_len == 0:
            return seq, age
        cache = self._cache.get(ITEM_FIELD)
        if cache is None or len(cache) > _CACHE_MAX:
            cache = self._cache[ITEM_FIELD] = {}
        nb = self.config.num_buckets
        for i, row in enumerate(rows):
            items = row.get(SEQ_FIELD)
            if items is None:
                continue
            if isinstance(items, str | bytes) or not isinstance(items, Sequence | np.ndarray):
                self.n_bad_sequences += 1
                continue
            ages = row.get(SEQ_AGE_FIELD)
            if isinstance(ages, str | bytes) or not isinstance(ages, Sequence | np.ndarray):
                ages = ()
            n_ages = len(ages)
            ids: list[int] = []
            row_ages: list[float] = []
            for k, item in enumerate(items):
                if len(ids) == max_len:
                    break
                if item is None or type(item) is bool:
                    continue
                b = cache.get(item)
                if b is None:
                    b = cache[item] = bucket_of(ITEM_FIELD, item, nb)
                ids.append(b)
                row_ages.append(_age(ages[k]) if k < n_ages else -1.0)
            if ids:  # one slice each: numpy's per-element assignment is the slow part
                seq[i, : len(ids)] = ids
                age[i, : len(ids)] = row_ages
        return seq, age

    def _split_column(
        self, key: str, idx: list[int], vals: list[object]
    ) -> list[tuple[str, bool, list[int], list[object]]]:
        """Split one column into its categorical and numeric parts, dropping None."""
        types = set(map(type, vals))
        if types == {str} or (key in self._cat_keys and type(None) not in types):
            return [(key, True, idx, vals)]
        if types <= _NUMERIC_TYPES:
            return [(key, False, idx, vals)]
        ci: list[int] = []
        cv: list[object] = []
        ni: list[int] = []
        nv: list[object] = []
        for i, v in zip(idx, vals, strict=True):
            if v is None:
                continue
            if self._is_categorical(key, v):
                ci.append(i)
                cv.append(v)
            else:
                ni.append(i)
                nv.append(float(v))  # type: ignore[arg-type]  # numbers.Real checked
        out: list[tuple[str, bool, list[int], list[object]]] = []
        if ci:
            out.append((key, True, ci, cv))
        if ni:
            out.append((key, False, ni, nv))
        return out

    def _buckets(self, key: str, vals: list[object]) -> np.ndarray:
        """Bucket ids (N,) of ``key=value``; a bounded per-field cache skips repeat hashing."""
        cache = self._cache.get(key)
        if cache is None or len(cache) > _CACHE_MAX:
            cache = self._cache[key] = {}
        get = cache.get
        nb = self.config.num_buckets

        def miss(v: object) -> int:
            b = cache[v] = bucket_of(key, v, nb)
            return b

        # bool is never cached: True == 1 would alias the int 1 entry ("True" != "1").
        return np.fromiter(
            (b if (b := get(v)) is not None and type(v) is not bool else miss(v) for v in vals),
            dtype=np.int64,
            count=len(vals),
        )

    def bucket_ids(self, field: str, values: Sequence[str]) -> np.ndarray:
        """Bucket ids, int64 ``(N,)``, of ``field=value`` for each value (as in ``encode``)."""
        nb = self.config.num_buckets
        return np.fromiter(
            (bucket_of(field, v, nb) for v in values), dtype=np.int64, count=len(values)
        )

    def collision_rate(self, field: str, values: Sequence[str]) -> float:
        """Fraction, in [0, 1], of the distinct ``values`` of ``field`` that share a bucket
        with another distinct value (0.0 for fewer than two distinct values).

        Repeated values are counted once; two values collide only if they are different
        after encoding (``1`` and ``1.0`` are one value). Use it on a sample of real ids to
        size ``num_buckets``: for ``n`` random ids it is about ``1 - exp(-n / num_buckets)``.

        Example:
            >>> FeatureEncoder(EncoderConfig(num_buckets=2)).collision_rate("item_id", ["a", "b"])
            1.0
        """
        distinct = {_value_str(v) for v in values}
        if len(distinct) < 2:
            return 0.0
        nb = self.config.num_buckets
        buckets = np.fromiter(
            (bucket_of(field, v, nb) for v in distinct), dtype=np.int64, count=len(distinct)
        )
        _, inverse, counts = np.unique(buckets, return_inverse=True, return_counts=True)
        return float((counts[inverse] > 1).sum() / len(distinct))

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Slot assignment as plain containers (safe for ``torch.load(weights_only=True)``)."""
        return {
            "cat_slots": dict(self._cat_slots),
            "num_slots": dict(self._num_slots),
            "n_dropped_fields": self.n_dropped_fields,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a slot assignment written by :meth:`state_dict`."""
        cat_slots = {str(k): int(v) for k, v in state["cat_slots"].items()}
        num_slots = {str(k): int(v) for k, v in state["num_slots"].items()}
        if cat_slots.get(USER_FIELD) != 0 or cat_slots.get(ITEM_FIELD) != 1:
            raise ValueError("encoder state must map user_id -> 0 and item_id -> 1")
        n_cat = 1 + max(cat_slots.values())
        n_num = 1 + max(num_slots.values(), default=-1)
        if n_cat > self.config.max_cat_fields or n_num > self.config.max_num_fields:
            raise ValueError(
                f"encoder state uses {n_cat} categorical / {n_num} numeric slots, more than "
                f"the configured {self.config.max_cat_fields} / {self.config.max_num_fields}"
            )
        self._cat_slots, self._num_slots = cat_slots, num_slots
        self._n_cat, self._n_num = n_cat, n_num
        self.n_dropped_fields = int(state.get("n_dropped_fields", 0))
