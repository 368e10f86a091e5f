"""A fast endpoint's answer leaves in one write, in the state uvicorn's own head-then-body sends leave."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from mab_service.http.protocol import ANSWER, AnswerCycle


class Recorder(asyncio.Transport):
    """A transport that keeps what is written to it, one item per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _cycle(
    cls: type[RequestResponseCycle], keep_alive: bool = True
) -> tuple[RequestResponseCycle, Recorder, list[int]]:
    transport = Recorder()
    completed: list[int] = []
    cycle = cls(
        scope={"type": "http", "method": "POST", "path": "/predict", "headers": []},  # type: ignore[typeddict-item]
        transport=transport,
        flow=FlowControl(transport),
        logger=None,  # type: ignore[arg-type]
        access_logger=None,  # type: ignore[arg-type]
        access_log=False,
        default_headers=[(b"date", b"Sat, 28 Nov 2026 07:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: completed.append(1),
    )
    return cycle, transport, completed


HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"11"), (b"x-request-id", b"r-1")]


@pytest.mark.anyio
@pytest.mark.parametrize("keep_alive", [True, False])
async def test_an_answer_is_written_at_once_as_uvicorn_writes_it_in_two(keep_alive: bool) -> None:
    ours, written, completed = _cycle(AnswerCycle, keep_alive)
    await ours.send({"type": ANSWER, "status": 200, "headers": HEADERS, "body": b'{"ok":true}'})
    theirs, expected, _ = _cycle(RequestResponseCycle, keep_alive)
    await theirs.send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await theirs.send({"type": "http.response.body", "body": b'{"ok":true}'})

    assert len(written.writes) == 1 and len(expected.writes) == 2
    assert written.writes[0] == b"".join(expected.writes)
    assert ours.response_complete and ours.message_event.is_set() and completed == [1]
    assert (ours.keep_alive, written.closed) == (theirs.keep_alive, expected.closed) == (keep_alive, not keep_alive)


@pytest.mark.anyio
async def test_an_answer_that_says_close_closes_the_connection() -> None:
    cycle, written, _ = _cycle(AnswerCycle)
    headers = [*HEADERS, (b"connection", b"close")]
    await cycle.send({"type": ANSWER, "status": 503, "headers": headers, "body": b'{"ok":true}'})
    assert written.writes[0].startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert written.writes[0].count(b"connection: close") == 1
    assert cycle.keep_alive is False and written.closed


@pytest.mark.anyio
async def test_the_ordinary_messages_still_work_and_an_answer_after_them_is_refused() -> None:
    cycle, written, _ = _cycle(AnswerCycle)
    await cycle.send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    with pytest.raises(RuntimeError, match="after the response started"):
        await cycle.send({"type": ANSWER, "status": 200, "headers": HEADERS, "body": b'{"ok":true}'})
    await cycle.send({"type": "http.response.body", "body": b'{"ok":true}'})
    assert len(written.writes) == 2 and cycle.response_complete


@pytest.mark.anyio
async def test_nothing_is_written_to_a_client_that_went_away() -> None:
    cycle, written, completed = _cycle(AnswerCycle)
    cycle.disconnected = True
    await cycle.send({"type": ANSWER, "status": 200, "headers": HEADERS, "body": b'{"ok":true}'})
    assert written.writes == [] and completed == []
