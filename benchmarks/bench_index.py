"""Id-index benchmark: µs per request for dedupe + parameter lookup of fresh candidate ids.

    taskset -c 1 python -m benchmarks.bench_index [--repeats 31] [--json] [--versions]

The table holds 100,000 ids ``c0`` .. ``c99999``; each request body (from ``benchmarks.workload``) carries 400
or 2,000 distinct ids drawn from ``c0`` .. ``c109999``, so about 9% are unknown and get the prior. Every call
starts from ``orjson.loads`` of a body, so the ids are fresh ``str`` objects as in the service; the time of
``orjson.loads`` alone is measured separately and subtracted. Rows:

- ``python``: ``dict.fromkeys`` dedupe, a ``dict.get`` comprehension to row numbers, ``np.fromiter`` and two
  masked takes: the plain-Python path this index replaces;
- ``index``: ``unique`` then ``IdIndex.gather``, and each of the two alone.

Figures are medians over repeats of the mean over one pass through 256 bodies; the machine is shared, so
expect a few percent of noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import orjson

from benchmarks.workload import DEFAULT_ENTITIES, make_bodies
from mab_service.features._index import IdIndex, unique

PRIOR_ALPHA, PRIOR_BETA = 1.0, 20.0
SIZES = (400, 2000)


def click_through_table(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids ``c0`` .. ``c{n-1}`` with the posteriors of ``benchmarks.workload.write_table``."""
    rng = np.random.default_rng(seed)
    alpha = 1.0 + rng.integers(0, 2000, size=n)
    beta = 20.0 * alpha + 1.0 + rng.integers(0, 5000, size=n)
    return [f"c{i}" for i in range(n)], alpha, beta


Lookup = Callable[[list[str]], tuple[np.ndarray, np.ndarray, int]]


def python_baseline(ids: list[str], alpha: np.ndarray, beta: np.ndarray) -> Lookup:
    row_of = {id_: row for row, id_ in enumerate(ids)}

    def lookup(candidates: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        distinct = list(dict.fromkeys(candidates))
        rows = np.fromiter([row_of.get(c, -1) for c in distinct], dtype=np.int64, count=len(distinct))
        known = rows >= 0
        return (
            np.where(known, alpha[rows], PRIOR_ALPHA),
            np.where(known, beta[rows], PRIOR_BETA),
            int(np.count_nonzero(known)),
        )

    return lookup


def per_call_us(bodies: list[bytes], work: Callable[[list[str]], object] | None, repeats: int) -> float:
    """Median over repeats of the mean µs per body of ``orjson.loads`` followed by ``work``."""
    loads = orjson.loads

    def one_pass() -> float:
        start = time.perf_counter_ns()
        if work is None:
            for body in bodies:
                loads(body)["candidates"]
        else:
            for body in bodies:
                work(loads(body)["candidates"])
        return (time.perf_counter_ns() - start) / len(bodies) / 1e3

    one_pass()  # warm-up: caches, UTF-8 paths, allocator
    return statistics.median(one_pass() for _ in range(repeats))


def measure(repeats: int) -> dict[str, dict[str, float]]:
    ids, alpha, beta = click_through_table(DEFAULT_ENTITIES)
    index = IdIndex(ids, alpha, beta)
    baseline = python_baseline(ids, alpha, beta)

    def index_lookup(candidates: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        return index.gather(unique(candidates), PRIOR_ALPHA, PRIOR_BETA)

    def gather_only(candidates: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        return index.gather(candidates, PRIOR_ALPHA, PRIOR_BETA)

    results: dict[str, dict[str, float]] = {}
    for n in SIZES:
        bodies = make_bodies(n, seed=n)
        sample = orjson.loads(bodies[0])["candidates"]
        (a0, b0, k0), (a1, b1, k1) = baseline(sample), index_lookup(sample)
        assert np.array_equal(a0, a1) and np.array_equal(b0, b1) and k0 == k1, "index and baseline disagree"
        loads_us = per_call_us(bodies, None, repeats)
        results[f"{n} ids"] = {
            "orjson.loads (subtracted below)": loads_us,
            "python: dict.fromkeys + dict.get + np.fromiter": per_call_us(bodies, baseline, repeats) - loads_us,
            "index: unique + gather": per_call_us(bodies, index_lookup, repeats) - loads_us,
            "index: unique alone": per_call_us(bodies, unique, repeats) - loads_us,
            "index: gather alone": per_call_us(bodies, gather_only, repeats) - loads_us,
        }
    return results


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "orjson": orjson.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=31, help="timed passes; the median is reported")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--versions", action="store_true", help="print versions first")
    args = parser.parse_args(argv)

    results = measure(args.repeats)
    if args.json:
        print(json.dumps({"us_per_call": results, "versions": versions()}, indent=2))
        return
    if args.versions:
        print("  ".join(f"{k}={v}" for k, v in versions().items()))
    names = list(next(iter(results.values())))
    width = max(map(len, names))
    print(f"{'µs per request (median of ' + str(args.repeats) + ')':<{width}}" + "".join(f"{s:>12}" for s in results))
    for name in names:
        print(f"{name:<{width}}" + "".join(f"{r[name]:12.2f}" for r in results.values()))
    python_name, index_name = names[1], names[2]
    speedups = "".join(f"{r[python_name] / r[index_name]:11.1f}x" for r in results.values())
    print(f"{'speed-up, index over python':<{width}}" + speedups)


if __name__ == "__main__":
    main()
