"""build_app(settings): the routes, the lifespan that starts what requests use, and the edge that serves them."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from mab_service import config, metrics
from mab_service.features.factory import make_source, parse_spec, store_segments
from mab_service.features.source import FeatureSource
from mab_service.fleet import setup as fleet_setup
from mab_service.fleet.fanout import CountsFollower, counts_topic
from mab_service.fleet.loop import FleetLoop
from mab_service.fleet.replica import Fleet
from mab_service.http.admission import Admission
from mab_service.http.edge import Edge
from mab_service.learning import node
from mab_service.learning.loop import NodeLoop
from mab_service.learning.posteriors import SegmentSource, SharedArmsSource
from mab_service.learning.protocol import Loop
from mab_service.openapi import openapi_document
from mab_service.policy.sampler import SAMPLERS, sample_top_k
from mab_service.routes import FAST_ENDPOINTS, PROBES, ROUTES, endpoint_label
from mab_service.state import AppState

logger = logging.getLogger("mab_service")


def embedded(settings: config.Settings) -> bool:
    """Whether ``settings.features`` names an embedded source, whose posteriors the loop updates."""
    return parse_spec(settings.features).kind in ("demo", "csv")


@asynccontextmanager
async def _learning(settings: config.Settings) -> AsyncIterator[Loop | None]:
    """This worker's loop over the node's tables (opening the node if no one in this process has), or None."""
    if not settings.learning:
        yield None
        return
    fleet = None
    if settings.events:
        fleet = Fleet(
            fleet_setup.topic_path(settings.events),
            parse_spec(settings.features).target,
            window_s=settings.reward_window_s,
            prior_alpha=settings.prior_alpha,
            prior_beta=settings.prior_beta,
            max_delay_s=settings.events_max_delay_s,
            max_pending=settings.events_max_pending,
            max_pending_bytes=settings.events_max_pending_bytes,
            propagation_s=settings.event_propagation_s,
            timeout_s=settings.vertex_read_budget_s,
            publish_timeout_s=settings.events_publish_timeout_s,
            shutdown_timeout_s=settings.timeout_graceful_shutdown_s,
            half_life_s=settings.half_life_s,
        )
    with node.using(settings) as current:
        if fleet is not None and settings.fleet_follow:
            # One subscriber per node (the worker holding the lock); every worker ranks from the table it fills.
            fleet.follow(
                CountsFollower(
                    counts_topic(fleet_setup.topic_path(settings.events)),
                    current.arms,
                    current.state_dir / "fanout.lock",
                    prior_alpha=settings.prior_alpha,
                    prior_beta=settings.prior_beta,
                    resync_after_s=settings.fleet_resync_after_s,
                )
            )
        loop: Loop = (
            NodeLoop(current, settings, apply_counts=embedded(settings))
            if fleet is None
            else FleetLoop(current, settings, apply_counts=embedded(settings), fleet=fleet)
        )
        await loop.start()
        try:
            yield loop
        finally:
            await loop.close()


def build_app(
    settings: config.Settings, source: FeatureSource | None = None, admission: Admission | None = None
) -> Edge:
    """The ASGI application for ``settings``.

    Args:
        settings: The service configuration.
        source: A feature source to use instead of the one ``settings.features`` names (embedding, tests).
        admission: The worker's admission and drain state, shared with its protocol and server (``server.worker``);
            by default one of the app's own.

    Returns:
        An ASGI app whose lifespan starts the feature source; startup fails (and the server exits) if
        the source cannot be loaded.
    """
    if admission is None:
        admission = Admission.from_settings(settings, PROBES)
    given = source

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[AppState]:
        top_k = SAMPLERS[settings.sampler]
        async with AsyncExitStack() as stack:
            loop = await stack.enter_async_context(_learning(settings))
            segments: SegmentSource | None = None
            native = None
            if loop is not None and given is None and (loop.apply_counts or loop.following):
                shared = SharedArmsSource(
                    loop.arms, settings.prior_alpha, settings.prior_beta, settings.segment_prior_weight
                )
                source: FeatureSource = shared
                segments = shared if loop.counts_segments else None
                if top_k is sample_top_k:  # the kernel's draws, which the native answer makes bit for bit
                    native = loop.native
            else:
                source = given or make_source(settings)
            await source.start()
            stack.push_async_callback(source.close)
            # Everything loaded so far lives as long as the process: keep the cyclic GC from scanning it.
            gc.freeze()
            logger.info("feature source %s ready; sampler %s", settings.features, settings.sampler)
            served = source
            if settings.metrics:
                served, top_k = metrics.MeteredSource(source), metrics.timed_top_k(top_k)
                stack.enter_context(metrics.loop_watched(loop))
                await stack.enter_async_context(metrics.recording(source, settings.metrics_flush_interval_s))
            if segments is None and given is None:
                segments = store_segments(settings, served)  # a Vertex store's pair entities
            yield AppState(
                settings=settings,
                source=served,
                top_k=top_k,
                openapi=openapi_document(settings.max_candidates, settings.max_body_bytes),
                admission=admission,
                loop=loop,
                segments=segments,
                native=native,
            )

    return Edge(FAST_ENDPOINTS, ROUTES, endpoint_label, lifespan, settings, admission)


def create_app() -> Edge:
    """Factory for ``uvicorn mab_service.app:create_app --factory``: settings from ``MAB_*`` variables, read once.

    ``mab-service serve`` does not use it: it hands its settings to ``build_app`` in every worker.
    """
    return build_app(config.Settings.from_env(os.environ))
