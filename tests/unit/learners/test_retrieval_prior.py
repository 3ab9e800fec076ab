"""learners.retrieval_prior: the serving-time popularity prior and its point-in-time counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learners.encoding import EncoderConfig
from learners.retrieval_eval import _top_k, evaluate_retrieval
from learners.retrieval_prior import DecayedClicks, ServingPrior, prior_bias, with_prior
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from tests.unit.learners.test_two_tower_behaviour import drifting_taste


def test_decayed_counts_match_a_direct_sum_and_never_see_the_future() -> None:
    rng = np.random.default_rng(0)
    clicks = [f"i{int(j)}" for j in rng.integers(0, 20, 500)]
    half_life = 37.0
    full = DecayedClicks(half_life)
    full.update(clicks)
    prefix = DecayedClicks(half_life)
    prefix.update(clicks[:300])
    before = dict(prefix.counts)
    for name, c, seen in (("full", full, clicks), ("prefix", prefix, clicks[:300])):
        n = len(seen)
        for item in set(clicks):
            want = sum(0.5 ** ((n - 1 - t) / half_life) for t, x in enumerate(seen) if x == item)
            assert c.counts.get(item, 0.0) == pytest.approx(want, rel=1e-9), (name, item)
    # the prefix counter's view is what the first 300 clicks say, whatever comes later
    prefix_again = DecayedClicks(half_life)
    prefix_again.update(clicks[:300])
    assert prefix_again.counts == pytest.approx(before)
    late = clicks[300:]
    only_late = {x for x in late} - set(clicks[:300])
    assert all(x not in prefix.counts for x in only_late)
    q = np.exp(full.log_q(sorted(full.counts)))
    assert np.all(q > 0) and q.sum() == pytest.approx(1.0, abs=0.05)  # floors add a little


def test_weighted_clicks_count_and_age_the_others_by_their_weight() -> None:
    rng = np.random.default_rng(2)
    clicks = [f"i{int(j)}" for j in rng.integers(0, 10, 200)]
    w = rng.choice([0.0, 0.3, 1.0], size=200).tolist()
    c = DecayedClicks(half_life=25.0)
    c.update(clicks, w)
    # each click's weight times 0.5 ** (the weight that came after it / half-life)
    after = np.cumsum(w[::-1])[::-1] - np.array(w)
    for item in set(clicks):
        want = sum(wt * 0.5 ** (a / 25.0) for x, wt, a in zip(clicks, w, after, strict=True)
                   if x == item)  # fmt: skip
        assert c.count(item) == pytest.approx(want, rel=1e-9)
    assert c.total == pytest.approx(sum(c.counts.values()), rel=1e-9)
    ones, plain = DecayedClicks(25.0), DecayedClicks(25.0)
    ones.update(clicks, [1.0] * len(clicks))
    plain.update(clicks)
    assert ones.counts == plain.counts and ones.n_clicks == plain.n_clicks  # bit for bit
    before = dict(plain.counts)
    plain.update(["new", "i1"], [0.0, 0.0])  # a weight of 0 changes nothing
    assert plain.counts == before and plain.count("new") == 0.0


def test_counts_stay_finite_over_a_long_stream() -> None:
    c = DecayedClicks(half_life=1.0)
    c.update(["a"] * 3_000 + ["b"])
    assert c.counts["b"] == pytest.approx(1.0) and math.isfinite(c.counts["a"])
    assert np.isfinite(c.log_q(["a", "b", "zz"])).all()


def test_prior_moves_popular_items_up_by_exactly_beta_log_q() -> None:
    rng = np.random.default_rng(1)
    users = rng.normal(size=(5, 8)).astype(np.float32)
    items = rng.normal(size=(40, 8)).astype(np.float32)
    log_q = np.log(rng.dirichlet(np.ones(40)))
    tau, beta = 0.2, 0.7
    bias = prior_bias(log_q, beta, tau)
    # in logit units (cosine / temperature) the gap between two items grows by beta * dlog q
    plain, moved = users @ items.T / tau, (users @ items.T + bias) / tau
    gap = (moved - plain)[:, :, None] - (moved - plain)[:, None, :]
    want = beta * (log_q[:, None] - log_q[None, :])
    assert np.allclose(gap, np.broadcast_to(want, gap.shape), atol=1e-4)
    # the augmented vectors give an inner-product index the same ranking
    u2, v2 = with_prior(users, items, bias)
    assert np.allclose(u2 @ v2.T, users @ items.T + bias, atol=1e-5)
    assert (_top_k(u2, v2, 10) == _top_k(users, items, 10, bias)).all()
    # a huge beta retrieves the most popular items for everyone; beta 0 changes nothing
    top = _top_k(users, items, 5, prior_bias(log_q, 1e4, tau))
    assert (top == np.argsort(-log_q)[:5]).all()
    assert (_top_k(users, items, 5, prior_bias(log_q, 0.0, tau)) == _top_k(users, items, 5)).all()


def test_bad_settings_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="half_life"):
        DecayedClicks(0.0)
    with pytest.raises(ValueError, match="beta"):
        prior_bias(np.zeros(3), -1.0, 0.2)
    with pytest.raises(ValueError, match="log_q"):
        prior_bias(np.array([0.0, -np.inf]), 1.0, 0.2)
    with pytest.raises(ValueError, match="betas"):
        ServingPrior(betas=(float("nan"),))
    with pytest.raises(ValueError, match="validation_fraction"):
        ServingPrior(validation_fraction=1.0)
    with pytest.raises(ValueError, match="bias"):
        with_prior(np.ones((1, 2)), np.eye(2), np.zeros(3))


def test_evaluation_picks_the_prior_on_training_clicks_and_keeps_the_model_row() -> None:
    rows, _ = drifting_taste(6_000, seed=4)
    y = np.ones(len(rows))
    enc = EncoderConfig(num_buckets=1 << 12, max_cat_fields=4, max_num_fields=2, max_seq_len=0)
    cfg = TwoTowerConfig(device="cpu", user_encoder=enc, item_encoder=enc, batch_size=256)
    plain = evaluate_retrieval(rows, y, TwoTowerModel(cfg, seed=0), k=10, batch_size=500)
    prior = ServingPrior(betas=(0.0, 1.0), half_lives=(0.1, 1.0))
    rep = evaluate_retrieval(rows, y, TwoTowerModel(cfg, seed=0), k=10, batch_size=500, prior=prior)
    # the model learns the same batches either way: the default row is unchanged
    assert rep["rows"]["model"] == plain["rows"]["model"]
    p = rep["prior"]
    assert p["validation_clicks"] > 0 and p["validation_rows"] < int(0.8 * len(rows))
    assert p["beta"] in prior.betas and p["half_life_fraction"] in prior.half_lives
    # the pick is the best validation point, and the test row is that pick's test recall
    best = max(p["validation"]["model"].values())
    assert p["validation"]["model"][f"beta={p['beta']},half_life={p['half_life_fraction']}"] == best
    assert rep["rows"]["model_prior"]["recall_at_k"] == p["test_by_beta"][str(p["beta"])]
    assert 0.0 < rep["rows"]["popularity_decayed"]["recall_at_k"] <= 1.0
