"""The joiner's durable state and the at-least-once contract, without Kafka.

A worker that dies loses its in-memory joiners; its input offsets are committed only up to
what was processed, and its state (a Faust table in the worker, :class:`MemoryJoinState`
here) holds what was journalled. These tests restart a :class:`JoinService` on the same
state and re-deliver the records after the last "commit", as Kafka would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from learners.calibration import PlattCalibrator
from learners.delayed_feedback import fnc_correct
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig, TorchRanker
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    LabeledExample,
    Watermark,
    example_row,
)
from monitoring.metrics import StreamrecMetrics
from stream.control import ModelAnnouncement
from stream.join import JoinConfig, offline_join
from stream.services import JoinService, MemoryJoinState, SeenKeys, TrainerService
from stream.settings import Settings, TrainerConfig

T0 = 1_700_000_000.0
SETTINGS = Settings(join=JoinConfig(window_s=60.0, lateness_s=5.0, orphan_grace_s=30.0,
                                    dedup_horizon_s=300.0))  # fmt: skip


def sample(metrics: StreamrecMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def log_records(n: int, seed: int) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """One partition's records in event-time order (impressions 1 s apart, a third clicked
    after 0..90 s: some outside the 60 s window), watermarks every 50 records and a final
    one; and the offline join's labels."""
    rng = np.random.default_rng(seed)
    events: list[tuple[float, int, str, bytes]] = []
    imps, clicks = [], []
    for i in range(n):
        imp = Impression(f"imp-{i}", T0 + i, f"u{i % 7}", f"i{i % 11}", position=1)
        imps.append(imp)
        events.append((imp.ts, 0, TOPIC_IMPRESSIONS, imp.to_json()))
        if rng.random() < 1 / 3:
            c = Click(imp.impression_id, imp.ts + float(rng.uniform(0, 90)))
            clicks.append(c)
            events.append((c.ts, 1, TOPIC_CLICKS, c.to_json()))
    events.sort(key=lambda e: (e[0], e[1]))
    out: list[tuple[str, bytes]] = []
    for k, (ts, _, topic, raw) in enumerate(events):
        out.append((topic, raw))
        if k % 50 == 49:
            out += [(t, Watermark(ts).to_json()) for t in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)]
    end = Watermark(T0 + n + 1000).to_json()
    out += [(TOPIC_IMPRESSIONS, end), (TOPIC_CLICKS, end)]
    return out, offline_join(imps, clicks, 60.0)


def drain(service: JoinService, sink: list[LabeledExample]) -> None:
    """What the worker's flusher does: hand labels to the producer, then mark them sent."""
    for partition, buf in service.take_outbox().items():
        sink.extend(buf)
        service.sent(partition, buf)


@pytest.mark.parametrize("crash_at", [130, 400, 777])
def test_restart_with_redelivery_labels_every_impression_correctly(crash_at: int) -> None:
    records, truth = log_records(300, seed=crash_at)
    state = MemoryJoinState()
    sink: list[LabeledExample] = []
    first = JoinService(SETTINGS, StreamrecMetrics(), state)
    committed = 0
    for offset, (topic, raw) in enumerate(records[:crash_at]):
        first.handle(raw, topic, 0, offset)
        if offset % 40 == 0:
            drain(first, sink)
            committed = offset + 1  # the flusher ran: offsets so far may be committed
    # crash: labels still in the outbox are lost with the process; records after the last
    # commit are delivered again to the new process, which starts from the state alone
    second = JoinService(SETTINGS, StreamrecMetrics(), state)
    for offset, (topic, raw) in enumerate(records[committed:], start=committed):
        second.handle(raw, topic, 0, offset)
    second.tick()
    drain(second, sink)

    final: dict[str, int] = {}
    for e in sink:
        final[e.impression.impression_id] = max(final.get(e.impression.impression_id, 0), e.label)
    assert final == truth
    redelivered = len(sink) - len(final) - sum(e.kind == "correction" for e in sink)
    assert redelivered <= crash_at - committed  # duplicates only from re-read records


def test_labelled_impressions_stay_in_the_state_for_the_dedup_horizon_only() -> None:
    records, truth = log_records(600, seed=1)
    state = MemoryJoinState()
    service = JoinService(SETTINGS, StreamrecMetrics(), state)
    sink: list[LabeledExample] = []
    sizes = []
    middle: dict[str, bytes] = {}
    for offset, (topic, raw) in enumerate(records):
        service.handle(raw, topic, 0, offset)
        if offset % 40 == 0:
            drain(service, sink)
            sizes.append(len(state))
        if offset == len(records) // 2:
            middle = dict(state.data[0])
    service.tick()
    drain(service, sink)
    assert {e.impression.impression_id for e in sink} == truth.keys()
    # 600 s of log, W = 60 s, dedup horizon 300 s: the state never holds the whole log
    assert 0 < max(sizes) < 600 * 0.75
    entries = [json.loads(v) for k, v in middle.items() if k.startswith("i/")]
    done = [d for d in entries if "d" in d]
    pending = [d for d in entries if "d" not in d]
    assert done and pending and all("c" in d and "i" in d for d in pending)
    assert all("i" in d for d in done if d["d"] == 0)  # negatives keep their impression
    assert all("i" not in d for d in done if d["d"] == 1)
    # the final watermark is past every horizon: only the input event times remain
    assert list(state.data[0]) == ["w"]


