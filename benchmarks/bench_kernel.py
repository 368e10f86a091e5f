"""Kernel benchmark: ns per Beta sample for this kernel and numpy's ``Generator.beta``.

    taskset -c 0,1 python -m benchmarks.bench_kernel [--n 1000000] [--repeats 9] [--json] [--versions]

Shapes are typical click-through posteriors from benchmarks.workload: alpha in 1..2000, beta = 20 alpha + 1..5000. Rows:
numpy on one thread; the kernel on one thread at each instruction set this CPU has; the kernel on one
and on two threads into preallocated outputs (each thread sampling its share of the arms, so that the GIL
would serialise them if it were held), timed alternately with the median of the per-pair ratios; and
the fused sample + top-50 of 400 arms, the service's per-request call. Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from benchmarks.workload import posterior_shapes
from mab_service.policy import _kernel
from mab_service.policy.sampler import sample_beta, sample_top_k


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, thread stream creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def threaded(alpha: np.ndarray, beta: np.ndarray, threads: int) -> Callable[[], None]:
    """A callable that samples all arms split over ``threads`` threads started together.

    Each thread writes into its own preallocated output, so the figure is the kernel's and not the
    page faults of a fresh 8 MB array per call.
    """
    parts = [
        (a, b, np.empty_like(a))
        for a, b in zip(np.array_split(alpha, threads), np.array_split(beta, threads), strict=True)
    ]

    def run() -> None:
        workers = [threading.Thread(target=lambda a=a, b=b, o=o: sample_beta(a, b, out=o)) for a, b, o in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return run


def paired_ratio(one: Callable[[], None], two: Callable[[], None], repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``one`` and ``two`` timed alternately, and the median of the per-pair ratios.

    On a shared machine the other core comes and goes; timing the two side by side, pair by pair, lets
    each ratio see the same conditions.
    """
    one()  # warm-up
    two()
    t1: list[float] = []
    t2: list[float] = []
    for _ in range(repeats):
        for fn, times in ((one, t1), (two, t2)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(t1, t2, strict=True)]
    return statistics.median(t1), statistics.median(t2), statistics.median(ratios)


def measure(n: int, repeats: int) -> tuple[dict[str, float], float]:
    alpha, beta = posterior_shapes(n)
    gen = np.random.default_rng(1)
    rows: dict[str, float] = {}
    rows["numpy Generator.beta, 1 thread"] = median_seconds(lambda: gen.beta(alpha, beta), repeats) / n * 1e9
    best = _kernel.best_isa_name()
    for isa in ("baseline", "avx2", "avx512"):
        if _kernel.use_isa(isa) != isa:
            continue
        rows[f"kernel {isa}, 1 thread"] = median_seconds(lambda: sample_beta(alpha, beta), repeats) / n * 1e9
    _kernel.use_isa(best)
    one_s, two_s, scaling = paired_ratio(threaded(alpha, beta, 1), threaded(alpha, beta, 2), repeats)
    rows[f"kernel {best}, 1 thread, out="] = one_s / n * 1e9
    rows[f"kernel {best}, 2 threads, out="] = two_s / n * 1e9

    a400, b400 = alpha[:400].copy(), beta[:400].copy()
    calls = 2000

    def top_k_calls() -> None:
        for _ in range(calls):
            sample_top_k(a400, b400, 50)

    rows["kernel sample_top_k(400 arms, k=50), per call"] = median_seconds(top_k_calls, repeats) / calls * 1e9
    return rows, scaling


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "kernel_isa": _kernel.best_isa_name(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="arms per call (default 1,000,000)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats; the median is reported")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--versions", action="store_true", help="print versions and the instruction set")
    args = parser.parse_args(argv)

    rows, scaling = measure(args.n, args.repeats)
    best = _kernel.best_isa_name()
    numpy_ns = rows["numpy Generator.beta, 1 thread"]
    one = rows[f"kernel {best}, 1 thread"]
    ratios = {
        "kernel/numpy speed-up, 1 thread": numpy_ns / one,
        "2 threads / 1 thread throughput (median of pairs)": scaling,
    }
    if args.json:
        print(json.dumps({"ns_per_sample": rows, "ratios": ratios, "versions": versions()}, indent=2))
        return
    if args.versions:
        print("  ".join(f"{k}={v}" for k, v in versions().items()))
    width = max(map(len, rows))
    print(f"{'case':<{width}}  ns/sample (median of {args.repeats}, n={args.n:,})")
    for name, ns in rows.items():
        unit = "ns/call" if "per call" in name else ""
        print(f"{name:<{width}}  {ns:10.2f} {unit}")
    for name, ratio in ratios.items():
        print(f"{name:<{width}}  {ratio:10.2f}x")


if __name__ == "__main__":
    main()
