"""The feature stage: point-in-time historical features over impressions and clicks.

Events are processed in **arrival order** (the order a partition delivers them). For an
impression with event time ``t`` the stage returns, *before* the impression changes any
state, features over the events that arrived before it and are visible at ``t``:

* impressions (first arrival of each ``impression_id``) with ``ts < t`` (strictly);
* clicks with ``click_ts < t``. A click is attributed through its impression (user, item,
  ``item_*`` attributes, position): it counts from its arrival, or from its impression's
  arrival when the click came first. A click never counts for its own impression
  (features are computed before it is applied, and its ``click_ts`` is never below its
  impression's ``ts`` in a valid log).

Per key (user, item, user x item, user x each string ``item_*`` attribute, item x position)
and per half-life ``h`` (default 1 h, 1 day, 30 days) the decayed counts
``sum(0.5 ** ((t - t_e) / h))`` of visible impressions and clicks, and a smoothed CTR
``(clk + prior * strength) / (imp + strength)``. Recency: seconds since the user's last
visible impression and click, since this user last saw this item, and how many times this
user saw this item (undecayed). Sequence: the user's last ``seq_len`` visible clicks,
most recent first (ties in ``click_ts`` broken by application order: later applied =
more recent), with their ages ``t - click_ts``. Counts and seconds are log1p-scaled
(``hist_*`` floats); a recency is absent when there is none; ``hist_seq`` is absent when the
user has no visible click.

**Out of order.** Each key keeps its aggregates at its newest event time ``R`` and a small
buffer of its recent events (event times above ``R - lateness_s``, at most
``max_buffer`` of them). A query at ``t > R`` is exact from the aggregates; a query at
``t <= R`` subtracts the buffered events at or after ``t`` and is exact whenever no
evicted event is at or after ``t`` (i.e. the impression is at most ``lateness_s`` older than
the key's newest event and the buffer did not overflow); otherwise it is an approximation,
counted in ``stats['approximate']``. The click sequence keeps ``seq_keep`` clicks per user
(oldest dropped), exact under the same kind of rule.

**Duplicates** are idempotent: a second impression with a known ``impression_id`` changes
nothing and gets no features (``None``); a second click on an impression is ignored.
Impression ids are remembered ``impression_ttl_s`` of event time (the click attribution
window); a click whose impression never arrived within that time is an orphan and never
counts. A key (and a user's click sequence) whose newest event is more than ``ttl_s`` of
event time before a read has expired: it reads as never seen, and an update starts it
afresh (counted in ``expired_keys``). That is exact at every read, whatever the sweeps do:
they only free expired keys' memory, every ``ttl_s / 16`` of event time (they used to run
every ``impression_ttl_s``, a full pass over the keys that took a third of the stage's
time on a log with sparse event times such as the MovieLens dev log). Past ``max_keys``
the least recently updated keys are evicted (counted).

**Bounded by bytes.** :meth:`FeatureStage.approx_bytes` estimates the stage's memory from
its counts (keys, impression ids, early clicks, sequence entries; per-entry sizes measured
with tracemalloc, see ``tests/unit/features/test_stage_budget.py``). Past
``max_bytes`` the stage sheds, in this order and with hysteresis: the oldest impression ids
(when they hold more than 40% of the budget; a later click on one of them becomes an
orphan), the sequences of the users who clicked longest ago (over 20%), then the least
recently updated keys. Every shed is counted in ``stats``; the decisions depend only on
the calls, so a restore that replays the journal reaches the same state.

**Compiled.** The keys' records live in numpy arrays (:class:`features.records.KeyTable`,
a slot per key string) and every count, decay and read runs in a numba kernel
(:mod:`features.kernel`) with the same float operations in the same order as the
pure-Python stage it replaced (outputs and ``state_dict()`` bit-identical:
``bench.features_vs_ref``). Python stages a batch of events (duplicates, early clicks, the
click sequence, sweeps and shedding, which flush the batch first when they need the keys'
times), the kernel runs it in one call, and Python names the values. ``state_dict()`` is
the same JSON as before (lists, dicts, str, float); one stage per partition.

>>> st = FeatureStage(FeatureConfig(half_lives_s=(3600.0,)))
>>> st.impression("a", 100.0, "u1", "i1")["hist_ui_n"]
0.0
>>> st.click("a", 130.0)
True
>>> f = st.impression("b", 160.0, "u1", "i1")
>>> round(f["hist_ui_n"], 4), f["hist_seq"], f["hist_seq_age"]
(0.6931, ['i1'], [30.0])
"""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from features.config import MAX_NAME_LEN, FeatureConfig
from features.kernel import APPLY, APPROXIMATE, CLICK, EXPIRED, IMPRESSION, read_rows, run_events
from features.records import NEVER, KeyTable

