"""``streamrec stack up/status/down``: the compose topology as local processes."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.workers import STORE_CONFIG
from stream.demo import scrape
from stream.stack import find_prometheus, niceness, pid_alive

pytestmark = pytest.mark.integration

N_IMPRESSIONS = 3000
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def _last_assignment(log: str) -> dict[str, set[int]] | None:
    """The partitions a worker holds after its newest rebalance, from its Faust log; None
    while it has none or is rebalancing again."""
    start = log.rfind("Setting newly assigned partitions")
    if start < 0 or log.rfind("(Re-)joining group", start) > 0:
        return None
    table = log[start : log.find("for group", start)]
    return {
        m.group(1): {int(p) for p in m.group(2).split(",")}
        for m in re.finditer(r"\|\s*([\w-]+)\s*\|\s*\{([\d,\s]+)\}\s*\|", table)
    }


def wait_group_settled(logs: list[Path], partitions: int, timeout_s: float = 60) -> None:
    """Until the workers' newest assignments split the input partitions between them: a
    rebalance while events flow would move pending joins between workers."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = [_last_assignment(p.read_text(errors="replace")) for p in logs]
        if all(held):
            got = [sorted(h.get("impressions", ())) for h in held if h]
            flat = [p for ps in got for p in ps]
            if sorted(flat) == list(range(partitions)) and all(got):
                return
        assert time.monotonic() < deadline, f"consumer group did not settle: {held}"
        time.sleep(0.3)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310  # loopback only
        return json.loads(r.read())


def test_stack_up_replay_down(tmp_path: Path) -> None:
    run = tmp_path / "stack"
    up = cli("stack", "up", "--workers", "2", "--run-dir", str(run), "--broker-port", "0",
             "--metrics-base-port", "0", "--prometheus-port", "0", "--timeout", "60")  # fmt: skip
    state_file = run / "stack.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "streamrec stack down" in up.stdout
        state = json.loads(state_file.read_text())
        procs = state["processes"]
        assert [p["role"] for p in procs if p["role"] == "worker"] == ["worker", "worker"]
        assert all(pid_alive(p["pid"], p["start_time"]) for p in procs)
        urls = [w["metrics_url"] for w in state["workers"]]
        assert len(set(urls)) == 2
        for url in urls:
            assert url in up.stdout
            assert any(k.startswith("streamrec_") for k in scrape(url))

        if find_prometheus():
            prom = state["prometheus"]["url"]
            assert prom in up.stdout
            with urllib.request.urlopen(f"{prom}/-/ready", timeout=5) as r:  # noqa: S310
                assert r.status == 200
        else:
            assert state["prometheus"] is None

        # a second `up` into the same run dir is refused while the stack lives
        again = cli("stack", "up", "--run-dir", str(run), timeout=60)
        assert again.returncode != 0
        assert "already running" in again.stderr and "stack down" in again.stderr

        status = cli("stack", "status", "--run-dir", str(run), timeout=60)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("alive") == len(procs)
        assert all(u in status.stdout for u in urls)

        log = tmp_path / "log.csv.gz"
        gen = cli("generate", str(log), "--impressions", str(N_IMPRESSIONS), "--seed", "3",
                  "--drift-at", "-1")  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        wait_group_settled([run / "worker-0.log", run / "worker-1.log"], partitions=4)
        rep = cli("replay", str(log), "--broker", state["broker"]["url"], "--no-create-topics")
        assert rep.returncode == 0, rep.stderr

        deadline = time.monotonic() + 60
        while True:
            labeled = sum(scrape(u).get("sum:streamrec_labeled_total", 0.0) for u in urls)
            if labeled >= N_IMPRESSIONS:
                break
            assert time.monotonic() < deadline, f"labelled {labeled} of {N_IMPRESSIONS}"
            time.sleep(0.5)
        assert labeled == N_IMPRESSIONS
        per_worker = [scrape(u).get("sum:streamrec_labeled_total", 0.0) for u in urls]
        assert all(n > 0 for n in per_worker), per_worker  # both workers joined

        if state["prometheus"]:
            prom = state["prometheus"]["url"]
            targets = _get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
            scraped = {t["scrapeUrl"] for t in targets if t["labels"]["job"] == "streamrec"}
            assert scraped == set(urls)
            if (run / "alerts.yml").exists():
                assert _get_json(f"{prom}/api/v1/rules")["data"]["groups"]
    finally:
        down = cli("stack", "down", "--run-dir", str(run), timeout=90)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state_file.exists()
    for p in procs:
        assert not pid_alive(p["pid"], p["start_time"]), p
    assert (run / "worker-0.log").exists()  # logs are kept
    gone = cli("stack", "status", "--run-dir", str(run), timeout=60)
    assert gone.returncode != 0 and "no stack recorded" in gone.stderr


