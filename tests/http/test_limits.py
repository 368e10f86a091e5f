"""Bounds at the edge: open connections per worker, every route but the probes under admission, and /arms computed
off the event loop."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from mab_service.app import build_app
from mab_service.config import Settings
from tests.conftest import Server, wait_until
from tests.test_overload import GatedSource

#: /arms at its largest: 1,000 arms x 4,000 Beta draws, long enough for other requests to come and go meanwhile.
BIG_ARMS = b"GET /arms?top=1000&order=mean HTTP/1.1\r\nHost: t\r\n\r\n"


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer (head and Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()


def has_data(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


@pytest.fixture(scope="module")
def big_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arms") / "arms.csv"
    path.write_text("entity_id,alpha,beta\n" + "".join(f"a{i},{1 + i % 70},{50 + i % 300}\n" for i in range(2000)))
    return path


# --- connections ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(server_factory: Callable[..., Server], table_csv: Path) -> Server:
    return server_factory(args=["--features", f"csv:{table_csv}", "--max-connections", "2", "--retry-after-s", "2"])


def test_connections_past_the_cap_are_answered_overloaded_and_closed(capped: Server) -> None:
    held = [connect(capped), connect(capped)]
    try:
        for sock in held:  # both counted by the worker: each has been answered
            sock.sendall(get("/live"))
            assert read_answer(sock).startswith(b"HTTP/1.1 200")
        with connect(capped) as over:
            over.sendall(get("/live"))
            answer = read_answer(over)
            assert answer.startswith(b"HTTP/1.1 503")
            head = answer.lower()
            assert b"connection: close" in head and b"retry-after: 2" in head
            assert b'"error":"overloaded"' in answer and b"limit of 2 connections" in answer
            assert over.recv(1) == b""  # closed by the server
        for sock in held:  # the connections within the cap go on being served
            sock.sendall(get("/live"))
            assert read_answer(sock).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()

    def served() -> bool:
        try:
            return httpx.get(capped.url + "/live", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(served)  # once the held ones are gone, new connections are served again
    metrics = httpx.get(capped.url + "/metrics", timeout=5).text
    refused = next(line for line in metrics.splitlines() if line.startswith("mab_refused_connections_total "))
    assert float(refused.split()[1]) >= 1


# --- admission of GET routes ---------------------------------------------------------------------------------------


def test_get_routes_are_admitted_and_the_probes_are_never_shed() -> None:
    # Under a server that does not decide on arrival (Starlette's test client), the app decides.
    source = GatedSource()
    with TestClient(build_app(Settings(max_in_flight=1, retry_after_s=4, learning=False), source=source)) as client:
        held = threading.Thread(target=client.get, args=("/arms/a",))
        held.start()
        assert wait_until(lambda: source.waiting == 1)
        shed = client.get("/openapi.json", headers={"x-request-id": "over-get"})
        probes = [client.get(path).status_code for path in ("/health", "/live", "/metrics")]
        source.gate.set()
        held.join(10)
        after = client.get("/openapi.json")
        scraped = client.get("/metrics").text
    assert shed.status_code == 503 and shed.headers["retry-after"] == "4"
    assert shed.headers["x-request-id"] == "over-get"
    assert shed.json() == {
        "error": "overloaded",
        "message": "the worker holds its limit of 1 requests; retry after 4 s",
    }
    assert probes == [200, 200, 200]
    assert after.status_code == 200
    shed_total = next(line for line in scraped.splitlines() if line.startswith("mab_shed_requests_total "))
    assert float(shed_total.split()[1]) >= 1


@pytest.fixture(scope="module")
def one_at_a_time(server_factory: Callable[..., Server], big_table: Path) -> Server:
    return server_factory(args=["--features", f"csv:{big_table}", "--max-in-flight", "1"])


def test_a_get_past_max_in_flight_is_shed_on_a_live_server(one_at_a_time: Server) -> None:
    with connect(one_at_a_time) as busy, connect(one_at_a_time) as other, connect(one_at_a_time) as probe:
        busy.sendall(BIG_ARMS)  # holds the one slot while its intervals are computed
        time.sleep(0.05)  # let it arrive first (no assertion on time: the check below is on order)
        other.sendall(get("/loop"))
        shed = read_answer(other)
        probe.sendall(get("/health"))
        health = read_answer(probe)
        assert not has_data(busy), "the /arms answer came before the others: the test proves nothing"
        assert read_answer(busy).startswith(b"HTTP/1.1 200")
    assert shed.startswith(b"HTTP/1.1 503") and b'"error":"overloaded"' in shed
    assert health.startswith(b"HTTP/1.1 200")


# --- /arms off the event loop --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(server_factory: Callable[..., Server], big_table: Path) -> Iterator[Server]:
    yield server_factory(args=["--features", f"csv:{big_table}"])


def test_health_is_answered_while_a_big_arms_is_computed(big: Server) -> None:
    with connect(big) as arms, connect(big) as probe:
        arms.sendall(BIG_ARMS)
        time.sleep(0.05)  # let it arrive first (no assertion on time: the check below is on order)
        probe.sendall(get("/health"))
        health = read_answer(probe)
        # Computed on the event loop, /arms would have been answered before /health got its turn.
        assert not has_data(arms)
        answer = read_answer(arms)
    assert health.startswith(b"HTTP/1.1 200")
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b'"id":') == 1000
