"""Hard-negative pools: items the retrieval model ranks high for a user that they never clicked."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from index.faiss_index import IndexSnapshot

__all__ = ["HardNegativePool"]


class HardNegativePool:
    """Per-user lists of the top-ranked non-clicked items, rebuilt wholesale by ``refresh``.

    Memory is bounded by ``max_users * per_user`` item ids. A refresh builds a new mapping
    and replaces the old one in a single assignment, so readers in other threads see either
    the old pool or the new one.

    Args:
        per_user: hard negatives kept per user (>= 1), best-ranked first.
        max_users: users kept per refresh (>= 1).
        depth: retrieved items examined per user when ``refresh`` is given ``seen``
            (default ``5 * per_user``).

    >>> import numpy as np
    >>> from index.faiss_index import build_snapshot
    >>> items = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> snap = build_snapshot(["a", "b", "c"], items, version=1)
    >>> pool = HardNegativePool(per_user=2)
    >>> pool.refresh(snap, ["u1"], np.array([[1.0, 0.0]]), {"u1": {"a"}}, now=100.0)
    >>> pool.negatives("u1"), pool.n_users, pool.size, pool.age(now=130.0)
    (['b', 'c'], 1, 2, 30.0)
    """

    def __init__(
        self, per_user: int = 20, max_users: int = 10_000, depth: int | None = None
    ) -> None:
        if per_user < 1 or max_users < 1:
            raise ValueError(f"per_user and max_users must be >= 1, got {per_user}, {max_users}")
        if depth is not None and depth < per_user:
            raise ValueError(f"depth must be >= per_user ({per_user}), got {depth}")
        self.per_user = per_user
        self.max_users = max_users
        self.depth = 5 * per_user if depth is None else depth
        self._pools: dict[str, tuple[str, ...]] = {}
        self._built_at: float | None = None

    @property
    def n_users(self) -> int:
        """Users with a pool (possibly empty) from the last refresh."""
        return len(self._pools)

    @property
    def size(self) -> int:
        """Total item ids held across all users."""
        return sum(len(v) for v in self._pools.values())

    @property
    def built_at(self) -> float | None:
        """``now`` passed to the last refresh (epoch seconds), None before the first."""
        return self._built_at

    def age(self, now: float) -> float:
        """Seconds since the last refresh; ``inf`` before the first."""
        if self._built_at is None:
            return math.inf
        return now - self._built_at

    def refresh(
        self,
        snapshot: IndexSnapshot,
        user_ids: Sequence[str],
        user_vectors: npt.ArrayLike,
        positives: Mapping[str, set[str]],
        now: float,
        seen: Mapping[str, set[str]] | None = None,
    ) -> None:
        """Rebuild every pool from ``snapshot``.

        Args:
            snapshot: the item index to rank with.
            user_ids: (U,) users, most recent first; only the first ``max_users`` distinct
                ids are kept (a repeated id keeps its first vector).
            user_vectors: (U, snapshot.dim) user embeddings (normalised on a copy).
            positives: user id -> items they clicked; these never enter that user's pool.
            now: refresh time, epoch seconds.
            seen: user id -> items shown to them (clicked or not), or None when unknown.
                None: a pool is the user's top-ranked non-clicked items. Given: among the
                user's top ``depth`` retrieved items, only those they saw without clicking
                or that the index ranks above at least one of their clicks qualify (a
                click not retrieved ranks below every retrieved item), best-ranked first,
                so unseen items that might be unknown positives stay out of the pool.
        """
        uv = np.asarray(user_vectors, dtype=np.float32)
        if uv.ndim != 2 or uv.shape[0] != len(user_ids) or uv.shape[1] != snapshot.dim:
            raise ValueError(
                f"user_vectors must have shape ({len(user_ids)}, {snapshot.dim}), got {uv.shape}"
            )
        rows: list[int] = []
        chosen: list[str] = []
        seen_users: set[str] = set()
        for row, uid in enumerate(user_ids):
            if len(chosen) >= self.max_users:
                break
            if uid not in seen_users:
                seen_users.add(uid)
                rows.append(row)
                chosen.append(uid)

        pools: dict[str, tuple[str, ...]] = {}
        if chosen and seen is not None:
            n_items = len(snapshot)
            depth = min(n_items, self.depth)
            _, ids = snapshot.search(uv[rows], depth)
            for j, uid in enumerate(chosen):
                pools[uid] = self._qualified(
                    ids[j], positives.get(uid, set()), seen.get(uid, set())
                )
        elif chosen:
            n_items = len(snapshot)
            clicked = [positives.get(uid, set()) for uid in chosen]
            # One batched search deep enough for a typical user; users with many clicks in
            # their top results are searched again individually below.
            typical = int(np.median([len(c) for c in clicked]))
            k0 = min(n_items, self.per_user + typical)
            _, ids = snapshot.search(uv[rows], k0)
            for j, uid in enumerate(chosen):
                pool = self._filter(ids[j], clicked[j])
                k_full = min(n_items, self.per_user + len(clicked[j]))
                if len(pool) < self.per_user and k_full > k0:
                    _, deeper = snapshot.search(uv[rows[j] : rows[j] + 1], k_full)
                    pool = self._filter(deeper[0], clicked[j])
                pools[uid] = pool
        self._pools = pools
        self._built_at = now

    def _qualified(
        self, ranked: npt.NDArray[np.object_], clicked: set[str], seen: set[str]
    ) -> tuple[str, ...]:
        """Seen-not-clicked items, or items ranked above the lowest retrieved click."""
        items = [i for i in ranked if i is not None]
        retrieved_clicks = [r for r, i in enumerate(items) if i in clicked]
        all_retrieved = bool(clicked) and len(retrieved_clicks) == len(clicked)
        # Every retrieved item outranks a click the index did not retrieve at all.
        above = retrieved_clicks[-1] if all_retrieved else (len(items) if clicked else 0)
        out: list[str] = []
        for r, item in enumerate(items):
            if item in clicked:
                continue
            if r < above or item in seen:
                out.append(item)
                if len(out) == self.per_user:
                    break
        return tuple(out)

    def _filter(self, ranked: npt.NDArray[np.object_], clicked: set[str]) -> tuple[str, ...]:
        out: list[str] = []
        for item in ranked:
            if item is None or item in clicked:
                continue
            out.append(item)
            if len(out) == self.per_user:
                break
        return tuple(out)

    def negatives(self, user_id: str) -> list[str]:
        """The user's hard negatives, best-ranked first; empty for an unknown user."""
        return list(self._pools.get(user_id, ()))

    def sample(self, user_id: str, n: int, rng: np.random.Generator) -> list[str]:
        """Up to ``n`` distinct hard negatives of ``user_id``, drawn uniformly with ``rng``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pool = self._pools.get(user_id, ())
        if n == 0 or not pool:
            return []
        picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        return [pool[i] for i in picks]
