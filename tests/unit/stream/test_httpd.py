"""The serving port with its doors closed (stream.httpd): the real worker app's web server
(``create_app``, role ``trainer``) on a loopback port, without a broker (the views and the
aiohttp server start on their own), hit with hostile HTTP requests over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faust.web
import pytest

from learners.calibration import PlattCalibrator
from serving.recommender import ServingConfig, ServingError
from stream.broker import free_port
from stream.httpd import parse_json_body
from stream.settings import Settings

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 6
MAX_BODY = 512 * 1024


@dataclass
class Server:
    port: int
    app: Any

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     method=method, headers=headers or {})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310  # loopback
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, endpoint: str, status: str) -> float:
        v = self.app.streamrec.metrics.registry.get_sample_value(
            "streamrec_serving_errors_total", {"endpoint": endpoint, "status": status}
        )
        return v or 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from stream.app import create_app

    port = free_port("127.0.0.1")
    settings = Settings(
        role="trainer", web_port=port, data_dir=str(tmp_path_factory.mktemp("data")),
        serving=ServingConfig(header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S,
                              max_connections=MAX_CONNECTIONS, max_body_bytes=MAX_BODY),
    )  # fmt: skip
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        app = create_app(settings)

        @app.page("/test-boom")
        class Boom(faust.web.View):  # a view with a bug
            async def get(self, request: Any) -> Any:
                raise RuntimeError("secret detail /etc/passwd")

        app.web.init_server()
        await app.web.start_server()
        holder["app"], holder["loop"] = app, asyncio.get_running_loop()
        holder["stop"] = stop = asyncio.Event()
        ready.set()
        await stop.wait()
        await app.web.stop_server()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(60), "the web server did not start"
    yield Server(port, holder["app"])
    holder["loop"].call_soon_threadsafe(holder["stop"].set)
    thread.join(10)


def test_faust_table_router_and_stats_pages_are_not_served(server: Server) -> None:
    for path in ("/table/", "/table/join-state/", "/router/", "/stats/", "/graph/"):
        status, _ = server.request("GET", path)
        assert status == 404, path


HOSTILE_BODIES = {
    "deep_nesting": b"[" * 200_000,
    "deep_objects": b'{"a":' * 100_000,
    "invalid_utf8": b'{"user_id": "\xff\xfe"}',
    "huge_int": b'{"user_id": ' + b"9" * 5000 + b"}",
    "truncated": b'{"user_id": "u1", "item_ids": [',
    "empty": b"",
    "nan_literal": b"NaN",
    "not_an_object": b'["u1", ["a"]]',
    "bad_item_ids": b'{"user_id": "u1", "item_ids": "a"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_a_hostile_score_body_is_a_400_with_a_json_reason(server: Server, name: str) -> None:
    status, body = server.request("POST", "/score", HOSTILE_BODIES[name],
                                  {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400, body[:200]
    assert "error" in json.loads(body)
    assert b"Traceback" not in body


def test_a_body_over_the_limit_is_413_whatever_it_declares(server: Server) -> None:
    big = b'{"user_id": "' + b"x" * (MAX_BODY + 10) + b'"}'
    status, _ = server.request("POST", "/score", big)
    assert status == 413
    # chunked (no Content-Length): still stopped at the limit
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 8192
        for _ in range(MAX_BODY // len(chunk) + 2):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        assert s.recv(100).startswith(b"HTTP/1.1 413")


def test_an_unhandled_exception_is_a_generic_500_without_details(server: Server) -> None:
    before = server.metric("any", "500")
    status, body = server.request("GET", "/test-boom")
    assert status == 500
    assert json.loads(body) == {"error": "internal error"}
    assert server.metric("any", "500") == before + 1


def _closed_after(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes ``sock`` (recv returns b''); fails past limit_s."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit_s} s")
    return time.monotonic() - t0


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        assert _closed_after(s, HEADER_TIMEOUT_S + 3) < HEADER_TIMEOUT_S + 2


def test_a_slow_loris_trickling_header_bytes_is_closed_at_the_header_timeout(
    server: Server,
) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-a: " + b"a" * 50
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        try:
            for byte in head:  # one byte every 50 ms: 4.5 s for the head, never finished
                s.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass  # closed by the server meanwhile
        _closed_after(s, 5)
    assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 2


def test_a_body_that_does_not_arrive_is_a_408(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        answer = s.recv(200)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - t0 < BODY_TIMEOUT_S + 2


def test_connections_over_the_cap_are_answered_503_and_closed(server: Server) -> None:
    time.sleep(HEADER_TIMEOUT_S + 0.5)  # earlier tests' connections are gone
    before = server.metric("connection", "503")
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
        assert server.metric("connection", "503") == before + 1
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert server.request("GET", "/version")[0] == 200  # slots come back


def test_a_non_finite_calibrator_is_never_served_as_nan(server: Server) -> None:
    body = json.dumps({"user_id": "u1", "item_ids": ["a", "b"]}).encode()
    status, out = server.request("POST", "/score", body)
    assert status == 200 and all(0 <= i["score"] <= 1 for i in json.loads(out)["items"])
    trainer = server.app.streamrec.trainer
    good = trainer.calibrator
    trainer.calibrator = PlattCalibrator(a=float("nan"))  # what validation keeps out
    try:
        status, out = server.request("POST", "/score", body)
    finally:
        trainer.calibrator = good
    assert status == 503
    assert "non-finite" in json.loads(out)["error"]  # strict JSON: no NaN in it


@pytest.mark.parametrize("raw", [b"[" * 10_000, b"\x80", b"1" * 4301, b"{", b"tru"])
def test_parse_json_body_raises_only_serving_error_400(raw: bytes) -> None:
    with pytest.raises(ServingError) as e:
        parse_json_body(raw)
    assert e.value.status == 400


def test_serving_limits_are_validated() -> None:
    for bad in ({"header_timeout_s": 0.0}, {"body_timeout_s": float("inf")},
                {"max_connections": 0}, {"max_body_bytes": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            ServingConfig(**bad)  # type: ignore[arg-type]
