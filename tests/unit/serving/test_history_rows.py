"""``history_rows`` (one user's candidates, the user's features read once) equals the
per-candidate form it replaces: ``example_row(with_history(Impression(...), peek(...)))``,
values bit for bit and key order alike, on random streams and stage configurations."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.config import FeatureConfig
from features.stage import FeatureStage
from index.faiss_index import IndexHolder
from logs.events import Impression, example_row, with_history
from serving.recommender import Recommender, ServingConfig, history_rows


def _stage(seed: int, config: FeatureConfig, n: int = 400) -> tuple[FeatureStage, float]:
    """A stage fed ``n`` random impressions of 6 users x 12 items (clicks on 30%, some
    late and out of order); returns it and the last event time."""
    rng = random.Random(seed)
    stage = FeatureStage(config)
    t = 1.7e9
    for k in range(n):
        t += rng.expovariate(1 / 40)
        ts = t - (rng.random() * 900 if rng.random() < 0.1 else 0.0)  # some late
        user, item = f"u{rng.randrange(6)}", f"i{rng.randrange(12)}"
        pos = rng.choice([None, 1, 2, 3])
        attrs = {"item_cat": f"c{rng.randrange(3)}", "dev": rng.choice(["ios", "web"])}
        stage.impression(f"m{k}", ts, user, item, pos, attrs)
        if rng.random() < 0.3:
            stage.click(f"m{k}", ts + rng.random() * 60, user)
    return stage, t


def _reference(stage, now, user, items, pos, ctx):  # noqa: ANN001, ANN202
    return [
        example_row(
            with_history(
                Impression("serve", now, user, item, pos, ctx),
                stage.peek(now, user, item, pos, ctx),
            )
        )
        for item in items
    ]


def _same(a: object, b: object) -> bool:
    """Equal with every float bit-identical (and -0.0 != 0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1, a) == math.copysign(1, b) and a.hex() == b.hex()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    counters=st.booleans(),
    sequence=st.booleans(),
    seq_len=st.sampled_from([0, 3, 20]),
    pos=st.sampled_from([None, 1, 3]),
    ctx=st.sampled_from([{}, {"item_cat": "c1"}, {"item_cat": "c2", "dev": "ios", "x": 2.5}]),
    ahead=st.sampled_from([-600.0, 0.0, 5.0, 86_400.0]),
)
def test_history_rows_equal_the_per_candidate_rows(
    seed: int,
    counters: bool,
    sequence: bool,
    seq_len: int,
    pos: int | None,
    ctx: dict[str, str | float],
    ahead: float,
) -> None:
    config = FeatureConfig(counters=counters, sequence=sequence, seq_len=seq_len)
    stage, t = _stage(seed, config)
    now = t + ahead  # also before the newest event: the out-of-order read path
    items = [f"i{k}" for k in range(14)]  # two never shown
    for user in ("u0", "u3", "nobody"):
        approx = stage.stats["approximate"]
        got = history_rows(stage, now, user, items, pos, ctx)
        want = _reference(stage, now, user, items, pos, ctx)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert list(g) == list(w)  # the same keys in the same order
            assert all(_same(g[k], w[k]) for k in w), (g, w)
        assert stage.stats["approximate"] == approx  # a read changes no state


def test_rows_have_their_own_sequence_lists() -> None:
    stage, t = _stage(1, FeatureConfig())
    rows = history_rows(stage, t + 1, "u0", ["i1", "i2"], 1, {})
    assert rows[0]["hist_seq"]  # u0 clicked something in 400 events
    assert rows[0]["hist_seq"] is not rows[1]["hist_seq"]


def test_state_is_unchanged_by_reads() -> None:
    stage, t = _stage(2, FeatureConfig())
    before = stage.state_dict()
    history_rows(stage, t + 10, "u1", [f"i{k}" for k in range(12)], 2, {"item_cat": "c0"})
    assert stage.state_dict() == before


@pytest.mark.parametrize("ctx", [{}, {"item_cat": "c1"}, {"hist_seq": "i1", "hist_x": 9.0}])
def test_the_recommender_serves_the_per_candidate_rows(ctx: dict[str, str | float]) -> None:
    """Through ``Recommender._rows``; a client's own ``hist_*`` context values keep the
    per-candidate form (history_rows' contract excludes them)."""
    stage, t = _stage(3, FeatureConfig())
    rec = Recommender(
        IndexHolder(), lambda: None, lambda: None,  # type: ignore[arg-type,return-value]
        config=ServingConfig(position=2), history=lambda user: stage, clock=lambda: t + 1,
    )  # fmt: skip
    items = [f"i{k}" for k in range(12)]
    got = rec._rows("u0", items, ctx)
    want = _reference(stage, t + 1, "u0", items, 2, ctx)
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        assert all(_same(g[k], w[k]) for k in w)


