"""Step a Locust load up and find the most requests per second one node holds within a p99 latency budget.

    python -m loadtests.run [--users 1,2,4,8,16,32] [--step-s 12] [--warmup-s 3] [--p99-budget-ms 50]
                            [--candidate-mix 100:3,400:6,2000:1] [--target project] [--workers 1]
                            [--server-cpus 0] [--client-cpus 1] [--processes N] [--table CSV] [--json PATH]

The server is started on 127.0.0.1 through benchmarks.bench_service's target registry (production settings,
the embedded feature table that benchmarks/workload.py writes), pinned to ``--server-cpus``. For each user
count, Locust runs headless on ``--client-cpus`` with one worker process per core, then stops; each step prints
req/s, candidate pairs/s, p50/p95/p99, failures, and the CPU used by the server and by Locust itself over the
step's steady window (its first ``--warmup-s`` seconds excluded). The run stops at the first step over budget
or with failures, and always within ``len(users) * (step_s + STEP_GRACE_S)`` seconds; every process it started
is killed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import bench_service, extras, workload

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
#: Locust's start-up (import, fork, workers connecting) and shutdown on top of --step-s, at most.
STEP_GRACE_S = 45.0
SAMPLE_INTERVAL_S = 0.25
#: Requests finishing in the last moments of a step overlap Locust stopping its users: left out.
TAIL_TRIM_S = 0.5
#: CPU share of its cores above which a side counts as saturated.
SATURATED = 0.9


class StepError(RuntimeError):
    """A step could not be run or measured."""


@dataclass(frozen=True)
class Step:
    """One user count, measured over its steady window."""

    users: int
    window_s: float
    requests: int
    """/predict answers completed in the window."""
    pairs: int
    """Candidates in those requests."""
    p50_ms: float
    p95_ms: float
    p99_ms: float
    total_requests: int
    """Every request of the step, warm-up and /health included."""
    failures: int
    """Failed requests of the whole step (errors and wrong answers), warm-up and /health included."""
    server_cpu: float
    """Server CPU over the window, as a share of its cores (1.0 = all of them busy)."""
    client_cpu: float
    """Locust's CPU over the window, as a share of its cores."""
    other_load: float
    """Share of the server's cores busy with anything else (other processes, steal; Locust when it shares them)."""

    @property
    def rps(self) -> float:
        return self.requests / self.window_s

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.window_s

    @property
    def limit(self) -> str:
        """Which side ran out of CPU: ``server``, ``generator``, ``shared`` (the server's cores were full, but
        not with the server) or ``-`` (neither)."""
        if self.server_cpu >= SATURATED:
            return "server"
        if self.client_cpu >= SATURATED:
            return "generator"
        if self.server_cpu + self.other_load >= SATURATED:
            return "shared"
        return "-"


# --- measuring ------------------------------------------------------------------------------------------------


class CpuTrace:
    """A CPU-seconds counter sampled over wall-clock time (the clock the request recorder uses)."""

    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read
        self.times: list[float] = []
        self.cpu_s: list[float] = []

    def sample(self) -> None:
        self.times.append(time.time())
        self.cpu_s.append(self.read())

    def between(self, start: float, end: float) -> float:
        """CPU seconds used from ``start`` to ``end``, interpolated between samples."""
        if len(self.times) < 2:
            raise StepError("too few CPU samples")
        return float(np.interp(end, self.times, self.cpu_s) - np.interp(start, self.times, self.cpu_s))


def locust_argv(users: int, host: str, record_dir: Path, args: argparse.Namespace) -> list[str]:
    """Locust headless for one step: ``users`` recommenders plus the health probe, all started at once."""
    return [
        "taskset", "-c", args.client_cpus, sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
        "--headless", "--host", host, "--users", str(users + 1), "--spawn-rate", str(users + 1),
        "--run-time", f"{args.step_s}s", "--processes", str(args.processes), "--stop-timeout", "2",
        "--exit-code-on-error", "0", "--loglevel", "WARNING", "--only-summary",
        "--candidate-mix", args.candidate_mix, "--catalogue", args.catalogue,
        "--think-time-ms", str(args.think_time_ms), "--record-dir", str(record_dir),
    ]  # fmt: skip


