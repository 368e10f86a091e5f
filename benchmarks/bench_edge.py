"""The Python side of the fixed cost per request: /predict through the real protocol and app, no kernel.

Each target is built as the server builds it (``server.worker`` for mab-service, uvicorn's httptools protocol for
the floor) and fed requests on 32 in-memory connections (a transport that keeps what is written): the HTTP parser,
the protocol, uvicorn's request-response cycle, the edge, the endpoint and the loop run as they do under wrk, but
no system call is made. CPU time (all threads: the loop's journal and decision log included) per request, median of
``--repeats`` batches. The distance to the floor is what mab-service's own Python costs; what TCP on loopback adds
is in ``bench_service`` (the end-to-end figure minus this one).

    python -m benchmarks.bench_edge [--targets floor,nolearn,loop,loop-keys] [--size 10] [--requests 20000]

Run it pinned (``taskset -c 0``): the loop's threads then share the core, as they do in a one-core worker.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from benchmarks import workload

CONNECTIONS = 32
TARGETS = ("floor", "nolearn", "loop", "loop-keys")
#: The key ``loop-keys`` is run with (API keys on, ``api_keys_file``) and its requests carry.
KEY = "bench-edge-key-0123456789abcdef"


class MemoryTransport(asyncio.Transport):
    """A transport that keeps the last answer written to it and tells when one came."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future[None] | None = None
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: Any) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _protocols(target: str, table: Path, state_dir: str) -> tuple[Callable[[], Any], Any]:
    """A factory of connected protocols for ``target``, and the lifespan task to stop (None for the floor)."""
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {}
    if target == "floor":
        from benchmarks.baselines.floor import app

        config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False, proxy_headers=False)
        config.load()
        return lambda: HttpToolsProtocol(config, ServerState(), state, loop), None

    from mab_service import server
    from mab_service.config import Settings
    from mab_service.learning import node

    keys = None
    if target == "loop-keys":
        keys = Path(state_dir) / "api-keys"
        keys.write_text(f"{KEY}\n")
    settings = Settings(
        features=f"csv:{table}",
        learning=target.startswith("loop"),
        state_dir=state_dir,
        api_keys_file=str(keys) if keys is not None else "",
    )
    if settings.learning:
        node.adopt(node.Node.open(settings))
    config = server.worker(settings).config
    config.load()
    app = config.loaded_app
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "state": state, "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
    )
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"{target} did not start: {started}")

    async def stop() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan

    factory: Any = config.http_protocol_class  # typed as asyncio.Protocol; it is our protocol class
    return lambda: factory(config=config, server_state=ServerState(), app_state=state, _loop=loop), stop


async def measure(target: str, table: Path, bodies: list[bytes], requests: int, repeats: int) -> list[float]:
    """CPU microseconds per request of ``repeats`` batches of ``requests``."""
    key = b"Authorization: Bearer %s\r\n" % KEY.encode() if target == "loop-keys" else b""
    raw = [
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (key, len(body), body)
        for body in bodies
    ]
    with tempfile.TemporaryDirectory(prefix="bench_edge-") as state_dir:
        make, stop = await _protocols(target, table, state_dir)
        connections = []
        for _ in range(CONNECTIONS):
            protocol, transport = make(), MemoryTransport()
            protocol.connection_made(transport)
            connections.append((protocol, transport))
        loop = asyncio.get_running_loop()

        async def batch(n: int) -> None:
            sent = 0
            while sent < n:  # one request in flight on every connection, as wrk keeps them
                waits = []
                for protocol, transport in connections:
                    transport.answered = loop.create_future()
                    waits.append(transport.answered)
                    protocol.data_received(raw[sent % len(raw)])
                    sent += 1
                await asyncio.gather(*waits)
                await asyncio.sleep(0)  # let each request's task finish after its write

        await batch(requests // 5)  # warm up
        per_request = []
        for _ in range(repeats):
            started = time.process_time()
            await batch(requests)
            per_request.append((time.process_time() - started) / requests * 1e6)
        for protocol, _ in connections:
            protocol.connection_lost(None)
        if stop is not None:
            await stop()
    return per_request


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_edge", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}")
    parser.add_argument("--size", type=int, default=10, help="candidates per request (default 10)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per batch (default 20000)")
    parser.add_argument("--repeats", type=int, default=7, help="batches per target (default 7)")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        sys.exit(f"unknown targets {sorted(unknown)}; expected some of {TARGETS}")
    with tempfile.TemporaryDirectory(prefix="bench_edge-") as tmp:
        table, files = workload.write_sweep(tmp, [args.size])
        bodies = files[workload.sweep_name(args.size)].bodies.read_bytes().splitlines()
        medians = {}
        for target in targets:
            runs = uvloop.run(measure(target, table, bodies, args.requests, args.repeats))
            medians[target] = statistics.median(runs)
            print(
                f"{target:8} {medians[target]:6.2f} us CPU per request"
                f" (median of {args.repeats}: {' '.join(f'{r:.2f}' for r in runs)})"
            )
    if "floor" in medians:
        for target in targets:
            if target != "floor":
                print(f"{target} over the floor: {medians[target] - medians['floor']:.2f} us")


if __name__ == "__main__":
    main()
