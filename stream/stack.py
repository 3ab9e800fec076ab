"""``streamrec stack``: the docker-compose topology as local processes, without Docker.

``up`` starts the embedded broker (Tansu) detached, creates the topics, starts N worker
processes (``/metrics`` on consecutive ports) and, when a ``prometheus`` binary is installed,
a Prometheus that scrapes them with the project's alert rules. Every process runs in its
own session, so it outlives the ``stack up`` command; their pids, ports and URLs go to
``RUN_DIR/stack.json``. ``down`` stops them (workers first, broker last); ``status`` tells
which are alive.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learners.util import atomic_write
from stream.broker import EmbeddedBroker, free_port

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
#: The order ``down`` stops roles in: workers first (they leave the group while the broker
#: still answers), the broker last.
STOP_ORDER = ("worker", "prometheus", "broker")


class StackError(RuntimeError):
    """The stack could not be started, or is already running."""


@dataclass(frozen=True)
class StackConfig:
    """What ``stack up`` starts. A port of 0 picks a free one (tests use that)."""

    run_dir: Path = Path("runs/stack")
    workers: int = 1
    broker_port: int = 9092
    metrics_base_port: int = 9464
    prometheus: bool | None = None  # None: when a binary is found
    prometheus_port: int = 9090
    config: str | None = None
    timeout_s: float = 90.0
    #: the role topology: ``joiners`` > 0 or ``serve`` > 0 starts that many ``joiner``
    #: workers, one ``trainer`` and ``serve`` replicas sharing the model store
    #: ``run_dir/models`` (``workers`` is then ignored); both 0: ``workers`` "all" workers
    joiners: int = 0
    serve: int = 0
    #: first port of the web servers (/recommend, /score, /version) of the trainer and
    #: the serve replicas, consecutive (0: free ports)
    web_base_port: int = 6066
    #: with serve replicas: the trainer's CPU niceness (``worker --nice``), so that the
    #: replicas sharing its cores answer first and it trains with the rest (0: equal)
    trainer_nice: int = 10

    def roles(self) -> list[str]:
        """The role of each worker process, in start order."""
        if self.joiners or self.serve:
            return ["joiner"] * self.joiners + ["trainer"] + ["serve"] * self.serve
        return ["all"] * self.workers


# ----------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the process name (stat(5)'s field 3, the
    state, is index 0); None without procfs or without the process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def niceness(pid: int) -> int | None:
    """The nice value of ``pid`` (field 19 of stat(5)); None if unknown."""
    fields = proc_stat(pid)
    return int(fields[16]) if fields is not None and len(fields) > 16 else None


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against pid reuse); None if unknown."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None  # field 22


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """True while ``pid`` runs (a zombie counts as dead) and, when ``start_time`` is given,
    is still the process that was recorded."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs: trust kill(0)
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return start_time is None or _proc_start_time(pid) == start_time