def run_step(users: int, host: str, server_sid: int, workdir: Path, args: argparse.Namespace) -> Step:
    """Run Locust for one step while sampling both sides' CPU, then measure the steady window."""
    record_dir = workdir / f"step-{users}"
    log_path = workdir / f"locust-{users}.log"
    server = CpuTrace(lambda: bench_service.session_cpu_seconds(server_sid))
    cores = bench_service.cpu_set(args.server_cpus)
    server_cores = CpuTrace(lambda: bench_service.cores_busy_seconds(cores))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            locust_argv(users, host, record_dir, args),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the forked workers die with it
        )
    client = CpuTrace(lambda: bench_service.session_cpu_seconds(proc.pid))
    try:
        deadline = time.monotonic() + args.step_s + STEP_GRACE_S
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise StepError(f"Locust did not finish within {args.step_s + STEP_GRACE_S:.0f} s")
            for trace in (server, client, server_cores):
                trace.sample()
            time.sleep(SAMPLE_INTERVAL_S)
    finally:
        bench_service.stop_group(proc)
    if proc.returncode != 0:
        raise StepError(f"Locust exited with code {proc.returncode}:\n{bench_service.tail(log_path)}")
    files = sorted(record_dir.glob("requests-*.npz"))
    if not files:
        raise StepError(f"Locust recorded no requests:\n{bench_service.tail(log_path)}")
    parts = [np.load(f) for f in files]
    rec = {key: np.concatenate([p[key] for p in parts]) for key in ("end_s", "latency_ms", "ok", "n_candidates")}
    return measure_window(users, rec, server, client, server_cores, args)


def measure_window(
    users: int,
    rec: dict[str, np.ndarray],
    server: CpuTrace,
    client: CpuTrace,
    server_cores: CpuTrace,
    args: argparse.Namespace,
) -> Step:
    """Figures for one step from its request records, over [first answer + warm-up, last answer - trim]."""
    start = float(rec["end_s"].min()) + args.warmup_s
    end = float(rec["end_s"].max()) - TAIL_TRIM_S
    if end - start < 1.0:
        raise StepError(f"steady window of {end - start:.1f} s; raise --step-s above --warmup-s + 2")
    in_window = (rec["end_s"] >= start) & (rec["end_s"] <= end)
    predict = in_window & (rec["n_candidates"] > 0)
    if not predict.any():
        raise StepError("no /predict answer in the steady window")
    p50, p95, p99 = np.percentile(rec["latency_ms"][predict], [50, 95, 99])
    window_s = end - start
    n_server_cores = len(bench_service.cpu_set(args.server_cpus))
    server_s = server.between(start, end)
    return Step(
        users=users,
        window_s=window_s,
        requests=int(predict.sum()),
        pairs=int(rec["n_candidates"][predict].sum()),
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        total_requests=len(rec["ok"]),
        failures=int((~rec["ok"]).sum()),
        server_cpu=server_s / window_s / n_server_cores,
        client_cpu=client.between(start, end) / window_s / len(bench_service.cpu_set(args.client_cpus)),
        other_load=max(0.0, server_cores.between(start, end) - server_s) / window_s / n_server_cores,
    )


# --- reporting ------------------------------------------------------------------------------------------------

HEADER = (
    "users", "req/s", "pairs/s", "p50 ms", "p95 ms", "p99 ms", "failures", "server CPU", "Locust CPU", "other load",
    "limit",
)  # fmt: skip
WIDTHS = (5, 8, 11, 7, 7, 7, 13, 10, 10, 10, 9)


def format_row(cells: Sequence[str]) -> str:
    return "  ".join(cell.rjust(w) if i < len(cells) - 1 else cell for i, (cell, w) in enumerate(zip(cells, WIDTHS)))


