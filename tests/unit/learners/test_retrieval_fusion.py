"""The served candidate fusion (:mod:`learners.retrieval_fusion`): its sparse co-visitation
equals the dense scoring the evaluation measured, its caches follow what it learns, and a
trainer thread may learn while serving threads fuse."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from learners.covisit import CoVisitation
from learners.retrieval_fusion import FusedRetrieval, FusionConfig


def _stream(
    seed: int, n: int = 3_000, items: int = 60
) -> tuple[list[dict[str, object]], np.ndarray]:
    """Rows of 40 users clicking ~30% of the time; ``hist_seq``: the user's earlier clicks,
    most recent first (point in time), as the feature stage gives them."""
    rng = random.Random(seed)
    hist: dict[str, list[str]] = {}
    rows, y = [], []
    for _ in range(n):
        u = f"u{rng.randrange(40)}"
        h = hist.setdefault(u, [])
        # a taste: items near the user's number, so co-visits carry a signal
        item = f"i{(int(u[1:]) + int(rng.expovariate(0.3))) % items}"
        rows.append({"user_id": u, "item_id": item, "hist_seq": list(h[:20])})
        click = rng.random() < 0.3
        y.append(float(click))
        if click:
            h.insert(0, item)
    return rows, np.array(y)


def test_sparse_covisitation_equals_the_dense_scoring_the_evaluation_measured() -> None:
    rows, y = _stream(0)
    fr = FusedRetrieval(FusionConfig(neighbours=10_000))
    dense = CoVisitation(FusionConfig().covisit)
    for s in range(0, len(rows), 128):  # in batches, as a trainer feeds it
        fr.learn_many(rows[s : s + 128], y[s : s + 128])
        dense.learn_many(rows[s : s + 128], y[s : s + 128])
    catalogue = sorted({str(r["item_id"]) for r in rows})
    queries = [r for r in rows[-200:] if r["hist_seq"]]
    assert len(queries) > 100
    want = dense.top(queries, catalogue, 30, fill=np.arange(len(catalogue)))
    col, ptr, idx, val = dense._matrix(catalogue)
    for q, row in zip(want, queries, strict=True):
        got = fr.covisit_top(row["hist_seq"], 30)  # type: ignore[arg-type]
        # the dense scores of the query (as dense.top sums them)
        score = np.zeros(len(catalogue))
        for j, h in enumerate(row["hist_seq"][:20]):  # type: ignore[index]
            a = col[h]
            score[idx[ptr[a] : ptr[a + 1]]] += val[ptr[a] : ptr[a + 1]] / (1.0 + j)
        assert len(got) == int((score > 0).sum()) or len(got) == 30
        # the dense list past the scored items is the fill order: compare the scored
        # prefix, by score (equal scores may come in either order)
        assert np.allclose([score[col[c]] for c in got], score[q[: len(got)]], rtol=1e-12)


def test_a_learnt_click_reaches_the_next_query_and_the_cache_is_refreshed() -> None:
    fr = FusedRetrieval(FusionConfig(refresh_clicks=3, width=5))
    fr.learn_many([{"item_id": "b", "hist_seq": ["a"]}], [1])
    assert fr.covisit_top(["a"], 5) == ["b"]  # cached now
    fr.learn_many(
        [{"item_id": "c", "hist_seq": ["a"]}, {"item_id": "c", "hist_seq": ["a"]}], [1, 1]
    )
    assert fr.covisit_top(["a"], 5) == ["c", "b"]  # a's list changed: not the stale cache
    assert fr.popular_top(5) == ["c", "b"]
    fr.learn_many([{"item_id": "d"}] * 5, [1, 0, 1, 1, 1])  # past refresh_clicks
    assert fr.popular_top(1) == ["d"]  # the popularity list was recomputed
    assert fr.n_clicks == 7


def test_the_prior_lifts_popular_items_and_beta_0_keeps_the_cosine_order() -> None:
    fr = FusedRetrieval(FusionConfig(beta=1.0), temperature=0.1)
    fr.learn_many([{"item_id": "pop"}] * 50 + [{"item_id": "rare"}], [1] * 51)
    cos = np.array([0.50, 0.45])
    assert fr.model_top(["rare", "pop"], cos, 2) == ["pop", "rare"]
    plain = FusedRetrieval(FusionConfig(beta=0.0), temperature=0.1)
    plain.learn_many([{"item_id": "pop"}] * 50, [1] * 50)
    assert plain.model_top(["rare", "pop"], cos, 2) == ["rare", "pop"]


def test_fusion_merges_the_three_lists_and_disabled_serves_the_model_list() -> None:
    rows, y = _stream(1)
    fr = FusedRetrieval(FusionConfig(width=20))
    fr.learn_many(rows, y)
    model_items = [f"m{j}" for j in range(30)]  # never clicked: only the model knows them
    cos = np.linspace(0.9, 0.1, 30)[None, :]
    ((items, scores),) = fr.fuse([model_items], cos, [rows[-1]["hist_seq"]], 25)  # type: ignore[list-item]
    assert len(items) == len(set(items)) == 25 and np.all(np.diff(scores) <= 0)
    # the fused order is the weighted reciprocal rank fusion of the three lists
    lists = (fr.model_top(model_items, cos[0], 20),
             fr.covisit_top(rows[-1]["hist_seq"], 20),  # type: ignore[arg-type]
             fr.popular_top(20))  # fmt: skip
    rrf: dict[str, float] = {}
    for lst, w in zip(lists, fr.config.weights, strict=True):
        for rank, item in enumerate(lst):
            rrf[item] = rrf.get(item, 0.0) + w / (fr.config.rrf_c + rank)
    assert np.allclose(scores[: len(rrf)], sorted(rrf.values(), reverse=True)[:25])
    assert items[0] == max(rrf, key=rrf.__getitem__)
    assert {"m0", "m1"} <= set(items) and set(items) - set(model_items)  # both kinds
    off = FusedRetrieval(FusionConfig(enabled=False))
    off.learn_many(rows, y)
    ((items, scores),) = off.fuse([model_items], cos, [["i1"]], 10)
    assert items == model_items[:10] and np.allclose(scores, cos[0, :10])


def test_state_dict_round_trip_fuses_the_same() -> None:
    rows, y = _stream(2)
    fr = FusedRetrieval(FusionConfig(width=15), temperature=0.07)
    fr.learn_many(rows[:2000], y[:2000])
    back = FusedRetrieval.from_state_dict(fr.state_dict())
    for r in rows[2000:2050]:
        args = ([["i1", "i7", "x"]], np.array([[0.3, 0.2, 0.1]]), [r["hist_seq"]], 15)
        a, b = fr.fuse(*args), back.fuse(*args)  # type: ignore[arg-type]
        assert a[0][0] == b[0][0] and np.allclose(a[0][1], b[0][1])
    back.learn_many(rows[2000:], y[2000:])  # and it goes on learning
    assert back.n_clicks == int(y.sum())


@pytest.mark.parametrize(
    "kw",
    [{"beta": -1.0}, {"half_life_clicks": 0.0}, {"width": 0}, {"weights": (0.0, 0.0, 0.0)},
     {"weights": (1.0, 2.0)}, {"rrf_c": float("nan")}, {"neighbours": 0}],
)  # fmt: skip
def test_bad_configs_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="FusionConfig"):
        FusionConfig(**kw)  # type: ignore[arg-type]


def test_a_trainer_thread_learns_while_serving_threads_fuse() -> None:
    rows, y = _stream(3, n=6_000)
    fr = FusedRetrieval(FusionConfig(refresh_clicks=50))
    errors: list[BaseException] = []
    done = threading.Event()

    def serve() -> None:
        try:
            while not done.is_set():
                for r in rows[::97]:
                    fr.fuse([["i1", "i2"]], np.array([[0.5, 0.4]]), [r["hist_seq"]], 10)  # type: ignore[list-item]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    for s in range(0, len(rows), 64):
        fr.learn_many(rows[s : s + 64], y[s : s + 64])
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert fr.n_clicks == int(y.sum())


def _observe_all(fr: FusedRetrieval, rows, y, model_list) -> None:  # noqa: ANN001
    """Observe then learn each batch's clicks, the model always offering ``model_list``."""
    for s in range(0, len(rows), 64):
        clicks = [r for r, t in zip(rows[s : s + 64], y[s : s + 64], strict=True) if t > 0]
        n = len(model_list)
        fr.observe(
            clicks, [model_list] * len(clicks), np.tile(np.linspace(1, 0, n), (len(clicks), 1))
        )
        fr.learn_many(rows[s : s + 64], y[s : s + 64])


