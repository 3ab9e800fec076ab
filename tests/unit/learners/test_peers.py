"""Peer specifics (River FTRL-Proximal, Vowpal Wabbit); the shared behaviour of every
learner is checked in ``test_learner_checks.py``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from learners.peers import PEERS
from learners.river_peers import RiverFTRLProximal
from learners.vw_peer import VowpalWabbitLogistic, VWConfig, vw_example


def xor_stream(n: int, seed: int) -> tuple[list[dict[str, object]], np.ndarray]:
    """Click iff user and item parities agree: no per-user or per-item weight can tell."""
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, 20, n), rng.integers(0, 20, n)
    rows: list[dict[str, object]] = [
        {"user_id": f"u{u[k]}", "item_id": f"i{i[k]}"} for k in range(n)
    ]
    p = np.where(u % 2 == i % 2, 0.5, 0.02)
    return rows, (rng.random(n) < p).astype(np.float64)


def _auc(p: np.ndarray, y: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_vw_example_puts_keys_in_user_item_and_context_namespaces() -> None:
    row = {
        "user_id": "u|1 x",
        "user_segment": "s2",
        "item_id": "i:9",
        "item_price": -3.0,
        "position": 2,
        "ctx_device": "mobile",
        "missing": None,
        "bad": float("nan"),
        "zero": 0.0,
    }
    line = vw_example(row, label=0.0, weight=0.5)
    assert line == (
        "-1 0.5 |u user_id=u_1_x user_segment=s2 |i item_id=i_9 item_price:-1.386294361 "
        "|c position=2 ctx_device=mobile"
    )
    assert vw_example({}) == "|c"
    assert row["user_id"] == "u|1 x"  # not modified


def test_user_item_quadratic_features_learn_what_the_linear_model_cannot() -> None:
    rows, y = xor_stream(20_000, seed=0)
    test_rows, test_y = xor_stream(3_000, seed=1)
    aucs = {}
    for name, cfg in {
        "vw": VWConfig(bits=16),
        "vw_ui": VWConfig(bits=16, interactions=("ui",)),
    }.items():
        model = VowpalWabbitLogistic(cfg, seed=0)
        for s in range(0, len(rows), 500):
            model.learn_many(rows[s : s + 500], y[s : s + 500])
        aucs[name] = _auc(model.predict_proba_many(test_rows), test_y)
    assert aucs["vw"] < 0.6 < 0.75 < aucs["vw_ui"]  # the Bayes AUC is about 0.81


def test_vw_skips_examples_with_unusable_labels_or_weights() -> None:
    rows, y = xor_stream(200, seed=2)
    model = VowpalWabbitLogistic(VWConfig(bits=12), seed=0)
    model.learn_many(rows[:100], y[:100])
    before = model.predict_proba_many(rows)
    bad_y = np.full(100, np.nan)
    model.learn_many(rows[100:], bad_y)
    model.learn_many(rows[100:], y[100:], np.zeros(100))
    model.score_and_learn(rows[100:], y[100:], np.full(100, np.nan))
    np.testing.assert_array_equal(model.predict_proba_many(rows), before)
    assert model.n_updates == 4


def test_vw_checkpoint_is_one_self_describing_file(tmp_path: Path) -> None:
    cfg = VWConfig(bits=12, interactions=("ui",), l2=1e-6)
    model = VowpalWabbitLogistic(cfg, seed=5)
    rows, y = xor_stream(500, seed=3)
    model.learn_many(rows, y)
    model.save(tmp_path / "vw.ckpt")
    assert (tmp_path / "vw.ckpt").read_bytes().startswith(b"streamrec-vw-1\n")
    loaded = VowpalWabbitLogistic.load(tmp_path / "vw.ckpt")
    assert loaded.config == cfg and loaded.seed == 5 and loaded.n_updates == 1
    (tmp_path / "other").write_bytes(b"not a checkpoint\n")
    with pytest.raises(ValueError, match="Vowpal Wabbit checkpoint"):
        VowpalWabbitLogistic.load(tmp_path / "other")


@pytest.mark.parametrize(
    ("field", "value"),
    [("bits", 0), ("bits", 31), ("learning_rate", 0.0), ("l2", -1.0), ("interactions", ("ux",))],
)
def test_invalid_vw_settings_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field.rstrip("s") if field == "interactions" else field):
        dataclasses.replace(VWConfig(), **{field: value})


def test_ftrl_l1_keeps_weights_at_zero_so_every_row_scores_alike() -> None:
    rows, y = xor_stream(2_000, seed=4)
    sparse, dense = RiverFTRLProximal(seed=0, l1=1e6), RiverFTRLProximal(seed=0)
    for model in (sparse, dense):
        model.learn_many(rows, y)
    assert np.ptp(sparse.predict_proba_many(rows[:50])) == 0.0  # intercept only
    assert np.ptp(dense.predict_proba_many(rows[:50])) > 0.01


@pytest.mark.parametrize("kw", [{"alpha": 0.0}, {"beta": -1.0}, {"l1": -0.1}, {"l2": np.inf}])
def test_invalid_ftrl_settings_are_rejected(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        RiverFTRLProximal(**kw)


@pytest.mark.parametrize("name", list(PEERS))
def test_every_registered_peer_scores_a_batch_before_learning_it(name: str) -> None:
    rows, y = xor_stream(64, seed=5)
    model = PEERS[name](3)
    assert model.seed == 3
    p = model.score_and_learn(rows, y)
    assert p.shape == (64,) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_array_equal(model.clone().predict_proba_many(rows), p)
