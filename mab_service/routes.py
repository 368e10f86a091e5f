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

from mab_service import dashboard, metrics, pipeline, schemas
from mab_service.config import Settings
from mab_service.errors import (
    LearningOff,
    MabError,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from mab_service.learning.loop import Loop
from mab_service.logs import REQUEST_ID, log_access, new_request_id, request_id_from
from mab_service.responses import OrjsonResponse, error_body
from mab_service.state import AppState
from mab_service.types import Receive, Scope, Send

logger = logging.getLogger("mab_service")

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
MAX_TOP_ARMS = 1000


class JsonEndpoint:
    """A plain ASGI endpoint for a JSON POST: read the body, ``answer`` it, send the answer, count it.

    The request id, the error mapping, the metrics and the access log are here, once for every such endpoint.
    """

    path = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = perf_counter()
        state: AppState = scope["state"]
        settings = state["settings"]
        content_type, content_length, request_id = _request_headers(scope["headers"])
        REQUEST_ID.set(request_id)
        try:
            _check_json(content_type)
            body = await _read_body(receive, content_length, settings.max_body_bytes)
            if body is None:
                return  # the client went away; nobody to answer
            status, payload = await self.answer(state, body)
        except MabError as exc:
            status, payload = exc.status_code, error_body(exc)
        except Exception:
            # Outside Starlette's error middleware: log the traceback here and answer a generic 500.
            logger.exception("unhandled error in POST %s", self.path)
            status, payload = 500, b'{"error":"internal_error","message":"internal server error"}'
        await _send_json(send, status, payload, request_id)
        # After the answer is out: a few additions to plain numbers (metrics.py), nothing when both are off.
        if settings.metrics:
            metrics.requests.observe(self.path, status, perf_counter() - started)
        if settings.access_log:
            log_access("POST", self.path, status, perf_counter() - started, request_id, scope.get("client"))

    async def answer(self, state: AppState, body: bytes) -> tuple[int, bytes]:
        raise NotImplementedError


class PredictEndpoint(JsonEndpoint):
    """``POST /predict``: rank the candidates of one request; with the loop on, hold the answer as an event."""

    path = "/predict"

    async def answer(self, state: AppState, body: bytes) -> tuple[int, bytes]:
        settings = state["settings"]
        query = schemas.decode_predict(body, settings.max_candidates)
        loop = state["loop"]
        seed = query.seed
        if loop is not None and seed is None:
            seed = loop.new_seed()  # every answer can be drawn again from the decision log
        result = await pipeline.recommend(query, state["source"], state["top_k"], seed)
        event_id = None
        if loop is not None:
            features = result.features
            event_id = loop.answered(
                query.event_id or loop.new_event_id(),
                query.event_id is not None,
                query.user_id,
                body,
                query.candidates,
                features.alpha,
                features.beta,
                features.rows,
                result.ranking,
                result.ids,
                seed,  # type: ignore[arg-type]  # drawn above when the request had none
                query.top_k,
            )
        encoding = perf_counter()
        answer = schemas.encode_predict(query.user_id, result.ids, result.scores, result.degraded, event_id)
        payload = orjson.dumps(answer, option=_JSON_OPTIONS)
        if settings.metrics:
            metrics.candidates.observe(len(query.candidates))
            metrics.encode_seconds.observe(perf_counter() - encoding)
        return 200, payload


class RewardEndpoint(JsonEndpoint):
    """``POST /reward``: credit an arm an answer returned; 202 once the reward is on disk, 200 if a duplicate."""

    path = "/reward"

    async def answer(self, state: AppState, body: bytes) -> tuple[int, bytes]:
        loop = state["loop"]
        if loop is None:
            raise LearningOff("the learning loop is off (--no-learning): rewards are not taken")
        query = schemas.decode_reward(body)
        if await loop.reward(query.event_id, query.id, query.reward):
            return 202, b'{"status":"accepted"}'
        return 200, b'{"status":"duplicate"}'


predict = PredictEndpoint()
reward = RewardEndpoint()


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
        metrics.requests.observe(scope["path"], status, perf_counter() - started)
    if settings.access_log:
        log_access("POST", scope["path"], status, perf_counter() - started, request_id, scope.get("client"))


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


async def arm(request: Request) -> OrjsonResponse:
    """``GET /arms/{id}``: the arm's posterior and counts as this node sees it now."""
    state: AppState = request.scope["state"]
    arm_id = request.path_params["id"]
    loop = state["loop"]
    found = None if loop is None else loop.arm(arm_id)
    if found is None or (loop is not None and not loop.apply_counts):
        # Not counted yet, or a store that computes the posteriors itself: ask the source.
        features = await state["source"].fetch([arm_id])
        if features.known == 0 and found is None:
            return OrjsonResponse(
                {"error": "unknown_arm", "message": f"no arm {arm_id!r}: never shown, and the source does not know it"},
                status_code=404,
            )
        shown, got = (0, 0.0) if found is None else (found[2], found[3])
        alpha, beta = float(features.alpha[0]), float(features.beta[0])
    else:
        alpha, beta, shown, got = found
    return OrjsonResponse({"id": arm_id, "alpha": alpha, "beta": beta, "impressions": shown, "rewards": got})


async def arms(request: Request) -> OrjsonResponse:
    """``GET /arms?top=N&order=impressions|rewards|mean``: the leading arms, with 95% intervals."""
    loop = _loop(request)
    top = request.query_params.get("top", "20")
    order = request.query_params.get("order", "impressions")
    if not top.isdigit() or not 1 <= int(top) <= MAX_TOP_ARMS:
        raise ValidationFailed(f"top must be an integer in [1, {MAX_TOP_ARMS}] (got {top!r})", field="top")
    if order not in ("impressions", "rewards", "mean"):
        raise ValidationFailed(f"order must be impressions, rewards or mean (got {order!r})", field="order")
    leading, total = loop.top(int(top), order)
    return OrjsonResponse({"arms": leading, "total": total})


async def loop_stats(request: Request) -> OrjsonResponse:
    """``GET /loop``: the loop's health: events held, rewards, refusals, and a series of the last 30 minutes."""
    state: AppState = request.scope["state"]
    loop = state["loop"]
    if loop is None:
        return OrjsonResponse({"learning": False})
    return OrjsonResponse(
        {
            "learning": True,
            "applies_counts": loop.apply_counts,
            "reward_window_s": loop.window_s,
            "durable": loop.journal.error is None,
            **loop.stats(),
        }
    )


async def dashboard_page(request: Request) -> Response:
    """``GET /dashboard``: the page that draws the arms' posteriors and the loop's health."""
    return Response(dashboard.page(), media_type="text/html; charset=utf-8")


def _loop(request: Request) -> Loop:
    loop: Loop | None = request.scope["state"]["loop"]
    if loop is None:
        raise LearningOff("the learning loop is off (--no-learning)")
    return loop


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
    Route("/reward", reward, methods=["POST"]),
    Route("/arms", arms, methods=["GET"]),
    Route("/arms/{id:path}", arm, methods=["GET"]),
    Route("/loop", loop_stats, methods=["GET"]),
    Route("/dashboard", dashboard_page, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/live", live, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
]
#: Paths that are their own ``endpoint`` label in the metrics; any other path is counted as ``other``.
ENDPOINTS = frozenset(route.path for route in ROUTES if "{" not in route.path) | {"/arms/{id}"}
