"""A worker killed with SIGKILL in the middle of a replay loses no impression.

The real worker process against the embedded broker (Tansu): the replay runs in the
background at a fixed event-time speed-up, the worker is killed once it has consumed about
a third of the log, and a new worker process is started on the same data directory. After
the replay ends, every impression of the log must be on ``labeled`` with its correct
label (positive iff a click came inside the window); duplicates (labels sent but not yet
committed when the process died) are counted and must stay a small share of the log.
Both table stores are exercised: RocksDB (restored from local files plus the changelog
tail) and memory (restored from the whole changelog).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from logs.batches import ScoredBatch, decode_labeled
from logs.events import TOPIC_LABELED, TOPIC_SCORED, LabeledExample
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, free_port, wait_for_port
from stream.demo import read_topic, scrape
from stream.replay import replay
from stream.settings import Settings

pytestmark = pytest.mark.integration

N_IMPRESSIONS = 10_000
#: a one-minute window over a 200 s (event time) log: labels flow all through the replay,
#: so the kill lands among pending impressions, queued labels and uncommitted offsets
WINDOW_S = 60.0


def start_worker(broker: str, port: int, data_dir: Path, store: str, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "STREAMREC_TABLE_STORE": store,
        "STREAMREC_RECOVERY_CONSISTENCY_CHECK": "false",  # Tansu's ListOffsets: see settings
    }
    config = data_dir.parent / "worker.toml"
    config.write_text(f"features = true\n[join]\nwindow_s = {WINDOW_S}\nlateness_s = 10.0\n")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker", "--broker", broker,
             "--metrics-port", str(port), "--data-dir", str(data_dir),
             "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def labeled(bootstrap: str) -> list[dict[str, object]]:
    return [
        e
        for raw in read_topic(bootstrap, TOPIC_LABELED)
        for e in map(LabeledExample.to_dict, decode_labeled(raw))
    ]


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_sigkill_mid_replay_loses_no_impression(tmp_path: Path, store: str) -> None:
    log_path = tmp_path / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=N_IMPRESSIONS, seed=11, drift_at=None), log_path)
    df = read_log_frame(log_path)
    in_window = (df["click"] == 1) & (df["click_ts"] - df["ts"] <= WINDOW_S)
    truth = dict(zip(df["impression_id"], in_window.astype(int), strict=True))
    data_dir = tmp_path / "data"
    worker_log = tmp_path / "worker.log"
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    workers: list[subprocess.Popen] = []
    try:
        settings = Settings(broker=broker.url, data_dir=str(data_dir))
        create_worker_topics(settings)
        port = free_port()
        workers.append(start_worker(broker.url, port, data_dir, store, worker_log))
        wait_for_port("127.0.0.1", port, timeout_s=60)
        # 10k impressions at 50/s of event time = 200 s; at x10 the replay takes ~20 s
        done: dict[str, object] = {}
        replayer = threading.Thread(
            target=lambda: done.update(stats=replay(
                log_path, broker.url, speedup=10.0, progress=False,
                final_watermark_gap_s=WINDOW_S + 11,
            )),
            daemon=True,
        )  # fmt: skip
        replayer.start()
        deadline = time.monotonic() + 60
        while True:  # kill once labels flow (the slowest partition holds them back)
            m = scrape(f"http://127.0.0.1:{port}/metrics")
            first_labels = m.get("sum:streamrec_labeled_total", 0)
            if first_labels >= 500 or m.get("streamrec_impressions_total", 0) > 0.8 * N_IMPRESSIONS:
                break
            assert time.monotonic() < deadline, f"the worker labelled nothing: {m}"
            time.sleep(0.2)
        os.kill(workers[0].pid, signal.SIGKILL)
        assert workers[0].wait(timeout=10) == -signal.SIGKILL
        assert replayer.is_alive(), "the kill must happen mid-replay"
        port2 = free_port()
        workers.append(start_worker(broker.url, port2, data_dir, store, worker_log))
        wait_for_port("127.0.0.1", port2, timeout_s=60)
        replayer.join(timeout=120)
        assert "stats" in done, "replay did not finish"

        deadline = time.monotonic() + 180
        while True:
            assert workers[1].poll() is None, worker_log.read_text()[-3000:]
            examples = labeled(broker.url)
            if {e["impression_id"] for e in examples} >= truth.keys():
                break
            if time.monotonic() >= deadline:  # say which, and what the worker restored
                missing = sorted(truth.keys() - {e["impression_id"] for e in examples})
                restores = [ln for ln in worker_log.read_text().splitlines()
                            if "restored" in ln or "Joined group" in ln]  # fmt: skip
                raise AssertionError(f"{len(missing)} impressions never labelled, e.g."
                                     f" {missing[:3]}; worker log: {restores[-10:]}")  # fmt: skip
            time.sleep(1.0)
        text = worker_log.read_text()
        # the kill came after labels had started to flow, and the restarted worker rebuilt
        # pending impressions from the table
        assert first_labels > 0
        assert "restored" in text, text[-3000:]
        labels: dict[str, set[int]] = {}
        for e in examples:
            labels.setdefault(str(e["impression_id"]), set()).add(int(e["label"]))  # type: ignore[call-overload]
        wrong = {i: ls for i, ls in labels.items() if ls != {truth[i]}}
        assert not wrong, (
            f"{len(wrong)} impressions with a wrong label, e.g. {list(wrong.items())[:5]}"
        )
        # the feature stage's state survives the kill too: "times this user saw this item
        # before" (user-keyed partitions make it exact) equals the log's count on every label
        seen_before = read_log_frame(log_path).sort_values("ts", kind="stable")
        seen_before = dict(zip(seen_before["impression_id"], seen_before.groupby(
            ["user_id", "item_id"]).cumcount(), strict=True))  # fmt: skip
        bad_hist = [e["impression_id"] for e in examples
                    if round(math.expm1(e["features"]["hist_ui_n"]))  # type: ignore[index]
                    != seen_before[e["impression_id"]]]  # fmt: skip
        assert not bad_hist, f"{len(bad_hist)} labels with a wrong hist_ui_n, e.g. {bad_hist[:5]}"
        duplicates = len(examples) - len(labels)
        print(f"store={store}: {len(examples)} labels for {len(truth)} impressions, "
              f"{duplicates} duplicates")  # fmt: skip
        assert duplicates <= N_IMPRESSIONS // 4
        # the trainer scores every impression too (at least once)
        deadline = time.monotonic() + 60
        while True:
            scored = {i for raw in read_topic(broker.url, TOPIC_SCORED)
                      for i in ScoredBatch.decode(raw).impression_ids}  # fmt: skip
            if scored >= truth.keys():
                break
            assert time.monotonic() < deadline, f"{len(truth.keys() - scored)} never scored"
            time.sleep(1.0)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                try:
                    w.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    w.kill()
        broker.stop()
