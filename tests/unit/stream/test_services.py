"""The worker stages as plain objects: join, trainer, monitor and indexer services."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learners.calibration import PlattCalibrator, calibrator_from_dict
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from logs.batches import ScoredBatch
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    LabeledExample,
    Watermark,
    example_row,
)
from logs.synthetic import SyntheticConfig, generate
from monitoring.metrics import StreamrecMetrics
from stream.control import CalibratorUpdate, IndexVersion, ModelAnnouncement
from stream.join import JoinConfig
from stream.services import (
    IndexerService,
    JoinService,
    MonitorService,
    TrainerService,
    segment_of,
)
from stream.settings import IndexerConfig, MonitorConfig, Settings, TrainerConfig

T0 = 1_700_000_000.0
BATCH = 64
FAST = Settings(
    ranker=RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=2**12)),
    trainer=TrainerConfig(batch_size=BATCH, ramp_from=0),  # full batches from the start
    join=JoinConfig(window_s=60.0, lateness_s=0.0),
    indexer=IndexerConfig(pool_per_user=10),
)


@pytest.fixture
def metrics() -> StreamrecMetrics:
    return StreamrecMetrics()


def sample(metrics: StreamrecMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture(scope="module")
def examples() -> list[LabeledExample]:
    """Labelled examples from a small synthetic log with few users and items."""
    df: pd.DataFrame = generate(
        SyntheticConfig(n_impressions=4 * BATCH, n_users=20, n_items=60, base_ctr=0.2, seed=3)
    )
    out = []
    for row in df.itertuples(index=False):
        imp = Impression(
            impression_id=row.impression_id,
            ts=float(row.ts),
            user_id=row.user_id,
            item_id=row.item_id,
            position=int(row.position),
            features={"ctx_device": row.ctx_device, "item_price": float(row.item_price)},
            true_p=float(row.true_p),
        )
        out.append(LabeledExample(imp, int(row.click), float(row.ts) + 60.0))
    return out


# --- JoinService ------------------------------------------------------------------------


def imp_bytes(iid: str, ts: float) -> bytes:
    return Impression(iid, T0 + ts, "u1", "i1", position=1).to_json()


def test_bad_input_becomes_a_dead_letter_counted_by_reason(metrics: StreamrecMetrics) -> None:
    svc = JoinService(FAST, metrics)
    out, dead = svc.handle(b"{oops", TOPIC_IMPRESSIONS, 2, 41)
    assert out == [] and dead is not None
    assert (dead.topic, dead.partition, dead.offset, dead.reason) == (
        "impressions",
        2,
        41,
        "bad_json",
    )
    svc.handle(b'{"impression_id": "a", "ts": true}', TOPIC_CLICKS, 0, 7)
    svc.handle(b'{"impression_id": "b", "ts": "x"}', TOPIC_CLICKS, 0, 8)
    assert sample(metrics, "streamrec_dead_letters_total", reason="bad_json") == 1
    assert sample(metrics, "streamrec_dead_letters_total", reason="bad_type") == 2
    assert sample(metrics, "streamrec_impressions_total") == 0
    assert not svc.joiners  # nothing reached a joiner


def test_good_input_is_joined_into_labels_and_counted(metrics: StreamrecMetrics) -> None:
    svc = JoinService(FAST, metrics)
    assert svc.handle(imp_bytes("a", 0), TOPIC_IMPRESSIONS, 0, 0) == ([], None)
    svc.handle(imp_bytes("b", 0), TOPIC_IMPRESSIONS, 0, 1)
    svc.handle(Click("a", T0 + 5).to_json(), TOPIC_CLICKS, 0, 0)
    wm = Watermark(T0 + 100).to_json()
    out1, _ = svc.handle(wm, TOPIC_IMPRESSIONS, 0, 2)
    out2, dead = svc.handle(wm, TOPIC_CLICKS, 0, 1)
    assert out1 == [] and dead is None
    assert sorted((e.impression.impression_id, e.label) for e in out2) == [("a", 1), ("b", 0)]
    assert sample(metrics, "streamrec_impressions_total") == 2
    assert sample(metrics, "streamrec_clicks_total") == 1
    assert sample(metrics, "streamrec_labeled_total", label="positive") == 1
    assert sample(metrics, "streamrec_labeled_total", label="negative") == 1
    assert sample(metrics, "streamrec_dead_letters_total", reason="bad_json") == 0


def test_duplicates_and_late_clicks_are_counted_in_metrics(metrics: StreamrecMetrics) -> None:
    svc = JoinService(FAST, metrics)
    svc.handle(imp_bytes("a", 0), TOPIC_IMPRESSIONS, 0, 0)
    svc.handle(imp_bytes("a", 0), TOPIC_IMPRESSIONS, 0, 1)
    for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
        svc.handle(Watermark(T0 + 100).to_json(), topic, 0, 9)
    out, _ = svc.handle(Click("a", T0 + 30).to_json(), TOPIC_CLICKS, 0, 10)
    svc.handle(Click("a", T0 + 30).to_json(), TOPIC_CLICKS, 0, 11)
    assert [e.kind for e in out] == ["correction"]
    assert sample(metrics, "streamrec_duplicate_impressions_total") == 1
    assert sample(metrics, "streamrec_late_clicks_total") == 1
    assert sample(metrics, "streamrec_duplicate_clicks_total") == 1


def test_each_partition_gets_its_own_joiner_and_all_are_labelled_once_watermarks_pass(
    metrics: StreamrecMetrics,
) -> None:
    svc = JoinService(FAST, metrics)
    out, _ = svc.handle(imp_bytes("a", 0), TOPIC_IMPRESSIONS, 0, 0)
    out += svc.handle(imp_bytes("b", 0), TOPIC_IMPRESSIONS, 1, 0)[0]
    svc.update_gauges()
    assert sample(metrics, "streamrec_pending_impressions") == 2
    wm = Watermark(T0 + 100).to_json()
    for partition in (0, 1):
        for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
            out += svc.handle(wm, topic, partition, 1)[0]
    assert sorted(e.impression.impression_id for e in out) == ["a", "b"]
    assert set(svc.joiners) == {0, 1}
    svc.update_gauges()
    assert sample(metrics, "streamrec_pending_impressions") == 0
    assert sample(metrics, "streamrec_event_time_watermark_seconds") == T0 + 100


# --- TrainerService ---------------------------------------------------------------------


def test_trainer_is_due_at_a_full_batch_or_after_the_flush_interval(
    metrics: StreamrecMetrics, examples: list[LabeledExample]
) -> None:
    svc = TrainerService(FAST, metrics)
    assert not svc.due()
    assert svc.step() is None
    svc.add(examples[: BATCH - 1])
    now = time.monotonic()
    assert not svc.due(now)
    assert svc.due(now + FAST.trainer.flush_s + 1)
    svc.add(examples[BATCH - 1 : BATCH])
    assert svc.due(now)


def test_step_scores_one_micro_batch_before_learning_from_it(
    metrics: StreamrecMetrics, examples: list[LabeledExample]
) -> None:
    svc = TrainerService(FAST, metrics)
    svc.add(examples[: BATCH + 10])
    batch = examples[:BATCH]
    rows = [example_row(e.impression) for e in batch]
    expected = svc.ranker.clone().predict_proba_many(rows)
    scored = svc.step()
    assert scored is not None
    assert len(svc.buffer) == 10
    assert scored.impression_ids == [e.impression.impression_id for e in batch]
    assert scored.label == [e.label for e in batch]
    np.testing.assert_allclose(scored.p_raw, expected, rtol=1e-6)
    assert scored.p == pytest.approx(scored.p_raw)  # identity calibrator at the start
    assert scored.true_p == [e.impression.true_p for e in batch]
    assert scored.segment == [segment_of(e.impression.position) for e in batch]
    assert scored.model_version == 1 == svc.model_version
    after = svc.ranker.predict_proba_many(rows)
    assert not np.allclose(after, expected)  # it learned from the batch
    assert sample(metrics, "streamrec_scored_total") == BATCH
    assert sample(metrics, "streamrec_train_batches_total") == 1
    assert sample(metrics, "streamrec_model_version") == 1


def test_step_records_items_users_and_their_clicks_in_the_catalogue(
    metrics: StreamrecMetrics, examples: list[LabeledExample]
) -> None:
    svc = TrainerService(FAST, metrics)
    svc.add(examples[:BATCH])
    svc.step()
    batch = examples[:BATCH]
    assert set(svc.catalogue.items) == {e.impression.item_id for e in batch}
    for user, clicks in svc.catalogue.users.items():
        mine = [e for e in batch if e.impression.user_id == user]
        assert clicks == {e.impression.item_id for e in mine if e.label}


def calibrator_msg(version: int, a: float, b: float) -> CalibratorUpdate:
    return CalibratorUpdate(version, {"a": a, "b": b})


def test_calibrator_control_message_changes_the_served_probability(
    metrics: StreamrecMetrics, examples: list[LabeledExample]
) -> None:
    svc = TrainerService(FAST, metrics)
    svc.apply_control(calibrator_msg(1, 1.2, 0.5))
    svc.add(examples[:BATCH])
    scored = svc.step()
    assert scored is not None and scored.calibrator_version == 1
    cal = PlattCalibrator(1.2, 0.5)
    np.testing.assert_allclose(scored.p, cal.transform(np.array(scored.p_raw)))
    assert not np.allclose(scored.p, scored.p_raw)
    assert sample(metrics, "streamrec_calibrator_version") == 1


def test_calibrator_messages_not_newer_than_the_current_one_are_ignored(
    metrics: StreamrecMetrics,
) -> None:
    svc = TrainerService(FAST, metrics)
    svc.apply_control(calibrator_msg(2, 1.0, 0.5))
    svc.apply_control(calibrator_msg(1, 3.0, -1.0))
    svc.apply_control(calibrator_msg(2, 3.0, -1.0))
    svc.apply_control(IndexVersion(9))
    assert svc.calibrator == PlattCalibrator(1.0, 0.5)
    assert svc.calibrator_version == 2


@pytest.mark.parametrize(
    ("position", "segment"), [(None, "unknown"), (1, "1"), (9, "9"), (10, "10+"), (500, "10+")]
)
def test_segments_are_positions_one_to_nine_then_ten_plus(
    position: int | None, segment: str
) -> None:
    assert segment_of(position) == segment


# --- MonitorService ---------------------------------------------------------------------


def scored(p: np.ndarray, y: np.ndarray, start: int) -> ScoredBatch:
    n = len(p)
    return ScoredBatch(
        model_version=1,
        calibrator_version=0,
        impression_ids=[f"i{start + k}" for k in range(n)],
        ts=[T0 + start + k for k in range(n)],
        label=y.astype(int).tolist(),
        p_raw=p.tolist(),
        p=p.tolist(),
        segment=["1"] * n,
        true_p=[None] * n,
    )


def calibrators(msgs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [m for m in msgs if m.kind == "calibrator"]


PRE_DRIFT_BATCHES = 120  # 60k calibrated examples: past the monitor's warm-up


def test_ctr_jump_with_unchanged_predictions_fires_an_alarm_and_recalibrates(
    metrics: StreamrecMetrics,
) -> None:
    svc = MonitorService(
        Settings(join=JoinConfig(), monitor=MonitorConfig(recalibration="track")), metrics
    )  # final labels
    rng = np.random.default_rng(11)
    p = np.full(500, 0.04)
    for k in range(PRE_DRIFT_BATCHES):
        assert svc.observe(scored(p, rng.random(500) < 0.04, 500 * k)) == []
    assert svc.n_alarms == 0
    msgs: list[dict[str, object]] = []
    for k in range(PRE_DRIFT_BATCHES, PRE_DRIFT_BATCHES + 40):
        # the true CTR jumps to 6.4%, predictions stay at 4%
        msgs = svc.observe(scored(p, rng.random(500) < 0.064, 500 * k))
        if msgs:
            break
    (msg,) = calibrators(msgs)
    assert msg.version == 1
    params = msg.params
    assert isinstance(params, dict)
    new_p = calibrator_from_dict(params).transform(np.array([0.04]))[0]
    assert 0.045 < new_p < 0.09
    assert svc.n_alarms == 1 and svc.calibrator_version == 1
    assert sample(metrics, "streamrec_drift_alarms_total") == 1
    assert sample(metrics, "streamrec_recalibrations_total") == 1
    assert svc.events[-1].accepted is True


def test_calibrated_stream_raises_no_alarm(metrics: StreamrecMetrics) -> None:
    svc = MonitorService(Settings(), metrics)
    rng = np.random.default_rng(5)
    for k in range(PRE_DRIFT_BATCHES + 40):
        p = rng.uniform(0.02, 0.08, 500)
        assert svc.observe(scored(p, rng.random(500) < p, 500 * k)) == []
    assert svc.n_alarms == 0
    assert sample(metrics, "streamrec_recalibrations_total") == 0


def test_monitor_keeps_one_window_per_segment_up_to_the_bound(
    metrics: StreamrecMetrics,
) -> None:
    svc = MonitorService(
        Settings(join=JoinConfig(), monitor=MonitorConfig(max_segments=2)), metrics
    )
    batch = scored(np.full(3, 0.1), np.array([0, 1, 0]), 0)
    svc.observe(dataclasses.replace(batch, segment=["1", "2", "3"]))
    assert set(svc.segments) == {"1", "2"}


# --- IndexerService ---------------------------------------------------------------------


def test_indexer_refresh_builds_a_new_versioned_index_and_pools(
    metrics: StreamrecMetrics, examples: list[LabeledExample]
) -> None:
    trainer = TrainerService(FAST, metrics)
    svc = IndexerService(FAST, metrics)
    assert svc.refresh(trainer.ranker, trainer.catalogue) is None  # empty catalogue
    trainer.add(examples)
    while trainer.step() is not None:
        pass
    first = svc.refresh(trainer.ranker, trainer.catalogue)
    assert svc.refresh(trainer.ranker, trainer.catalogue) is None  # nothing changed
    again = [  # new impressions (the trainer drops repeated ids): one more update
        dataclasses.replace(e, impression=dataclasses.replace(
            e.impression, impression_id=f"again-{e.impression.impression_id}"))
        for e in examples[:64]
    ]  # fmt: skip
    trainer.add(again)
    while trainer.step() is not None:
        pass
    second = svc.refresh(trainer.ranker, trainer.catalogue)
    assert first is not None and second is not None
    assert (first.version, second.version) == (1, 2)
    assert second.items == len(trainer.catalogue.items) == len(svc.holder.current)
    assert second.pool_users == svc.pool.n_users > 0
    assert sample(metrics, "streamrec_index_version") == 2
    assert sample(metrics, "streamrec_index_refreshes_total") == 2
    some_clicks = False
    for user, clicked in trainer.catalogue.users.items():
        pool = svc.pool.negatives(user)
        assert not set(pool) & clicked, user
        some_clicks = some_clicks or bool(clicked)
    assert some_clicks  # the check above was not vacuous


def test_trainer_step_split_across_threads_gives_the_same_batches(
    metrics: StreamrecMetrics, examples: list[LabeledExample]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    inline = TrainerService(FAST, StreamrecMetrics())
    split = TrainerService(FAST, metrics)
    inline.add(examples)
    split.add(examples)
    want = []
    while (b := inline.step()) is not None:
        want.append(b)
    got = []
    with ThreadPoolExecutor(1) as pool:
        while (taken := split.take()) is not None:
            split.add([])  # the loop goes on buffering while the step runs elsewhere
            result = pool.submit(split.compute, taken).result()
            got.append(split.finish(taken, result))
    assert [b.impression_ids for b in got] == [b.impression_ids for b in want]
    assert [b.p_raw for b in got] == [b.p_raw for b in want]
    assert [b.model_version for b in got] == [b.model_version for b in want]
    assert split.n_examples == inline.n_examples == len(examples)
    assert sample(metrics, "streamrec_scored_total") == len(examples)
    assert split.catalogue.items.keys() == inline.catalogue.items.keys()


def test_the_served_calibrator_and_its_version_change_together() -> None:
    svc = TrainerService(FAST, StreamrecMetrics())
    before = svc.serving_calibrator()
    assert before[1] == 0
    svc.apply_control(CalibratorUpdate(3, {"kind": "platt", "a": 2.0, "b": 0.1}))
    cal, version = svc.serving_calibrator()
    assert version == 3 and isinstance(cal, PlattCalibrator) and cal.a == 2.0
    svc.apply_control(CalibratorUpdate(2, {"kind": "platt", "a": 9.0, "b": 0}))
    assert svc.serving_calibrator() == (cal, 3)  # an older version is ignored
    svc.apply_control(ModelAnnouncement(9))  # not a calibrator: nothing changes
    assert svc.served_calibrator.version == 3 and before[0] is not cal


def test_items_of_a_click_free_batch_join_the_two_towers_catalogue() -> None:
    svc = TrainerService(FAST, StreamrecMetrics())
    assert svc.two_tower is not None
    imps = [Impression(f"n{k}", 1_700_000_000.0 + k, f"u{k}", f"item{k}") for k in range(8)]
    svc.add([LabeledExample(imp, 0, imp.ts + 60.0, kind="negative") for imp in imps])
    while svc.step() is not None:
        pass
    assert svc.two_tower.n_updates == 0  # no click: no step
    assert {f"item{k}" for k in range(8)} <= set(svc.two_tower._catalogue)


def test_a_cold_ranker_ramps_its_micro_batches_and_a_warm_one_does_not(
    metrics: StreamrecMetrics, examples: list[LabeledExample], tmp_path: Path
) -> None:
    """ramp_from rows, doubling after each step up to batch_size, while the ranker has not
    learned (a cold model scores fewer examples at its prior); a warm start takes full
    batches at once."""
    s = dataclasses.replace(FAST, trainer=dataclasses.replace(FAST.trainer, ramp_from=8))
    svc = TrainerService(s, metrics)
    svc.add(examples[: 8 + 16 + 32 + 64 + 64])
    sizes = []
    while (scored := svc.step()) is not None:
        sizes.append(len(scored.impression_ids))
    assert sizes == [8, 16, 32, 64, 64]
    svc.ranker.save(tmp_path / "warm.pt")
    warm = dataclasses.replace(
        s, trainer=dataclasses.replace(s.trainer, warm_start=str(tmp_path / "warm.pt"))
    )
    again = TrainerService(warm, StreamrecMetrics())
    assert again.batch_size_now() == BATCH
    with pytest.raises(ValueError, match="ramp_from"):
        TrainerConfig(ramp_from=-1)
