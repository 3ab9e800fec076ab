"""Two-tower history pool modes ("attention", "item_tower"), their checkpoints, and the
batched catalogue refresh (``catalogue_vectors``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from learners.two_tower import HistoryPool, TwoTowerModel
from tests.unit.learners.test_two_tower_behaviour import config, drifting_taste, recall_at_10


@pytest.mark.parametrize(
    ("mode", "extra", "margin"),
    [
        ("attention", {}, 0.15),  # measured 0.62 against the id-only tower's 0.26
        # measured 0.45 without user_id (the id row soaks up the signal with it)
        ("item_tower", {"exclude_fields": ("position", "user_id")}, 0.05),
    ],
)
def test_pool_modes_learn_drifting_taste_and_roundtrip_a_checkpoint(
    mode: str, extra: dict[str, object], margin: float, tmp_path: Path
) -> None:
    rows, items = drifting_taste(12_000, seed=0)
    train, test = rows[:10_000], rows[10_000:]
    model = TwoTowerModel(config(behaviour_pool=mode, **extra), seed=0)
    assert model.history is not None and model.history.mode == mode
    model.learn_many(train, np.ones(len(train)))
    id_only = TwoTowerModel(config(behaviour_len=0), seed=0)
    id_only.learn_many(train, np.ones(len(train)))
    assert recall_at_10(model, test, items) > recall_at_10(id_only, test, items) + margin
    model.save(tmp_path / "m.pt")
    loaded = TwoTowerModel.load(tmp_path / "m.pt")
    assert loaded.config.behaviour_pool == mode
    np.testing.assert_array_equal(loaded.user_vectors(test[:50]), model.user_vectors(test[:50]))


def test_attention_pool_depends_on_the_most_recent_item_and_is_zero_without_history() -> None:
    pool = HistoryPool("attention", dim=2)
    table = torch.nn.Embedding(5, 2, padding_idx=0)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0, 0]]))
    ages = torch.zeros(3, 3)
    out = pool(torch.tensor([[1, 2, 3], [2, 1, 3], [0, 0, 0]]), ages, table)
    assert out.shape == (3, 5) and pool.out_dim(2) == 5
    # The same set of items in another order: the most recent one queries, so pooled and
    # "last" parts differ; the log length does not.
    assert not torch.allclose(out[0, :4], out[1, :4])
    torch.testing.assert_close(out[0, 2:4], torch.tensor([1.0, 0.0]))
    assert torch.equal(out[2], torch.zeros(5))


def test_item_tower_pool_reads_remembered_item_attributes() -> None:
    model = TwoTowerModel(config(behaviour_pool="item_tower"), seed=0)
    model.learn_many(
        [{"user_id": "u1", "item_id": "a", "item_cat": "x"}, {"user_id": "u2", "item_id": "b"}],
        [1, 1],
    )
    before = model.user_vectors([{"user_id": "u9", "hist_seq": ["a"], "hist_seq_age": [5.0]}])
    # Same id, new attribute remembered: the history vector changes with it.
    model._remember_item({"item_id": "a", "item_cat": "y"})
    after = model.user_vectors([{"user_id": "u9", "hist_seq": ["a"], "hist_seq_age": [5.0]}])
    assert not np.allclose(before, after)
    bare = model.user_vectors(["u9"])
    bad = model.user_vectors([{"user_id": "u9", "hist_seq": "a"}])  # not a list: no history
    np.testing.assert_array_equal(bad, bare)


def test_catalogue_vectors_match_item_vectors_and_do_not_touch_remembered_features() -> None:
    model = TwoTowerModel(config(), seed=0)
    rows, items = drifting_taste(500, seed=3)
    model.learn_many(rows, np.ones(len(rows)))
    remembered = dict(model._item_features)
    # The same rows item_vectors embeds (remembered attributes), plus a user field to ignore.
    cat = [{**r, "user_id": "ignored"} for r in model._item_rows(items)]
    assert sum("item_cat" in r for r in cat) > 100
    for bs in (1, 7, 4096):
        got = model.catalogue_vectors(cat, batch_size=bs)
        np.testing.assert_allclose(got, model.item_vectors(items), atol=1e-5)
    new = model.catalogue_vectors([{"item_id": "never_seen", "item_cat": "c1"}])
    assert new.shape == (1, model.config.embedding_dim)
    assert abs(float(np.linalg.norm(new)) - 1.0) < 1e-5
    assert dict(model._item_features) == remembered
    assert model.catalogue_vectors([]).shape == (0, model.config.embedding_dim)
    with pytest.raises(ValueError, match="item_id"):
        model.catalogue_vectors([{"item_cat": "c1"}])
    with pytest.raises(ValueError, match="batch_size"):
        model.catalogue_vectors(cat, batch_size=0)


def test_unknown_pool_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="behaviour_pool"):
        config(behaviour_pool="max")
