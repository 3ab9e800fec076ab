"""The behaviour parts of the rankers: the encoder's sequence block, DIN target attention,
hashed user x field pair crosses, and checkpoints from before them.

The behaviour shared by every learner (rows with history included) is checked in
``test_learner_checks.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from learners.encoding import EncoderConfig, FeatureEncoder, bucket_of
from learners.layers import N_AGE_BUCKETS, PairCrosses, TargetAttention, age_buckets
from learners.models import INITIAL_CTR, PLE, DCNv2, DeepFM, MMoE, WideAndDeep
from learners.ranker import RankerConfig, TorchRanker
from learners.training import atomic_torch_save
from tests.unit.learners.test_learner_checks import auc

CFG = EncoderConfig(num_buckets=1 << 12, max_cat_fields=4, max_num_fields=2, max_seq_len=3)
NB, FC, FN, D = 64, 4, 2, 4


# -- encoder -----------------------------------------------------------------------------------
def test_sequence_block_hashes_items_like_item_id_most_recent_first_truncated() -> None:
    enc = FeatureEncoder(CFG)
    rows: list[dict[str, object]] = [
        {"item_id": "i1", "hist_seq": ["i9", "i1", "i5", "i7"], "hist_seq_age": [5, 60.0, 7.5, 1]},
        {"item_id": "i2", "hist_seq": []},
        {"item_id": "i3"},
    ]
    batch = enc.encode(rows)
    assert batch.seq is not None and batch.seq_age is not None
    assert batch.seq.dtype == np.int64 and batch.seq_age.dtype == np.float32
    assert batch.seq.shape == batch.seq_age.shape == (3, 3)
    expected = [bucket_of("item_id", v, CFG.num_buckets) for v in ("i9", "i1", "i5")]
    assert batch.seq[0].tolist() == expected
    assert batch.seq[0, 1] == batch.cat[0, 1]  # the same bucket as the candidate i1
    assert batch.seq_age[0].tolist() == [5.0, 60.0, 7.5]
    assert not batch.seq[1:].any() and not batch.seq_age[1:].any()


def test_sequence_keys_never_take_a_slot_and_the_block_is_optional() -> None:
    rows = [{"user_id": "u", "item_id": "i", "hist_seq": ["a"], "hist_seq_age": [1.0], "x": 2.0}]
    for max_seq_len in (0, 3):
        enc = FeatureEncoder(EncoderConfig(num_buckets=256, max_seq_len=max_seq_len))
        batch = enc.encode(rows)
        assert enc.cat_fields == ["user_id", "item_id"] and enc.num_fields == ["x"]
        assert (batch.seq is None) == (max_seq_len == 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        EncoderConfig(max_seq_len=-1)


def test_bad_sequences_are_skipped_and_counted_bad_ages_are_unknown() -> None:
    enc = FeatureEncoder(CFG)
    rows: list[dict[str, object]] = [
        {"hist_seq": "i1,i2"},  # a string, not a list
        {"hist_seq": 7},
        {"hist_seq": [None, "a", "b"], "hist_seq_age": [1.0, float("nan"), -3.0]},
        {"hist_seq": ["a", "b"], "hist_seq_age": [2.0]},  # ages too short
        {"hist_seq": ["a"], "hist_seq_age": "old"},
        {"hist_seq": ["a", "b", "c"], "hist_seq_age": [float("inf"), True, 0.0]},
    ]
    batch = enc.encode(rows)
    assert batch.seq is not None and batch.seq_age is not None
    assert enc.n_bad_sequences == 2 and not batch.seq[:2].any()
    a = bucket_of("item_id", "a", CFG.num_buckets)
    assert batch.seq[2, 0] == a and batch.seq_age[2, :2].tolist() == [-1.0, -1.0]
    assert batch.seq_age[3, :2].tolist() == [2.0, -1.0]
    assert batch.seq_age[4, 0] == -1.0
    assert batch.seq_age[5].tolist() == [-1.0, -1.0, 0.0]  # inf and a bool are unknown


# -- modules -----------------------------------------------------------------------------------
def test_age_buckets_padding_unknown_and_log_minutes() -> None:
    seq = torch.tensor([[5, 5, 5, 5, 0]])
    ages = torch.tensor([[0.0, 60.0, -1.0, 1e12, 30.0]])
    assert age_buckets(seq, ages).tolist() == [[2, 3, 1, N_AGE_BUCKETS - 1, 0]]
    assert age_buckets(seq, None).tolist() == [[1, 1, 1, 1, 0]]


def test_attention_pools_only_valid_positions_and_empty_is_exactly_zero() -> None:
    att = TargetAttention(D)
    att.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(3, D, generator=g), torch.randn(3, 4, D, generator=g)
    seq = torch.tensor([[3, 4, 0, 0], [3, 4, 9, 9], [0, 0, 0, 0]])
    ages = torch.full((3, 4), 120.0)
    pooled, summary = att(q, keys, seq, ages, torch.tensor([4, 4, 4]))
    # Row 1 = row 0 plus two more items: the first two positions contribute identically.
    k = keys + att.age(age_buckets(seq, ages))
    unit_in = torch.cat([q[:, None].expand_as(k), k, q[:, None] - k, q[:, None] * k], -1)
    match = (seq == 4).float()[:, :, None]
    w = torch.sigmoid(att.unit(torch.cat([unit_in, match], -1)).squeeze(-1))
    naive = (w[0, :2, None] * k[0, :2]).sum(0)
    torch.testing.assert_close(pooled[0], naive)
    assert torch.equal(pooled[2], torch.zeros(D)) and torch.equal(summary[2], torch.zeros(3))
    torch.testing.assert_close(summary[:2, 1], torch.full((2,), math.log(2.0)))


def test_attention_mass_is_log_scaled_with_log_mass_and_nothing_else_changes() -> None:
    raw, logged = TargetAttention(D), TargetAttention(D, log_mass=True)
    raw.reset_parameters(torch.Generator().manual_seed(0))
    logged.load_state_dict(raw.state_dict())  # same parameters: log_mass has none
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(3, D, generator=g), torch.randn(3, 6, D, generator=g)
    seq = torch.tensor([[3, 4, 5, 6, 7, 8], [3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    ages = torch.full((3, 6), 60.0)
    target = torch.tensor([4, 4, 4])
    p_raw, s_raw = raw(q, keys, seq, ages, target)
    p_log, s_log = logged(q, keys, seq, ages, target)
    assert float(s_raw[0, 0].detach()) > 1.0  # six keys: the raw mass is well above 1
    torch.testing.assert_close(s_log[:, 0], torch.log1p(s_raw[:, 0]))
    torch.testing.assert_close(s_log[:, 1:], s_raw[:, 1:])
    torch.testing.assert_close(p_log, p_raw)
    assert torch.equal(s_log[2], torch.zeros(3))  # an empty sequence still gives zeros


def test_checkpoint_from_before_log_mass_keeps_the_unscaled_mass(tmp_path: Path) -> None:
    """A checkpoint trained with the raw attention mass (its config has no
    ``attention_log_mass``) loads with it off and scores rows with history as before."""
    ranker = _ranker(attention_log_mass=False)
    rows, y = membership_world(256, seed=4)
    ranker.learn_many(rows, y)
    state = ranker.state()
    del state["config"]["attention_log_mass"]
    atomic_torch_save(state, tmp_path / "before.ckpt")
    loaded = TorchRanker.load(tmp_path / "before.ckpt")
    assert loaded.config.attention_log_mass is False and loaded.config.sequence_attention
    np.testing.assert_array_equal(loaded.predict_proba_many(rows), ranker.predict_proba_many(rows))
    assert RankerConfig().attention_log_mass  # new rankers log-scale it


def test_pair_crosses_start_at_zero_and_ignore_absent_sides() -> None:
    pc = PairCrosses(NB)
    cat = torch.tensor([[3, 5, 7, 0], [0, 5, 7, 9], [3, 5, 0, 0], [3, 6, 7, 0]])
    assert pc(cat).tolist() == [0.0, 0.0, 0.0, 0.0]
    b = pc.buckets(cat)
    assert b.shape == (4,) and bool(((b >= 0) & (b < NB)).all())
    assert b[1] == 0 and b[0] > 0 and b[0] == b[2]  # the same (user, item), other fields aside
    assert b[3] != b[0]
    with torch.no_grad():
        pc.weights.weight[b[0]] = 0.1
    torch.testing.assert_close(pc(cat), torch.tensor([1.0, 0.0, 1.0, 0.0]))  # x _PAIR_SCALE


BEHAVIOUR_MODELS: dict[str, Any] = {
    "dcnv2": lambda **kw: DCNv2(NB, FC, FN, embedding_dim=D, hidden=(8,), **kw),
    "deepfm": lambda **kw: DeepFM(NB, FC, FN, embedding_dim=D, hidden=(8,), **kw),
    "wide_deep": lambda **kw: WideAndDeep(NB, FC, FN, embedding_dim=D, hidden=(8,), **kw),
    "mmoe": lambda **kw: MMoE(NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=2, **kw),
    "ple": lambda **kw: PLE(NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=2, **kw),
}


@pytest.mark.parametrize("name", list(BEHAVIOUR_MODELS))
def test_empty_sequence_equals_no_sequence_and_the_empty_row_keeps_the_bias(name: str) -> None:
    model = BEHAVIOUR_MODELS[name](
        sequence=True, pair_crosses=True, generator=torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(2)
    cat, num = torch.randint(1, NB, (4, FC), generator=g), torch.randn(4, FN, generator=g)
    empty = torch.zeros(4, 5, dtype=torch.long)
    with torch.no_grad():
        none = model(cat, num)
        torch.testing.assert_close(model(cat, num, empty, torch.zeros(4, 5)), none)
        logit = model(torch.zeros(1, FC, dtype=torch.long), torch.zeros(1, FN))
        seq = torch.tensor([[3, 9, 0, 0, 0]] * 4)
        with_seq = model(cat, num, seq, torch.tensor([[10.0, 1e5, 0, 0, 0]] * 4))
    assert torch.isfinite(with_seq).all() and not torch.allclose(with_seq, none)
    bias = math.log(INITIAL_CTR / (1 - INITIAL_CTR))
    torch.testing.assert_close(float(logit), bias, atol=1e-6, rtol=0)
    # Gradients through an all-padding sequence are finite (no 0/0 anywhere).
    out = model(cat, num, empty, torch.zeros(4, 5)).sum()
    out.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# -- ranker ------------------------------------------------------------------------------------
def membership_world(
    n: int, seed: int, n_items: int = 300, length: int = 10
) -> tuple[list[dict[str, object]], np.ndarray]:
    """The label depends only on whether the candidate is among the row's ``hist_seq``
    (P(click) 0.6 inside, 0.05 outside); users are fresh ids, so nothing else tells."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    y = np.zeros(n)
    for i in range(n):
        hist = rng.choice(n_items, length, replace=False)
        cand = int(hist[rng.integers(length)] if rng.random() < 0.5 else rng.integers(n_items))
        rows.append(
            {
                "user_id": f"u{rng.integers(1_000_000)}",
                "item_id": f"i{cand}",
                "hist_seq": [f"i{h}" for h in hist],
                "hist_seq_age": [60.0 * (k + 1) for k in range(length)],
            }
        )
        y[i] = rng.random() < (0.6 if cand in hist else 0.05)
    return rows, y


