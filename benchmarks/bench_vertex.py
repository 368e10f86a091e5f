"""Vertex feature path benchmark: Feature Store 2.0 and Legacy on the emulator, against the naive baseline and the
embedded source.

One emulator (``python -m mab_service.emulator``, ``--latency-ms`` +- ``--jitter-ms`` per read) serves the workload's
table for the whole run. Each steady-state measurement starts a fresh server pinned to ``--server-cpu``, checks one
answer, warms up, and loads it with wrk pinned to ``--client-cpu`` (the emulator shares that core). Targets
alternate across ``--repeats`` and medians are reported; emulator counters give the store calls and ids of each
run, the service's /metrics its shed (503) and degraded answers, and both processes' CPU is measured.

Steady-state targets (``-cold``: cache off, every candidate read from the store; ``-warm``: cache on and filled
before the run, every body sent once):
    naive             benchmarks/baselines/naive_vertex.py: Legacy, chunks one after another, proto-plus decoding
    legacy-cold/-warm ``vertex:`` (Feature Store Legacy), deadline 5 s so that it queues like the baseline
    fos-cold/-warm    ``vertex-fos:`` with the defaults: the batched v1beta1 streaming fetch
    v1-cold/-warm     ``vertex-fos:`` with ``--vertex-api-version v1``: one key per call
    embedded          the embedded CSV source (the reference for the warm cache)

Cold-start targets: a fresh server on the default settings, loaded with wrk ``-c{--start-connections}`` from its
first second for ``--start-duration`` seconds; its /metrics, read every second, give the answers 200, degraded
and shed of each second. Reported: the time to 90% of the warm throughput (the matching ``-warm`` target of the
same run, else the last 5 seconds), and the degraded and shed answers before and after that point.
    fos-start         default settings (v1beta1, cache on)
    fos-start-warm-up the same with ``--warmup-ids`` of the whole table: warm before /health turns 200
    v1-start          ``--vertex-api-version v1``

    python -m benchmarks.bench_vertex [--duration 8] [--connections 32] [--cold-connections 8] [--repeats 3]
                                      [--targets ...] [--start-duration 30] [--start-connections 16]
                                      [--latency-ms 5] [--jitter-ms 2] [--json] [--versions]
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
import time
import urllib.error
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
FEATURE_VIEW = "projects/bench/locations/local/featureOnlineStores/bench/featureViews/content"
WORKLOAD = "W400"
CHUNK = 100
#: Bodies written for the workload: 1,024 W400 bodies draw ~107,000 distinct ids of the 110,000 (~97,000 known).
N_BODIES = 1024
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


def _legacy(cache_ttl_s: str) -> TargetFactory:
    def target(port: int, table: Path, emulator: str) -> list[str]:
        # The deadline is long so that an overloaded server queues rather than sheds: the baseline has none.
        return _service(port, f"vertex:{ENTITY_TYPE}", "--vertex-emulator-host", emulator, "--cache-ttl-s",
                        cache_ttl_s, "--vertex-deadline-s", "5", "--vertex-call-timeout-s", "5")  # fmt: skip

    return target


def _fos(*flags: str) -> TargetFactory:
    def target(port: int, table: Path, emulator: str) -> list[str]:
        extra = [f.replace("{table}", str(table)) for f in flags]
        return _service(port, f"vertex-fos:{FEATURE_VIEW}", "--vertex-emulator-host", emulator, *extra)

    return target


def embedded_target(port: int, table: Path, emulator: str) -> list[str]:
    return _service(port, f"csv:{table}")


TARGETS: dict[str, TargetFactory] = {
    "naive": naive_target,
    "legacy-cold": _legacy("0"),
    "legacy-warm": _legacy("3600"),
    "fos-cold": _fos("--cache-ttl-s", "0"),
    "fos-warm": _fos("--cache-ttl-s", "3600", "--warmup-ids", "{table}"),
    "v1-cold": _fos("--cache-ttl-s", "0", "--vertex-api-version", "v1"),
    # The per-key API reads ~4,000 keys/s from the emulator: its warm-up is cut short, prewarm() reads the rest.
    "v1-warm": _fos(
        "--cache-ttl-s", "3600", "--vertex-api-version", "v1", "--warmup-ids", "{table}", "--warmup-timeout-s", "40"
    ),  # fmt: skip
    "embedded": embedded_target,
    "fos-start": _fos(),
    "fos-start-warm-up": _fos("--warmup-ids", "{table}"),
    "v1-start": _fos("--vertex-api-version", "v1"),
}
#: Tries of a body shed while the cache is filled before a warm run.
PREWARM_TRIES = 200
#: Targets whose cache is filled before the measured run.
PREWARM = {"legacy-warm", "fos-warm", "v1-warm"}
#: Targets that read every candidate from the store: they get fewer connections (``--cold-connections``): with
#: 32, queueing alone would pass wrk's 2 s timeout.
COLD = {"naive", "legacy-cold", "fos-cold", "v1-cold"}
#: Cold starts: measured as a time series from the server's first second (``measure_start``).
START = {"fos-start": "fos-warm", "fos-start-warm-up": "fos-warm", "v1-start": "v1-warm"}
#: Ratios reported: (target, baseline).
RATIOS = [("legacy-cold", "naive"), ("fos-cold", "legacy-cold"), ("fos-cold", "naive"), ("legacy-warm", "embedded"),
          ("fos-warm", "embedded"), ("v1-warm", "embedded")]  # fmt: skip


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
    non_2xx: int = 0
    """Answers other than 200: sheds (503 ``overloaded``) under these benchmarks."""
    degraded: int = 0
    """200 answers marked degraded (some candidates got the prior because the store was not read)."""

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def rps(self) -> float:
        """Answers 200 per second (sheds do not count)."""
        return self.ok / self.duration_s

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(self.ok, 1)

    @property
    def cpu_us_per_entity(self) -> float:
        return self.cpu_us_per_request / 400

    @property
    def hit_rate(self) -> float:
        """Share of candidates served without the store. The store counts the reads of every request in the
        window, wrk only those that completed in it, so without a cache this reads slightly below 0: clipped."""
        return min(1.0, max(0.0, 1.0 - self.store_ids / max(self.ok * 400, 1)))

    @property
    def ids_per_call(self) -> float:
        return self.store_ids / self.store_calls if self.store_calls else 0.0


def answer_counts(port: int) -> dict[str, float]:
    """The service's own counts from /metrics: /predict answers by status, degraded fetches (0 where absent)."""
    counts = {"200": 0.0, "503": 0.0, "degraded": 0.0}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return counts
    for line in text.splitlines():
        if line.startswith('mab_requests_total{endpoint="/predict",status="'):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("mab_degraded_fetches_total "):
            counts["degraded"] = float(line.rsplit(" ", 1)[1])
    return counts


