"""Google's Bigtable and Pub/Sub emulators as session fixtures.

Each starts on a free loopback port with ``gcloud beta emulators ... start``, in its own process group (the gcloud
wrapper execs the emulator as a child that outlives a killed wrapper, so the whole group is stopped), and the
client library's own variable (``BIGTABLE_EMULATOR_HOST``, ``PUBSUB_EMULATOR_HOST``) points at it for the session.
Tests that use them skip, saying why, where gcloud, the emulator component, Java or the client library is absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import unused_tcp_port

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Emulator:
    host: str
    """host:port, the value of the client library's variable."""
    proc: subprocess.Popen[bytes]


def _missing(kind: str, module: str, package: str) -> str:
    if importlib.util.find_spec("google.cloud") is None or importlib.util.find_spec(module) is None:
        return f"{package} is not installed (pip install 'mab-service[fleet]')"
    if shutil.which("gcloud") is None:
        return f"gcloud is not installed (the {kind} emulator comes with google-cloud-cli-{kind}-emulator)"
    if kind == "pubsub" and shutil.which("java") is None:
        return "java is not installed (the Pub/Sub emulator needs Java 11 or later)"
    return ""


def _start(kind: str, variable: str, log_path: str) -> Iterator[Emulator]:
    port = unused_tcp_port()
    log = open(log_path, "wb")  # closed below, after the emulator stops
    proc = subprocess.Popen(
        ["gcloud", "beta", "emulators", kind, "start", f"--host-port=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.flush()
                with open(log_path, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                if "not installed" in tail or "component" in tail.lower():
                    pytest.skip(f"the {kind} emulator is not installed (google-cloud-cli-{kind}-emulator): {tail}")
                pytest.fail(f"the {kind} emulator exited with status {proc.returncode}:\n{tail}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the {kind} emulator did not listen on port {port} within {START_TIMEOUT_S} s")
                time.sleep(0.05)
        host = f"127.0.0.1:{port}"
        before = os.environ.get(variable)
        os.environ[variable] = host
        try:
            yield Emulator(host, proc)
        finally:
            if before is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = before
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the emulator's whole process group: TERM, then KILL after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the emulator itself may outlive the wrapper that was waited for
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """Google's Bigtable emulator on a free loopback port; BIGTABLE_EMULATOR_HOST points at it."""
    reason = _missing("bigtable", "google.cloud.bigtable", "google-cloud-bigtable")
    if reason:
        pytest.skip(reason)
    yield from _start("bigtable", "BIGTABLE_EMULATOR_HOST", str(tmp_path_factory.mktemp("emulators") / "bigtable.log"))


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """Google's Pub/Sub emulator on a free loopback port; PUBSUB_EMULATOR_HOST points at it."""
    reason = _missing("pubsub", "google.cloud.pubsub_v1", "google-cloud-pubsub")
    if reason:
        pytest.skip(reason)
    yield from _start("pubsub", "PUBSUB_EMULATOR_HOST", str(tmp_path_factory.mktemp("emulators") / "pubsub.log"))


@pytest.fixture
def fleet_table(bigtable_emulator: Emulator) -> str:
    """A new table with the loop's column families (``projects/fleet/instances/mab/tables/arms-<random>``)."""
    import uuid

    from mab_service.fleet.schema import TablePath
    from mab_service.fleet.setup import ensure_table

    path = TablePath("fleet", "mab", f"arms-{uuid.uuid4().hex[:8]}")
    ensure_table(path, marker_ttl_s=3600, say=lambda _: None)
    return str(path)
