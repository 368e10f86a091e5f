"""build_app(settings): the routes table, the lifespan and the error handlers."""

from __future__ import annotations

import gc
import logging
import os
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from mab_service import config
from mab_service.errors import FeatureSourceError, MabError
from mab_service.features.local import LocalSource
from mab_service.features.source import FeatureSource
from mab_service.openapi import openapi_document
from mab_service.policy.sampler import SAMPLERS
from mab_service.responses import OrjsonResponse, error_body
from mab_service.routes import ROUTES, predict
from mab_service.state import AppState
from mab_service.types import Receive, Scope, Send

logger = logging.getLogger("mab_service")


def make_source(settings: config.Settings) -> FeatureSource:
    """The feature source named by ``settings.features``."""
    kind, _, target = settings.features.partition(":")
    if kind == "demo":
        return LocalSource.demo(settings.prior_alpha, settings.prior_beta)
    if kind == "csv":
        return LocalSource(Path(target), settings.prior_alpha, settings.prior_beta)
    raise FeatureSourceError(f"unknown feature source {settings.features!r}")


def build_app(settings: config.Settings, source: FeatureSource | None = None) -> Application:
    """The ASGI application for ``settings``.

    Args:
        settings: The service configuration.
        source: A feature source to use instead of the one ``settings.features`` names (embedding, tests).

    Returns:
        An ASGI app whose lifespan starts the feature source; startup fails (and the server exits) if
        the source cannot be loaded.
    """

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[AppState]:
        nonlocal source
        if source is None:
            source = make_source(settings)
        await source.start()
        # Everything loaded so far lives as long as the process: keep the cyclic GC from scanning it.
        gc.freeze()
        logger.info("feature source %s ready; sampler %s", settings.features, settings.sampler)
        try:
            yield AppState(
                settings=settings,
                source=source,
                top_k=SAMPLERS[settings.sampler],
                openapi=openapi_document(settings.max_candidates, settings.max_body_bytes),
            )
        finally:
            await source.close()

    router = Starlette(
        routes=ROUTES,
        exception_handlers={MabError: _mab_error, HTTPException: _http_error, Exception: _unexpected_error},
    )
    return Application(router, lifespan)


class Application:
    """The ASGI app the server runs.

    ``POST /predict`` goes straight to its endpoint, which maps its own errors: Starlette's Request,
    Response and middleware would cost more per request than the ranking. Other routes, 404 and 405 go
    through Starlette. The lifespan is handled here, so that a feature source that cannot start is
    reported in one line (``cannot start: ...``) and the server exits, instead of with a traceback.
    """

    def __init__(self, router: Starlette, lifespan: Callable[[], AbstractAsyncContextManager[AppState]]) -> None:
        self.router = router
        self.lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/predict":
            await predict(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.router(scope, receive, send)

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
