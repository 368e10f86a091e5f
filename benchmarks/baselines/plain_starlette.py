"""Baseline service: plain Starlette + numpy, written the ordinary way.

This is the reference point mab_service is compared against, so it stays deliberately free of tricks: stock
``JSONResponse``, a dict of posteriors, a Python comprehension to gather parameters, numpy's
``Generator.beta`` and ``argsort``. Run it with::

    python -m benchmarks.baselines.plain_starlette --port 8001 --features table.csv

or as ``uvicorn benchmarks.baselines.plain_starlette:app`` with ``PLAIN_FEATURES=table.csv`` in the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

#: Uniform Beta(1, 1) prior for candidates missing from the table.
PRIOR = (1.0, 1.0)
DEFAULT_TOP_K = 50


def load_table(path: str) -> dict[str, tuple[float, float]]:
    """Read ``entity_id,alpha,beta`` rows from a CSV file into a dict ``entity_id -> (alpha, beta)``."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["entity_id"]: (float(row["alpha"]), float(row["beta"])) for row in csv.DictReader(f)}


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def predict(request: Request) -> JSONResponse:
    try:
        payload = await request.json()
        user_id = payload["user_id"]
        candidates = payload["candidates"]
        top_k = int(payload.get("top_k", DEFAULT_TOP_K))
    except (ValueError, KeyError, TypeError, AttributeError):
        return JSONResponse({"error": "expected {user_id, candidates, top_k}"}, status_code=400)

    table: dict[str, tuple[float, float]] = request.state.table
    params = [table.get(c, PRIOR) for c in candidates]
    alpha = np.array([p[0] for p in params], dtype=np.float64)
    beta = np.array([p[1] for p in params], dtype=np.float64)
    samples = request.state.rng.beta(alpha, beta)
    order = np.argsort(-samples)[:top_k]
    return JSONResponse(
        {"user_id": user_id, "ids": [candidates[i] for i in order.tolist()], "scores": samples[order].tolist()}
    )


def build_app(features_path: str | None = None) -> Starlette:
    """Build the baseline app.

    Args:
        features_path: CSV feature table; if None, read from the ``PLAIN_FEATURES`` environment variable when
            the app starts.

    Returns:
        The Starlette application.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        path = features_path or os.environ["PLAIN_FEATURES"]
        # One generator per process, created once: seeding from OS entropy on every request would cost more
        # than the sampling itself.
        yield {"table": load_table(path), "rng": np.random.default_rng()}

    routes = [Route("/health", health, methods=["GET"]), Route("/predict", predict, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


app = build_app()


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: run the baseline under uvicorn with one worker, uvloop and httptools."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines.plain_starlette")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--features", default=os.environ.get("PLAIN_FEATURES"), help="CSV entity_id,alpha,beta")
    args = parser.parse_args(argv)
    if not args.features:
        parser.error("--features or PLAIN_FEATURES is required")
    uvicorn.run(
        build_app(args.features),
        host=args.host,
        port=args.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
