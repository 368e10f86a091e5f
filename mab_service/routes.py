"""Endpoints: decode the body -> pipeline.recommend() -> encode the answer. No numerics here.

``/predict`` and ``/reward`` are plain functions of the lifespan state and the request body, which the edge
(``http/edge.py``) reads, admits, answers and counts; Starlette's Request and Response objects would cost more per
request than ranking 400 candidates. The other endpoints are ordinary Starlette functions.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from time import perf_counter

import orjson
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mab_service import dashboard, metrics, pipeline, schemas
from mab_service.config import Settings
from mab_service.errors import LearningOff, ValidationFailed
from mab_service.learning.loop import UnknownArm, arm_from_source
from mab_service.learning.protocol import Loop
from mab_service.responses import OrjsonResponse
from mab_service.state import AppState

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
MAX_TOP_ARMS = 1000
MAX_REWARDS_PER_REQUEST = 10_000
_ACCEPTED = {"status": "accepted"}
_DUPLICATE = {"status": "duplicate"}
#: Where ``/arms`` computes its intervals (up to 1,000 arms x 4,000 Beta draws, about 0.4 s), off the event loop so
#: that the worker goes on answering meanwhile: the sampler releases the GIL. One thread: a burst of /arms requests
#: queues here instead of taking every core from the requests being ranked.
_ARMS_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mab-arms")


async def predict(state: AppState, body: bytes) -> tuple[int, bytes]:
    """``POST /predict``: rank the candidates of one request; with the loop on, hold the answer as an event."""
    settings = state["settings"]
    loop = state["loop"]
    native = state["native"]
    if native is not None and native.rank(body, loop.new_seed()):  # type: ignore[union-attr]  # a loop's own
        answer = loop.answered_native(native)  # type: ignore[union-attr]
        if settings.metrics:
            metrics.answered_natively(native.n, native.fetch_s, native.sample_s, native.encode_s)
        return 200, answer
    # Every other body: a fleet replica's or a store's answer, or one the native path leaves to Python (answer.hpp).
    query = schemas.decode_predict(body, settings.max_candidates)
    seed = query.seed
    if loop is not None and seed is None:
        seed = loop.new_seed()  # every answer can be drawn again from the decision log
    result = await pipeline.recommend(query, state["source"], state["top_k"], seed, state["segments"])
    event_id = None
    if loop is not None:
        if query.event_id is not None:
            await loop.claim(query.event_id, result.ids, query.segment)
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
            query.segment,
            features.segment_rows,
        )
    encoding = perf_counter()
    answer = schemas.encode_predict(query.user_id, result.ids, result.scores, result.degraded, event_id)
    payload = orjson.dumps(answer, option=_JSON_OPTIONS)
    if settings.metrics:
        metrics.candidates.observe(len(query.candidates))
        metrics.encode_seconds.observe(perf_counter() - encoding)
    return 200, payload


async def reward(state: AppState, body: bytes) -> tuple[int, bytes]:
    """``POST /reward``: credit an arm an answer returned; 202 once the reward is on disk, 200 if a duplicate."""
    loop = _loop(state)
    query = schemas.decode_reward(body)
    if await loop.reward(query.event_id, query.id, query.reward):
        return 202, b'{"status":"accepted"}'
    return 200, b'{"status":"duplicate"}'


async def rewards(state: AppState, body: bytes) -> tuple[int, bytes]:
    """``POST /rewards``: many rewards in one request and one group commit; 200 with a result per reward, in order,
    once the accepted ones are on disk (for pipelines that forward clicks in batches)."""
    loop = _loop(state)
    items = schemas.decode_rewards(body, MAX_REWARDS_PER_REQUEST)
    outcomes = await loop.rewards([(item.event_id, item.id, item.reward) for item in items])
    results = [
        _ACCEPTED if outcome is True else _DUPLICATE if outcome is False else outcome.to_json() for outcome in outcomes
    ]
    return 200, orjson.dumps({"results": results})


async def health(request: Request) -> OrjsonResponse:
    """Readiness: 200 while this worker should get traffic; 503 while draining or while the source fails."""
    state: AppState = request.scope["state"]
    if state["admission"].draining:
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
    """``GET /arms/{id}``: the arm's posterior and counts as this node sees it now; ``?segment=s``: within segment s,
    as /predict ranks it there."""
    state: AppState = request.scope["state"]
    arm_id = request.path_params["id"]
    loop = state["loop"]
    segment = _segment(request)
    try:
        if segment is not None:
            alpha, beta, shown, got = await _loop(state).read_segment_arm(arm_id, segment, state["segments"])
            return OrjsonResponse(
                {"id": arm_id, "segment": segment, "alpha": alpha, "beta": beta, "impressions": shown, "rewards": got}
            )
        if loop is None:
            alpha, beta, shown, got = await arm_from_source(state["source"], arm_id, None)
        else:
            alpha, beta, shown, got = await loop.read_arm(arm_id, state["source"])
    except UnknownArm as exc:
        return OrjsonResponse({"error": exc.code, "message": exc.message}, status_code=exc.status_code)
    return OrjsonResponse({"id": arm_id, "alpha": alpha, "beta": beta, "impressions": shown, "rewards": got})


async def arms(request: Request) -> OrjsonResponse:
    """``GET /arms?top=N&order=impressions|rewards|mean[&segment=s]``: the leading arms (within segment s: those shown
    in it, by their posteriors there), with 95% intervals."""
    loop = _loop(request.scope["state"])
    segment = _segment(request)
    top = request.query_params.get("top", "20")
    order = request.query_params.get("order", "impressions")
    if not top.isdigit() or not 1 <= int(top) <= MAX_TOP_ARMS:
        raise ValidationFailed(f"top must be an integer in [1, {MAX_TOP_ARMS}] (got {top!r})", field="top")
    if order not in ("impressions", "rewards", "mean"):
        raise ValidationFailed(f"order must be impressions, rewards or mean (got {order!r})", field="order")
    if segment is None:
        leading, total, partial = await loop.top(int(top), order, _ARMS_EXECUTOR)
    else:
        leading, total, partial = await loop.top_segment(int(top), order, segment, _ARMS_EXECUTOR)
        return OrjsonResponse({"segment": segment, "arms": leading, "total": total})
    if partial is None:
        return OrjsonResponse({"arms": leading, "total": total})
    return OrjsonResponse({"arms": leading, "total": total, "partial": partial})


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
            "durable": loop.durable,
            **loop.stats(),
        }
    )


async def dashboard_page(request: Request) -> Response:
    """``GET /dashboard``: the page that draws the arms' posteriors and the loop's health."""
    return Response(dashboard.page(), media_type="text/html; charset=utf-8")


def _segment(request: Request) -> str | None:
    """The ``segment`` query parameter, checked against the segment rule (422 if it breaks it), or None."""
    segment = request.query_params.get("segment")
    return None if segment is None else schemas.check_segment(segment)


def _loop(state: AppState) -> Loop:
    """This worker's loop; LearningOff (404) when the loop is off."""
    loop = state["loop"]
    if loop is None:
        raise LearningOff("the learning loop is off (--no-learning)")
    return loop


