"""The second label end to end in process (issue 17 item 4): conversion events, the
joiner's conversion window, the ``labeled`` and ``scored`` wire forms, the trainer feeding
MMoE's task 1, the monitor's calibration of it, ``/score``'s pCTCVR and the settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from learners.encoding import EncoderConfig
from learners.ranker import TorchRanker
from learners.ranker_config import RankerConfig
from logs.batches import ScoredBatch, decode_labeled, encode_labeled
from logs.events import (
    TASK1_KINDS,
    Click,
    Impression,
    InvalidEvent,
    LabeledExample,
    parse_input,
)
from logs.synthetic import SyntheticConfig, generate
from monitoring.metrics import StreamrecMetrics
from serving.recommender import Recommender, ServingConfig
from stream.join import JoinConfig, OnlineJoiner
from stream.replay import CONVERSION, event_order
from stream.services import MonitorService, TrainerService
from stream.services.dedup import SeenKeys
from stream.settings import Settings, SettingsError, TrainerConfig, load_settings
from tests.unit.stream.join_helpers import T0, both, click, imp

CW = 100.0  # the conversion window of these tests, seconds


def conv(iid: str, ts: float) -> Click:
    return Click(iid, T0 + ts, conversion=True)


def records(out: list[LabeledExample]) -> list[tuple[str, str, int, float, int | None]]:
    return [(e.impression.impression_id, e.kind, e.label, e.weight, e.label2) for e in out]


def joiner(scheme: str = "window", **kw: object) -> OnlineJoiner:
    return OnlineJoiner(
        JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=None, delayed_feedback=scheme,
                   dfm_observe_s=30, conversion_window_s=CW, **kw)  # type: ignore[arg-type]
    )  # fmt: skip


# -- events --------------------------------------------------------------------------------


def test_conversion_record_parses_and_round_trips() -> None:
    c = parse_input(b'{"impression_id": "a", "ts": 1700000000, "type": "conversion"}', "clicks")
    assert isinstance(c, Click) and c.conversion
    assert parse_input(Click("a", T0, "u", conversion=True).to_json(), "clicks") == Click(
        "a", T0, "u", conversion=True
    )
    plain = parse_input(b'{"impression_id": "a", "ts": 1700000000, "type": "click"}', "clicks")
    assert isinstance(plain, Click) and not plain.conversion
    with pytest.raises(InvalidEvent, match="bad_value: field 'type'"):
        parse_input(b'{"impression_id": "a", "ts": 1700000000, "type": "purchase"}', "clicks")


# -- the joiner ----------------------------------------------------------------------------


def test_window_scheme_sends_each_second_label_once_and_final() -> None:
    j = joiner("window")
    out = j.on_impression(imp("a", 0)) + j.on_impression(imp("b", 1)) + j.on_impression(imp("c", 2))
    out += j.on_click(click("a", 10)) + j.on_click(click("b", 20))
    out += j.on_click(conv("a", 30))  # within CW of a's click: held to its window's end
    out += j.on_click(conv("a", 31))  # a duplicate
    out += j.on_click(conv("zz", 32))  # no click known
    assert not any(e.kind in TASK1_KINDS for e in out)  # nothing ahead of the negatives
    out += both(j, 700)  # past every window and zz's orphan grace (600 s)
    assert sorted(records(out)) == sorted([
        ("a", "positive", 1, 1.0, None),  # its conversion window outlasts its attribution's
        ("a", "conversion", 1, 0.0, 1),  # at a's click + CW, with its conversion time
        ("b", "positive", 1, 1.0, None),
        ("b", "no_conversion", 1, 0.0, 0),  # at b's click + CW
        ("c", "negative", 0, 1.0, 0),
    ])  # fmt: skip
    c = j.counters
    assert (c.conversions, c.no_conversions, c.late_conversions, c.orphan_conversions) == (
        1, 1, 1, 1,
    )  # fmt: skip
    assert c.clicks == 2 and c.positives == 2  # conversions are not clicks
    assert not j.converting


def test_window_scheme_sends_second_labels_when_their_window_ends() -> None:
    """Converted or not, a clicked impression's second label leaves at its click + CW:
    conversions never run ahead of the non-conversions of their time."""
    j = joiner("window")
    out = j.on_impression(imp("a", 0)) + j.on_click(click("a", 50))
    out += both(j, 70)  # a's attribution window closed: its positive left without label2
    out += j.on_click(conv("a", 120))
    assert records(out) == [("a", "positive", 1, 1.0, None)]
    out += both(j, 149)
    assert len(out) == 1  # its conversion window ends at 150
    out += both(j, 151)
    assert records(out)[1:] == [("a", "conversion", 1, 0.0, 1)]
    assert out[1].label_ts == T0 + 120


def test_window_scheme_short_conversion_window_rides_zero_on_the_positive() -> None:
    j = OnlineJoiner(JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=None,
                                conversion_window_s=20))  # fmt: skip
    out = j.on_impression(imp("a", 0)) + j.on_click(click("a", 10)) + both(j, 500)
    assert records(out) == [("a", "positive", 1, 1.0, 0)]
    assert j.counters.no_conversions == 1 and not j.converting


def test_a_conversion_after_its_window_is_late_and_the_no_conversion_stands() -> None:
    j = joiner("window")
    out = j.on_impression(imp("a", 0)) + j.on_click(click("a", 5))
    out += j.on_click(conv("a", 5 + CW + 1))
    out += both(j, 1000)
    assert ("a", "no_conversion", 1, 0.0, 0) in records(out)
    assert not any(e.kind == "conversion" for e in out)
    assert j.counters.late_conversions == 1


def test_fake_negatives_carry_the_provisional_zero_and_no_second_zero() -> None:
    j = joiner("fake_negative")
    out = j.on_impression(imp("a", 0)) + j.on_impression(imp("b", 1))
    out += j.on_click(click("a", 5)) + j.on_click(click("b", 6)) + j.on_click(conv("a", 50))
    out += both(j, 1000)
    got = records(out)
    assert ("a", "fake_negative", 0, 1.0, 0) in got and ("b", "fake_negative", 0, 1.0, 0) in got
    assert ("a", "conversion", 1, 0.0, 1) in got
    # b's fake negative carried label2=0 already: its window's close sends nothing more
    assert not any(k == "no_conversion" for _, k, *_ in got)
    ctcvr = [e.label2 for e in out if e.label2 is not None]
    assert sorted(ctcvr) == [0, 0, 1]  # every impression once as 0, the conversion as 1


def test_dfm_late_click_counts_its_censored_zero() -> None:
    j = joiner("dfm")
    out = j.on_impression(imp("a", 0)) + j.on_impression(imp("b", 1))
    out += j.on_click(click("a", 10))  # before T=30: a positive at once
    out += both(j, 40)  # b unclicked at T: its negative carries label2=0
    out += j.on_click(click("b", 45))  # after T: a late click
    out += both(j, 1000)
    got = records(out)
    assert ("b", "negative", 0, 1.0, 0) in got and ("b", "late_click", 1, 0.0, None) in got
    assert ("a", "no_conversion", 1, 0.0, 0) in got
    assert not any(i == "b" and k == "no_conversion" for i, k, *_ in got)


def test_a_conversion_ahead_of_its_click_waits_for_it() -> None:
    """The clicks input may run ahead of the impressions: the click waits as an orphan,
    and its conversion, on the same input after it, waits for the click."""
    for scheme in ("window", "fake_negative"):
        j = joiner(scheme)
        out = j.on_click(click("a", 10)) + j.on_click(conv("a", 30))
        assert j.early_conversions and not out
        out += j.on_impression(imp("a", 0)) + both(j, 500)
        assert ("a", "conversion", 1, 0.0, 1) in records(out), scheme
        assert j.counters.conversions == 1 and not j.early_conversions
    j = joiner("window", orphan_grace_s=50)
    j.on_click(conv("never", 30))
    both(j, 100)
    assert j.counters.orphan_conversions == 1 and not j.early_conversions


def test_without_a_conversion_window_conversions_are_counted_and_dropped() -> None:
    j = OnlineJoiner(JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=None))
    out = j.on_impression(imp("a", 0)) + j.on_click(click("a", 5)) + j.on_click(conv("a", 9))
    out += both(j, 500)
    assert records(out) == [("a", "positive", 1, 1.0, None)]
    assert j.counters.conversions_ignored == 1


def test_waiting_conversions_are_bounded() -> None:
    j = joiner("window", max_pending=3)
    out: list[LabeledExample] = []
    for k in range(6):
        out += j.on_impression(imp(f"i{k}", k)) + j.on_click(click(f"i{k}", k + 1))
    assert len(j.converting) <= 3
    early = [e for e in out if e.kind == "no_conversion"]
    assert len(early) >= 3  # the oldest closed early, each with its record


def test_the_bound_never_drops_a_pending_impressions_second_label() -> None:
    """Beyond max_pending the oldest waiting conversions close early, but one whose
    impression is still pending (final labels) waits for its positive: its second label
    is sent once, and nothing is left waiting."""
    j = joiner("window", max_pending=2)
    out = j.on_impression(imp("A", 0)) + j.on_impression(imp("B", 1))
    out += j.on_click(click("B", 2))  # B pending, clicked
    out += j.on_impression(imp("C", 3))  # A forced out unclicked
    out += j.on_click(click("A", 4))  # a late click on A: its negative carried label2=0
    out += j.on_click(click("C", 5))  # three waiting, two allowed: B is the oldest
    out += both(j, 1000)
    second = [
        (e.impression.impression_id, e.label2) for e in out if e.label and e.label2 is not None
    ]
    assert sorted(i for i, _ in second) == ["B", "C"]  # A's 0 rode on its negative
    assert not j.converting and not j._conv_deadlines


def test_conversion_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="conversion_window_s"):
        JoinConfig(conversion_window_s=0.0)


# -- wire forms ----------------------------------------------------------------------------


def test_labeled_round_trips_the_second_label_and_old_records_decode() -> None:
    i = Impression("a", T0, "u", "i")
    with_label2 = LabeledExample(i, 1, T0 + 5, 0.0, "conversion", 1)
    old = LabeledExample(i, 0, T0 + 5, 1.0, "negative")
    raw = encode_labeled([with_label2, old])
    assert decode_labeled(raw) == [with_label2, old]
    # a record without a second label is the same bytes as before it existed (13 fields)
    assert len(encode_labeled([old])) < len(encode_labeled([dataclasses.replace(old, label2=0)]))
    bad = LabeledExample.from_dict
    with pytest.raises(InvalidEvent, match="label2"):
        bad({**old.to_dict(), "label2": 2})


def test_scored_round_trips_the_second_label_and_checks_lengths() -> None:
    b = ScoredBatch(3, 1, ["a", "b"], [T0, T0], [0, 1], [0.1, 0.2], [0.1, 0.2], ["1", "1"],
                    [None, None], p2=[0.01, 0.02], label2_ids=["c"], label2=[1])  # fmt: skip
    assert ScoredBatch.decode(b.encode()) == b
    plain = dataclasses.replace(b, p2=[], label2_ids=[], label2=[])
    assert ScoredBatch.decode(plain.encode()) == plain
    with pytest.raises(InvalidEvent, match="p2 has wrong length"):
        ScoredBatch.decode(dataclasses.replace(b, p2=[0.1]).encode())
    with pytest.raises(InvalidEvent, match="label2 has wrong length"):
        ScoredBatch.decode(dataclasses.replace(b, label2=[1, 0]).encode())


def test_dedup_keeps_a_conversion_apart_from_its_click() -> None:
    i = Impression("a", T0, "u", "i")
    pos = LabeledExample(i, 1, T0 + 1)
    c = LabeledExample(i, 1, T0 + 9, 0.0, "conversion", 1)
    seen = SeenKeys(horizon=10)
    assert [e.kind for e in seen.filter([pos, c, c])] == ["positive", "conversion"]


# -- settings ------------------------------------------------------------------------------


def test_settings_need_a_two_task_ranker_and_turn_serving_on() -> None:
    with pytest.raises(ValueError, match="needs a ranker with a second task"):
        Settings(join=JoinConfig(conversion_window_s=3600.0))
    s = Settings(join=JoinConfig(conversion_window_s=3600.0), ranker=RankerConfig(model="mmoe"))
    assert s.serving.second_label
    assert s.final_watermark_gap_s == s.join.window_s + 3600.0 + s.join.lateness_s + 1
    assert not Settings().serving.second_label
    env = {"STREAMREC_JOIN__CONVERSION_WINDOW_S": "7200", "STREAMREC_RANKER__MODEL": "mmoe"}
    assert load_settings(env=env).join.conversion_window_s == 7200.0
    with pytest.raises(SettingsError, match="needs a ranker with a second task"):
        load_settings(env={"STREAMREC_JOIN__CONVERSION_WINDOW_S": "7200"})


# -- replay order --------------------------------------------------------------------------


def test_replay_order_puts_each_conversion_at_its_time() -> None:
    df = generate(SyntheticConfig(n_impressions=3000, n_users=50, n_items=40, base_ctr=0.3,
                                  conversion=True, base_cvr=0.5, seed=1))  # fmt: skip
    ts, rows, kind = event_order(df, conversions=True)
    assert np.all(np.diff(ts) >= 0)
    n_conv = int((df["conversion"] == 1).sum())
    assert n_conv > 0 and int((kind == CONVERSION).sum()) == n_conv
    conv_rows = rows[kind == CONVERSION]
    np.testing.assert_array_equal(
        np.sort(ts[kind == CONVERSION]), np.sort(df["conversion_ts"].to_numpy()[conv_rows])
    )
    _, _, plain = event_order(df)  # without: impressions and clicks only, as before
    assert plain.dtype == bool and plain.size == ts.size - n_conv


# -- trainer and monitor -------------------------------------------------------------------


def joined(scheme: str, n: int = 6000) -> tuple[list[LabeledExample], OnlineJoiner]:
    """A two-label synthetic log through the joiner, in event-time order."""
    df = generate(SyntheticConfig(n_impressions=n, n_users=200, n_items=80, base_ctr=0.2,
                                  conversion=True, base_cvr=0.4, click_delay_mean_s=20,
                                  conversion_delay_mean_s=30, drift_at=None,
                                  impressions_per_s=5.0, seed=2))  # fmt: skip
    j = OnlineJoiner(JoinConfig(window_s=120, lateness_s=0, idle_timeout_s=None,
                                delayed_feedback=scheme, conversion_window_s=100))  # fmt: skip
    ts, rows, kind = event_order(df, conversions=True)
    ids, users, items = (df[c].to_numpy(dtype=object) for c in ("impression_id", "user_id",
                                                                 "item_id"))  # fmt: skip
    out: list[LabeledExample] = []
    for t, r, k in zip(ts.tolist(), rows.tolist(), kind.tolist(), strict=True):
        if k == 0:
            out += j.on_impression(Impression(ids[r], t, users[r], items[r], true_p=0.1))
        else:
            out += j.on_click(Click(ids[r], t, users[r], conversion=k == CONVERSION))
    out += both(j, float(ts[-1]) - T0 + 10_000)
    c, n_conv = j.counters, int((df["conversion"] == 1).sum())
    assert c.conversions + c.late_conversions + c.orphan_conversions == n_conv  # none lost
    assert c.conversions > 0.9 * n_conv
    return out, j


def close_all(monitor: MonitorService) -> None:
    """The end of a stream: every window closes (as the replay's final watermark does)."""
    for fo in (monitor.outcomes, monitor.second):
        if fo is not None:
            fo.advance(float("inf"))
    monitor.observe(ScoredBatch(0, 0, [], [], [], [], [], [], []))


def two_task_settings(scheme: str = "window", task1: str = "direct") -> Settings:
    return Settings(
        ranker=RankerConfig(
            model="mmoe", task1=task1, encoder=EncoderConfig(num_buckets=2**12), device="cpu"
        ),  # fmt: skip
        trainer=TrainerConfig(batch_size=256, ramp_from=0),
        join=JoinConfig(
            window_s=120, lateness_s=0, delayed_feedback=scheme, conversion_window_s=100
        ),  # fmt: skip
    )


@pytest.mark.parametrize("task1", ["direct", "esmm"])
def test_trainer_feeds_task1_and_monitor_judges_it(task1: str) -> None:
    out, j = joined("window")
    settings = two_task_settings(task1=task1)
    metrics = StreamrecMetrics()
    trainer = TrainerService(settings, metrics)
    monitor = MonitorService(settings, metrics)
    assert trainer.second_label_on
    trainer.add(out)
    assert len(trainer.buffer) == len(out)  # no conversion record taken for a duplicate
    batches = []
    while (b := trainer.step()) is not None:
        monitor.observe(b)
        batches.append(b)
    rows = sum(len(b.impression_ids) for b in batches)
    task1_records = [e for e in out if e.kind in TASK1_KINDS]
    assert rows == len(out) - len(task1_records)  # only the click records are rows
    assert all(len(b.p2) == len(b.impression_ids) for b in batches)
    # a quick click's second label rides on its positive, a slow one's comes alone
    assert {e.kind for e in task1_records} == {"conversion", "no_conversion"}
    assert {e.label2 for e in out if e.kind == "positive"} == {None, 0, 1}
    c = j.counters
    assert sum(len(b.label2_ids) for b in batches) == c.conversions + c.no_conversions
    assert c.conversions + c.no_conversions == c.positives  # every click's second label
    assert sum(sum(b.label2) for b in batches) == j.counters.conversions
    # the scored rows count the click records only: the counts agree
    assert metrics.registry.get_sample_value("streamrec_scored_total") == rows
    assert monitor.second_judged < rows  # the newest wait for their windows to close
    close_all(monitor)
    assert monitor.second_outcomes == j.counters.conversions
    assert monitor.second_judged == rows
    # task 1 learnt: its predicted CTCVR over the log is near the conversions (both tasks
    # were trained; an untrained tower would sit at prior_ctr, far above ~0.08 * 0.4)
    ratio = monitor.second_predicted / monitor.second_outcomes
    assert 0.6 < ratio < 1.6, ratio
    gauge = metrics.registry.get_sample_value("streamrec_second_label_ratio")
    assert gauge == pytest.approx(ratio)
    recent = metrics.registry.get_sample_value("streamrec_second_label_window_ratio")
    assert recent is not None and 0.5 < recent < 2.0
    assert trainer.ranker.task1_centred


def test_ple_learns_the_second_label_in_the_trainer() -> None:
    """PLE (its own experts per task) is a two-task ranker like MMoE: the trainer feeds
    its task 1 and the monitor judges it."""
    out, j = joined("window", n=3000)
    base = two_task_settings()
    settings = dataclasses.replace(
        base, ranker=dataclasses.replace(base.ranker, model="ple", ple_levels=1)
    )
    metrics = StreamrecMetrics()
    trainer, monitor = TrainerService(settings, metrics), MonitorService(settings, metrics)
    assert trainer.second_label_on and type(trainer.ranker.model).__name__ == "PLE"
    trainer.add(out)
    while (b := trainer.step()) is not None:
        monitor.observe(b)
    close_all(monitor)
    assert monitor.second_outcomes == j.counters.conversions > 0
    assert 0.5 < monitor.second_predicted / monitor.second_outcomes < 2.0


@pytest.mark.parametrize("task1", ["direct", "esmm"])
def test_fake_negative_monitor_judges_second_label_on_first_records(task1: str) -> None:
    out, j = joined("fake_negative", n=3000)
    settings = two_task_settings(scheme="fake_negative", task1=task1)
    metrics = StreamrecMetrics()
    trainer, monitor = TrainerService(settings, metrics), MonitorService(settings, metrics)
    trainer.add(out)
    while (b := trainer.step()) is not None:
        monitor.observe(b)
    close_all(monitor)
    # every impression judged once on its final label, with its first record's p2
    assert monitor.second_judged == j.counters.impressions == monitor.n_seen
    assert monitor.second_outcomes == j.counters.conversions
    # fresh labels carry no clicked non-conversion rows: ESMM centres on the CTCVR rate
    # once it has seen enough conversions (else its pCVR would keep its start)
    assert trainer.ranker.task1_centred
    if task1 == "esmm":  # kept at its start, pCVR gave 0.06 here
        assert 0.3 < monitor.second_predicted / monitor.second_outcomes < 2.0


def test_retrieval_learns_each_click_once_not_again_with_its_conversion() -> None:
    """The two-tower model and the fusion see the click records only: a conversion
    record (label 1, its click sent already) is not a second click."""
    out, _ = joined("window", n=2000)
    trainer = TrainerService(two_task_settings(), StreamrecMetrics())
    fusion = trainer.fusion
    assert fusion is not None
    seen: list[float] = []
    learn = fusion.learn_many

    def spy(rows: object, y: np.ndarray) -> None:  # the real method, its labels recorded
        seen.extend(np.asarray(y).tolist())
        learn(rows, y)  # type: ignore[arg-type]

    fusion.learn_many = spy  # type: ignore[method-assign]
    trainer.add(out)
    while trainer.step() is not None:
        pass
    assert any(e.kind in TASK1_KINDS for e in out)
    assert len(seen) == sum(e.kind not in TASK1_KINDS for e in out)
    assert sum(seen) == sum(e.label for e in out if e.kind not in TASK1_KINDS)


def test_a_trainer_without_a_task_1_ignores_second_label_records() -> None:
    """Split roles with mismatched settings (a joiner with a conversion window, a trainer
    without): the second label's own records are scored for nobody and learnt by no
    click model; the click records go on as before."""
    out, _ = joined("window", n=2000)
    settings = Settings(trainer=TrainerConfig(batch_size=256, ramp_from=0))
    trainer = TrainerService(settings, StreamrecMetrics())
    assert not trainer.second_label_on
    fusion = trainer.fusion
    assert fusion is not None
    seen: list[float] = []
    learn = fusion.learn_many

    def spy(rows: object, y: np.ndarray) -> None:
        seen.extend(np.asarray(y).tolist())
        learn(rows, y)  # type: ignore[arg-type]

    fusion.learn_many = spy  # type: ignore[method-assign]
    trainer.add(out)
    rows = 0
    while (b := trainer.step()) is not None:
        rows += len(b.impression_ids)
        assert not b.p2 and not b.label2_ids
    clicks = [e for e in out if e.kind not in TASK1_KINDS]
    assert rows == len(clicks) == len(seen) < len(out)


# -- serving -------------------------------------------------------------------------------


def test_score_serves_p_ctcvr_with_a_two_task_ranker() -> None:
    from index.faiss_index import IndexHolder
    from learners.calibration import PlattCalibrator

    for task1 in ("direct", "esmm"):
        config = RankerConfig(model="mmoe", task1=task1, device="cpu",
                              encoder=EncoderConfig(num_buckets=1024))  # fmt: skip
        ranker = TorchRanker(config, seed=0)
        on = Recommender(IndexHolder(), lambda r=ranker: r, lambda: (PlattCalibrator(), 0),
                         config=ServingConfig(second_label=True))  # fmt: skip
        answer = on.score("u1", ["i1", "i2"])
        p2 = [item["p_ctcvr"] for item in answer["items"]]
        want = ranker.predict_tasks_many(
            [{"user_id": "u1", "item_id": i, "position": 1} for i in ("i1", "i2")]
        )["task1"]
        np.testing.assert_allclose(p2, want, rtol=1e-6)
        off = Recommender(IndexHolder(), lambda r=ranker: r, lambda: (PlattCalibrator(), 0))
        assert "p_ctcvr" not in off.score("u1", ["i1"])["items"][0]


def test_generate_writes_a_second_outcome_on_request(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from logs.io import read_log_frame
    from stream.cli import main

    out = tmp_path / "two.csv"
    r = CliRunner().invoke(main, ["generate", str(out), "--impressions", "3000",
                                  "--conversion", "0.5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    df = read_log_frame(out)
    assert {"conversion", "conversion_ts", "true_cvr"} <= set(df.columns)
    assert 0 < df["conversion"].sum() <= df["click"].sum()
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "x.csv"), "--conversion", "0"])
    assert r.exit_code != 0 and "--conversion" in r.output