def test_the_online_pick_leaves_the_configured_setting_only_on_evidence() -> None:
    """A model list that never holds the clicked item: the pick moves to a setting that
    weighs co-visitation (the signal of this stream) at least twice the model; one that
    always ranks it first: to a setting that weighs the model more than the configured
    one does. Without enough evidence (a huge ``adapt_z``), the configured one stays."""
    rows, y = _stream(4, n=8_000)
    useless = FusedRetrieval(FusionConfig(adapt_min_clicks=100))
    _observe_all(useless, rows, y, [f"m{j}" for j in range(50)])
    assert useless.n_observed > 1_000
    picked = useless.setting
    assert picked["adapted"] and picked["weights"][1] >= 2 * picked["weights"][0], picked
    perfect = FusedRetrieval(FusionConfig(adapt_min_clicks=100))
    for s in range(0, len(rows), 64):
        clicks = [r for r, t in zip(rows[s : s + 64], y[s : s + 64], strict=True) if t > 0]
        lists = [[str(r["item_id"]), *[f"m{j}" for j in range(20)]] for r in clicks]
        perfect.observe(clicks, lists, np.tile(np.linspace(1, 0, 21), (len(clicks), 1)))
        perfect.learn_many(rows[s : s + 64], y[s : s + 64])
    w = perfect.setting["weights"]
    assert perfect.setting["adapted"] and w[0] == 1.0 and w[1] < FusionConfig().weights[1], w
    cautious = FusedRetrieval(FusionConfig(adapt_min_clicks=100, adapt_z=1e3))
    _observe_all(cautious, rows, y, [f"m{j}" for j in range(50)])
    assert cautious.n_observed == useless.n_observed and not cautious.setting["adapted"]
    # the pick and its evidence survive a snapshot
    back = FusedRetrieval.from_state_dict(useless.state_dict())
    assert back.setting == picked and back.n_observed == useless.n_observed
    off = FusedRetrieval(FusionConfig(adapt=False))
    _observe_all(off, rows, y, [f"m{j}" for j in range(50)])
    assert off.n_observed == 0 and not off.setting["adapted"]


