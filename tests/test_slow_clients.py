"""Slow and broken clients against the real server: raw sockets on loopback, one worker with short limits.

Each fault must leave the worker answering /predict and /health at once, free its connection within the limit
that applies (``header_timeout_s``, ``body_timeout_s``, or at once), and never produce a 5xx.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import orjson
import pytest

from tests.conftest import Server

HOST = "127.0.0.1"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_HEADER_BYTES = 8192
MAX_BODY_BYTES = 65536
MAX_IN_FLIGHT = 4
#: How much later than its limit a connection may be closed on a busy test machine.
SLACK_S = 1.5
#: How long a normal request may take while bad clients are connected.
PROMPT_S = 0.5

BODY = orjson.dumps({"user_id": "u", "candidates": ["c1", "c2", "strong", "weak"], "top_k": 2})


class Answer(NamedTuple):
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@pytest.fixture(scope="module")
def port(server_factory: Callable[..., Server], table_csv: Path) -> int:
    args = [
        "--features", f"csv:{table_csv}",
        "--header-timeout-s", str(HEADER_TIMEOUT_S),
        "--body-timeout-s", str(BODY_TIMEOUT_S),
        "--max-header-bytes", str(MAX_HEADER_BYTES),
        "--max-body-bytes", str(MAX_BODY_BYTES),
        "--max-in-flight", str(MAX_IN_FLIGHT),
    ]  # fmt: skip
    server = server_factory(args=args)
    return int(server.url.rsplit(":", 1)[1])


def predict_head(length: int | None = None, *extra: bytes) -> bytes:
    """The head of a POST /predict, with ``Content-Length: length`` (or ``extra`` headers alone)."""
    lines = [b"POST /predict HTTP/1.1", b"host: 127.0.0.1", b"content-type: application/json", *extra]
    if length is not None:
        lines.append(b"content-length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=5)


def read_answer(sock: socket.socket, timeout_s: float = 5.0) -> Answer:
    """One whole answer (a 100 Continue is skipped); fails if the connection ends first."""
    sock.settimeout(timeout_s)
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a whole answer: {data!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        if status != 100:
            break
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    length = int(headers[b"content-length"])
    while len(data) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside an answer body"
        data += chunk
    return Answer(status, headers, data[:length])


def wait_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the connection is still open after {timeout_s} s") from None
        if not chunk:
            return data
        data += chunk


def is_open(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server has neither closed the connection nor sent anything within ``wait_s``."""
    sock.settimeout(wait_s)
    try:
        sock.recv(1, socket.MSG_PEEK)  # an answer, or b"" for a closed connection
    except TimeoutError:
        return True
    except ConnectionResetError:
        pass
    return False


def exchange(port: int, request: bytes) -> tuple[Answer, float]:
    """Send ``request`` on a new connection; its answer and the seconds it took."""
    started = time.monotonic()
    with connect(port) as sock:
        sock.sendall(request)
        answer = read_answer(sock)
    return answer, time.monotonic() - started