def test_stack_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = cli("stack", "up", "--run-dir", str(tmp_path), "--broker-port", str(port),
                  "--metrics-base-port", "0", "--no-prometheus", timeout=60)  # fmt: skip
    assert res.returncode != 0
    assert f"port {port}" in res.stderr and "already in use" in res.stderr
    assert not (tmp_path / "stack.json").exists()


def test_stack_down_without_a_stack_is_a_clear_error(tmp_path: Path) -> None:
    res = cli("stack", "down", "--run-dir", str(tmp_path), timeout=60)
    assert res.returncode != 0
    assert "no stack recorded" in res.stderr


def test_stack_roles_order_joiners_one_trainer_then_replicas() -> None:
    from stream.stack import StackConfig

    assert StackConfig(joiners=2, serve=2).roles() == [
        "joiner", "joiner", "trainer", "serve", "serve"]  # fmt: skip
    assert StackConfig(workers=2).roles() == ["all", "all"]
    assert StackConfig(serve=1).roles() == ["trainer", "serve"]


def test_stack_up_joiners_trainer_and_serve_replicas(tmp_path: Path) -> None:
    run = tmp_path / "stack"
    cfg = tmp_path / "streamrec.toml"
    cfg.write_text(STORE_CONFIG)
    up = cli("stack", "up", "--joiners", "1", "--serve", "1", "--run-dir", str(run),
             "--broker-port", "0", "--metrics-base-port", "0", "--web-base-port", "0",
             "--no-prometheus", "--config", str(cfg), "--timeout", "60")  # fmt: skip
    state_file = run / "stack.json"
    procs: list[dict[str, Any]] = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads(state_file.read_text())
        procs = state["processes"]
        workers = {w["name"]: w for w in state["workers"]}
        assert [(n, w["role"]) for n, w in workers.items()] == [
            ("joiner-0", "joiner"), ("trainer-0", "trainer"), ("serve-0", "serve")]  # fmt: skip
        assert workers["joiner-0"]["web_url"] is None
        # the trainer yields the shared cores to the replica (StackConfig.trainer_nice)
        pids = {p["name"]: p["pid"] for p in procs}
        assert niceness(pids["trainer-0"]) == niceness(pids["serve-0"]) + 10
        assert niceness(pids["joiner-0"]) == niceness(pids["serve-0"])
        serve = workers["serve-0"]["web_url"]
        assert f"{serve}/recommend" in up.stdout
        log = tmp_path / "log.csv.gz"
        gen = cli("generate", str(log), "--impressions", str(N_IMPRESSIONS), "--seed", "3",
                  "--drift-at", "-1")  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        rep = cli("replay", str(log), "--broker", state["broker"]["url"], "--no-create-topics")
        assert rep.returncode == 0, rep.stderr
        deadline = time.monotonic() + 90
        while True:
            try:
                version = _get_json(f"{serve}/version")
            except OSError:
                version = {}
            if version.get("index_version"):
                break
            assert time.monotonic() < deadline, (version, status_text(run))
            time.sleep(0.5)
        assert (run / "models" / f"v{version['store_version']:08d}" / "manifest.json").is_file()
        rec = _get_json(f"{serve}/recommend?user_id=u1&k=5")
        assert len(rec["items"]) == 5
        m = scrape(workers["serve-0"]["metrics_url"])
        assert m.get("streamrec_scored_total", 0) == 0 and m["streamrec_store_version"] >= 1
        assert scrape(workers["trainer-0"]["metrics_url"])["streamrec_scored_total"] > 0
    finally:
        down = cli("stack", "down", "--run-dir", str(run), timeout=90)
    assert down.returncode == 0, down.stdout + down.stderr
    for p in procs:
        assert not pid_alive(p["pid"], p["start_time"]), p


def status_text(run: Path) -> str:
    return cli("stack", "status", "--run-dir", str(run), timeout=60).stdout