def test_with_adapt_the_configured_setting_must_be_a_grid_point() -> None:
    with pytest.raises(ValueError, match="grid|one of"):
        FusionConfig(weights=(1.0, 3.0, 0.5))
    FusionConfig(weights=(1.0, 3.0, 0.5), adapt=False)  # off the grid is fine without it


def test_a_stream_of_ever_new_items_keeps_the_state_bounded() -> None:
    """Every click on a new item id by a new user id (hostile, or a catalogue that never
    repeats): the co-visit counts forget the least recently clicked items past
    ``covisit_max_items``, and the decayed clicks (and the users' credit) drop keys below
    ``log_q``'s floor at each refresh."""
    fr = FusedRetrieval(FusionConfig(covisit_max_items=500, refresh_clicks=100,
                                     half_life_clicks=50.0))  # fmt: skip
    hist: list[str] = []
    for s in range(0, 20_000, 100):
        rows = [{"item_id": f"new{s + j}", "hist_seq": hist[:5], "user_id": f"user{s + j}"}
                for j in range(100)]  # fmt: skip
        fr.learn_many(rows, np.ones(100))
        hist = [f"new{s + j}" for j in range(99, 94, -1)]
    cv = fr.covisit
    assert len(cv.clicks) <= 500 and len(cv.co) <= 500 and cv.forgotten > 19_000
    assert cv.entries == sum(len(nb) for nb in cv.co.values())  # the count stays exact
    assert len(fr.clicks._raw) < 1_000  # ~50 * log2(2 / 0.5) + a refresh's worth
    assert len(fr.users._raw) < 1_000  # and so do ever new user ids (the share's credit)
    assert fr.popular_top(3)  # still serving
    assert fr.covisit_top(hist, 5)  # the latest items' co-visits are kept


