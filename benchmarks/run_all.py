"""The benchmark suite in one command: kernel, end-to-end against both baselines, and a sweep of request sizes.

    python -m benchmarks.run_all [--quick] [--out docs/benchmarks] [--duration 5] [--repeats 3]
                                 [--sweep-duration 3] [--sizes 10,30,100,300,1000,3000,10000] [--no-go]

Runs, one after the other (each is its own command, printed in the report so it can be rerun alone):

1. ``benchmarks.bench_kernel``: ns per Beta sample against numpy.
2. ``benchmarks.bench_service`` on W400 and W2000 for mab_service, plain Starlette and the Go port, first one
   worker pinned to cpu 0 with wrk on cpu 1 (the per-core figures), then every core for the server with wrk
   sharing them.
3. ``benchmarks.bench_service --sizes``: the same three from 10 to 10,000 candidates per request, pinned.

Then prints the tables and writes ``results.md`` (tables, machine, commands, caveats), ``results.json`` (every
run) and ``throughput.png`` (req/s, candidates/s, CPU per candidate and p99 against request size) to ``--out``.
Missing tools are installed first: matplotlib from the project's ``bench`` extra, Go and fasthttp from Debian.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import bench_service, extras, plot, workload
from benchmarks.baselines.go import build as go_build

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks"
QUICK_OUT = REPO_ROOT / "build" / "benchmarks-quick"
TARGETS = ("project", "plain", "go")
NAMES = {"project": "mab_service", "plain": "plain Starlette", "go": "Go"}
#: Allowance per measurement on top of its warm-up and duration: server start, check and stop.
MEASUREMENT_OVERHEAD_S = 75
#: A cost per candidate more than this much above the previous size's is reported as a knee.
KNEE_RISE = 0.10


class PhaseError(RuntimeError):
    """A sub-benchmark failed or printed no result."""


# --- running the parts ----------------------------------------------------------------------------------------


def run_json(argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a benchmark command that prints JSON on stdout; its progress (stderr) goes to ours.

    It runs in its own session. If it overruns, or this process is interrupted (Ctrl-C reaches only our
    group), it gets SIGINT first, so that its ``finally`` blocks stop the servers it started in their own
    sessions, and SIGKILL 20 s later.

    Raises:
        PhaseError: If it times out or prints no JSON.
    """
    print(f"$ {shlex.join(argv)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PhaseError(f"did not finish within {timeout_s:.0f} s") from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        doc: dict[str, Any] = orjson.loads(out)
    except orjson.JSONDecodeError:
        raise PhaseError(f"{shlex.join(argv)} exited with {proc.returncode} and printed no JSON") from None
    return doc


def service_argv(args: argparse.Namespace, targets: Sequence[str], layout: str) -> list[str]:
    """bench_service's command line for one layout: ``pinned``, ``all`` (cores) or ``sweep``."""
    cpus = sorted(os.sched_getaffinity(0))
    argv = [sys.executable, "-m", "benchmarks.bench_service", "--json", "--targets", ",".join(targets)]
    if layout == "sweep":
        argv += ["--sizes", ",".join(map(str, args.sizes)), "--repeats", "1", "--duration", str(args.sweep_duration)]
    else:
        argv += ["--workloads", ",".join(workload.WORKLOADS), "--repeats", str(args.repeats)]
        argv += ["--duration", str(args.duration)]
    if layout == "all":
        every = ",".join(map(str, cpus))
        return argv + ["--workers", str(len(cpus)), "--server-cpus", every, "--client-cpus", every]
    return argv + ["--workers", "1", "--server-cpus", str(cpus[0]), "--client-cpus", str(cpus[1])]


def service_timeout(n_measurements: int, duration_s: int) -> float:
    return n_measurements * (duration_s + bench_service.WARMUP_S + MEASUREMENT_OVERHEAD_S)


def prepare_go() -> str | None:
    """Install the toolchain if needed and build the Go port; None if that worked, else why not."""
    try:
        go_build.install_toolchain()
        go_build.build()
    except go_build.GoBuildError as exc:
        return str(exc).splitlines()[0]
    return None


# --- tables ---------------------------------------------------------------------------------------------------


def medians(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(target, workload) -> median figures (plus n_candidates) of a bench_service JSON document."""
    out = {}
    for res in doc["results"]:
        if res.get("median"):
            out[(res["target"], res["workload"])] = res["median"] | {"n_candidates": res["n_candidates"]}
    return out


def failures(doc: dict[str, Any]) -> list[str]:
    return [f"{r['target']} {r['workload']}: {r['error'].splitlines()[0]}" for r in doc["results"] if r.get("error")]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def kernel_table(doc: dict[str, Any]) -> str:
    rows = [[name, f"{ns:.2f}"] for name, ns in doc["ns_per_sample"].items()]
    rows += [[name, f"{ratio:.2f}x"] for name, ratio in doc["ratios"].items()]
    return markdown_table(("case", "ns per sample (or as stated)"), rows)


def service_table(doc: dict[str, Any], targets: Sequence[str]) -> str:
    """Medians per workload and target, then the project's ratios to each baseline."""
    med = medians(doc)
    rows = []
    for name in workload.WORKLOADS:
        for target in targets:
            m = med.get((target, name))
            if m is None:
                rows.append([name, NAMES[target], "failed", "", "", "", "", "", ""])
                continue
            rows.append(
                [
                    name,
                    NAMES[target],
                    f"{m['rps']:,.0f}",
                    f"{m['pairs_per_s']:,.0f}",
                    f"{m['p50_ms']:.2f}",
                    f"{m['p99_ms']:.2f}",
                    f"{m['cpu_us_per_request']:,.0f}",
                    f"{m['other_load']:.0%}",
                    str(m["errors"]),
                ]
            )
    header = ("workload", "server", "req/s", "pairs/s", "p50 ms", "p99 ms", "CPU us/req", "other load", "errors")
    table = markdown_table(header, rows)
    ratio_rows = []
    for name in workload.WORKLOADS:
        mine = med.get(("project", name))
        for base in (t for t in targets if t != "project"):
            ref = med.get((base, name))
            if mine and ref:
                ratio_rows.append(
                    [
                        name,
                        f"mab_service / {NAMES[base]}",
                        f"{mine['rps'] / ref['rps']:.2f}x",
                        f"{ref['cpu_us_per_request'] / mine['cpu_us_per_request']:.2f}x",
                    ]
                )
    ratios = markdown_table(("workload", "ratio", "req/s", "requests per CPU-second"), ratio_rows)
    return f"{table}\n\n{ratios}"


def sweep_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, size) with the sweep's figures and the server's CPU ns per candidate."""
    rows = []
    for (target, _), m in medians(doc).items():
        n = m["n_candidates"]
        rows.append(
            {
                "target": target,
                "n_candidates": n,
                "rps": m["rps"],
                "pairs_per_s": m["pairs_per_s"],
                "p99_ms": m["p99_ms"],
                "cpu_us_per_request": m["cpu_us_per_request"],
                "cpu_ns_per_pair": 1e3 * m["cpu_us_per_request"] / n,
                "other_load": m["other_load"],
                "errors": m["errors"],
            }
        )
    return sorted(rows, key=lambda r: (TARGETS.index(r["target"]), r["n_candidates"]))


def sweep_tables(rows: list[dict[str, Any]], sizes: Sequence[int], targets: Sequence[str]) -> str:
    by = {(r["target"], r["n_candidates"]): r for r in rows}

    def cell(target: str, n: int, key: str, fmt: str) -> str:
        r = by.get((target, n))
        return format(r[key], fmt) if r else "failed"

    bases = [t for t in targets if t != "project"]
    throughput = []
    cost = []
    for n in sizes:
        ratios = []
        for base in bases:
            mine, ref = by.get(("project", n)), by.get((base, n))
            ratios.append(f"{mine['rps'] / ref['rps']:.2f}x" if mine and ref else "")
        rps = [cell(t, n, "rps", ",.0f") for t in targets]
        pairs = [cell(t, n, "pairs_per_s", ",.0f") for t in targets]
        throughput.append([f"{n:,}", *rps, *pairs, *ratios])
        ns = [cell(t, n, "cpu_ns_per_pair", ",.0f") for t in targets]
        other = max((by[(t, n)]["other_load"] for t in targets if (t, n) in by), default=0.0)
        cost.append([f"{n:,}", *ns, *[cell(t, n, "p99_ms", ".2f") for t in targets], f"{other:.0%}"])
    names = [NAMES[t] for t in targets]
    head1 = ["candidates"] + [f"{n} req/s" for n in names] + [f"{n} pairs/s" for n in names]
    head1 += [f"mab_service / {NAMES[b]}" for b in bases]
    head2 = ["candidates"] + [f"{n} CPU ns/pair" for n in names] + [f"{n} p99 ms" for n in names]
    head2 += ["most other load"]
    return f"{markdown_table(head1, throughput)}\n\n{markdown_table(head2, cost)}"


def cost_model(rows: list[dict[str, Any]], targets: Sequence[str]) -> list[str]:
    """Fit server CPU per request = fixed + per_candidate * n for each target, in relative error.

    The fixed part (HTTP, framework, JSON framing) is what makes the cost per candidate fall as requests
    grow; a size whose measurement sits well above the line is a knee in the per-candidate cost.
    """
    lines = []
    for target in targets:
        series = [(r["n_candidates"], r["cpu_us_per_request"]) for r in rows if r["target"] == target]
        if len(series) < 3:
            continue
        n, cpu_us = (np.array(v, dtype=np.float64) for v in zip(*series))
        per_candidate, fixed = np.polyfit(n, cpu_us, 1, w=1 / cpu_us)
        fit = fixed + per_candidate * n
        off = [f"{int(k):,}: {m / f:.2f}" for k, m, f in zip(n, cpu_us, fit)]
        lines.append(
            f"{NAMES[target]}: about {fixed:,.0f} us per request + {per_candidate * 1e3:,.0f} ns per candidate; "
            f"measured / fitted: {', '.join(off)}"
        )
    return lines


def knees(rows: list[dict[str, Any]], targets: Sequence[str]) -> list[str]:
    """Facts about cost per candidate: where it is lowest, and every size where it rises by > KNEE_RISE."""
    lines = []
    for target in targets:
        series = [(r["n_candidates"], r["cpu_ns_per_pair"]) for r in rows if r["target"] == target]
        if len(series) < 2:
            continue
        low_n, low = min(series, key=lambda p: p[1])
        text = (
            f"{NAMES[target]}: {series[0][1]:,.0f} ns of server CPU per candidate at {series[0][0]:,}, "
            f"lowest {low:,.0f} ns at {low_n:,}, {series[-1][1]:,.0f} ns at {series[-1][0]:,}"
        )
        rises = [
            f"{a_n:,} -> {b_n:,} (+{b / a - 1:.0%})"
            for (a_n, a), (b_n, b) in zip(series, series[1:])
            if b > a * (1 + KNEE_RISE)
        ]
        lines.append(text + (f"; rises {', '.join(rises)}" if rises else "; never rises by more than 10%"))
    return lines


def busy_shares(seconds: float = 2.0) -> dict[int, float]:
    """How busy each usable core is right now (everyone's work), over ``seconds``."""
    cpus = sorted(os.sched_getaffinity(0))
    before = {c: bench_service.cores_busy_seconds({c}) for c in cpus}
    time.sleep(seconds)
    return {c: (bench_service.cores_busy_seconds({c}) - before[c]) / seconds for c in cpus}


def contention(raw: dict[str, Any]) -> str | None:
    """A caveat naming the most disturbed one-core measurement, if other work took over 10% of the server core."""
    loads = [
        (r["median"]["other_load"], phase, r["target"], r["workload"])
        for phase in ("pinned", "sweep")
        for r in raw.get(phase, {}).get("results", [])
        if r.get("median")
    ]
    if not loads or max(loads)[0] <= 0.10:
        return None
    worst, phase, target, name = max(loads)
    typical = float(np.median([load for load, *_ in loads]))
    return (
        f"Other work shared the server's core: up to {worst:.0%} of it ({phase}, {NAMES[target]}, {name}), "
        f"{typical:.0%} in the median one-core measurement. Those req/s are low; CPU us per request is not "
        "affected. The 'other load' columns show it per figure (it also counts the kernel's network work "
        "that is not charged to the server process)."
    )


# --- report ---------------------------------------------------------------------------------------------------


def machine_lines(env: dict[str, Any], kernel: dict[str, Any] | None, go_version: str | None) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    isa = kernel["versions"]["kernel_isa"] if kernel else "not measured"
    cflags = os.environ.get("MAB_CFLAGS")
    return [
        f"- Machine: {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs",
        f"- Python: {env['python']}; {packages}",
        f"- Kernel build: {'MAB_CFLAGS=' + cflags if cflags else 'setup.py defaults (-O3)'}, "
        f"instruction set chosen at run time: {isa}",
        f"- Go: {go_version or 'not available'}; fasthttp from Debian (golang-github-valyala-fasthttp-dev)",
        f"- Load generator: {(env.get('wrk') or 'wrk').split(' Copyright')[0]} (one thread, 32 connections)",
    ]


CAVEATS = [
    "The machine is shared with other developers who also measure: expect noise of 10-20% between runs. "
    "Each figure is a median over repeats with targets interleaved; CPU us per request (server CPU time from "
    "/proc over the measured window) is steadier than req/s.",
    "One core: the server has one worker (Go: GOMAXPROCS=1) pinned to cpu 0 and wrk runs on cpu 1, so "
    "req/s is the server's per-core throughput.",
    "All cores: the server gets every core (one worker each; Go: GOMAXPROCS = cores) and wrk shares those "
    "cores, so req/s includes wrk's share of them; on a 2-core machine that is a large share.",
    "Go baseline: fasthttp is used directly, because Fiber (the seed team's framework, built on fasthttp) is "
    "not packaged in Debian and nothing is downloaded beyond Debian's packages.",
    "The size sweep runs each point once and for a short time: read its trend, not its third digit.",
]


def write_report(doc: dict[str, Any], out: Path, png: Path | None) -> Path:
    parts = [
        "# Benchmark results",
        "",
        f"Generated by `{doc['command']}` on {doc['date']} in {doc['elapsed_s'] / 60:.1f} min. Do not edit: "
        "rerun the command to refresh this page, results.json and throughput.png.",
        "",
        "## Machine",
        "",
        *doc["machine"],
        "",
        "## Caveats",
        "",
        *[f"- {c}" for c in CAVEATS],
        *[f"- {n}" for n in doc["notes"]],
        "",
        "## Commands",
        "",
        "Each part below can be rerun alone:",
        "",
        "```sh",
        *doc["commands"],
        "```",
    ]
    sections = doc["sections"]
    if "kernel" in sections:
        parts += ["", "## Kernel", "", sections["kernel"]]
    if "pinned" in sections:
        parts += ["", "## End to end, one core", "", sections["pinned"]]
    if "all" in sections:
        parts += ["", f"## End to end, all {doc['cpus']} cores (wrk sharing them)", "", sections["all"]]
    if "sweep" in sections:
        parts += ["", "## Cost per candidate, from 10 to 10,000 candidates per request (one core)", ""]
        parts += [sections["sweep"], "", *[f"- {line}" for line in doc["knees"]]]
        if png is not None:
            parts += ["", f"![throughput, cost per candidate and p99 against candidates per request]({png.name})"]
    path = out / "results.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


# --- CLI ------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help=f"output directory (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--duration", type=int, default=5, help="seconds per end-to-end measurement (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end repeats, interleaved (default 3)")
    parser.add_argument("--sweep-duration", type=int, default=3, help="seconds per sweep point (default 3)")
    parser.add_argument("--sizes", type=bench_service.size_list, default=list(workload.SWEEP_SIZES), help="sweep sizes")
    parser.add_argument("--no-go", action="store_true", help="leave the Go baseline out")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short smoke run (2 s, 1 repeat, 4 sizes) written to {QUICK_OUT.relative_to(REPO_ROOT)}",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeats, args.sweep_duration, args.sizes = 2, 1, 2, [10, 100, 1000, 10_000]
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    cpus = sorted(os.sched_getaffinity(0))
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found on PATH")
    if len(cpus) < 2:
        sys.exit("needs two usable cores: the server on one, wrk on another")
    extras.ensure(["matplotlib"])

    notes: list[str] = []
    busy = busy_shares()
    if max(busy.values()) > 0.15:
        shown = ", ".join(f"cpu {c} {share:.0%}" for c, share in busy.items())
        notes.append(f"Before the run the cores were already busy with other work ({shown}).")
        print(f"warning: the machine is busy ({shown}); figures will be low", file=sys.stderr)
    problems: list[str] = []  # failed parts: reported like notes, and the exit code is 1
    targets = [t for t in TARGETS if t != "go" or not args.no_go]
    go_version = None
    if "go" in targets:
        why = prepare_go()
        if why is None:
            go_version = go_build.go_version()
        else:
            notes.append(f"Go baseline left out: {why}")
            targets.remove("go")

    commands = []
    sections: dict[str, str] = {}
    raw: dict[str, Any] = {}
    kernel_n, kernel_repeats = (200_000, 3) if args.quick else (1_000_000, 9)
    kernel_argv = [
        "taskset", "-c", ",".join(map(str, cpus)), sys.executable, "-m", "benchmarks.bench_kernel", "--json",
        "--n", str(kernel_n), "--repeats", str(kernel_repeats),
    ]  # fmt: skip
    phases: list[tuple[str, list[str], float]] = [("kernel", kernel_argv, 300.0)]
    n_e2e = len(targets) * len(workload.WORKLOADS) * args.repeats
    for layout in ("pinned", "all"):
        phases.append((layout, service_argv(args, targets, layout), service_timeout(n_e2e, args.duration)))
    n_sweep = len(targets) * len(args.sizes)
    phases.append(("sweep", service_argv(args, targets, "sweep"), service_timeout(n_sweep, args.sweep_duration)))

    for name, argv, timeout_s in phases:
        print(f"\n== {name} ==", file=sys.stderr, flush=True)
        commands.append(shlex.join(["python" if a == sys.executable else a for a in argv]))
        try:
            raw[name] = run_json(argv, timeout_s)
        except PhaseError as exc:
            problems.append(f"{name} failed: {exc}")
            continue
        if name == "kernel":
            sections[name] = kernel_table(raw[name])
        else:
            problems += [f"{name}: {f}" for f in failures(raw[name])]
            if name != "sweep":
                sections[name] = service_table(raw[name], targets)

    if (shared := contention(raw)) is not None:
        notes.append(shared)
    knee_lines: list[str] = []
    sweep: dict[str, Any] = {}
    png = None
    env = (raw.get("pinned") or raw.get("sweep") or {}).get("environment") or bench_service.environment()
    if "sweep" in raw:
        rows = sweep_rows(raw["sweep"])
        sections["sweep"] = sweep_tables(rows, args.sizes, targets)
        knee_lines = knees(rows, targets) + cost_model(rows, targets)
        title = f"{env['cpu']}, 1 server worker on cpu {cpus[0]}, wrk on cpu {cpus[1]}; {env['python']}"
        png = plot.plot_sweep(rows, args.out / "throughput.png", title)
        sweep = {"rows": rows, "title": title}

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run_all" + (" " + shlex.join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    doc = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": time.monotonic() - started,
        "cpus": len(cpus),
        "machine": machine_lines(env, raw.get("kernel"), go_version),
        "notes": notes + problems,
        "commands": commands,
        "sections": sections,
        "knees": knee_lines,
        "sweep": sweep,
    }
    (args.out / "results.json").write_bytes(orjson.dumps(doc | {"raw": raw}, option=orjson.OPT_INDENT_2))
    report = write_report(doc, args.out, png)
    print(report.read_text(encoding="utf-8"))
    print(f"wrote {report}, {args.out / 'results.json'}" + (f", {png}" if png else ""), file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