_SEP = "\x1f"  # between the parts of a key (its kind's letter, user, item, ...)
_KINDS = ("user", "item", "ui")
_KINDS_POS = (*_KINDS, "item_pos")
_NEG_INF = NEVER
_LN2 = math.log(2.0)
_NO = -2  # a key position an impression does not have (features.kernel)
_UNKNOWN = -1  # a key the state does not hold (reads only)
_CHUNK = 4096  # events per kernel call in process (bounds the batch's arrays)
_CATS_CACHE = 65_536  # distinct item_* attribute tuples shared by impression entries


def _pair_key(user: str, item: str) -> str:
    """The state key of a user x item pair."""
    return f"p\x1f{user}\x1f{item}"


def _item_keys(user: str, item: str, position: int | None) -> tuple[str, str, str]:
    """The state keys of an item, of the user x item pair and of the item x position
    (``""``, a key never held, when ``position`` is unknown)."""
    q = "" if position is None else f"q\x1f{item}\x1f{position!s}"
    return f"i\x1f{item}", _pair_key(user, item), q


def _label(h: float) -> str:
    if h % 86_400 == 0:
        return f"{int(h // 86_400)}d"
    if h % 3600 == 0:
        return f"{int(h // 3600)}h"
    return f"{int(h)}s"


# Bytes per entry for approx_bytes (CPython 3.11, tracemalloc; the budget test re-measures):
# a key's dict entry and string (its array rows are counted from their width); an impression
# id with its entry; an early click; one entry of a user's click sequence.
KEY_DICT_BYTES = 150
IMPRESSION_BYTES = 420
EARLY_CLICK_BYTES = 260
SEQUENCE_ENTRY_BYTES = 220


class PeekCache:
    """Each item's own parts of :meth:`FeatureStage.peek_many` at one ``ts`` and
    ``position`` of one stage, shared by the users of a serving batch (build one per
    batch; the stage may change between batches). ``items``: item -> the part (item, user
    x item, item x position features) of a user who never saw the item."""

    __slots__ = ("items", "position", "stage", "ts")

    def __init__(self, stage: FeatureStage, ts: float, position: int | None) -> None:
        self.stage, self.ts, self.position = stage, ts, position
        self.items: dict[str, dict[str, object]] = {}


