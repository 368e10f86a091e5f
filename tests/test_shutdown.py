"""Graceful shutdown: on SIGTERM /health turns 503 at once, the listener serves through the drain with
``Connection: close`` on every answer, requests in flight finish, and the process exits within its budget.

The client plays a load balancer in front of keep-alive connections: a probe polls /health and, from the first
answer that is not 200, no new connection is opened; connections already open keep sending (as kube-proxy
leaves established connections alone) until an answer tells them to close. Every request sent must get its
whole answer; a connection attempt may only be refused.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import unused_tcp_port

DRAIN_S = 1.5
GRACEFUL_S = 5.0
BODY = orjson.dumps({"user_id": "u", "candidates": [f"c{i}" for i in range(300)], "top_k": 10})


def _request(body: bytes = BODY) -> bytes:
    head = b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    at: float


@dataclass
class Record:
    sent: int = 0
    answers: list[Answer] = field(default_factory=list)
    cut_off: list[str] = field(default_factory=list)
    refused: int = 0


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    body = await reader.readexactly(int(headers[b"content-length"]))
    return Answer(int(lines[0].split(b" ")[1]), headers, body, time.monotonic())


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: Record) -> Answer | None:
    """One request and its answer on a keep-alive connection, recorded; None (the connection closed) if cut off."""
    writer.write(_request())
    record.sent += 1
    try:
        answer = await _read_answer(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        record.cut_off.append(repr(exc))
        writer.close()
        return None
    record.answers.append(answer)
    return answer


async def _client(port: int, routing: asyncio.Event, record: Record) -> None:
    """Requests back to back on one keep-alive connection; a new connection only while the LB routes here."""
    writer = None
    while True:
        if writer is None:
            if not routing.is_set():
                return
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                record.refused += 1
                return
        answer = await _exchange(reader, writer, record)
        if answer is None:
            return
        if answer.headers.get(b"connection") == b"close":
            writer.close()
            writer = None


async def _paced_client(port: int, record: Record, pause_s: float) -> None:
    """Requests on one keep-alive connection with a pause of up to ``pause_s`` between an answer and the next
    request, so that the connection is often idle; it leaves when an answer says close or the port refuses it."""
    rng = random.Random(port + id(record) % 1000)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        record.refused += 1
        return
    while True:
        answer = await _exchange(reader, writer, record)
        if answer is None:
            return
        if answer.headers.get(b"connection") == b"close":
            writer.close()
            return
        await asyncio.sleep(rng.uniform(0, pause_s))


async def _probe(port: int, routing: asyncio.Event, health: list[tuple[float, int | None]]) -> None:
    """The load balancer's readiness probe, every 20 ms, until the port is closed."""
    async with httpx.AsyncClient(timeout=1) as client:
        while True:
            try:
                status: int | None = (await client.get(f"http://127.0.0.1:{port}/health")).status_code
            except httpx.TransportError:
                status = None
            health.append((time.monotonic(), status))
            if status != 200:
                routing.clear()
            if status is None:
                return
            await asyncio.sleep(0.02)


