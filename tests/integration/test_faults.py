"""Faults against the real worker process and the embedded broker (Tansu).

* Fuzzed bad input: a few hundred malformed records (random bytes, invalid UTF-8, JSON of
  the wrong shape or types, 200 KB strings, NaN/Infinity literals, absurd timestamps,
  out-of-range positions, ...) interleaved with a valid synthetic log. Every bad record
  must reach ``dead-letter`` with the reason the generator expects, the worker must stay
  up, and the counts must add up.
  Valid impressions with unknown extra fields are accepted (``logs.events`` ignores
  unknown top-level fields) and must be labelled like the log's.
* A null-value record (a tombstone) on an input topic is dead-lettered like any other bad
  record (reason ``bad_json``, empty ``raw_b64``).
* The broker going away for ~10 s in the middle of a stream, with persistent (S3) storage:
  the worker must survive, reconnect and label every impression.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kafka import KafkaProducer

from bench.hostile import Bad
from logs.batches import decode_labeled
from logs.events import (
    DEAD_LETTER_PREFIX_BYTES,
    TOPIC_CLICKS,
    TOPIC_DEAD_LETTER,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    InvalidEvent,
    LabeledExample,
    parse_input,
)
from logs.io import read_log_frame, write_log
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.broker import EmbeddedBroker, free_port, read_records, wait_for_port
from stream.demo import scrape
from stream.replay import replay

if TYPE_CHECKING:
    from tests.integration.conftest import S3Server  # the `s3` fixture's type

pytestmark = pytest.mark.integration

WINDOW_S = 1800.0
FINAL_GAP_S = WINDOW_S + 60.0 + 1.0  # join window + lateness + 1: every impression labelled


# --- the worker process -------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)

    def errors(self, n: int = 10) -> list[str]:
        """The first ``n`` ERROR/CRITICAL lines of the worker's log (for failure messages)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln[:300] for ln in lines if "[ERROR]" in ln or "[CRITICAL]" in ln][:n]


def start_worker(broker: str, tmp: Path) -> Worker:
    """A ``streamrec worker`` subprocess; returns once its ``/metrics`` answers (it creates
    the topics before it serves metrics, so they exist from then on)."""
    port = free_port()
    log_path = tmp / "worker.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker", "--broker", broker,
             "--metrics-port", str(port), "--data-dir", str(tmp / "worker-data")],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    worker = Worker(proc, log_path, f"http://127.0.0.1:{port}/metrics")
    try:
        wait_for_port("127.0.0.1", port, timeout_s=60)
    except TimeoutError:
        stop_worker(worker)
        raise AssertionError("worker did not serve /metrics:\n" + worker.log_tail()) from None
    return worker


def stop_worker(worker: Worker) -> None:
    if worker.alive():
        worker.proc.send_signal(signal.SIGTERM)
        try:
            worker.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()


