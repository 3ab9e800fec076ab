"""The joiner's DFM scheme (``JoinConfig.delayed_feedback="dfm"``, Chapelle 2014): a
positive at click time with its delay, an unclicked impression once at ``T``, late clicks
counted and sent with weight 0."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logs.events import Click, Impression, LabeledExample
from stream.join import JoinConfig, OnlineJoiner, offline_join
from tests.unit.stream.join_helpers import T0, W, both, click, imp, kinds

T = 20.0


@pytest.fixture
def joiner() -> OnlineJoiner:
    return OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, delayed_feedback="dfm",
                                   dfm_observe_s=T, idle_timeout_s=None))  # fmt: skip


def test_a_click_before_t_is_a_positive_at_click_time_with_its_delay(joiner: OnlineJoiner) -> None:
    assert joiner.on_impression(imp("a", 0)) == []  # nothing at the impression
    out = joiner.on_click(click("a", 7))
    assert kinds(out) == [("a", 1, "positive")]
    assert out[0].label_ts - out[0].impression.ts == 7.0 and out[0].weight == 1.0
    assert kinds(both(joiner, W + 5)) == []  # released once: nothing at T or W


def test_an_unclicked_impression_is_released_once_at_t_with_elapsed_t(joiner: OnlineJoiner) -> None:
    joiner.on_impression(imp("b", 0))
    assert both(joiner, T - 1) == []
    out = both(joiner, T + 1)
    assert kinds(out) == [("b", 0, "negative")]
    assert out[0].label_ts - out[0].impression.ts == T and out[0].weight == 1.0
    assert both(joiner, W + 5) == []


def test_a_click_after_t_is_counted_late_and_sent_with_weight_zero(joiner: OnlineJoiner) -> None:
    joiner.on_impression(imp("c", 0))
    both(joiner, T + 1)
    out = joiner.on_click(click("c", T + 10))
    assert kinds(out) == [("c", 1, "late_click")] and out[0].weight == 0.0
    assert joiner.counters.late_clicks == 1 and joiner.counters.positives == 0
    assert joiner.on_click(click("c", T + 12)) == []  # a second click: a duplicate
    assert joiner.counters.duplicate_clicks == 1
    joiner.on_impression(imp("d", 100))
    both(joiner, 100 + T + 1)
    assert joiner.on_click(click("d", 100 + W + 1)) == []  # after the window: no click
    assert joiner.counters.late_clicks == 1


def test_a_click_after_t_before_the_watermark_still_censors_at_t() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=30.0, delayed_feedback="dfm",
                                dfm_observe_s=T, idle_timeout_s=None))  # fmt: skip
    j.on_impression(imp("e", 0))
    out = j.on_click(click("e", T + 5))  # the watermark (T + 5 - 30) has not closed T yet
    assert kinds(out) == [("e", 0, "negative"), ("e", 1, "late_click")]
    assert out[0].label_ts == T0 + T and out[1].weight == 0.0


def test_an_orphan_click_waits_for_its_impression(joiner: OnlineJoiner) -> None:
    assert joiner.on_click(click("f", 5)) == []
    assert kinds(joiner.on_impression(imp("f", 0))) == [("f", 1, "positive")]
    assert joiner.on_click(click("g", T + 4)) == []
    assert kinds(joiner.on_impression(imp("g", 0))) == [
        ("g", 0, "negative"),
        ("g", 1, "late_click"),
    ]


def test_dfm_config_is_checked() -> None:
    with pytest.raises(ValueError, match="exceeds window_s"):
        JoinConfig(window_s=60.0, delayed_feedback="dfm", dfm_observe_s=61.0)
    with pytest.raises(ValueError, match="dfm_observe_s must be > 0"):
        JoinConfig(delayed_feedback="dfm", dfm_observe_s=0.0)
    JoinConfig(window_s=60.0, dfm_observe_s=600.0)  # other schemes ignore it
    assert JoinConfig().dfm_observe_s == 300.0


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[float, float, float, list[Impression | Click]]:
    """(window, T, lateness, events in arrival order): duplicates, orphans, ghost clicks,
    out-of-order arrival within the lateness bound."""
    window = draw(st.integers(2, 600))
    observe = draw(st.integers(1, window))
    lateness = draw(st.integers(0, window - 1))
    n = draw(st.integers(1, 25))
    imps = [Impression(f"i{k}", T0 + draw(st.integers(0, 3 * window)), "u", "i") for k in range(n)]
    events: list[Impression | Click] = list(imps)
    for im in imps:
        edge = st.sampled_from([0, observe, observe + 1, window, window + 1])
        for delay in draw(st.lists(edge | st.integers(0, 2 * window), max_size=3)):
            events += [Click(im.impression_id, im.ts + delay)] * draw(st.integers(1, 2))
        if draw(st.booleans()) and draw(st.booleans()):
            events.append(im)  # a re-delivered impression
    events += [Click(f"ghost{k}", T0 + draw(st.integers(0, 3 * window))) for k in range(2)]
    jitter = [draw(st.integers(0, lateness)) for _ in events]
    order = sorted(range(len(events)), key=lambda i: (events[i].ts + jitter[i], i))
    return float(window), float(observe), float(lateness), [events[i] for i in order]


@settings(max_examples=200, deadline=None)
@given(arrivals())
def test_dfm_trains_each_impression_once_and_its_final_labels_are_the_offline_join(
    case: tuple[float, float, float, list[Impression | Click]],
) -> None:
    window, observe, lateness, events = case
    j = OnlineJoiner(JoinConfig(window_s=window, lateness_s=lateness, delayed_feedback="dfm",
                                dfm_observe_s=observe, idle_timeout_s=None))  # fmt: skip
    out: list[LabeledExample] = []
    for ev in events:
        out += j.on_click(ev) if isinstance(ev, Click) else j.on_impression(ev)
    end = max(e.ts for e in events) + window + lateness + 10
    out += j.on_watermark(end, "impressions") + j.on_watermark(end, "clicks")

    impressions = [e for e in events if isinstance(e, Impression)]
    clicks = [e for e in events if isinstance(e, Click)]
    truth = offline_join(impressions, clicks, window)
    trained = [e for e in out if e.weight > 0]
    assert Counter(e.impression.impression_id for e in trained) == Counter(list(truth))
    assert {(e.kind, e.label, e.weight) for e in out} <= {
        ("positive", 1, 1.0),
        ("negative", 0, 1.0),
        ("late_click", 1, 0.0),
    }
    first = {imp.impression_id: imp.ts for imp in reversed(impressions)}
    for e in trained:  # what the loss needs: a delay within T, or elapsed exactly T
        elapsed = e.label_ts - e.impression.ts
        assert 0 <= elapsed <= observe and (e.label == 1 or elapsed == observe)
        if e.label == 1:
            iid = e.impression.impression_id
            assert any(c.impression_id == iid and 0 <= c.ts - first[iid] <= observe for c in clicks)
    final = {e.impression.impression_id for e in out if e.label == 1}
    assert final == {iid for iid, y in truth.items() if y == 1}
    late = [e for e in out if e.kind == "late_click"]
    assert j.counters.late_clicks == len(late)


def test_settings_pair_the_dfm_scheme_with_the_dfm_loss_only() -> None:
    from learners.ranker import RankerConfig
    from stream.settings import Settings, TrainerConfig

    dfm = JoinConfig(delayed_feedback="dfm")
    assert Settings(join=dfm).ranker.loss == "dfm"  # "bce" (the default) is read as DFM
    assert Settings(join=dfm).ranker.has_delay_head
    with pytest.raises(ValueError, match="use loss 'dfm'"):
        Settings(join=dfm, ranker=RankerConfig(loss="focal"))
    with pytest.raises(ValueError, match="FNC"):
        Settings(join=dfm, trainer=TrainerConfig(fnc=True))
    for scheme in ("window", "fake_negative"):
        with pytest.raises(ValueError, match="needs delayed_feedback='dfm'"):
            Settings(join=JoinConfig(delayed_feedback=scheme), ranker=RankerConfig(loss="dfm"))
    assert Settings().join.delayed_feedback == "fake_negative"  # the default is unchanged


def test_the_trainer_gives_the_ranker_each_records_delay_or_elapsed_time() -> None:
    import numpy as np
    from prometheus_client import CollectorRegistry

    from learners.encoding import EncoderConfig
    from learners.ranker import RankerConfig
    from monitoring.metrics import StreamrecMetrics
    from stream.services import TrainerService
    from stream.settings import Settings, TrainerConfig

    settings = Settings(
        join=JoinConfig(delayed_feedback="dfm"),
        ranker=RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=256)),
        trainer=TrainerConfig(batch_size=16),
    )
    trainer = TrainerService(settings, StreamrecMetrics(registry=CollectorRegistry()))
    row = [{"user_id": "u", "item_id": "x", "position": None}]
    start = float(trainer.ranker.predict_delay_rate_many(row)[0])
    imps = [Impression(f"i{k}", T0 + k, "u", "x") for k in range(160)]
    # clicks 3 s after their impressions: the mean delay the head learns falls from 300 s
    trainer.add([LabeledExample(i, 1, i.ts + 3.0) for i in imps])
    while trainer.step() is not None:
        pass
    fast = float(trainer.ranker.predict_delay_rate_many(row)[0])
    assert fast > 1.02 * start  # (without elapsed times the loss is BCE: the head stays)
    # late clicks (weight 0) are scored for the monitor; the model takes no step on them
    before = trainer.ranker.predict_proba_many(row), fast, trainer.ranker.n_updates
    late = [Impression(f"l{k}", T0 + k, "u", "x") for k in range(16)]
    trainer.add([LabeledExample(i, 1, i.ts + 400.0, 0.0, "late_click") for i in late])
    scored = trainer.step()
    assert scored is not None and scored.label == [1] * 16
    np.testing.assert_allclose(scored.p_raw, before[0][0])
    np.testing.assert_array_equal(trainer.ranker.predict_proba_many(row), before[0])
    assert float(trainer.ranker.predict_delay_rate_many(row)[0]) == fast
    assert trainer.ranker.n_updates == before[2]
