"""Endpoints: decode the body -> pipeline.recommend() -> encode the answer. No numerics here.

``/predict`` is a plain ASGI endpoint: it reads the body and writes the answer itself, without Starlette's
Request and Response objects, because per request they cost more than ranking 400 candidates. The other
endpoints are ordinary Starlette functions.
"""

from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.routing import Route

from mab_service import pipeline, schemas
from mab_service.errors import MabError, PayloadTooLarge, UnsupportedMediaType
from mab_service.responses import OrjsonResponse, error_body
from mab_service.state import AppState
from mab_service.types import Receive, Scope, Send

logger = logging.getLogger("mab_service")

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class PredictEndpoint:
    """``POST /predict``: rank the candidates of one request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: AppState = scope["state"]
        settings = state["settings"]
        try:
            content_length = _json_headers(scope["headers"])
            body = await _read_body(receive, content_length, settings.max_body_bytes)
            if body is None:
                return  # the client went away; nobody to answer
            query = schemas.decode_predict(body, settings.max_candidates)
            result = await pipeline.recommend(query, state["source"], state["top_k"])
            answer = schemas.encode_predict(query.user_id, result.ids, result.scores)
            status, payload = 200, orjson.dumps(answer, option=_JSON_OPTIONS)
        except MabError as exc:
            status, payload = exc.status_code, error_body(exc)
        except Exception:
            # Outside Starlette's error middleware: log the traceback here and answer a generic 500.
            logger.exception("unhandled error in POST /predict")
            status, payload = 500, b'{"error":"internal_error","message":"internal server error"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))],
            }
        )
        await send({"type": "http.response.body", "body": payload})


predict = PredictEndpoint()


async def health(request: Request) -> OrjsonResponse:
    state: AppState = request.scope["state"]
    status = state["source"].health()
    if status.ready:
        return OrjsonResponse({"status": "ok"})
    return OrjsonResponse({"status": "unavailable", "reason": status.reason}, status_code=503)


async def openapi(request: Request) -> OrjsonResponse:
    return OrjsonResponse(request.scope["state"]["openapi"])


def _json_headers(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """Check that the content type is JSON; return the declared content length, from raw ASGI headers."""
    content_type = b""
    content_length = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            content_length = value
    if content_type.partition(b";")[0].strip().lower() != b"application/json":
        shown = content_type.decode("latin-1") or "none"
        raise UnsupportedMediaType(f"content type must be application/json (got {shown})")
    return content_length


async def _read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes | None:
    """The whole body, at most ``limit`` bytes; None if the client disconnected."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body must be at most {limit} bytes (Content-Length is {declared.decode()})")
    message = await receive()
    body: bytes = message.get("body", b"")
    while message.get("more_body", False):  # a body in several chunks
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"body must be at most {limit} bytes")
    if message["type"] == "http.disconnect":
        return None
    if len(body) > limit:
        raise PayloadTooLarge(f"body must be at most {limit} bytes")
    return body


ROUTES = [
    Route("/predict", predict, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
]
