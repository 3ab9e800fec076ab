"""Recommend and score over HTTP: a real worker's web server under concurrent load.

Run ``python -m bench.serving`` (about 4 minutes on 2 cores) or ``--quick`` (under a
minute). Everything runs on this machine:

1. **set-up**: Tansu (memory storage), one ``python -m stream.cli worker --web-port P``
   with default settings (two-tower retrieval, DCN-v2 ranker, the index refreshed every
   5 s), and a synthetic log (``SyntheticConfig(n_impressions=60_000, n_users=10_000,
   n_items=20_000, drift_at=None)``; quick: 6,000 impressions, 2,000 items) replayed as fast
   as the producer goes.
2. **busy**: from the first ``200`` answer of ``GET /recommend`` until every impression is
   scored, a closed-loop client with ``BUSY_CONCURRENCY`` connections asks
   ``/recommend?user_id=U&k=10&ctx_device=D`` for users and devices drawn from the log's
   rows: the latency of serving while the same process joins, trains and re-indexes.
3. **idle**: the worker has nothing left to learn; ``/recommend`` at 1, 4 and 16
   concurrent connections and ``POST /score`` (50 random catalogue items) at 4, for
   ``IDLE_S`` seconds each.

For each phase: requests, answers by HTTP status, requests per second, client-side latency
(request sent to body read; p50 / p90 / p99 ms) and the server's own time for the same
requests (``timing_ms.total`` in the answer, the part inside the recommender), whose
ratio to the client latency is the cost of HTTP, aiohttp and the event loop shared with
the agents. The client is ``aiohttp`` in this process, so it shares the 2 cores with the
worker and the broker: the numbers are what one machine serving itself gets, a lower
bound for a worker with cores of its own. Writes ``bench/results/serving.json``
(``serving_quick.json``) and prints a table.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.run import bench_cli, load_note, machine, publish, stamp
from bench.run import or_dash as _ms
from bench.workers import FINAL_GAP_S, worker_process
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.broker import EmbeddedBroker, free_port
from stream.replay import replay

FULL_LOG = SyntheticConfig(
    n_impressions=60_000, n_users=10_000, n_items=20_000, drift_at=None, seed=0,
    impressions_per_s=10.0,
)  # fmt: skip
QUICK_LOG = SyntheticConfig(
    n_impressions=6_000, n_users=1_000, n_items=2_000, drift_at=None, seed=0,
    impressions_per_s=10.0,
)  # fmt: skip
BUSY_CONCURRENCY = 4
IDLE_CONCURRENCY = (1, 4, 16)
SCORE_CONCURRENCY = 4
SCORE_ITEMS = 50
FULL_IDLE_S, QUICK_IDLE_S = 20.0, 3.0
K = 10


@dataclass
class Phase:
    """What one load phase saw."""

    name: str
    endpoint: str
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)  # client side, 200 answers only
    server_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # transport errors by type
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) * 1e3
        srv = np.asarray(self.server_ms)
        n = sum(self.statuses.values())

        def q(x: np.ndarray, p: float) -> float | None:
            return float(np.percentile(x, p)) if x.size else None

        out: dict[str, Any] = {
            "phase": self.name,
            "endpoint": self.endpoint,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 2),
            "requests": n,
            "status": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": dict(self.errors),
            "requests_per_s": n / self.seconds if self.seconds else None,
            "ok_per_s": self.statuses.get(200, 0) / self.seconds if self.seconds else None,
            "p50_ms": q(lat, 50),
            "p90_ms": q(lat, 90),
            "p99_ms": q(lat, 99),
            "server_p50_ms": q(srv, 50),
            "server_p99_ms": q(srv, 99),
        }
        if out["p50_ms"] and out["server_p50_ms"]:
            out["server_share_of_p50"] = out["server_p50_ms"] / out["p50_ms"]
        return out


class Traffic:
    """Requests drawn from the log's rows (users and devices as they arrive) and its items."""

    def __init__(self, log: Path, seed: int) -> None:
        df = read_log_frame(log)
        self.users = df["user_id"].astype(str).tolist()
        self.devices = df["ctx_device"].astype(str).tolist()
        self.items = sorted(set(df["item_id"].astype(str)))
        self.rng = random.Random(seed)

    def recommend(self, web: str) -> tuple[str, str, Any]:
        i = self.rng.randrange(len(self.users))
        url = f"{web}/recommend?user_id={self.users[i]}&k={K}&ctx_device={self.devices[i]}"
        return "GET", url, None

    def score(self, web: str) -> tuple[str, str, Any]:
        i = self.rng.randrange(len(self.users))
        body = {
            "user_id": self.users[i],
            "item_ids": self.rng.sample(self.items, min(SCORE_ITEMS, len(self.items))),
            "context": {"ctx_device": self.devices[i]},
        }
        return "POST", f"{web}/score", body


async def load(
    phase: Phase,
    make: Any,
    web: str,
    *,
    seconds: float | None = None,
    until: threading.Event | None = None,
) -> Phase:
    """Closed loop: ``phase.concurrency`` connections, each sending its next request when
    the last one is answered, for ``seconds`` or until ``until`` is set."""
    deadline = time.monotonic() + seconds if seconds is not None else None
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=phase.concurrency)

    def done() -> bool:
        if until is not None and until.is_set():
            return True
        return deadline is not None and time.monotonic() >= deadline

    async def one(session: aiohttp.ClientSession) -> None:
        while not done():
            method, url, body = make(web)
            t = time.perf_counter()
            try:
                async with session.request(method, url, json=body) as r:
                    payload = await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                phase.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            dt = time.perf_counter() - t
            phase.statuses[status] += 1
            if status == 200:
                phase.latencies_s.append(dt)
                phase.server_ms.append(float(json.loads(payload)["timing_ms"]["total"]))

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(phase.concurrency)))
    phase.seconds = time.perf_counter() - t0
    return phase


