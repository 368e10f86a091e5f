"""An open-loop HTTP/1.1 client on uvloop and httptools: keep-alive connections, one request at a time on each,
a new connection whenever none is idle, up to a cap."""

from __future__ import annotations

import asyncio
from typing import cast

import httptools

#: An idle keep-alive connection is not reused after this long: the server closes them after 5 s idle, and a
#: request written as it does so would be lost to the race, not to the server.
IDLE_REUSE_S = 4.0


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; answers are parsed with httptools."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: list[bytes] = []
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.abort()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        body, self.chunks = b"".join(self.chunks), []
        status = self.parser.get_status_code()
        if not self.parser.should_keep_alive():
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed before the answer"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None and self.waiter is None
        self.waiter = self.loop.create_future()
        self.transport.write(data)
        return self.waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Client:
    """A pool of at most ``max_connections`` keep-alive connections to 127.0.0.1:``port``; opens one whenever a
    request finds none idle, so requests never wait for each other below the cap."""

    def __init__(self, port: int, max_connections: int) -> None:
        self.port = port
        self.max_connections = max_connections
        self.idle: list[_Connection] = []
        self.n_open = 0
        self.peak_open = 0
        self.waiting: list[asyncio.Future[_Connection | None]] = []

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one request and return (status, body).

        Raises:
            OSError: The connection failed or closed before the answer.
            httptools.HttpParserError: The answer was not HTTP.
        """
        return await self.exchange(await self.acquire(), data)

    async def exchange(self, conn: _Connection, data: bytes) -> tuple[int, bytes]:
        """Send one request on a connection from ``acquire`` and return (status, body); the connection goes back
        to the pool (or, if it failed, is closed)."""
        try:
            status, body = await conn.send(data)
        except BaseException:
            conn.abort()  # cancelled or failed: whatever comes later on it belongs to no one
            self._release(conn)
            raise
        self._release(conn)
        return status, body

    async def acquire(self) -> _Connection:
        """An idle connection, a new one, or at the cap the next one released.

        Raises:
            OSError: A new connection could not be opened.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_REUSE_S:
                return conn
            conn.abort()
            self.n_open -= 1
        if self.n_open >= self.max_connections:
            slot: asyncio.Future[_Connection | None] = loop.create_future()
            self.waiting.append(slot)
            try:
                handed = await slot
            except asyncio.CancelledError:
                if slot.done() and not slot.cancelled():  # handed over as we were cancelled: pass it on
                    got = slot.result()
                    if got is None:
                        self._free_slot()
                    else:
                        self._release(got)
                raise
            if handed is not None:
                return handed
        else:
            self.n_open += 1
            self.peak_open = max(self.peak_open, self.n_open)
        try:
            _, conn = await loop.create_connection(lambda: _Connection(loop), "127.0.0.1", self.port)
        except BaseException:
            self._free_slot()
            raise
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.closed:
            self._free_slot()
            return
        conn.idle_since = conn.loop.time()
        while self.waiting:
            slot = self.waiting.pop(0)
            if not slot.done():
                slot.set_result(conn)
                return
        self.idle.append(conn)

    def _free_slot(self) -> None:
        """A connection closed: its slot goes to a request waiting for one (which opens it), else it is freed."""
        while self.waiting:
            slot = self.waiting.pop(0)
            if not slot.done():
                slot.set_result(None)
                return
        self.n_open -= 1

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


def post_bytes(port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def get_bytes(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