def wait_for(
    worker: Worker, done: Callable[[dict[str, float]], bool], timeout_s: float, what: str
) -> dict[str, float]:
    """Poll ``/metrics`` until ``done(metrics)``; fail at once if the worker exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert worker.alive(), f"worker exited ({worker.proc.returncode}):\n{worker.log_tail()}"
        try:
            m = worker.metrics()
        except OSError:  # a busy worker may drop a scrape; the next one will do
            m = {}
        if m and done(m):
            return m
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {m}"
        time.sleep(0.3)


def read_topic(bootstrap: str, topic: str) -> list[bytes]:
    """Every value of ``topic`` (not :func:`stream.demo.read_topic`, which stops at
    ``end_offsets()``: Tansu under-reports it, see :func:`stream.broker.read_records`)."""
    return [r.value for r in read_records(bootstrap, topic)]


def labelled_ids(bootstrap: str) -> list[str]:
    return [
        e["impression_id"]
        for raw in read_topic(bootstrap, TOPIC_LABELED)
        for e in map(LabeledExample.to_dict, decode_labeled(raw))
    ]


# --- fuzzed bad input -------------------------------------------------------------------------


def _json(d: object) -> bytes:
    return json.dumps(d).encode()


def bad_records(rng: random.Random, ts_range: tuple[float, float], n_rounds: int) -> list[Bad]:
    """``n_rounds`` rounds of every kind of bad record (randomised contents), shuffled.

    Each expected reason is fixed by construction (one defect in an otherwise valid
    record, or a defect that fails before any field is read); :func:`check_generator`
    confirms it against :func:`logs.events.parse_input`.
    """
    lo, hi = ts_range

    def ts() -> float:
        return round(rng.uniform(lo, hi), 6)

    def imp(**over: object) -> dict[str, object]:
        d: dict[str, object] = {
            "impression_id": f"bad-{rng.getrandbits(48):012x}",
            "ts": ts(),
            "user_id": f"u{rng.randrange(1000)}",
            "item_id": f"i{rng.randrange(1000)}",
            "position": rng.randint(1, 3),
            "features": {"ctx_device": rng.choice(["mobile", "desktop"])},
        }
        d.update(over)
        return {k: v for k, v in d.items() if v is not _DROP}

    def junk(n: int) -> bytes:
        # bytes >= 0x80 only: never a BOM or NUL pattern, so json sees invalid UTF-8
        return bytes(rng.randrange(0x80, 0x100) for _ in range(n))

    def wrong_type() -> object:
        return rng.choice([[1, 2], {"a": 1}, True, 1.5])

    I, C = TOPIC_IMPRESSIONS, TOPIC_CLICKS  # noqa: E741  # short: one per row below
    out: list[Bad] = []
    for _ in range(n_rounds):
        field_ = rng.choice(["impression_id", "user_id", "item_id"])
        nan_lit = rng.choice(["NaN", "Infinity", "-Infinity"])
        out += [
            Bad(I, junk(rng.randint(1, 300)), "bad_json", "random_bytes"),
            Bad(I, b'{"impression_id": "\xc3\x28", "ts": 1}', "bad_json", "invalid_utf8"),
            Bad(I, rng.choice([b"", b"{", b"not json", b'{"a": }', b"{'a': 1}"]), "bad_json",
                "truncated_json"),
            Bad(I, b"[" * 30_000 + b"]" * 30_000, "bad_json", "deep_nesting"),
            Bad(I, _json(rng.choice([[1, 2, 3], 42, "imp", None, True, 1.5])), "not_an_object",
                "json_not_object"),
            Bad(I, _json(imp(**{field_: wrong_type()})), "bad_type", "id_wrong_type"),
            Bad(I, _json(imp(ts=str(ts()))), "bad_type", "ts_string"),
            Bad(I, _json(imp(position=rng.choice(["1", 1.5, [1]]))), "bad_type", "position_type"),
            Bad(I, _json(imp(features=[1, 2])), "bad_type", "features_not_object"),
            Bad(I, _json(imp(features={"f": [1]})), "bad_type", "feature_value_type"),
            Bad(I, _json(imp(**{field_: _DROP})), "missing_field", "missing_id"),
            Bad(I, _json(imp(ts=None)), "missing_field", "null_ts"),
            Bad(I, _json(imp(features={"f": "x" * 200_000})), "too_large", "huge_200kb"),
            Bad(I, _json(imp(features={"f": "x" * 5_000})), "too_large", "long_feature_value"),
            Bad(I, _json(imp(features={f"f{k}": k for k in range(300)})), "too_large",
                "too_many_features"),
            Bad(I, _json(imp(ts=math.nan)).replace(b"NaN", nan_lit.encode()), "non_finite",
                "ts_nan_literal"),
            Bad(I, _json(imp(served_score=math.inf)), "non_finite", "score_infinity"),
            Bad(I, _json(imp(features={"f": -math.inf})), "non_finite", "feature_infinity"),
            Bad(I, _json(imp()).replace(b'"ts": ', b'"ts": 1e999, "x": '), "non_finite",
                "ts_overflow"),
            Bad(I, _json(imp(ts=rng.choice([0, -5.0, 1e11, 4.2e9, 631_151_999]))),
                "bad_timestamp", "ts_out_of_range"),
            Bad(I, _json(imp(position=rng.choice([0, -1, -rng.randrange(1, 10**6), 10_001]))),
                "bad_value", "bad_position"),
            Bad(I, _json(imp(impression_id="x" * 300)), "bad_value", "id_too_long"),
            Bad(I, _json(imp(impression_id="")), "bad_value", "empty_id"),
            Bad(I, _json(imp(true_p=1.5)), "bad_value", "true_p_out_of_range"),
            Bad(I, _json(imp(features={"ts": 1.0})), "bad_value", "reserved_feature"),
            Bad(I, _json({"type": "watermark", "ts": -1}), "bad_timestamp", "bad_watermark"),
            Bad(C, junk(rng.randint(1, 50)), "bad_json", "click_random_bytes"),
            Bad(C, _json([1, 2]), "not_an_object", "click_not_object"),
            Bad(C, _json({"ts": ts()}), "missing_field", "click_missing_id"),
            Bad(C, _json({"impression_id": "z", "ts": "soon"}), "bad_type", "click_ts_string"),
            Bad(C, b'{"impression_id": "z", "ts": NaN}', "non_finite", "click_nan"),
            Bad(C, _json({"impression_id": "z", "ts": 99_999_999_999}), "bad_timestamp",
                "click_far_future"),
        ]  # fmt: skip
    rng.shuffle(out)
    return out


_DROP = object()


def check_generator(bad: list[Bad]) -> None:
    """The generator's expected reasons agree with the validator (fails fast, no broker)."""
    for b in bad:
        with pytest.raises(InvalidEvent) as info:
            parse_input(b.value, b.topic)
        assert info.value.reason == b.reason, (b.kind, b.value[:200], info.value)


