"""End-to-end service benchmark: mab_service against the plain Starlette and Go baselines and the floor, side by side.

For every measurement a fresh server is started pinned to one core (``taskset -c 0``), probed on ``/health``,
warmed up, and then loaded by ``wrk`` pinned to the other core (``taskset -c 1``); ``--workers 2
--server-cpus 0,1 --client-cpus 0,1`` measures all cores of a 2-core machine, wrk sharing them. Targets alternate
(A B A B ...) across ``--repeats`` and medians are reported, which keeps slow drift on a shared machine from
favouring one side. Server CPU time is read from ``/proc`` to give CPU-seconds per request, which is steadier
than req/s on a noisy host. The ``floor`` target (a bare uvicorn + httptools app answering a constant) gives, per
request, the server CPU microseconds the other targets spend above what uvicorn and the kernel cost ("CPU us over
floor").

    python -m benchmarks.bench_service [--duration 10] [--connections 32] [--workloads W400,W2000 | --sizes 10,100]
                                       [--targets project,plain,go] [--repeats 3] [--workers 1]
                                       [--server-cpus 0] [--client-cpus 1] [--json] [--versions]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib.metadata
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks import workload

#: A target turns (port, feature CSV path, workers) into the argv of a server listening on 127.0.0.1:port
#: with that many worker processes (or, for Go, threads running Go code).
TargetFactory = Callable[[int, Path, int], list[str]]

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE = "plain"
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
WARMUP_S = 2


def plain_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for the plain Starlette + numpy baseline (benchmarks/baselines/plain_starlette.py).

    Several workers run through uvicorn's CLI, which reads the table path from ``PLAIN_FEATURES``.
    """
    module = "benchmarks.baselines.plain_starlette"
    if workers == 1:
        return [sys.executable, "-m", module, "--port", str(port), "--features", str(features)]
    return [
        "env", f"PLAIN_FEATURES={features}", sys.executable, "-m", "uvicorn", f"{module}:app",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--loop", "uvloop",
        "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def project_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for mab_service through its own CLI, embedded CSV feature source, learning loop on (its state in a
    fresh directory under one temporary root that is deleted when the benchmark exits: a run at full speed writes
    about 100 MB/s of decision log)."""
    state = tempfile.mkdtemp(prefix="state-", dir=_state_root())
    return [
        sys.executable, "-m", "mab_service", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--features", f"csv:{features}",
        "--state-dir", state,
    ]  # fmt: skip


@functools.cache
def _state_root() -> str:
    root = tempfile.mkdtemp(prefix="mab-bench-state-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def project_halflife_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for mab_service with the learning loop on and counts decaying with a one-hour half-life."""
    return [*project_target(port, features, workers), "--half-life-s", "3600"]


def project_nodecisions_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for mab_service with the learning loop on and no decision log: beside ``project``, what the log costs."""
    return [*project_target(port, features, workers), "--no-decision-log"]


def project_halflife_nodecisions_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """``project-halflife`` without the decision log: beside ``project-nodecisions``, what the decay alone costs."""
    return [*project_halflife_target(port, features, workers), "--no-decision-log"]


def project_nolearn_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for mab_service with the learning loop off: the service as a sampler over a fixed table."""
    return [*project_target(port, features, workers)[:-2], "--no-learning"]


def floor_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for the floor (benchmarks/baselines/floor.py): uvicorn + httptools answering a constant, one worker
    (its answer is not checked: it ranks nothing)."""
    return [sys.executable, "-m", "benchmarks.baselines.floor", "--port", str(port)]


def go_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for the Go port on fasthttp (benchmarks/baselines/go), built on first use; ``workers`` sets
    GOMAXPROCS.

    Raises:
        TargetError: If the Go toolchain is missing or the build fails (run_all installs the toolchain).
    """
    from benchmarks.baselines.go import build

    try:
        binary = build.build()
    except build.GoBuildError as exc:
        raise TargetError(f"cannot build the Go baseline: {exc}") from exc
    return [
        str(binary), "-host", "127.0.0.1", "-port", str(port), "-features", str(features),
        "-gomaxprocs", str(workers),
    ]  # fmt: skip


