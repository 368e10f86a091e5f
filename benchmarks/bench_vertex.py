"""Vertex feature path benchmark: the service on the emulator, against the naive baseline and the embedded source.

One emulator (``python -m mab_service.emulator``, ``--latency-ms`` +- ``--jitter-ms`` per read) serves the workload's
table for the whole run. Each measurement starts a fresh server pinned to ``--server-cpu``, checks one answer,
warms up, and loads it with wrk pinned to ``--client-cpu`` (the emulator shares that core). Targets alternate
across ``--repeats`` and medians are reported; emulator counters give the store calls and ids of each run.

Targets:
    naive     benchmarks/baselines/naive_vertex.py: chunks one after another, proto-plus decoding, no cache
    cold      mab_service, Vertex source, cache off: every candidate is read from the store
    warm      mab_service, Vertex source, cache on and filled before the run (every body sent once)
    embedded  mab_service, embedded CSV source (the reference for the warm cache)

    python -m benchmarks.bench_vertex [--duration 8] [--connections 32] [--cold-connections 8] [--repeats 3]
                                      [--targets naive,cold,warm,embedded] [--latency-ms 5] [--jitter-ms 2]
                                      [--json] [--versions]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks import workload
from benchmarks.bench_service import (
    WARMUP_S,
    TargetError,
    check_predict,
    environment,
    free_port,
    require_tools,
    run_wrk,
    running_server,
    session_cpu_seconds,
)
from mab_service.emulator import EmulatorControl

ENTITY_TYPE = "projects/bench/locations/local/featurestores/bench/entityTypes/content"
WORKLOAD = "W400"
CHUNK = 100
#: The seeds' target load, in scored candidates per second.
FLEET_PAIRS_PER_S = 3_000_000

#: (port, table, emulator target) -> server argv.
TargetFactory = Callable[[int, Path, str], list[str]]


def _service(port: int, features: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--features", features, *flags]  # fmt: skip


def naive_target(port: int, table: Path, emulator: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.baselines.naive_vertex", "--port", str(port),
            "--entity-type", ENTITY_TYPE, "--emulator", emulator]  # fmt: skip


def cold_target(port: int, table: Path, emulator: str) -> list[str]:
    # The deadline is long so that an overloaded server queues rather than sheds: the baseline has none.
    return _service(port, f"vertex:{ENTITY_TYPE}", "--vertex-emulator-host", emulator, "--cache-ttl-s", "0",
                    "--vertex-deadline-s", "5", "--vertex-call-timeout-s", "5")  # fmt: skip


def warm_target(port: int, table: Path, emulator: str) -> list[str]:
    return _service(port, f"vertex:{ENTITY_TYPE}", "--vertex-emulator-host", emulator, "--cache-ttl-s", "3600",
                    "--vertex-deadline-s", "5", "--vertex-call-timeout-s", "5")  # fmt: skip


def embedded_target(port: int, table: Path, emulator: str) -> list[str]:
    return _service(port, f"csv:{table}")


TARGETS: dict[str, TargetFactory] = {
    "naive": naive_target,
    "cold": cold_target,
    "warm": warm_target,
    "embedded": embedded_target,
}
#: Targets whose cache is filled before the measured run.
PREWARM = {"warm"}
#: Targets that read every candidate from the store: tens of requests/s, so they get fewer connections
#: (``--cold-connections``): with 32, queueing alone would pass wrk's 2 s timeout.
COLD = {"naive", "cold"}
#: Ratios reported: (target, baseline).
RATIOS = [("cold", "naive"), ("warm", "embedded"), ("warm", "naive")]


@dataclass(frozen=True)
class Run:
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_s: float
    store_calls: int
    store_ids: int
    emulator_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(self.requests, 1)

    @property
    def hit_rate(self) -> float:
        """Share of candidates served without the store. The store counts the reads of every request in the
        window, wrk only those that completed in it, so without a cache this reads slightly below 0: clipped."""
        return min(1.0, max(0.0, 1.0 - self.store_ids / max(self.requests * 400, 1)))

    @property
    def ids_per_call(self) -> float:
        return self.store_ids / self.store_calls if self.store_calls else 0.0


@contextlib.contextmanager
def running_emulator(table: Path, args: argparse.Namespace, log_path: Path) -> Iterator[tuple[str, int]]:
    """The emulator, pinned to the client core; yields its target and its pid (for CPU accounting)."""
    port = free_port()
    argv = ["taskset", "-c", str(args.client_cpu), sys.executable, "-m", "mab_service.emulator", "--port", str(port),
            "--features", str(table), "--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms),
            "--seed", "1"]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    target = f"127.0.0.1:{port}"
    try:
        with EmulatorControl(target) as control:
            control.wait_ready(60)
        yield target, proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def prewarm(port: int, bodies: list[bytes]) -> None:
    """Send every body once, so that a cache holds every candidate of the workload."""

    def post(body: bytes) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            if resp.status != 200:
                raise TargetError(f"prewarm answered {resp.status}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(post, bodies))


def measure(
    name: str,
    table: Path,
    files: workload.WorkloadFiles,
    emulator: tuple[str, int],
    args: argparse.Namespace,
    log: Path,
) -> Run:
    target, emulator_pid = emulator
    port = free_port()
    bodies = files.bodies.read_bytes().splitlines()
    connections = args.cold_connections if name in COLD else args.connections
    with running_server(TARGETS[name](port, table, target), port, args.server_cpu, log) as proc:
        check_predict(port, bodies[0], files.n_candidates)
        if name in PREWARM:
            prewarm(port, bodies)
        run_wrk(files.wrk_script, port, WARMUP_S, connections, args.client_cpu)
        with EmulatorControl(target) as control:
            control.reset()
            cpu_before = session_cpu_seconds(proc.pid)
            emulator_before = session_cpu_seconds(emulator_pid)
            result = run_wrk(files.wrk_script, port, args.duration, connections, args.client_cpu)
            cpu_s = session_cpu_seconds(proc.pid) - cpu_before
            emulator_cpu_s = session_cpu_seconds(emulator_pid) - emulator_before
            stats = control.stats()
    latency = result["latency_us"]
    return Run(
        requests=int(result["requests"]),
        duration_s=result["duration_us"] / 1e6,
        errors=sum(int(v) for v in result["errors"].values()),
        p50_ms=latency["p50"] / 1e3,
        p99_ms=latency["p99"] / 1e3,
        cpu_s=cpu_s,
        store_calls=sum(stats["calls"].values()),
        store_ids=int(stats["ids"]),
        emulator_cpu_s=emulator_cpu_s,
    )


def summarize(runs: list[Run]) -> dict[str, float]:
    med = statistics.median
    rps = med(r.rps for r in runs)
    return {
        "rps": rps,
        "pairs_per_s": rps * 400,
        "p50_ms": med(r.p50_ms for r in runs),
        "p99_ms": med(r.p99_ms for r in runs),
        "cpu_us_per_request": med(r.cpu_us_per_request for r in runs),
        "ids_per_call": med(r.ids_per_call for r in runs),
        "hit_rate": med(r.hit_rate for r in runs),
        "emulator_cpu_us_per_request": med(1e6 * r.emulator_cpu_s / max(r.requests, 1) for r in runs),
        "errors": sum(r.errors for r in runs),
    }


def expected_calls_per_request(n: int, hit_rate: float, chunk: int = CHUNK) -> float:
    """E[ceil(M / chunk)] for M ~ Binomial(n, 1 - hit_rate): read calls one request sends, ids missing alone."""
    p = 1.0 - hit_rate
    total = 0.0
    for m in range(1, n + 1):
        log_pmf = math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1)
        if p >= 1.0:
            pmf = 1.0 if m == n else 0.0
        elif p <= 0.0:
            pmf = 0.0
        else:
            pmf = math.exp(log_pmf + m * math.log(p) + (n - m) * math.log1p(-p))
        total += pmf * math.ceil(m / chunk)
    return total


def fleet_table(hit_rates: Sequence[float], n: int = 400) -> list[dict[str, float]]:
    """Read calls and entity ids per second the fleet sends to Vertex at 3 M scored candidates per second."""
    requests_per_s = FLEET_PAIRS_PER_S / n
    return [
        {
            "hit_rate": h,
            "requests_per_s": requests_per_s,
            "calls_per_request": expected_calls_per_request(n, h),
            "read_calls_per_s": requests_per_s * expected_calls_per_request(n, h),
            "entity_ids_per_s": FLEET_PAIRS_PER_S * (1.0 - h),
        }
        for h in hit_rates
    ]


def print_report(env: dict[str, Any], args: argparse.Namespace, medians: dict[str, dict[str, float]]) -> None:
    print(f"# {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs; {env['python']}")
    print(
        f"# server on cpu {args.server_cpu}; wrk -t1 -c{args.connections} (naive, cold: -c{args.cold_connections}) "
        f"-d{args.duration}s and the emulator "
        f"({args.latency_ms} ms +- {args.jitter_ms} ms per read) on cpu {args.client_cpu}; {WORKLOAD}; median of "
        f"{args.repeats} run(s), targets interleaved; shared host: expect noise"
    )
    header = ("target", "req/s", "pairs/s", "p50 ms", "p99 ms", "CPU us/req", "ids/call", "hit rate", "emu us/req",
              "errors")  # fmt: skip
    rows = [header]
    for name, m in medians.items():
        rows.append((
            name, f"{m['rps']:,.0f}", f"{m['pairs_per_s']:,.0f}", f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}",
            f"{m['cpu_us_per_request']:,.0f}", f"{m['ids_per_call']:.1f}", f"{m['hit_rate']:.4f}",
            f"{m['emulator_cpu_us_per_request']:,.0f}", f"{m['errors']:.0f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for mine, base in RATIOS:
        if mine in medians and base in medians:
            a, b = medians[mine], medians[base]
            print(
                f"{mine}/{base}: req/s {a['rps'] / b['rps']:.2f}x, "
                f"CPU per request {a['cpu_us_per_request'] / b['cpu_us_per_request']:.2f}x"
            )
    print(f"\n# fleet: Vertex reads for {FLEET_PAIRS_PER_S:,} scored candidates/s ({WORKLOAD}, chunks of {CHUNK})")
    print("hit rate  requests/s  read calls/req  read calls/s  entity ids/s")
    measured = [medians["warm"]["hit_rate"]] if "warm" in medians else []
    for row in fleet_table([0.0, 0.9, 0.99, 0.999, *measured]):
        print(
            f"{row['hit_rate']:8.4f}  {row['requests_per_s']:10,.0f}  {row['calls_per_request']:14.3f}  "
            f"{row['read_calls_per_s']:12,.0f}  {row['entity_ids_per_s']:12,.0f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_vertex", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument(
        "--cold-connections", type=int, default=8, help="wrk connections for naive and cold (default 8)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per target (default 3)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="emulator latency per read (default 5)")
    parser.add_argument("--jitter-ms", type=float, default=2.0, help="emulator jitter per read (default 2)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--versions", action="store_true", help="print machine and package versions and exit")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        parser.error(f"unknown targets {unknown}; expected some of {list(TARGETS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    if args.versions:
        print(orjson.dumps(env, option=orjson.OPT_INDENT_2).decode())
        return 0
    require_tools()
    if not {args.server_cpu, args.client_cpu} <= os.sched_getaffinity(0) or args.server_cpu == args.client_cpu:
        sys.exit(f"need two distinct usable cores, got server {args.server_cpu} and client {args.client_cpu}")
    runs: dict[str, list[Run]] = {t: [] for t in args.targets}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_vertex-") as tmp:
        table, files = workload.write_workloads(tmp, [WORKLOAD])
        with running_emulator(table, args, Path(tmp) / "emulator.log") as emulator:
            for rep in range(args.repeats):
                for name in args.targets:
                    if name in failed:
                        continue
                    print(f"[{rep + 1}/{args.repeats}] {name} ...", end=" ", file=sys.stderr, flush=True)
                    try:
                        run = measure(name, table, files[WORKLOAD], emulator, args, Path(tmp) / f"{name}-{rep}.log")
                    except (TargetError, subprocess.TimeoutExpired, OSError) as exc:
                        failed[name] = str(exc)
                        print("FAILED", file=sys.stderr)
                        continue
                    runs[name].append(run)
                    print(f"{run.rps:,.0f} req/s, {run.cpu_us_per_request:,.0f} us CPU/req", file=sys.stderr)
    medians = {name: summarize(r) for name, r in runs.items() if r and name not in failed}
    if args.json:
        doc = {
            "environment": env,
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "versions")},
            "medians": medians,
            "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
            "fleet": fleet_table([0.0, 0.9, 0.99, 0.999]),
            "failed": failed,
        }
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(env, args, medians)
    for name, error in failed.items():
        print(f"\n{name} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
