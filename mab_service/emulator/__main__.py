"""Command line: run the Vertex AI Feature Store emulator until SIGINT or SIGTERM.

    python -m mab_service.emulator --port 8086 --features table.csv --latency-ms 5 --jitter-ms 2 \\
        --unavailable-rate 0.01 --break-rate 0.01

It prints ``listening on HOST:PORT`` once it accepts calls (``--port 0`` picks a free port). Point the service at
it with ``VERTEX_FEATURESTORE_EMULATOR_HOST=HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from mab_service.emulator.server import Emulator, Faults
from mab_service.emulator.table import TableError, load_table

STARTUP_FAILURE = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mab_service.emulator",
        description="Run a local Vertex AI Feature Store (online serving, gRPC, no TLS) on a CSV table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8086, help="TCP port; 0 picks a free one")
    parser.add_argument(
        "--features", type=Path, default=None, help="CSV entity_id,<feature>,... (default: the demo catalogue)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="mean delay per read")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="delay drawn from latency +- jitter")
    parser.add_argument("--unavailable-rate", type=float, default=0.0, help="fraction of reads failing UNAVAILABLE")
    parser.add_argument("--break-rate", type=float, default=0.0, help="fraction of streams breaking part-way")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault and latency draws")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="load nan, inf and -inf values as they are (a store holding values that are no Beta parameters)",
    )
    return parser


async def serve(args: argparse.Namespace) -> None:
    faults = Faults(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        unavailable_rate=args.unavailable_rate,
        break_rate=args.break_rate,
    )
    emulator = Emulator(load_table(args.features, allow_non_finite=args.allow_non_finite), faults, seed=args.seed)
    port = await emulator.start(args.host, args.port)
    print(f"listening on {args.host}:{port} ({len(emulator.table.rows)} entities)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await emulator.stop()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        runner = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
        runner(serve(args))
    except (TableError, ValueError, RuntimeError) as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
