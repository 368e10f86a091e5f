"""Errors become HTTP answers here, and only here: one table of exception -> answer, one function reading it.

Domain errors (``errors.MabError`` and its subclasses, the learning loop's included) carry their own status, code
and message; Starlette's ``HTTPException`` (404, 405) gets a code from ``STARLETTE_CODES``; anything else is a
bug, answered with a generic 500 while the traceback goes to the log. The fast endpoints, Starlette's routes and
the protocol's own refusals (408, 431) all answer through ``error_answer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException

from mab_service.errors import MabError, Overloaded, Unauthorized

logger = logging.getLogger("mab_service")

Headers = list[tuple[bytes, bytes]]

#: Codes of the HTTP errors Starlette raises itself.
STARLETTE_CODES = {404: "not_found", 405: "method_not_allowed"}
_INTERNAL = b'{"error":"internal_error","message":"internal server error"}'


def _domain(exc: MabError) -> tuple[int, bytes, Headers]:
    return exc.status_code, orjson.dumps(exc.to_json()), []


def _overloaded(exc: Overloaded) -> tuple[int, bytes, Headers]:
    return exc.status_code, orjson.dumps(exc.to_json()), [(b"retry-after", b"%d" % exc.retry_after_s)]


def _unauthorized(exc: Unauthorized) -> tuple[int, bytes, Headers]:
    return exc.status_code, orjson.dumps(exc.to_json()), [(b"www-authenticate", b"Bearer")]


def _starlette(exc: HTTPException) -> tuple[int, bytes, Headers]:
    code = STARLETTE_CODES.get(exc.status_code, "http_error")
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    return exc.status_code, orjson.dumps({"error": code, "message": exc.detail}), headers


def _unexpected(exc: BaseException) -> tuple[int, bytes, Headers]:
    return 500, _INTERNAL, []


#: Exception class -> its answer (status, JSON body, extra headers); the first class of the exception's MRO listed
#: here decides, as Starlette picks an exception handler.
ANSWERS: dict[type[BaseException], Callable[[Any], tuple[int, bytes, Headers]]] = {
    Overloaded: _overloaded,
    Unauthorized: _unauthorized,
    MabError: _domain,
    HTTPException: _starlette,
    Exception: _unexpected,
}


def error_answer(exc: BaseException, method: str, path: str) -> tuple[int, bytes, Headers]:
    """The status, JSON body and extra headers that answer ``exc`` raised while serving ``method path``.

    An exception outside the table's domain classes is logged with its traceback; the client never sees its text.
    """
    for cls in type(exc).__mro__:
        answer = ANSWERS.get(cls)
        if answer is not None:
            if answer is _unexpected:
                logger.error("unhandled error on %s %s", method, path, exc_info=exc)
            return answer(exc)
    raise exc  # a BaseException (cancellation, exit): not an answer
