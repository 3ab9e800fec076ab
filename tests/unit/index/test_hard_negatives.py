from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.faiss_index import IndexConfig, build_snapshot
from index.hard_negatives import HardNegativePool


def make_world(
    n_items: int, n_users: int, dim: int, seed: int
) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    items = [f"i{j}" for j in range(n_items)]
    users = [f"u{j}" for j in range(n_users)]
    return (
        items,
        rng.standard_normal((n_items, dim)).astype(np.float32),
        users,
        rng.standard_normal((n_users, dim)).astype(np.float32),
    )


def brute_force_ranking(item_vecs: np.ndarray, user_vec: np.ndarray) -> np.ndarray:
    iv = item_vecs / np.linalg.norm(item_vecs, axis=1, keepdims=True)
    return np.argsort(-(iv @ (user_vec / np.linalg.norm(user_vec))), kind="stable")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    per_user=st.integers(1, 15),
    n_items=st.integers(1, 60),
    click_frac=st.floats(0.0, 1.0),
)
def test_pool_is_the_top_ranked_non_clicked_items(
    seed: int, per_user: int, n_items: int, click_frac: float
) -> None:
    items, item_vecs, users, user_vecs = make_world(n_items, 6, 8, seed)
    rng = np.random.default_rng(seed + 1)
    positives = {
        u: {it for it in items if rng.random() < click_frac * (k % 3) / 2}
        for k, u in enumerate(users)
    }
    snap = build_snapshot(items, item_vecs, version=1, config=IndexConfig(kind="flat"))
    pool = HardNegativePool(per_user=per_user)
    pool.refresh(snap, users, user_vecs, positives, now=0.0)
    for j, u in enumerate(users):
        ranked = [items[i] for i in brute_force_ranking(item_vecs, user_vecs[j])]
        want = [it for it in ranked if it not in positives[u]][:per_user]
        got = pool.negatives(u)
        assert not set(got) & positives[u]
        assert got == want


def test_heavy_clicker_still_gets_a_full_pool() -> None:
    items, item_vecs, users, user_vecs = make_world(200, 3, 8, seed=0)
    snap = build_snapshot(items, item_vecs, version=1)
    # u0 clicked its 100 best items; the others clicked nothing.
    top = [items[i] for i in brute_force_ranking(item_vecs, user_vecs[0])]
    positives = {"u0": set(top[:100])}
    pool = HardNegativePool(per_user=10)
    pool.refresh(snap, users, user_vecs, positives, now=0.0)
    assert pool.negatives("u0") == top[100:110]
    assert all(len(pool.negatives(u)) == 10 for u in users)


def test_memory_is_bounded_by_max_users_times_per_user() -> None:
    items, item_vecs, users, user_vecs = make_world(300, 50, 8, seed=1)
    snap = build_snapshot(items, item_vecs, version=1)
    pool = HardNegativePool(per_user=5, max_users=20)
    pool.refresh(snap, users, user_vecs, {}, now=0.0)
    assert pool.n_users == 20 and pool.size == 100
    # The most recent (first) users are kept.
    assert pool.negatives("u0") and pool.negatives("u19") and pool.negatives("u20") == []
    # A second refresh replaces rather than accumulates.
    pool.refresh(snap, users[25:], user_vecs[25:], {}, now=1.0)
    assert pool.n_users == 20 and pool.size == 100 and pool.negatives("u0") == []


def test_repeated_user_ids_count_once() -> None:
    items, item_vecs, _, _ = make_world(30, 1, 4, seed=2)
    snap = build_snapshot(items, item_vecs, version=1)
    pool = HardNegativePool(per_user=3, max_users=2)
    vecs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    pool.refresh(snap, ["a", "a", "b"], vecs, {}, now=0.0)
    assert pool.n_users == 2 and pool.negatives("b")


