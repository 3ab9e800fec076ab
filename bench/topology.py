"""The role topology: a training worker, a separate ``serve`` replica, and the model store.

Run ``python -m bench.topology`` (about 5 minutes on 2 cores) or ``--quick`` (about a
minute). Everything runs on this machine:

1. **set-up**: Tansu (memory storage); one ``worker --role all`` (joins and trains, default
   model sizes: DCN-v2 ranker, two-tower, the index refreshed every 5 s) publishing to a
   model store every ``PUBLISH_EVERY_S`` seconds; ``REPLICAS`` ``worker --role serve`` on
   the same store (polls every 2 s, and loads at once on each ``control`` announcement); the
   synthetic log of ``bench.serving`` replayed at ``SPEEDUP`` x event time (600
   impressions/s, so training lasts about two minutes; quick: as fast as it goes).
2. **propagation**: a watcher polls the store (every 50 ms: each new version's manifest
   time) and every replica's ``/version`` (every 50 ms). Propagation = the last replica's
   first answer with the version (or a newer one) - the manifest's ``created_at`` (writing
   the snapshot -> every replica serving it; the ~50 ms poll is included). The replica's own
   ``streamrec_store_propagation_seconds`` (manifest -> swapped in) is reported beside it.
3. **busy**: until every impression is scored, closed-loop ``/recommend`` load
   (``bench.serving``'s client, ``BUSY_CONCURRENCY`` connections) alternates between the
   training worker and the first replica in ``SLICE_S`` slices, so both see the same training
   load.
4. **idle**: each at ``IDLE_CONCURRENCY`` connections for ``IDLE_S`` seconds.

The client, both workers and the broker share the machine's cores: the replica's numbers
are a lower bound for a replica with cores of its own. The training worker runs at CPU
niceness ``--trainer-nice`` (default ``StackConfig.trainer_nice``, 10, what ``streamrec
stack up --serve M`` gives its trainer; 0: the replicas' priority); ``trainer_lag`` says
whether it still kept up with the paced replay. Writes
``bench/results/topology.json`` (``topology_quick.json``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_parser, load_note, machine, publish, stamp
from bench.run import or_dash as _f
from bench.serving import FULL_LOG, QUICK_LOG, Phase, Traffic, load, non_200, wait_ready
from bench.workers import FINAL_GAP_S, WorkerProc, worker_processes
from logs.synthetic import write_synthetic
from modelstore.store import DirectoryStore, StoreError
from stream.broker import EmbeddedBroker
from stream.replay import replay
from stream.stack import StackConfig, niceness

PUBLISH_EVERY_S = 5.0
REPLICAS = 2  # serve replicas; the load goes to the first one, all are watched
SPEEDUP = 60.0  # event-time seconds per wall second (the log has 10 impressions/s)
BUSY_CONCURRENCY = 4
IDLE_CONCURRENCY = 4
#: the training worker's CPU niceness, as ``streamrec stack up --serve M`` starts it
#: (``StackConfig.trainer_nice``); ``--trainer-nice 0`` measures equal priority
TRAINER_NICE = StackConfig.trainer_nice
SLICE_S = 5.0
FULL_IDLE_S, QUICK_IDLE_S = 20.0, 4.0
POLL_S = 0.05

CONFIG = """
[store]
publish_every_s = {publish}
keep = 5
"""


def _web(w: WorkerProc, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        m = re.search(r"recommendations on (http://[\d.]+:\d+)/", w.log_path.read_text())
        if m:
            return m.group(1)
        w.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no web URL in {w.log_path}")
        time.sleep(0.2)


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310  # loopback only
            out: dict[str, Any] = json.loads(r.read())
            return out
    except (OSError, ValueError):
        return None


class Watcher(threading.Thread):
    """Records each store version's manifest time and when each replica first served it."""

    def __init__(self, store: DirectoryStore, replica_webs: list[str]) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.webs = replica_webs
        self.created: dict[int, float] = {}
        #: replica -> version -> wall time of its first answer with that version
        self.served: dict[str, dict[int, float]] = {w: {} for w in replica_webs}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for v in self.store.versions():
                if v not in self.created:
                    try:
                        self.created[v] = self.store.manifest(v).created_at
                    except StoreError:
                        pass
            for web in self.webs:
                got = _get_json(f"{web}/version")
                now = time.time()
                if got and got.get("store_version"):
                    self.served[web].setdefault(int(got["store_version"]), now)
            self.stop.wait(POLL_S)

    def propagation(self) -> list[float]:
        """Per published version: until the last replica served it (or a newer one)."""
        out = []
        for v, created in sorted(self.created.items()):
            reached = []
            for seen in self.served.values():
                times = [t for sv, t in seen.items() if sv >= v]
                if times:
                    reached.append(min(times))
            if len(reached) == len(self.served):
                out.append(max(reached) - created)
        return out


