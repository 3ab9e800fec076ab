"""Fresh labels (the worker's default: fake negatives + FNW) through the embedded broker:
every impression reaches the trainer at once as a fake negative and its click as a
positive at click time, and the monitor judges each impression once, on its final
label."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from logs.batches import decode_labeled
from logs.events import TOPIC_LABELED, LabeledExample
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, free_port, wait_for_port
from stream.demo import read_topic, scrape
from stream.replay import replay
from stream.settings import Settings
from tests.integration.conftest import WINDOW_SCHEME_ENV

pytestmark = pytest.mark.integration

N = 1500
WINDOW_S = 120.0


def test_fake_negatives_and_click_time_positives_through_the_broker(tmp_path: Path) -> None:
    log_path = tmp_path / "log.csv"
    write_synthetic(
        SyntheticConfig(
            n_impressions=N, seed=11, drift_at=None, impressions_per_s=5.0, click_delay_mean_s=20.0
        ),
        log_path,
    )
    df = read_log_frame(log_path)
    clicked = set(df["impression_id"][(df["click"] == 1) & (df["click_ts"] - df["ts"] <= WINDOW_S)])
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    port = free_port()
    config = tmp_path / "worker.toml"
    config.write_text(f"[join]\nwindow_s = {WINDOW_S}\nlateness_s = 0.0\n")  # scheme: default
    create_worker_topics(Settings(broker=broker.url))
    env = {k: v for k, v in os.environ.items() if k != WINDOW_SCHEME_ENV}
    env.update(PYTHONUNBUFFERED="1", STREAMREC_RECOVERY_CONSISTENCY_CHECK="false")
    with open(tmp_path / "worker.log", "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker", "--config", str(config),
             "--broker", broker.url, "--metrics-port", str(port),
             "--data-dir", str(tmp_path / "data")],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, timeout_s=60)
        replay(log_path, broker.url, progress=False, final_watermark_gap_s=WINDOW_S + 61)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 120
        while True:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            m = scrape(url)
            if m.get("streamrec_scored_total", 0) >= N + len(clicked):
                break
            assert time.monotonic() < deadline, f"pipeline did not finish: {m}"
            time.sleep(0.5)
        examples = [
            e
            for raw in read_topic(broker.url, TOPIC_LABELED)
            for e in map(LabeledExample.to_dict, decode_labeled(raw))
        ]
        kinds: dict[str, list[str]] = {}
        for e in examples:
            kinds.setdefault(str(e["impression_id"]), []).append(str(e["kind"]))
        assert set(kinds) == set(df["impression_id"])
        assert all(k.count("fake_negative") == 1 for k in kinds.values())
        positives = {i for i, k in kinds.items() if "positive" in k}
        assert positives == clicked
        # positives leave the joiner at click time, not at window close
        pos = [e for e in examples if e["kind"] == "positive"]
        lag = np.array([float(e["label_ts"]) for e in pos]) - np.array(
            [float(df.set_index("impression_id").loc[e["impression_id"], "click_ts"]) for e in pos]
        )
        assert np.abs(lag).max() < 1e-6
        # the monitor judged each impression once, on its final label (not N + clicks
        # records), the last window's too: no later impression passes it, but the replay's
        # final watermark moved the joiner's event-time marks past it
        while (seen := scrape(url).get("streamrec_monitored_total", 0)) < N:
            assert time.monotonic() < deadline, f"monitor saw {seen} of {N}"
            time.sleep(0.5)
        # on final labels: every clicked impression once (the stream's own label-1 rate
        # is clicks / (N + clicks)); the gauges are set by a 1 s timer, which a busy
        # machine delays: wait for the value, a few seconds at most
        lifetime = 'streamrec_actual_ctr{segment="all",window="lifetime"}'
        want = len(clicked) / N
        settle = time.monotonic() + 10
        while not math.isclose((m := scrape(url)).get(lifetime, math.nan), want, rel_tol=1e-9):
            if time.monotonic() > settle:
                break
            time.sleep(0.5)
        assert m["streamrec_monitored_total"] == N
        assert m[lifetime] == pytest.approx(want)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()