def before_target(port: int, features: Path, workers: int = 1) -> list[str]:
    """Argv for mab_service as ``project`` runs it, from the checkout named by ``MAB_BENCH_BEFORE`` (built in place,
    ``python setup.py build_ext --inplace``): an earlier commit beside this one, in the same run.

    Raises:
        TargetError: If MAB_BENCH_BEFORE names no checkout.
    """
    tree = os.environ.get("MAB_BENCH_BEFORE", "")
    if not (Path(tree) / "mab_service").is_dir():
        raise TargetError("target before: set MAB_BENCH_BEFORE to a checkout built in place")
    # From the checkout's own directory: ``python -m`` puts the working directory first on sys.path.
    return ["env", "-C", tree, f"PYTHONPATH={tree}", *project_target(port, features, workers)]


#: Name -> argv factory. To benchmark another implementation, add one function returning its argv here; it
#: must serve GET /health and POST /predict on 127.0.0.1:port and exit on SIGTERM.
TARGETS: dict[str, TargetFactory] = {
    "project": project_target,
    "project-halflife": project_halflife_target,
    "project-nodecisions": project_nodecisions_target,
    "project-halflife-nodecisions": project_halflife_nodecisions_target,
    "project-nolearn": project_nolearn_target,
    "plain": plain_target,
    "go": go_target,
    "floor": floor_target,
    "before": before_target,
}
#: Targets whose /predict answer is a constant, not a ranking: ``check_predict`` skips them.
UNCHECKED = frozenset({"floor"})


class TargetError(RuntimeError):
    """A server failed to start, answer correctly, or be measured."""


@dataclass(frozen=True)
class Measurement:
    """One wrk run against one freshly started server."""

    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    cpu_s: float
    other_load: float = 0.0
    """Share of the server's cores busy with anything but the server during the run (other processes, steal;
    wrk too when it shares them): a measurement taken while others loaded the cores is low."""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(self.requests, 1)


