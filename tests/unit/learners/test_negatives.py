"""The two-tower model's negative sampling as plain functions: the hard-negative budget and
curriculum, uniform draws, and the logQ correction against a naive reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import learners.two_tower
from learners.negatives import (
    HardNegativeSource,
    draw_hard,
    draw_uniform,
    log_inclusion,
    target_hard_share,
)


def naive_log_inclusion(q: list[float], n_rows: int, n_uniform: int, m: int) -> list[float]:
    """``log(1 - (1 - q)^B (1 - n / M))`` term by term; the uniform draws may cover all."""
    miss_uniform = 1.0 - min(1.0, n_uniform / max(m, 1))
    return [math.log(1.0 - (1.0 - qi) ** n_rows * miss_uniform) for qi in q]


@settings(max_examples=200, deadline=None)
@given(
    q=st.lists(st.floats(1e-6, 0.999), min_size=1, max_size=20),
    n_rows=st.integers(1, 512),
    n_uniform=st.integers(0, 100),
    m=st.integers(0, 1_000),
)
def test_log_inclusion_matches_the_naive_formula(
    q: list[float], n_rows: int, n_uniform: int, m: int
) -> None:
    got = log_inclusion(np.array(q), n_rows, n_uniform, m)
    assert got.dtype == np.float64 and got.shape == (len(q),)
    np.testing.assert_allclose(got, naive_log_inclusion(q, n_rows, n_uniform, m), atol=1e-9)


def test_log_inclusion_is_log_q_plus_a_constant_for_rare_items_without_uniform_draws() -> None:
    q = np.array([1e-7, 4e-7, 2e-6])
    got = log_inclusion(q, n_rows=256, n_uniform=0, n_remembered=1_000)
    np.testing.assert_allclose(got - np.log(q), math.log(256), rtol=1e-4)


def test_log_inclusion_is_zero_when_the_uniform_draws_cover_the_catalogue() -> None:
    got = log_inclusion(np.array([0.1, 0.5]), n_rows=8, n_uniform=10, n_remembered=10)
    assert got.tolist() == [0.0, 0.0]


def test_hard_share_ramps_linearly_then_stays_at_the_cap() -> None:
    shares = [target_hard_share(0.4, 1_000, n) for n in (0, 250, 1_000, 5_000)]
    assert shares == pytest.approx([0.0, 0.1, 0.4, 0.4])
    assert target_hard_share(0.4, 0, 0) == 0.4  # no ramp


def fixed_source(items: dict[str, list[str]]) -> tuple[HardNegativeSource, list[tuple[str, int]]]:
    calls: list[tuple[str, int]] = []

    def source(user: str, n: int) -> list[str]:
        calls.append((user, n))
        return items.get(user, [])[:n]

    return source, calls


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_hard_negatives_never_exceed_the_share_of_all_negatives(share: float) -> None:
    source, calls = fixed_source({f"u{j}": [f"h{j}-{k}" for k in range(10)] for j in range(16)})
    users: list[str | None] = [f"u{j}" for j in range(16)]
    items, owners = draw_hard(source, users, 15, set(), share, n_hard=4)
    assert len(items) / (len(items) + 15) <= share + 1e-12
    assert len(items) == min(math.floor(share / (1 - share) * 15 + 1e-9), 4 * 16)
    assert all(n <= 4 for _, n in calls)
    assert all(item.startswith(f"h{owner}-") for item, owner in zip(items, owners, strict=True))


def test_hard_negatives_skip_batch_items_repeats_and_rows_without_a_user() -> None:
    source, calls = fixed_source({"u0": ["i1", "x"], "u2": ["x", "y"]})
    items, owners = draw_hard(source, ["u0", None, "u2"], 6, {"i1"}, 0.5, n_hard=2)
    assert [u for u, _ in calls] == ["u0", "u2"]
    assert (items, owners) == (["x", "y"], [0, 2])


@pytest.mark.parametrize(
    ("source", "n_random", "share", "n_hard"),
    [(None, 8, 0.5, 2), ("pool", 0, 0.5, 2), ("pool", 8, 0.0, 2), ("pool", 8, 0.5, 0)],
)
def test_no_hard_negatives_without_a_source_share_budget_or_room(
    source: str | None, n_random: int, share: float, n_hard: int
) -> None:
    pool, calls = fixed_source({"u": ["h"]})
    got = draw_hard(pool if source else None, ["u"], n_random, set(), share, n_hard)
    assert got == ([], []) and calls == []


def test_uniform_draws_are_distinct_seeded_and_skip_taken_items() -> None:
    catalogue = [f"i{j}" for j in range(50)]
    draws = draw_uniform(catalogue, 10, seed=3, step=7, taken={"i1", "i2"})
    assert len(set(draws)) == len(draws) <= 10 and not {"i1", "i2"} & set(draws)
    assert set(draws) <= set(catalogue)
    assert draw_uniform(catalogue, 10, seed=3, step=7, taken={"i1", "i2"}) == draws
    assert draw_uniform(catalogue, 10, seed=3, step=8, taken=set()) != draws
    assert sorted(draw_uniform(catalogue[:4], 10, seed=0, step=0, taken=set())) == catalogue[:4]
    assert draw_uniform([], 10, 0, 0, set()) == draw_uniform(catalogue, 0, 0, 0, set()) == []


def test_two_tower_still_exports_the_hard_negative_source_type() -> None:
    assert learners.two_tower.HardNegativeSource is HardNegativeSource
    assert "HardNegativeSource" in learners.two_tower.__all__