SEQ_ENC = EncoderConfig(num_buckets=1 << 12, max_cat_fields=4, max_num_fields=2)


def _ranker(model: str = "dcnv2", **kw: Any) -> TorchRanker:
    cfg = RankerConfig(
        model=model, device="cpu", encoder=SEQ_ENC, hidden=(32, 16), embedding_dim=8, **kw
    )
    return TorchRanker(cfg, seed=0, online=False)


@pytest.mark.parametrize("model", ["dcnv2", "deepfm", "wide_deep"])
def test_attention_learns_membership_in_the_history_that_no_other_input_shows(model: str) -> None:
    rows, y = membership_world(8000, seed=0)
    aucs = {}
    for attend in (True, False):
        ranker = _ranker(model, sequence_attention=attend)
        for s in range(0, 6000, 64):
            ranker.learn_many(rows[s : s + 64], y[s : s + 64])
        aucs[attend] = auc(ranker.predict_proba_many(rows[6000:]), y[6000:])
    # Measured: about 0.79-0.81 with attention, 0.50 without.
    assert aucs[False] < 0.56 and aucs[True] > aucs[False] + 0.15, aucs


def test_default_ranker_attends_and_rows_without_history_score_as_before() -> None:
    assert RankerConfig().sequence_attention and RankerConfig().pair_crosses
    ranker = _ranker()
    assert ranker.uses_sequence and not _ranker("logreg").uses_sequence
    rows, y = membership_world(256, seed=1)
    ranker.learn_many(rows, y)
    bare = [{k: v for k, v in r.items() if not k.startswith("hist_")} for r in rows[:8]]
    empty = [{**r, "hist_seq": [], "hist_seq_age": []} for r in bare]
    p = ranker.predict_proba_many(bare)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(ranker.predict_proba_many(empty), p, rtol=0, atol=1e-7)
    mixed = ranker.predict_proba_many(bare[:4] + rows[4:8])  # batch with some history
    np.testing.assert_allclose(mixed[:4], p[:4], rtol=0, atol=1e-6)


