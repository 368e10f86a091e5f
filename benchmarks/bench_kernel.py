"""Kernel benchmark: ns per Beta sample for this kernel, per instruction set, and numpy's ``Generator.beta``.

    taskset -c 0,1 python -m benchmarks.bench_kernel [--n 1000000] [--repeats 9] [--isa avx2 ...] [--json]
                                                      [--versions]

Shapes are typical click-through posteriors from benchmarks.workload: alpha in 1..2000, beta = 20 alpha + 1..5000.
For each instruction set the kernel has on this CPU (SSE2, AVX2, AVX-512; chosen in process, as
MAB_KERNEL_ISA would at load) and for one and two threads, numpy and the kernel are timed alternately, one
pair per repeat, both allocating their output as a caller would; the ratio is the median of the per-pair
ratios, so both sides of each ratio see the same load on a shared machine. Two threads each sample half
of the arms (numpy with a Generator per thread: a shared one would serialise them on its lock). Then, at
the best instruction set: one thread against two into preallocated outputs (the kernel's scaling, without
page faults), and the fused sample + top-50 of 400 arms, the service's per-request call. Figures are
medians over repeats.
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

ISAS = ("baseline", "avx2", "avx512")
#: How the report names each instruction set.
ISA_LABELS = {"baseline": "SSE2", "avx2": "AVX2", "avx512": "AVX-512"}

Sampler = Callable[[np.ndarray, np.ndarray, np.ndarray | None], object]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, thread stream creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def threaded(alpha: np.ndarray, beta: np.ndarray, threads: int, sampler: Sampler, *, out: bool) -> Callable[[], None]:
    """A callable that samples all arms split over ``threads`` threads started together.

    Each thread calls ``sampler(alpha_part, beta_part, out_part)``; with ``out`` each has its own
    preallocated output (the figure is then the sampler's and not the page faults of a fresh array per
    call), else ``None`` and the sampler allocates. One thread runs in the calling thread.
    """
    parts = [
        (a, b, np.empty_like(a) if out else None)
        for a, b in zip(np.array_split(alpha, threads), np.array_split(beta, threads), strict=True)
    ]
    if threads == 1:
        a1, b1, o1 = parts[0]

        def run_here() -> None:
            sampler(a1, b1, o1)

        return run_here

    def run() -> None:
        workers = [threading.Thread(target=sampler, args=part) for part in parts]
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


def kernel_sampler(a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> object:
    return sample_beta(a, b, out=out)


def numpy_sampler() -> Sampler:
    """numpy's Beta with a Generator per thread."""
    local = threading.local()

    def sample(a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> object:
        gen = getattr(local, "gen", None)
        if gen is None:
            gen = local.gen = np.random.default_rng(threading.get_ident())
        return gen.beta(a, b)

    return sample


def available_isas(wanted: list[str] | None) -> list[str]:
    """The instruction sets to measure: those asked for (all by default) that this CPU has."""
    best = _kernel.best_isa_name()
    return [isa for isa in ISAS if ISAS.index(isa) <= ISAS.index(best) and (not wanted or isa in wanted)]


def measure(n: int, repeats: int, isas: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    alpha, beta = posterior_shapes(n)
    rows: dict[str, float] = {}
    ratios: dict[str, float] = {}
    numpy_beta = numpy_sampler()
    best = _kernel.best_isa_name()
    try:
        for threads in (1, 2):
            label = "1 thread" if threads == 1 else f"{threads} threads"
            np_run = threaded(alpha, beta, threads, numpy_beta, out=False)
            numpy_ns: list[float] = []
            for isa in isas:
                _kernel.use_isa(isa)
                kernel_run = threaded(alpha, beta, threads, kernel_sampler, out=False)
                np_s, k_s, ratio = paired_ratio(np_run, kernel_run, repeats)
                numpy_ns.append(np_s / n * 1e9)
                rows[f"kernel {ISA_LABELS[isa]}, {label}"] = k_s / n * 1e9
                ratios[f"kernel {ISA_LABELS[isa]} / numpy, {label} (median of pairs)"] = ratio
            rows[f"numpy Generator.beta, {label}"] = statistics.median(numpy_ns)
    finally:
        _kernel.use_isa(best)

    one_s, two_s, scaling = paired_ratio(
        threaded(alpha, beta, 1, kernel_sampler, out=True), threaded(alpha, beta, 2, kernel_sampler, out=True), repeats
    )
    rows[f"kernel {ISA_LABELS[best]}, 1 thread, out="] = one_s / n * 1e9
    rows[f"kernel {ISA_LABELS[best]}, 2 threads, out="] = two_s / n * 1e9
    ratios["2 threads / 1 thread throughput, out= (median of pairs)"] = scaling

    a400, b400 = alpha[:400].copy(), beta[:400].copy()
    calls = 2000

    def top_k_calls() -> None:
        for _ in range(calls):
            sample_top_k(a400, b400, 50)

    rows["kernel sample_top_k(400 arms, k=50), per call"] = median_seconds(top_k_calls, repeats) / calls * 1e9
    # Numbers first, numpy first: the table reads numpy, then each build.
    ordered = {k: rows[k] for k in sorted(rows, key=lambda k: (not k.startswith("numpy"), "per call" in k))}
    return ordered, ratios


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu": cpu_model(),
        "simd_flags": " ".join(simd_flags()),
        "kernel_isa": _kernel.best_isa_name(),
    }


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo_field("model name") or "unknown"


def simd_flags() -> list[str]:
    """The SIMD flags the kernel's dispatch cares about, as /proc/cpuinfo lists them."""
    present = set(_cpuinfo_field("flags").split())
    return [f for f in ("sse2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl") if f in present]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="arms per call (default 1,000,000)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats; the median is reported")
    parser.add_argument(
        "--isa",
        action="append",
        choices=ISAS,
        help="instruction set to measure (repeatable; default: all this CPU has)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--versions", action="store_true", help="print versions, the CPU and its SIMD flags")
    args = parser.parse_args(argv)

    rows, ratios = measure(args.n, args.repeats, available_isas(args.isa))
    if args.json:
        print(json.dumps({"ns_per_sample": rows, "ratios": ratios, "versions": versions()}, indent=2))
        return
    if args.versions:
        print("  ".join(f"{k}={v}" for k, v in versions().items()))
    width = max(map(len, [*rows, *ratios]))
    print(f"{'case':<{width}}  ns/sample (median of {args.repeats}, n={args.n:,})")
    for name, ns in rows.items():
        unit = "ns/call" if "per call" in name else ""
        print(f"{name:<{width}}  {ns:10.2f} {unit}")
    for name, ratio in ratios.items():
        print(f"{name:<{width}}  {ratio:10.2f}x")


if __name__ == "__main__":
    main()
