"""SIGKILL a serve replica mid-load behind the serving load balancer; count the answers.

Run ``python -m bench.failover`` (about 40 s on 2 cores; needs an ``nginx`` binary, e.g.
``apt-get install nginx-light``). ``streamrec stack up --joiners 1 --serve 2`` on the
embedded broker learns from a 3,000-impression synthetic log until both replicas serve a
version with an index; then nginx runs ``deploy/serve-lb.conf`` with compose's DNS name
replaced by a static upstream of the two replicas (the proxy settings, retries included,
are the file's own), and ``CONNECTIONS`` closed-loop clients alternate ``GET /recommend``
and ``POST /score`` through it for ``LOAD_S`` seconds; ``KILL_AT_S`` seconds in, one
replica gets SIGKILL. Writes ``bench/results/failover.json``: answers by endpoint and
status, transport errors, and the answers after the kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.run import bench_cli, machine, results_path, stamp, write_report
from bench.workers import STORE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 8
LOAD_S = 12.0
KILL_AT_S = 4.0
NGINX_MAIN = """pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream serve {{
{servers}
  }}
  include {d}/lb.conf;
}}
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def _lb_conf(port: int) -> str:
    """deploy/serve-lb.conf with the static ``serve`` upstream instead of compose's DNS."""
    body = (ROOT / "deploy" / "serve-lb.conf").read_text()
    body = re.sub(r"\n\s*resolver[^;]*;|\n\s*set \$serve_upstream serve;", "", body)
    body = body.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    return body.replace("http://$serve_upstream:6066", "http://serve")


async def _load(url: str, kill: Any) -> dict[str, Any]:
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    killed = asyncio.Event()
    stop = time.monotonic() + LOAD_S

    async def client(n: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            i = n
            while time.monotonic() < stop:
                i += CONNECTIONS
                try:
                    if i % 2:
                        ctx = s.get(f"{url}/recommend?user_id=u{i % 97}&k=10")
                    else:
                        body = {"user_id": f"u{i % 97}", "item_ids": ["i1", "i2", "i3"]}
                        ctx = s.post(f"{url}/score", json=body)
                    async with ctx as r:
                        await r.read()
                        key = f"{'recommend' if i % 2 else 'score'} {r.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                (after if killed.is_set() else before)[key] += 1

    async def killer() -> None:
        await asyncio.sleep(KILL_AT_S)
        kill()
        killed.set()

    await asyncio.gather(killer(), *(client(n) for n in range(CONNECTIONS)))
    return {
        "before_kill": dict(before),
        "after_kill": dict(after),
        "transport_errors": dict(errors),
    }


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    """The run of the module doc (``quick``: the same run, already short)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise SystemExit("bench.failover needs nginx (apt-get install nginx-light)")
    d = Path(tempfile.mkdtemp(prefix="streamrec-failover-"))
    run = d / "stack"
    (d / "streamrec.toml").write_text(STORE_CONFIG)
    up = _cli("stack", "up", "--joiners", "1", "--serve", "2", "--run-dir", str(run),
              "--broker-port", "0", "--metrics-base-port", "0", "--web-base-port", "0",
              "--no-prometheus", "--config", str(d / "streamrec.toml"))  # fmt: skip
    if up.returncode != 0:
        raise RuntimeError(up.stdout + up.stderr)
    state = json.loads((run / "stack.json").read_text())
    ng: subprocess.Popen[bytes] | None = None
    try:
        serves = [w for w in state["workers"] if w["role"] == "serve"]
        log = d / "log.csv.gz"
        _cli("generate", str(log), "--impressions", "3000", "--seed", "3", "--drift-at", "-1")
        _cli("replay", str(log), "--broker", state["broker"]["url"], "--no-create-topics")
        for w in serves:  # both replicas serve a version with an index
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(w["web_url"] + "/version", timeout=2) as r:  # noqa: S310
                        if json.loads(r.read())["index_version"]:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{w['name']} serves no index")
                time.sleep(0.3)
        from stream.broker import free_port

        port = free_port()
        (d / "lb.conf").write_text(_lb_conf(port))
        servers = "\n".join(f"    server {w['web_url'].split('//')[1]};" for w in serves)
        (d / "nginx.conf").write_text(NGINX_MAIN.format(d=d, servers=servers))
        ng = subprocess.Popen([nginx, "-g", "daemon off;", "-c", str(d / "nginx.conf")])
        time.sleep(1.0)
        victim = next(p for p in state["processes"] if p["name"] == "serve-0")
        counts = asyncio.run(
            _load(f"http://127.0.0.1:{port}", lambda: os.kill(victim["pid"], signal.SIGKILL))
        )
    finally:
        if ng is not None:
            ng.terminate()
            ng.wait(timeout=10)
        _cli("stack", "down", "--run-dir", str(run))
    shutil.rmtree(d, ignore_errors=True)
    non_ok = {k: v for part in ("before_kill", "after_kill") for k, v in counts[part].items()
              if not k.endswith(" 200")}  # fmt: skip
    report: dict[str, Any] = {
        **stamp("failover", False),
        "machine": machine(),
        "setup": f"stack --joiners 1 --serve 2; nginx with deploy/serve-lb.conf (static "
        f"upstream); {CONNECTIONS} connections alternating GET /recommend and POST /score "
        f"for {LOAD_S:.0f} s; SIGKILL of serve-0 at {KILL_AT_S:.0f} s",
        **counts,
        "non_200": non_ok,
    }
    write_report(report, out := results_path(results_dir, "failover", False))
    print(json.dumps(counts), f"non-200: {non_ok or 'none'}")
    print(f"wrote {out}")
    return report


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("failover", __doc__, "the same run (about 40 s already)", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