# --- processes ------------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def session_stats(sid: int) -> dict[str, list[str]]:
    """``/proc/PID/stat`` of every live process in session ``sid``, by pid: its fields from field 3 (state) on."""
    found: dict[str, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:  # the process exited between listdir and open
            continue
        # comm (field 2) may contain spaces and parentheses; fields after the last ")" start at field 3.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:  # field 6: session id
            found[entry] = fields
    return found


def session_cpu_seconds(sid: int) -> float:
    """CPU seconds (user + system) used by every live process in session ``sid``, plus reaped children.

    Summing utime+stime+cutime+cstime over the session keeps the total consistent when a worker exits: its
    time moves from its own entry into its parent's cutime/cstime and is counted once either way.
    """
    # fields 14-17: utime stime cutime cstime
    ticks = sum(int(v) for fields in session_stats(sid).values() for v in fields[11:15])
    return ticks / _CLK_TCK


def cores_busy_seconds(cpus: set[int]) -> float:
    """Busy time of the given cores since boot (all but idle and iowait, steal included), from /proc/stat."""
    ticks = 0
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
                # user nice system idle iowait irq softirq steal; guest time is already inside user.
                values = [int(v) for v in rest.split()[:8]]
                ticks += sum(values) - values[3] - values[4]
    return ticks / _CLK_TCK


def tail(path: Path, n_lines: int = 20) -> str:
    """The last lines of a log file, or nothing if it cannot be read."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n_lines:])
    return ""


@contextlib.contextmanager
def running_server(argv: list[str], port: int, cpu: int | str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` pinned to ``cpu`` (a core or a list such as ``"0,1"``) in its own session; yield it once
    ``/health`` answers 200.

    On exit the whole process group gets SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``, so no worker
    survives even if the server itself forks.

    Raises:
        TargetError: If the server exits early or is not healthy within ``HEALTH_TIMEOUT_S``.
    """
    with log_path.open("wb") as log:
        # start_new_session: the server leads its own session and process group (sid == pgid == pid), which
        # lets us account CPU for all its processes and signal them together. taskset execs in place.
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, port, log_path)
        yield proc
    finally:
        stop_group(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetError(f"server exited with code {proc.returncode} before becoming healthy:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or still starting (503)
        time.sleep(0.1)
    raise TargetError(f"/health not 200 within {HEALTH_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of ``proc`` (started in its own session), SIGKILL it after ``STOP_TIMEOUT_S``,
    and reap the leader."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
    # Sweep the group even after a clean exit: a forked worker can outlive its parent.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def check_predict(port: int, body: bytes, n_candidates: int) -> None:
    """Send one request and check the answer's shape, so we never benchmark a server that only errors.

    Raises:
        TargetError: If the status is not 200 or ``ids`` does not hold ``min(top_k, n_candidates)`` entries.
    """
    top_k = int(orjson.loads(body)["top_k"])
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10.0) as resp:
            answer = orjson.loads(resp.read())
    except (urllib.error.URLError, OSError, orjson.JSONDecodeError) as exc:
        raise TargetError(f"POST /predict failed: {exc!r}") from exc
    ids = answer.get("ids") if isinstance(answer, dict) else None
    if not isinstance(ids, list) or len(ids) != min(top_k, n_candidates):
        raise TargetError(f"POST /predict answered an unexpected body: {str(answer)[:300]}")


def run_wrk(script: Path, port: int, duration_s: int, connections: int, cpu: int | str) -> dict[str, Any]:
    """Run wrk pinned to ``cpu`` and return its parsed ``WRKJSON`` line.

    Raises:
        TargetError: If wrk fails or prints no result line.
    """
    argv = [
        "taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency",
        "-s", str(script), f"http://127.0.0.1:{port}/predict",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if done.returncode != 0:
        raise TargetError(f"wrk exited with code {done.returncode}: {done.stderr.strip()}")
    try:
        return workload.parse_wrk_output(done.stdout)
    except ValueError as exc:
        raise TargetError(str(exc)) from exc


def measure(
    argv_for: TargetFactory,
    table: Path,
    files: workload.WorkloadFiles,
    args: argparse.Namespace,
    log_path: Path,
    *,
    check: bool = True,
) -> Measurement:
    """Start one server, check its answer (unless ``check`` is off), warm it up, load it with wrk and stop it."""
    port = free_port()
    first_body = files.bodies.read_bytes().split(b"\n", 1)[0]
    with running_server(argv_for(port, table, args.workers), port, args.server_cpus, log_path) as proc:
        if check:
            check_predict(port, first_body, files.n_candidates)
        run_wrk(files.wrk_script, port, WARMUP_S, args.connections, args.client_cpus)
        cores = cpu_set(args.server_cpus)
        cpu_before, busy_before = session_cpu_seconds(proc.pid), cores_busy_seconds(cores)
        result = run_wrk(files.wrk_script, port, args.duration, args.connections, args.client_cpus)
        cpu_s = session_cpu_seconds(proc.pid) - cpu_before
        other_s = max(0.0, cores_busy_seconds(cores) - busy_before - cpu_s)
    latency = result["latency_us"]
    return Measurement(
        requests=int(result["requests"]),
        duration_s=result["duration_us"] / 1e6,
        errors=sum(int(v) for v in result["errors"].values()),
        p50_ms=latency["p50"] / 1e3,
        p90_ms=latency["p90"] / 1e3,
        p99_ms=latency["p99"] / 1e3,
        p999_ms=latency["p99.9"] / 1e3,
        cpu_s=cpu_s,
        other_load=other_s / (result["duration_us"] / 1e6) / len(cores),
    )


def measure_interleaved(
    targets: Mapping[str, TargetFactory],
    table: Path,
    files: workload.WorkloadFiles,
    args: argparse.Namespace,
    work: Path,
    part: str,
) -> dict[str, dict[str, float]]:
    """Each target measured ``args.repeats`` times, the targets alternating so that the machine's drift falls on
    all of them; the medians per target (``summarize``). Logs go to ``work/<part>-<target>-<run>.log``."""
    runs: dict[str, list[Measurement]] = {name: [] for name in targets}
    for i in range(args.repeats):
        for name, target in targets.items():
            runs[name].append(measure(target, table, files, args, work / f"{part}-{name}-{i}.log"))
            print(f"  {part} {name} run {i + 1}: {runs[name][-1].rps:,.0f} req/s", file=sys.stderr)
    return {name: summarize(r, files.n_candidates) for name, r in runs.items()}


# --- reporting ------------------------------------------------------------------------------------------------


def summarize(runs: list[Measurement], n_candidates: int) -> dict[str, float]:
    """Median of each metric over repeated runs (medians taken per metric, not of one chosen run)."""
    rps = statistics.median(m.rps for m in runs)
    return {
        "rps": rps,
        "pairs_per_s": rps * n_candidates,
        "p50_ms": statistics.median(m.p50_ms for m in runs),
        "p90_ms": statistics.median(m.p90_ms for m in runs),
        "p99_ms": statistics.median(m.p99_ms for m in runs),
        "p999_ms": statistics.median(m.p999_ms for m in runs),
        "cpu_us_per_request": statistics.median(m.cpu_us_per_request for m in runs),
        "other_load": statistics.median(m.other_load for m in runs),
        "errors": sum(m.errors for m in runs),
    }


#: The CPU flags that the kernel's speed depends on, reported with every figure when the CPU has them.
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "bmi2", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
)  # fmt: skip


def environment() -> dict[str, Any]:
    """Machine, Python and package versions that every published number must state."""
    cpu_model = platform.processor()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            # The first processor's lines: its model name comes before its flags.
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    packages: dict[str, str | None] = {}
    for name in ("mab_service", "numpy", "starlette", "uvicorn", "uvloop", "httptools", "orjson"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    wrk_version = None
    with contextlib.suppress(OSError):
        # wrk has no real --version: it prints its banner and usage, and exits non-zero.
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].strip() or None
    return {
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu_model,
        "cpus_available": len(os.sched_getaffinity(0)),
        "simd": " ".join(flag for flag in SIMD_FLAGS if flag in flags),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": packages,
        "wrk": wrk_version,
    }


def ratios(results: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per target and workload: req/s and CPU per request relative to the baseline target."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (target, name), res in results.items():
        base = results.get((BASELINE, name))
        if target == BASELINE or base is None or "median" not in res or "median" not in base:
            continue
        mine, ref = res["median"], base["median"]
        out.setdefault(target, {})[name] = {
            "rps": mine["rps"] / ref["rps"],
            "cpu_per_request": mine["cpu_us_per_request"] / ref["cpu_us_per_request"],
        }
    return out


def against_go_and_floor(results: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per target and workload, when measured in the same run: req/s relative to the Go port (``x_go``), and the
    microseconds per request above the floor (``over_floor_us``: one core's time per request, 1e6 / req/s, minus
    the floor's; ``over_floor_cpu_us``: the same in server CPU per request)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for (target, name), res in results.items():
        mine = res.get("median")
        if mine is None:
            continue
        row: dict[str, float] = {}
        go = results.get(("go", name), {}).get("median")
        if go is not None and target != "go":
            row["x_go"] = mine["rps"] / go["rps"]
        floor = results.get(("floor", name), {}).get("median")
        if floor is not None and target != "floor":
            row["over_floor_us"] = 1e6 / mine["rps"] - 1e6 / floor["rps"]
            row["over_floor_cpu_us"] = mine["cpu_us_per_request"] - floor["cpu_us_per_request"]
        if row:
            out[(target, name)] = row
    return out


def results_document(
    env: dict[str, Any],
    args: argparse.Namespace,
    results: dict[tuple[str, str], dict[str, Any]],
    n_candidates: dict[str, int],
) -> dict[str, Any]:
    """The ``--json`` output: environment, configuration, per-run figures, medians and ratios."""
    config = {k: v for k, v in vars(args).items() if k not in ("json", "versions")}
    return {
        "environment": env,
        "config": config | {"warmup_s": WARMUP_S},
        "results": [
            {
                "target": target,
                "workload": name,
                "n_candidates": n_candidates[name],
                "median": res.get("median"),
                "error": res.get("error"),
                "runs": [asdict(m) | {"rps": m.rps, "cpu_us_per_request": m.cpu_us_per_request} for m in res["runs"]],
            }
            for (target, name), res in results.items()
        ],
        f"ratios_vs_{BASELINE}": ratios(results),
        "against_go_and_floor": [
            {"target": target, "workload": name, **row} for (target, name), row in against_go_and_floor(results).items()
        ],
    }


def print_table(env: dict[str, Any], args: argparse.Namespace, results: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Print the medians as a text table with the run conditions above it."""
    print(f"# {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs; {env['python']}")
    print(
        f"# server ({args.workers} worker(s)) on cpu {args.server_cpus}, wrk -t1 -c{args.connections} "
        f"-d{args.duration}s on cpu {args.client_cpus}; median of {args.repeats} run(s), targets interleaved; "
        "shared host: expect noise"
    )
    print("# other load: share of the server's cores busy with other work during the run (a high one lowers req/s)")
    if shared_cores(args):
        print("# server and wrk share cores: req/s includes wrk's share of them (and other load counts wrk)")
    header = (
        "target", "workload", "req/s", "pairs/s", "p50 ms", "p99 ms", "CPU us/req", "other load", "errors",
        f"x {BASELINE}", "x go", "CPU us over floor",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    rel = ratios(results)
    against = against_go_and_floor(results)
    for (target, name), res in results.items():
        if "median" not in res:
            rows.append((target, name, "FAILED", *[""] * (len(header) - 3)))
            continue
        m = res["median"]
        ratio = rel.get(target, {}).get(name)
        other = against.get((target, name), {})
        rows.append(
            (
                target,
                name,
                f"{m['rps']:,.0f}",
                f"{m['pairs_per_s']:,.0f}",
                f"{m['p50_ms']:.2f}",
                f"{m['p99_ms']:.2f}",
                f"{m['cpu_us_per_request']:,.0f}",
                f"{m['other_load']:.0%}",
                str(m["errors"]),
                f"{ratio['rps']:.2f}" if ratio else "",
                f"{other['x_go']:.2f}" if "x_go" in other else "",
                f"{other['over_floor_cpu_us']:.1f}" if "over_floor_cpu_us" in other else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for target, per_workload in rel.items():
        for name, r in per_workload.items():
            print(f"{target}/{BASELINE} {name}: req/s {r['rps']:.2f}x, CPU per request {r['cpu_per_request']:.2f}x")
    for (target, name), res in results.items():
        if "error" in res:
            print(f"\n{target} {name} failed: {res['error']}", file=sys.stderr)


# --- CLI ------------------------------------------------------------------------------------------------------


def _names(value: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; expected some of {list(known)}")
    return names


def size_list(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > workload.DEFAULT_ID_SPACE:
        raise argparse.ArgumentTypeError(f"sizes must be in [1, {workload.DEFAULT_ID_SPACE}], got {value!r}")
    return sizes


def cpu_list(value: str) -> str:
    """A taskset core list of single cores, e.g. ``0`` or ``0,1``."""
    try:
        cores = sorted({int(v) for v in value.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cores such as 0 or 0,1, got {value!r}") from None
    return ",".join(map(str, cores))


def positive_ints(value: str) -> list[int]:
    """A comma-separated list of integers >= 1, e.g. ``8,16,32`` (an argparse type)."""
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {value!r}")
    return out


def cpu_set(cpus: str) -> set[int]:
    return {int(v) for v in cpus.split(",")}


def shared_cores(args: argparse.Namespace) -> bool:
    return bool(cpu_set(args.server_cpus) & cpu_set(args.client_cpus))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_service", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument(
        "--workloads",
        type=lambda v: _names(v, [*workload.WORKLOADS, *workload.SEGMENTED_WORKLOADS], "workloads"),
        default=list(workload.WORKLOADS),
        help=f"comma-separated, from {','.join([*workload.WORKLOADS, *workload.SEGMENTED_WORKLOADS])} (W400S: W400's "
        "bodies, each with a segment)",
    )
    parser.add_argument(
        "--targets",
        type=lambda v: _names(v, list(TARGETS), "targets"),
        default=list(TARGETS),
        help=f"comma-separated, from {','.join(TARGETS)}",
    )
    parser.add_argument("--repeats", type=int, default=3, help="measurements per target and workload (default 3)")
    parser.add_argument(
        "--sizes",
        type=size_list,
        help=f"candidates per request to sweep instead of --workloads, e.g. {','.join(map(str, workload.SWEEP_SIZES))}",
    )
    parser.add_argument("--workers", type=int, default=1, help="server workers (Go: GOMAXPROCS) (default 1)")
    parser.add_argument(
        "--server-cpus", "--server-cpu", type=cpu_list, default="0", help="cores the server is pinned to (default 0)"
    )
    parser.add_argument(
        "--client-cpus", "--client-cpu", type=cpu_list, default="1", help="cores wrk is pinned to (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--versions", action="store_true", help="print machine and package versions and exit")
    return parser.parse_args(argv)


def require_tools() -> None:
    """Exit with a clear message unless wrk and taskset are on PATH."""
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found on PATH")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code (1 if any target failed)."""
    args = parse_args(argv)
    env = environment()
    if args.versions:
        print(orjson.dumps(env, option=orjson.OPT_INDENT_2).decode())
        return 0
    require_tools()
    usable = os.sched_getaffinity(0)
    if not cpu_set(args.server_cpus) | cpu_set(args.client_cpus) <= usable:
        sys.exit(f"cores {args.server_cpus} (server) and {args.client_cpus} (wrk) are not all among {sorted(usable)}")
    if args.workers < 1:
        sys.exit("--workers must be >= 1")
    if args.sizes:
        args.workloads = [workload.sweep_name(n) for n in args.sizes]

    results: dict[tuple[str, str], dict[str, Any]] = {
        (t, w): {"runs": []} for w in args.workloads for t in args.targets
    }
    with tempfile.TemporaryDirectory(prefix="bench_service-") as tmp:
        if args.sizes:
            table, files = workload.write_sweep(tmp, args.sizes)
        else:
            table, files = workload.write_workloads(tmp, args.workloads)
        for rep in range(args.repeats):
            for name in args.workloads:
                for target in args.targets:
                    res = results[(target, name)]
                    if "error" in res:
                        continue  # not retried: a broken target costs one failed start per workload, not one per repeat
                    print(f"[{rep + 1}/{args.repeats}] {target} {name} ...", end=" ", file=sys.stderr, flush=True)
                    log_path = Path(tmp) / f"{target}-{name}-{rep}.log"
                    try:
                        m = measure(TARGETS[target], table, files[name], args, log_path, check=target not in UNCHECKED)
                    except (TargetError, subprocess.TimeoutExpired) as exc:
                        res["error"] = str(exc)
                        print("FAILED", file=sys.stderr)
                        continue
                    res["runs"].append(m)
                    print(f"{m.rps:,.0f} req/s, p99 {m.p99_ms:.1f} ms, errors {m.errors}", file=sys.stderr)

    for (_, name), res in results.items():
        if res["runs"] and "error" not in res:
            res["median"] = summarize(res["runs"], files[name].n_candidates)
    if args.json:
        doc = results_document(env, args, results, {n: f.n_candidates for n, f in files.items()})
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        print_table(env, args, results)
    return 1 if any("error" in res for res in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
