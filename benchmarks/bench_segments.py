"""What a segment and a half-life cost per W400 request, part by part, in one process: the arm table's lookup
(global vs within a segment), the sampler on the posteriors each gives, and the impressions' additions with and
without decay.

    python -m benchmarks.bench_segments [--repeats 7] [--requests 3000] [--json] [--versions]

The table holds the benchmark catalogue (``benchmarks.workload``: 100,000 arms); each segmented request is one of
``workload.SEGMENTS`` segments, Zipf-distributed, over the same candidates, with its top 50 counted within the
segment first (a warm table: most pairs the answers show exist). Medians of ``--repeats``, microseconds per request.
"""

from __future__ import annotations

import argparse
import mmap
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import orjson

from benchmarks import workload
from mab_service.ids import MAX_SEGMENT_BYTES
from mab_service.learning._arms import ArmTable
from mab_service.policy.sampler import SAMPLERS

PRIOR = (1.0, 1.0)
M = 10.0
TOP_K = workload.DEFAULT_TOP_K


def _table(half_life_s: float, n: int, segment_rows: int) -> ArmTable:
    capacity = n + 10_000 + segment_rows
    id_bytes = 10_000 * 32 + segment_rows * 48
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(capacity, id_bytes, segment_rows))
    return ArmTable.create(buffer, capacity, id_bytes, segment_rows, segment_rows * 48, half_life_s)


def _per_request_us(run: Callable[[int], object], requests: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(requests):
            run(i)
        times.append((time.perf_counter() - start) / requests * 1e6)
    return statistics.median(times)


def measure(repeats: int, requests: int) -> dict[str, float]:
    alpha0, beta0 = workload.posterior_shapes(workload.DEFAULT_ENTITIES)
    ids = [f"c{i}" for i in range(workload.DEFAULT_ENTITIES)]
    bodies = workload.add_segments(workload.make_bodies(400, n_bodies=256, seed=1), seed=1)
    requests_ = [orjson.loads(b) for b in bodies]
    candidates = [r["candidates"] for r in requests_]
    segments = [r["segment"] for r in requests_]
    assert all(len(s.encode()) <= MAX_SEGMENT_BYTES for s in segments)
    picks = np.arange(TOP_K)
    top_k = SAMPLERS["kernel"]
    out: dict[str, float] = {}
    for half_life_s in (0.0, 3600.0):
        table = _table(half_life_s, len(ids), 200_000)
        table.load(ids, alpha0, beta0)
        for c, s in zip(candidates, segments):  # warm: the pairs the answers show exist
            table.add_impressions(c, table.gather_segment(c, s, M, *PRIOR)[4], picks, *PRIOR, segment=s)
        n = len(candidates)
        tag = "decay" if half_life_s else "plain"
        out[f"gather ({tag})"] = _per_request_us(lambda i: table.gather(candidates[i % n], *PRIOR), requests, repeats)
        out[f"gather_segment ({tag})"] = _per_request_us(
            lambda i: table.gather_segment(candidates[i % n], segments[i % n], M, *PRIOR), requests, repeats
        )
        rows = [table.gather(c, *PRIOR)[3] for c in candidates]
        out[f"add_impressions, top 50 ({tag})"] = _per_request_us(
            lambda i: table.add_impressions(candidates[i % n], rows[i % n], picks, *PRIOR), requests, repeats
        )
    table = _table(0.0, len(ids), 200_000)
    table.load(ids, alpha0, beta0)
    plain = [table.gather(c, *PRIOR)[:2] for c in candidates]
    within = [table.gather_segment(c, s, M, *PRIOR)[:2] for c, s in zip(candidates, segments)]
    n = len(candidates)
    out["sample top 50, global posteriors"] = _per_request_us(
        lambda i: top_k(*plain[i % n], TOP_K, seed=i), requests, repeats
    )
    out["sample top 50, segment posteriors (new segment: m * mu, shapes < 1)"] = _per_request_us(
        lambda i: top_k(*within[i % n], TOP_K, seed=i), requests, repeats
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--versions", action="store_true")
    args = parser.parse_args(argv)
    if args.versions:
        print(f"{platform.platform()}; CPython {platform.python_version()}; numpy {np.__version__}")
        return 0
    results = measure(args.repeats, args.requests)
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"# W400, {workload.SEGMENTS} segments; us per request, median of {args.repeats} x {args.requests}")
    for name, us in results.items():
        print(f"{name:<72} {us:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