def test_sample_draws_distinct_pool_items_reproducibly() -> None:
    items, item_vecs, users, user_vecs = make_world(100, 2, 8, seed=3)
    pool = HardNegativePool(per_user=10)
    pool.refresh(build_snapshot(items, item_vecs, version=1), users, user_vecs, {}, now=0.0)
    a = pool.sample("u0", 4, np.random.default_rng(7))
    b = pool.sample("u0", 4, np.random.default_rng(7))
    assert a == b and len(set(a)) == 4 and set(a) <= set(pool.negatives("u0"))
    assert sorted(pool.sample("u0", 50, np.random.default_rng(0))) == sorted(pool.negatives("u0"))
    assert pool.sample("nobody", 3, np.random.default_rng(0)) == []
    assert pool.sample("u0", 0, np.random.default_rng(0)) == []
    with pytest.raises(ValueError):
        pool.sample("u0", -1, np.random.default_rng(0))


def test_age_and_built_at() -> None:
    pool = HardNegativePool()
    assert pool.built_at is None and pool.age(now=5.0) == math.inf
    assert pool.n_users == 0 and pool.size == 0 and pool.negatives("u") == []
    items, item_vecs, users, user_vecs = make_world(10, 1, 4, seed=4)
    pool.refresh(build_snapshot(items, item_vecs, version=1), users, user_vecs, {}, now=100.0)
    assert pool.built_at == 100.0 and pool.age(now=160.5) == 60.5


def test_refresh_rejects_mismatched_user_vectors() -> None:
    items, item_vecs, users, user_vecs = make_world(10, 2, 4, seed=5)
    snap = build_snapshot(items, item_vecs, version=1)
    pool = HardNegativePool()
    with pytest.raises(ValueError, match="shape"):
        pool.refresh(snap, users, user_vecs[:1], {}, now=0.0)
    with pytest.raises(ValueError, match="shape"):
        pool.refresh(snap, users, np.zeros((2, 5)), {}, now=0.0)
    with pytest.raises(ValueError):
        HardNegativePool(per_user=0)


def line_world(n_items: int) -> tuple[list[str], np.ndarray]:
    """Items on the unit circle at increasing angles: the user at angle 0 ranks i0, i1, ..."""
    angles = np.linspace(0.0, 3.0, n_items)
    return [f"i{j}" for j in range(n_items)], np.stack([np.cos(angles), np.sin(angles)], 1)


def test_with_seen_items_only_seen_or_outranking_items_enter_the_pool() -> None:
    items, vecs = line_world(30)
    snap = build_snapshot(items, vecs, version=1, config=IndexConfig(kind="flat"))
    user = np.array([[1.0, 0.0]])
    pool = HardNegativePool(per_user=10, depth=20)
    # Clicked i4 (rank 4): i0..i3 outrank it; of the rest only the seen ones qualify.
    seen = {"u": {"i4", "i7", "i12", "i25"}}
    pool.refresh(snap, ["u"], user, {"u": {"i4"}}, now=0.0, seen=seen)
    # i25 was seen but lies beyond the search depth of 20.
    assert pool.negatives("u") == ["i0", "i1", "i2", "i3", "i7", "i12"]


def test_with_seen_and_no_clicks_the_pool_is_the_seen_retrieved_items() -> None:
    items, vecs = line_world(30)
    snap = build_snapshot(items, vecs, version=1, config=IndexConfig(kind="flat"))
    pool = HardNegativePool(per_user=3, depth=10)
    seen = {"u": {"i9", "i2", "i5", "i6"}}
    pool.refresh(snap, ["u", "v"], np.array([[1.0, 0.0], [1.0, 0.0]]), {}, now=0.0, seen=seen)
    assert pool.negatives("u") == ["i2", "i5", "i6"]  # best-ranked first, capped at per_user
    assert pool.negatives("v") == [] and pool.n_users == 2  # nothing seen, nothing clicked


def test_with_seen_a_click_outside_the_retrieved_items_lets_every_retrieved_item_in() -> None:
    items, vecs = line_world(30)
    snap = build_snapshot(items, vecs, version=1, config=IndexConfig(kind="flat"))
    pool = HardNegativePool(per_user=4, depth=10)
    pool.refresh(snap, ["u"], np.array([[1.0, 0.0]]), {"u": {"i1", "i29"}}, now=0.0, seen={})
    assert pool.negatives("u") == ["i0", "i2", "i3", "i4"]


def test_depth_must_cover_per_user() -> None:
    with pytest.raises(ValueError, match="depth"):
        HardNegativePool(per_user=10, depth=5)
    assert HardNegativePool(per_user=4).depth == 20
