"""A training worker publishes to the model store; a ``serve`` replica (no training) loads
each version, answers ``/recommend`` and ``/score`` from it, rejects a corrupt version and
a hostile announcement (both counted) and keeps serving through a trainer shutdown.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.e2e import FINAL_GAP_S
from bench.workers import WorkerProc, worker_processes
from logs.events import TOPIC_CONTROL
from logs.synthetic import SyntheticConfig, write_synthetic
from modelstore.store import DirectoryStore
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, strip_scheme
from stream.replay import replay
from stream.settings import Settings

pytestmark = pytest.mark.integration

CONFIG = """
[ranker]
model = "logreg"
[ranker.encoder]
num_buckets = 4096
[two_tower.user_encoder]
num_buckets = 4096
max_cat_fields = 8
max_num_fields = 0
[two_tower.item_encoder]
num_buckets = 4096
max_cat_fields = 8
max_num_fields = 4
[trainer]
batch_size = 256
[indexer]
refresh_s = 1.0
[store]
keep = 3
publish_every_s = 1.0
poll_s = 0.5
"""


def _web(w: WorkerProc) -> str:
    m = re.search(r"recommendations on (http://[\d.]+:\d+)/", w.log_path.read_text())
    assert m, w.log_path.read_text()[-2000:]
    return m.group(1)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310  # loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait(cond: Any, what: str, workers: list[WorkerProc], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        for w in workers:
            w.check()
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _announce(bootstrap: str, msg: dict[str, Any]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(TOPIC_CONTROL, key=b"model", value=json.dumps(msg).encode()).get(timeout=10)
    producer.close()


def test_serve_replica_follows_the_store_and_rejects_corrupt_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_RECOVERY_CONSISTENCY_CHECK", "false")  # Tansu: see settings
    log = tmp_path / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=3_000, seed=3, drift_at=None), log)
    cfg = tmp_path / "streamrec.toml"
    cfg.write_text(CONFIG)
    store_dir = tmp_path / "store"
    store = DirectoryStore(store_dir)
    args = ("--config", str(cfg), "--model-store", str(store_dir))
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        create_worker_topics(Settings(broker=broker.url))
        with worker_processes(broker.url, tmp_path, extra_args=args,
                              roles=("all", "serve")) as (trainer, serve):  # fmt: skip
            web = _web(serve)
            status, body = _get(f"{web}/health")
            assert status == 503 and body["store_version"] == 0  # nothing published yet
            replay(log, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S)
            workers = [trainer, serve]
            # the replica serves what the trainer published, index included
            _wait(lambda: any(store.manifest(v).meta.get("index_version")
                              for v in store.versions()), "a version with an index",
                  workers, 120)  # fmt: skip
            served = _wait(lambda: (v := _get(f"{web}/version")[1])["index_version"] and v,
                           "the replica serving a version with an index", workers)  # fmt: skip
            m = store.manifest(served["store_version"])
            assert served["digest"] == m.digest
            assert served["model_version"] == m.meta["model_version"] > 0
            status, rec = _get(f"{web}/recommend?user_id=u1&k=5")
            assert status == 200, rec
            assert len(rec["items"]) == 5 and rec["retrieval_model"] == "two_tower"
            # the trainer's candidate fusion travels with the version and serves here
            assert "fusion.pt" in m.files and m.meta["fusion_clicks"] > 0
            assert rec["fusion"] is not None and len(rec["fusion"]["weights"]) == 3
            assert rec["index_version"] >= 1 and rec["model_version"] >= m.meta["model_version"]
            mt = serve.metrics()
            assert mt["streamrec_store_version"] >= served["store_version"]
            assert mt["streamrec_store_propagation_seconds_count"] >= 1
            assert mt.get("streamrec_scored_total", 0) == 0  # it trains nothing
            # its feature follower read every replayed impression (and the clicks) from the
            # inputs outside any group: /recommend rows carry the joiners' history
            mt = _wait(lambda: (mt := serve.metrics()).get(
                "streamrec_feature_follower_events_total", 0) >= 3_000 and mt,
                "the replica's follower applying the replay", workers)  # fmt: skip
            assert mt["streamrec_feature_follower_state_bytes"] > 0
            assert "streamrec_feature_follower_staleness_seconds" in mt
            assert not any(k.startswith("streamrec_feature_follower_skipped") for k in mt)

            # a second trainer on the same store is refused at start, with the reason
            second = subprocess.run(
                [sys.executable, "-m", "stream.cli", "worker", "--broker", broker.url,
                 "--metrics-port", "0", "--data-dir", str(tmp_path / "second-data"), *args,
                 "--role", "trainer"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert second.returncode != 0
            assert "one trainer per store" in second.stderr, second.stderr[-2000:]
            assert "Traceback" not in second.stderr

            # the trainer stops: the replica keeps serving its newest version
            trainer.proc.terminate()
            trainer.proc.wait(timeout=60)
            workers = [serve]
            last = _wait(lambda: (v := _get(f"{web}/version")[1])["store_version"] == store.latest()
                         and v, "the replica on the newest version", workers)  # fmt: skip
            assert _get(f"{web}/recommend?user_id=u2&k=3")[0] == 200

            # a truncated version, announced with its true digest: rejected, counted
            good = store.path(last["store_version"])

            def copy_truncated(d: Path) -> None:
                for f in good.iterdir():
                    if f.name != "manifest.json":
                        shutil.copyfile(f, d / f.name)

            bad = store.publish(copy_truncated)
            ranker = bad.path / "ranker.pt"
            ranker.write_bytes(ranker.read_bytes()[:100])
            _announce(strip_scheme(broker.url), {"kind": "model", "version": bad.version,
                                         "path": str(bad.path), "digest": bad.digest})  # fmt: skip
            # and hostile ones: a path outside the store, a wrong digest
            _announce(strip_scheme(broker.url), {"kind": "model", "version": bad.version + 1,
                                         "path": "/etc"})  # fmt: skip
            _announce(strip_scheme(broker.url), {"kind": "model", "version": bad.version,
                                         "digest": "0" * 64})  # fmt: skip
            metric = 'streamrec_store_failures_total{reason="%s"}'
            mt = _wait(lambda: (mt := serve.metrics()).get(metric % "outside_store")
                       and mt.get(metric % "checksum") and mt, "failures counted",
                       workers)  # fmt: skip
            assert mt[metric % "checksum"] == 1
            status, v = _get(f"{web}/version")
            assert v["store_version"] == last["store_version"] and v["last_error"]
            status, rec = _get(f"{web}/recommend?user_id=u3&k=3")
            assert status == 200 and len(rec["items"]) == 3
            req = urllib.request.Request(
                f"{web}/score", data=json.dumps({"user_id": "u3", "item_ids": [
                    it["item_id"] for it in rec["items"]]}).encode(), method="POST",
            )  # fmt: skip
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310  # loopback
                scored = json.loads(r.read())
            assert [round(i["score"], 6) for i in scored["items"]] == [
                round(i["score"], 6) for i in rec["items"]]  # fmt: skip
