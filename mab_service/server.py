"""Serving: one worker in this process, or several under a small supervisor on one shared port.

Each worker builds its own edge (``http/``): one ``Admission`` shared by its protocol, its app and its
``DrainingServer``. The settings reach every worker as the object (pickled with the process arguments); only
PROMETHEUS_MULTIPROC_DIR goes through the environment, for prometheus-client.
"""

from __future__ import annotations

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
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from mab_service import logs
from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.http.admission import Admission
from mab_service.http.auth import ApiKeys, KeysFileError
from mab_service.http.drain import DrainingServer
from mab_service.http.protocol import ClientLimits, GuardedHttpToolsProtocol
from mab_service.learning import node

logger = logging.getLogger("mab_service.server")

#: Seconds the supervisor waits for its workers beyond their own drain and graceful timeout before killing them.
WORKER_EXIT_MARGIN_S = 5.0


class Supervisor:
    """Runs ``settings.workers`` worker processes on one listening socket.

    A worker that dies is replaced; one that fails to start (exit status 3) stops them all. SIGTERM or SIGINT
    is passed on to every worker, which drain in parallel; a worker still running after its drain, its
    graceful timeout and ``WORKER_EXIT_MARGIN_S`` is killed.
    """

    def __init__(
        self, settings: Settings, sockets: list[socket.socket], loop_state: node.NodeHandle | None = None
    ) -> None:
        self.settings = settings
        self.sockets = sockets
        self.loop_state = loop_state
        self.stop = threading.Event()
        self.signals: list[int] = []

    def _start_worker(self) -> SpawnProcess:
        # spawn, as uvicorn does: a fresh interpreter, no state forked from the supervisor.
        process = multiprocessing.get_context("spawn").Process(
            target=_run_worker,
            args=(self.settings, self.sockets, self.loop_state),
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


def _run_worker(settings: Settings, sockets: list[socket.socket], loop_state: node.NodeHandle | None) -> None:
    if loop_state is not None:
        node.adopt(node.Node.attach(loop_state))
    worker(settings).run(sockets=sockets)


def worker(settings: Settings) -> DrainingServer:
    """One worker's server: its app and protocol built around one ``Admission``, which the server drains."""
    # Imported here, not at the top: prometheus-client, which the app imports, reads PROMETHEUS_MULTIPROC_DIR when
    # it is first imported, and serve() sets it only after this module is imported.
    from mab_service.app import build_app
    from mab_service.routes import PROBES

    admission = Admission.from_settings(settings, PROBES)
    app = build_app(settings, admission=admission)
    # httptools, with limits on slow and broken clients and admission on arrival.
    protocol = partial(GuardedHttpToolsProtocol, limits=ClientLimits.from_settings(settings), admission=admission)
    return DrainingServer(uvicorn_config(settings, app, protocol), admission, settings.drain_delay_s)


def uvicorn_config(settings: Settings, app: Any, protocol: Any) -> uvicorn.Config:
    """The uvicorn configuration of one worker: ``app`` on uvloop and ``protocol``, our logging, no access log of
    uvicorn's."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol,
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


def _shared_socket(settings: Settings) -> socket.socket:
    """The listening socket the workers share, bound as uvicorn binds it (the app named here is never loaded)."""
    return uvicorn.Config("mab_service.app:create_app", host=settings.host, port=settings.port).bind_socket()


def serve(settings: Settings) -> None:
    """Run the service with ``settings`` until SIGTERM or SIGINT; exits with status 3 if it cannot start.

    Checks the API keys file (if set) first: every worker loads it again, and one unusable at start stops the start.
    Prepares the Prometheus multiprocess directory (a fresh temporary one unless ``metrics_dir`` is set, which
    is wiped), then serves in this process (one worker) or under a ``Supervisor``, which hands ``settings`` to
    every worker.
    """
    if settings.api_keys_file:
        try:
            ApiKeys(settings.api_keys_file)
        except KeysFileError as exc:
            logger.error("cannot start: setting api_keys_file: %s", exc)
            sys.exit(STARTUP_FAILURE)
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
            server = worker(settings)
            server.run()
            status = 0 if server.started else STARTUP_FAILURE
        else:
            handle = None if owned is None else owned.handle
            status = Supervisor(settings, [_shared_socket(settings)], handle).run()
    finally:
        if owned is not None:
            owned.close()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
    if status:
        sys.exit(status)
