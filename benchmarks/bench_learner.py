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
CPU, **events per learner CPU second**, CheckAndMutateRow **calls per window against the distinct arms** the window
touched, the markers left in the table, and **the largest number of cells in any arm row**.

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
from mab_service.fleet.requests import (
    CHECK_AND_MUTATE_ROW,
    check_and_mutate,
    quote,
    set_marker,
    table_field,
    timestamp_field,
)
from mab_service.fleet.schema import MARKERS_FAMILY, TablePath
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
    distinct: list[int] = []  # arms per window (its first attempt)
    for learner in learners:
        apply = learner._apply
        failed_before = learner.stats.failed_windows

        async def counted(
            rows: Any, learner: Learner = learner, apply: Any = apply, failed: int = failed_before
        ) -> None:
            if learner.stats.failed_windows == failed:
                distinct.append(len(rows))
            await apply(rows)

        learner._apply = counted  # type: ignore[method-assign]
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
        for name in ("windows", "messages", "writes", "impressions", "rewards", "duplicates", "failed_windows"):
            setattr(total, name, getattr(total, name) + getattr(learner.stats, name))
    return total, cpu, loop, wall, distinct


async def compare_calls(path: TablePath, calls: int, concurrency: int) -> list[str]:
    """CPU of the event loop's thread per CheckAndMutateRow of 3 new markers and one addition, three ways, in turns:
    the client's ``check_and_mutate_row``; the learner's request bytes on the client's channel (what it does); the same
    bytes on a plain gRPC channel to the emulator (without the client's two interceptors)."""

    import grpc
    from google.cloud.bigtable.data import AddToCell, SetCell, row_filters
    from google.cloud.bigtable_v2.types import bigtable as messages

    client = data_client(path.project)
    table = client.get_table(path.instance, path.table)
    metadata = path.routing
    decode = messages.CheckAndMutateRowResponse.pb().FromString
    ours = client.transport.grpc_channel.unary_unary(CHECK_AND_MUTATE_ROW, None, decode)
    plain_channel = grpc.aio.insecure_channel(os.environ["BIGTABLE_EMULATOR_HOST"])
    plain = plain_channel.unary_unary(CHECK_AND_MUTATE_ROW, None, decode)
    prefix = table_field(str(path))
    ts = time.time_ns() // 1_000_000 * 1000
    stamp = timestamp_field(ts)

    async def client_call(key: bytes, markers: list[bytes]) -> None:
        predicate = row_filters.RowFilterChain(
            [
                row_filters.FamilyNameRegexFilter(MARKERS_FAMILY),
                row_filters.ColumnQualifierRegexFilter(b"^(?:" + b"|".join(quote(m) for m in markers) + b")$"),
            ]
        )
        mutations = [SetCell(MARKERS_FAMILY, m, b"", ts) for m in markers] + [AddToCell("c", b"i", 3, 0)]
        await table.check_and_mutate_row(key, predicate, false_case_mutations=mutations)

    async def bytes_call(call: Any, key: bytes, markers: list[bytes]) -> None:
        request = check_and_mutate(prefix, key, [(quote(m), set_marker(m, stamp), 1, 0) for m in markers])
        await call(request, timeout=30, metadata=metadata)

    ways = {
        "the client's check_and_mutate_row": client_call,
        "request bytes on the client's channel (the learner)": lambda k, m: bytes_call(ours, k, m),
        "request bytes on a plain channel": lambda k, m: bytes_call(plain, k, m),
    }
    spent = dict.fromkeys(ways, 0.0)
    for turn in range(2):
        for name, way in ways.items():
            work = iter(range(calls // 2))
            tag = f"{name[:6]}{turn}".encode()

            async def worker() -> None:
                for i in work:
                    await way(b"arm-%07d" % (i % 1000), [b"m/%s/%d/%d" % (tag, i, j) for j in range(3)])

            t0 = time.thread_time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            spent[name] += time.thread_time() - t0
    await plain_channel.close()
    await client.close()
    return [f"{name}: {spent[name] / (calls // 2 * 2) * 1e6:.0f} us" for name in ways]


async def cells_per_row(path: TablePath) -> tuple[list[int], int]:
    """Marker cells in each arm row of the table, and the most cells (all families) in any arm row."""
    from google.cloud.bigtable.data import ReadRowsQuery, row_filters

    client = data_client(path.project)
    try:
        table = client.get_table(path.instance, path.table)
        rows = await table.read_rows(
            ReadRowsQuery(row_filter=row_filters.StripValueTransformerFilter(True)), operation_timeout=600
        )
        arms = [row for row in rows if not row.row_key.startswith(b"\x00")]  # the fleet's own rows start with NUL
        markers = [sum(cell.family == MARKERS_FAMILY for cell in row.cells) for row in arms]
        return markers, max((len(row.cells) for row in arms), default=0)
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
    parser.add_argument(
        "--calls", type=int, default=4000, help="calls of each way in the per-call comparison (0: none)"
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
        if args.calls:
            calls_table = TablePath("bench", "bench", f"calls-{tag}")
            fleet_setup.ensure_table(calls_table, marker_ttl_s=3600, say=lambda _: None)
            lines = asyncio.run(compare_calls(calls_table, args.calls, args.concurrency))
            print("event loop CPU per CheckAndMutateRow (3 markers), side by side:", "; ".join(lines))
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
            markers, most_cells = asyncio.run(cells_per_row(resources.table))
            print(
                f"window {window} events ({messages_per_window(window, args)} messages): {s.windows} windows, "
                f"{s.messages} messages; learner CPU {cpu:.2f} s "
                f"({cpu / args.events * 1e6:.1f} us per event, {args.events / cpu:,.0f} events/s per core), "
                f"event loop's thread {loop:.2f} s ({loop / args.events * 1e6:.1f} us per event, "
                f"{args.events / loop:,.0f} events/s), wall {wall:.2f} s; "
                f"{s.writes} CheckAndMutateRow ({s.writes / args.events:.3f} per event, "
                f"{loop / s.writes * 1e6:.0f} us of the loop's CPU each); emulators' CPU {emulator_cpu:.2f} s "
                f"({emulator_cpu / s.writes * 1e3:.2f} ms per call); {sum(markers)} markers in {len(markers)} rows "
                f"(at most {max(markers, default=0)} in one); impressions {s.impressions}, rewards {s.rewards}, "
                f"duplicates {s.duplicates}"
            )
            print(
                f"  SUMMARY window {window}: {args.events / cpu:,.0f} events/s per core (process), "
                f"{args.events / loop:,.0f} (event loop); calls per window {s.writes / max(s.windows, 1):,.0f} vs "
                f"distinct arms per window {sum(distinct) / max(len(distinct), 1):,.0f} (each learner's windows); "
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