async def wait_ready(web: str, traffic: Traffic, timeout_s: float) -> dict[str, Any]:
    """Poll ``/recommend`` until it answers 200 (the first index is built); that answer."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            _, url, _ = traffic.recommend(web)
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        out: dict[str, Any] = await r.json()
                        return out
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"/recommend did not answer 200 within {timeout_s:.0f} s")
            await asyncio.sleep(0.5)


def _print(p: dict[str, Any]) -> None:
    print(
        f"  {p['phase']:5s} {p['endpoint']:10s} c={p['concurrency']:<3d} "
        f"{p['requests']:6,d} req  {p['ok_per_s'] or 0:7.1f} ok/s  p50 {p['p50_ms'] or 0:7.2f} ms"
        f"  p99 {p['p99_ms'] or 0:7.2f} ms  server p50 {p['server_p50_ms'] or 0:6.2f} ms  "
        f"status {p['status']}",
        flush=True,
    )


def non_200(p: dict[str, Any]) -> dict[str, Any]:
    """A phase summary's (:meth:`Phase.summary`) answers other than 200, by status, and its
    transport errors, by kind: the table's ``non-200`` cell."""
    bad = {k: v for k, v in p["status"].items() if k != "200"}
    bad.update(p["transport_errors"])
    return bad


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    """Run the phases, write the JSON, print the table; the report."""
    cfg = QUICK_LOG if quick else FULL_LOG
    idle_s = QUICK_IDLE_S if quick else FULL_IDLE_S
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    run_dir = Path(tempfile.mkdtemp(prefix="streamrec-serving-"))
    keep = False
    phases: list[dict[str, Any]] = []
    try:
        log = run_dir / "log.csv"
        write_synthetic(cfg, log)
        traffic = Traffic(log, seed=1)
        web_port = free_port()
        web = f"http://127.0.0.1:{web_port}"
        with (
            EmbeddedBroker(log_path=run_dir / "tansu.log") as broker,
            worker_process(broker.url, run_dir, extra_args=("--web-port", str(web_port))) as w,
        ):
            replayed = threading.Event()
            scored_all = threading.Event()

            def feed() -> None:
                replay(log, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S)
                replayed.set()

            def watch() -> None:
                deadline = time.monotonic() + max(300.0, cfg.n_impressions / 50)
                while time.monotonic() < deadline:
                    if w.proc.poll() is not None:
                        break
                    if w.metrics().get("streamrec_scored_total", 0.0) >= cfg.n_impressions:
                        break
                    time.sleep(0.5)
                scored_all.set()

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            first = asyncio.run(wait_ready(web, traffic, timeout_s=180))
            print(f"first answer: index version {first['index_version']}", flush=True)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            busy = asyncio.run(
                load(
                    Phase("busy", "recommend", BUSY_CONCURRENCY),
                    traffic.recommend,
                    web,
                    until=scored_all,
                )  # fmt: skip
            )
            feeder.join()
            watcher.join()
            w.check()
            phases.append(busy.summary())
            _print(phases[-1])
            for c in IDLE_CONCURRENCY:
                ph = asyncio.run(load(Phase("idle", "recommend", c), traffic.recommend, web,
                                      seconds=idle_s))  # fmt: skip
                phases.append(ph.summary())
                _print(phases[-1])
            ph = asyncio.run(load(Phase("idle", "score", SCORE_CONCURRENCY), traffic.score, web,
                                  seconds=idle_s))  # fmt: skip
            phases.append(ph.summary())
            _print(phases[-1])
            final = w.metrics()
    except BaseException:
        keep = True
        print(f"run failed; logs kept in {run_dir}", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    notes = [
        "client (aiohttp), worker and broker share this machine's cores; the client's own "
        "CPU time is part of every latency",
        load_note(load_before),
    ]
    report: dict[str, Any] = {
        **stamp("serving", quick),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "data": f"write_synthetic(SyntheticConfig(n_impressions={cfg.n_impressions}, "
        f"n_users={cfg.n_users}, n_items={cfg.n_items}, drift_at=None, seed=0))",
        "setup": "Tansu (memory storage) + one `python -m stream.cli worker --web-port P` "
        "(default settings) + an aiohttp closed-loop client in the bench process",
        "k": K,
        "index_items": final.get("streamrec_index_items"),
        "index_version": final.get("streamrec_index_version"),
        "phases": phases,
        "notes": notes,
    }
    return publish(report, results_dir, "serving", quick, table)


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per phase."""
    lines = [
        f"Worker web server, {report['index_items'] or 0:,.0f}-item index, k={report['k']}.",
        "",
        "| phase | endpoint | connections | requests | ok/s | p50 ms | p90 ms | p99 ms | "
        "server p50 ms | server p99 ms | non-200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        bad = non_200(p)
        lines.append(
            f"| {p['phase']} | {p['endpoint']} | {p['concurrency']} | {p['requests']:,} | "
            f"{p['ok_per_s'] or 0:,.1f} | {_ms(p['p50_ms'])} | {_ms(p['p90_ms'])} | "
            f"{_ms(p['p99_ms'])} | {_ms(p['server_p50_ms'])} | {_ms(p['server_p99_ms'])} | "
            f"{bad or 'none'} |"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("serving", __doc__, "smoke sizes (< 60 s)", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
