"""The processes the soak starts and watches: the emulator (started, killed, started again), the server's argv,
process groups stopped on the way out, and readings from /proc (workers, CPU seconds, RSS)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_service import REPO_ROOT, stop_group, tail
from loadtests.soak import SoakError
from loadtests.soak.faults import base_faults

ENTITY_TYPE = "projects/soak/locations/local/featurestores/soak/entityTypes/content"
EMULATOR_START_S = 60.0


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses), from field 3
    on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def session_pids(sid: int) -> dict[int, int]:
    """pid -> parent pid of every live process in session ``sid``."""
    pids: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and int(fields[3]) == sid:
            pids[int(entry)] = int(fields[1])
    return pids


def worker_pids(server_pid: int) -> list[int]:
    """The service's worker processes: the server itself with one worker, else its children."""
    pids = session_pids(server_pid)
    children = sorted(pid for pid, parent in pids.items() if parent == server_pid)
    return children or [server_pid]


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system, reaped children included) of the given processes; one file each, so cheap
    enough to call from the event loop, unlike a scan of /proc."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Emulator:
    """The emulator process: started, killed and started again on the same port; faults set through Control.

    Thread-safe: the soak kills and restarts it from worker threads while the event loop keeps sending load.
    """

    def __init__(self, table: Path, port: int, cpu: str, args: argparse.Namespace, log_dir: Path) -> None:
        self.table = table
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.cpu = cpu
        self.args = args
        self.log_dir = log_dir
        self.lock = threading.Lock()  # the state below; held briefly, also from the event loop
        self.control = threading.Lock()  # fault changes, kills and restarts, one at a time
        self.procs: list[subprocess.Popen[bytes]] = []
        self.up = False
        self.closing = False
        self.wanted = base_faults(args)
        self.incarnation = 0
        self.cpu_s_done = 0.0
        self.stats_done: list[dict[str, Any]] = []
        self.downtimes: list[tuple[float, float]] = []
        """(seconds down, seconds from the restart command to listening) of each kill."""
        self._killed_at = 0.0

    def argv(self) -> list[str]:
        return [
            "taskset", "-c", self.cpu, sys.executable, "-m", "mab_service.emulator", "--port", str(self.port),
            "--features", str(self.table), "--latency-ms", str(self.args.latency_ms), "--jitter-ms",
            str(self.args.jitter_ms),
        ]  # fmt: skip

    def start(self) -> None:
        """Start an incarnation and wait until it listens, then apply the wanted faults.

        Raises:
            SoakError: If it exits or does not listen within EMULATOR_START_S.
        """
        with self.lock:
            if self.closing:
                return
            self.incarnation += 1
            log_path = self.log_dir / f"emulator-{self.incarnation}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    self.argv(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            self.procs.append(proc)
        deadline = time.monotonic() + EMULATOR_START_S
        while "listening on " not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline or self.closing:
                raise SoakError(f"the emulator did not start:\n{tail(log_path)}")
            time.sleep(0.02)
        with self.control:
            with self.lock:
                self.up = True
            self._configure(self.wanted)

    def set_faults(self, faults: dict[str, float]) -> None:
        """Apply ``faults`` now if the emulator is up, and to the next incarnation anyway."""
        with self.control:
            self.wanted = faults
            if self.up:
                self._configure(faults)

    def _configure(self, faults: dict[str, float]) -> None:
        from mab_service.emulator import EmulatorControl

        with EmulatorControl(self.target) as control:
            control.configure(**faults)

    def stats(self) -> dict[str, Any] | None:
        """The current incarnation's counters, tagged with its number; None while it is down."""
        from mab_service.emulator import EmulatorControl

        with self.lock:
            if not self.up:
                return None
            incarnation = self.incarnation
        try:
            with EmulatorControl(self.target, timeout_s=2.0) as control:
                return control.stats() | {"incarnation": incarnation}
        except Exception:  # grpc.RpcError: died or slow; the counters are best effort
            return None

    def cpu_s(self) -> float:
        """CPU seconds of every incarnation so far (a killed one counts up to its last reading)."""
        with self.lock:
            live = self.procs[-1].pid if self.up and self.procs else None
        return self.cpu_s_done + (cpu_seconds([live]) if live else 0.0)

    def kill(self) -> None:
        """SIGKILL the running incarnation (and its group), as a crash would."""
        last = self.stats()
        with self.control:
            with self.lock:
                self.up = False
                proc = self.procs[-1]
                self.cpu_s_done += cpu_seconds([proc.pid])
            if last is not None:
                self.stats_done.append(last)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self._killed_at = time.monotonic()

    def restart(self) -> None:
        began = time.monotonic()
        self.start()
        now = time.monotonic()
        self.downtimes.append((now - self._killed_at, now - began))

    def final_stats(self) -> list[dict[str, Any]]:
        """The last counters of every incarnation (counters start from zero in each)."""
        last = self.stats()
        return self.stats_done + ([last] if last is not None else [])

    def stop_all(self) -> None:
        with self.lock:
            self.closing = True
            self.up = False
            procs = list(self.procs)
        for proc in procs:
            stop_group(proc)


def server_argv(port: int, emulator: str, extra: Sequence[str]) -> list[str]:
    """One worker on the Vertex source through the emulator, every other setting at its default."""
    return [
        sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--features", f"vertex:{ENTITY_TYPE}", "--vertex-emulator-host", emulator, *extra,
    ]  # fmt: skip
