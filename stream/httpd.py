"""The serving port's limits: doors closed by default.

Faust serves ``/recommend``, ``/score``, ``/version`` and ``/health`` with aiohttp. Out of
the box aiohttp keeps a connection that sends nothing open for an hour (its keep-alive
timeout is 3630 s), accepts any number of connections, and a view that raises answers 500
(with a traceback when the loop runs in debug mode). :func:`harden` fixes that on a Faust
web driver before it starts:

- **header timeout**: a connection that has not sent a complete request head within
  ``header_timeout_s`` (a new connection, or an idle keep-alive one) is closed; a
  slow-loris client that trickles header bytes is closed at the same deadline (partial
  bytes do not extend it);
- **body timeout and size**: :func:`read_json_body` reads a body within ``body_timeout_s``
  (else 408) and at most ``max_body_bytes`` (else 413);
- **connection cap**: beyond ``max_connections`` open connections a new one is answered
  ``503`` at once and closed (counted by ``on_refused``);
- **no 500 with details**: an exception a view did not handle is logged once (with its
  traceback, in the log only) and answered ``{"error": "internal error"}``, status 500.

Faust's own pages (``/table/`` lists the join state, ``/router/`` the partition owners,
``/stats/``, ``/graph/``) are switched off by the app's settings (``web_*_enabled``).

>>> parse_json_body(b'{"user_id": "u1"}')
{'user_id': 'u1'}
>>> parse_json_body(b"[" * 200_000)
Traceback (most recent call last):
...
serving.requests.ServingError: the body is not valid JSON (nested too deeply)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from serving.recommender import ServingConfig, ServingError

__all__ = ["harden", "parse_json_body", "read_json_body"]

log = logging.getLogger(__name__)

#: the answer to a connection over the cap (the request is not read)
_REFUSED_BODY = b'{"error": "too many connections"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n"
    b"Connection: close\r\nRetry-After: 1\r\n\r\n" + _REFUSED_BODY
)


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body as JSON; any failure (invalid UTF-8, syntax, nesting deeper
    than the parser's recursion limit, an integer of more than 4300 digits) raises
    :class:`ServingError` 400 with a short reason, never anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServingError(400, "the body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ServingError(400, "the body is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or int digits over sys.int_info's limit
        raise ServingError(400, f"the body is not valid JSON ({str(exc)[:100]})") from None


async def read_json_body(request: Any, config: ServingConfig) -> Any:
    """The body of ``request`` (aiohttp's, as Faust's views get it) as JSON: read within
    ``config.body_timeout_s`` seconds (408 otherwise), at most ``config.max_body_bytes``
    bytes (413), then :func:`parse_json_body` (400). Raises :class:`ServingError`."""
    declared = request.content_length
    if declared is not None and declared > config.max_body_bytes:
        raise ServingError(413, f"the body is over {config.max_body_bytes} bytes")

    async def read_all() -> bytes:
        parts: list[bytes] = []
        n = 0
        while n <= config.max_body_bytes:  # stops one chunk past the limit at most
            chunk = await request.content.read(1 << 16)
            if not chunk:
                break
            parts.append(chunk)
            n += len(chunk)
        return b"".join(parts)

    try:
        raw = await asyncio.wait_for(read_all(), config.body_timeout_s)
    except TimeoutError:
        raise ServingError(408, f"the body did not arrive in {config.body_timeout_s:g} s") from None
    if len(raw) > config.max_body_bytes:
        raise ServingError(413, f"the body is over {config.max_body_bytes} bytes")
    return parse_json_body(raw)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: a 503 and close, without reading the request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSED)
        transport.close()


class _CappedServer:
    """aiohttp's protocol factory (``web.Server``) with a cap on open connections; every
    other attribute is the wrapped server's (the runner and sites use a few)."""

    def __init__(self, inner: web.Server, max_connections: int,
                 on_refused: Callable[[], None]) -> None:  # fmt: skip
        self._inner = inner
        self._max = max_connections
        self._on_refused = on_refused

    def __call__(self) -> asyncio.Protocol:
        # connections of this server that are open (aiohttp drops one once it is closed)
        if len(self._inner.connections) >= self._max:
            try:
                self._on_refused()
            except Exception:  # a metric must never break the accept loop
                log.exception("on_refused failed")
            return _Refuse()
        return self._inner()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _LimitedRunner(web.AppRunner):
    """An AppRunner whose server caps connections (see :class:`_CappedServer`)."""

    def __init__(self, app: web.Application, max_connections: int,
                 on_refused: Callable[[], None], **kwargs: Any) -> None:  # fmt: skip
        super().__init__(app, **kwargs)
        self._cap = (max_connections, on_refused)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _CappedServer(server, *self._cap)  # type: ignore[return-value]  # a proxy


def _catch_all(on_error: Callable[[], None]) -> Any:
    @web.middleware
    async def catch_all(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise  # aiohttp's own 4xx/5xx answers (404, 405, 413, ...): no details in them
        except ServingError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        except Exception:
            on_error()
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": "internal error"}, status=500)

    return catch_all


def harden(
    web_driver: Any,
    config: ServingConfig,
    on_refused: Callable[[], None] = lambda: None,
    on_error: Callable[[], None] = lambda: None,
) -> None:
    """Apply the serving port's limits (see the module doc) to a Faust aiohttp web driver
    (``app.web``) before it starts: a runner with the header timeout, the request-line and
    header-size limits and the connection cap, and a catch-all middleware.
    ``on_refused``/``on_error`` are called per refused connection / unhandled exception."""
    aio_app: web.Application = web_driver.web_app
    aio_app.middlewares.append(_catch_all(on_error))
    # Faust builds its runner in the driver's constructor (access_log=None); replaced, not
    # wrapped: the keep-alive timeout is aiohttp's only deadline for a request head
    web_driver._runner = _LimitedRunner(
        aio_app,
        config.max_connections,
        on_refused,
        access_log=None,
        keepalive_timeout=config.header_timeout_s,
        max_line_size=8190,
        max_field_size=8190,
        max_headers=64,
        lingering_time=min(10.0, config.body_timeout_s),
    )