async def _slow_request(port: int, listener_closed: asyncio.Event) -> Answer:
    """A request whose body is still arriving when the listener closes: it is in flight and must finish."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = _request()
    writer.write(request[:-100])
    await writer.drain()
    await listener_closed.wait()
    await asyncio.sleep(0.2)
    writer.write(request[-100:])
    answer = await _read_answer(reader)
    writer.close()
    return answer


def _start(table_csv: Path, *extra: str, defaults: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """A server on the table; with ``defaults``, the default drain and graceful timeout."""
    port = unused_tcp_port()
    cmd = [sys.executable, "-m", "mab_service", "serve", "--port", str(port), "--features", f"csv:{table_csv}"]
    if not defaults:
        cmd += ["--drain-delay-s", str(DRAIN_S), "--timeout-graceful-shutdown-s", str(GRACEFUL_S)]
    cmd += extra
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server did not start")


@pytest.fixture
def stopped() -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_sigterm_under_keep_alive_load_cuts_no_request_off(table_csv: Path, stopped: list) -> None:
    proc, port = _start(table_csv)
    stopped.append(proc)

    async def scenario() -> tuple[Record, list[tuple[float, int | None]], Answer, float, float]:
        routing = asyncio.Event()
        routing.set()
        record = Record()
        health: list[tuple[float, int | None]] = []
        listener_closed = asyncio.Event()
        probe = asyncio.create_task(_probe(port, routing, health))
        clients = [asyncio.create_task(_client(port, routing, record)) for _ in range(16)]
        await asyncio.sleep(1.0)  # under load
        slow = asyncio.create_task(_slow_request(port, listener_closed))
        await asyncio.sleep(0.1)
        terminated = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await probe
        listener_closed.set()  # the probe ends when a connection is refused
        await asyncio.wait_for(asyncio.gather(*clients), GRACEFUL_S)
        slow_answer = await asyncio.wait_for(slow, GRACEFUL_S)
        exited = await asyncio.to_thread(proc.wait, DRAIN_S + GRACEFUL_S + 5)
        assert exited == 0
        return record, health, slow_answer, terminated, time.monotonic()

    record, health, slow_answer, terminated, exited_at = asyncio.run(scenario())
    output = proc.stdout.read().decode() if proc.stdout else ""

    # Every request sent got its whole answer; nothing was cut off.
    assert record.cut_off == [], output
    assert record.sent == len(record.answers) > 100
    assert all(a.status == 200 and orjson.loads(a.body)["ids"] for a in record.answers)
    # /health turned 503 "draining" at once, and the port kept answering it through the drain, then refused.
    answered = [(t - terminated, s) for t, s in health if t >= terminated]
    first_503 = next(t for t, s in answered if s == 503)
    refused_at = next(t for t, s in answered if s is None)
    assert first_503 < 0.3
    # From SIGTERM on, answers tell the client to close: every connection got one and left.
    closing = [a for a in record.answers if a.headers.get(b"connection") == b"close"]
    assert len(closing) >= 16
    assert all(a.at >= terminated for a in closing)
    assert all(a in closing for a in record.answers if a.at - terminated > first_503 + 0.05)
    assert all(s == 503 for t, s in answered if first_503 <= t < refused_at)
    assert DRAIN_S - 0.2 <= refused_at <= DRAIN_S + 1.0
    # The request still in flight when the listener closed was finished, then its connection closed.
    assert slow_answer.status == 200 and slow_answer.headers[b"connection"] == b"close"
    assert slow_answer.at - terminated >= DRAIN_S
    # And the worker left within its budget: drain + graceful timeout, well before a kubelet's SIGKILL.
    assert exited_at - terminated < DRAIN_S + GRACEFUL_S
    assert "draining: /health answers 503" in output


def test_sigterm_with_default_settings_cuts_no_request_off_on_idle_keep_alive_connections(
    table_csv: Path, stopped: list
) -> None:
    # No drain delay: the listener closes within a tick of SIGTERM, while many kept-alive connections are idle
    # between requests (clients pausing up to 0.25 s). A request that arrives on one of them after SIGTERM is
    # answered (with Connection: close), never cut off.
    proc, port = _start(table_csv, defaults=True)
    stopped.append(proc)

    async def scenario() -> tuple[Record, float]:
        record = Record()
        clients = [asyncio.create_task(_paced_client(port, record, pause_s=0.25)) for _ in range(48)]
        await asyncio.sleep(1.5)  # under load
        terminated = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*clients), 10)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        return record, time.monotonic() - terminated

    record, took = asyncio.run(scenario())
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert record.cut_off == [], output
    assert record.sent == len(record.answers) > 100 and record.refused == 0
    assert all(a.status == 200 for a in record.answers)
    # Every connection was told to close, and the worker left promptly (well within the graceful timeout).
    assert sum(a.headers.get(b"connection") == b"close" for a in record.answers) == 48
    assert took < 5


def test_several_workers_drain_together(table_csv: Path, stopped: list) -> None:
    proc, port = _start(table_csv, "--workers", "2")
    stopped.append(proc)
    url = f"http://127.0.0.1:{port}"
    terminated = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)  # the supervisor alone, as a container runtime does with PID 1
    statuses = []
    while time.monotonic() - terminated < DRAIN_S - 0.3:
        with httpx.Client(timeout=1) as client:  # a new connection: either worker may take it
            statuses.append(client.get(url + "/health").status_code)
        time.sleep(0.05)
    assert statuses and set(statuses[3:]) == {503}
    assert proc.wait(DRAIN_S + GRACEFUL_S + 5) == 0
    assert time.monotonic() - terminated < DRAIN_S + GRACEFUL_S
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=1)


def test_a_second_sigint_skips_the_drain(table_csv: Path, stopped: list) -> None:
    proc, port = _start(table_csv, "--drain-delay-s", "30")
    stopped.append(proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "draining"}
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 5