def test_orphan_click_past_its_grace_is_dead_lettered_and_leaves_the_state() -> None:
    metrics = StreamrecMetrics()
    state = MemoryJoinState()
    service = JoinService(SETTINGS, metrics, state)
    service.handle(Click("ghost", T0).to_json(), TOPIC_CLICKS, 0, 0)
    assert "c/ghost" in state.data[0]
    for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
        service.handle(Watermark(T0 + 100).to_json(), topic, 0, 1)
    (dead,) = service.orphans
    assert dead.reason == "orphan_click" and dead.topic == TOPIC_CLICKS
    assert json.loads(__import__("base64").b64decode(dead.raw_b64))["impression_id"] == "ghost"
    assert "c/ghost" not in state.data[0]
    assert sample(metrics, "streamrec_dead_letters_total", reason="orphan_click") == 1


def test_a_restored_orphan_click_still_joins_its_late_impression() -> None:
    state = MemoryJoinState()
    JoinService(SETTINGS, StreamrecMetrics(), state).handle(
        Click("a", T0 + 5).to_json(), TOPIC_CLICKS, 0, 0
    )
    service = JoinService(SETTINGS, StreamrecMetrics(), state)
    service.handle(Impression("a", T0, "u", "i").to_json(), TOPIC_IMPRESSIONS, 0, 1)
    for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
        service.handle(Watermark(T0 + 100).to_json(), topic, 0, 2)
    (label,) = [e for buf in service.take_outbox().values() for e in buf]
    assert (label.impression.impression_id, label.label) == ("a", 1)
    assert "c/a" not in state.data[0]


def test_a_revoked_partition_is_rebuilt_from_the_state_by_its_next_owner() -> None:
    state = MemoryJoinState()
    a = JoinService(SETTINGS, StreamrecMetrics(), state)
    a.handle(Impression("x", T0, "u", "i").to_json(), TOPIC_IMPRESSIONS, 3, 0)
    a.handle(Click("x", T0 + 10).to_json(), TOPIC_CLICKS, 3, 0)
    a.drop([3])
    assert 3 not in a.joiners
    b = JoinService(SETTINGS, StreamrecMetrics(), state)
    j = b.joiner(3)
    assert "x" in j.pending and j.clicked["x"] == T0 + 10


def test_seen_keys_forget_beyond_the_horizon() -> None:
    seen = SeenKeys(horizon=3)
    assert [seen.first_time(k) for k in "abcd"] == [True] * 4
    assert seen.first_time("a")  # evicted: seen again as new
    assert not seen.first_time("d")
    assert len(seen) == 3


def test_trainer_drops_redelivered_examples_and_counts_them() -> None:
    metrics = StreamrecMetrics()
    settings = Settings(
        ranker=RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=256)),
        trainer=TrainerConfig(batch_size=4),
    )
    trainer = TrainerService(settings, metrics)
    imps = [Impression(f"i{k}", T0 + k, "u", "x") for k in range(3)]
    batch = [LabeledExample(imp, 0, imp.ts + 60, kind="negative") for imp in imps]
    assert trainer.add(batch) == 3
    assert trainer.add(batch[:2]) == 0  # the same labels again: a redelivery
    fix = LabeledExample(imps[0], 1, T0 + 70, kind="correction")
    assert trainer.add([fix]) == 1  # a correction is new information
    assert sample(metrics, "streamrec_duplicate_examples_total", stage="trainer") == 2
    assert len(trainer.buffer) == 4


def test_checkpoints_are_retained_by_count_and_no_announced_path_is_loaded(
    tmp_path: Path,
) -> None:
    settings = Settings(
        ranker=RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=256)),
        trainer=TrainerConfig(batch_size=4, checkpoint_dir=str(tmp_path), keep_checkpoints=2),
    )
    training = TrainerService(settings, StreamrecMetrics())
    paths = []
    for j in range(4):
        imps = [Impression(f"i{j}-{k}", T0 + k, "u", "x") for k in range(4)]
        training.add([LabeledExample(imp, k % 2, imp.ts, kind="negative") for k, imp in
                      enumerate(imps)])  # fmt: skip
        assert training.step() is not None
        paths.append(training.maybe_checkpoint(force=True))
    on_disk = sorted(p.name for p in tmp_path.glob("ranker-v*.pt"))
    assert on_disk == [p.name for p in paths[-2:]]  # type: ignore[union-attr]
    assert (tmp_path / "LATEST").read_text() == paths[-1].name  # type: ignore[union-attr]
    assert not list(tmp_path.glob("*.tmp")) and training.checkpoints == paths[-2:]
    # a model record naming a file is never loaded (only a serve worker's model store is)
    serving = TrainerService(settings, StreamrecMetrics())
    before = serving.ranker
    serving.apply_control(ModelAnnouncement(99, path=str(paths[-1])))
    assert serving.ranker is before and serving.model_version == 0


