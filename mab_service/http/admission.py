"""Admission: how many requests one worker holds, and whether it is draining."""

from __future__ import annotations

from mab_service.config import Settings

#: The scope key under which the protocol records its decision on a request, taken when its body was in.
ADMITTED = "mab.admitted"


class Admission:
    """One worker's admission and drain state, shared by its protocol, its app and its server.

    A request to any path but the probes (``probes``: /health, /live, /metrics, which must answer however busy the
    worker is) is admitted while fewer than ``limit`` admitted ones are unanswered; otherwise it is answered 503
    ``overloaded`` at once, without reading its body. The protocol decides when the request's body is in and its
    task is created (``arrive``), in order of arrival: a worker that runs CPU-bound requests one after another never
    has more than one inside the app, so a count taken there would stay at one however long the queue of requests
    read but not yet run. The app releases the slot as soon as the answer is out (``leave``). Under a server that
    does not decide (an in-process test client), the app decides itself.

    ``draining`` is set by the server on SIGTERM: /health answers 503 and every answer carries
    ``Connection: close``.
    """

    __slots__ = ("draining", "held", "limit", "probes", "retry_after_s")

    def __init__(self, limit: int, retry_after_s: int, probes: frozenset[str] = frozenset()) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.probes = probes
        self.held = 0
        self.draining = False

    @classmethod
    def from_settings(cls, settings: Settings, probes: frozenset[str]) -> Admission:
        return cls(settings.max_in_flight, settings.retry_after_s, probes)

    def arrive(self) -> bool:
        """Take a slot for a request that arrives now: False if all ``limit`` are held (answer it ``overloaded``)."""
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def leave(self) -> None:
        """Give back the slot of an admitted request: its answer is out (or it ended without one)."""
        self.held -= 1