def machine_load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the shared cores shows here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


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
    """Send every body once, so that a cache holds every candidate of the workload. A body shed (503
    ``overloaded``: its reads did not finish in time, and go on to fill the cache) is sent again.

    Raises:
        TargetError: If a body is answered anything else, or still shed after ``PREWARM_TRIES``.
    """

    def post(body: bytes) -> None:
        for _ in range(PREWARM_TRIES):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    if resp.status == 200:
                        return
                    raise TargetError(f"prewarm answered {resp.status}")
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    raise TargetError(f"prewarm answered {exc.code}") from exc
                time.sleep(0.05)
        raise TargetError(f"prewarm: a body was still shed after {PREWARM_TRIES} tries")

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
    connections = args.connections
    if name in COLD:
        connections = args.fos_cold_connections if name.startswith(("fos", "v1")) else args.cold_connections
    with running_server(TARGETS[name](port, table, target), port, args.server_cpu, log) as proc:
        prewarm(port, bodies[:1])  # the one-key-per-call API may shed a cold request: sent until it is read
        check_predict(port, bodies[0], files.n_candidates)
        if name in PREWARM:
            prewarm(port, bodies)
        run_wrk(files.wrk_script, port, WARMUP_S, connections, args.client_cpu)
        with EmulatorControl(target) as control:
            control.reset()
            before = answer_counts(port)
            cpu_before = session_cpu_seconds(proc.pid)
            emulator_before = session_cpu_seconds(emulator_pid)
            result = run_wrk(files.wrk_script, port, args.duration, connections, args.client_cpu)
            cpu_s = session_cpu_seconds(proc.pid) - cpu_before
            emulator_cpu_s = session_cpu_seconds(emulator_pid) - emulator_before
            after = answer_counts(port)
            stats = control.stats()
    latency = result["latency_us"]
    return Run(
        requests=int(result["requests"]),
        duration_s=result["duration_us"] / 1e6,
        errors=sum(int(v) for k, v in result["errors"].items() if k != "status"),
        p50_ms=latency["p50"] / 1e3,
        p99_ms=latency["p99"] / 1e3,
        cpu_s=cpu_s,
        store_calls=sum(stats["calls"].values()),
        store_ids=int(stats["ids"]),
        emulator_cpu_s=emulator_cpu_s,
        non_2xx=int(result["errors"]["status"]),
        degraded=int(after["degraded"] - before["degraded"]),
    )


