"""The fleet's scale run (``bench_scale``), as a function the benchmark and the test share.

``run`` starts the fleet as real processes on the emulators the environment points at (``mab-service setup``,
replicas, learners), sends the load with its faults, keeps the truth of what was accepted, waits for the fleet to
converge and measures it; it returns the figures as JSON-serialisable data. ``benchmarks/bench_scale.py`` says what
each figure is; ``tests/fleet/test_scale.py`` asserts on a small run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import bench_fleet, bench_service
from benchmarks.bench_service import free_port, session_cpu_seconds, stop_group
from mab_service.ids import pair_key
from mab_service.routes import MAX_TOP_ARMS

PROJECT = "scale"
#: How often the convergence check reads again the arms that still differ from the truth.
CONVERGE_INTERVAL_S = 1.0
#: How often a freshness probe reads the replicas' ``/arms/{id}``: every ``PROBE_POLL_S`` for ``PROBE_FAST_S``, then
#: every ``PROBE_SLOW_POLL_S`` (a reward held by a killed learner waits for the subscription's ack deadline), up to
#: ``PROBE_TIMEOUT_S`` (then the probe is counted lost).
PROBE_POLL_S = 0.02
PROBE_FAST_S = 3.0
PROBE_SLOW_POLL_S = 0.25
PROBE_TIMEOUT_S = 90.0
#: GET /arms/{id} at once per replica while checking counts.
CHECK_CONCURRENCY = 16


@dataclass(frozen=True)
class ScaleConfig:
    """One scale run: the fleet's size, the load's bounds and shape, the cores each part runs on."""

    replicas: int = 6
    learners: int = 3
    answers: int = 20_000
    """At most this many /predict requests."""
    duration_s: float = 30.0
    """At most this long a load."""
    rate: float = 80.0
    """/predict requests per second, sent on a fixed schedule (fewer if the fleet answers slower)."""
    arms: int = 10_000
    candidates: int = 40
    top_k: int = 10
    reward_fraction: float = 0.3
    duplicate_fraction: float = 0.5
    segments: int = 4
    """Segments the answers rank within (``seg-0`` ...); 0: none."""
    segment_fraction: float = 0.5
    """Of the answers, those sent with a segment (chosen at random among ``segments``)."""
    probe_every_s: float = 1.0
    concurrency: int = 48
    """Requests in flight at most."""
    converge_timeout_s: float = 120.0
    replica_cpus: str = "0,1"
    learner_cpus: str = "0,1"
    setup_args: tuple[str, ...] = ()
    """Extra flags for ``mab-service setup``."""
    learner_args: tuple[str, ...] = ()
    """Extra flags for ``mab-service learn``."""
    seed: int = 7


@dataclass
class Truth:
    """What the counts must be: every impression answered 200 and every reward answered 202, once."""

    impressions: Counter[str] = field(default_factory=Counter)
    rewards: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    answers: int = 0
    within: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Impressions per (segment, arm) of the answers ranked within a segment."""
    within_rewards: defaultdict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    def want(self, arm: str) -> tuple[int, float]:
        return self.impressions[arm], round(self.rewards[arm], 6)

    def want_within(self, pair: tuple[str, str]) -> tuple[int, float]:
        return self.within[pair], round(self.within_rewards[pair], 6)


@dataclass(eq=False)
class Replica:
    name: str
    port: int
    state_dir: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    up: bool = False
    in_flight: int = 0
    rows_read: float = 0.0
    """Counts rows read by earlier incarnations of this replica during the load."""
    rows_mark: float = 0.0
    """Counts rows the running incarnation had read when the load began (or at its start)."""
    starts: int = 0
    exit_code: int | None = None
    stop_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Learner:
    name: str
    metrics_port: int
    proc: subprocess.Popen[bytes]
    cpu_mark: float = 0.0
    wall_mark: float = 0.0
    applied: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    killed: bool = False

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


def replica_reads(url: str) -> float:
    """Counts rows a replica read from Bigtable: its follower's scans, and its cache's misses and refreshes."""
    return bench_fleet.follower_rows(url) + bench_fleet.cache_rows(url)