def step_row(step: Step) -> str:
    return format_row(
        (
            str(step.users),
            f"{step.rps:,.0f}",
            f"{step.pairs_per_s:,.0f}",
            f"{step.p50_ms:.2f}",
            f"{step.p95_ms:.2f}",
            f"{step.p99_ms:.2f}",
            f"{step.failures}/{step.total_requests:,}",
            f"{step.server_cpu:.0%}",
            f"{step.client_cpu:.0%}",
            f"{step.other_load:.0%}",
            step.limit,
        )
    )


def conclusion(steps: Sequence[Step], args: argparse.Namespace) -> list[str]:
    """The closing lines: the max RPS per node within budget, and which side limited it."""
    node = f"{args.workers} worker(s) on cpu {args.server_cpus}"
    within = [s for s in steps if s.failures == 0 and s.p99_ms <= args.p99_budget_ms]
    if not within:
        return [
            f"no step held the p99 budget of {args.p99_budget_ms:g} ms without failures: "
            "start lower (--users 1) or raise --p99-budget-ms"
        ]
    best = max(within, key=lambda s: s.rps)
    server_cores = len(bench_service.cpu_set(args.server_cpus))
    lines = []
    if best.limit == "server":
        lines.append("the server's CPU was the limit: this is the node's capacity at this request mix")
    elif best.limit == "shared":
        lines.append(
            f"other work took {best.other_load:.0%} of the server's cores: the figure below is low; rerun when the "
            "machine is quiet"
        )
    elif best.limit == "generator":
        cpu_us = best.server_cpu * server_cores * 1e6 / best.rps
        lines.append(
            f"the load generator, not the server, was the limit: Locust used {best.client_cpu:.0%} of its "
            f"{len(bench_service.cpu_set(args.client_cpus))} core(s) while the server used {best.server_cpu:.0%} "
            f"of {server_cores}, so the figure below is a lower bound. At {cpu_us:,.0f} us of server CPU per "
            f"request, saturated server cores would serve about {server_cores * 1e6 / cpu_us:,.0f} req/s (a "
            "projection, not a measurement: python -m benchmarks.bench_service measures with wrk, which is faster)"
        )
    else:
        lines.append(
            "neither side was saturated at that step: the budget, not the CPU, set the limit (or more users "
            "would have loaded it further)"
        )
    if best.limit != "shared" and best.other_load > 0.1:
        lines.append(f"other work took {best.other_load:.0%} of the server's cores at that step")
    if steps[-1].limit == "generator" and len(steps) > 1:
        lines.append("latencies at a saturated generator include Locust's own queueing, not only the server's")
    lines.append(
        f"max RPS per node ({node}) within the p99 budget of {args.p99_budget_ms:g} ms: {best.rps:,.0f} req/s "
        f"({best.pairs_per_s:,.0f} pairs/s) at {best.users} users, p99 {best.p99_ms:.2f} ms, "
        f"server CPU {best.server_cpu:.0%}" + (" (generator-bound: a lower bound)" if best.limit == "generator" else "")
    )
    return lines


def environment() -> dict[str, Any]:
    """bench_service's machine and package versions, plus Locust's."""
    env = bench_service.environment()
    env["packages"]["locust"] = importlib.metadata.version("locust")
    return env