@dataclass(frozen=True)
class Start:
    """A cold start under load: per 1 s slice, answers 200 per second, degraded and shed answers."""

    ready_s: float
    """Seconds from starting the server to /health 200 (the warm-up, if any, included)."""
    slices: list[dict[str, float]]
    cpu_s: float
    emulator_cpu_s: float


def measure_start(
    name: str,
    table: Path,
    files: workload.WorkloadFiles,
    emulator: tuple[str, int],
    args: argparse.Namespace,
    log: Path,
) -> Start:
    """Start a fresh server and load it with one wrk run from its first second on; the service's own counts
    (/metrics, flushed on each scrape) give the answers of each second."""
    target, emulator_pid = emulator
    port = free_port()
    started = time.monotonic()
    emulator_before = session_cpu_seconds(emulator_pid)
    with running_server(TARGETS[name](port, table, target), port, args.server_cpu, log) as proc:
        ready_s = time.monotonic() - started
        url = f"http://127.0.0.1:{port}/predict"
        argv = ["taskset", "-c", str(args.client_cpu), "wrk", "-t1", f"-c{args.start_connections}",
                f"-d{args.start_duration}s", "-s", str(files.wrk_script), url]  # fmt: skip
        slices = []
        before, at = answer_counts(port), time.monotonic()
        wrk = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for k in range(args.start_duration):
                time.sleep(max(0.0, at + 1.0 - time.monotonic()))
                after, now = answer_counts(port), time.monotonic()
                seconds = now - at
                slices.append({
                    "seconds": seconds,
                    "rps": (after["200"] - before["200"]) / seconds,
                    "degraded": after["degraded"] - before["degraded"],
                    "shed": after["503"] - before["503"],
                    "timeouts": 0,
                })  # fmt: skip
                before, at = after, now
        finally:
            wrk.terminate()
            wrk.wait(timeout=10)
        cpu_s = session_cpu_seconds(proc.pid)
    return Start(ready_s, slices, cpu_s, session_cpu_seconds(emulator_pid) - emulator_before)


def summarize_start(runs: list[Start], warm_rps: float | None) -> dict[str, float]:
    """Medians over runs: the time to 90% of warm throughput (the end of the first 1 s slice that reaches it), how
    many later slices fell below it (noise of the shared machine, or no convergence), degraded and shed answers
    before and after it, and the warm-up time."""
    med = statistics.median
    t90s, degraded_before, degraded_after, shed_after, plateaus, dips = [], [], [], [], [], []
    for run in runs:
        rates = [s["rps"] for s in run.slices]
        plateau = med(rates[-5:])
        reference = warm_rps or plateau
        first = next((k for k, r in enumerate(rates) if r >= 0.9 * reference), len(rates))
        t90s.append(sum(s["seconds"] for s in run.slices[: first + 1]) if first < len(rates) else math.inf)
        dips.append(sum(r < 0.9 * reference for r in rates[first + 1 :]))
        degraded_before.append(sum(s["degraded"] for s in run.slices[: first + 1]))
        degraded_after.append(sum(s["degraded"] for s in run.slices[first + 1 :]))
        shed_after.append(sum(s["shed"] for s in run.slices[first + 1 :]))
        plateaus.append(plateau)
    return {
        "ready_s": med(r.ready_s for r in runs),
        "t90_s": med(t90s),
        "warm_rps": warm_rps or med(plateaus),
        "plateau_rps": med(plateaus),
        "first_s_rps": med(r.slices[0]["rps"] for r in runs),
        "degraded_before_t90": med(degraded_before),
        "degraded_after_t90": med(degraded_after),
        "degraded_total": med(sum(s["degraded"] for s in r.slices) for r in runs),
        "shed_after_t90": med(shed_after),
        "slices_below_90_after": med(dips),
    }