def _with_bot(
    rows: list[dict[str, object]],
    y: np.ndarray,
    n_bot: int,
    cycle: int,
    users: int = 1,
    fill: list[str] | None = None,
) -> tuple[list[dict[str, object]], np.ndarray]:
    """``rows`` with ``n_bot`` clicks of ``users`` bot accounts spread evenly among them:
    every ``cycle``-th bot click is on "spam", the others in turn on ``fill`` (default:
    60 filler items no one else clicks); ``cycle`` > the co-visit window makes every spam
    click fresh; 1: spam only. Each bot row carries its account's point-in-time
    ``hist_seq``, as the feature stage gives it."""
    fill = fill or [f"filler{j}" for j in range(60)]
    out, yy = [], []
    hist: dict[str, list[str]] = {}
    every = max(1, len(rows) // n_bot)
    k = 0
    for j, (r, t) in enumerate(zip(rows, y.tolist(), strict=True)):
        out.append(r)
        yy.append(t)
        if j % every == 0 and k < n_bot:
            user = f"bot{k % users}"
            h = hist.setdefault(user, [])
            item = "spam" if k % cycle == 0 else fill[k % len(fill)]
            out.append({"user_id": user, "item_id": item, "hist_seq": list(h[:20])})
            yy.append(1.0)
            h.insert(0, item)
            k += 1
    return out, np.array(yy)


def _learn(fr: FusedRetrieval, rows: list[dict[str, object]], y: np.ndarray) -> FusedRetrieval:
    for s in range(0, len(rows), 256):
        fr.learn_many(rows[s : s + 256], y[s : s + 256])
    return fr


def test_one_user_cannot_flood_popularity_but_many_users_make_an_item_popular() -> None:
    rows, y = _stream(5, n=12_000, items=200)
    # one account clicking "spam" 3,000 times: repeats (spam is in its own window) count
    # nowhere, so spam is not popular; the same clicks from 300 accounts are a real trend
    one = _learn(FusedRetrieval(), *_with_bot(rows, y, 3_000, cycle=1))
    assert "spam" not in one.popular_top(20) and one.repeats >= 2_999
    many = _learn(FusedRetrieval(), *_with_bot(rows, y, 3_000, cycle=1, users=300))
    assert many.popular_top(1) == ["spam"]
    # spam every 26th click, fresh each time (25 filler clicks between): past the user's
    # share its clicks stop counting; without the share (1) spam is the most popular item
    cycling = _with_bot(rows, y, 6_000, cycle=26)
    capped = _learn(FusedRetrieval(), *cycling)
    assert "spam" not in capped.popular_top(20) and capped.throttled > 5_000
    assert not any(i.startswith("filler") for i in capped.popular_top(20))
    uncapped = _learn(FusedRetrieval(FusionConfig(max_user_share=1.0)), *cycling)
    assert uncapped.popular_top(1) == ["spam"] and uncapped.throttled == 0
    # the credit travels with a snapshot
    back = FusedRetrieval.from_state_dict(capped.state_dict())
    assert back.users.counts == capped.users.counts and back.throttled == capped.throttled
    assert back.n_clicks == capped.n_clicks == int(cycling[1].sum())


def test_one_user_cannot_push_an_item_into_the_co_visits_of_popular_items() -> None:
    """A bot clicking "spam" between the 30 most popular items, fresh each time, co-visits
    spam with each of them over and over: counted once per pair for that user
    (``covisit_pair_memory``) spam stays out of their top 10; counted every time it is in
    the lists of many of them."""
    rows, y = _stream(7, n=12_000, items=200)
    targets = _learn(FusedRetrieval(), rows, y).popular_top(30)
    attack = _with_bot(rows, y, 4_000, cycle=26, fill=targets)
    guarded = _learn(FusedRetrieval(), *attack)
    assert guarded.covisit.pairs is not None and guarded.covisit.pairs.repeated > 1_000
    assert sum("spam" in guarded.covisit_top([t], 10) for t in targets) == 0
    naive = _learn(FusedRetrieval(FusionConfig(covisit_pair_memory=0)), *attack)
    assert sum("spam" in naive.covisit_top([t], 10) for t in targets) >= 10


def test_the_pair_memory_counts_a_pair_once_per_user() -> None:
    from learners.covisit import PairMemory

    pm = PairMemory(1024)
    assert pm.fresh("u", "b", ["a", "c"]) == [True, True]
    assert pm.fresh("u", "a", ["b", "d"]) == [False, True]  # (a, b) is (b, a)
    assert pm.fresh("v", "b", ["a"]) == [True]  # another user counts it too
    assert pm.fresh("u", "b", []) == [] and pm.repeated == 1
    with pytest.raises(ValueError, match="pair_memory"):
        FusionConfig(covisit_pair_memory=1000)


def test_ordinary_users_are_not_throttled() -> None:
    rows, y = _stream(6, n=12_000, items=200)
    rows = [{**r, "user_id": f"{r['user_id']}-{j % 5}"} for j, r in enumerate(rows)]  # 200 users
    fr = _learn(FusedRetrieval(), rows, y)
    assert fr.throttled == 0 and fr.n_clicks == int(y.sum())


@pytest.mark.parametrize(
    "kw",
    [{"max_user_share": 0.0}, {"max_user_share": 1.5}, {"user_share_floor": 0.5},
     {"user_share_floor": float("inf")}],
)  # fmt: skip
def test_bad_user_share_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="user_share"):
        FusionConfig(**kw)  # type: ignore[arg-type]
