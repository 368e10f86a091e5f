"""Serving: uvicorn with a drain before it stops listening, overload marked on arrival, several workers.

Shutdown, on SIGTERM (or a first SIGINT):

1. ``lifecycle.draining`` is set at once: /health answers 503 and every answer carries ``Connection: close``,
   while the listener keeps accepting for ``drain_delay_s`` so that load balancers stop routing here first;
2. then uvicorn's own shutdown: the listener closes, idle connections close, requests in flight get
   ``timeout_graceful_shutdown_s`` to finish (then they are cancelled), the lifespan closes the feature source.

A second SIGINT skips the drain, a third forces the exit; a repeated SIGTERM changes nothing.

Overload: a worker that runs CPU-bound requests one after the other never has more than one inside the app, so
a count taken when the app starts a request stays at one however long the queue is. The queue is the requests
read from the sockets whose tasks have not run yet, and only the server sees them arrive. ``RequestTasks``
replaces uvicorn's set of request tasks: when a request arrives while ``max_in_flight`` admitted ones are not yet
answered, its task is put in ``lifecycle.over_cap`` and the app answers it 503 ``overloaded`` without doing
the work. Admission is in order of arrival, so the requests that wait behind the admitted ones are the cheap
ones.

Slow and broken clients: uvicorn bounds only the idle time between requests, so the workers speak HTTP through
``protocol.GuardedHttpToolsProtocol``: time limits on request heads and bodies, a size limit on heads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from functools import partial
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from mab_service import logs
from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.learning import node
from mab_service.protocol import ClientLimits, GuardedHttpToolsProtocol
from mab_service.state import Lifecycle

logger = logging.getLogger("mab_service.server")

#: Seconds the supervisor waits for its workers beyond their own drain and graceful timeout before killing them.
WORKER_EXIT_MARGIN_S = 5.0


class RequestTasks(set["asyncio.Task[None]"]):
    """uvicorn's set of request tasks (``server_state.tasks``), admitting requests as they arrive.

    uvicorn adds a request's task when its headers have been parsed and discards it when the task is done. A task
    added while ``limit`` tasks are in ``admitted`` goes into ``over_cap`` instead. The app takes its task out of
    ``admitted`` as soon as the answer is out: the discard comes in a later turn of the event loop, after the
    requests that arrived meanwhile were counted, and would make a busy worker shed below its limit.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.admitted: set[asyncio.Task[None]] = set()
        self.over_cap: set[asyncio.Task[None]] = set()

    def add(self, task: asyncio.Task[None]) -> None:
        if len(self.admitted) >= self.limit:
            self.over_cap.add(task)
        else:
            self.admitted.add(task)
        set.add(self, task)  # not super(): this runs for every request, and super() costs ~0.2 us

    def discard(self, task: object) -> None:
        set.discard(self, task)
        self.admitted.discard(task)
        self.over_cap.discard(task)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains before it closes its listener and marks requests over the in-flight cap."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.drain_delay_s = settings.drain_delay_s
        self.tasks = RequestTasks(settings.max_in_flight)
        # Connections take this set when they are made, after startup; it replaces uvicorn's plain set.
        self.server_state.tasks = self.tasks
        self.lifecycle: Lifecycle | None = None
        self.drain_ends: float | None = None
        self._drain_logged = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        lifecycle = self.lifespan.state.get("lifecycle")
        if isinstance(lifecycle, Lifecycle):
            self.lifecycle = lifecycle
            lifecycle.admitted, lifecycle.over_cap = self.tasks.admitted, self.tasks.over_cap
            lifecycle.draining = self.drain_ends is not None  # a signal may have come during startup

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: set flags only; on_tick does the rest from the event loop.
        if self.drain_ends is None:
            self.drain_ends = time.monotonic() + self.drain_delay_s
            if self.lifecycle is not None:
                self.lifecycle.draining = True
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


