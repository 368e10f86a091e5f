"""The ASGI app the server runs: every request passes here once, whatever its route.

- With API keys on (``api_keys_file``, ``auth.py``), a request to anything but the probes (/health, /live,
  /metrics: probes and scrapers carry no key) without a known ``Authorization: Bearer`` key is answered 401
  ``unauthorized`` before any other work. The client of every request (``clients.CLIENT``) is its key's label, or
  its peer address when keys are off.
- ``POST`` to a fast endpoint (``/predict``, ``/reward``): admitted or answered 503 ``overloaded`` at once
  (``Admission``), its JSON body read within ``max_body_bytes``, handed to the endpoint as bytes, its answer sent in
  one head and one body. Starlette's Request, Response and middleware would cost more per request than ranking
  400 candidates, so none of them is on this path.
- Anything else goes to Starlette (``router``): the slow routes, 404 and 405; admitted as the fast endpoints are,
  but for the probes.
- Both: a request id (the client's ``X-Request-ID`` or a new one) in the answer and in every log line, ``Connection:
  close`` while draining, one metrics observation and one access-log line (when on), and errors answered by
  ``errors.error_answer``.
- The lifespan: a feature source that cannot start is reported in one line (``cannot start: ...``) and the
  server exits, instead of with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from time import perf_counter
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from mab_service import metrics
from mab_service.clients import CLIENT
from mab_service.config import Settings
from mab_service.errors import (
    FeatureSourceError,
    MabError,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from mab_service.http.admission import ADMITTED, Admission
from mab_service.http.auth import ApiKeys
from mab_service.http.errors import Headers, error_answer
from mab_service.http.protocol import ANSWER
from mab_service.logs import REQUEST_ID, log_access, new_request_id, request_id_from
from mab_service.types import Message, Receive, Scope, Send

#: A fast endpoint: the lifespan state and the request body (JSON, within the size limit) -> status and JSON body.
Endpoint = Callable[[Any, bytes], Awaitable[tuple[int, bytes]]]


class Edge:
    """The ASGI app: API keys, fast endpoints ahead of Starlette, admission, request ids, metrics, access log, errors.

    Args:
        fast: Path -> endpoint for the POST endpoints served without Starlette.
        routes: Starlette's routes (the fast paths get a route too, so that other methods are answered 405).
        label: The ``endpoint`` label of a path in the metrics (a bounded set).
        lifespan: A factory of the context manager whose value is the state every request sees.
        settings: The service configuration.
        admission: This worker's admission and drain state, shared with its protocol and server.

    Raises:
        auth.KeysFileError: If ``settings.api_keys_file`` is set and holds no usable keys.
    """

    def __init__(
        self,
        fast: Mapping[str, Endpoint],
        routes: Sequence[BaseRoute],
        label: Callable[[str], str],
        lifespan: Callable[[], AbstractAsyncContextManager[Mapping[str, Any]]],
        settings: Settings,
        admission: Admission,
    ) -> None:
        self.fast = dict(fast)
        self.label = label
        self.lifespan = lifespan
        self.settings = settings
        self.admission = admission
        self.metrics = settings.metrics
        self.access_log = settings.access_log
        self.max_body_bytes = settings.max_body_bytes
        self.probes = admission.probes
        self.keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
        how = "send the header Authorization: Bearer <key>"
        self.no_key = error_answer(Unauthorized(f"this endpoint needs an API key: {how}"), "-", "-")
        self.unknown_key = error_answer(Unauthorized(f"the API key is not known here: {how}"), "-", "-")
        fast_routes = [Route(path, _served_ahead, methods=["POST"]) for path in self.fast]
        self.router = Starlette(
            routes=[*fast_routes, *routes],
            exception_handlers={
                MabError: _starlette_error,
                HTTPException: _starlette_error,
                Exception: _starlette_error,
            },
        )
        retry_after_s = admission.retry_after_s
        message = f"the worker holds its limit of {admission.limit} requests; retry after {retry_after_s} s"
        self.overloaded = error_answer(Overloaded(message, retry_after_s=retry_after_s), "POST", "-")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            keys = self.keys
            if keys is None:  # keys off: the one test the fast path pays
                peer = scope.get("client")
                CLIENT.set("addr:" + peer[0] if peer else "addr:")
            elif scope["path"] not in self.probes:
                authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
                client = keys.client(authorization)
                if client is None:
                    await self._unauthorized(scope, send, self.no_key if authorization is None else self.unknown_key)
                    return
                CLIENT.set(client)
            endpoint = self.fast.get(scope["path"]) if scope["method"] == "POST" else None
            if endpoint is not None:
                await self._fast(endpoint, scope, receive, send)
            else:
                await self._routed(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.router(scope, receive, send)

    async def _fast(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        started = perf_counter()
        path = scope["path"]
        content_type, content_length, request_id = _request_headers(scope["headers"])
        REQUEST_ID.set(request_id)
        admission = self.admission
        admitted = scope.get(ADMITTED)
        whole = admitted is not None  # our protocol decided on arrival, and takes the answer in one message
        if not whole:  # a server that does not decide on arrival
            admitted = admission.arrive()
        if not admitted:
            status, payload, extra = self.overloaded
            if self.metrics:
                metrics.shed.n += 1
            await asyncio.sleep(0)  # the admitted requests ready to run go first: a refusal waits one turn
            await _send_json(send, status, payload, request_id, extra, admission.draining, whole)
        else:
            try:
                extra = []
                try:
                    _check_json(content_type)
                    body = await _read_body(receive, content_length, self.max_body_bytes)
                    if body is None:
                        return  # the client went away; nobody to answer
                    status, payload = await endpoint(scope["state"], body)
                except Exception as exc:
                    status, payload, extra = error_answer(exc, "POST", path)
                await _send_json(send, status, payload, request_id, extra, admission.draining, whole)
            finally:
                admission.leave()  # answered: no longer counts against the limit
        self._record("POST", path, path, status, started, request_id, scope)

    async def _unauthorized(self, scope: Scope, send: Send, answer: tuple[int, bytes, Headers]) -> None:
        """Answer 401 a request without a known key: nothing of it is read, its admission slot (if any) is given
        back."""
        started = perf_counter()
        request_id = _request_id(scope)
        REQUEST_ID.set(request_id)
        admitted = scope.get(ADMITTED)
        status, payload, extra = answer
        try:
            await _send_json(send, status, payload, request_id, extra, self.admission.draining, admitted is not None)
        finally:
            if admitted:
                self.admission.leave()
        path = scope["path"]
        self._record(scope["method"], path, self.label(path), status, started, request_id, scope)

    async def _routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An HTTP request for Starlette: admitted (but for the probes) as the fast endpoints are."""
        started = perf_counter()
        request_id = _request_id(scope)
        REQUEST_ID.set(request_id)
        admission = self.admission
        path = scope["path"]
        admitted = scope.get(ADMITTED)
        whole = admitted is not None  # our protocol decided on arrival
        if not whole and path not in self.probes:  # a server that does not decide on arrival
            admitted = admission.arrive()
        if admitted is False:
            status, payload, extra = self.overloaded
            if self.metrics:
                metrics.shed.n += 1
            await _send_json(send, status, payload, request_id, extra, admission.draining, whole)
            self._record(scope["method"], path, self.label(path), status, started, request_id, scope)
            return
        status = 500  # if the app fails before it answers, the server answers 500
        draining = admission.draining

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", request_id)]
                if draining:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.router(scope, receive, send_with_id)
        finally:
            if admitted:
                admission.leave()
            self._record(scope["method"], path, self.label(path), status, started, request_id, scope)

    def _record(
        self, method: str, path: str, label: str, status: int, started: float, request_id: bytes, scope: Scope
    ) -> None:
        """After the answer is out: a few additions to plain numbers (metrics.py), nothing when both are off."""
        if self.metrics:
            metrics.requests.observe(label, status, perf_counter() - started)
        if self.access_log:
            log_access(method, path, status, perf_counter() - started, request_id, scope.get("client"))

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert "state" in scope, "the server must support lifespan state (uvicorn >= 0.22)"
        started = False
        await receive()  # lifespan.startup
        try:
            async with self.lifespan() as state, self._watching_keys():
                scope["state"].update(state)
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except FeatureSourceError as exc:
            # The server logs this message and exits: one clear line, no traceback.
            phase, verb = ("shutdown", "stop") if started else ("startup", "start")
            await send({"type": f"lifespan.{phase}.failed", "message": f"cannot {verb}: {exc.message}"})
            return
        except BaseException:
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    @asynccontextmanager
    async def _watching_keys(self) -> AsyncIterator[None]:
        """While the app runs, the keys file is checked for changes (once a second): no per-request cost."""
        if self.keys is None:
            yield
            return
        watch = asyncio.create_task(self.keys.watch(), name="mab-api-keys-watch")
        try:
            yield
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch


async def _send_json(
    send: Send, status: int, payload: bytes, request_id: bytes, extra: Headers, closing: bool, whole: bool
) -> None:
    """Send a JSON answer with the request id (and ``Connection: close`` if ``closing``): in one message if the
    server takes it ``whole`` (``protocol.ANSWER``: one write), else as a head and a body."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)), *extra]
    headers.append((b"x-request-id", request_id))
    if closing:
        headers.append((b"connection", b"close"))
    if whole:
        await send({"type": ANSWER, "status": status, "headers": headers, "body": payload})
    else:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _starlette_error(request: Request, exc: Exception) -> Response:
    # For an unexpected error Starlette's ServerErrorMiddleware also re-raises to the server after this answer.
    status, body, extra = error_answer(exc, request.method, request.url.path)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in extra}
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def _served_ahead(request: Request) -> Response:
    raise AssertionError("a POST to a fast endpoint is answered by the edge, ahead of Starlette")


def _request_id(scope: Scope) -> bytes:
    """The client's request id (``X-Request-ID``, if usable) or a new one."""
    request_id = next((request_id_from(v) for k, v in scope["headers"] if k == b"x-request-id"), None)
    return request_id or new_request_id()


def _request_headers(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes | None, bytes]:
    """The content type, the declared content length and the request id (the client's or a new one)."""
    content_type = b""
    content_length = None
    request_id = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            content_length = value
        elif name == b"x-request-id":
            request_id = request_id_from(value)
    return content_type, content_length, request_id or new_request_id()


def _check_json(content_type: bytes) -> None:
    if content_type.partition(b";")[0].strip().lower() != b"application/json":
        shown = content_type.decode("latin-1") or "none"
        raise UnsupportedMediaType(f"content type must be application/json (got {shown})")


async def _read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes | None:
    """The whole body, at most ``limit`` bytes; None if the client disconnected."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body must be at most {limit} bytes (Content-Length is {declared.decode()})")
    message = await receive()
    body: bytes = message.get("body", b"")
    while message.get("more_body", False) and len(body) <= limit:  # a body in several chunks
        message = await receive()
        body += message.get("body", b"")
    if message["type"] == "http.disconnect":
        return None
    if len(body) > limit:
        raise PayloadTooLarge(f"body must be at most {limit} bytes")
    return body