class FeatureStage:
    """Point-in-time historical features, state inside (see the module docstring)."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = c = config or FeatureConfig()
        h = len(c.half_lives_s)
        self._kt = KeyTable(h, c.max_buffer)
        self._rates = np.array([_LN2 / x for x in c.half_lives_s])
        self._params = np.array(
            [c.lateness_s, c.ttl_s, c.ctr_prior * c.ctr_strength, c.ctr_strength, c.ctr_prior]
        )
        self._k = 4 + c.max_attributes  # key positions of an impression (features.kernel)
        self._unknown = [_UNKNOWN] * self._k
        self._rbuf = np.empty((64, 3 * h * self._k + 4))  # the reads' output rows, reused
        self._pad = [_NO] * self._k
        self._labels = [_label(x) for x in c.half_lives_s]
        # the longest item_* attribute name whose features (hist_u_<name>_imp_<label>)
        # stay within MAX_NAME_LEN
        self._max_attr_name = MAX_NAME_LEN - len("hist_u__imp_") - max(map(len, self._labels))
        # kinds (user, item, ...) -> (feature names in kernel order, the names that may be
        # NaN there: absent recencies)
        self._names: dict[tuple[str, ...], tuple[list[str], tuple[str, ...]]] = {}
        # impression_id -> [ts, user, item, position, ((item_* name, value), ...), clicked]
        # (its keys are rebuilt when a click comes: ~3x smaller than keeping them)
        # (tuples of atomic values and one shared ``cats`` tuple: once the collector has
        # seen them it stops tracking them, so they add nothing to later collections)
        self._imps: dict[str, tuple[Any, ...]] = {}
        # each distinct ``cats`` tuple once (at most _CATS_CACHE of them, then cleared)
        self._cats: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
        # impression_id -> [click_ts, arrival ts-of-stage] (click before its impression)
        self._early: dict[str, list[float]] = {}
        # user -> [horizon, [(click_ts, order, item), ...] sorted ascending]
        self._seq: dict[str, list[Any]] = {}
        self._order = 0
        self._n_seq = 0  # entries over all users' sequences
        self._now = _NEG_INF
        self._last_sweep = _NEG_INF
        self._last_early_sweep = _NEG_INF
        self._last_imp_sweep = _NEG_INF
        # the batch of events staged for the kernel: kinds, times, slots (flat, K each),
        # and per event (its position in ``_out``, its feature names and those that may be
        # absent, its sequence) or None
        self._pk: list[int] = []
        self._pt: list[float] = []
        self._ps: list[int] = []
        self._pm: list[tuple[int, list[str], tuple[str, ...], Any] | None] = []
        self._out: list[dict[str, object] | None] = []
        self.stats: dict[str, int] = {
            "impressions": 0,
            "clicks": 0,
            "duplicate_impressions": 0,
            "duplicate_clicks": 0,
            "early_clicks": 0,
            "orphan_clicks": 0,
            "approximate": 0,
            "expired_keys": 0,
            "evicted_keys": 0,
            "evicted_impressions": 0,
            "evicted_sequences": 0,
            "skipped_attributes": 0,
        }

    # ---------------------------------------------------------------- public API
    def process(self, events: Iterable[Any]) -> list[dict[str, object] | None]:
        """Batch-first entry: events in arrival order (impressions: objects with
        ``item_id``; clicks: without). Returns one entry per event: the impression's
        features (``None`` for a duplicate), ``None`` for a click.

        The same values and state as calling :meth:`impression` / :meth:`click` per event
        (``tests/unit/features/test_stage_batch.py``), in one call of the compiled kernel
        (:mod:`features.kernel`) for the whole batch. The cyclic garbage collector is
        paused for the batch (the stage's state holds no reference cycles, and its
        collections of the growing state cost ~30% of the stage's time; see README
        "Memory and speed") and restored afterwards, also on error."""
        out: list[dict[str, object] | None] = []
        self._out = out
        append = out.append
        stage_imp, click = self._stage_impression, self._stage_click
        with paused_gc():
            try:
                for e in events:
                    append(None)
                    if hasattr(e, "item_id"):
                        stage_imp(len(out) - 1, e.impression_id, e.ts, e.user_id, e.item_id,
                                  e.position, e.features)  # fmt: skip
                    else:
                        click(e.impression_id, e.ts)
                    if len(self._pk) >= _CHUNK:
                        self._flush()
            finally:  # what was staged before an error is applied, as per event
                self._flush()
        return out

    def impression(
        self,
        impression_id: str,
        ts: float,
        user_id: str,
        item_id: str,
        position: int | None = None,
        attrs: Mapping[str, object] | None = None,
    ) -> dict[str, object] | None:
        """Features of this impression as of ``ts``, then the impression is applied.
        ``None`` (and no change) for a duplicate ``impression_id``."""
        out: list[dict[str, object] | None] = [None]
        self._out = out
        self._stage_impression(0, impression_id, ts, user_id, item_id, position, attrs)
        self._flush()
        return out[0]

    def click(self, impression_id: str, ts: float, user_id: str | None = None) -> bool:
        """Apply a click at event time ``ts``. True when it was applied or kept for its
        impression; False for a duplicate. ``user_id`` is informational."""
        got = self._stage_click(impression_id, ts)
        self._flush()
        return got

    def peek(
        self,
        ts: float,
        user_id: str,
        item_id: str,
        position: int | None = None,
        attrs: Mapping[str, object] | None = None,
    ) -> dict[str, object]:
        """The features an impression with these fields would get at ``ts``; changes no
        state (serving)."""
        cats = self._categoricals(attrs)
        kinds = self._kinds(position, cats)
        row = self._row(user_id, item_id, position, cats, alloc=False)
        out = self._read(row, ts, [kinds])[0]
        self._sequence_into(out, ts, user_id, count=False)
        return out

    def peek_many(
        self,
        ts: float,
        user_id: str,
        item_ids: Sequence[str],
        position: int | None = None,
        attrs: Mapping[str, object] | None = None,
        cache: PeekCache | None = None,
    ) -> tuple[dict[str, object], list[dict[str, object]], dict[str, object]]:
        """:meth:`peek` of one user's impression of each of ``item_ids`` (N,) at ``ts``, the
        user's part computed once (serving ranks N candidates per request): ``(head,
        parts, tail)`` with ``{**head, **parts[n], **tail} == peek(ts, user_id,
        item_ids[n], position, attrs)``, values and key order alike. ``head``: the user's
        counters and recency; ``parts[n]``: the item's, the user x item pair's and the
        item x position's; ``tail``: the user x attribute counters and the behaviour
        sequence. Changes no state; one kernel call for the whole request.

        ``cache``: a :class:`PeekCache` of this stage at this ``ts`` and ``position``,
        shared by the users of one serving batch: each item's own counters (and the item x
        position's) are computed once per batch, not once per user, and a candidate the
        user never saw gets the one shared (read-only) part of that item. Without counters
        it is ignored.
        """
        cats = self._categoricals(attrs)
        k, no, slots = self._k, [_NO], self._kt.slots
        full = self._row(user_id, "", position, cats, alloc=False)
        head_row = [full[0], *no * (k - 1)]
        tail_row = [*no * 4, *full[4:]]
        item_kinds = _KINDS_POS[1:] if position is not None else _KINDS[1:]
        rows: list[int] = head_row  # flat: K slots a row
        kinds: list[tuple[str, ...]] = [("user",)]
        todo: list[tuple[int, str, bool]] = []  # (n, item, seen) of the parts to compute
        parts: list[dict[str, object]] = [{}] * len(item_ids)
        use_cache = cache is not None and self.config.counters
        if use_cache:
            assert cache is not None
            if cache.stage is not self or cache.ts != ts or cache.position != position:
                raise ValueError("the PeekCache is of another stage, time or position")
        get, pad = slots.get, no * (k - 4)
        for n, item in enumerate(item_ids):
            seen = True
            if use_cache:  # a hit needs the pair's key alone
                assert cache is not None
                seen = _pair_key(user_id, item) in slots
                got = None if seen else cache.items.get(item)
                if got is not None:
                    parts[n] = got
                    continue
            # the item's slots as _row gives them (alloc=False)
            key_i, pair, key_q = _item_keys(user_id, item, position)
            rows += [
                _NO,
                get(key_i, _UNKNOWN),
                get(pair, _UNKNOWN),
                _NO if position is None else get(key_q, _UNKNOWN),
                *pad,
            ]  # fmt: skip
            kinds.append(item_kinds)
            todo.append((n, item, seen))
        rows += tail_row
        kinds.append(tuple("u_" + name for name, _ in cats))
        got_all = self._read(rows, ts, kinds)
        for (n, item, seen), got in zip(todo, got_all[1:-1], strict=True):
            if use_cache and not seen:
                assert cache is not None
                got = cache.items.setdefault(item, got)
            parts[n] = got
        tail = got_all[-1]
        self._sequence_into(tail, ts, user_id, count=False)
        return got_all[0], parts, tail

    def n_keys(self) -> dict[str, int]:
        """Tracked keys by kind (u, i, p, a, q), impressions and early clicks held."""
        out = {"u": 0, "i": 0, "p": 0, "a": 0, "q": 0}
        for k in self._kt.slots:
            out[k[0]] += 1
        out["impressions"] = len(self._imps)
        out["early_clicks"] = len(self._early)
        out["sequences"] = len(self._seq)
        return out

    def approx_bytes(self) -> int:
        """Estimated memory of the state, bytes (O(1): counts times measured sizes)."""
        return (
            len(self._kt) * self._key_bytes()
            + self._id_bytes()
            + self._n_seq * SEQUENCE_ENTRY_BYTES
        )

    def _key_bytes(self) -> int:
        """Estimated bytes of one key: its dict entry and its array rows (record, buffer,
        buffer length; times 1.2 for the arrays' spare rows, features.records)."""
        return KEY_DICT_BYTES + int(9.6 * (self._kt.width + self._kt.B.shape[1] + 1))

    def _id_bytes(self) -> int:
        """Estimated bytes of the remembered impression ids and early clicks."""
        return len(self._imps) * IMPRESSION_BYTES + len(self._early) * EARLY_CLICK_BYTES

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state (lists, dicts, str, float, int)."""
        kt = self._kt

        def rec(s: int) -> list[Any]:
            v = kt.record(s)
            return [None if x == _NEG_INF else x for x in v[:-1]] + [v[-1]]

        return {
            "version": 2,
            "keys": {k: rec(s) for k, s in kt.slots.items()},
            "imps": {
                k: [v[0], v[1], v[2], v[3], [list(x) for x in v[4]], v[5]]
                for k, v in self._imps.items()
            },
            "early": {k: list(v) for k, v in self._early.items()},
            "seq": {
                u: [None if v[0] == _NEG_INF else v[0], [list(x) for x in v[1]]]
                for u, v in self._seq.items()
            },
            "order": self._order,
            "now": None if self._now == _NEG_INF else self._now,
            "last_sweep": None if self._last_sweep == _NEG_INF else self._last_sweep,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version = state.get("version")
        if version not in (1, 2):
            raise ValueError(f"unknown feature state version {version!r}")
        kt = self._kt
        kt.clear()
        for k, v in state["keys"].items():
            kt.load(k, [(_NEG_INF if x is None else x) for x in v[:-1]] + [v[-1]])
        if version == 1:  # [ts, user, item, [(prefix, key), ...], clicked]
            self._imps = {k: _imp_from_v1(v) for k, v in state["imps"].items()}
        else:
            self._imps = {
                k: (v[0], v[1], v[2], v[3], tuple((a, b) for a, b in v[4]), v[5])
                for k, v in state["imps"].items()
            }
        self._early = {k: list(v) for k, v in state["early"].items()}
        self._seq = {
            u: [_NEG_INF if v[0] is None else v[0], [tuple(c) for c in v[1]]]
            for u, v in state["seq"].items()
        }
        self._order = int(state["order"])
        self._n_seq = sum(len(v[1]) for v in self._seq.values())
        self._now = _NEG_INF if state["now"] is None else float(state["now"])
        ls = state["last_sweep"]
        self._last_sweep = _NEG_INF if ls is None else float(ls)
        self.stats.update(state.get("stats", {}))

    # ---------------------------------------------------------------- staging
    def _stage_impression(
        self,
        at: int,
        impression_id: str,
        ts: float,
        user_id: str,
        item_id: str,
        position: int | None,
        attrs: Mapping[str, object] | None,
    ) -> None:
        """Stage an impression for the kernel (its features go to ``_out[at]``), in
        arrival order; ``_out[at]`` stays ``None`` for a duplicate."""
        ts = float(ts)  # before any change: a bad time fails here, the state intact
        if impression_id in self._imps:
            self.stats["duplicate_impressions"] += 1
            return
        c = self.config
        cats = self._categoricals(attrs, count=True) if attrs else ()
        self._pk.append(IMPRESSION if c.counters else APPLY)
        self._pt.append(ts)
        self._ps += self._row(user_id, item_id, position, cats)
        seq = self._sequence(ts, user_id) if c.sequence and c.seq_len else None
        if c.counters:
            names, maybe = self._names_of(self._kinds(position, cats))
        else:
            names, maybe = [], ()
        self._pm.append((at, names, maybe, seq))
        self.stats["impressions"] += 1
        if cats:
            shared = self._cats.get(cats)
            if shared is None:
                if len(self._cats) >= _CATS_CACHE:
                    self._cats.clear()
                shared = self._cats[cats] = cats
            cats = shared
        imp = (ts, user_id, item_id, position, cats, 0)
        self._imps[impression_id] = imp
        early = self._early.pop(impression_id, None)
        if early is not None:
            self._click_apply(impression_id, imp, early[0])
        if ts > self._now:
            self._now = ts
            self._maybe_sweep()

    def _stage_click(self, impression_id: str, ts: float) -> bool:
        ts = float(ts)
        imp = self._imps.get(impression_id)
        if imp is None:
            if impression_id in self._early:
                self.stats["duplicate_clicks"] += 1
                return False
            self._early[impression_id] = [ts, self._now]
            self.stats["early_clicks"] += 1
            return True
        if imp[5]:
            self.stats["duplicate_clicks"] += 1
            return False
        self._click_apply(impression_id, imp, ts)
        return True

    def _flush(self) -> None:
        """Run the staged events through the kernel and write the impressions' feature
        dicts into ``_out``."""
        if not self._pk:
            return
        kinds = np.array(self._pk, dtype=np.int8)
        n = len(kinds)
        slots = np.array(self._ps, dtype=np.int64).reshape(n, self._k)
        ts = np.array(self._pt, dtype=np.float64)
        res = np.empty((n, 3 * len(self._labels) * self._k + 4))
        stats = np.zeros(2, dtype=np.int64)
        kt = self._kt
        done = 0
        while True:
            done = run_events(
                kt.F, kt.B, kt.BL, kinds, ts, slots, self._rates, self._params,
                self.config.max_buffer, res, stats, done,
            )  # fmt: skip
            if done == n:
                break
            kt.widen()
        self.stats["approximate"] += int(stats[APPROXIMATE])
        self.stats["expired_keys"] += int(stats[EXPIRED])
        out = self._out
        width = max((len(m[1]) for m in self._pm if m is not None), default=0)
        for row, meta in zip(res[:, :width].tolist(), self._pm, strict=True):
            if meta is None:
                continue
            at, names, maybe, seq = meta
            d = _named(names, maybe, row)
            if seq is not None:
                d["hist_seq"], d["hist_seq_age"] = seq
            out[at] = d
        self._pk.clear()
        self._pt.clear()
        self._ps.clear()
        self._pm.clear()

    def _read(
        self, rows: list[int], ts: float, kinds: list[tuple[str, ...]]
    ) -> list[dict[str, object]]:
        """The features at ``ts`` of each row of slots (``rows``: N rows of K slots, flat;
        :mod:`features.kernel`), row ``n`` named by ``kinds[n]``; changes no state."""
        n = len(kinds)
        if not self.config.counters:
            return [{} for _ in range(n)]
        if self._rbuf.shape[0] < n:
            self._rbuf = np.empty((max(n, 2 * self._rbuf.shape[0]), self._rbuf.shape[1]))
        res = self._rbuf[:n]
        kt = self._kt
        slots = np.array(rows, dtype=np.int64).reshape(n, self._k)
        read_rows(kt.F, kt.B, kt.BL, slots, float(ts), self._rates, self._params,
                  self.config.max_buffer, res)  # fmt: skip
        named = [self._names_of(kk) for kk in kinds]
        width = max(len(nm[0]) for nm in named)  # the columns any row has (of 3H K + 4)
        return [_named(nm, maybe, row) for (nm, maybe), row in
                zip(named, res[:, :width].tolist(), strict=True)]  # fmt: skip

    # ---------------------------------------------------------------- internals
    def _categoricals(
        self, attrs: Mapping[str, object] | None, count: bool = False
    ) -> tuple[tuple[str, str], ...]:
        """The string ``item_*`` attributes that get user x attribute keys, in order: at
        most ``max_attributes``, none whose feature names would be too long (``count``:
        the skipped ones into ``stats["skipped_attributes"]``)."""
        if not attrs:
            return ()
        out: list[tuple[str, str]] = []
        cap, longest = self.config.max_attributes, self._max_attr_name
        skipped = 0
        for name, value in attrs.items():
            if name.startswith("item_") and isinstance(value, str):
                if len(out) < cap and len(name) <= longest:
                    out.append((name, value))
                else:
                    skipped += 1
        if skipped and count:
            self.stats["skipped_attributes"] += skipped
        return tuple(out)

    @staticmethod
    def _kinds(position: int | None, cats: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
        """The kinds of key an impression touches, in feature order: ``user``, ``item``,
        ``ui``, ``item_pos`` when ``position`` is known, ``u_<attribute>`` per attribute."""
        kinds = _KINDS if position is None else _KINDS_POS
        if cats:
            return (*kinds, *["u_" + name for name, _ in cats])
        return kinds

    def _row(
        self,
        user: str,
        item: str,
        position: int | None,
        cats: tuple[tuple[str, str], ...],
        alloc: bool = True,
    ) -> list[int]:
        """The slots (K,) of the keys an impression touches, by key position (see
        :mod:`features.kernel`). ``alloc``: a key the state does not hold gets a slot
        (in key order), else reads as ``-1``."""
        keys = [f"u\x1f{user}", *_item_keys(user, item, position)]
        if cats:
            keys += [f"a\x1f{user}\x1f{name}\x1f{value}" for name, value in cats]
        row = list(map(self._kt.slots.get, keys, self._unknown))
        if position is None:
            row[3] = _NO
        if alloc and _UNKNOWN in row:
            slot = self._kt.slot
            row = [slot(k) if s == _UNKNOWN else s for k, s in zip(keys, row, strict=True)]
        if len(row) < self._k:
            row += self._pad[: self._k - len(row)]
        return row

    def _names_of(self, kinds: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
        """The feature names the kernel writes for keys of ``kinds`` (in its order), and
        those of them that may be absent (NaN: no such event)."""
        got = self._names.get(kinds)
        if got is None:
            names: list[str] = []
            maybe: list[str] = []
            for ent in kinds:
                for lab in self._labels:
                    names += [f"hist_{ent}_imp_{lab}", f"hist_{ent}_clk_{lab}",
                              f"hist_{ent}_ctr_{lab}"]  # fmt: skip
                if ent == "user":
                    names += ["hist_user_since_imp", "hist_user_since_clk"]
                    maybe += ["hist_user_since_imp", "hist_user_since_clk"]
                elif ent == "ui":
                    names += ["hist_ui_n", "hist_ui_since_imp"]
                    maybe.append("hist_ui_since_imp")
            got = self._names[kinds] = (names, tuple(maybe))
        return got

    def _sequence(self, t: float, user: str) -> tuple[list[str], list[float]] | None:
        """The user's last ``seq_len`` clicks visible at ``t`` (items, ages), most recent
        first; None when there is none (an approximate answer is counted)."""
        c = self.config
        s = self._seq.get(user)
        if s is None or not s[1] or s[1][-1][0] < t - c.ttl_s:  # none, or expired
            return None
        clicks = s[1]
        hi = len(clicks)
        while hi and clicks[hi - 1][0] >= t:
            hi -= 1
        lo = max(0, hi - c.seq_len)
        if s[0] != _NEG_INF and (hi - lo < c.seq_len or clicks[lo][0] <= s[0]):
            # older clicks were dropped and may belong to the answer
            self.stats["approximate"] += 1
        if hi <= lo:
            return None
        picked = clicks[lo:hi][::-1]
        return [x[2] for x in picked], [t - x[0] for x in picked]

    def _sequence_into(
        self, out: dict[str, object], t: float, user: str, count: bool = True
    ) -> None:
        """Add the user's sequence at ``t`` to ``out`` (``count``: an approximate answer
        counts in ``stats``)."""
        if not (self.config.sequence and self.config.seq_len):
            return
        approx = self.stats["approximate"]
        seq = self._sequence(t, user)
        if not count:
            self.stats["approximate"] = approx
        if seq is not None:
            out["hist_seq"], out["hist_seq_age"] = seq

    def _click_apply(self, impression_id: str, imp: tuple[Any, ...], ts: float) -> None:
        self._imps[impression_id] = (*imp[:5], 1)  # clicked (its place in the order kept)
        self.stats["clicks"] += 1
        self._pk.append(CLICK)
        self._pt.append(ts)
        self._ps += self._row(imp[1], imp[2], imp[3], imp[4])
        self._pm.append(None)
        if self.config.sequence:
            user = imp[1]
            s = self._seq.get(user)
            if s is not None and (not s[1] or s[1][-1][0] < ts - self.config.ttl_s):
                self._n_seq -= len(s[1])  # idle past the TTL: expired, a new one starts
                s = None
            if s is None:
                s = self._seq[user] = [_NEG_INF, []]
            self._order += 1
            clicks = s[1]
            entry = (ts, self._order, imp[2])
            i = len(clicks)
            while i and clicks[i - 1][0] > ts:
                i -= 1
            clicks.insert(i, entry)
            self._n_seq += 1
            if len(clicks) > self.config.seq_keep:
                self._n_seq -= 1
                dropped = clicks.pop(0)
                if dropped[0] > s[0]:
                    s[0] = dropped[0]

    def _maybe_sweep(self) -> None:
        c = self.config
        now = self._now
        # impression ids (click attribution window), in arrival order, every 1/16 of it
        if self._imps and now - self._last_imp_sweep >= c.impression_ttl_s / 16.0:
            self._last_imp_sweep = now
            cut = now - c.impression_ttl_s
            stale = []
            for iid, imp in self._imps.items():
                if imp[0] >= cut:
                    break
                stale.append(iid)
            for iid in stale:
                del self._imps[iid]
        if self._early and now - self._last_early_sweep >= c.impression_ttl_s / 8.0:
            self._last_early_sweep = now
            cut = now - c.impression_ttl_s
            stale = [iid for iid, v in self._early.items() if v[0] < cut]
            if stale:
                for iid in stale:
                    del self._early[iid]
                self.stats["orphan_clicks"] += len(stale)
        if (
            now - self._last_sweep < c.ttl_s / 16.0
            and len(self._kt) <= c.max_keys
            and self.approx_bytes() <= c.max_bytes
        ):
            return
        self._flush()  # the sweep reads the keys' newest event times
        self._last_sweep = now
        cut = now - c.ttl_s
        keys, r = self._kt.times()
        stale_k = [keys[j] for j in np.flatnonzero(r < cut).tolist()]
        self._kt.drop(stale_k)
        self.stats["expired_keys"] += len(stale_k)
        stale_u = [u for u, s in self._seq.items() if not s[1] or s[1][-1][0] < cut]
        for u in stale_u:
            self._n_seq -= len(self._seq.pop(u)[1])
        self._shed()

    def _shed(self) -> None:
        """Enforce ``max_keys`` and ``max_bytes`` (see the module docstring), shedding to
        90% of each share so that the next shed is ~10% of the state away."""
        c = self.config
        budget = c.max_bytes
        imp_bytes = self._id_bytes()
        if imp_bytes > 0.4 * budget:
            # arrival order is dict order: drop the oldest-arrived ids
            n_drop = len(self._imps) - int(0.36 * budget / IMPRESSION_BYTES)
            if n_drop > 0:
                for iid in list(itertools.islice(self._imps, n_drop)):
                    del self._imps[iid]
                self.stats["evicted_impressions"] += n_drop
            n_early = len(self._early) - int(0.04 * budget / EARLY_CLICK_BYTES)
            if n_early > 0:
                for iid in list(itertools.islice(self._early, n_early)):
                    del self._early[iid]
                self.stats["orphan_clicks"] += n_early
            imp_bytes = self._id_bytes()
        if self._n_seq * SEQUENCE_ENTRY_BYTES > 0.2 * budget:
            target = int(0.18 * budget / SEQUENCE_ENTRY_BYTES)
            users = sorted(
                self._seq, key=lambda u: self._seq[u][1][-1][0] if self._seq[u][1] else _NEG_INF
            )
            for u in users:
                if self._n_seq <= target:
                    break
                self._n_seq -= len(self._seq.pop(u)[1])
                self.stats["evicted_sequences"] += 1
        room = budget - imp_bytes - self._n_seq * SEQUENCE_ENTRY_BYTES
        cap = min(c.max_keys, max(1, int(room // self._key_bytes())))
        if len(self._kt) > cap:
            extra = len(self._kt) - int(cap * 0.9)
            # the least recently updated first, ties in insertion order (a stable sort)
            keys, r = self._kt.times()
            order = np.argsort(r, kind="stable")[:extra]
            self._kt.drop([keys[j] for j in order.tolist()])
            self.stats["evicted_keys"] += extra


def _named(names: list[str], maybe: tuple[str, ...], row: list[float]) -> dict[str, object]:
    """A kernel's output ``row`` (at least as long as ``names``) as features: named, in
    order, without the absent (NaN) ones among ``maybe``."""
    d: dict[str, object] = dict(zip(names, row, strict=False))
    for name in maybe:
        v = d[name]
        if v != v:
            del d[name]
    return d


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for a batch of stage calls (when it was
    enabled), and restore it afterwards, also on error. The stage's state holds no
    reference cycles, so nothing leaks; without the pause the collector's repeated passes
    over the growing state cost ~30% of the stage's time (README "Memory and speed")."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _imp_from_v1(v: Sequence[Any]) -> tuple[Any, ...]:
    """A version-1 impression entry (it kept its keys) in today's form."""
    position: int | None = None
    cats: list[tuple[str, str]] = []
    for _, key in v[3]:
        parts = key.split(_SEP)
        if parts[0] == "q":
            position = int(parts[2])
        elif parts[0] == "a":
            cats.append((parts[2], parts[3]))
    return (v[0], v[1], v[2], position, tuple(cats), v[4])
