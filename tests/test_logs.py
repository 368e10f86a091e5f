"""Structured logs: JSON lines, the request id (taken or made, echoed, on every line of a request), access logs."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

import httpx
import pytest
from starlette.testclient import TestClient

from mab_service import logs
from mab_service.app import build_app
from mab_service.config import Settings
from tests.conftest import Server
from tests.test_app import BODY as APP_BODY, ScriptedSource

BODY = {"user_id": "u", "candidates": ["mid", "weak"], "top_k": 1}


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("mab_service.test").makeRecord(
        "mab_service.test", logging.WARNING, __file__, 1, message, args, None, extra=extra
    )
    return record


def test_json_formatter_writes_one_object_with_extras_and_the_request_id() -> None:
    formatter = logs.JsonFormatter()
    token = logs.REQUEST_ID.set(b"req-7")
    try:
        line = formatter.format(_record("fetch of %d ids failed", 3, store="vertex"))
    finally:
        logs.REQUEST_ID.reset(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "fetch of 3 ids failed"
    assert entry["level"] == "warning" and entry["logger"] == "mab_service.test"
    assert entry["request_id"] == "req-7" and entry["store"] == "vertex"
    assert entry["time"].endswith("+00:00")
    # Outside a request there is no request id.
    assert "request_id" not in json.loads(formatter.format(_record("idle")))


def test_json_formatter_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "failed"
    assert "ValueError: boom" in entry["exc_info"] and "Traceback" in entry["exc_info"]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (b"abc-123", True),
        (b"0" * logs.MAX_REQUEST_ID_BYTES, True),
        (b"0" * (logs.MAX_REQUEST_ID_BYTES + 1), False),
        (b"has space", False),
        (b"", False),
        ("é".encode(), False),
    ],
)
def test_a_client_request_id_is_kept_only_when_it_is_a_short_token(given: bytes, kept: bool) -> None:
    assert (logs.request_id_from(given) == given) is kept


def test_new_request_ids_are_unique_and_printable() -> None:
    ids = {logs.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(logs.request_id_from(i) == i for i in ids)


def test_log_config_routes_uvicorn_through_the_chosen_formatter() -> None:
    config = logs.log_config(Settings(log_format="text", log_level="warning"))
    assert config["formatters"]["default"]["()"] == "mab_service.logs.TextFormatter"
    assert config["root"]["level"] == "WARNING"
    assert config["loggers"]["uvicorn.access"]["propagate"] is False  # uvicorn's access log stays off
    assert logs.log_config(Settings())["formatters"]["default"]["()"] == "mab_service.logs.JsonFormatter"


def _output_after_stop(server: Server) -> list[str]:
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=20)
    assert server.proc.stdout is not None
    return server.proc.stdout.read().decode().splitlines()


def test_access_log_lines_are_json_with_the_request_id(server_factory: Callable[..., Server], table_csv) -> None:
    server = server_factory(args=["--features", f"csv:{table_csv}", "--access-log"])
    with server.client() as client:
        given = client.post("/predict", json=BODY, headers={"x-request-id": "trace-42"})
        made = client.post("/predict", json=BODY)
        health = client.get("/health")
        bad = client.post("/predict", content=b"{", headers={"content-type": "application/json"})
    assert given.headers["x-request-id"] == "trace-42"
    made_id = made.headers["x-request-id"]
    assert made_id and made_id != "trace-42"
    assert health.headers["x-request-id"] not in (made_id, "trace-42")
    lines = _output_after_stop(server)
    entries = [json.loads(line) for line in lines]  # every line is JSON, uvicorn's included
    access = {e["request_id"]: e for e in entries if e["logger"] == "mab_service.access"}
    assert access["trace-42"]["status"] == 200 and access["trace-42"]["path"] == "/predict"
    assert access["trace-42"]["method"] == "POST" and access["trace-42"]["duration_ms"] > 0
    assert access[made_id]["status"] == 200
    assert access[health.headers["x-request-id"]]["path"] == "/health"
    assert access[bad.headers["x-request-id"]]["status"] == 400
    assert any(e["logger"] == "uvicorn.error" and "Application startup complete" in e["message"] for e in entries)


def test_access_log_is_off_by_default(server_factory: Callable[..., Server], table_csv) -> None:
    server = server_factory(args=["--features", f"csv:{table_csv}"])
    with server.client() as client:
        assert client.post("/predict", json=BODY).status_code == 200
    entries = [json.loads(line) for line in _output_after_stop(server)]
    assert entries and not [e for e in entries if e["logger"] in ("mab_service.access", "uvicorn.access")]


def test_an_unexpected_error_is_logged_with_its_request_id() -> None:
    source = ScriptedSource()
    source.fail_with = RuntimeError("store exploded")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logging.getLogger("mab_service").addHandler(handler)
    try:
        with TestClient(build_app(Settings(), source=source), raise_server_exceptions=False) as client:
            answer = client.post("/predict", json=APP_BODY, headers={"x-request-id": "bad-1"})
    finally:
        logging.getLogger("mab_service").removeHandler(handler)
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "bad-1"
    errors = [json.loads(line) for line in stream.getvalue().splitlines() if '"level":"error"' in line]
    assert errors and errors[0]["request_id"] == "bad-1" and "store exploded" in errors[0]["exc_info"]
    assert "store exploded" not in answer.text


def test_text_format_is_plain(server_factory: Callable[..., Server], table_csv) -> None:
    server = server_factory(args=["--features", f"csv:{table_csv}", "--log-format", "text"])
    assert httpx.get(server.url + "/health").status_code == 200
    lines = _output_after_stop(server)
    assert any("INFO uvicorn.error: Application startup complete." in line for line in lines)
    assert not any(line.startswith("{") for line in lines)