def summarize(runs: list[Run]) -> dict[str, float]:
    med = statistics.median
    rps = med(r.rps for r in runs)
    return {
        "rps": rps,
        "pairs_per_s": rps * 400,
        "p50_ms": med(r.p50_ms for r in runs),
        "p99_ms": med(r.p99_ms for r in runs),
        "cpu_us_per_request": med(r.cpu_us_per_request for r in runs),
        "cpu_us_per_entity": med(r.cpu_us_per_entity for r in runs),
        "ids_per_call": med(r.ids_per_call for r in runs),
        "hit_rate": med(r.hit_rate for r in runs),
        "emulator_cpu_us_per_request": med(1e6 * r.emulator_cpu_s / max(r.ok, 1) for r in runs),
        "emulator_cpu_share": med(r.emulator_cpu_s / r.duration_s for r in runs),
        "shed": sum(r.non_2xx for r in runs),
        "degraded": sum(r.degraded for r in runs),
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


def print_report(
    env: dict[str, Any],
    args: argparse.Namespace,
    medians: dict[str, dict[str, float]],
    starts: dict[str, dict[str, float]],
    loads: list[str],
) -> None:
    print(f"# {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs; {env['python']}")
    print(
        f"# server on cpu {args.server_cpu}; wrk -t1 -c{args.connections} (cold: legacy -c{args.cold_connections}, "
        f"fos and v1 -c{args.fos_cold_connections}) "
        f"-d{args.duration}s and the emulator ({args.latency_ms} ms +- {args.jitter_ms} ms per read) on cpu "
        f"{args.client_cpu}; {WORKLOAD}; median of {args.repeats} run(s), targets interleaved"
    )
    print(f"# machine load (1/5/15 min) at each repeat: {'; '.join(loads)}")
    header = ("target", "req/s", "p50 ms", "p99 ms", "CPU us/req", "CPU us/entity", "ids/call", "hit rate",
              "emu us/req", "emu core", "shed", "degraded", "errors")  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for name, m in medians.items():
        rows.append((
            name, f"{m['rps']:,.0f}", f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}", f"{m['cpu_us_per_request']:,.0f}",
            f"{m['cpu_us_per_entity']:.2f}", f"{m['ids_per_call']:.1f}", f"{m['hit_rate']:.4f}",
            f"{m['emulator_cpu_us_per_request']:,.0f}", f"{m['emulator_cpu_share']:.0%}", f"{m['shed']:.0f}",
            f"{m['degraded']:.0f}", f"{m['errors']:.0f}",
        ))  # fmt: skip
    _print_rows(rows)
    for mine, base in RATIOS:
        if mine in medians and base in medians:
            a, b = medians[mine], medians[base]
            print(
                f"{mine}/{base}: req/s {a['rps'] / b['rps']:.2f}x, "
                f"CPU per request {a['cpu_us_per_request'] / b['cpu_us_per_request']:.2f}x"
            )
    if starts:
        print(
            f"\n# cold start under wrk -c{args.start_connections} for {args.start_duration} s, answers counted each "
            "second; warm = the -warm target's req/s in this run (else the last 5 s)"
        )
        header_start = ("target", "ready s", "first s req/s", "warm req/s", "last 5 s req/s", "90% of warm at s",
                  "later s below 90%", "degraded before", "degraded after", "shed after")  # fmt: skip
        rows = [header_start]
        for name, m in starts.items():
            rows.append((
                name, f"{m['ready_s']:.1f}", f"{m['first_s_rps']:,.0f}", f"{m['warm_rps']:,.0f}",
                f"{m['plateau_rps']:,.0f}", f"{m['t90_s']:.1f}", f"{m['slices_below_90_after']:.0f}",
                f"{m['degraded_before_t90']:.0f}",
                f"{m['degraded_after_t90']:.0f}", f"{m['shed_after_t90']:.0f}",
            ))  # fmt: skip
        _print_rows(rows)
    print(f"\n# fleet: Vertex reads for {FLEET_PAIRS_PER_S:,} scored candidates/s ({WORKLOAD}, chunks of {CHUNK})")
    print("hit rate  requests/s  read calls/req  read calls/s  entity ids/s")
    measured = [medians["fos-warm"]["hit_rate"]] if "fos-warm" in medians else []
    for row in fleet_table([0.0, 0.9, 0.99, 0.999, *measured]):
        print(
            f"{row['hit_rate']:8.4f}  {row['requests_per_s']:10,.0f}  {row['calls_per_request']:14.3f}  "
            f"{row['read_calls_per_s']:12,.0f}  {row['entity_ids_per_s']:12,.0f}"
        )