def _ranker():  # noqa: ANN202
    from learners.ranker import TorchRanker
    from stream.settings import Settings

    return TorchRanker(Settings().ranker, seed=0, online=False)


@pytest.mark.parametrize("pos", [None, 2])
def test_candidate_form_scores_bit_identically(pos: int | None) -> None:
    """``Recommender._p_raw`` (each user's part encoded once, the candidates' own features
    apart) gives the very probabilities of the reference rows, over several queries, a
    user the stage has never seen and a stage-less user among them."""
    import numpy as np

    stage, t = _stage(4, FeatureConfig())
    ranker = _ranker()
    seen = [
        row
        for user in ("u0", "u1", "u2", "u3")
        for row in _reference(
            stage, t, user, [f"i{k}" for k in range(12)], pos, {"item_cat": "c1", "dev": "ios"}
        )  # fmt: skip
    ]
    ranker.learn_many(seen, [k % 2 for k in range(len(seen))])  # admits the hist_* names
    fields = set(ranker.encoder.num_fields)
    assert {"hist_item_imp_1h", "hist_ui_n", "hist_user_imp_1h"} <= fields  # not vacuous
    rec = Recommender(
        IndexHolder(), lambda: ranker, lambda: None,  # type: ignore[arg-type,return-value]
        config=ServingConfig(position=pos),
        history=lambda user: None if user == "stateless" else stage, clock=lambda: t + 1,
    )  # fmt: skip
    items = [f"i{k}" for k in range(14)]
    queries = [("u0", items, {"item_cat": "c1"}), ("nobody", items[:3], {}),
               ("stateless", items[:5], {}), ("u2", items[5:], {"dev": "web"})]  # fmt: skip
    got = rec._p_raw(ranker, queries)
    want_rows = [
        row
        for user, its, ctx in queries
        for row in (
            _reference(stage, t + 1, user, its, pos, ctx)
            if user != "stateless"
            else [
                {
                    **ctx,
                    "user_id": user,
                    **({} if pos is None else {"position": pos}),
                    "item_id": it,
                }
                for it in its
            ]  # fmt: skip
        )
    ]
    want = np.asarray(ranker.predict_proba_many(want_rows))
    assert got.shape == want.shape == (14 + 3 + 5 + 9,)
    assert np.array_equal(got, want)
    assert len(set(np.round(got, 9))) > 10  # the rows differ: the check is not vacuous


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    counters=st.booleans(),
    pos=st.sampled_from([None, 1, 3]),
    ahead=st.sampled_from([-600.0, 0.0, 5.0]),
)
def test_a_batch_cache_gives_each_user_the_per_candidate_features(
    seed: int, counters: bool, pos: int | None, ahead: float
) -> None:
    """``peek_many`` with one :class:`PeekCache` shared by the users of a batch: every
    candidate's features equal ``peek``'s (bits and key order); a candidate the user never
    saw shares its item's part with the other users, a pair the user saw has its own."""
    from features.stage import PeekCache

    stage, t = _stage(seed, FeatureConfig(counters=counters))
    now = t + ahead
    cache = PeekCache(stage, now, pos)
    items = [f"i{k}" for k in range(14)]
    got_parts: dict[str, list[dict[str, object]]] = {}
    for user in ("u0", "u3", "nobody", "u0"):
        head, parts, tail = stage.peek_many(now, user, items, pos, {"item_cat": "c1"}, cache)
        got_parts[user] = parts
        for item, part in zip(items, parts, strict=True):
            want = stage.peek(now, user, item, pos, {"item_cat": "c1"})
            got = {**head, **part, **tail}
            assert list(got) == list(want)
            assert all(_same(got[k], want[k]) for k in want), (got, want)
    if counters:
        keys = stage.state_dict()["keys"]
        for n, item in enumerate(items):
            seen = f"p\x1fu0\x1f{item}" in keys
            assert (got_parts["u0"][n] is got_parts["nobody"][n]) is not seen
        assert any(f"p\x1fu0\x1f{item}" in keys for item in items)  # not vacuous
    for wrong in (PeekCache(stage, now + 1, pos), PeekCache(FeatureStage(), now, pos)):
        if counters:
            with pytest.raises(ValueError, match="another stage"):
                stage.peek_many(now, "u0", items, pos, None, wrong)


