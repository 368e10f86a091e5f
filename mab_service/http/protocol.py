"""The HTTP protocol: uvicorn's httptools protocol with limits on slow and broken clients, and admission.

uvicorn bounds only the idle time between requests, so ``GuardedHttpToolsProtocol`` adds a time limit on request
heads and bodies, a size limit on heads, a cap on open connections, and hands a request to the app only once its
body is in (see its docstring); at that moment it takes the request's admission decision (``Admission.arrive``).
``server.worker`` passes it to uvicorn as its ``http`` protocol.

A fast endpoint's answer leaves in one write (``AnswerCycle``): uvicorn writes a head and its body with a system call
each, two TCP segments, which on loopback cost more than everything else uvicorn does for a request.

It subclasses uvicorn's protocol and request-response cycle classes and uses their internals (``_start_asgi_task``,
``flow``, the cycle's ``more_body`` and response state, ``STATUS_LINE``): pyproject pins uvicorn to the minor version
this is tested on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from mab_service import logs
from mab_service.config import Settings
from mab_service.errors import HeadersTooLarge, MabError, Overloaded, RequestTimeout
from mab_service.http.admission import ADMITTED, Admission
from mab_service.http.errors import Headers, error_answer

#: The ASGI message type of a whole answer, ``{"type": ANSWER, "status": int, "headers": [...], "body": bytes}``:
#: the app may send it, instead of ``http.response.start`` and ``http.response.body``, to a request that has an
#: admission decision (``ADMITTED`` in its scope).
ANSWER = "mab.http.answer"


@dataclass(frozen=True)
class ClientLimits:
    """How long a request may take to arrive, how large it may be, and how many connections a worker keeps
    (``GuardedHttpToolsProtocol``)."""

    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_body_bytes: int
    max_connections: int = 2048

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientLimits:
        s = settings
        return cls(s.header_timeout_s, s.body_timeout_s, s.max_header_bytes, s.max_body_bytes, s.max_connections)


#: Seconds a connection idle at shutdown stays open for a request already on its way; then it is closed.
SHUTDOWN_IDLE_S = 0.5


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on slow and broken clients.

    uvicorn bounds only the idle time between requests (``timeout_keep_alive``); with httptools nothing bounds the
    size of a request head or the time a head or a body takes to arrive, so a client that trickles bytes holds a
    connection (and, once its head is in, a request task counted against ``max_in_flight``) for ever. Here:

    - a head must be complete within ``header_timeout_s`` of the connection opening (a new connection) or of its
      first bytes (a kept-alive one; before those, uvicorn's keep-alive timeout runs); else the connection is
      closed without an answer;
    - a head larger than ``max_header_bytes`` gets 431 ``headers_too_large`` and the connection is closed. The
      count starts with the read that starts the head; a head that begins inside a read, behind the end of an
      earlier request, may pass the limit by what is left of that read;
    - a request goes to the app only once its body is all in, so a slow body holds a buffer of at most
      ``max_body_bytes`` (plus one read), never a task or a slot of ``max_in_flight``. A declared Content-Length
      above ``max_body_bytes``, or a chunked body that grows past it, goes to the app at once, which answers 413;
    - a body must be all in within ``body_timeout_s`` of the end of its head: else, if the app has not seen the
      request, 408 ``request_timeout`` and the connection is closed; if it has (it answered 413 early and the
      body is still coming), the connection is closed.

    When a request goes to the app, it gets its admission decision (``admission``), in order of arrival, unless it
    is to a probe (``Admission.probes``).

    A connection that opens while the worker already has ``max_connections`` is refused: its first request is
    answered 503 ``overloaded`` with ``Connection: close`` without reaching the app, and the connection is closed
    (one that sends nothing is closed after ``header_timeout_s``, as any other). Answering the request rather than
    closing at once lets the client read why: a close before its request arrives would make the request meet a
    reset.

    At shutdown (``shutdown``), uvicorn closes a connection with no request under way at once; but on a kept-alive
    connection the client's next request may already be on the wire, and closing would cut it off. Here such a
    connection is closed only once it has stayed idle ``SHUTDOWN_IDLE_S``; a request that begins meanwhile (or had
    begun: a head or a body partly in) is answered with ``Connection: close``, and the connection closes after it.

    A request that arrives in one read costs a few attribute updates; only a head or a body that spans reads arms
    a timer.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ClientLimits,
        admission: Admission,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.admission = admission
        self._max_header_bytes = limits.max_header_bytes
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a request head has begun and is not complete
        self._in_body = False  # a head is complete and its body is not
        self._head_room = limits.max_header_bytes  # bytes the head in progress (or the next one) may still take
        self._held: tuple[RequestResponseCycle, ASGI3Application] | None = None  # a request waiting for its body
        self._closing = False  # shutting down: answer what comes with Connection: close, then close
        self._refused = False  # opened past max_connections: its first bytes get 503 overloaded

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        if len(self.server_state.connections) > self.limits.max_connections:  # this one is counted there too
            # No room for a head: the first bytes take the slow path (_feed_head), which refuses the connection.
            # (A flag tested in data_received would cost every read; swapping the class would not do, as uvloop
            # keeps the bound data_received of the protocol it was given.)
            self._refused = True
            self._head_room = -1
            # Imported here: prometheus-client must not be imported before serve() has exported its directory; the
            # app imports it before any connection is made.
            from mab_service import metrics

            metrics.refused_connections.n += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._held = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            if len(data) > self._head_room:
                self._feed_head(data)
                return
            self._head_room -= len(data)
        _feed(self, data)
        if self._held is not None or (self._timer is None and (self._in_head or self._in_body)):
            self._after_partial_read()

    def on_message_begin(self) -> None:
        _on_message_begin(self)
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        if self._timer is not None:
            self._cancel_timer()
        _on_headers_complete(self)
        if self._closing and self.cycle is not None:
            self.cycle.keep_alive = False  # uvicorn adds Connection: close and closes once the answer is out

    def shutdown(self) -> None:
        """Called by the server at shutdown: close once no request is under way, never cutting one off."""
        self._closing = True
        if self._idle():
            # The client's next request may already be on its way: give it a moment to arrive and be answered.
            self.loop.call_later(SHUTDOWN_IDLE_S, self._close_if_idle)
        elif not self._in_head:  # a head partly in is answered with Connection: close once complete (above)
            super().shutdown()  # the request under way is answered with Connection: close

    def _idle(self) -> bool:
        cycle = self.cycle
        return not (self._in_head or self._in_body) and (cycle is None or cycle.response_complete)

    def _close_if_idle(self) -> None:
        if self._idle() and not self.transport.is_closing():
            self.transport.close()

    def on_message_complete(self) -> None:
        _on_message_complete(self)
        self._in_body = False
        self._head_room = self._max_header_bytes
        if self._timer is not None:
            self._cancel_timer()
        if self._held is not None:
            self._start_held()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # Called when a head is complete (or a pipelined request's turn comes): hold the request until its body
        # is in, so that the app and the in-flight count see only requests there is work for.
        if cycle.more_body:
            self._held = (cycle, app)
            if cycle.waiting_for_100_continue:  # the client sends the body only once told to
                self._check_held()
        else:
            self._start(cycle, app)

    def _start_held(self) -> None:
        assert self._held is not None
        cycle, app = self._held
        self._held = None
        self._start(cycle, app)

    def _start(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """Start the request's task; a request to anything but a probe gets its admission decision and may be
        answered whole."""
        scope = cycle.scope
        if scope["path"] not in self.admission.probes:
            scope[ADMITTED] = self.admission.arrive()  # type: ignore[literal-required]  # an ASGI scope extension
            cycle.__class__ = AnswerCycle  # the same object, with a send that also takes ANSWER
        _start_task(self, cycle, app)

    def _feed_head(self, data: bytes) -> None:
        """Feed a read longer than the head in progress may still take: the head must end within its room."""
        if self._refused:
            if not self.transport.is_closing():
                limit, retry_after_s = self.limits.max_connections, self.admission.retry_after_s
                message = f"the worker holds its limit of {limit} connections; retry after {retry_after_s} s"
                self._refuse(Overloaded(message, retry_after_s=retry_after_s))
            return
        while not self._in_body and len(data) > self._head_room:
            room = self._head_room
            self._head_room = 0
            _feed(self, data[:room])
            if self.transport.is_closing():
                return
            if not self._in_body and self._head_room == 0:  # the room is used up and the head is not over
                if self.cycle is None or self.cycle.response_complete:
                    limit = self._max_header_bytes
                    self._refuse(HeadersTooLarge(f"the request head is larger than {limit} bytes"))
                else:  # an earlier request's answer is still to come, and nothing may go before it
                    self.transport.close()
                return
            data = data[room:]
        self.data_received(data)

    def _check_held(self) -> None:
        """Start the held request if its body is too large (the app answers 413 at once), else let it come."""
        assert self._held is not None
        cycle = self._held[0]
        limit = self.limits.max_body_bytes
        if len(cycle.body) > limit or _declared_length(cycle.scope["headers"]) > limit:
            self._start_held()
            return
        if cycle.waiting_for_100_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        self.flow.resume_reading()  # on_body pauses reading past 64 KiB for an app that is not reading yet

    def _after_partial_read(self) -> None:
        """After a read that left a head or a body incomplete: check a held request; arm a timer."""
        if self.transport.is_closing():
            return
        if self._held is not None:
            self._check_held()
        if self._timer is None:
            if self._in_head:
                self._timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
            elif self._in_body:
                self._timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    def _head_timed_out(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._timer = None
        if self._held is not None:
            self._held = None
            self._refuse(RequestTimeout(f"the request body did not arrive within {self.limits.body_timeout_s:g} s"))
        elif not self.transport.is_closing():
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, exc: MabError) -> None:
        """Answer ``exc`` (JSON, ``Connection: close``) for a request the app has not seen; close the connection."""
        status, body, extra = error_answer(exc, "-", "-")
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            *extra,
            (b"connection", b"close"),
            (b"x-request-id", logs.new_request_id()),
        ]
        head = b"".join(b"%s: %s\r\n" % header for header in headers)
        self.transport.write(STATUS_LINE[status] + head + b"\r\n" + body)
        self.transport.close()


class AnswerCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, whose ``send`` also takes a whole answer (``ANSWER``) and writes its head
    and body at once; the state it leaves is the one uvicorn's ``send`` leaves after a head and a complete body."""

    async def send(self, message: Any) -> None:
        if message["type"] != ANSWER:
            await super().send(message)
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if self.response_started:
            raise RuntimeError(f"Unexpected ASGI message {ANSWER!r} sent, after the response started.")
        self.response_started = self.response_complete = True
        self.waiting_for_100_continue = False
        headers: Headers = message["headers"]
        if _CLOSE in headers:
            self.keep_alive = False
        elif not self.keep_alive:
            headers = [*headers, _CLOSE]
        lines = b"".join([b"%s: %s\r\n" % header for header in (*self.default_headers, *headers)])
        self.transport.write(b"%s%s\r\n%s" % (STATUS_LINE[message["status"]], lines, message["body"]))
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()


_CLOSE = (b"connection", b"close")

# The base protocol's methods that run for every request, called directly: super() would cost about as much as
# all the checks above together.
_feed = HttpToolsProtocol.data_received
_on_message_begin = HttpToolsProtocol.on_message_begin
_on_headers_complete = HttpToolsProtocol.on_headers_complete
_on_message_complete = HttpToolsProtocol.on_message_complete
_start_task = HttpToolsProtocol._start_asgi_task


def _declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The Content-Length of a request head, 0 if it has none (the parser has already checked its syntax)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else 0
    return 0