def learner_applied(url: str) -> int:
    """Impressions and rewards a learner applied, from its /metrics."""
    return int(
        bench_fleet.metric(url, "mab_learner_impressions_total", "")
        + bench_fleet.metric(url, "mab_learner_rewards_total", "")
    )


class Fleet:
    """The fleet's processes: replicas started, stopped and started again; learners started and killed."""

    def __init__(self, config: ScaleConfig, work: Path, stack: contextlib.ExitStack) -> None:
        tag = uuid.uuid4().hex[:8]
        self.config = config
        self.work = work
        self.stack = stack
        self.topic = f"projects/{PROJECT}/topics/events-{tag}"
        self.subscription = f"projects/{PROJECT}/subscriptions/learners-{tag}"
        self.table = f"projects/{PROJECT}/instances/mab/tables/arms-{tag}"
        self.replicas = [
            Replica(
                f"replica-{i}", free_port(), tempfile.mkdtemp(prefix=f"state-{i}-", dir=work), work / f"replica-{i}.log"
            )
            for i in range(config.replicas)
        ]
        self.learners: list[Learner] = []

    def setup(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "mab_service", "setup", "--events", f"pubsub:{self.topic}"]
            + ["--subscription", self.subscription, "--posteriors", f"bigtable:{self.table}"]
            + list(self.config.setup_args),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mab-service setup failed: {done.stderr}")

    def start_replica(self, replica: Replica) -> None:
        argv = [
            sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(replica.port),
            "--features", f"bigtable:{self.table}", "--events", f"pubsub:{self.topic}",
            "--state-dir", replica.state_dir,
        ]  # fmt: skip
        replica.starts += 1
        log = replica.log.with_name(f"{replica.name}-{replica.starts}.log")
        # The context stops the group at the end of the run (its SIGTERM is a no-op for one already stopped here).
        replica.proc = self.stack.enter_context(
            bench_service.running_server(argv, replica.port, self.config.replica_cpus, log)
        )
        replica.rows_mark = replica_reads(replica.url)
        replica.up = True

    async def restart_replica(self, replica: Replica) -> None:
        """A rolling restart: out of the rotation, its requests finished, SIGTERM, waited for, started again."""
        assert replica.proc is not None
        replica.up = False
        while replica.in_flight:
            await asyncio.sleep(0.01)
        replica.rows_read += replica_reads(replica.url) - replica.rows_mark
        stopping = time.monotonic()
        os.killpg(replica.proc.pid, signal.SIGTERM)
        replica.exit_code = await asyncio.to_thread(replica.proc.wait, 60)
        replica.stop_s = time.monotonic() - stopping
        await asyncio.to_thread(self.start_replica, replica)
        replica.rows_mark = 0.0  # its start scan is part of what the restart cost

    def start_learner(self, i: int) -> None:
        port = free_port()
        log = self.stack.enter_context((self.work / f"learner-{i}.log").open("wb"))
        proc = subprocess.Popen(
            ["taskset", "-c", self.config.learner_cpus, sys.executable, "-m", "mab_service", "learn",
             "--events", f"pubsub:{self.subscription}", "--posteriors", f"bigtable:{self.table}",
             "--metrics-port", str(port), "--metrics-host", "127.0.0.1", *self.config.learner_args],
            cwd=bench_service.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.stack.callback(stop_group, proc)
        learner = Learner(f"learner-{i}", port, proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                learner_applied(learner.metrics_url)
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{learner.name} did not start: {bench_service.tail(Path(log.name))}") from None
                time.sleep(0.1)
        self.learners.append(learner)

    def begin(self) -> None:
        """The marks the figures are measured from: learners' CPU and replicas' reads when the load begins."""
        for learner in self.learners:
            learner.cpu_mark, learner.wall_mark = session_cpu_seconds(learner.proc.pid), time.monotonic()
        for replica in self.replicas:
            replica.rows_mark = replica_reads(replica.url)

    def sample_learner(self, learner: Learner) -> None:
        learner.applied = learner_applied(learner.metrics_url)
        learner.cpu_s = session_cpu_seconds(learner.proc.pid) - learner.cpu_mark
        learner.wall_s = time.monotonic() - learner.wall_mark

    def kill_learner(self, learner: Learner) -> None:
        self.sample_learner(learner)  # what it did until now: its counters die with it
        os.killpg(learner.proc.pid, signal.SIGKILL)
        learner.proc.wait()
        learner.killed = True

    def reads(self, seconds: float) -> dict[str, Any]:
        """Counts rows each replica read from Bigtable since the load began (over its incarnations), per second of
        ``seconds``."""
        rows = {r.name: r.rows_read + replica_reads(r.url) - r.rows_mark for r in self.replicas}
        return {name: {"rows": n, "rows_per_s": n / seconds} for name, n in rows.items()}

    def spread(self) -> None:
        """Every core to the replicas and to this process, every thread of them: the check of every arm on every
        replica that follows the load is not measured, and on a few cores it would take minutes."""
        cpus = set(range(os.cpu_count() or 1))
        os.sched_setaffinity(0, cpus)
        for replica in self.replicas:
            assert replica.proc is not None
            for tid in os.listdir(f"/proc/{replica.proc.pid}/task"):
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    os.sched_setaffinity(int(tid), cpus)

    def terminate(self) -> None:
        """SIGTERM to every process of the fleet still running."""
        procs = [r.proc for r in self.replicas] + [learner.proc for learner in self.learners]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)

    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.up]