def assert_serving(port: int) -> None:
    """A normal /predict and /health are answered at once."""
    answer, seconds = exchange(port, predict_head(len(BODY)) + BODY)
    assert answer.status == 200 and orjson.loads(answer.body)["ids"][0] == "strong"
    assert seconds < PROMPT_S, f"/predict took {seconds:.2f} s"
    answer, seconds = exchange(port, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    assert answer.status == 200 and seconds < PROMPT_S, (answer, seconds)


def server_errors(port: int) -> list[str]:
    """The metric series of answers with a 5xx status (scraped from /metrics)."""
    answer, _ = exchange(port, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    lines = answer.body.decode().splitlines()
    return [line for line in lines if line.startswith("mab_requests_total{") and 'status="5' in line]


def assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.headers[b"content-type"] == b"application/json"
    body = orjson.loads(answer.body)
    assert body["error"] == code and body["message"], body


@pytest.fixture(autouse=True)
def no_server_errors(port: int) -> Iterator[None]:
    yield
    assert server_errors(port) == []


def test_many_idle_connections_are_closed_after_the_header_timeout(port: int) -> None:
    opened = time.monotonic()
    idle = [connect(port) for _ in range(200)]
    try:
        assert_serving(port)
        for sock in idle:
            # Nothing was asked, so nothing is answered: the server just closes.
            assert wait_closed(sock, HEADER_TIMEOUT_S + SLACK_S - (time.monotonic() - opened)) == b""
        assert time.monotonic() - opened >= HEADER_TIMEOUT_S - 0.1
    finally:
        for sock in idle:
            sock.close()
    assert_serving(port)


def test_a_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout(port: int) -> None:
    request = predict_head(len(BODY)) + BODY
    with connect(port) as sock:
        started = time.monotonic()
        sent = 0
        while is_open(sock, 0.05):
            assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S, "a trickling head was kept open"
            sock.sendall(request[sent : sent + 1])
            sent += 1
        closed_after = time.monotonic() - started
    assert closed_after >= HEADER_TIMEOUT_S - 0.1
    assert sent < len(request) // 2  # the head never got near its end
    assert_serving(port)


def test_a_kept_alive_connection_times_its_next_head_from_the_first_bytes(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(predict_head(len(BODY)) + BODY)
        assert read_answer(sock).status == 200
        time.sleep(HEADER_TIMEOUT_S)  # idle, within the keep-alive timeout: the header timeout has not started
        sock.sendall(b"GET /hea")
        started = time.monotonic()
        assert wait_closed(sock, HEADER_TIMEOUT_S + SLACK_S) == b""
        assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.1


def test_a_body_that_never_comes_gets_408_and_holds_no_in_flight_slot(port: int) -> None:
    slow = [connect(port) for _ in range(2 * MAX_IN_FLIGHT)]
    try:
        started = time.monotonic()
        for sock in slow:
            sock.sendall(predict_head(len(BODY)) + BODY[:10])
        # Twice max_in_flight requests are waiting for their bodies, yet /predict is not shed.
        assert_serving(port)
        for sock in slow:
            answer = read_answer(sock, BODY_TIMEOUT_S + SLACK_S)
            assert_error(answer, 408, "request_timeout")
            assert answer.headers[b"connection"] == b"close" and b"x-request-id" in answer.headers
            assert wait_closed(sock, 1.0) == b""
        assert time.monotonic() - started >= BODY_TIMEOUT_S - 0.1
    finally:
        for sock in slow:
            sock.close()
    assert_serving(port)


def test_a_body_trickled_within_the_timeout_is_answered(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(predict_head(len(BODY)))
        for i in range(0, len(BODY), 16):
            sock.sendall(BODY[i : i + 16])
            time.sleep(BODY_TIMEOUT_S / 2 / (len(BODY) / 16))
        assert read_answer(sock).status == 200


def test_expect_100_continue_is_answered_while_the_body_is_held(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(predict_head(len(BODY), b"expect: 100-continue"))
        sock.settimeout(PROMPT_S)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        assert read_answer(sock).status == 200


def test_a_body_cut_off_mid_stream_or_a_client_gone_before_the_answer_leaves_the_worker_serving(port: int) -> None:
    request = predict_head(len(BODY)) + BODY
    for cut in (len(request) - len(BODY) // 2, len(request)):
        for _ in range(20):
            sock = connect(port)
            # SO_LINGER 0: close with a reset, as a crashed client or a killed proxy does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request[:cut])
            sock.close()
    assert_serving(port)


@pytest.mark.parametrize("expect", [(), (b"expect: 100-continue",)], ids=["plain", "expect-100-continue"])
def test_a_content_length_above_the_limit_is_413_at_once_then_the_connection_is_freed(port: int, expect) -> None:
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(predict_head(10 * MAX_BODY_BYTES, *expect))
        sock.settimeout(PROMPT_S)
        assert sock.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 413"  # no 100 Continue for a body that is refused
        assert_error(read_answer(sock), 413, "payload_too_large")
        assert time.monotonic() - started < PROMPT_S
        # The body is not coming: the connection is closed once the body timeout has passed.
        assert wait_closed(sock, BODY_TIMEOUT_S + SLACK_S) == b""


def test_a_chunked_body_growing_past_the_limit_is_413(port: int) -> None:
    chunk = b"x" * 16384
    with connect(port) as sock:
        sock.sendall(predict_head(None, b"transfer-encoding: chunked"))
        sent = 0
        while is_open(sock, 0.02):
            assert sent < 4 * MAX_BODY_BYTES, "no answer to a chunked body four times the limit"
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        assert sent > MAX_BODY_BYTES
        assert_error(read_answer(sock), 413, "payload_too_large")


def test_a_head_over_the_limit_is_431_and_closed(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(predict_head(len(BODY), b"x-padding: " + b"p" * 2 * MAX_HEADER_BYTES) + BODY)
        answer = read_answer(sock)
        assert_error(answer, 431, "headers_too_large")
        assert answer.headers[b"connection"] == b"close"
        assert wait_closed(sock, 1.0) == b""
    # Just under the limit is fine.
    padding = b"x-padding: " + b"p" * (MAX_HEADER_BYTES - len(predict_head(len(BODY))) - 20)
    answer, _ = exchange(port, predict_head(len(BODY), padding) + BODY)
    assert answer.status == 200
    assert_serving(port)


def test_a_head_trickled_past_the_limit_is_431_once_it_passes(port: int) -> None:
    with connect(port) as sock:
        start = predict_head(None)[:-2]  # without its final blank line: headers keep coming
        line = b"x-padding: " + b"p" * 500 + b"\r\n"
        sock.sendall(start)
        sent = len(start)
        while is_open(sock, 0.02):
            assert sent < 4 * MAX_HEADER_BYTES, "no answer to a head four times the limit"
            sock.sendall(line)
            sent += len(line)
        # Answered by the line that took the head past the limit.
        assert MAX_HEADER_BYTES < sent <= MAX_HEADER_BYTES + len(line)
        assert_error(read_answer(sock), 431, "headers_too_large")
    assert_serving(port)