def test_fake_negative_scheme_needs_its_loss_and_fnc_serves_corrected_scores() -> None:
    from stream.services import TrainerService as Trainer

    # plain log loss on the fake-negative stream is FNW; FNW with FNC would correct twice
    assert Settings(join=JoinConfig(delayed_feedback="fake_negative")).ranker.loss == "fnw"
    with pytest.raises(ValueError, match="fnw"):
        Settings(
            join=JoinConfig(delayed_feedback="fake_negative"),
            ranker=RankerConfig(loss="fnw"),
            trainer=TrainerConfig(fnc=True),
        )
    settings = Settings(
        join=JoinConfig(delayed_feedback="fake_negative"),
        ranker=RankerConfig(
            model="logreg", encoder=EncoderConfig(num_buckets=256), fallback_mixture=False
        ),  # the link alone, compared exactly
        trainer=TrainerConfig(batch_size=2, fnc=True),
    )
    assert settings.ranker.fnc  # FNC is the ranker's output link
    trainer = Trainer(settings, StreamrecMetrics())
    # the old path: the same ranker without the link, then fnc_correct, then the calibrator
    twin = TorchRanker(dataclasses.replace(settings.ranker, fnc=False),
                       seed=settings.trainer.seed, online=True)  # fmt: skip
    imps = [Impression(f"i{k}", T0 + k, "u", "x") for k in range(2)]
    trainer.add([LabeledExample(imp, 0, imp.ts, kind="fake_negative") for imp in imps])
    scored = trainer.step()
    assert scored is not None
    b_before = twin.score_and_learn([example_row(i) for i in imps], np.zeros(2), np.ones(2))
    np.testing.assert_array_equal(scored.p_raw, fnc_correct(b_before))  # corrected once
    trainer.calibrator = PlattCalibrator(a=1.2, b=0.3)
    row = [{"user_id": "u", "item_id": "x", "position": None}]
    b = twin.predict_proba_many(row)
    assert 0.0 < b[0] < 0.5  # so no, one and two corrections all differ
    cal, _ = trainer.serving_calibrator()
    served = cal.transform(trainer.ranker.predict_proba_many(row))
    np.testing.assert_array_equal(served, trainer.calibrator.transform(fnc_correct(b)))
    assert not np.allclose(served, cal.transform(b))
    assert not np.allclose(served, cal.transform(fnc_correct(fnc_correct(b))))
    with pytest.raises(ValueError, match="trainer.fnc=True but the ranker"):
        Trainer(settings, StreamrecMetrics(), twin)  # a ranker without the link


