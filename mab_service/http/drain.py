"""Drain: a uvicorn server that keeps serving for ``drain_delay_s`` after SIGTERM, then stops as uvicorn does.

On SIGTERM (or a first SIGINT):

1. ``admission.draining`` is set at once: /health answers 503 and every answer carries ``Connection: close``,
   while the listener keeps accepting for ``drain_delay_s`` so that load balancers stop routing here first;
2. then uvicorn's own shutdown: the listener closes, each connection is shut down (``protocol.py``: a request under
   way, even one whose head is only partly in, is answered with ``Connection: close``; an idle connection is closed
   once it has stayed idle ``SHUTDOWN_IDLE_S``, a request that arrives meanwhile being answered the same way),
   requests in flight get ``timeout_graceful_shutdown_s`` to finish (then they are cancelled), the lifespan closes
   the feature source.

A second SIGINT skips the drain, a third forces the exit; a repeated SIGTERM changes nothing.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from mab_service.http.admission import Admission

logger = logging.getLogger("mab_service.server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains before it closes its listener."""

    def __init__(self, config: uvicorn.Config, admission: Admission, drain_delay_s: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.drain_delay_s = drain_delay_s
        self.drain_ends: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: set flags only; on_tick does the rest from the event loop.
        if self.drain_ends is None:
            self.drain_ends = time.monotonic() + self.drain_delay_s
            self.admission.draining = True
        elif sig == signal.SIGINT:
            self._exit()  # a second Ctrl-C: stop draining; a third: do not wait for requests either

    def _exit(self) -> None:
        # uvicorn's handle_exit also queues the signal to be raised again after shutdown, which would end the
        # process by the signal before the CLI cleans up; a drained server exits normally instead.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_ends is not None and not self.should_exit:
            if not self._drain_logged:
                self._drain_logged = True
                logger.info("draining: /health answers 503, the listener closes in %.1f s", self.drain_delay_s)
            if time.monotonic() >= self.drain_ends:
                self._exit()
        return await super().on_tick(counter)
