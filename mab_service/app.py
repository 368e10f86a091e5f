"""build_app(settings): the routes table, the lifespan and the error handlers."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from time import perf_counter

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from mab_service import config, metrics
from mab_service.errors import FeatureSourceError, MabError
from mab_service.features.factory import make_source
from mab_service.features.source import FeatureSource
from mab_service.logs import REQUEST_ID, log_access, new_request_id, request_id_from
from mab_service.openapi import openapi_document
from mab_service.policy.sampler import SAMPLERS
from mab_service.responses import OrjsonResponse, error_body
from mab_service.routes import ENDPOINTS, ROUTES, overloaded, predict
from mab_service.state import AppState, Lifecycle
from mab_service.types import Message, Receive, Scope, Send

logger = logging.getLogger("mab_service")


def build_app(settings: config.Settings, source: FeatureSource | None = None) -> Application:
    """The ASGI application for ``settings``.

    Args:
        settings: The service configuration.
        source: A feature source to use instead of the one ``settings.features`` names (embedding, tests).

    Returns:
        An ASGI app whose lifespan starts the feature source; startup fails (and the server exits) if
        the source cannot be loaded.
    """

    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[AppState]:
        nonlocal source
        if source is None:
            source = make_source(settings)
        await source.start()
        # Everything loaded so far lives as long as the process: keep the cyclic GC from scanning it.
        gc.freeze()
        logger.info("feature source %s ready; sampler %s", settings.features, settings.sampler)
        served, top_k = source, SAMPLERS[settings.sampler]
        try:
            async with AsyncExitStack() as stack:
                if settings.metrics:
                    served, top_k = metrics.MeteredSource(source), metrics.timed_top_k(top_k)
                    await stack.enter_async_context(metrics.recording(source, settings.metrics_flush_interval_s))
                yield AppState(
                    settings=settings,
                    source=served,
                    top_k=top_k,
                    openapi=openapi_document(settings.max_candidates, settings.max_body_bytes),
                    lifecycle=lifecycle,
                )
        finally:
            await source.close()

    router = Starlette(
        routes=ROUTES,
        exception_handlers={MabError: _mab_error, HTTPException: _http_error, Exception: _unexpected_error},
    )
    return Application(router, lifespan, settings, lifecycle)


class Application:
    """The ASGI app the server runs.

    ``POST /predict`` goes straight to its endpoint, which maps its own errors: Starlette's Request,
    Response and middleware would cost more per request than the ranking. Other routes, 404 and 405 go
    through Starlette. The lifespan is handled here, so that a feature source that cannot start is
    reported in one line (``cannot start: ...``) and the server exits, instead of with a traceback.

    Overload: a /predict is answered 503 ``overloaded`` at once when the server marked it on arrival as over
    ``max_in_flight`` (``lifecycle.over_cap``, see ``server.RequestTasks``), or, under a server that does not
    mark, when ``max_in_flight`` /predict requests are already inside the app. While ``lifecycle.draining``,
    every answer carries ``Connection: close``.
    """

    def __init__(
        self,
        router: Starlette,
        lifespan: Callable[[], AbstractAsyncContextManager[AppState]],
        settings: config.Settings,
        lifecycle: Lifecycle,
    ) -> None:
        self.router = router
        self.lifespan = lifespan
        self.settings = settings
        self.lifecycle = lifecycle
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/predict":
            lifecycle = self.lifecycle
            if lifecycle.draining:
                send = _closing(send)
            if self.in_flight >= self.settings.max_in_flight or (
                lifecycle.over_cap and asyncio.current_task() in lifecycle.over_cap
            ):
                await overloaded(scope, send, self.settings)
                return
            self.in_flight += 1
            try:
                await predict(scope, receive, send)
            finally:
                self.in_flight -= 1
                if lifecycle.admitted:  # answered: no longer counts against the cap (see server.RequestTasks)
                    lifecycle.admitted.discard(asyncio.current_task())
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif scope["type"] == "http":
            await self._routed(scope, receive, send)
        else:
            await self.router(scope, receive, send)

    async def _routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An HTTP request for Starlette, with a request id, metrics, an access log and draining."""
        started = perf_counter()
        request_id = next((request_id_from(v) for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = request_id or new_request_id()
        REQUEST_ID.set(request_id)
        status = 500  # if the app fails before it answers, the server answers 500
        draining = self.lifecycle.draining

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
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "other"
            if self.settings.metrics:
                metrics.requests.observe(endpoint, status, perf_counter() - started)
            if self.settings.access_log:
                log_access(scope["method"], path, status, perf_counter() - started, request_id, scope.get("client"))

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert "state" in scope, "the server must support lifespan state (uvicorn >= 0.22)"
        started = False
        await receive()  # lifespan.startup
        try:
            async with self.lifespan() as state:
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


def _closing(send: Send) -> Send:
    """``send`` adding ``Connection: close`` to the answer, so the client leaves a draining worker."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await send(message)

    return closing


def create_app() -> Application:
    """Factory for ``uvicorn --factory`` and worker processes: settings from the environment."""
    return build_app(config.Settings.from_env(os.environ))


async def _mab_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MabError)
    return Response(error_body(exc), status_code=exc.status_code, media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return OrjsonResponse({"error": code, "message": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log (Starlette's ServerErrorMiddleware re-raises to the server); the
    # client gets a generic body, never the exception text.
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return OrjsonResponse({"error": "internal_error", "message": "internal server error"}, status_code=500)
