"""Who sent the request being served: set once per request by the edge, read by the loop to share the held events."""

from __future__ import annotations

from contextvars import ContextVar

#: The client of the request in progress: ``key:<label>`` when API keys are on, else ``addr:<peer host>``; ``""``
#: outside a request.
CLIENT: ContextVar[str] = ContextVar("mab_client", default="")
