"""Before the soak: prewarm (every id of the catalogue read once, so the cache holds it) and saturation (wrk,
closed loop, for the load the soak rate is a share of)."""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson

from benchmarks import bench_service
from loadtests.soak import SoakError
from loadtests.soak.outcomes import DEGRADED, OK, classify

#: Ids per prewarm request: ten chunks of 100, well within the read deadline.
PREWARM_CHUNK = 1000
PREWARM_PASSES = 3


def _post(port: int, body: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def prewarm(port: int, id_space: int) -> dict[str, int]:
    """Read every id of the catalogue once through /predict, again for the ones a pass left degraded.

    Raises:
        SoakError: If an answer is not a 200, or answers are still degraded after PREWARM_PASSES passes.
    """
    chunks = [[f"c{j}" for j in range(i, min(i + PREWARM_CHUNK, id_space))] for i in range(0, id_space, PREWARM_CHUNK)]
    done = {"requests": 0, "passes": 0}
    for _ in range(PREWARM_PASSES):
        done["passes"] += 1
        left = []
        for chunk in chunks:
            status, body = _post(port, orjson.dumps({"user_id": "prewarm", "candidates": chunk, "top_k": 1}))
            done["requests"] += 1
            kind = classify(status, body)
            if kind == DEGRADED:
                left.append(chunk)
            elif kind != OK:
                raise SoakError(f"prewarm: /predict answered {status}: {body[:300]!r}")
        if not left:
            return done
        chunks = left
    raise SoakError(f"prewarm: {len(chunks)} request(s) still degraded after {PREWARM_PASSES} passes")


@dataclass(frozen=True)
class SaturationStep:
    connections: int
    rps: float
    p99_ms: float
    errors: int


def saturation(port: int, script: Path, args: argparse.Namespace) -> list[SaturationStep]:
    """Closed-loop wrk steps on the client core; the best req/s is the saturating load."""
    steps = []
    for connections in args.saturation_connections:
        result = bench_service.run_wrk(script, port, args.saturation_s, connections, args.client_cpu)
        steps.append(
            SaturationStep(
                connections=connections,
                rps=float(result["requests"]) / (float(result["duration_us"]) / 1e6),
                p99_ms=float(result["latency_us"]["p99"]) / 1e3,
                errors=sum(int(v) for v in result["errors"].values()),
            )
        )
    return steps
