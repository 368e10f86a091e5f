"""Shared types: what the lifespan hands to every request, and the serving state of one worker."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

from mab_service.config import Settings
from mab_service.features.source import FeatureSource
from mab_service.learning.loop import Loop
from mab_service.policy.sampler import TopK


class Lifecycle:
    """Serving state one worker's server and app share; read per request, so plain attributes.

    ``draining`` is set by the server on SIGTERM: /health answers 503 and answers carry ``Connection: close``.
    The server admits requests as they arrive (``server.RequestTasks``): ``admitted`` holds the tasks of the
    requests it counts, which the app removes once it has answered; ``over_cap`` those that arrived while the
    worker already held ``max_in_flight``, which the app answers 503 ``overloaded``. Both stay empty under a
    server that does not admit on arrival.
    """

    __slots__ = ("admitted", "draining", "over_cap")

    def __init__(self) -> None:
        self.draining = False
        self.admitted: set[asyncio.Task[None]] = set()
        self.over_cap: set[asyncio.Task[None]] = set()


class AppState(TypedDict):
    settings: Settings
    source: FeatureSource
    top_k: TopK
    openapi: dict[str, Any]
    lifecycle: Lifecycle
    loop: Loop | None
    """This worker's side of the learning loop; None with ``learning`` off."""