def test_checkpoint_from_before_the_behaviour_settings_loads_as_it_was(tmp_path: Path) -> None:
    # The layout of an old checkpoint: no sequence block, no attention, no pair weights.
    old = RankerConfig(
        device="cpu",
        encoder=EncoderConfig(num_buckets=256, max_cat_fields=4, max_num_fields=2, max_seq_len=0),
        hidden=(8,),
        embedding_dim=4,
        sequence_attention=False,
        pair_crosses=False,
        attention_log_mass=False,
    )
    ranker = TorchRanker(old, seed=1)
    rows, y = membership_world(64, seed=2)
    ranker.learn_many(rows, y)
    state = ranker.state()
    for key in ("sequence_attention", "pair_crosses", "attention_log_mass"):
        del state["config"][key]
    del state["config"]["encoder"]["max_seq_len"]
    atomic_torch_save(state, tmp_path / "old.ckpt")
    loaded = TorchRanker.load(tmp_path / "old.ckpt")
    assert loaded.config == old
    np.testing.assert_array_equal(loaded.predict_proba_many(rows), ranker.predict_proba_many(rows))


def test_checkpoint_whose_weights_do_not_match_its_config_fails_clearly(tmp_path: Path) -> None:
    ranker = _ranker(sequence_attention=False)
    state = ranker.state()
    state["config"]["sequence_attention"] = True
    atomic_torch_save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="do not match its config"):
        TorchRanker.load(tmp_path / "bad.ckpt")