def extra_field_impressions(
    rng: random.Random, ts_range: tuple[float, float], n: int
) -> list[tuple[str, bytes]]:
    """Valid impressions with unknown extra fields: ``logs.events`` ignores unknown
    top-level fields, so these are ACCEPTED and labelled (timestamps inside the log's
    range, so they move no watermark)."""
    lo, hi = ts_range
    out = []
    for k in range(n):
        iid = f"extra-{k:04d}"
        d = {
            "impression_id": iid,
            "ts": round(rng.uniform(lo, hi), 6),
            "user_id": f"u{k}",
            "item_id": f"i{k % 50}",
            "position": 1,
            "unknown_field": rng.choice([1, "x", [1, 2], {"nested": True}, None]),
            "another_one": "ignored",
        }
        out.append((iid, _json(d)))
    return out


def test_fuzzed_bad_records_are_dead_lettered_with_their_reason_and_counts_add_up(
    tmp_path: Path,
) -> None:
    rng = random.Random(20261129)
    log_path = tmp_path / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=1500, seed=11, drift_at=None), log_path)
    df = read_log_frame(log_path)
    ts_range = (float(df["ts"].min()), float(df["ts"].max()))
    bad = bad_records(rng, ts_range, n_rounds=10)
    check_generator(bad)
    extras = extra_field_impressions(rng, ts_range, 20)
    for _, value in extras:
        parse_input(value, TOPIC_IMPRESSIONS)  # accepted
    valid_ids = set(df["impression_id"]) | {iid for iid, _ in extras}

    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    worker = start_worker(broker.url, tmp_path)
    try:
        producer = KafkaProducer(bootstrap_servers=[broker.url], max_request_size=4 << 20)
        sent: dict[tuple[str, int, int], Bad] = {}

        def send(chunk: list[Bad], pause_s: float = 0.0) -> None:
            futures = []
            for b in chunk:
                key = rng.choice([None, f"k{rng.randrange(100)}".encode()])
                futures.append((b, producer.send(b.topic, key=key, value=b.value)))
                if pause_s:
                    time.sleep(pause_s)
            for b, f in futures:
                md = f.get(timeout=30)
                sent[(md.topic, md.partition, md.offset)] = b

        third = len(bad) // 3
        send(bad[:third])  # before the log
        for _, value in extras:
            producer.send(TOPIC_IMPRESSIONS, key=b"extra", value=value)
        # interleaved with the log: a thread sends while replay() publishes
        during = threading.Thread(target=send, args=(bad[third : 2 * third], 0.002))
        during.start()
        stats = replay(log_path, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S)
        during.join(timeout=60)
        send(bad[2 * third :])  # after the final watermark
        producer.flush()
        producer.close()
        assert len(sent) == len(bad)

        m = wait_for(
            worker,
            lambda m: (
                m.get("sum:streamrec_labeled_total", 0) >= len(valid_ids)
                and m.get("sum:streamrec_dead_letters_total", 0) >= len(bad)
            ),
            timeout_s=45,
            what="labels and dead letters",
        )
        time.sleep(1.0)  # anything beyond the expected counts would show up now
        m = worker.metrics()
        assert worker.alive(), worker.log_tail()

        errs = worker.errors()  # none expected: shown when an assertion below fails
        letters = [json.loads(r) for r in read_topic(broker.url, TOPIC_DEAD_LETTER)]
        # every dead letter is one of the records sent, with the expected reason and bytes
        got = {(d["topic"], d["partition"], d["offset"]): d for d in letters}
        assert len(got) == len(letters), f"a record was dead-lettered twice; {errs}"
        assert set(got) == set(sent), (set(got) ^ set(sent), errs)
        wrong = [
            (b.kind, b.reason, got[k]["reason"], got[k]["detail"])
            for k, b in sent.items()
            if got[k]["reason"] != b.reason
        ]
        assert not wrong, wrong
        # a bounded prefix of the bytes, their size and hash (never the whole payload)
        assert all(
            base64.b64decode(got[k]["raw_b64"]) == b.value[:DEAD_LETTER_PREFIX_BYTES]
            and got[k]["raw_size"] == len(b.value)
            and got[k]["raw_sha256"] == hashlib.sha256(b.value).hexdigest()
            for k, b in sent.items()
        )
        assert all(d["detail"] for d in letters)

        # the metric agrees with the topic, reason by reason
        expected = Counter(b.reason for b in bad)
        assert m["sum:streamrec_dead_letters_total"] == len(letters) == len(bad), errs
        for reason, n in expected.items():
            assert m[f'streamrec_dead_letters_total{{reason="{reason}"}}'] == n, reason

        # impressions: labelled (valid) + dead-lettered = sent
        ids = labelled_ids(broker.url)
        assert len(ids) == len(set(ids)) == len(valid_ids), (len(ids), len(set(ids)), errs)
        assert set(ids) == valid_ids, (set(ids) ^ valid_ids, errs)
        bad_impressions = sum(1 for b in bad if b.topic == TOPIC_IMPRESSIONS)
        sent_impressions = stats.impressions + len(extras) + bad_impressions
        assert len(ids) + bad_impressions == sent_impressions
        assert m["streamrec_impressions_total"] == stats.impressions + len(extras)
        assert m["sum:streamrec_labeled_total"] == len(valid_ids)
    finally:
        stop_worker(worker)
        broker.stop()