@pytest.mark.parametrize("ctx", [{}, {"dev": "web", "x": 2.5}])
def test_the_user_tower_reads_at_serving_what_it_read_in_training(
    ctx: dict[str, str | float],
) -> None:
    """``Recommender.user_rows`` holds the user's side of the training row of an impression
    arriving now (context, behaviour sequence and its ages): the two-tower user vector
    served equals the vector of that training row, and differs from the id-only vector
    (the history is read, not dropped)."""
    import numpy as np

    from learners.two_tower import TwoTowerConfig, TwoTowerModel

    stage, t = _stage(5, FeatureConfig())
    tower = TwoTowerModel(TwoTowerConfig(embedding_dim=8, device="cpu"), seed=0)
    train = [r for u in ("u0", "u1", "u2") for r in _reference(stage, t, u, ["i1", "i2"], 1, ctx)]
    tower.learn_many(train, np.ones(len(train)))
    rec = Recommender(
        IndexHolder(), lambda: None, lambda: None,  # type: ignore[arg-type,return-value]
        user_vectors=tower.user_vectors, config=ServingConfig(position=1),
        history=lambda user: None if user == "stateless" else stage, clock=lambda: t + 1,
    )  # fmt: skip
    users = ["u0", "u3", "nobody", "stateless"]
    rows = rec.user_rows([(u, ctx) for u in users])
    want = [_reference(stage, t + 1, u, ["i0"], 1, ctx)[0] for u in users[:3]]
    for got, ref in zip(rows[:3], want, strict=True):
        assert got["user_id"] == ref["user_id"]
        for k in ("hist_seq", "hist_seq_age", *ctx):
            assert (k in got) == (k in ref) and (k not in ref or _same(got[k], ref[k])), k
    assert rows[0]["hist_seq"] and rows[1]["hist_seq"]  # u0 and u3 clicked: not vacuous
    assert rows[3] == {**ctx, "user_id": "stateless"}
    np.testing.assert_array_equal(tower.user_vectors(rows[:3]), tower.user_vectors(want))
    assert not np.allclose(tower.user_vectors(rows[:1]), tower.user_vectors(["u0"]))


def test_a_clients_own_history_is_dropped_where_the_stage_computes_it() -> None:
    """A request context's ``hist_*`` values (a forged behaviour sequence or counter) are
    dropped for a user whose history the stage computes, as a joined impression's are, so
    the rows (ranker and user tower) are the stage's alone; they are counted through
    ``on_history_dropped`` once per request. Without a stage for the user they are kept,
    decoded as a training row's."""
    from learners.calibration import PlattCalibrator

    stage, t = _stage(7, FeatureConfig())
    dropped: list[int] = []
    ranker = _ranker()
    rec = Recommender(
        IndexHolder(), lambda: ranker, lambda: (PlattCalibrator(), 0),
        config=ServingConfig(position=1),
        history=lambda user: None if user == "stateless" else stage, clock=lambda: t + 1,
        on_history_dropped=dropped.append,
    )  # fmt: skip
    forged = {"hist_seq": "i11\x1fi10", "hist_user_imp_1h": 1e6, "dev": "web"}
    plain = {"dev": "web"}
    for user in ("u0", "nobody"):
        assert rec._rows(user, ["i1", "i2"], forged) == rec._rows(user, ["i1", "i2"], plain)
        assert rec.user_rows([(user, forged)]) == rec.user_rows([(user, plain)])
        a = rec.score(user, ["i1", "i2"], forged)
        b = rec.score(user, ["i1", "i2"], plain)
        assert [x["p_raw"] for x in a["items"]] == [x["p_raw"] for x in b["items"]]
    assert dropped == [2, 2]  # one count per request, none for the plain context
    assert rec.user_rows([("nobody", forged)])[0].get("hist_seq") is None  # not vacuous:
    assert rec.user_rows([("u0", plain)])[0]["hist_seq"]  # u0 has a sequence of its own
    (kept,) = rec.user_rows([("stateless", forged)])
    assert kept["hist_seq"] == ["i11", "i10"] and kept["hist_user_imp_1h"] == 1e6
    assert rec._rows("stateless", ["i1"], forged)[0]["hist_seq"] == ["i11", "i10"]
    assert dropped == [2, 2]