class Supervisor:
    """Runs ``settings.workers`` worker processes on one listening socket.

    A worker that dies is replaced; one that fails to start (exit status 3) stops them all. SIGTERM or SIGINT
    is passed on to every worker, which drain in parallel; a worker still running after its drain, its
    graceful timeout and ``WORKER_EXIT_MARGIN_S`` is killed.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        settings: Settings,
        sockets: list[socket.socket],
        loop_state: node.NodeHandle | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.sockets = sockets
        self.loop_state = loop_state
        self.stop = threading.Event()
        self.signals: list[int] = []

    def _start_worker(self) -> SpawnProcess:
        # spawn, as uvicorn does: a fresh interpreter, no state forked from the supervisor.
        process = multiprocessing.get_context("spawn").Process(
            target=_run_worker,
            args=(self.config, self.settings, self.sockets, self.loop_state),
            name="mab-service-worker",
        )
        process.start()
        return process

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        self.stop.set()

    def run(self) -> int:
        """Serve until a signal (exit status 0) or a worker that cannot start (``STARTUP_FAILURE``)."""
        for handled in (signal.SIGINT, signal.SIGTERM):
            signal.signal(handled, self._on_signal)
        logger.info("supervisor %d starting %d workers", os.getpid(), self.settings.workers)
        workers = [self._start_worker() for _ in range(self.settings.workers)]
        status = 0
        while not self.stop.wait(0.5):
            for i, worker in enumerate(workers):
                if worker.is_alive():
                    continue
                if worker.exitcode == STARTUP_FAILURE:
                    logger.error("worker %s could not start; stopping", worker.pid)
                    status = STARTUP_FAILURE
                    self.stop.set()
                    break
                logger.warning("worker %s exited with status %s; starting another", worker.pid, worker.exitcode)
                workers[i] = self._start_worker()
        passed_on = self.signals[0] if self.signals else signal.SIGTERM
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, passed_on)
        deadline = (
            time.monotonic()
            + self.settings.drain_delay_s
            + self.settings.timeout_graceful_shutdown_s
            + WORKER_EXIT_MARGIN_S
        )
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                logger.error("worker %s did not stop in time; killing it", worker.pid)
                worker.kill()
                worker.join()
        return status


def _run_worker(
    config: uvicorn.Config, settings: Settings, sockets: list[socket.socket], loop_state: node.NodeHandle | None
) -> None:
    config.configure_logging()
    if loop_state is not None:
        node.adopt(node.Node.attach(loop_state))
    DrainingServer(config, settings).run(sockets=sockets)


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration for ``settings``: uvloop and httptools, our logging, no access log of uvicorn's."""
    # Imported here, not at the top: prometheus-client, which the app imports, reads PROMETHEUS_MULTIPROC_DIR when
    # it is first imported, and serve() sets it only after this module is imported.
    from mab_service.app import build_app

    return uvicorn.Config(
        # The settings themselves go to every worker (pickled with the config), not through the environment.
        partial(build_app, settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        # httptools, with limits on slow and broken clients; the limits travel with the protocol to every worker.
        http=partial(GuardedHttpToolsProtocol, limits=ClientLimits.from_settings(settings)),  # type: ignore[arg-type]
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary request, under the same limits
        lifespan="on",
        # Ours (logs.py) carries the request id and the duration; uvicorn's would be a second line.
        access_log=False,
        log_config=logs.log_config(settings),
        log_level=settings.log_level,
        # uvicorn's hints say int, but the values go to loop.call_later and asyncio.wait_for, which take any number
        # of seconds (int() would turn a keep-alive of 0.5 s into 0).
        timeout_keep_alive=settings.timeout_keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown_s,  # type: ignore[arg-type]
        server_header=False,
        proxy_headers=settings.proxy_headers,
    )


def serve(settings: Settings) -> None:
    """Run the service with ``settings`` until SIGTERM or SIGINT; exits with status 3 if it cannot start.

    Prepares the Prometheus multiprocess directory (a fresh temporary one unless ``metrics_dir`` is set, which
    is wiped), then serves in this process (one worker) or under a ``Supervisor``, which hands ``settings`` to
    every worker.
    """
    owned_dir = None
    if settings.metrics:
        if settings.metrics_dir:
            directory = Path(settings.metrics_dir)
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("*.db"):  # counts of an earlier run would be added to ours
                stale.unlink()
        else:
            owned_dir = tempfile.mkdtemp(prefix="mab-metrics-")
            settings = settings.replace(metrics_dir=owned_dir)
    # Before the app (and prometheus-client) is imported here or in a worker: prometheus-client reads it from the
    # environment. The only setting that travels that way.
    settings.export_metrics_dir(os.environ)
    config = uvicorn_config(settings)
    owned = None
    try:
        if settings.learning:
            # The node's loop state is built once, here, and every worker maps it.
            try:
                owned = node.Node.open(settings)
            except FeatureSourceError as exc:
                logger.error("cannot start: %s", exc.message)
                sys.exit(STARTUP_FAILURE)
            node.adopt(owned)
        if settings.workers == 1:
            server = DrainingServer(config, settings)
            server.run()
            started = server.started
            status = 0 if started else STARTUP_FAILURE
        else:
            handle = None if owned is None else owned.handle
            status = Supervisor(config, settings, [config.bind_socket()], handle).run()
    finally:
        if owned is not None:
            owned.close()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
    if status:
        sys.exit(status)
