"""Events per second per core of the learner, applying a backlog from the Pub/Sub emulator to the Bigtable emulator.

Both emulators start on free loopback ports, in their own process groups, on the cores this process is not pinned to
(so that ``taskset -c 1`` gives the learner a core to itself, as far as the machine's other users allow).
``--events`` answered events of ``--top-k`` ids drawn from ``--arms`` arms (Zipf-like popularity, exponent 1.1), and
a reward for ``--reward-rate`` of the impressions, go through the sink in messages of ``--records`` records (split by
arm shard, ``--shards``, as a replica does once ``setup`` made shards), with one set
of subscriptions per window size of ``--window-events``. Then, one window size after the other, one learner in this
process (holding every shard's lease) drains its subscriptions into a table of its own, its windows cut at that many
events (``max_messages`` = window events x messages per event): what a window of ``window_s`` holds at a steady rate
of window events / ``window_s``. Printed per window size: the learner's CPU seconds (``time.process_time``: every
thread, gRPC's and the clients' own included, which tick with wall time, and the emulator makes wall time long), those
of its event loop's thread alone (``time.thread_time``: the work per event and per call), wall time, the emulators'
CPU, **events per learner CPU second**, the Bigtable **calls per window** (CheckAndMutateRow commits on shard rows,
MutateRows of arm rows, ReadRows filling the learner's cache) **against the distinct arms** the window touched,
**the largest number of cells in any arm row**, and the largest shard row in bytes.

    PYTHONPATH=$PWD taskset -c 1 python -m benchmarks.bench_learner [--events 50000] [--window-events 5000,25000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.bench_service import free_port, session_cpu_seconds
from mab_service.features.bigtable import data_client
from mab_service.fleet import setup as fleet_setup
from mab_service.fleet.learner import Learner, LearnerStats
from mab_service.fleet.schema import LEASE_ROW_PREFIX, TablePath
from mab_service.fleet.sink import PubSubSink

#: The learners' lease TTL here: the shards are spread over ``--learners`` within a few seconds.
LEASE_TTL_S = 1.5


def start(kind: str, variable: str) -> subprocess.Popen[bytes]:
    port = free_port()
    others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
    proc = subprocess.Popen(
        ["gcloud", "beta", "emulators", kind, "start", f"--host-port=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, others)) if others else None,
    )
    os.environ[variable] = f"127.0.0.1:{port}"
    return proc


async def publish(topic: str, args: argparse.Namespace) -> tuple[int, int]:
    rng = np.random.default_rng(11)
    weights = 1.0 / np.arange(1, args.arms + 1) ** 1.1
    weights /= weights.sum()
    sink = PubSubSink(topic, max_records=args.records, max_delay_s=60.0, max_pending=100_000)
    sink.start(args.shards)
    rewards = []
    prefix = uuid.uuid4().hex[:8]
    for n in range(args.events):
        ids = [f"arm-{i:07d}" for i in rng.choice(args.arms, args.top_k, replace=False, p=weights)]
        event_id = f"{prefix}{n:x}"
        sink.event(event_id, ids, 0.0)
        for id_ in ids:
            if rng.random() < args.reward_rate:
                rewards.append(asyncio.ensure_future(sink.reward(event_id, id_, 1.0, 0.0)))
        if n % 1000 == 999:
            await asyncio.sleep(0)  # let the sink's callbacks run
    sink.flush()
    await asyncio.gather(*rewards)
    await sink.close()
    return len(rewards), sink.published


def messages_per_window(window_events: int, args: argparse.Namespace) -> int:
    """Messages holding ``window_events`` events (from the messages the sink published for ``args.events``)."""
    messages: int = args.messages
    events: int = args.events
    return max(1, round(window_events * messages / events))


async def drain(
    subscription: str, table: str, window_events: int, args: argparse.Namespace
) -> tuple[LearnerStats, float, float, float, list[int]]:
    """``args.learners`` learners in this process drain the backlog, once the shards are spread over them; their
    stats summed, CPU seconds (process, event loop), wall seconds, and the distinct arms of each window written."""
    # Windows cut by size: a long window_s, so that each holds window_events (the backlog is there already).
    learners = [
        Learner(
            subscription,
            table,
            window_s=5.0,
            max_messages=messages_per_window(window_events, args),
            concurrency=args.concurrency,
            lease_ttl_s=LEASE_TTL_S,
        )
        for _ in range(args.learners)
    ]
    for learner in learners:
        await learner.start()
    share = -(-args.shards // args.learners)
    while any(len(learner.held) > share for learner in learners) or sum(len(x.held) for x in learners) < args.shards:
        await asyncio.sleep(0.1)  # the first took every shard; it gives back the others' share at its renewal
    distinct: list[int] = []  # arms per shard and window committed
    for learner in learners:
        commit = learner._commit

        async def counted(state: Any, plan: Any, commit: Any = commit) -> bool:
            distinct.append(len({*plan.shown, *plan.got}))
            return bool(await commit(state, plan))

        learner._commit = counted  # type: ignore[method-assign]
    cpu0, loop0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    idle = 0
    while idle < 2:  # two empty pulls: drained (a window given back is not one)
        failed = sum(learner.stats.failed_windows for learner in learners)
        handled = sum(await asyncio.gather(*(learner.step(wait_s=1.0) for learner in learners)))
        idle = idle + 1 if handled == 0 and sum(x.stats.failed_windows for x in learners) == failed else 0
    cpu, loop = time.process_time() - cpu0, time.thread_time() - loop0
    wall = time.perf_counter() - wall0 - 2.0  # minus the idle waits at the end
    total = LearnerStats()
    for learner in learners:
        await learner.close()
        for name in (
            "windows",
            "messages",
            "writes",
            "commits",
            "reads",
            "impressions",
            "rewards",
            "duplicates",
            "failed_windows",
        ):
            setattr(total, name, getattr(total, name) + getattr(learner.stats, name))
    return total, cpu, loop, wall, distinct


async def cells_per_row(path: TablePath) -> tuple[int, int, int]:
    """Arm rows, the most cells (all families, all versions) in any arm row, and the largest shard row's bytes
    (qualifiers and values)."""
    from google.cloud.bigtable.data import ReadRowsQuery

    client = data_client(path.project)
    try:
        table = client.get_table(path.instance, path.table)
        rows = await table.read_rows(ReadRowsQuery(), operation_timeout=600)
        arms = [row for row in rows if not row.row_key.startswith(b"\x00")]  # the fleet's own rows start with NUL
        shards = [row for row in rows if row.row_key.startswith(LEASE_ROW_PREFIX)]
        shard_bytes = max((sum(len(c.qualifier) + len(c.value) for c in row.cells) for row in shards), default=0)
        return len(arms), max((len(row.cells) for row in arms), default=0), shard_bytes
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_learner", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--arms", type=int, default=10_000)
    parser.add_argument("--reward-rate", type=float, default=0.05)
    parser.add_argument("--records", type=int, default=250, help="records per message (a replica's 20 ms)")
    parser.add_argument(
        "--window-events", default="5000,25000", help="events per window, comma-separated: one learner run each"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--shards", type=int, default=fleet_setup.DEFAULT_SHARDS, help="arm shards (setup's --shards)")
    parser.add_argument(
        "--learners", type=int, default=1, help="learners in this process, sharing the shards by their leases"
    )
    args = parser.parse_args(argv)
    windows = [int(w) for w in args.window_events.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the emulators below are stopped
    emulators = [start("bigtable", "BIGTABLE_EMULATOR_HOST"), start("pubsub", "PUBSUB_EMULATOR_HOST")]
    try:
        time.sleep(5)
        tag = uuid.uuid4().hex[:8]
        runs = [
            fleet_setup.FleetResources(
                topic=f"projects/bench/topics/events-{tag}",
                subscription=f"projects/bench/subscriptions/learners-{tag}-{w}",
                table=TablePath("bench", "bench", f"arms-{tag}-{w}"),
                shards=args.shards,
            )
            for w in windows
        ]
        for resources in runs:
            fleet_setup.setup(resources, say=lambda _: None)
        rewards, args.messages = asyncio.run(publish(runs[0].topic, args))
        print(
            f"{args.events} events of top_k {args.top_k} over {args.arms} arms (Zipf 1.1), {rewards} rewards, "
            f"{args.messages} messages of up to {args.records} records, {args.shards} shards; learner pinned to CPUs "
            f"{sorted(os.sched_getaffinity(0))}, {args.learners} learners in this process"
        )
        for window, resources in zip(windows, runs):
            emulator_cpu0 = sum(session_cpu_seconds(e.pid) for e in emulators)
            s, cpu, loop, wall, distinct = asyncio.run(
                drain(resources.subscription, str(resources.table), window, args)
            )
            emulator_cpu = sum(session_cpu_seconds(e.pid) for e in emulators) - emulator_cpu0
            arm_rows, most_cells, shard_bytes = asyncio.run(cells_per_row(resources.table))
            calls = s.commits + s.writes + s.reads
            print(
                f"window {window} events ({messages_per_window(window, args)} messages): {s.windows} windows, "
                f"{s.messages} messages; learner CPU {cpu:.2f} s "
                f"({cpu / args.events * 1e6:.1f} us per event, {args.events / cpu:,.0f} events/s per core), "
                f"event loop's thread {loop:.2f} s ({loop / args.events * 1e6:.1f} us per event, "
                f"{args.events / loop:,.0f} events/s), wall {wall:.2f} s; "
                f"{s.commits} CheckAndMutateRow (shard commits), {s.writes} MutateRows, {s.reads} ReadRows "
                f"({calls / args.events:.4f} calls per event); emulators' CPU {emulator_cpu:.2f} s; {arm_rows} arm "
                f"rows; largest shard row {shard_bytes:,} bytes; impressions {s.impressions}, rewards {s.rewards}, "
                f"duplicates {s.duplicates}"
            )
            print(
                f"  SUMMARY window {window}: {args.events / cpu:,.0f} events/s per core (process), "
                f"{args.events / loop:,.0f} (event loop); calls per window {calls / max(s.windows, 1):,.1f} "
                f"({s.commits / max(len(distinct), 1):.2f} commits + {s.writes / max(len(distinct), 1):.2f} MutateRows "
                f"per shard and window) vs distinct arms per window {sum(distinct) / max(s.windows, 1):,.0f} "
                f"({sum(distinct) / max(len(distinct), 1):,.0f} per shard); "
                "largest arm row "
                f"{most_cells} cells"
            )
    finally:
        for e in emulators:
            os.killpg(e.pid, signal.SIGKILL)
            e.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