def _quantiles(x: list[float]) -> dict[str, float | None]:
    a = np.asarray(x, dtype=np.float64)
    if not a.size:
        return {"n": 0, "p50_s": None, "p90_s": None, "p99_s": None, "max_s": None}
    return {"n": int(a.size), "p50_s": float(np.percentile(a, 50)),
            "p90_s": float(np.percentile(a, 90)), "p99_s": float(np.percentile(a, 99)),
            "max_s": float(a.max())}  # fmt: skip


def main(
    quick: bool = False,
    *,
    results_dir: Path | None = None,
    trainer_nice: int = TRAINER_NICE,
    fusion: bool = True,
) -> dict[str, Any]:
    """Run the phases, write the JSON, print the table; the report. ``trainer_nice``: the
    training worker's ``--nice`` (the replicas run at the bench's own priority);
    ``fusion``: False serves the index's hits alone (``[fusion] enabled = false``)."""
    cfg = QUICK_LOG if quick else FULL_LOG
    idle_s = QUICK_IDLE_S if quick else FULL_IDLE_S
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    run_dir = Path(tempfile.mkdtemp(prefix="streamrec-topology-"))
    keep = False
    phases: list[dict[str, Any]] = []
    marks: dict[str, float] = {}  # perf_counter times: replay start / end, all scored
    try:
        log = run_dir / "log.csv"
        write_synthetic(cfg, log)
        traffic = Traffic(log, seed=1)
        store_dir = run_dir / "models"
        conf = run_dir / "streamrec.toml"
        conf.write_text(CONFIG.format(publish=PUBLISH_EVERY_S)
                        + ("" if fusion else "[fusion]\nenabled = false\n"))  # fmt: skip
        args = ("--model-store", str(store_dir), "--config", str(conf))
        with (
            EmbeddedBroker(log_path=run_dir / "tansu.log") as broker,
            worker_processes(
                broker.url,
                run_dir,
                extra_args=args,
                roles=("all",) + ("serve",) * REPLICAS,
                role_args={"all": ("--nice", str(trainer_nice))} if trainer_nice else None,
            ) as (trainer, serve, *others),  # fmt: skip
        ):
            webs = {"trainer": _web(trainer), "replica": _web(serve)}
            nice_seen = {
                "trainer": niceness(trainer.proc.pid),
                "replica": niceness(serve.proc.pid),
            }
            watcher = Watcher(DirectoryStore(store_dir),
                              [webs["replica"], *(_web(o) for o in others)])  # fmt: skip
            watcher.start()
            scored_all = threading.Event()

            def feed() -> None:
                replay(log, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S,
                       speedup=None if quick else SPEEDUP)  # fmt: skip
                marks["replay_end"] = time.perf_counter()

            def watch_scored() -> None:
                deadline = time.monotonic() + max(300.0, cfg.n_impressions / 50)
                while time.monotonic() < deadline and trainer.proc.poll() is None:
                    try:
                        scored = trainer.metrics().get("streamrec_scored_total", 0.0)
                    except OSError:  # a scrape timed out (a starved trainer): ask again
                        scored = 0.0
                    if scored >= cfg.n_impressions:
                        break
                    time.sleep(0.5)
                marks["scored_all"] = time.perf_counter()
                scored_all.set()

            feeder = threading.Thread(target=feed, daemon=True)
            marks["replay_start"] = time.perf_counter()
            feeder.start()
            asyncio.run(wait_ready(webs["trainer"], traffic, timeout_s=180))
            asyncio.run(wait_ready(webs["replica"], traffic, timeout_s=180))
            threading.Thread(target=watch_scored, daemon=True).start()
            busy = {name: Phase(f"busy {name}", "recommend", BUSY_CONCURRENCY) for name in webs}
            while not scored_all.is_set():
                for name, web in webs.items():
                    if scored_all.is_set():
                        break
                    # one slice on each side, accumulated into that side's phase
                    ph = asyncio.run(load(Phase("slice", "recommend", BUSY_CONCURRENCY),
                                          traffic.recommend, web, seconds=SLICE_S,
                                          until=scored_all))  # fmt: skip
                    b = busy[name]
                    b.latencies_s += ph.latencies_s
                    b.server_ms += ph.server_ms
                    b.statuses.update(ph.statuses)
                    b.errors.update(ph.errors)
                    b.seconds += ph.seconds
            feeder.join()
            trainer.check()
            serve.check()
            for o in others:
                o.check()
            phases += [b.summary() for b in busy.values()]
            for name, web in webs.items():
                ph = asyncio.run(load(Phase(f"idle {name}", "recommend", IDLE_CONCURRENCY),
                                      traffic.recommend, web, seconds=idle_s))  # fmt: skip
                phases.append(ph.summary())
            time.sleep(PUBLISH_EVERY_S + 3.0)  # the last version reaches the replica
            watcher.stop.set()
            watcher.join()
            replica_metrics = serve.metrics()
            trainer_metrics = trainer.metrics()
            on_disk = DirectoryStore(store_dir).versions()
            disk_bytes = sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file())
    except BaseException:
        keep = True
        print(f"run failed; logs kept in {run_dir}", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    h_sum = replica_metrics.get("streamrec_store_propagation_seconds_sum", 0.0)
    h_n = replica_metrics.get("streamrec_store_propagation_seconds_count", 0.0)
    published = trainer_metrics.get("streamrec_store_publish_seconds_count", 0.0)
    stamped = stamp("topology", quick)
    if trainer_nice != TRAINER_NICE:
        stamped["command"] += f" --trainer-nice {trainer_nice}"
    if not fusion:
        stamped["command"] += " --no-fusion"
    report: dict[str, Any] = {
        **stamped,
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "data": f"write_synthetic(SyntheticConfig(n_impressions={cfg.n_impressions}, "
        f"n_users={cfg.n_users}, n_items={cfg.n_items}, drift_at=None, seed=0))",
        "replay_speedup": None if quick else SPEEDUP,
        "trainer_nice": trainer_nice,
        "fusion": fusion,
        "niceness_seen": nice_seen,  # /proc/PID/stat of each process, once it was ready
        # the trainer keeping up with the replay (paced at SPEEDUP): all scored after it
        "trainer_lag": {
            "seconds_replay_end_to_all_scored": round(marks["scored_all"] - marks["replay_end"], 2),
            "impressions_per_s_replay_start_to_all_scored": round(
                cfg.n_impressions / (marks["scored_all"] - marks["replay_start"]), 1
            ),
        },
        "setup": "Tansu + `worker --role all --model-store S` + `worker --role serve "
        f"--model-store S` ([store] publish_every_s={PUBLISH_EVERY_S}, keep=5, poll_s=2) + "
        "an aiohttp closed-loop client in the bench process; default model sizes",
        "propagation": {
            **_quantiles(watcher.propagation()),
            "versions_published": len(watcher.created),
            "replicas": REPLICAS,
            "versions_served_by_first_replica": len(watcher.served[webs["replica"]]),
            "replica_histogram_mean_s": h_sum / h_n if h_n else None,
            "publish_mean_s": (
                trainer_metrics.get("streamrec_store_publish_seconds_sum", 0.0) / published
                if published
                else None
            ),  # fmt: skip
            "snapshot_bytes": trainer_metrics.get("streamrec_store_bytes"),
            "versions_on_disk_at_end": len(on_disk),
            "store_disk_bytes_at_end": disk_bytes,
            "replica_load_failures": replica_metrics.get("sum:streamrec_store_failures_total", 0),
        },
        "phases": phases,
        "notes": [
            "client, training worker, replica and broker share this machine's cores",
            load_note(load_before),
            "propagation = the last replica's first /version answer with that version (or a "
            "newer one) - the version's manifest created_at (50 ms polling included)",
        ],
    }
    return publish(report, results_dir, "topology", quick, table)


def table(report: dict[str, Any]) -> str:
    """Markdown: propagation, then one row per serving phase."""
    p = report["propagation"]
    lines = [
        f"Version propagation (trainer writes a snapshot -> every one of "
        f"{p.get('replicas', 1)} replicas serves it), "
        f"{p['n']} versions: p50 {_f(p['p50_s'])} s, p90 {_f(p['p90_s'])} s, p99 "
        f"{_f(p['p99_s'])} s, max {_f(p['max_s'])} s; publish {_f(p['publish_mean_s'])} s "
        f"per {(p['snapshot_bytes'] or 0) / 1e6:.0f} MB snapshot; "
        f"{p['versions_on_disk_at_end']} versions on disk at the end "
        f"({p['store_disk_bytes_at_end'] / 1e6:.0f} MB); load failures "
        f"{p['replica_load_failures']:.0f}.",
        "",
        "| phase | connections | requests | ok/s | p50 ms | p99 ms | server p50 ms | non-200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ph in report["phases"]:
        bad = non_200(ph)
        lines.append(
            f"| {ph['phase']} | {ph['concurrency']} | {ph['requests']:,} | "
            f"{ph['ok_per_s'] or 0:,.1f} | {_f(ph['p50_ms'])} | {_f(ph['p99_ms'])} | "
            f"{_f(ph['server_p50_ms'])} | {bad or 'none'} |"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser("topology", __doc__, "smoke sizes (about a minute)")
    parser.add_argument(
        "--trainer-nice",
        type=int,
        default=TRAINER_NICE,
        choices=range(20),
        metavar="N",
        help=f"the training worker's CPU niceness, 0-19 (default {TRAINER_NICE}, as "
        "`streamrec stack up --serve M`; 0: the same priority as the replicas)",
    )
    parser.add_argument(
        "--no-fusion", action="store_true",
        help="serve the index's hits alone ([fusion] enabled = false), for an A/B",
    )  # fmt: skip
    args = parser.parse_args(argv)
    main(args.quick, results_dir=args.results_dir, trainer_nice=args.trainer_nice,
         fusion=not args.no_fusion)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
