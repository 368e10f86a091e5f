from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest


class Rand:
    """Seeded random test data whose repr shows the seed, so a failure names what to replay."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.gen = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Rand(seed={self.seed})"


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every service the tests start keeps its loop state under a temporary XDG_STATE_HOME (one directory per port),
    never in the home directory."""
    path = tmp_path_factory.mktemp("state")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(path)
    yield path
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture
def rand() -> Rand:
    return Rand(seed=20261121)


def unused_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real ``mab-service serve`` process on a loopback port."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc = proc
        self.url = url

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)


def _start(env_overrides: dict[str, str], args: list[str], ready: bool = True, port: int | None = None) -> Server:
    """Start a server and wait until /health answers 200 (or, unless ``ready``, until /live does)."""
    port = port or unused_tcp_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAB_")}
    env.update(env_overrides)
    cmd = [sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output}")
        try:
            if httpx.get(url + ("/health" if ready else "/live"), timeout=1).status_code == 200:
                return Server(proc, url)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError("server did not become ready within 30 s")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL after 10 s, and close its output pipe."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture(scope="session")
def server_factory() -> Iterator[Callable[..., Server]]:
    """Starts servers with given MAB_* settings and CLI args; stops them all at the end of the session."""
    started: list[Server] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None, ready: bool = True) -> Server:
        server = _start(env or {}, args or [], ready)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_process(server.proc)


TABLE = """entity_id,alpha,beta
strong,1000000,1
weak,1,1000000
mid,50,50
é-unicode,3,4
"""


@pytest.fixture(scope="session")
def table_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("features") / "table.csv"
    rows = [TABLE.rstrip("\n")] + [f"c{i},{1 + i % 50},{100 + i % 900}" for i in range(5000)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., Server], table_csv: Path) -> Server:
    return server_factory(args=["--features", f"csv:{table_csv}", "--max-candidates", "3000"])


@pytest.fixture(scope="session")
def frozen_server(server_factory: Callable[..., Server], table_csv: Path) -> Server:
    """The same table with the learning loop off: posteriors that never change, so a seed repeats its answer."""
    return server_factory(args=["--features", f"csv:{table_csv}", "--max-candidates", "3000", "--no-learning"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class EmulatorProcess:
    """A real ``python -m mab_service.emulator`` process on a loopback port; its output goes to ``log``."""

    def __init__(self, proc: subprocess.Popen[bytes], target: str, log: Path) -> None:
        self.proc = proc
        self.target = target
        self.log = log


def start_emulator(
    table: Path, args: list[str] | None = None, timeout_s: float = 30.0, port: int | None = None
) -> EmulatorProcess:
    """Start the emulator's one command on a loopback port (a free one unless given); returns once it listens.

    Its output goes to a file, not a pipe nobody reads, so that it can never block on a full pipe.
    """
    port = port or unused_tcp_port()
    log = Path(tempfile.mkdtemp(prefix="emulator-")) / "emulator.log"
    cmd = [sys.executable, "-m", "mab_service.emulator", "--port", str(port), "--features", str(table), *(args or [])]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "listening on " in log.read_text(errors="replace"):
            return EmulatorProcess(proc, f"127.0.0.1:{port}", log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"emulator did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def emulator_process(table_csv: Path) -> Iterator[EmulatorProcess]:
    """The emulator serving ``table_csv``, shared by the session (reset its faults and counters before use)."""
    emulator = start_emulator(table_csv)
    yield emulator
    stop_process(emulator.proc)
