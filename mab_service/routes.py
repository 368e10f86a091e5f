"""Endpoints: decode the body -> pipeline.recommend() -> encode the answer. No numerics here.

``/predict`` is a plain ASGI endpoint: it reads the body and writes the answer itself, without Starlette's
Request and Response objects, because per request they cost more than ranking 400 candidates. The other
endpoints are ordinary Starlette functions.
"""

from __future__ import annotations

import functools
import logging
from time import perf_counter

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mab_service import metrics, pipeline, schemas
from mab_service.config import Settings
from mab_service.errors import MabError, Overloaded, PayloadTooLarge, UnsupportedMediaType
from mab_service.logs import REQUEST_ID, log_access, new_request_id, request_id_from
from mab_service.responses import OrjsonResponse, error_body
from mab_service.state import AppState
from mab_service.types import Receive, Scope, Send

logger = logging.getLogger("mab_service")

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class PredictEndpoint:
    """``POST /predict``: rank the candidates of one request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = perf_counter()
        state: AppState = scope["state"]
        settings = state["settings"]
        content_type, content_length, request_id = _request_headers(scope["headers"])
        REQUEST_ID.set(request_id)
        ranked = 0
        try:
            _check_json(content_type)
            body = await _read_body(receive, content_length, settings.max_body_bytes)
            if body is None:
                return  # the client went away; nobody to answer
            query = schemas.decode_predict(body, settings.max_candidates)
            result = await pipeline.recommend(query, state["source"], state["top_k"])
            encoding = perf_counter()
            answer = schemas.encode_predict(query.user_id, result.ids, result.scores, result.degraded)
            status, payload = 200, orjson.dumps(answer, option=_JSON_OPTIONS)
            encoded = perf_counter()
            ranked = len(query.candidates)
        except MabError as exc:
            status, payload = exc.status_code, error_body(exc)
        except Exception:
            # Outside Starlette's error middleware: log the traceback here and answer a generic 500.
            logger.exception("unhandled error in POST /predict")
            status, payload = 500, b'{"error":"internal_error","message":"internal server error"}'
        await _send_json(send, status, payload, request_id)
        # After the answer is out: a few additions to plain numbers (metrics.py), nothing when both are off.
        if settings.metrics:
            if ranked:
                metrics.candidates.observe(ranked)
                metrics.encode_seconds.observe(encoded - encoding)
            metrics.requests.observe("/predict", status, perf_counter() - started)
        if settings.access_log:
            log_access("POST", "/predict", status, perf_counter() - started, request_id, scope.get("client"))


predict = PredictEndpoint()


async def _send_json(send: Send, status: int, payload: bytes, request_id: bytes, *extra: tuple[bytes, bytes]) -> None:
    """Send a whole JSON answer: its head, with the request id, then its body."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)), *extra]
    headers.append((b"x-request-id", request_id))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def overloaded(scope: Scope, send: Send, settings: Settings) -> None:
    """Answer ``503 overloaded`` with ``Retry-After`` at once, without reading the body (the shed path)."""
    started = perf_counter()
    request_id = _request_headers(scope["headers"])[2]
    REQUEST_ID.set(request_id)
    payload = _overloaded_body(settings.max_in_flight, settings.retry_after_s)
    status = Overloaded.status_code
    await _send_json(send, status, payload, request_id, (b"retry-after", b"%d" % settings.retry_after_s))
    if settings.metrics:
        metrics.shed.n += 1
        metrics.requests.observe("/predict", status, perf_counter() - started)
    if settings.access_log:
        log_access("POST", "/predict", status, perf_counter() - started, request_id, scope.get("client"))


@functools.lru_cache(maxsize=8)
def _overloaded_body(max_in_flight: int, retry_after_s: int) -> bytes:
    exc = Overloaded(f"the worker holds its limit of {max_in_flight} requests; retry after {retry_after_s} s")
    return error_body(exc)


async def health(request: Request) -> OrjsonResponse:
    """Readiness: 200 while this worker should get traffic; 503 while draining or while the source fails."""
    state: AppState = request.scope["state"]
    if state["lifecycle"].draining:
        return OrjsonResponse({"status": "draining"}, status_code=503)
    status = state["source"].health()
    if status.ready:
        return OrjsonResponse({"status": "ok"})
    return OrjsonResponse({"status": "unavailable", "reason": status.reason}, status_code=503)


async def live(request: Request) -> OrjsonResponse:
    """Liveness: 200 whenever the event loop answers, draining or not, whatever the feature source does."""
    return OrjsonResponse({"status": "alive"})


async def metrics_text(request: Request) -> Response:
    """Every worker's metrics in the Prometheus text format (or OpenMetrics, if the scraper asks for it)."""
    settings: Settings = request.scope["state"]["settings"]
    if not settings.metrics:
        return OrjsonResponse({"error": "not_found", "message": "metrics are off (--no-metrics)"}, status_code=404)
    body, content_type = metrics.exposition(settings.metrics_dir, request.headers.get("accept"))
    return Response(body, media_type=content_type)


async def openapi(request: Request) -> OrjsonResponse:
    return OrjsonResponse(request.scope["state"]["openapi"])


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


ROUTES = [
    Route("/predict", predict, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/live", live, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
]
#: Paths that are their own ``endpoint`` label in the metrics; any other path is counted as ``other``.
ENDPOINTS = frozenset(route.path for route in ROUTES)