def test_null_value_records_on_the_inputs_are_dead_lettered(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    worker = start_worker(broker.url, tmp_path)
    try:
        producer = KafkaProducer(bootstrap_servers=[broker.url])
        topics = (TOPIC_IMPRESSIONS, TOPIC_CLICKS)
        futures = [producer.send(t, key=b"tombstone", value=None) for t in topics]
        sent = {(md.topic, md.partition, md.offset) for md in (f.get(30) for f in futures)}
        producer.close()
        wait_for(
            worker, lambda m: m.get("sum:streamrec_dead_letters_total", 0) >= 2, 45, "2 letters"
        )
        time.sleep(2.0)  # the dead-letter records follow the metric at once
        letters = [json.loads(r) for r in read_topic(broker.url, TOPIC_DEAD_LETTER)]
        assert worker.alive()
        assert {(d["topic"], d["partition"], d["offset"]) for d in letters} == sent
        assert all(d["raw_b64"] == "" and d["detail"] for d in letters)
        assert worker.metrics()["sum:streamrec_dead_letters_total"] == len(letters)
        assert "Crashed reason" not in worker.log_path.read_text(errors="replace")
    finally:
        stop_worker(worker)
        broker.stop()


# --- broker outage --------------------------------------------------------------------------


def test_worker_survives_a_broker_outage_and_labels_every_impression(
    tmp_path: Path, s3: S3Server
) -> None:
    """Persistent variant: Tansu on S3 storage (moto_server on loopback), so topics,
    records and the group's committed offsets survive the restart, as with a real Kafka
    broker that goes away for a while.

    The worker runs; the first half of a log is replayed (its final watermark does not
    close the last windows, so impressions are still pending in the joiner); once the
    worker is labelling, the broker is stopped with SIGTERM, stays down 10 s and comes back
    on the same port with the same storage; the second half is replayed. The worker process
    must never exit, must log that it lost and regained the broker, and every impression of
    both halves must be labelled (at least once) with the right label.
    """
    n = 3000
    full = tmp_path / "full.csv"
    # 0.5 impressions/s of event time: the log spans 6,000 s, so the first half's
    # watermark closes the windows of its first ~600 impressions and leaves the rest pending
    write_synthetic(
        SyntheticConfig(n_impressions=n, seed=5, drift_at=None, impressions_per_s=0.5), full
    )
    df = read_log_frame(full)
    half = n // 2
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    write_log(df.iloc[:half].reset_index(drop=True), first)
    write_log(df.iloc[half:].reset_index(drop=True), second)
    positives = set(df.loc[(df["click"] == 1) & (df["click_ts"] - df["ts"] <= WINDOW_S),
                           "impression_id"])  # fmt: skip

    broker = EmbeddedBroker(
        log_path=tmp_path / "tansu.log",
        storage=f"s3://{s3.bucket}/",
        env=EmbeddedBroker.s3_env(s3.endpoint),
    ).start()
    worker = start_worker(broker.url, tmp_path)
    try:
        replay(first, broker.url, progress=False, final_watermark_gap_s=0.0)
        before = wait_for(
            worker,
            lambda m: (
                m.get("sum:streamrec_labeled_total", 0) > 0
                and m.get("streamrec_scored_total", 0) > 0
            ),
            timeout_s=60,
            what="the first labels and scores",
        )
        t_down = time.monotonic()
        broker.restart(down_s=10.0)  # SIGTERM; 10 s without a broker; same port and bucket
        print(f"broker down {time.monotonic() - t_down:.1f} s")
        assert worker.alive(), worker.log_tail()
        replay(second, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S)
        m = wait_for(
            worker,
            lambda m: (
                m.get("sum:streamrec_labeled_total", 0) >= n
                and m.get("streamrec_scored_total", 0) >= n
            ),
            timeout_s=120,
            what="every impression labelled and scored after the restart",
        )
        examples = [
            e
            for raw in read_topic(broker.url, TOPIC_LABELED)
            for e in map(LabeledExample.to_dict, decode_labeled(raw))
        ]
    finally:
        stop_worker(worker)
        broker.stop()
    ids = [e["impression_id"] for e in examples]
    print(
        f"labelled before the outage {before['sum:streamrec_labeled_total']:.0f}, after "
        f"{m['sum:streamrec_labeled_total']:.0f}; labeled topic: {len(ids)} examples, "
        f"{len(set(ids))} distinct, for {n} impressions"
    )
    assert set(ids) == set(df["impression_id"])  # none missing, none invented
    assert len(ids) >= n  # at-least-once: a redelivery may repeat a label
    assert {e["impression_id"] for e in examples if e["label"] == 1} == positives
    assert m["streamrec_scored_total"] >= n
    # the worker noticed the outage and found the broker again
    log = worker.log_path.read_text(errors="replace")
    lost = log.find("Connect call failed")
    assert lost >= 0, "the worker never saw the broker go away"
    assert "Discovered coordinator" in log[lost:], "no reconnection to the group coordinator"
    assert worker.proc.returncode == 0, worker.log_tail()  # it exited only when stopped
