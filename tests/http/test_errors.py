"""One table turns every exception into its answer."""

from __future__ import annotations

import logging

import orjson
import pytest
from starlette.exceptions import HTTPException

from mab_service.errors import Overloaded, PayloadTooLarge, ValidationFailed
from mab_service.http.errors import error_answer
from mab_service.learning.loop import UnknownEvent


def test_domain_errors_answer_with_their_status_code_and_message() -> None:
    status, body, headers = error_answer(ValidationFailed("top_k must be >= 1", field="top_k"), "POST", "/predict")
    assert (status, headers) == (422, [])
    assert orjson.loads(body) == {"error": "validation_error", "message": "top_k must be >= 1", "field": "top_k"}
    assert error_answer(PayloadTooLarge("big"), "POST", "/predict")[0] == 413
    # Errors the learning loop declares answer the same way.
    assert error_answer(UnknownEvent("no such event"), "POST", "/reward")[0] == 404


def test_overloaded_carries_retry_after() -> None:
    status, body, headers = error_answer(Overloaded("busy", retry_after_s=3), "POST", "/predict")
    assert status == 503 and orjson.loads(body)["error"] == "overloaded"
    assert headers == [(b"retry-after", b"3")]


def test_starlette_errors_get_a_code() -> None:
    status, body, _ = error_answer(HTTPException(405), "GET", "/predict")
    assert status == 405 and orjson.loads(body) == {"error": "method_not_allowed", "message": "Method Not Allowed"}
    assert orjson.loads(error_answer(HTTPException(404), "GET", "/x")[1])["error"] == "not_found"


def test_anything_else_is_a_generic_500_and_a_logged_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        status, body, _ = error_answer(RuntimeError("secret internals"), "POST", "/predict")
    assert status == 500 and b"secret" not in body
    assert orjson.loads(body) == {"error": "internal_error", "message": "internal server error"}
    assert "unhandled error on POST /predict" in caplog.text and "secret internals" in caplog.text
