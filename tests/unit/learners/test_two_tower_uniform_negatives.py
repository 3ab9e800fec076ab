"""Mixed negative sampling in the two-tower: items shown but never clicked are scored
down; the remembered catalogue the uniform draws come from stays consistent."""

from __future__ import annotations

import numpy as np
import pytest

from learners.encoding import EncoderConfig
from learners.retrieval_eval import _top_k, evaluate_retrieval
from learners.two_tower import TwoTowerConfig, TwoTowerModel

ENC = EncoderConfig(num_buckets=1 << 12, max_cat_fields=4, max_num_fields=2, max_seq_len=0)


def shown_never_clicked(n: int, seed: int) -> tuple[list[dict[str, object]], np.ndarray]:
    """200 users in 5 taste groups; half the rows are clicks on one of the user's group's
    10 items, the other half show one of 20 'junk' items that nobody ever clicks; every
    item carries an uninformative genre drawn from the same three values."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    y = []
    for _ in range(n):
        u = int(rng.integers(200))
        if rng.random() < 0.5:
            junk = int(rng.integers(20))
            rows.append({"user_id": f"u{u}", "item_id": f"j{junk}", "item_genre": f"g{junk % 3}"})
            y.append(0.0)
        else:
            item = (u % 5) * 10 + int(rng.integers(10))
            rows.append(
                {"user_id": f"u{u}", "item_id": f"i{item}", "item_genre": f"g{rng.integers(3)}"}
            )
            y.append(1.0)
    return rows, np.array(y)


def junk_share(uniform_negatives: int, seed: int) -> float:
    rows, y = shown_never_clicked(8_000, seed=0)
    cfg = TwoTowerConfig(
        device="cpu", user_encoder=ENC, item_encoder=ENC, batch_size=256, behaviour_len=0,
        uniform_negatives=uniform_negatives,
    )  # fmt: skip
    model = TwoTowerModel(cfg, seed=seed)
    split = int(0.8 * len(rows))
    for s in range(0, split, 1024):
        model.learn_many(rows[s : min(s + 1024, split)], y[s : min(s + 1024, split)])
    catalogue = list(dict.fromkeys(str(r["item_id"]) for r in rows[:split]))
    queries = [r for r, t in zip(rows[split:], y[split:], strict=True) if t > 0][:300]
    top = _top_k(model.user_vectors(queries), model.item_vectors(catalogue), 10)
    return float(np.mean([catalogue[j].startswith("j") for j in top.ravel()]))


def test_uniform_negatives_keep_never_clicked_items_out_of_the_top() -> None:
    with_uniform = [junk_share(64, seed) for seed in range(3)]
    without = [junk_share(0, seed) for seed in range(3)]
    assert max(with_uniform) < 0.02, with_uniform
    # Without them, in-batch negatives are clicked items only: the junk items are never
    # scored down, only pulled along by the genre they share with clicked items, and for
    # some seeds take a share of the top 10 (0.16 and 0.13 of the slots for seeds 0, 2).
    assert max(without) > 0.1, without


def test_the_catalogue_is_every_item_shown_bounded_by_max_items() -> None:
    cfg = TwoTowerConfig(
        device="cpu", user_encoder=ENC, item_encoder=ENC, max_items=5, uniform_negatives=3,
        behaviour_len=0,
    )  # fmt: skip
    model = TwoTowerModel(cfg, seed=0)
    rows = [{"user_id": "u", "item_id": f"i{j}", "item_cat": "a"} for j in range(8)]
    model.learn_many(rows, np.zeros(8))  # no click: no step, but every item is remembered
    assert model.n_updates == 0
    assert sorted(model._catalogue) == [f"i{j}" for j in range(3, 8)]
    assert all(model._catalogue[model._slot[it]] == it for it in model._catalogue)
    # an id-only sighting keeps the features the item had
    model.learn_many([{"user_id": "u", "item_id": "i7"}], np.zeros(1))
    assert model._item_features["i7"] == {"item_cat": "a"}
    draws = model._draw_uniform({"i3"})
    assert len(draws) <= 3 and "i3" not in draws and set(draws) <= set(model._catalogue)
    assert model._draw_uniform({"i3"}) == draws  # seeded by (seed, n_updates)
    # a reloaded model rebuilds the sampling list and draws the same items
    clone = TwoTowerModel.from_state(model.state())
    assert clone._catalogue == model._catalogue
    assert clone._draw_uniform({"i3"}) == draws


def test_a_config_written_before_uniform_negatives_loads_with_them_off() -> None:
    d = TwoTowerConfig().to_dict()
    del d["uniform_negatives"]
    assert TwoTowerConfig.from_dict(d).uniform_negatives == 0
    with pytest.raises(ValueError, match="uniform_negatives"):
        TwoTowerConfig(uniform_negatives=-1)


def test_exclude_seen_drops_the_querys_own_history_from_every_row() -> None:
    rows, y = shown_never_clicked(4_000, seed=1)
    for r in rows:  # every row's history: the user's group's first three items
        if str(r["item_id"]).startswith("i"):
            g = int(str(r["user_id"])[1:]) % 5
            r["hist_seq"] = [f"i{g * 10 + j}" for j in range(3)]
    cfg = TwoTowerConfig(device="cpu", user_encoder=ENC, item_encoder=ENC, behaviour_len=0)
    plain = evaluate_retrieval(rows, y, TwoTowerModel(cfg, seed=0), k=10)
    dropped = evaluate_retrieval(rows, y, TwoTowerModel(cfg, seed=0), k=10, exclude_seen=True)
    assert dropped["exclude_seen"] and not plain["exclude_seen"]
    # Test clicks on a history item can no longer be found; the others gain the freed slots.
    for name in ("model", "popularity"):
        assert dropped["rows"][name]["recall_at_k"] != plain["rows"][name]["recall_at_k"]
    assert dropped["rows"]["model"]["recall_at_k"] <= 0.71  # 3 of the 10 group items are history
