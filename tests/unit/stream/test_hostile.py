"""Hostile records without Kafka: control validation, byte limits, dead-letter bounds, the
UTF-8 size check after a restart, and event times ahead of the clock (issue 19)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.hostile import HOSTILE_CONTROL
from learners.calibration import LogitShiftCalibrator, PlattCalibrator, calibrator_from_dict
from learners.calibration_nonparametric import HistogramBinningCalibrator, IsotonicCalibrator
from logs.batches import LABELED_OVERHEAD, ScoredBatch, decode_labeled, encode_labeled
from logs.events import (
    DEAD_LETTER_PREFIX_BYTES,
    MAX_EVENT_BYTES,
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    DeadLetter,
    Impression,
    InvalidEvent,
    LabeledExample,
    Watermark,
    parse_impression,
)
from monitoring.metrics import StreamrecMetrics
from stream.control import decode_control, parse_control
from stream.envelope import encode_envelope
from stream.join import JoinConfig
from stream.limits import labeled_records, payload_limit, scored_records
from stream.services import JoinService, MemoryJoinState, MonitorService, TrainerService
from stream.settings import Settings

T0 = 1_700_000_000.0
SETTINGS = Settings(join=JoinConfig(window_s=60.0, lateness_s=5.0))


def control(obj: object) -> bytes:
    return json.dumps(obj).encode()


# --- control records ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "reason"), HOSTILE_CONTROL)
def test_hostile_control_records_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_control(raw)
    assert info.value.reason == reason


def test_control_record_over_the_size_limit_is_rejected() -> None:
    raw = control({"kind": "drift", "pad": "x" * 5000})
    with pytest.raises(InvalidEvent) as info:
        parse_control(raw, max_bytes=4096)
    assert info.value.reason == "too_large"


def _fitted() -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.6, 3000)
    y = (rng.random(3000) < p * 0.7).astype(float)
    iso, hist = IsotonicCalibrator(), HistogramBinningCalibrator()
    iso.fit(p, y)
    hist.fit(p, y)
    return [PlattCalibrator(1.3, -0.2).to_dict(), LogitShiftCalibrator(0.4).to_dict(),
            iso.to_dict(), hist.to_dict(), IsotonicCalibrator().to_dict(),
            {"a": 1.0, "b": 0.0}]  # fmt: skip


@pytest.mark.parametrize("params", _fitted())
def test_every_calibrator_the_monitor_publishes_is_accepted(params: dict[str, object]) -> None:
    msg = parse_control(control({"kind": "calibrator", "version": 4, "params": params}))
    cal = calibrator_from_dict(msg["params"])
    out = cal.transform(np.linspace(0, 1, 11))
    assert np.all(np.isfinite(out)) and msg["version"] == 4


def test_services_apply_every_accepted_control_record_without_raising() -> None:
    metrics = StreamrecMetrics()
    trainer = TrainerService(SETTINGS, metrics)
    monitor = MonitorService(SETTINGS, metrics)
    accepted = [
        control({"kind": "calibrator", "version": 2, "params": {"a": 1.1, "b": 0.1}}),
        control({"kind": "model", "version": 9, "path": "/nonexistent/ranker.pt"}),
        control({"kind": "index", "version": 3, "items": 10}),
        control({"kind": "something_new"}),
    ]
    for raw in accepted:
        msg = decode_control(raw)
        trainer.apply_control(msg)
        monitor.apply_control(msg)
    assert trainer.calibrator_version == 2 and monitor.calibrator_version == 2
    p = trainer.calibrator.transform(np.array([0.0, 0.3, 1.0]))
    assert np.all(np.isfinite(p))


# --- dead letters ---------------------------------------------------------------------------


def test_dead_letter_of_a_huge_record_keeps_a_bounded_prefix_size_and_hash() -> None:
    raw = b'{"impression_id": "' + b"x" * 2_000_000 + b'"}'
    dl = DeadLetter.of("impressions", 1, 5, InvalidEvent("too_large", "big"), raw)
    out = dl.to_json()
    assert len(out) < 3000  # was 2.67 MB: the whole value in base64
    d = json.loads(out)
    assert base64.b64decode(d["raw_b64"]) == raw[:DEAD_LETTER_PREFIX_BYTES]
    assert d["raw_size"] == len(raw)
    assert d["raw_sha256"] == hashlib.sha256(raw).hexdigest()


# --- byte limits of produced batches -----------------------------------------------------------


def _big_example(n: int, size: int = 60_000) -> LabeledExample:
    feats: dict[str, str | float] = {f"f{k}": "v" * 1000 for k in range(size // 1010)}
    return LabeledExample(Impression(f"imp-{n}", T0 + n, "u", "i", features=feats), 0, T0 + 99)


def test_twenty_60kb_examples_are_split_under_the_record_limit() -> None:
    examples = [_big_example(n) for n in range(20)]
    limit = payload_limit(Settings().max_message_bytes)
    records, too_large = labeled_records(examples, limit)
    assert not too_large and len(records) >= 2
    assert all(len(r) <= limit for r in records)
    back = [e for r in records for e in decode_labeled(r)]
    assert [e.impression.impression_id for e in back] == [f"imp-{n}" for n in range(20)]


def test_labeled_records_respect_the_count_cap_and_flag_an_example_too_large_alone() -> None:
    small = [LabeledExample(Impression(f"s{n}", T0, "u", "i"), 1, T0) for n in range(25)]
    records, _ = labeled_records(small, 10**6, max_items=10)
    assert [len(decode_labeled(r)) for r in records] == [10, 10, 5]
    records, too_large = labeled_records([small[0], _big_example(1), small[1]], 70_000 // 2)
    assert [e.impression.impression_id for e in too_large] == ["imp-1"]
    assert len(records) == 2


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=30),
    max_bytes=st.integers(1024, 12_000),
    max_items=st.none() | st.integers(1, 8),
)
def test_labeled_records_fit_the_limit_and_keep_every_example_in_order(
    sizes: list[int], max_bytes: int, max_items: int | None
) -> None:
    examples = [
        LabeledExample(Impression(f"e{k}", T0, "u", "i", position=1,
                                  features={f"f{j}": "v" * min(1000, n - 1000 * j)
                                            for j in range(n // 1000 + 1)}), k % 2, T0)
        for k, n in enumerate(sizes)
    ]  # fmt: skip
    records, too_large = labeled_records(examples, max_bytes, max_items)
    assert all(len(r) <= max_bytes for r in records)
    back = [[e.impression.impression_id for e in decode_labeled(r)] for r in records]
    assert all(0 < len(ids) <= (max_items or len(examples)) for ids in back)
    sent = {i for ids in back for i in ids}
    assert [i for ids in back for i in ids] == [
        e.impression.impression_id for e in examples if e.impression.impression_id in sent
    ]  # in order, each once
    # refused only when too large alone (up to the bound on the header's size)
    assert all(len(encode_labeled([e])) + LABELED_OVERHEAD > max_bytes for e in too_large)
    assert len(sent) + len(too_large) == len(examples)


def test_a_large_scored_batch_is_halved_until_each_record_fits() -> None:
    n = 3000
    batch = ScoredBatch(1, 0, [f"id-{'x' * 200}-{i}" for i in range(n)], [T0] * n, [0] * n,
                        [0.1] * n, [0.1] * n, ["1"] * n, [None] * n, {0: T0, 3: T0})  # fmt: skip
    records = scored_records(batch, 200_000)
    assert len(records) > 1 and all(len(r) <= 200_000 for r in records)
    parts = [ScoredBatch.decode(r) for r in records]
    assert [i for p in parts for i in p.impression_ids] == batch.impression_ids
    # the marks follow every example of the batch: on the last part only
    assert [p.marks for p in parts] == [{}] * (len(parts) - 1) + [{0: T0, 3: T0}]


# --- the event size check is on UTF-8 bytes, also after a restart -------------------------------


def test_a_valid_non_ascii_impression_survives_a_restart_of_the_joiner() -> None:
    # ~40 KB of UTF-8 (2 bytes a character); as ASCII-escaped JSON it is ~120 KB
    imp = Impression("nonascii", T0, "u", "i", features={f"f{k}": "é" * 1000 for k in range(20)})
    raw = json.dumps(imp.to_dict(), ensure_ascii=False).encode()
    assert len(raw) < MAX_EVENT_BYTES < len(imp.to_json())
    state = MemoryJoinState()
    first = JoinService(SETTINGS, StreamrecMetrics(), state)
    out, dl = first.handle(raw, TOPIC_IMPRESSIONS, 0, 0)
    assert dl is None and "nonascii" in first.joiner(0).pending
    again = JoinService(SETTINGS, StreamrecMetrics(), state)  # a restart on the same state
    assert "nonascii" in again.joiner(0).pending
    assert again.n_restored == 1
    assert parse_impression(raw).features == imp.features


def test_the_size_limit_counts_utf8_bytes_of_a_str() -> None:
    text = json.dumps({"impression_id": "a", "ts": T0, "user_id": "u", "item_id": "i",
                       "features": {"f": "ü" * 40_000}}, ensure_ascii=False)  # fmt: skip
    assert len(text) < MAX_EVENT_BYTES < len(text.encode())
    with pytest.raises(InvalidEvent) as info:
        parse_impression(text)
    assert info.value.reason == "too_large"


# --- event time ahead of the clock ------------------------------------------------------------


def test_an_event_from_the_future_is_dead_lettered_and_does_not_move_the_watermark() -> None:
    metrics = StreamrecMetrics()
    js = JoinService(SETTINGS, metrics)
    now = time.time()
    ok = Impression("ok", now - 10, "u", "i")
    js.handle(ok.to_json(), TOPIC_IMPRESSIONS, 0, 0)
    before = js.joiner(0).watermark
    for n, raw in enumerate([
        Impression("f1", now + 3600, "u", "i").to_json(),
        json.dumps({"impression_id": "f2", "ts": 4.09e9}).encode(),  # a click in 2099
        Watermark(now + 86_400).to_json(),
    ]):  # fmt: skip
        topic = TOPIC_CLICKS if b"f2" in raw else TOPIC_IMPRESSIONS
        out, dl = js.handle(raw, topic, 0, n + 1)
        assert dl is not None and dl.reason == "future_ts", raw
        assert out == []
    assert js.joiner(0).watermark == before
    assert "f1" not in js.joiner(0).pending
    assert (
        metrics.registry.get_sample_value("streamrec_dead_letters_total", {"reason": "future_ts"})
        == 3
    )
    # inside an envelope, only the future event is rejected
    env = encode_envelope(TOPIC_IMPRESSIONS, [
        {"impression_id": "e1", "ts": now - 5, "user_id": "u", "item_id": "i"},
        {"impression_id": "e2", "ts": now + 7200, "user_id": "u", "item_id": "i"},
    ])  # fmt: skip
    out, dls = js.handle_record(env, TOPIC_IMPRESSIONS, 0, 10)
    assert [d.reason for d in dls] == ["future_ts"]
    assert "e1" in js.joiner(0).pending and "e2" not in js.joiner(0).pending


def test_the_skew_is_configurable_and_inf_turns_the_check_off() -> None:
    with pytest.raises(ValueError, match="max_future_skew_s"):
        Settings(max_future_skew_s=-1.0)
    js = JoinService(Settings(max_future_skew_s=math.inf), StreamrecMetrics())
    _, dl = js.handle(Impression("f", time.time() + 86_400, "u", "i").to_json(),
                      TOPIC_IMPRESSIONS, 0, 0)  # fmt: skip
    assert dl is None


# --- model records: a version of the model store, nothing else ----------------------------


def test_a_model_record_names_only_a_version_of_the_store_with_its_digest(tmp_path: Path) -> None:
    from modelstore.store import DirectoryStore
    from stream.control import ModelAnnouncement, check_model_record

    store = DirectoryStore(tmp_path / "store")
    m = store.publish(lambda d: (d / "ranker.pt").write_bytes(b"weights"))
    root = str(store.root)
    ok = {"kind": "model", "version": m.version, "path": str(m.path), "digest": m.digest}
    assert check_model_record(decode_control(control(ok)), root) is None
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store.root / "v00000009").symlink_to(outside)  # a planted link inside the store
    refused = {
        "outside_store": [
            {"kind": "model", "version": m.version, "path": "/etc/passwd"},
            {"kind": "model", "version": m.version, "path": f"{m.path}/../../elsewhere"},
            {"kind": "model", "version": 9, "path": str(store.root / "v00000009")},
        ],
        "digest": [
            {"kind": "model", "version": m.version, "path": str(m.path), "digest": "0" * 64}
        ],  # fmt: skip
    }
    for reason, records in refused.items():
        for rec in records:
            assert check_model_record(decode_control(control(rec)), root) == reason, rec
    # a legacy record naming a checkpoint file, on a worker without a store: refused
    legacy = {"kind": "model", "version": 9, "path": str(tmp_path / "ranker-v9.pt")}
    assert check_model_record(decode_control(control(legacy)), "") == "outside_store"
    # an old announcement of a version pruned since: not an error, nothing to do
    assert check_model_record(ModelAnnouncement(77), root) is None
