"""A fuzz campaign against the real worker process and the embedded broker (issue 19).

Over 10,000 hostile records in bulk (random bytes, invalid UTF-8, NaN/Infinity literals,
``ts`` = 1e300 and 10**400, huge integers, ids past every length limit, records at, above
and far above the 64 KiB event limit and the 1 MB record limit, arrays, missing fields,
duplicate keys, events from the future, broken envelopes), interleaved with a valid
synthetic log, valid 60 KB impressions (20 of them make a ``labeled`` batch over the 1 MB
record limit) and valid non-ASCII impressions; and hostile ``control`` records. Then the
worker is restarted on the same data directory (``control`` is re-read from offset 0).

Asserted: the worker never exits (and its restart is clean), every bad input record is
dead-lettered exactly once with the reason its construction fixes (and a bounded dead
letter), every hostile control record is rejected and counted (after the restart too),
``impressions sent = labelled + dead-lettered + pending`` with nothing pending, and every
valid impression is labelled exactly once and scored.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaProducer

from bench.hostile import HOSTILE_CONTROL, Bad, hostile_records
from logs.batches import ScoredBatch
from logs.events import (
    DEAD_LETTER_PREFIX_BYTES,
    MAX_EVENT_BYTES,
    TOPIC_CONTROL,
    TOPIC_DEAD_LETTER,
    TOPIC_IMPRESSIONS,
    TOPIC_SCORED,
    InvalidEvent,
)
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.broker import EmbeddedBroker
from stream.control import parse_control
from stream.replay import replay
from stream.services import JoinService
from stream.settings import Settings
from tests.integration.test_faults import (
    FINAL_GAP_S,
    Worker,
    labelled_ids,
    read_topic,
    start_worker,
    stop_worker,
    wait_for,
)
from tests.unit.stream.test_httpd import HOSTILE_BODIES

pytestmark = pytest.mark.integration

N_HOSTILE = 10_400
N_LOG = 1_500


def _json(d: object) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def check_reasons(bad: list[Bad], settings: Settings | None = None) -> None:
    """The constructed reasons agree with the joiner's validation under ``settings`` (the
    default worker's when None; no broker needed)."""
    js = JoinService(settings or Settings(), _NullMetrics())
    for b in bad:
        _, dls = js.handle_record(b.value, b.topic, 0, 0)
        assert [d.reason for d in dls] == [b.reason], (b.kind, b.value[:120])


def send_bad(
    producer: KafkaProducer, chunk: list[Bad], sent: dict[tuple[str, int, int], Bad]
) -> None:
    """Send ``chunk`` and record where each record landed, ``(topic, partition, offset)``
    -> its :class:`Bad` (a dead letter names that place)."""
    futures = [(b, producer.send(b.topic, value=b.value)) for b in chunk]
    for b, f in futures:
        md = f.get(timeout=60)
        sent[(md.topic, md.partition, md.offset)] = b


class _NullMetrics:
    """Metrics stand-in for :func:`check_reasons` (a real registry would do; this is
    cheaper for 10k records)."""

    def __getattr__(self, name: str) -> _NullMetrics:
        return self

    def labels(self, **kw: object) -> _NullMetrics:
        return self

    def inc(self, n: float = 1) -> None:
        pass


def valid_extras(ts_range: tuple[float, float]) -> dict[str, bytes]:
    """Valid impressions the old worker failed on: 20 of ~60 KB (their labels exceed the
    1 MB record limit together) and 20 non-ASCII ones of ~40 KB of UTF-8."""
    lo, _ = ts_range
    out: dict[str, bytes] = {}
    for k in range(20):
        iid = f"big-{k:02d}"
        out[iid] = _json({"impression_id": iid, "ts": lo + 10 + k, "user_id": f"u{k}",
                          "item_id": f"i{k}", "position": 1,
                          "features": {f"f{j}": "v" * 1000 for j in range(59)}})  # fmt: skip
    for k in range(20):
        iid = f"utf8-{k:02d}"
        d = {"impression_id": iid, "ts": lo + 20 + k, "user_id": f"ü{k}", "item_id": f"i{k}",
             "features": {f"f{j}": "é日" * 300 for j in range(20)}}  # fmt: skip
        out[iid] = json.dumps(d, ensure_ascii=False).encode()
    assert all(len(v) <= MAX_EVENT_BYTES for v in out.values())
    return out


