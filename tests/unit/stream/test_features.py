"""The worker's joiner computes the historical features: they travel with the impression to
its labelled example, equal those of a standalone :class:`features.stage.FeatureStage` over
the same events, survive a restart (state journalled at each commit, records after it
redelivered), and serving reads the same values without changing the state."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from features.stage import FeatureStage
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    LabeledExample,
    Watermark,
    example_row,
    parse_input,
)
from monitoring.metrics import StreamrecMetrics
from stream.join import JoinConfig
from stream.services import JoinService, MemoryJoinState
from stream.settings import Settings

T0 = 1_700_000_000.0
SETTINGS = Settings(join=JoinConfig(window_s=60.0, lateness_s=5.0, orphan_grace_s=30.0,
                                    dedup_horizon_s=300.0), features=True)  # fmt: skip


def records(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    events: list[tuple[float, int, str, bytes]] = []
    for i in range(n):
        imp = Impression(f"imp-{i}", T0 + i, f"u{i % 5}", f"i{rng.integers(6)}", position=1,
                         features={"item_cat": f"c{i % 3}"})  # fmt: skip
        events.append((imp.ts, 0, TOPIC_IMPRESSIONS, imp.to_json()))
        if rng.random() < 0.3:
            c = Click(imp.impression_id, imp.ts + float(rng.uniform(0, 40)))
            events.append((c.ts, 1, TOPIC_CLICKS, c.to_json()))
    events.sort(key=lambda e: (e[0], e[1]))
    out: list[tuple[str, bytes]] = []
    for k, (ts, _, topic, raw) in enumerate(events):
        out.append((topic, raw))
        if k % 50 == 49:
            out += [(t, Watermark(ts).to_json()) for t in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)]
    end = Watermark(T0 + n + 1000).to_json()
    return out + [(TOPIC_IMPRESSIONS, end), (TOPIC_CLICKS, end)]


def reference(recs: list[tuple[str, bytes]]) -> dict[str, dict[str, object]]:
    """A standalone stage over the same events in the same order."""
    stage = FeatureStage()
    out = {}
    for topic, raw in recs:
        e = parse_input(raw, topic)
        if isinstance(e, Watermark):
            continue
        f = stage.process([e])[0]
        if f is not None:
            out[e.impression_id] = f
    return out


def drain(service: JoinService, sink: list[LabeledExample]) -> None:
    for partition, buf in service.take_outbox().items():
        sink.extend(buf)
        service.sent(partition, buf)


def hist(e: LabeledExample) -> dict[str, object]:
    return {k: v for k, v in example_row(e.impression).items() if k.startswith("hist_")}


@pytest.mark.parametrize(
    ("record_bytes", "snapshot_min"), [(1_000_000, 1 << 20), (65_536, 0), (1_000_000, 0)]
)
def test_features_travel_to_the_labelled_example_and_survive_a_restart(
    record_bytes: int, snapshot_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # record_bytes 65,536: the journalled stage is cut into pieces (f/0, f/1, ...);
    # snapshot_min 1 MiB: only deltas (fd/0, fd/1, ...) are written, replayed on restore;
    # 0: snapshots whenever the deltas outgrow a quarter of the last one, deltas between
    monkeypatch.setattr(JoinService, "FEATURE_SNAPSHOT_MIN_BYTES", snapshot_min)
    settings = dataclasses.replace(SETTINGS, max_message_bytes=record_bytes)
    # enough history for a snapshot of several 32 KiB pieces at record_bytes 65,536
    recs = records(250 if record_bytes > 100_000 else 700, seed=1)
    ref = reference(recs)
    state = MemoryJoinState()
    sink: list[LabeledExample] = []
    first = JoinService(settings, StreamrecMetrics(), state)
    committed = 0
    crash_at = len(recs) * 2 // 3
    for offset, (topic, raw) in enumerate(recs[:crash_at]):
        first.handle(raw, topic, 0, offset)
        if offset % 40 == 0:
            drain(first, sink)
            first.save_features()  # what the worker's commit does before committing
            committed = offset + 1
    meta = json.loads(state.data[0]["f"])
    if snapshot_min:
        assert meta["n"] == 0 and meta["d"] >= 3  # deltas only
    else:
        assert meta["n"] >= (2 if record_bytes < 100_000 else 1)
        assert first.n_feature_snapshots >= 2 and first.n_feature_deltas >= 2  # both paths
    second = JoinService(settings, StreamrecMetrics(), state)
    for offset, (topic, raw) in enumerate(recs[committed:], start=committed):
        second.handle(raw, topic, 0, offset)
    second.tick()
    drain(second, sink)
    assert committed < crash_at - 5  # records were redelivered
    seen = set()
    for e in sink:
        iid = e.impression.impression_id
        seen.add(iid)
        got = hist(e)
        want = {k: v for k, v in ref[iid].items()}
        assert got.keys() == want.keys(), iid
        for k, v in want.items():
            if isinstance(v, list):
                assert got[k] == v, (iid, k)
            else:
                assert got[k] == v, (iid, k, got[k], v)
    assert seen == set(ref)
    # some features are informative (history existed)
    assert any(e.impression.features.get("hist_ui_n", 0.0) > 0 for e in sink)
    assert any("hist_seq" in e.impression.features for e in sink)


def test_features_off_leaves_impressions_alone() -> None:
    recs = records(60, seed=2)
    svc = JoinService(Settings(join=SETTINGS.join, features=False), StreamrecMetrics())
    sink: list[LabeledExample] = []
    for offset, (topic, raw) in enumerate(recs):
        svc.handle(raw, topic, 0, offset)
    drain(svc, sink)
    assert sink and all(not hist(e) for e in sink)


def test_an_input_cannot_forge_the_stages_features() -> None:
    """A producer's own ``hist_*`` features (a forged behaviour sequence, recency or
    counter) never reach the labelled example with features on: the stage computes those
    names, the input's are dropped and counted. With features off they are the input's."""
    forged = {"hist_seq": "i9\x1fi8", "hist_seq_age": "1.0\x1f2.0", "hist_user_since_clk": 0.1,
              "hist_user_imp_1h": 1e6, "hist_made_up": 3.0, "item_cat": "c1"}  # fmt: skip
    recs = records(60, seed=3)
    recs.insert(0, (TOPIC_IMPRESSIONS, Impression("forged", T0 - 1, "u-new", "i1", position=1,
                                                  features=forged).to_json()))  # fmt: skip
    metrics = StreamrecMetrics()
    svc = JoinService(SETTINGS, metrics, MemoryJoinState())
    sink: list[LabeledExample] = []
    for offset, (topic, raw) in enumerate(recs):
        svc.handle(raw, topic, 0, offset)
    svc.tick()
    drain(svc, sink)
    (ex,) = [e for e in sink if e.impression.impression_id == "forged"]
    row = example_row(ex.impression)
    # u-new never clicked nor was shown anything: no sequence, no recency, counters 0
    assert "hist_seq" not in row and "hist_user_since_clk" not in row
    assert "hist_made_up" not in row and row["hist_user_imp_1h"] == 0.0
    assert row["item_cat"] == "c1"  # the input's other features stay
    dropped = metrics.history_fields_dropped.labels(where="stream")._value.get()
    assert dropped == 5
    off = JoinService(dataclasses.replace(SETTINGS, features=False), StreamrecMetrics())
    for offset, (topic, raw) in enumerate(recs):
        off.handle(raw, topic, 0, offset)
    off.tick()
    sink_off: list[LabeledExample] = []
    drain(off, sink_off)
    (ex,) = [e for e in sink_off if e.impression.impression_id == "forged"]
    assert example_row(ex.impression)["hist_seq"] == ["i9", "i8"]


def test_serving_reads_the_same_features_as_training_without_changing_state() -> None:
    from index.faiss_index import IndexHolder
    from learners.calibration import PlattCalibrator
    from learners.encoding import EncoderConfig
    from learners.ranker import RankerConfig, TorchRanker
    from serving.recommender import Recommender, ServingConfig

    recs = records(120, seed=3)
    svc = JoinService(SETTINGS, StreamrecMetrics())
    for offset, (topic, raw) in enumerate(recs[:-2]):  # not the final watermarks
        svc.handle(raw, topic, 0, offset)
    stage = svc.features[0]
    before = stage.state_dict()
    now = T0 + 130.5
    ranker = TorchRanker(
        RankerConfig(model="logreg", device="cpu", encoder=EncoderConfig(num_buckets=4096,
                     max_num_fields=64)), seed=0)  # fmt: skip
    rec = Recommender(
        IndexHolder(), lambda: ranker, lambda: (PlattCalibrator(), 0),
        config=ServingConfig(position=1), history=lambda user: stage, clock=lambda: now,
    )  # fmt: skip
    ctx = {"item_cat": "c1"}
    served_rows = rec._rows("u2", ["i3", "i4"], ctx)
    served = rec.score("u2", ["i3", "i4"], ctx)
    assert stage.state_dict() == before  # serving changed nothing
    assert served_rows[0]["hist_user_imp_1h"] > 0 and "hist_seq" in served_rows[0]
    # the same impressions arrive at that time: their training rows equal the served ones
    sink: list[LabeledExample] = []
    for k, item in enumerate(["i3", "i4"]):
        imp = Impression(f"late-{k}", now, "u2", item, position=1, features=ctx)
        # both scored before either arrives: the second's row must not see the first, so
        # score it against a fresh copy of the state
        if k == 1:
            svc.features[0].load_state_dict(before)
        svc.handle(imp.to_json(), TOPIC_IMPRESSIONS, 0, 10_000 + k)
    svc.handle(Watermark(now + 1000).to_json(), TOPIC_IMPRESSIONS, 0, 10_002)
    svc.handle(Watermark(now + 1000).to_json(), TOPIC_CLICKS, 0, 10_003)
    svc.tick()
    drain(svc, sink)
    trained = {e.impression.impression_id: example_row(e.impression) for e in sink}
    for k in range(2):
        row = trained[f"late-{k}"]
        assert row == served_rows[k]
        p = ranker.predict_proba_many([row])[0]
        assert p == served["items"][k]["p_raw"]


def test_the_feature_snapshot_is_the_stages_json_and_loads_back_exactly() -> None:
    """The journal's snapshot (msgspec, collector paused) parses to ``state_dict()`` and
    restores a stage that answers as the original; older spellings still load."""
    from bench.features import event_stream
    from stream.services.join_state import delta_chunks, load_json, snapshot_json

    stage = FeatureStage()
    events = event_stream(3_000, 300, 50, seed=1)
    stage.process(events[:2_500])
    raw = snapshot_json(stage)
    assert load_json(raw) == json.loads(raw) == json.loads(json.dumps(stage.state_dict()))
    again = FeatureStage()
    again.load_state_dict(load_json(raw))
    assert again.process(events[2_500:]) == stage.process(events[2_500:])
    calls = [["i", "é1", 1.7e9, "u", "i", None, {"item_c": "x", "f": 0.1}], ["c", "é1", 1.7e9]]
    chunks = delta_chunks(calls, 40)
    assert [c for chunk in chunks for c in load_json(chunk)] == calls and len(chunks) == 2
    assert load_json(b'{"x": NaN}')["x"] != load_json(b'{"x": NaN}')["x"]  # json.loads' NaN
    with pytest.raises(ValueError):
        load_json(b"{not json")
