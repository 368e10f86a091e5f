"""Soak test: the service on the Vertex source for minutes at 70% of its saturating load, with store faults injected.

    python -m loadtests.soak [--duration-s 600] [--rate REQ_PER_S | --load-fraction 0.7] [--warmup-s 120]
                             [--phase-s 30] [--faults unavailable,latency,breaks,kill] [--timeout-s 5]
                             [--server-cpu 0] [--client-cpu 1] [--serve-args="..."] [--json PATH] [--log-dir DIR]

Everything runs on 127.0.0.1 and is started here: the Vertex emulator (``python -m mab_service.emulator``, 5 ms
+- 2 ms per read) and the client on ``--client-cpu``, one service worker (``mab-service serve``, Vertex source,
cache on, every other setting at its default) on ``--server-cpu``. The steps:

1. Prewarm: every id of the catalogue is read once through /predict, so the cache holds the whole catalogue.
2. Saturation (skipped with ``--rate``): wrk, closed loop, with 8, 16 and 32 connections for a few seconds each;
   the best req/s is the saturating load, and the soak rate is ``--load-fraction`` of it.
3. Soak: an open-loop client (this package's own, client.py: uvloop and httptools) sends /predict at that fixed rate
   (request i is due at i / rate, whether or not earlier ones were answered; latency counts from that due time,
   so a slow server cannot slow the client down and hide its own latency). Faults follow a schedule through the
   emulator's Control service: after a quiet warm-up, each fault in ``--faults`` for ``--phase-s`` seconds
   followed by as long a quiet period, repeated until the end: ``unavailable`` (30% of reads UNAVAILABLE),
   ``latency`` (reads 500 +- 100 ms, beyond the 250 ms deadline), ``breaks`` (30% of streams break part-way),
   ``kill`` (the emulator SIGKILLed, started again on the same port at the end of the phase). Meanwhile /health
   is probed every second, the worker's RSS (VmRSS from /proc) sampled every few seconds, and /metrics read at
   every phase boundary.

The report gives the answers by kind (status and error code, ``degraded`` answers, transport errors, timeouts),
p50/p99 latency overall and per phase, the achieved rate, the /health states seen, server counters, CPU shares,
RSS over time with a linear fit after the warm-up, and a verdict. The exit status is 1 if an answer was a 5xx
other than a 503 with a known error code (``feature_source_unavailable``, ``overloaded``), a request went
unanswered for ``--timeout-s`` after it was sent (a hang), a request failed at the transport level or got a
malformed answer, the server exited, or the RSS grew after the warm-up by more than ``--rss-slope-limit-mb-min``
MB/min *and* ``--rss-growth-limit-mb`` MB between the first and the last ``--rss-window-s``. Every process
started here is killed on the way out, on errors and on Ctrl-C too. Not part of the test suite;
tests/loadtests/test_soak.py runs it for a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks import bench_service, workload
from loadtests.soak import SoakError
from loadtests.soak.faults import FAULT_KINDS, Phase, schedule
from loadtests.soak.figures import figures
from loadtests.soak.preparation import SaturationStep, prewarm, saturation
from loadtests.soak.processes import Emulator, server_argv
from loadtests.soak.report import report
from loadtests.soak.runner import Soak


def environment() -> dict[str, Any]:
    env = bench_service.environment()
    env["load_average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return env


# --- CLI ------------------------------------------------------------------------------------------------------


def _kinds(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown faults {unknown}; expected some of {list(FAULT_KINDS)}")
    return kinds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--duration-s", type=float, default=600.0, help="seconds of soak (default 600)")
    add("--rate", type=float, help="requests per second; skips the saturation steps")
    add("--load-fraction", type=float, default=0.7, help="share of the saturating load to soak at (default 0.7)")
    add("--warmup-s", type=float, default=120.0, help="quiet start, left out of the RSS verdict (default 120)")
    add("--phase-s", type=float, default=30.0, help="seconds of each fault and of each quiet period after one")
    add("--faults", type=_kinds, default=list(FAULT_KINDS), help=f"faults in turn (default {','.join(FAULT_KINDS)})")
    add("--unavailable-rate", type=float, default=0.3, help="reads failing UNAVAILABLE in that phase (default 0.3)")
    add("--break-rate", type=float, default=0.3, help="streams breaking part-way in that phase (default 0.3)")
    add("--spike-latency-ms", type=float, default=500.0, help="read latency in the spike (default 500: > deadline)")
    add("--spike-jitter-ms", type=float, default=100.0, help="jitter in the spike (default 100)")
    add("--latency-ms", type=float, default=5.0, help="emulator latency per read otherwise (default 5)")
    add("--jitter-ms", type=float, default=2.0, help="emulator jitter otherwise (default 2)")
    add("--entities", type=int, default=workload.DEFAULT_ENTITIES, help="ids in the store (default 100,000)")
    add("--id-space", type=int, help="ids requests draw from (default entities x 1.1: about 9%% unknown)")
    add("--candidates", type=int, default=400, help="candidates per request (default 400)")
    add("--bodies", type=int, default=1024, help="distinct request bodies (default 1024)")
    add("--saturation-connections", type=bench_service.positive_ints, default=[8, 16, 32], help="wrk connections")
    add("--saturation-s", type=int, default=3, help="seconds per saturation step (default 3)")
    add("--timeout-s", type=float, default=5.0, help="a request unanswered this long is a hang (default 5)")
    add("--max-connections", type=int, default=1024, help="client connections at most (default 1024)")
    add("--health-interval-s", type=float, default=1.0, help="seconds between /health probes (default 1)")
    add("--rss-interval-s", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    add("--rss-window-s", type=float, default=60.0, help="first and last window compared (default 60)")
    add("--rss-slope-limit-mb-min", type=float, default=1.0, help="RSS slope limit after warm-up (default 1)")
    add("--rss-growth-limit-mb", type=float, default=10.0, help="first-to-last window growth limit (default 10)")
    add("--server-cpu", type=bench_service.cpu_list, default="0", help="the server's core (default 0)")
    add("--client-cpu", type=bench_service.cpu_list, default=None, help="client and emulator core (default: another)")
    add("--serve-args", default="", help='extra flags for mab-service serve, e.g. "--cache-ttl-s 5"')
    add("--json", type=Path, help="also write every figure here as JSON")
    add("--log-dir", type=Path, help="keep the server's and the emulator's logs here")
    args = p.parse_args(argv)
    usable = os.sched_getaffinity(0)
    if args.client_cpu is None:
        others = sorted(usable - bench_service.cpu_set(args.server_cpu))
        args.client_cpu = str(others[0]) if others else args.server_cpu
    if not bench_service.cpu_set(args.server_cpu) | bench_service.cpu_set(args.client_cpu) <= usable:
        p.error(f"cores {args.server_cpu} and {args.client_cpu} are not all among {sorted(usable)}")
    if args.id_space is None:
        args.id_space = round(args.entities * workload.DEFAULT_ID_SPACE / workload.DEFAULT_ENTITIES)
    if not 0 < args.load_fraction <= 1:
        p.error("--load-fraction must be in (0, 1]")
    if args.rate is not None and not args.rate > 0:
        p.error("--rate must be > 0")
    if not 1 <= args.candidates <= args.id_space:
        p.error("--candidates must be between 1 and the id space")
    for name in ("duration_s", "phase_s", "timeout_s", "health_interval_s", "rss_interval_s"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("taskset", *(() if args.rate else ("wrk",))):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found on PATH")
    # The service runs at its defaults: nothing from this shell's MAB_* settings.
    for name in [n for n in os.environ if n.startswith("MAB_") or n == "VERTEX_FEATURESTORE_EMULATOR_HOST"]:
        del os.environ[name]
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    # Both stop the soak the same way, even where SIGINT came ignored (a background job of a script).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    env = environment()
    phases = schedule(args)
    try:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            logs = args.log_dir or Path(tmp)
            logs.mkdir(parents=True, exist_ok=True)
            doc = run(args, env, phases, Path(tmp), logs)
    except (SoakError, bench_service.TargetError, subprocess.TimeoutExpired) as exc:
        print(f"soak failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print("\n".join(report(doc)), flush=True)
    if args.json:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 1 if doc["figures"]["failed"] else 0


def run(args: argparse.Namespace, env: dict[str, Any], phases: list[Phase], tmp: Path, logs: Path) -> dict[str, Any]:
    """Set up, measure and soak; returns the JSON document (environment, configuration, figures)."""
    # The client and the emulator share the client core: this process is pinned to it (as taskset would), and so
    # are the threads it starts from now on; the server and wrk are started under taskset on their own cores.
    os.sched_setaffinity(0, bench_service.cpu_set(args.client_cpu))
    table = workload.write_table(tmp / "table.csv", n_entities=args.entities)
    bodies = workload.make_bodies(args.candidates, n_bodies=args.bodies, id_space=args.id_space, seed=7)
    emulator = Emulator(table, bench_service.free_port(), args.client_cpu, args, logs)
    server_log = logs / "server.log"
    steps: list[SaturationStep] = []
    prewarmed: dict[str, int] = {}
    port = bench_service.free_port()
    with contextlib.ExitStack() as stack:
        stack.callback(emulator.stop_all)
        print(f"# starting the emulator and the service; {len(phases)} phases over {args.duration_s:g} s", flush=True)
        emulator.start()
        extra = shlex.split(args.serve_args)
        server = stack.enter_context(
            bench_service.running_server(server_argv(port, emulator.target, extra), port, args.server_cpu, server_log)
        )
        prewarmed = prewarm(port, args.id_space)
        if args.rate is None:
            script = workload.write_wrk_script(tmp / "soak.lua", bodies)
            steps = saturation(port, script, args)
            args.rate = args.load_fraction * max(s.rps for s in steps)
            print(f"# saturating load {max(s.rps for s in steps):,.0f} req/s; soaking at {args.rate:,.0f}", flush=True)
        soak = Soak(args, port, server, emulator, bodies, phases)
        # A full collection over everything imported so far (the Vertex client's modules) stalls the client for
        # ~100 ms; frozen, they are never scanned again, and the collections left are short.
        gc.collect()
        gc.freeze()
        import uvloop

        uvloop.run(soak.run())
        fig = figures(soak, args, server_log)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "environment": env,
        "config": config,
        "schedule": [{"kind": p.kind, "label": p.label, "start_s": p.start_s, "end_s": p.end_s} for p in phases],
        "prewarm": prewarmed,
        "processes": {"server_port": port, "emulator_port": emulator.port},
        "saturation": {
            "steps": [vars(s) for s in steps],
            "saturating_rps": max((s.rps for s in steps), default=None),
        },
        "figures": fig,
    }


if __name__ == "__main__":
    sys.exit(main())
