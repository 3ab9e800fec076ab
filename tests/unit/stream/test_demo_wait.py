"""The demo's wait for the worker gives up with the reason when the worker stands still
(every event dead-lettered, say), instead of waiting out its whole timeout; a worker that
keeps moving is waited for. A real metrics endpoint (the worker's registry, served over
HTTP) and a real child process stand in for the worker."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from monitoring.metrics import StreamrecMetrics, serve_metrics
from stream.demo import DemoError, _wait_done


@pytest.fixture
def worker() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_worker_that_dead_letters_everything_is_reported_not_waited_for(
    worker: subprocess.Popen[bytes],
) -> None:
    metrics = StreamrecMetrics()
    server, port = serve_metrics(metrics.registry)
    try:
        metrics.dead_letters.labels(reason="bad_id").inc(300)
        metrics.dead_letters.labels(reason="bad_timestamp").inc(2)
        moving = threading.Event()
        moving.set()

        def read_events() -> None:  # impressions read for 1.5 s, then nothing moves
            t_end = time.monotonic() + 1.5
            while time.monotonic() < t_end:
                metrics.impressions.inc(10)
                time.sleep(0.1)
            moving.clear()

        threading.Thread(target=read_events, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(DemoError) as err:
            _wait_done(
                f"http://127.0.0.1:{port}/metrics", 300, worker, time.monotonic() + 30,
                progress=False, stall_s=1.0,
            )  # fmt: skip
        waited = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert not moving.is_set() and 2.0 <= waited < 10.0
    msg = str(err.value)
    assert msg.startswith("the worker made no progress for ")
    assert "0 labelled and 0 scored of 300 replayed" in msg
    assert "dead letters: bad_id 300, bad_timestamp 2" in msg


def test_with_fresh_labels_the_wait_ends_once_every_impression_is_judged(
    worker: subprocess.Popen[bytes],
) -> None:
    """Fresh labels: 100 impressions make 110 labelled and scored rows (each click once
    more), and the monitor judges 100 impressions: that is done, not a lag to wait out for
    MONITOR_GRACE_S (15 s) at the end of every demo."""
    metrics = StreamrecMetrics()
    server, port = serve_metrics(metrics.registry)
    try:
        metrics.labeled.labels(label="negative").inc(100)
        metrics.labeled.labels(label="positive").inc(10)
        metrics.scored.inc(110)
        metrics.monitored.inc(100)
        t0 = time.monotonic()
        final = _wait_done(
            f"http://127.0.0.1:{port}/metrics", 100, worker, time.monotonic() + 30,
            progress=False,
        )  # fmt: skip
        waited = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert final["streamrec_monitored_total"] == 100
    assert waited < 10.0  # 1.5 s for a last gauge publication, not the 15 s grace