def _print_rows(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_vertex", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--cold-connections", type=int, default=8, help="wrk connections, Legacy cold (default 8)")
    parser.add_argument(
        "--fos-cold-connections", type=int, default=16, help="wrk connections, Feature Store 2.0 cold (default 16)"
    )
    parser.add_argument("--start-duration", type=int, default=30, help="seconds of each cold start (default 30)")
    parser.add_argument("--start-connections", type=int, default=16, help="wrk connections of cold starts (16)")
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
    runs: dict[str, list[Run]] = {t: [] for t in args.targets if t not in START}
    start_runs: dict[str, list[Start]] = {t: [] for t in args.targets if t in START}
    failed: dict[str, str] = {}
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_vertex-") as tmp:
        table, files = workload.write_workloads(tmp, [WORKLOAD], n_bodies=N_BODIES)
        with running_emulator(table, args, Path(tmp) / "emulator.log") as emulator:
            for rep in range(args.repeats):
                loads.append(machine_load())
                for name in args.targets:
                    if name in failed:
                        continue
                    print(f"[{rep + 1}/{args.repeats}] {name} ...", end=" ", file=sys.stderr, flush=True)
                    log = Path(tmp) / f"{name}-{rep}.log"
                    try:
                        if name in START:
                            start = measure_start(name, table, files[WORKLOAD], emulator, args, log)
                            start_runs[name].append(start)
                            rates = ", ".join(f"{s['rps']:,.0f}" for s in start.slices)
                            print(f"ready in {start.ready_s:.1f} s; req/s per second: {rates}", file=sys.stderr)
                            continue
                        run = measure(name, table, files[WORKLOAD], emulator, args, log)
                    except (TargetError, subprocess.TimeoutExpired, OSError) as exc:
                        failed[name] = str(exc)
                        print("FAILED", file=sys.stderr)
                        continue
                    runs[name].append(run)
                    print(
                        f"{run.rps:,.0f} req/s, {run.cpu_us_per_request:,.0f} us CPU/req, {run.non_2xx} shed, "
                        f"{run.degraded} degraded",
                        file=sys.stderr,
                    )
    medians = {name: summarize(r) for name, r in runs.items() if r and name not in failed}
    starts = {
        name: summarize_start(r, medians.get(START[name], {}).get("rps"))
        for name, r in start_runs.items()
        if r and name not in failed
    }
    if args.json:
        doc = {
            "environment": env,
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "versions")},
            "machine_load": loads,
            "medians": medians,
            "starts": starts,
            "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
            "start_runs": {name: [asdict(r) for r in rs] for name, rs in start_runs.items()},
            "fleet": fleet_table([0.0, 0.9, 0.99, 0.999]),
            "failed": failed,
        }
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(env, args, medians, starts, loads)
    for name, error in failed.items():
        print(f"\n{name} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