@dataclass
class Load:
    """The answers, rewards, duplicates and probes sent, and what came back."""

    fleet: Fleet
    truth: Truth
    client: httpx.AsyncClient
    rand: random.Random
    candidates: list[list[str]]
    statuses: Counter[str] = field(default_factory=Counter)
    """``route status`` -> count, for every request the load sent."""
    duplicates_wrong: list[str] = field(default_factory=list)
    """Answers to a reward posted again that were not ``200 duplicate``."""
    lags: list[float] = field(default_factory=list)
    probes_lost: int = 0
    watching: set[asyncio.Task[None]] = field(default_factory=set)
    """Probes whose reward is not yet seen everywhere: they outlive the load (one held by the killed learner waits
    for the subscription's ack deadline)."""

    async def post(self, replica: Replica, route: str, body: dict[str, Any]) -> httpx.Response:
        replica.in_flight += 1
        try:
            answer = await self.client.post(replica.url + route, json=body)
        finally:
            replica.in_flight -= 1
        self.statuses[f"{route} {answer.status_code}"] += 1
        return answer

    async def decide(self, i: int) -> None:
        up = self.fleet.up()
        answering = up[i % len(up)]
        config = self.fleet.config
        request: dict[str, Any] = {"user_id": f"u{i}", "candidates": self.candidates[i], "top_k": config.top_k}
        segment = None
        if config.segments and self.rand.random() < config.segment_fraction:
            segment = request["segment"] = f"seg-{self.rand.randrange(config.segments)}"
        answer = await self.post(answering, "/predict", request)
        if answer.status_code != 200:
            return
        body = answer.json()
        self.truth.impressions.update(body["ids"])
        if segment is not None:
            self.truth.within.update((segment, id_) for id_ in body["ids"])
        self.truth.answers += 1
        if self.rand.random() >= self.fleet.config.reward_fraction:
            return
        id_ = self.rand.choice(body["ids"])
        payload = {"event_id": body["event_id"], "id": id_, "reward": self.rand.choice([0.0, 0.25, 1.0])}
        others = [r for r in self.fleet.up() if r is not answering]
        first = self.rand.choice(others)
        if (await self.post(first, "/reward", payload)).status_code != 202:
            return
        self.truth.rewards[id_] += payload["reward"]
        if segment is not None:
            self.truth.within_rewards[segment, id_] += payload["reward"]
        if self.rand.random() < self.fleet.config.duplicate_fraction:
            third = self.rand.choice([r for r in self.fleet.up() if r is not answering and r is not first])
            again = await self.post(third, "/reward", payload)
            if (again.status_code, again.json()) != (200, {"status": "duplicate"}):
                self.duplicates_wrong.append(f"{again.status_code} {again.text}")

    async def probe(self, n: int) -> None:
        """One answer for a new arm from a replica and its reward posted to another; then ``watch``."""
        arm = f"probe-{uuid.uuid4().hex[:12]}"
        a, b = self.rand.sample(self.fleet.up(), 2)
        answer = await self.post(a, "/predict", {"user_id": f"p{n}", "candidates": [arm], "top_k": 1})
        if answer.status_code != 200:
            return
        self.truth.impressions[arm] += 1
        self.truth.answers += 1
        reward = await self.post(b, "/reward", {"event_id": answer.json()["event_id"], "id": arm, "reward": 1})
        if reward.status_code != 202:
            return
        self.truth.rewards[arm] += 1.0
        watch = asyncio.create_task(self.watch(arm, time.monotonic()))
        self.watching.add(watch)
        watch.add_done_callback(self.watching.discard)

    async def watch(self, arm: str, accepted: float) -> None:
        """The lag from a probe's 202 until every running replica's /arms show its reward."""
        waiting = set(self.fleet.up())
        while waiting:
            waited = time.monotonic() - accepted
            if waited > PROBE_TIMEOUT_S:
                self.probes_lost += 1
                return
            await asyncio.sleep(PROBE_POLL_S if waited < PROBE_FAST_S else PROBE_SLOW_POLL_S)
            for replica in list(waiting):
                if not replica.up:  # being restarted: not what this probe measures
                    waiting.discard(replica)
                    continue
                got = await self.client.get(f"{replica.url}/arms/{arm}")
                if got.status_code == 200 and got.json()["rewards"] >= 1.0:
                    waiting.discard(replica)
        self.lags.append(time.monotonic() - accepted)

    async def run(self) -> dict[str, Any]:
        """The load on its schedule, the faults at their times, the probes; until the count or the time is out and
        every answer and reward sent has been answered (the probes' watches go on: ``watched``)."""
        config = self.fleet.config
        limit = asyncio.Semaphore(config.concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def bounded(i: int) -> None:
            try:
                await self.decide(i)
            finally:
                limit.release()

        async def probes() -> None:
            n = 0
            while True:
                await asyncio.sleep(config.probe_every_s)
                n += 1
                task = asyncio.create_task(self.probe(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        faults: dict[str, float] = {}

        async def fault_at(fraction: float, name: str, action: Any) -> None:
            while sent < config.answers * fraction and time.monotonic() - started < config.duration_s * fraction:
                await asyncio.sleep(0.05)
            faults[name] = time.monotonic() - started
            await action()

        async def kill() -> None:
            await asyncio.to_thread(self.fleet.kill_learner, self.fleet.learners[0])

        async def restart() -> None:
            await self.fleet.restart_replica(self.fleet.replicas[0])
            faults["replica_back"] = time.monotonic() - started

        sent = 0
        started = time.monotonic()
        background = [
            asyncio.create_task(probes()),
            asyncio.create_task(fault_at(1 / 3, "learner_killed", kill)),
            asyncio.create_task(fault_at(1 / 2, "replica_stopped", restart)),
        ]
        while sent < config.answers and time.monotonic() - started < config.duration_s:
            await asyncio.sleep(max(0.0, started + sent / config.rate - time.monotonic()))
            await limit.acquire()
            task = asyncio.create_task(bounded(sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        load_s = time.monotonic() - started
        background[0].cancel()
        await asyncio.gather(*background[1:])  # the faults happen even when the fleet answers slower than the rate
        while tasks:
            await asyncio.gather(*list(tasks))
        return {"sent": sent, "load_s": load_s, "faults_s": faults}

    async def watched(self) -> None:
        """Once every probe has been seen everywhere (or lost)."""
        while self.watching:
            await asyncio.gather(*list(self.watching))


async def differing(client: httpx.AsyncClient, url: str, truth: Truth, arms: list[str]) -> list[str]:
    """The arms among ``arms`` whose ``/arms/{id}`` on ``url`` are not the truth."""
    limit = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def one(arm: str) -> bool:
        async with limit:
            got = await client.get(f"{url}/arms/{arm}")
        if got.status_code == 404:
            return truth.want(arm) != (0, 0.0)
        got.raise_for_status()
        body = got.json()
        return (body["impressions"], round(body["rewards"], 6)) != truth.want(arm)

    wrong = await asyncio.gather(*(one(arm) for arm in arms))
    return [arm for arm, bad in zip(arms, wrong) if bad]


async def differing_within(
    client: httpx.AsyncClient, url: str, truth: Truth, pairs: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The (segment, arm) pairs among ``pairs`` whose counts on ``url`` are not the truth: each segment's arms read
    in one ``/arms?top=&segment=`` (Bigtable's segment rows, as ``/arms/{id}?segment=`` reads them), and a pair that
    answer does not list read by its own ``/arms/{id}?segment=``."""
    by_segment: dict[str, list[str]] = {}
    for segment, arm in pairs:
        by_segment.setdefault(segment, []).append(arm)
    wrong: list[tuple[str, str]] = []
    unlisted: list[tuple[str, str]] = []
    for segment, arms in by_segment.items():
        got = await client.get(f"{url}/arms", params={"top": str(MAX_TOP_ARMS), "segment": segment})
        got.raise_for_status()
        listed = {a["id"]: (a["impressions"], round(a["rewards"], 6)) for a in got.json()["arms"]}
        for arm in arms:
            if arm not in listed:
                unlisted.append((segment, arm))
            elif listed[arm] != truth.want_within((segment, arm)):
                wrong.append((segment, arm))
    return wrong + await differing_each_within(client, url, truth, unlisted)


async def differing_each_within(
    client: httpx.AsyncClient, url: str, truth: Truth, pairs: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The (segment, arm) pairs among ``pairs`` whose ``/arms/{id}?segment=`` on ``url`` are not the truth."""
    limit = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def one(pair: tuple[str, str]) -> bool:
        async with limit:
            got = await client.get(f"{url}/arms/{pair[1]}", params={"segment": pair[0]})
        got.raise_for_status()
        body = got.json()
        return (body["impressions"], round(body["rewards"], 6)) != truth.want_within(pair)

    wrong = await asyncio.gather(*(one(pair) for pair in pairs))
    return [pair for pair, bad in zip(pairs, wrong) if bad]


def node_differing_within(replica: Replica, truth: Truth) -> list[tuple[str, str]]:
    """The (segment, arm) pairs whose segment rows in the replica's node table are not the truth."""
    assert replica.proc is not None
    table = bench_fleet.node_arms(replica.proc.pid)
    wrong = []
    for pair in truth.within:
        found = table.get(pair_key(*pair))
        if ((0, 0.0) if found is None else (found[2], round(found[3], 6))) != truth.want_within(pair):
            wrong.append(pair)
    return wrong


def node_counts(replica: Replica, arms: list[str]) -> dict[str, tuple[int, float]]:
    """The counts of ``arms`` in the replica's node table (what its answers rank by)."""
    assert replica.proc is not None
    table = bench_fleet.node_arms(replica.proc.pid)
    got = {}
    for arm in arms:
        found = table.get(arm)
        got[arm] = (0, 0.0) if found is None else (found[2], round(found[3], 6))
    return got


def node_differing(replica: Replica, truth: Truth, arms: list[str]) -> list[str]:
    """The arms among ``arms`` whose counts in the replica's node table are not the truth."""
    return [arm for arm, got in node_counts(replica, arms).items() if got != truth.want(arm)]


async def converge(client: httpx.AsyncClient, fleet: Fleet, truth: Truth) -> dict[str, Any]:
    """Per replica, once the load is over: seconds until its node table holds the truth for every arm, then seconds
    until its ``/arms/{id}`` give the truth for every arm (an arm read right is not read again; the node table is
    read whole again at the end, so a count that went past the truth later is found). The arms that still differ are
    the figures (0 when exact). The learners' figures are taken when the node tables are exact: their work is done."""
    arms = sorted(truth.impressions)
    started = time.monotonic()
    deadline = started + fleet.config.converge_timeout_s
    result: dict[str, dict[str, Any]] = {r.name: {"node_s": None, "arms_s": None} for r in fleet.replicas}
    pending = {r.name: arms for r in fleet.replicas}
    while any(pending.values()) and time.monotonic() < deadline:
        for replica in fleet.replicas:
            if pending[replica.name]:
                pending[replica.name] = node_differing(replica, truth, pending[replica.name])
                if not pending[replica.name]:
                    result[replica.name]["node_s"] = time.monotonic() - started
        await asyncio.sleep(CONVERGE_INTERVAL_S / 4)
    for learner in fleet.learners:  # their work is done: the CPU it took
        if not learner.killed:
            await asyncio.to_thread(fleet.sample_learner, learner)
    fleet.spread()

    async def served(replica: Replica) -> list[str]:
        wrong = arms
        while True:
            wrong = await differing(client, replica.url, truth, wrong)
            if not wrong:
                result[replica.name]["arms_s"] = time.monotonic() - started
            if not wrong or time.monotonic() > deadline:
                return wrong
            await asyncio.sleep(CONVERGE_INTERVAL_S)

    for replica, wrong in zip(fleet.replicas, await asyncio.gather(*(served(r) for r in fleet.replicas))):
        node = node_differing(replica, truth, arms)
        shown = node_counts(replica, node[:5])
        # Within segments: checked once the arms are exact (the same windows wrote both).
        within = await differing_within(client, replica.url, truth, sorted(truth.within))
        node_within = node_differing_within(replica, truth)
        result[replica.name].update(
            arms_differing=len(wrong),
            node_differing=len(node),
            segment_arms_differing=len(within),
            segment_node_differing=len(node_within),
            examples={
                "arms": wrong[:5],
                "node": {arm: {"got": shown[arm], "want": truth.want(arm)} for arm in shown},
                "segments": [list(pair) for pair in (within + node_within)[:5]],
            },
        )
    return result


def row_cells(table: str) -> dict[str, Any]:
    """Cells per row in the table, read with the data client: the largest arm row, and the fleet's own rows."""
    from google.cloud.bigtable.data import ReadRowsQuery

    from mab_service.features.bigtable import data_client
    from mab_service.fleet.schema import LEARNER_ROW_PREFIX, LEASE_ROW_PREFIX, SEGMENT_ROW_PREFIX, TablePath

    path = TablePath.parse(table)

    async def read() -> dict[str, Any]:
        client = data_client(path.project)
        try:
            rows = await client.get_table(path.instance, path.table).read_rows(ReadRowsQuery(), operation_timeout=300)
        finally:
            await client.close()
        arm_cells = {row.row_key: len(row.cells) for row in rows if not row.row_key.startswith(b"\x00")}
        segment_cells = [len(row.cells) for row in rows if row.row_key.startswith(SEGMENT_ROW_PREFIX.encode())]
        fleet = [row for row in rows if row.row_key.startswith((LEASE_ROW_PREFIX, LEARNER_ROW_PREFIX))]
        largest = max(arm_cells, key=arm_cells.__getitem__)
        return {
            "arm_rows": len(arm_cells),
            "arm_cells": sum(arm_cells.values()),
            "max_arm_row_cells": arm_cells[largest],
            "max_arm_row": largest.decode(),
            "segment_rows": len(segment_cells),
            "max_segment_row_cells": max(segment_cells, default=0),
            "fleet_rows": len(fleet),
            "fleet_row_cells": sum(len(row.cells) for row in fleet),
            "max_fleet_row_bytes": max(
                (sum(len(c.qualifier) + len(c.value) for c in row.cells) for row in fleet), default=0
            ),
            "other_rows": len(rows) - len(arm_cells) - len(segment_cells) - len(fleet),
        }

    return asyncio.run(read())


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[round(0.95 * (len(ordered) - 1))],
        "max_s": ordered[-1],
    }


def zipf_candidates(config: ScaleConfig) -> list[list[str]]:
    """Each answer's candidates: ``candidates`` distinct arms of ``arm-NNNNNNN``, popularity Zipf 1.1 by rank."""
    rng = np.random.default_rng(config.seed)
    weights = 1.0 / np.arange(1, config.arms + 1) ** 1.1
    weights /= weights.sum()
    return [
        [f"arm-{i:07d}" for i in rng.choice(config.arms, config.candidates, replace=False, p=weights)]
        for _ in range(config.answers)
    ]


def run(config: ScaleConfig, work: Path) -> dict[str, Any]:
    """One scale run on the emulators ``BIGTABLE_EMULATOR_HOST`` and ``PUBSUB_EMULATOR_HOST`` point at.

    Returns:
        The figures (``bench_scale.print_report``'s input), JSON-serialisable.

    Raises:
        ValueError: With fewer than 4 replicas (one restarting, a reward needs two others than the one that answered)
            or 2 learners (one is killed).
    """
    if config.replicas < 4 or config.learners < 2:
        raise ValueError(
            f"a scale run needs 4 replicas and 2 learners at least (got {config.replicas}, {config.learners})"
        )
    candidates = zipf_candidates(config)
    truth = Truth()
    begun = time.monotonic()
    with contextlib.ExitStack() as stack:
        fleet = Fleet(config, work, stack)
        fleet.setup()
        with concurrent.futures.ThreadPoolExecutor(config.replicas + config.learners) as pool:
            starting = [pool.submit(fleet.start_replica, replica) for replica in fleet.replicas]
            starting += [pool.submit(fleet.start_learner, i) for i in range(config.learners)]
            for done in starting:
                done.result()
        fleet.learners.sort(key=lambda learner: learner.name)
        stack.callback(fleet.terminate)  # the first to run at the end: all stop at once, then each is waited for

        started = time.monotonic()

        async def drive() -> tuple[dict[str, Any], Load, dict[str, Any], dict[str, Any]]:
            limits = httpx.Limits(max_connections=config.concurrency * 2, max_keepalive_connections=config.concurrency)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                load = Load(fleet, truth, client, random.Random(config.seed), candidates)
                fleet.begin()
                shape = await load.run()
                shape["start_s"] = started - begun
                reads = fleet.reads(shape["load_s"])
                loaded = time.monotonic()
                exact = await converge(client, fleet, truth)
                await load.watched()
                shape["check_s"] = time.monotonic() - loaded
                return shape, load, exact, reads

        shape, load, exact, reads = asyncio.run(drive())
        restarted = fleet.replicas[0]
        cells = row_cells(fleet.table)
        cells["max_arm_row_impressions"] = truth.impressions[cells["max_arm_row"]]
    applied = sum(learner.applied for learner in fleet.learners)
    cpu_s = sum(learner.cpu_s for learner in fleet.learners)
    return {
        "config": asdict(config),
        "environment": bench_service.environment(),
        "load": {
            **shape,
            "answers": truth.answers,
            "answers_per_s": truth.answers / shape["load_s"],
            "rewards_accepted": load.statuses["/reward 202"],
            "statuses": dict(load.statuses),
            "server_errors": sum(n for key, n in load.statuses.items() if key.split()[1].startswith("5")),
            "duplicates_wrong": load.duplicates_wrong,
            "arms_answered": len(truth.impressions),
            "segment_pairs_answered": len(truth.within),
        },
        "restart": {"replica": restarted.name, "exit_code": restarted.exit_code, "stop_s": restarted.stop_s},
        "exact": exact,
        "rows": cells,
        "learners": {
            **{
                learner.name: {
                    "killed": learner.killed,
                    "applied": learner.applied,
                    "cpu_s": learner.cpu_s,
                    "wall_s": learner.wall_s,
                    "applied_per_cpu_s": learner.applied / learner.cpu_s if learner.cpu_s else 0.0,
                }
                for learner in fleet.learners
            },
            "all": {
                "applied": applied,
                "cpu_s": cpu_s,
                "applied_per_cpu_s": applied / cpu_s if cpu_s else 0.0,
                "events_per_cpu_s": truth.answers / cpu_s if cpu_s else 0.0,
            },
        },
        "reads": reads,
        "freshness": {**quantiles(load.lags), "lost": load.probes_lost},
    }
