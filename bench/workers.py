"""Worker subprocesses for the benchmarks that drive a real ``streamrec worker``
(:mod:`bench.e2e`, :mod:`bench.serving`, :mod:`bench.soak`, :mod:`bench.topology`):
:func:`worker_processes` starts ``python -m stream.cli worker`` processes of one consumer
group and yields them once they are ready (:class:`WorkerProc`: the process, its log and its
``/metrics`` URL), and :func:`cpu_seconds` / :func:`self_cpu_seconds` read the CPU time of a
process (Linux ``/proc``) and of this one. :data:`FINAL_GAP_S` is the final watermark gap
(seconds) a replay ends with so that the workers label every impression, and
:data:`STORE_CONFIG` the small ``streamrec.toml`` of the runs that publish to a model store
(:mod:`bench.failover`, the ``stack`` integration test).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stream.broker import free_port, wait_for_port
from stream.demo import scrape
from stream.stack import proc_stat

__all__ = [
    "FINAL_GAP_S",
    "STORE_CONFIG",
    "WorkerProc",
    "cpu_seconds",
    "self_cpu_seconds",
    "worker_process",
    "worker_processes",
]

FINAL_GAP_S = 1800.0 + 60.0 + 1.0  # join window + lateness + 1: every impression labelled
#: Small hashed encoders, a 1 s index refresh and 1 s store publishes / 0.5 s polls.
STORE_CONFIG = """
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
[indexer]
refresh_s = 1.0
[store]
publish_every_s = 1.0
poll_s = 0.5
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc``); nan elsewhere."""
    fields = proc_stat(pid)
    if fields is None:
        return math.nan
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return math.nan


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)

    def check(self) -> None:
        if self.proc.poll() is not None:
            text = self.log_path.read_text(errors="replace")
            first = [ln[:400] for ln in text.splitlines() if "[ERROR]" in ln][:15]
            raise RuntimeError(
                f"the worker exited with {self.proc.returncode} (log {self.log_path}); first "
                "errors:\n" + "\n".join(first) + "\n...\n" + text[-2000:]
            )


@contextmanager
def worker_processes(
    broker: str,
    run_dir: Path,
    n: int = 1,
    torch_threads: int | None = None,
    extra_args: tuple[str, ...] = (),
    roles: tuple[str, ...] | None = None,
    role_args: Mapping[str, tuple[str, ...]] | None = None,
) -> Iterator[list[WorkerProc]]:
    """``n`` worker subprocesses of one consumer group, started together (so that one
    group join assigns them all), each yielded once it has joined (Faust logged
    ``Ready``). ``torch_threads`` sets ``OMP_NUM_THREADS`` (None: torch's default);
    ``extra_args`` are appended to ``streamrec worker``'s command line; ``roles`` (one per
    worker, overriding ``n``) adds ``--role``, and ``role_args`` more arguments to the
    workers of a role (e.g. ``{"all": ("--nice", "10")}``). Logs and data directories:
    ``worker.log``/``worker-data`` (then ``worker1.log``, ...) in ``run_dir``."""
    if roles is not None:
        n = len(roles)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if torch_threads is not None:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    workers: list[WorkerProc] = []
    try:
        for i in range(n):
            name = f"worker{i}" if i else "worker"
            port = free_port()
            log_path = run_dir / f"{name}.log"
            cmd = [sys.executable, "-m", "stream.cli", "worker", "--broker", broker,
                   "--metrics-port", str(port), "--data-dir", str(run_dir / f"{name}-data"),
                   *extra_args, *(("--role", roles[i]) if roles else ()),
                   *((role_args or {}).get(roles[i], ()) if roles else ())]  # fmt: skip
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            workers.append(WorkerProc(proc, log_path, f"http://127.0.0.1:{port}/metrics"))
        deadline = time.monotonic() + 90
        for w in workers:
            port = int(w.metrics_url.rsplit(":", 1)[1].split("/")[0])
            wait_for_port("127.0.0.1", port, timeout_s=max(1.0, deadline - time.monotonic()))
            while "Worker]: Ready" not in w.log_path.read_text(errors="replace"):
                w.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not ready in 90 s; see {w.log_path}")
                time.sleep(0.2)
        yield workers
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


@contextmanager
def worker_process(
    broker: str,
    run_dir: Path,
    torch_threads: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[WorkerProc]:
    """One worker of :func:`worker_processes` (log ``run_dir/worker.log``)."""
    with worker_processes(broker, run_dir, 1, torch_threads, extra_args) as workers:
        yield workers[0]
