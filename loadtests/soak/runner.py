"""The soak itself: the open-loop load at a fixed rate, the fault schedule, /health probes, RSS samples and
snapshots of the server's counters at every phase boundary."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import resource
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import httptools
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import bench_service
from loadtests import answers
from loadtests.soak.client import Client, get_bytes, post_bytes
from loadtests.soak.faults import FaultInjector, Phase
from loadtests.soak.outcomes import DEGRADED, OK, TIMEOUT, UNSENT, WRONG, Records, classify, health_state
from loadtests.soak.processes import Emulator, cpu_seconds, rss_kb, worker_pids

#: One answer in this many is checked in full (loadtests/answers.py); every one is classified by status and body.
CHECK_EVERY = 16
METRIC_NAMES = (
    "mab_requests_total",
    "mab_degraded_fetches_total",
    "mab_unread_candidates_total",
    "mab_shed_requests_total",
    "mab_cache_lookups_total",
    "mab_cache_stale_served_total",
    "mab_feature_fetch_errors_total",
)


@dataclass
class Snapshot:
    """State at a phase boundary: server counters, CPU seconds, emulator counters."""

    t_s: float
    metrics: dict[str, float]
    server_cpu_s: float
    server_core_busy_s: float
    client_core_busy_s: float
    client_cpu_s: float
    emulator_cpu_s: float
    emulator: dict[str, Any] | None


def parse_metrics(text: str) -> dict[str, float]:
    """The counters of METRIC_NAMES as ``name{label="v",...}`` -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in METRIC_NAMES:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Soak:
    """Drives the load, the schedule, the probes and the samplers; keeps what they saw."""

    def __init__(
        self,
        args: argparse.Namespace,
        port: int,
        server: subprocess.Popen[bytes],
        emulator: Emulator,
        bodies: list[bytes],
        phases: list[Phase],
    ) -> None:
        self.args = args
        self.port = port
        self.server = server
        self.emulator = emulator
        self.requests = [post_bytes(port, "/predict", b) for b in bodies]
        self.expected = [answers.expect(b) for b in bodies]
        self.phases = phases
        self.records = Records()
        self.health: list[tuple[float, str]] = []
        self.health_examples: dict[str, str] = {}
        self.rss: list[tuple[float, int]] = []
        self.snapshots: list[Snapshot] = []
        self.phase_started: list[float] = []
        self.sent = 0
        self.stopped = ""
        self.client = Client(port, args.max_connections)
        self.workers = worker_pids(server.pid)
        self.t0 = 0.0
        self.end_s = 0.0
        self.pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="soak")
        self.injector = FaultInjector(emulator, self.pool)
        self._side_client: Client | None = None
        self.finished = False

    def now_s(self) -> float:
        # time.monotonic, not the loop's clock: uvloop's counts whole milliseconds, read once per iteration.
        return time.monotonic() - self.t0

    async def run(self) -> None:
        self.t0 = time.monotonic() + 0.05
        self.end_s = self.args.duration_s
        pending: set[asyncio.Task[None]] = set()
        side = [
            asyncio.ensure_future(self._schedule()),
            asyncio.ensure_future(self._probe_health()),
            asyncio.ensure_future(self._sample_rss()),
        ]
        try:
            await self._dispatch(pending)
            if pending:  # the last requests: each ends by its own timeout
                await asyncio.wait(pending, timeout=self.args.timeout_s + 2.0)
        finally:
            self.end_s = min(self.now_s(), self.args.duration_s)
            # Loops check the flag too: on Python 3.11, wait_for can swallow a cancel that lands as its awaitable
            # finishes (CPython gh-86296), and the probe would then run for ever.
            self.finished = True
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.client.close()
        await self.injector.restarted()  # a restart still under way ends before the last reading
        self.snapshots.append(await self._snapshot())
        self.pool.shutdown(wait=True)

    async def _dispatch(self, pending: set[asyncio.Task[None]]) -> None:
        rate, total = self.args.rate, int(self.args.duration_s * self.args.rate)
        i = 0
        while i < total and not self.stopped:
            due = min(total, int((time.monotonic() - self.t0) * rate) + 1)
            while i < due:
                task = asyncio.ensure_future(self._one(i))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            # At least a millisecond: uvloop's timers count whole milliseconds, and a shorter sleep would return at
            # once and spin. Requests due meanwhile go out together at the next wake-up (a few at 5,000/s).
            await asyncio.sleep(max(0.001, self.t0 + i / rate - time.monotonic()))
        self.sent = i

    async def _one(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        due = self.t0 + i / self.args.rate
        began = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        # The timeout runs from the send: waiting for a free connection (the client at its cap) is not the server's.
        timer = loop.call_later(self.args.timeout_s, expire)
        sent = False
        n = i % len(self.requests)
        example = ""
        try:
            conn = await self.client.acquire()
            timer.cancel()
            timer, sent = loop.call_later(self.args.timeout_s, expire), True
            status, body = await self.client.exchange(conn, self.requests[n])
        except asyncio.CancelledError:
            if not expired:
                raise
            kind = TIMEOUT if sent else UNSENT
        except (OSError, httptools.HttpParserError) as exc:
            kind, example = f"transport {type(exc).__name__}", str(exc)
        except Exception as exc:  # a bug of this client: counted and shown, so that it cannot pass unseen
            kind, example = f"client error {type(exc).__name__}", repr(exc)
        else:
            kind = classify(status, body)
            if kind == OK and i % CHECK_EVERY == 0:
                problem = answers.check_predict(self.expected[n], status, body)
                if problem is not None:
                    kind, example = WRONG, problem
            elif kind not in (OK, DEGRADED):
                example = body[:300].decode(errors="replace")
        finally:
            timer.cancel()
        end = time.monotonic()
        self.records.add(due - self.t0, (end - due) * 1e3, (began - due) * 1e3, kind, example)

    async def _schedule(self) -> None:
        for phase in self.phases:
            await asyncio.sleep(max(0.0, self.t0 + phase.start_s - time.monotonic()))
            self.snapshots.append(await self._snapshot())
            self.phase_started.append(self.now_s())
            await self.injector.apply(phase, self.t0)

    async def _snapshot(self) -> Snapshot:
        loop = asyncio.get_running_loop()
        metrics: dict[str, float] = {}
        with contextlib.suppress(OSError, httptools.HttpParserError, asyncio.TimeoutError, ValueError):
            status, body = await asyncio.wait_for(self._get("/metrics"), 5.0)
            if status == 200:
                metrics = parse_metrics(body.decode())
        emulator = await loop.run_in_executor(self.pool, self.emulator.stats)
        cores = bench_service.cpu_set(self.args.server_cpu)
        return Snapshot(
            t_s=self.now_s(),
            metrics=metrics,
            server_cpu_s=cpu_seconds(sorted({self.server.pid, *self.workers})),
            server_core_busy_s=bench_service.cores_busy_seconds(cores),
            client_core_busy_s=bench_service.cores_busy_seconds(bench_service.cpu_set(self.args.client_cpu)),
            client_cpu_s=_self_cpu_s(),
            emulator_cpu_s=self.emulator.cpu_s(),
            emulator=emulator,
        )

    async def _get(self, path: str) -> tuple[int, bytes]:
        if self._side_client is None:
            self._side_client = Client(self.port, 1)
        return await self._side_client.request(get_bytes(self.port, path))

    async def _probe_health(self) -> None:
        probe = Client(self.port, 1)
        n = 0
        try:
            while not self.finished:
                await asyncio.sleep(max(0.0, self.t0 + n * self.args.health_interval_s - time.monotonic()))
                n += 1
                t = self.now_s()
                try:
                    status, body = await asyncio.wait_for(probe.request(get_bytes(self.port, "/health")), 2.0)
                except (OSError, httptools.HttpParserError, asyncio.TimeoutError) as exc:
                    state, example = f"no answer ({type(exc).__name__})", str(exc)
                else:
                    state, example = health_state(status, body), body[:300].decode(errors="replace")
                self.health.append((t, state))
                self.health_examples.setdefault(state, example)
        finally:
            probe.close()

    async def _sample_rss(self) -> None:
        n = 0
        while not self.finished:
            await asyncio.sleep(max(0.0, self.t0 + n * self.args.rss_interval_s - time.monotonic()))
            n += 1
            if self.server.poll() is not None:
                self.stopped = f"the server exited with code {self.server.returncode}"
                return
            sizes = [rss_kb(pid) for pid in self.workers]
            if None in sizes:  # a worker was replaced: look again
                self.workers = worker_pids(self.server.pid)
                sizes = [rss_kb(pid) for pid in self.workers]
            self.rss.append((self.now_s(), sum(s for s in sizes if s is not None)))