def _tail(path: str | Path, n: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _check_port_free(port: int, what: str) -> None:
    """Raise StackError if something listens on ``port``. SO_REUSEADDR as every server of
    the stack binds with it (Tansu, the metrics and web servers, Prometheus): the
    TIME-WAIT connections a ``stack down`` just left do not count as "in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            raise StackError(
                f"port {port} on {HOST} ({what}) is already in use; stop whatever holds it "
                f"(another stack? see 'streamrec stack status'), or choose another port "
                f"(0 picks a free one)"
            ) from None


def _wait(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes] | None, what: str, log: Path,
    timeout_s: float,
) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise StackError(
                f"{what} exited with code {proc.returncode} while starting; "
                f"the end of {log}:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready in {timeout_s:.0f}s; see {log}")
        time.sleep(0.2)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310  # loopback only
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def find_prometheus() -> str | None:
    """``prometheus`` on PATH, else ``/usr/bin/prometheus``; None when neither exists."""
    found = shutil.which("prometheus")
    if found:
        return found
    return "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None


def find_alert_rules() -> Path | None:
    """The project's ``monitoring/prometheus/alerts.yml`` (installed package or checkout)."""
    import monitoring

    candidates = [
        Path(monitoring.__file__).resolve().parent / "prometheus" / "alerts.yml",
        Path.cwd() / "monitoring" / "prometheus" / "alerts.yml",
    ]
    return next((p for p in candidates if p.is_file()), None)


def prometheus_config(targets: list[str], rule_files: list[str]) -> str:
    """A Prometheus config (YAML) that scrapes ``targets`` as job ``streamrec``."""
    lines = [
        "# generated by 'streamrec stack up'; rewritten on every start",
        "global:",
        "  scrape_interval: 5s",
        "  evaluation_interval: 5s",
    ]
    if rule_files:
        lines += ["rule_files:"] + [f"  - {json.dumps(f)}" for f in rule_files]
    lines += [
        "scrape_configs:",
        "  - job_name: streamrec",
        "    static_configs:",
        "      - targets: [" + ", ".join(json.dumps(t) for t in targets) + "]",
        "        labels:",
        "          stack: local",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- state


def state_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATE_FILE


def read_state(run_dir: str | Path) -> dict[str, Any] | None:
    path = state_path(run_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); remove it by hand") from None
    if not isinstance(data, dict):
        return None
    # every process entry as `up` writes it: an edited or damaged file is an error here,
    # not a KeyError deep inside `down` (which signals the pids it reads)
    procs = data.get("processes", [])
    ok = isinstance(procs, list) and all(
        isinstance(p, dict)
        and isinstance(p.get("role"), str)
        and isinstance(p.get("name"), str)
        and isinstance(p.get("pid"), int)
        and not isinstance(p.get("pid"), bool)
        and p["pid"] > 0
        for p in procs
    )
    if not ok:
        raise StackError(
            f"{path} has a damaged process list (each entry needs a role, a name and a"
            " positive pid); stop those processes and remove it by hand"
        )
    return data


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    # a unique temp name (O_EXCL): a planted file or symlink is never written through
    text = json.dumps(state, indent=2) + "\n"
    atomic_write(state_path(run_dir), lambda f: f.write(text), binary=False, fsync=False,
                 prefix=".stack.json.")  # fmt: skip


def live_processes(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in state.get("processes", []) if pid_alive(p["pid"], p.get("start_time"))]


def _record(state: dict[str, Any], run_dir: Path, role: str, name: str, pid: int,
            log: Path, **extra: Any) -> None:  # fmt: skip
    state["processes"].append(
        {"role": role, "name": name, "pid": pid, "start_time": _proc_start_time(pid),
         "log": str(log), **extra}
    )  # fmt: skip
    _write_state(run_dir, state)


# ----------------------------------------------------------------------------- up / down


def up(cfg: StackConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the stack; returns the state written to ``run_dir/stack.json``.

    Raises:
        StackError: a live stack in ``run_dir``, a port in use, a process that died or was
            not ready in time (what was started is stopped again).
    """
    if cfg.workers < 1:
        raise StackError("--workers must be >= 1")
    if cfg.joiners < 0 or cfg.serve < 0:
        raise StackError("--joiners and --serve must be >= 0")
    if not 0 <= cfg.trainer_nice <= 19:
        raise StackError(f"--trainer-nice must be in [0, 19], got {cfg.trainer_nice}")
    roles = cfg.roles()
    n_workers = len(roles)
    run = Path(cfg.run_dir).resolve()
    old = read_state(run)
    if old is not None:
        live = live_processes(old)
        if live:
            pids = ", ".join(f"{p['name']} {p['pid']}" for p in live)
            raise StackError(
                f"a stack is already running from {state_path(run)} ({pids}); "
                f"stop it with 'streamrec stack down --run-dir {cfg.run_dir}'"
            )
        state_path(run).unlink()  # a stale record: every process is gone

    prom_bin = find_prometheus() if cfg.prometheus is not False else None
    if cfg.prometheus and prom_bin is None:
        raise StackError("--prometheus: no prometheus binary on PATH or at /usr/bin/prometheus")

    # every port is checked before anything starts, so a clash leaves nothing behind
    broker_port = cfg.broker_port or free_port(HOST)
    _check_port_free(broker_port, "broker")
    if cfg.metrics_base_port:
        metrics_ports = [cfg.metrics_base_port + i for i in range(n_workers)]
    else:
        metrics_ports = []
        while len(metrics_ports) < n_workers:
            p = free_port(HOST)
            if p not in metrics_ports and p != broker_port:
                metrics_ports.append(p)
    for i, p in enumerate(metrics_ports):
        _check_port_free(p, f"worker-{i} /metrics")
    # fixed web ports for the trainer and the serve replicas (an "all" worker picks a
    # free one and prints it, as before; joiners have none)
    n_web = sum(r in ("trainer", "serve") for r in roles)
    if cfg.web_base_port:
        web_ports = [cfg.web_base_port + i for i in range(n_web)]
    else:
        web_ports = []
        while len(web_ports) < n_web:
            p = free_port(HOST)
            if p not in web_ports and p not in metrics_ports and p != broker_port:
                web_ports.append(p)
    for p in web_ports:
        _check_port_free(p, "web (/recommend)")
    prom_port = 0
    if prom_bin:
        prom_port = cfg.prometheus_port or free_port(HOST)
        _check_port_free(prom_port, "Prometheus")

    from stream.app import create_worker_topics  # heavy (faust, torch): only once the checks passed
    from stream.settings import load_settings

    settings = load_settings(cfg.config)
    run.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "run_dir": str(run),
        "started_at": time.time(),
        "broker": None,
        "workers": [],
        "prometheus": None,
        "processes": [],
    }
    try:
        # -- broker: EmbeddedBroker starts tansu in its own session; it is never stopped
        # here, so it outlives this command
        broker_log = run / "tansu.log"
        broker = EmbeddedBroker(port=broker_port, log_path=broker_log).start(cfg.timeout_s)
        assert broker.pid is not None
        state["broker"] = {"url": broker.url, "port": broker.port, "log": str(broker_log)}
        _record(state, run, "broker", "broker", broker.pid, broker_log, port=broker.port)
        created = create_worker_topics(settings.replace(broker=broker.url))
        echo(f"broker   {broker.url} (pid {broker.pid}); topics {', '.join(created)}")

        # -- workers
        # the embedded broker's ListOffsets trips Faust's RocksDB check (see Settings)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "STREAMREC_RECOVERY_CONSISTENCY_CHECK": "0"}
        procs: list[tuple[subprocess.Popen[bytes], int, Path, str]] = []
        web_iter = iter(web_ports)
        store = run / "models"  # the shared model store of the role topology
        counts: dict[str, int] = {}
        for i, (port, role) in enumerate(zip(metrics_ports, roles, strict=True)):
            if role == "all":
                name = f"worker-{i}"
            else:
                name = f"{role}-{counts.get(role, 0)}"
                counts[role] = counts.get(role, 0) + 1
            log = run / f"{name}.log"
            cmd = [sys.executable, "-m", "stream.cli", "worker", "--broker", broker.url,
                   "--metrics-port", str(port), "--metrics-host", HOST,
                   "--data-dir", str(run / name)]  # fmt: skip
            web_port = next(web_iter) if role in ("trainer", "serve") else None
            if web_port is not None:
                cmd += ["--web-port", str(web_port), "--web-host", HOST]
            if role != "all":
                cmd += ["--role", role, "--model-store", str(store)]
            if role == "trainer" and cfg.serve and cfg.trainer_nice:
                cmd += ["--nice", str(cfg.trainer_nice)]
            if cfg.config:
                cmd += ["--config", str(Path(cfg.config).resolve())]
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True,
                )  # fmt: skip
            url = f"http://{HOST}:{port}/metrics"
            web = None if web_port is None else f"http://{HOST}:{web_port}"
            state["workers"].append({"name": name, "role": role, "metrics_port": port,
                                     "metrics_url": url, "web_url": web})  # fmt: skip
            _record(state, run, "worker", name, proc.pid, log, metrics_port=port)
            procs.append((proc, port, log, name))
        webs = {w["name"]: w["web_url"] for w in state["workers"]}
        for proc, port, log, name in procs:
            url = f"http://{HOST}:{port}/metrics"
            _wait(functools.partial(_http_ok, url), proc, name, log, cfg.timeout_s)
            echo(f"{name} /metrics on {url} (pid {proc.pid}, log {log})")
            if webs.get(name):
                echo(f"{name} {webs[name]}/recommend?user_id=u1&k=10 and /version")

        # -- prometheus
        if prom_bin:
            rules = find_alert_rules()
            rule_files: list[str] = []
            if rules is not None:
                shutil.copyfile(rules, run / "alerts.yml")
                rule_files = ["alerts.yml"]
            else:
                echo("note: monitoring/prometheus/alerts.yml not found; no alert rules loaded")
            prom_cfg = run / "prometheus.yml"
            prom_cfg.write_text(prometheus_config([f"{HOST}:{p}" for p in metrics_ports],
                                                  rule_files))  # fmt: skip
            prom_log = run / "prometheus.log"
            prom_cmd = [prom_bin, f"--config.file={prom_cfg}",
                        f"--storage.tsdb.path={run / 'prometheus-data'}",
                        f"--web.listen-address={HOST}:{prom_port}",
                        "--storage.tsdb.retention.time=2d"]  # fmt: skip
            with open(prom_log, "ab") as out:
                pproc = subprocess.Popen(
                    prom_cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=run,
                )  # fmt: skip
            prom_url = f"http://{HOST}:{prom_port}"
            state["prometheus"] = {"url": prom_url, "port": prom_port, "config": str(prom_cfg)}
            _record(state, run, "prometheus", "prometheus", pproc.pid, prom_log, port=prom_port)
            _wait(lambda: _http_ok(f"{prom_url}/-/ready"), pproc, "prometheus", prom_log,
                  cfg.timeout_s)  # fmt: skip
            echo(f"prometheus UI on {prom_url} (pid {pproc.pid}, targets {prom_url}/targets)")
        elif cfg.prometheus is None:
            echo("prometheus: no binary found (apt-get install prometheus), not started")
    except BaseException:
        stop_processes(state)
        state_path(run).unlink(missing_ok=True)
        raise
    state["ready_at"] = time.time()
    _write_state(run, state)
    echo(f"stack state in {state_path(run)}; stop it with "
         f"'streamrec stack down --run-dir {cfg.run_dir}'")  # fmt: skip
    return state


def stop_processes(
    state: dict[str, Any], timeout_s: float = 20.0
) -> list[tuple[dict[str, Any], str]]:
    """SIGTERM the recorded processes role by role (workers, prometheus, broker), wait, and
    SIGKILL stragglers. Returns ``(process, outcome)`` pairs; outcome is ``"stopped"``,
    ``"killed"``, ``"not running"`` or ``"not signalled"``: a record without the process's
    start time (an old or hand-edited ``stack.json``, or no procfs) is never signalled, as
    its pid may belong to another process by now."""
    results: list[tuple[dict[str, Any], str]] = []
    procs = state.get("processes", [])
    roles = list(STOP_ORDER) + sorted({p["role"] for p in procs} - set(STOP_ORDER))
    for role in roles:
        group = [p for p in procs if p["role"] == role]
        live = []
        for p in group:
            if not p.get("start_time"):
                results.append((p, "not signalled"))
                continue
            if pid_alive(p["pid"], p.get("start_time")):
                try:
                    os.kill(p["pid"], signal.SIGTERM)
                    live.append(p)
                    continue
                except ProcessLookupError:
                    pass
            results.append((p, "not running"))
        deadline = time.monotonic() + timeout_s
        while live and time.monotonic() < deadline:
            for p in [p for p in live if not pid_alive(p["pid"], p.get("start_time"))]:
                live.remove(p)
                results.append((p, "stopped"))
            time.sleep(0.1)
        for p in live:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                results.append((p, "stopped"))
                continue
            kill_deadline = time.monotonic() + 5.0
            while pid_alive(p["pid"], p.get("start_time")) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
            results.append((p, "killed"))
    return results


def down(
    run_dir: str | Path, timeout_s: float = 20.0, echo: Callable[[str], None] = print
) -> list[tuple[dict[str, Any], str]]:
    """Stop the stack recorded in ``run_dir`` and remove its ``stack.json``."""
    state = read_state(run_dir)
    if state is None:
        raise StackError(f"no stack recorded in {state_path(run_dir)}")
    results = stop_processes(state, timeout_s=timeout_s)
    for p, outcome in results:
        hint = " (no recorded start time: check that pid by hand)" * (outcome == "not signalled")
        echo(f"{p['name']:<12} pid {p['pid']:<8} {outcome}{hint}")
    state_path(run_dir).unlink(missing_ok=True)
    echo(f"stack in {run_dir} is down (logs kept in {run_dir})")
    return results


def status(run_dir: str | Path) -> list[tuple[dict[str, Any], bool]]:
    """``(process, alive)`` for every process recorded in ``run_dir``."""
    state = read_state(run_dir)
    if state is None:
        raise StackError(f"no stack recorded in {state_path(run_dir)}")
    return [(p, pid_alive(p["pid"], p.get("start_time"))) for p in state.get("processes", [])]


def describe(state: dict[str, Any]) -> list[str]:
    """The URLs of a stack, one line each."""
    lines = []
    if state.get("broker"):
        lines.append(f"broker      {state['broker']['url']}")
    for w in state.get("workers", []):
        web = f"  {w['web_url']}/recommend?user_id=u1&k=10" if w.get("web_url") else ""
        lines.append(f"{w['name']:<11} {w['metrics_url']}{web}")
    if state.get("prometheus"):
        lines.append(f"prometheus  {state['prometheus']['url']}")
    return lines