@pytest.mark.parametrize(("loss", "message"), [("focal", "no correction"), ("fnw", "twice")])
def test_fnc_is_still_refused_with_losses_that_do_not_learn_the_biased_rate(
    loss: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(
            join=JoinConfig(delayed_feedback="fake_negative"),
            ranker=RankerConfig(loss=loss),
            trainer=TrainerConfig(fnc=True),
        )


def test_fake_negative_mode_survives_a_restart_before_the_click() -> None:
    settings = Settings(
        join=JoinConfig(window_s=60.0, lateness_s=0.0, delayed_feedback="fake_negative"),
        ranker=RankerConfig(loss="fnw"),
    )
    state = MemoryJoinState()
    first = JoinService(settings, StreamrecMetrics(), state)
    first.handle(Impression("a", T0, "u", "i").to_json(), TOPIC_IMPRESSIONS, 0, 0)
    sink: list[LabeledExample] = []
    drain(first, sink)
    assert [(e.kind, e.label) for e in sink] == [("fake_negative", 0)]
    second = JoinService(settings, StreamrecMetrics(), state)  # crash, restart
    second.handle(Click("a", T0 + 30).to_json(), TOPIC_CLICKS, 0, 1)
    drain(second, sink)
    assert [(e.kind, e.label) for e in sink] == [("fake_negative", 0), ("positive", 1)]


def test_take_ready_hands_each_label_over_once_and_keeps_small_buffers() -> None:
    service = JoinService(SETTINGS, StreamrecMetrics(), MemoryJoinState())
    total = 0
    for partition, n in ((0, 300), (1, 120)):  # one log per partition
        records, truth = log_records(n, seed=9 + partition)
        total += len(truth)
        for k, (topic, raw) in enumerate(records):
            service.handle(raw, topic, partition, k)
    queued = {p: len(buf) for p, buf in service.outbox.items() if buf}
    assert sorted(queued) == [0, 1] and sum(queued.values()) == total
    big = max(queued.values())
    first = service.take_ready(min_size=big)  # only the fullest partition(s)
    assert first and all(len(buf) >= big for buf in first.values())
    assert not set(first) & {p for p, buf in service.outbox.items() if buf}
    rest = service.take_ready()
    again = service.take_ready()  # a second flusher finds nothing left to send
    assert again == {}
    assert set(first) | set(rest) == {0, 1} and not set(first) & set(rest)
    for taken in (first, rest):
        for buf in taken.values():
            assert len({e.impression.impression_id for e in buf}) == len(buf)
    assert sum(len(buf) for taken in (first, rest) for buf in taken.values()) == total


def _two_label_settings(scheme: str) -> Settings:
    return Settings(
        join=JoinConfig(
            window_s=60.0,
            lateness_s=0.0,
            delayed_feedback=scheme,
            conversion_window_s=100.0,
            orphan_grace_s=300.0,
        ),  # fmt: skip
        ranker=RankerConfig(model="mmoe"),
    )


def _conv(iid: str, ts: float) -> bytes:
    return Click(iid, ts, conversion=True).to_json()


@pytest.mark.parametrize("scheme", ["window", "fake_negative"])
def test_a_click_awaiting_its_conversion_survives_a_restart(scheme: str) -> None:
    """The second label's waiting state is journalled: a restarted joiner attaches the
    conversion that comes after the crash, and the state forgets the entry once its
    record is sent."""
    settings = _two_label_settings(scheme)
    state = MemoryJoinState()
    sink: list[LabeledExample] = []
    first = JoinService(settings, StreamrecMetrics(), state)
    first.handle(Impression("a", T0, "u", "i").to_json(), TOPIC_IMPRESSIONS, 0, 0)
    first.handle(Click("a", T0 + 10).to_json(), TOPIC_CLICKS, 0, 1)
    drain(first, sink)
    assert any(k.startswith("v/") for k, _ in state.items(0))
    second = JoinService(settings, StreamrecMetrics(), state)  # crash, restart
    second.handle(_conv("a", T0 + 50), TOPIC_CLICKS, 0, 2)
    end = Watermark(T0 + 1000).to_json()
    second.handle(end, TOPIC_IMPRESSIONS, 0, 3)
    second.handle(end, TOPIC_CLICKS, 0, 4)
    second.tick()
    drain(second, sink)
    assert [e.label2 for e in sink if e.kind == "conversion"] == [1]
    assert second.joiners[0].counters.conversions == 1
    assert not [k for k, _ in state.items(0) if k[:2] in ("v/", "e/")]


def test_a_conversion_awaiting_its_click_survives_a_restart() -> None:
    settings = _two_label_settings("fake_negative")
    state = MemoryJoinState()
    sink: list[LabeledExample] = []
    first = JoinService(settings, StreamrecMetrics(), state)
    first.handle(Click("a", T0 + 10).to_json(), TOPIC_CLICKS, 0, 0)  # ahead of its impression
    first.handle(_conv("a", T0 + 20), TOPIC_CLICKS, 0, 1)
    assert any(k == "e/a" for k, _ in state.items(0))
    second = JoinService(settings, StreamrecMetrics(), state)  # crash, restart
    second.handle(Impression("a", T0, "u", "i").to_json(), TOPIC_IMPRESSIONS, 0, 2)
    drain(second, sink)
    assert ("conversion", 1) in [(e.kind, e.label2) for e in sink]
    assert not [k for k, _ in state.items(0) if k[:2] in ("v/", "e/")]


def test_a_window_closed_without_conversion_leaves_the_state() -> None:
    settings = _two_label_settings("fake_negative")
    state = MemoryJoinState()
    service = JoinService(settings, StreamrecMetrics(), state)
    service.handle(Impression("a", T0, "u", "i").to_json(), TOPIC_IMPRESSIONS, 0, 0)
    service.handle(Click("a", T0 + 10).to_json(), TOPIC_CLICKS, 0, 1)
    end = Watermark(T0 + 1000).to_json()
    service.handle(end, TOPIC_IMPRESSIONS, 0, 2)
    service.handle(end, TOPIC_CLICKS, 0, 3)
    sink: list[LabeledExample] = []
    drain(service, sink)
    service.tick()
    assert service.joiners[0].converting == {}
    assert not [k for k, _ in state.items(0) if k[:2] in ("v/", "e/")]