def test_fuzz_campaign_no_worker_exit_every_bad_record_dead_lettered(tmp_path: Path) -> None:
    t_start = time.monotonic()
    rng = random.Random(19)
    log_path = tmp_path / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=N_LOG, seed=5, drift_at=None), log_path)
    df = read_log_frame(log_path)
    ts_range = (float(df["ts"].min()), float(df["ts"].max()))
    bad = hostile_records(rng, ts_range, N_HOSTILE)
    check_reasons(bad)
    extras = valid_extras(ts_range)
    controls = [raw for raw, _ in HOSTILE_CONTROL if raw is not None] * 4
    controls += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 50))) for _ in range(100)]
    for raw in controls:
        with pytest.raises(InvalidEvent):
            parse_control(raw)
    valid_ids = set(df["impression_id"]) | set(extras)

    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    worker = start_worker(broker.url, tmp_path)
    workers = [worker]
    try:
        producer = KafkaProducer(bootstrap_servers=[broker.url], max_request_size=8 << 20,
                                 linger_ms=20, batch_size=1 << 20)  # fmt: skip
        sent: dict[tuple[str, int, int], Bad] = {}

        def send(chunk: list[Bad]) -> None:
            send_bad(producer, chunk, sent)

        for raw in controls:
            producer.send(TOPIC_CONTROL, key=b"hostile", value=raw)
        half = len(bad) // 2
        send(bad[:half])
        for iid, value in extras.items():
            producer.send(TOPIC_IMPRESSIONS, key=iid.encode(), value=value)
        producer.flush()
        stats = replay(log_path, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S)
        send(bad[half:])
        producer.flush()
        producer.close()
        t_sent = time.monotonic()
        assert len(sent) == len(bad)

        m = wait_for(
            worker,
            lambda m: (
                m.get("sum:streamrec_labeled_total", 0) >= len(valid_ids)
                and m.get("sum:streamrec_dead_letters_total", 0) >= len(bad)
                and m.get("sum:streamrec_control_rejected_total", 0) >= len(controls)
            ),
            timeout_s=60,
            what="labels, dead letters and rejected control records",
        )
        t_done = time.monotonic()
        errs = worker.errors()
        letters = [json.loads(r) for r in read_topic(broker.url, TOPIC_DEAD_LETTER)]
        got = {(d["topic"], d["partition"], d["offset"]): d for d in letters}
        assert len(got) == len(letters), f"a record was dead-lettered twice; {errs}"
        assert set(got) == set(sent), (len(set(got) ^ set(sent)), errs)
        wrong = Counter((b.kind, got[k]["reason"]) for k, b in sent.items()
                        if got[k]["reason"] != b.reason)  # fmt: skip
        assert not wrong, wrong
        assert all(got[k]["raw_size"] == len(b.value)
                   and got[k]["raw_sha256"] == hashlib.sha256(b.value).hexdigest()
                   for k, b in sent.items())  # fmt: skip
        biggest = max(len(r) for r in read_topic(broker.url, TOPIC_DEAD_LETTER))
        assert biggest < 2 * DEAD_LETTER_PREFIX_BYTES + 1000, biggest

        # counts add up: impressions sent = labelled + dead-lettered + pending (none left)
        ids = labelled_ids(broker.url)
        assert len(ids) == len(set(ids)) == len(valid_ids), (len(ids), len(set(ids)), errs)
        assert set(ids) == valid_ids
        bad_impressions = sum(1 for b in bad if b.topic == TOPIC_IMPRESSIONS)
        m = wait_for(
            worker,
            lambda m: m.get("streamrec_pending_impressions", 1) == 0,
            timeout_s=15,
            what="no pending impression",
        )  # the gauge is per second
        sent_impressions = stats.impressions + len(extras) + bad_impressions
        assert len(ids) + bad_impressions + m["streamrec_pending_impressions"] == sent_impressions
        assert m["sum:streamrec_dead_letters_total"] == len(bad)
        for reason, n in Counter(b.reason for b in bad).items():
            assert m[f'streamrec_dead_letters_total{{reason="{reason}"}}'] == n, reason
        assert m["sum:streamrec_control_rejected_total"] == len(controls)
        assert m.get("sum:streamrec_stage_errors_total", 0) == 0, errs
        # every valid impression is scored by the trainer
        wait_for(worker, lambda m: m.get("streamrec_scored_total", 0) >= len(valid_ids),
                 timeout_s=30, what="scores")  # fmt: skip
        scored = {i for raw in read_topic(broker.url, TOPIC_SCORED)
                  for i in ScoredBatch.decode(raw).impression_ids}  # fmt: skip
        assert scored >= valid_ids

        # hostile HTTP on the worker's serving port: 4xx with a reason, never a 500
        n_http = hostile_http(worker, rng)
        assert worker.alive()
        assert worker.metrics().get("sum:streamrec_stage_errors_total", 0) == 0, worker.errors()

        # a restart re-reads every hostile control record from offset 0 and stays up
        stop_worker(worker)
        assert worker.proc.returncode == 0, worker.log_tail()
        worker = start_worker(broker.url, tmp_path)
        workers.append(worker)
        m = wait_for(worker,
                     lambda m: m.get("sum:streamrec_control_rejected_total", 0) >= len(controls),
                     timeout_s=30, what="control re-read after the restart")  # fmt: skip
        time.sleep(1.0)
        m = worker.metrics()
        assert worker.alive() and m["streamrec_worker_starts"] == 2
        assert m["streamrec_unclean_restarts"] == 0
        print(f"fuzz campaign: {len(bad)} hostile input records + {len(controls)} hostile"
              f" control records, {stats.impressions} log impressions + {len(extras)} large"
              f" valid ones, {n_http} hostile HTTP requests;"
              f" sent in {t_sent - t_start:.1f} s, all handled"
              f" {t_done - t_sent:.1f} s later; {len(letters)} dead letters, largest"
              f" {biggest} bytes; total {time.monotonic() - t_start:.1f} s")  # fmt: skip
    finally:
        for w in workers:
            stop_worker(w)
        broker.stop()


