"""Logging: JSON lines (or text for a terminal), a request id on every line logged during a request, access logs.

Each line is one JSON object: ``time`` (UTC, ms), ``level``, ``logger``, ``message``, ``request_id`` when the line
is logged while a request is served, ``exc_info`` with the traceback, and any ``extra`` fields (the access log
adds ``method``, ``path``, ``status``, ``duration_ms``, ``client``). The standard library does the work: a
formatter is all JSON needs, and uvicorn's workers apply the same ``dictConfig`` in every process.

The request id is the client's ``X-Request-ID`` when it is a short printable token, otherwise one made here; it
is echoed in the ``X-Request-ID`` answer header. Access logs are off unless ``access_log`` is set; when off, a
request costs one boolean test and no formatting.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

import orjson

from mab_service.config import Settings

#: The id of the request being served, set by the endpoint; each request runs in its own task and context.
REQUEST_ID: ContextVar[bytes | None] = ContextVar("request_id", default=None)
MAX_REQUEST_ID_BYTES = 128
_TOKEN = re.compile(rb"[!-~]{1,%d}" % MAX_REQUEST_ID_BYTES)
# A random prefix per process and a counter: unique across workers and replicas, and about 20x cheaper per
# request than uuid4().
_PREFIX = os.urandom(6).hex().encode()
_COUNTER = itertools.count(1)

access_logger = logging.getLogger("mab_service.access")

_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def new_request_id() -> bytes:
    """A fresh request id: ``<12 random hex digits of this process>-<counter in hex>``."""
    return b"%s-%x" % (_PREFIX, next(_COUNTER))


def request_id_from(value: bytes) -> bytes:
    """``value`` (a client's X-Request-ID) if it is 1 to 128 printable ASCII characters, else a fresh id."""
    return value if _TOKEN.fullmatch(value) else new_request_id()


def log_access(method: str, path: str, status: int, seconds: float, request_id: bytes, client: Any) -> None:
    """One access-log line; call only when ``settings.access_log`` is on."""
    host = f"{client[0]}:{client[1]}" if client else "-"
    access_logger.info(
        '%s "%s %s" %d %.3f ms',
        host,
        method,
        path,
        status,
        seconds * 1e3,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1e3, 3),
            "client": host,
            "request_id": request_id.decode("ascii"),
        },
    )


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id.decode("ascii")
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message``, with ``[request id]`` when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = REQUEST_ID.get()
        return text if request_id is None else f"{text} [{request_id.decode('ascii')}]"


def log_config(settings: Settings) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` for ``settings``: one handler on stderr, uvicorn's loggers included.

    uvicorn applies it in every worker process; its own access log stays off (ours carries the request id).
    """
    level = settings.log_level.upper()
    formatter = {"()": f"{__name__}.{'JsonFormatter' if settings.log_format == 'json' else 'TextFormatter'}"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            # uvicorn's default config gives these loggers handlers of their own; here they go through the root.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": False},
            "mab_service.access": {"level": "INFO"},
        },
    }
