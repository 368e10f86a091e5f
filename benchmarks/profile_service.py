"""Where a request's CPU goes, end to end: ``perf record`` of the service under wrk, in microseconds per request.

For each workload a fresh server (one worker, any bench_service target) is started pinned to one core and loaded by
wrk pinned to the other, as bench_service does; after a warm-up, ``perf record`` samples the server's processes for
``--duration`` seconds while wrk keeps loading it. The server's CPU time over the same window divided by the requests
wrk counted gives CPU us per request, which ``perf report``'s shares split by library and by function. Workloads side
by side, with a difference column, show what one costs over another (a segment: ``--workloads W400,W400S``).

    python -m benchmarks.profile_service [--workloads W400,W400S] [--targets project] [--duration 6] [--top 25]

Several targets and workloads give a column each (target/workload), in that order; with two columns a difference
column follows (``--workloads W400 --targets project,project-halflife``: what the half-life costs, and where).

Needs ``perf`` (linux-perf) and ``wrk``; ``perf`` must be allowed to sample other processes (root, or
kernel.perf_event_paranoid <= 1). The figures move with the machine's other load: compare workloads within one run.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import bench_service, workload

#: A line of ``perf report --sort dso,sym --stdio -g none``: share, library, kind, symbol.
_LINE = re.compile(r"\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)")


def profile(
    target: str, files: workload.WorkloadFiles, table: Path, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Load one fresh server with ``files``' bodies and sample it; returns requests, CPU us per request and the path
    of the perf data."""
    port = bench_service.free_port()
    argv = bench_service.TARGETS[target](port, table, 1)
    data = work / f"{target}-{files.name}.perf"
    with bench_service.running_server(argv, port, args.server_cpu, work / f"{target}-{files.name}.log") as proc:
        bench_service.run_wrk(files.wrk_script, port, bench_service.WARMUP_S, args.connections, args.client_cpu)
        load = subprocess.Popen(
            ["taskset", "-c", str(args.client_cpu), "wrk", "-t1", f"-c{args.connections}",
             f"-d{args.duration + 4}s", "-s", str(files.wrk_script), f"http://127.0.0.1:{port}/predict"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            cpu_before = bench_service.session_cpu_seconds(proc.pid)
            served_before = _served(port)
            # -a over the server's core would take other tenants too: follow the server's processes instead.
            pids = ",".join(bench_service.session_stats(proc.pid))
            subprocess.run(
                ["perf", "record", "-q", "-F", "1999", "-g", "-p", pids, "-o", str(data), "--",
                 "sleep", str(args.duration)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            cpu_s = bench_service.session_cpu_seconds(proc.pid) - cpu_before
            requests = _served(port) - served_before
        finally:
            load.communicate()
    if requests <= 0:
        raise bench_service.TargetError(f"{target} answered no /predict while it was sampled")
    return {"requests": requests, "cpu_us": 1e6 * cpu_s / requests, "data": data}


def _served(port: int) -> float:
    """The server's own count of answered /predict requests (``mab_requests_total``), any status."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mab_requests_total{") and 'endpoint="/predict"' in line
    )


def shares(data: Path, by: str) -> dict[str, float]:
    """``perf report``'s self-time shares (fractions) of ``data``, by ``dso`` or by ``dso,sym``."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", by, "--stdio", "-g", "none"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return parse_report(out, by)


def parse_report(text: str, by: str) -> dict[str, float]:
    """The shares (fractions) of a ``perf report --stdio`` sorted ``by`` ``dso`` or ``dso,sym``, summed per library
    (``_answer.cpython-311-x86_64-linux-gnu.so`` is ``_answer``) or per library and function."""
    found: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if by == "dso":
            m = re.match(r"\s+([\d.]+)%\s+(\S+)\s*$", line)
            if m:
                found[_library(m.group(2))] += float(m.group(1)) / 100
            continue
        m = _LINE.match(line)
        if m:
            found[f"{_library(m.group(2))}: {m.group(4).strip()[:90]}"] += float(m.group(1)) / 100
    return dict(found)


def _library(dso: str) -> str:
    return dso.split(".cpython-")[0].split(".so")[0]


def print_table(title: str, names: Sequence[str], us: dict[str, dict[str, float]], top: int) -> None:
    rows = sorted({k for v in us.values() for k in v}, key=lambda k: -max(v.get(k, 0.0) for v in us.values()))
    diff = len(names) == 2
    print(f"\n{title} (us per request)")
    for i, name in enumerate(names):
        print(f"  [{i + 1}] {name}")
    print("  ".join(f"{f'[{i + 1}]':>9}" for i in range(len(names))) + ("  difference" if diff else "") + "  part")
    for key in rows[:top]:
        values = [us[n].get(key, 0.0) for n in names]
        cols = "  ".join(f"{v:9.2f}" for v in values) + (f"  {values[1] - values[0]:+10.2f}" if diff else "")
        print(f"{cols}  {key}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_service", description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W400,W400S", help="comma-separated (default W400,W400S)")
    parser.add_argument("--targets", default="project", help="comma-separated bench_service targets (default project)")
    parser.add_argument("--duration", type=int, default=6, help="seconds sampled per workload (default 6)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--server-cpu", type=int, default=0, help="core the server is pinned to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="core wrk is pinned to (default 1)")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    known = set(workload.WORKLOADS) | set(workload.SEGMENTED_WORKLOADS)
    if not args.workloads or set(args.workloads) - known:
        parser.error(f"--workloads: some of {sorted(known)}")
    args.targets = [t for t in args.targets.split(",") if t]
    if not args.targets or set(args.targets) - set(bench_service.TARGETS):
        parser.error(f"--targets: some of {sorted(bench_service.TARGETS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("perf", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        print(f"profile_service: needs {', '.join(missing)} on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="profile-service-") as tmp:
        work = Path(tmp)
        table, files = workload.write_workloads(work / "workloads", args.workloads)
        runs = {
            f"{target}/{name}": profile(target, files[name], table, args, work)
            for target in args.targets
            for name in args.workloads
        }
        print(f"# server on cpu {args.server_cpu}, wrk -c{args.connections} on cpu {args.client_cpu}")
        for label, run in runs.items():
            print(f"{label}: {run['requests']:,.0f} requests sampled, {run['cpu_us']:.1f} us of server CPU per request")
        for title, by in (("By library", "dso"), ("By function", "dso,sym")):
            us = {label: {k: s * r["cpu_us"] for k, s in shares(r["data"], by).items()} for label, r in runs.items()}
            print_table(title, list(runs), us, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