def hostile_http(worker: Worker, rng: random.Random) -> int:
    """Hostile requests to the worker's /score, /recommend and Faust's own pages, and raw
    junk on its port; every answer is a 4xx (a JSON reason from the views) or a closed
    connection, never a 5xx. Returns how many were sent."""
    head = worker.log_path.read_text(errors="replace")[:10_000]  # printed at start
    found = re.search(r"recommendations on (http://[0-9.]+:[0-9]+)/recommend", head)
    assert found, worker.log_tail()
    web = found.group(1)
    host, port = web[len("http://") :].split(":")
    n = 0

    def call(method: str, path: str, body: bytes | None = None) -> int:
        req = urllib.request.Request(web + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:  # noqa: S310  # loopback
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    for _ in range(3):
        for name, body in HOSTILE_BODIES.items():
            assert 400 <= call("POST", "/score", body) < 500, name
            n += 1
    for path in ("/table/", "/table/join-state/", "/router/", "/stats/", "/graph/",
                 "/recommend?user_id=u1&k=" + "9" * 5000, "/recommend?k=-1",
                 "/recommend?user_id=" + "x" * 7000, "/recommend?user_id=u1&ctx_" + "a" * 300
                 + "=1", "/score"):  # fmt: skip
        assert 400 <= call("GET", path) < 500, path
        n += 1
    for _ in range(20):  # raw junk: aiohttp's parser answers 400 or drops it, never 5xx
        with socket.create_connection((host, int(port)), timeout=15) as sock:
            sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000)))
                         + b"\r\n\r\n")  # fmt: skip
            answer = sock.recv(64)
            assert not answer.startswith(b"HTTP/1.1 5"), answer
        n += 1
    return n
