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

State is plain lists/dicts of str/float (``state_dict()`` is JSON-serialisable); one stage
per partition.

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
import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from features.config import MAX_NAME_LEN, FeatureConfig
from features.records import COUNT, NEVER, TIME, KeyRecords

_SEP = "\x1f"  # between the parts of a key (its kind's letter, user, item, ...)
_KINDS = ("user", "item", "ui")
_KINDS_POS = (*_KINDS, "item_pos")
_NEG_INF = NEVER
_R, _N = TIME, COUNT


def _pair_key(user: str, item: str) -> str:
    """The state key of a user x item pair."""
    return f"p\x1f{user}\x1f{item}"


def _label(h: float) -> str:
    if h % 86_400 == 0:
        return f"{int(h // 86_400)}d"
    if h % 3600 == 0:
        return f"{int(h // 3600)}h"
    return f"{int(h)}s"


# Bytes per entry for approx_bytes (CPython 3.11, tracemalloc; the budget test re-measures):
# a key record with a few buffered events and its dict slot; an impression id with its
# entry; an early click; one entry of a user's click sequence.
KEY_BYTES = 640
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
        self._rec = kr = KeyRecords(c.half_lives_s, c.lateness_s, c.max_buffer)
        self._h, self._rates, self._c0 = kr.h, kr.rates, kr.c0
        self._last_imp, self._last_clk = kr.last_imp, kr.last_clk
        self._labels = [_label(h) for h in c.half_lives_s]
        # the longest item_* attribute name whose features (hist_u_<name>_imp_<label>)
        # stay within MAX_NAME_LEN
        self._max_attr_name = MAX_NAME_LEN - len("hist_u__imp_") - max(map(len, self._labels))
        # kind -> per half-life (imp name, clk name, ctr name, rate 1/s, imp index, clk
        # index in a key record)
        self._names: dict[str, list[tuple[str, str, str, float, int, int]]] = {}
        # kind -> the features of a key never seen (in feature order)
        self._empty: dict[str, dict[str, object]] = {}
        self._keys: dict[str, list[Any]] = {}
        # impression_id -> [ts, user, item, position, ((item_* name, value), ...), clicked]
        # (its keys are rebuilt when a click comes: ~3x smaller than keeping them)
        self._imps: dict[str, list[Any]] = {}
        # impression_id -> [click_ts, arrival ts-of-stage] (click before its impression)
        self._early: dict[str, list[float]] = {}
        # user -> [horizon, [[click_ts, order, item], ...] sorted ascending]
        self._seq: dict[str, list[Any]] = {}
        self._order = 0
        self._n_seq = 0  # entries over all users' sequences
        self._now = _NEG_INF
        self._last_sweep = _NEG_INF
        self._last_early_sweep = _NEG_INF
        self._last_imp_sweep = _NEG_INF
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
        (``tests/unit/features/test_stage_batch.py``). The cyclic garbage collector is
        paused for the batch (the stage's state holds no reference cycles, and its
        collections of the growing state cost ~30% of the stage's time; see README
        "Memory and speed") and restored afterwards, also on error."""
        out: list[dict[str, object] | None] = []
        append = out.append
        impression, click = self.impression, self.click
        with paused_gc():
            for e in events:
                if hasattr(e, "item_id"):
                    append(
                        impression(
                            e.impression_id, e.ts, e.user_id, e.item_id, e.position, e.features
                        )
                    )
                else:
                    click(e.impression_id, e.ts, getattr(e, "user_id", None))
                    append(None)
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
        if impression_id in self._imps:
            self.stats["duplicate_impressions"] += 1
            return None
        cats = self._categoricals(attrs, count=True)
        kinds, keys = self._key_list(user_id, item_id, position, cats)
        feats = self._compute(ts, user_id, kinds, keys, update=True)
        self.stats["impressions"] += 1
        self._imps[impression_id] = [ts, user_id, item_id, position, cats, 0]
        early = self._early.pop(impression_id, None)
        if early is not None:
            self._click_apply(self._imps[impression_id], early[0])
        if ts > self._now:
            self._now = ts
            self._maybe_sweep()
        return feats

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
        kinds, keys = self._key_list(user_id, item_id, position, self._categoricals(attrs))
        approx = self.stats["approximate"]
        feats = self._compute(ts, user_id, kinds, keys)
        self.stats["approximate"] = approx
        return feats

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
        sequence. Changes no state.

        ``cache``: a :class:`PeekCache` of this stage at this ``ts`` and ``position``,
        shared by the users of one serving batch: each item's own counters (and the item x
        position's) are computed once per batch, not once per user, and a candidate the
        user never saw gets the one shared (read-only) part of that item. Without counters
        it is ignored.
        """
        cats = self._categoricals(attrs)
        approx = self.stats["approximate"]
        user_key = f"u\x1f{user_id}"
        head = self._compute(ts, user_id, ("user",), [user_key], sequence=False)
        parts: list[dict[str, object]] = []
        if cache is not None and self.config.counters:
            if cache.stage is not self or cache.ts != ts or cache.position != position:
                raise ValueError("the PeekCache is of another stage, time or position")
            self._cached_parts(user_id, item_ids, cache, parts)
        else:
            for item in item_ids:
                kinds, keys = self._key_list(user_id, item, position, ())
                parts.append(self._compute(ts, user_id, kinds[1:], keys[1:], sequence=False))
        kinds, keys = self._key_list(user_id, "", position, cats)
        n = len(_KINDS if position is None else _KINDS_POS)
        tail = self._compute(ts, user_id, kinds[n:], keys[n:])
        self.stats["approximate"] = approx
        return head, parts, tail

    def _cached_parts(
        self,
        user_id: str,
        item_ids: Sequence[str],
        cache: PeekCache,
        parts: list[dict[str, object]],
    ) -> None:
        """:meth:`peek_many`'s ``parts`` through ``cache`` (appended to ``parts``): a pair
        the state holds is computed for this user; any other candidate gets its item's
        shared part, whose user x item features are those of a pair never seen."""
        ts, position, keys_of, items = cache.ts, cache.position, self._keys, cache.items
        for item in item_ids:
            seen = _pair_key(user_id, item) in keys_of
            got = None if seen else items.get(item)
            if got is None:
                kinds, keys = self._key_list(user_id, item, position, ())
                got = self._compute(ts, user_id, kinds[1:], keys[1:], sequence=False)
                if not seen:
                    items[item] = got
            parts.append(got)

    def click(self, impression_id: str, ts: float, user_id: str | None = None) -> bool:
        """Apply a click at event time ``ts``. True when it was applied or kept for its
        impression; False for a duplicate. ``user_id`` is informational."""
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
        self._click_apply(imp, ts)
        return True

    def n_keys(self) -> dict[str, int]:
        """Tracked keys by kind (u, i, p, a, q), impressions and early clicks held."""
        out = {"u": 0, "i": 0, "p": 0, "a": 0, "q": 0}
        for k in self._keys:
            out[k[0]] += 1
        out["impressions"] = len(self._imps)
        out["early_clicks"] = len(self._early)
        out["sequences"] = len(self._seq)
        return out

    def approx_bytes(self) -> int:
        """Estimated memory of the state, bytes (O(1): counts times measured sizes)."""
        return len(self._keys) * KEY_BYTES + self._id_bytes() + self._n_seq * SEQUENCE_ENTRY_BYTES

    def _id_bytes(self) -> int:
        """Estimated bytes of the remembered impression ids and early clicks."""
        return len(self._imps) * IMPRESSION_BYTES + len(self._early) * EARLY_CLICK_BYTES

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state (lists, dicts, str, float, int)."""

        def rec(v: list[Any]) -> list[Any]:
            return [None if x == _NEG_INF else x for x in v[:-1]] + [list(v[-1])]

        return {
            "version": 2,
            "keys": {k: rec(v) for k, v in self._keys.items()},
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
        fix = self._fix_record
        self._keys = {k: fix(v) for k, v in state["keys"].items()}
        if version == 1:  # [ts, user, item, [(prefix, key), ...], clicked]
            self._imps = {k: _imp_from_v1(v) for k, v in state["imps"].items()}
        else:
            self._imps = {
                k: [v[0], v[1], v[2], v[3], tuple((a, b) for a, b in v[4]), v[5]]
                for k, v in state["imps"].items()
            }
        self._early = {k: list(v) for k, v in state["early"].items()}
        self._seq = {
            u: [_NEG_INF if v[0] is None else v[0], [list(c) for c in v[1]]]
            for u, v in state["seq"].items()
        }
        self._order = int(state["order"])
        self._n_seq = sum(len(v[1]) for v in self._seq.values())
        self._now = _NEG_INF if state["now"] is None else float(state["now"])
        ls = state["last_sweep"]
        self._last_sweep = _NEG_INF if ls is None else float(ls)
        self.stats.update(state.get("stats", {}))

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

    def _fix_record(self, rec: list[Any]) -> list[Any]:
        # state_dict writes "never" (-inf) as None
        return [(_NEG_INF if v is None else v) for v in rec[:-1]] + [list(rec[-1])]

    def _key_list(
        self, user: str, item: str, position: int | None, cats: tuple[tuple[str, str], ...]
    ) -> tuple[Sequence[str], list[str]]:
        """The kinds (``user``, ``item``, ``ui``, ``item_pos`` when ``position`` is known,
        ``u_<attribute>`` per attribute) and the keys of the state an impression touches,
        in feature order (two lists of the same length)."""
        keys = [f"u\x1f{user}", f"i\x1f{item}", _pair_key(user, item)]
        if position is not None:
            keys.append(f"q\x1f{item}\x1f{position!s}")
        kinds: Sequence[str] = _KINDS if position is None else _KINDS_POS
        if cats:
            kinds = [*kinds, *["u_" + name for name, _ in cats]]
            keys += [f"a\x1f{user}\x1f{name}\x1f{value}" for name, value in cats]
        return kinds, keys

    def _feature_names(self, ent: str) -> list[tuple[str, str, str, float, int, int]]:
        """Per half-life of the key kind ``ent``: its imp / clk / ctr feature names, the
        decay rate (1/s) and the indices of its decayed counts in a key record."""
        names = self._names.get(ent)
        if names is None:
            kr = self._rec
            names = [
                (f"hist_{ent}_imp_{lab}", f"hist_{ent}_clk_{lab}", f"hist_{ent}_ctr_{lab}",
                 a, kr.i0 + j, kr.c0 + j)
                for j, (lab, a) in enumerate(zip(self._labels, kr.rates, strict=True))
            ]  # fmt: skip
            self._names[ent] = names
            empty: dict[str, object] = {}
            for ni, nc, nr, _, _, _ in names:
                empty[ni] = 0.0
                empty[nc] = 0.0
                empty[nr] = float(self.config.ctr_prior)
            if ent == "ui":
                empty["hist_ui_n"] = 0.0
            self._empty[ent] = empty
        return names

    def _compute(
        self,
        t: float,
        user: str,
        kinds: Sequence[str],
        keys: list[str],
        update: bool = False,
        sequence: bool = True,
    ) -> dict[str, object]:
        """The features at ``t`` of an impression of ``user`` touching ``keys`` (of
        ``kinds``, see :meth:`_key_list`). ``update``: also count the impression at
        ``t`` into each key, right after reading the key (the keys are distinct, so this
        is the same as reading all of them first; in order, the decay factors read for the
        features are the ones the update needs). ``sequence``: also read the user's
        behaviour sequence (last, after every key's features)."""
        c = self.config
        out: dict[str, object] = {}
        keys_of = self._keys
        kr = self._rec
        if c.counters:
            li, lc = self._last_imp, self._last_clk
            bi, lateness, max_buffer = kr.buf, kr.lateness_s, kr.max_buffer
            prior, strength = c.ctr_prior * c.ctr_strength, c.ctr_strength
            log1p, exp = math.log1p, math.exp
            stale = t - c.ttl_s
            for ent, key in zip(kinds, keys, strict=True):
                names = self._names.get(ent) or self._feature_names(ent)
                rec = keys_of.get(key)
                if rec is not None and rec[_R] < stale:  # idle past the TTL: expired
                    rec = None
                    if update:
                        self.stats["expired_keys"] += 1
                if rec is None:
                    out.update(self._empty[ent])
                    if update:
                        rec = keys_of[key] = kr.new(t)
                        kr.apply(rec, t, False)
                    continue
                r = rec[_R]
                if t > r:  # in order: the aggregates decayed to t (the common case)
                    mdt = r - t  # -(t - r)
                    for ni, nc, nr, a, ii, ci in names:
                        f = exp(mdt * a)
                        im = rec[ii] * f
                        cl = rec[ci] * f
                        out[ni] = log1p(im)
                        out[nc] = log1p(cl)
                        out[nr] = (cl + prior) / (im + strength)
                        if update:  # and KeyRecords.apply(rec, t, False), sharing the decay
                            rec[ii] = im + 1.0
                            rec[ci] = cl
                    n, last_imp, last_clk = rec[_N], rec[li], rec[lc]
                    if update:
                        rec[_R] = t
                        rec[_N] = n + 1.0
                        if t > last_imp:
                            rec[li] = t
                        buf = rec[bi]
                        buf.append(t)
                        if (len(buf) > 4 and abs(buf[0]) <= t - lateness) or len(buf) > max_buffer:
                            kr.prune(rec)
                else:
                    imps, clks, n, last_imp, last_clk, approx = kr.query(rec, t)
                    if approx:
                        self.stats["approximate"] += 1
                    for (ni, nc, nr, _, _, _), im, cl in zip(names, imps, clks, strict=True):
                        out[ni] = log1p(im)
                        out[nc] = log1p(cl)
                        out[nr] = (cl + prior) / (im + strength)
                    if update:
                        kr.apply(rec, t, False)
                if ent == "user":
                    if last_imp > _NEG_INF:
                        out["hist_user_since_imp"] = log1p(t - last_imp)
                    if last_clk > _NEG_INF:
                        out["hist_user_since_clk"] = log1p(t - last_clk)
                elif ent == "ui":
                    out["hist_ui_n"] = log1p(n)
                    if last_imp > _NEG_INF:
                        out["hist_ui_since_imp"] = log1p(t - last_imp)
        elif update:
            for key in keys:
                self._apply(key, t, False)
        if sequence and c.sequence and c.seq_len:
            s = self._seq.get(user)
            if s is not None and s[1] and s[1][-1][0] >= t - c.ttl_s:  # else expired
                clicks = s[1]
                hi = len(clicks)
                while hi and clicks[hi - 1][0] >= t:
                    hi -= 1
                lo = max(0, hi - c.seq_len)
                if s[0] != _NEG_INF and (hi - lo < c.seq_len or clicks[lo][0] <= s[0]):
                    # older clicks were dropped and may belong to the answer
                    self.stats["approximate"] += 1
                if hi > lo:
                    picked = clicks[lo:hi][::-1]
                    out["hist_seq"] = [x[2] for x in picked]
                    out["hist_seq_age"] = [t - x[0] for x in picked]
        return out

    def _apply(self, key: str, te: float, is_click: bool) -> None:
        rec = self._keys.get(key)
        if rec is None or rec[_R] < te - self.config.ttl_s:  # new, or idle past the TTL
            if rec is not None:
                self.stats["expired_keys"] += 1
            rec = self._keys[key] = self._rec.new(te)
        self._rec.apply(rec, te, is_click)

    def _click_apply(self, imp: list[Any], ts: float) -> None:
        imp[5] = 1
        self.stats["clicks"] += 1
        for k in self._key_list(imp[1], imp[2], imp[3], imp[4])[1]:
            self._apply(k, ts, True)
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
            entry = [ts, self._order, imp[2]]
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
            and len(self._keys) <= c.max_keys
            and self.approx_bytes() <= c.max_bytes
        ):
            return
        self._last_sweep = now
        cut = now - c.ttl_s
        stale = [k for k, rec in self._keys.items() if rec[_R] < cut]
        for k in stale:
            del self._keys[k]
        self.stats["expired_keys"] += len(stale)
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
        cap = min(c.max_keys, max(1, int(room // KEY_BYTES)))
        if len(self._keys) > cap:
            extra = len(self._keys) - int(cap * 0.9)
            for k in heapq.nsmallest(extra, self._keys, key=lambda k: self._keys[k][_R]):
                del self._keys[k]
            self.stats["evicted_keys"] += extra


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


def _imp_from_v1(v: Sequence[Any]) -> list[Any]:
    """A version-1 impression entry (it kept its keys) in today's form."""
    position: int | None = None
    cats: list[tuple[str, str]] = []
    for _, key in v[3]:
        parts = key.split(_SEP)
        if parts[0] == "q":
            position = int(parts[2])
        elif parts[0] == "a":
            cats.append((parts[2], parts[3]))
    return [v[0], v[1], v[2], position, tuple(cats), v[4]]