# --- CLI ------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users", type=bench_service.positive_ints, default=[1, 2, 4, 8, 16, 32], help="recommender users per step"
    )
    parser.add_argument("--step-s", type=int, default=12, help="seconds of load per step (default 12)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds left out at the start of each step")
    parser.add_argument("--p99-budget-ms", type=float, default=50.0, help="latency budget (default 50 ms)")
    parser.add_argument(
        "--candidate-mix", default=workload.LOAD_MIX, help=f"size:weight,... (default {workload.LOAD_MIX})"
    )
    parser.add_argument("--think-time-ms", type=float, default=0.0, help="pause between a user's requests")
    parser.add_argument(
        "--target",
        choices=list(bench_service.TARGETS),
        default="project",
        help="server to start, from benchmarks.bench_service's registry (default project)",
    )
    parser.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    parser.add_argument("--server-cpus", type=bench_service.cpu_list, default="0", help="server cores (default 0)")
    parser.add_argument(
        "--client-cpus", type=bench_service.cpu_list, default=None, help="Locust's cores (default: all the others)"
    )
    parser.add_argument("--processes", type=int, default=0, help="Locust worker processes (default: one per core)")
    parser.add_argument("--table", type=Path, help="feature table CSV (default: benchmarks/workload.py's)")
    parser.add_argument("--json", type=Path, help="also write the steps and the environment here as JSON")
    args = parser.parse_args(argv)
    usable = os.sched_getaffinity(0)
    if args.client_cpus is None:
        others = sorted(usable - bench_service.cpu_set(args.server_cpus))
        args.client_cpus = ",".join(map(str, others)) or args.server_cpus
    if not bench_service.cpu_set(args.server_cpus) | bench_service.cpu_set(args.client_cpus) <= usable:
        parser.error(f"cores {args.server_cpus} and {args.client_cpus} are not all among {sorted(usable)}")
    if args.processes < 1:
        args.processes = len(bench_service.cpu_set(args.client_cpus))
    if args.step_s < args.warmup_s + TAIL_TRIM_S + 1:
        parser.error("--step-s must exceed --warmup-s by more than 1.5 s")
    return args


@contextlib.contextmanager
def feature_table(args: argparse.Namespace, workdir: Path) -> Iterator[Path]:
    """The table the server loads; sets ``args.catalogue`` so Locust draws candidates to match it."""
    if args.table is not None:
        args.catalogue = f"csv:{args.table}"
        yield args.table
        return
    args.catalogue = f"synthetic:{workload.DEFAULT_ID_SPACE}"
    yield workload.write_table(workdir / "table.csv")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("taskset") is None:
        sys.exit("taskset not found on PATH (util-linux)")
    extras.ensure(["locust"])
    env = environment()
    steps: list[Step] = []
    stopped = ""
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp, feature_table(args, Path(tmp)) as table:
        workdir = Path(tmp)
        port = bench_service.free_port()
        host = f"http://127.0.0.1:{port}"
        argv_server = bench_service.TARGETS[args.target](port, table, args.workers)
        print(f"# {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs; {env['python']}")
        print(
            f"# {args.target}: {args.workers} worker(s) on cpu {args.server_cpus}; Locust "
            f"{env['packages'].get('locust')} with {args.processes} worker process(es) on cpu {args.client_cpus}; "
            f"mix {args.candidate_mix}; {args.step_s} s per step, first {args.warmup_s:g} s left out; "
            f"p99 budget {args.p99_budget_ms:g} ms"
        )
        if bench_service.cpu_set(args.server_cpus) & bench_service.cpu_set(args.client_cpus):
            print("# server and Locust share cores: each takes CPU from the other")
        print(format_row(HEADER), flush=True)
        try:
            with bench_service.running_server(argv_server, port, args.server_cpus, workdir / "server.log") as proc:
                for users in args.users:
                    step = run_step(users, host, proc.pid, workdir, args)
                    steps.append(step)
                    print(step_row(step), flush=True)
                    if step.failures:
                        stopped = f"stopped: {step.failures} failed request(s) at {users} users"
                    elif step.p99_ms > args.p99_budget_ms:
                        stopped = f"stopped: p99 {step.p99_ms:.1f} ms is over the budget at {users} users"
                    if stopped:
                        break
        except (bench_service.TargetError, StepError) as exc:
            print(f"load test failed: {exc}", file=sys.stderr)
            return 1
    if stopped:
        print(stopped)
    for line in conclusion(steps, args):
        print(line)
    if args.json:
        doc = {
            "environment": env,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "steps": [asdict(s) | {"rps": s.rps, "pairs_per_s": s.pairs_per_s, "limit": s.limit} for s in steps],
            "conclusion": conclusion(steps, args),
        }
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