class AnyIdConvertor(PathConvertor):
    """The rest of the path, line breaks included: Starlette's ``path`` (``.*``) stops at a line break, so an id
    holding one would miss the route (a 404 ``not_found``) instead of reaching the id rule's 422."""

    regex = r"[\s\S]*"


register_url_convertor("any", AnyIdConvertor())

#: The POST endpoints the edge serves ahead of Starlette, admitted against ``max_in_flight``.
FAST_ENDPOINTS = {"/predict": predict, "/reward": reward, "/rewards": rewards}
#: Starlette's routes.
ROUTES = [
    Route("/arms", arms, methods=["GET"]),
    Route("/arms/{id:any}", arm, methods=["GET"]),
    Route("/loop", loop_stats, methods=["GET"]),
    Route("/dashboard", dashboard_page, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/live", live, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
]
#: The probes: outside admission (they must answer however busy the worker is) and outside authentication (probes and
#: scrapers carry no key).
PROBES = frozenset({"/health", "/live", "/metrics"})
#: Paths that are their own ``endpoint`` label in the metrics; any other path is counted as ``other``.
ENDPOINTS = frozenset(FAST_ENDPOINTS) | {route.path for route in ROUTES if "{" not in route.path} | {"/arms/{id}"}


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of ``path`` in the metrics: a bounded set, whatever paths clients ask for."""
    return path if path in ENDPOINTS else "/arms/{id}" if path.startswith("/arms/") else "other"
