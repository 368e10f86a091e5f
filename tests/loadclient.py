"""A closed-loop HTTP/1.1 load client for the overload tests: K keep-alive connections, each sending the next
POST as soon as the previous answer is complete, for a fixed time, to 127.0.0.1 only.

Unlike wrk it keeps each answer's status and latency, so the tests can take the p99 of the 200s alone, and it
checks every answer (complete body, Retry-After on 503s). Run as a subprocess pinned to its own core:

    python -m tests.loadclient --port P --connections K --duration-s D --body-file F

prints one JSON object: ``sent``, ``statuses`` (status -> count), ``p50_ms``/``p99_ms`` per status, ``errors``
(connections that failed or answers cut short), ``retry_after_missing`` (503s without Retry-After), ``rps``, and
with ``--raw`` ``ok_latencies_ms``, the latency of every 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

import uvloop


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.waiting = False  # a request is sent and its answer is not complete
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio classes
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.run.sent += 1
        self.waiting = True
        self.sent_at = time.perf_counter()
        self.transport.write(self.run.next_request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in head[1:])
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.waiting = False
            status = int(head[0].split(b" ", 2)[1])
            self.run.record(status, time.perf_counter() - self.sent_at, headers)
            if headers.get(b"connection") == b"close" or time.perf_counter() >= self.run.stop_at:
                assert self.transport is not None
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting:
            self.run.errors += 1  # the server closed with an answer missing or cut short
        if not self.closed.done():
            self.closed.set_result(None)


class _Run:
    def __init__(self, bodies: list[bytes], port: int, duration_s: float) -> None:
        self.requests = [
            b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
            for body in bodies
        ]
        self.i = 0
        self.port = port
        self.stop_at = time.perf_counter() + duration_s
        self.sent = 0
        self.answered = 0
        self.errors = 0
        self.retry_after_missing = 0
        self.latencies: dict[int, list[float]] = defaultdict(list)

    def next_request(self) -> bytes:
        self.i = (self.i + 1) % len(self.requests)
        return self.requests[self.i]

    def record(self, status: int, seconds: float, headers: dict[bytes, bytes]) -> None:
        self.answered += 1
        self.latencies[status].append(seconds)
        if status == 503 and b"retry-after" not in headers:
            self.retry_after_missing += 1


async def _connection(run: _Run) -> None:
    loop = asyncio.get_running_loop()
    while time.perf_counter() < run.stop_at:
        try:
            _, protocol = await loop.create_connection(lambda: _Connection(run), "127.0.0.1", run.port)
        except OSError:
            run.errors += 1
            await asyncio.sleep(0.01)
            continue
        await protocol.closed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _main(args: argparse.Namespace) -> dict[str, object]:
    bodies = [line for line in Path(args.body_file).read_bytes().split(b"\n") if line]
    run = _Run(bodies, args.port, args.duration_s)
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(_connection(run) for _ in range(args.connections))), args.duration_s + 30)
    elapsed = time.perf_counter() - started
    return {
        "connections": args.connections,
        "sent": run.sent,
        "answered": run.answered,
        "errors": run.errors,
        "retry_after_missing": run.retry_after_missing,
        "rps": run.answered / elapsed,
        "statuses": {str(s): len(v) for s, v in run.latencies.items()},
        "p50_ms": {str(s): 1e3 * _percentile(v, 0.50) for s, v in run.latencies.items()},
        "p99_ms": {str(s): 1e3 * _percentile(v, 0.99) for s, v in run.latencies.items()},
        "ok_latencies_ms": [round(1e3 * v, 4) for v in run.latencies.get(200, [])] if args.raw else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument("--body-file", required=True, help="one JSON request body per line")
    parser.add_argument("--raw", action="store_true", help="also print the latency of every 200 answer")
    print(json.dumps(uvloop.run(_main(parser.parse_args()))))


if __name__ == "__main__":
    main()
