"""What each /predict answer was: outcome kinds, which of them fail the run, and the record of every request."""

from __future__ import annotations

import array
import contextlib
import re

import numpy as np
import orjson

#: 503 error codes that say why; any other 5xx is a failure of the run.
KNOWN_503 = {"feature_source_unavailable", "overloaded"}
OK = "200 ok"
DEGRADED = "200 degraded"
TIMEOUT = "timeout"
UNSENT = "not sent: no free connection in time"
WRONG = "200 wrong answer"


class Records:
    """Every /predict request: due time (s since the start), latency from the due time, dispatch lag, outcome."""

    def __init__(self) -> None:
        self.due_s = array.array("f")
        self.latency_ms = array.array("f")
        self.lag_ms = array.array("f")
        self.kind = array.array("B")
        self.kinds: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, due_s: float, latency_ms: float, lag_ms: float, kind: str, example: str = "") -> None:
        code = self.kinds.get(kind)
        if code is None:
            code = self.kinds[kind] = len(self.kinds)
            if example:
                self.examples[kind] = example[:300]
        self.due_s.append(due_s)
        self.latency_ms.append(latency_ms)
        self.lag_ms.append(lag_ms)
        self.kind.append(code)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        names = sorted(self.kinds, key=self.kinds.__getitem__)
        return (
            np.frombuffer(self.due_s, dtype=np.float32).astype(np.float64),
            np.frombuffer(self.latency_ms, dtype=np.float32).astype(np.float64),
            np.frombuffer(self.lag_ms, dtype=np.float32).astype(np.float64),
            np.frombuffer(self.kind, dtype=np.uint8),
            names,
        )


def classify(status: int, body: bytes) -> str:
    """``200 ok``, ``200 degraded``, or ``<status> <error code>`` (``-`` when the body names none)."""
    if status == 200:
        return DEGRADED if b'"degraded":true' in body else OK
    code = "-"
    with contextlib.suppress(orjson.JSONDecodeError):
        doc = orjson.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            code = doc["error"]
    return f"{status} {code}"


def is_answer(kind: str) -> bool:
    """An outcome with an HTTP status (as opposed to a timeout, a transport error, a request never sent)."""
    return kind[:3].isdigit()


def is_failure(kind: str) -> bool:
    """An outcome that fails the run: a 5xx that is not a 503 with a known code, a hang, a transport error, a
    malformed answer."""
    if kind in (OK, DEGRADED):
        return False
    if kind == TIMEOUT or kind == WRONG or kind.startswith(("transport", "client error")):
        return True
    status, _, code = kind.partition(" ")
    return status.isdigit() and int(status) >= 500 and not (status == "503" and code in KNOWN_503)


def health_state(status: int, body: bytes) -> str:
    """``200 ok`` or ``<status> <status field>: <reason>`` with numbers and details left out."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{status} (not JSON)"
    if not isinstance(doc, dict):
        return f"{status} (not an object)"
    state = f"{status} {doc.get('status', '?')}"
    reason = str(doc.get("reason", ""))
    if reason:
        state += ": " + re.sub(r"\d+", "N", reason.split(": ", 1)[0])
    return state
