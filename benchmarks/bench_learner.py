"""Events per second per core of the learner, applying a backlog from the Pub/Sub emulator to the Bigtable emulator.

Both emulators start on free loopback ports (their own process groups). ``--events`` answered events of ``--top-k``
ids drawn from ``--arms`` arms (Zipf-like popularity, exponent 1.1), and a reward for ``--reward-rate`` of the
impressions, go through the sink in messages of ``--records`` records. Then one learner, in this process (pin it with
taskset), drains the backlog: its CPU seconds (``time.process_time``), wall time, and the emulators' CPU are printed,
with the events and the CheckAndMutateRow calls per second of learner CPU.

    PYTHONPATH=$PWD taskset -c 1 python -m benchmarks.bench_learner [--events 20000] [--top-k 10] [--arms 10000]
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

import numpy as np

from benchmarks.bench_service import free_port, session_cpu_seconds
from mab_service.features.bigtable import TablePath
from mab_service.learning import fleet_setup
from mab_service.learning.learner import Learner
from mab_service.learning.pubsub import PubSubSink


def start(kind: str, variable: str) -> subprocess.Popen[bytes]:
    port = free_port()
    proc = subprocess.Popen(
        ["gcloud", "beta", "emulators", kind, "start", f"--host-port=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.environ[variable] = f"127.0.0.1:{port}"
    return proc


async def publish(topic: str, args: argparse.Namespace) -> int:
    rng = np.random.default_rng(11)
    weights = 1.0 / np.arange(1, args.arms + 1) ** 1.1
    weights /= weights.sum()
    sink = PubSubSink(topic, max_records=args.records, max_delay_s=0.05, max_pending=100_000)
    sink.start()
    rewards = []
    prefix = uuid.uuid4().hex[:8]
    for n in range(args.events):
        ids = [f"arm-{i:07d}" for i in rng.choice(args.arms, args.top_k, replace=False, p=weights)]
        event_id = f"{prefix}{n:x}"
        sink.event(event_id, ids, 0.0)
        for id_ in ids:
            if rng.random() < args.reward_rate:
                rewards.append(sink.reward(event_id, id_, 1.0, 0.0))
    await asyncio.gather(*rewards)
    await sink.close()
    return len(rewards)


async def drain(resources: fleet_setup.FleetResources, args: argparse.Namespace) -> tuple[Learner, float, float]:
    learner = Learner(
        resources.subscription, str(resources.table), window_s=args.window_s, concurrency=args.concurrency
    )
    await learner.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    idle = 0
    while idle < 2:
        idle = idle + 1 if await learner.step(wait_s=1.0) == 0 else 0
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0 - 2.0  # minus the idle waits at the end
    await learner.close()
    return learner, cpu, wall


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_learner", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--arms", type=int, default=10_000)
    parser.add_argument("--reward-rate", type=float, default=0.05)
    parser.add_argument("--records", type=int, default=1000, help="records per message")
    parser.add_argument("--window-s", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    emulators = [start("bigtable", "BIGTABLE_EMULATOR_HOST"), start("pubsub", "PUBSUB_EMULATOR_HOST")]
    try:
        time.sleep(5)
        tag = uuid.uuid4().hex[:8]
        resources = fleet_setup.FleetResources(
            topic=f"projects/bench/topics/events-{tag}",
            subscription=f"projects/bench/subscriptions/learners-{tag}",
            table=TablePath("bench", "bench", f"arms-{tag}"),
        )
        fleet_setup.setup(resources, say=lambda _: None)
        rewards = asyncio.run(publish(resources.topic, args))
        emulator_cpu0 = sum(session_cpu_seconds(e.pid) for e in emulators)
        learner, cpu, wall = asyncio.run(drain(resources, args))
        emulator_cpu = sum(session_cpu_seconds(e.pid) for e in emulators) - emulator_cpu0
        stats = learner.stats
        print(
            f"{args.events} events of top_k {args.top_k} over {args.arms} arms, {rewards} rewards, "
            f"{stats.messages} messages, {stats.windows} windows"
        )
        print(f"learner CPU {cpu:.2f} s, wall {wall:.2f} s, emulators' CPU {emulator_cpu:.2f} s")
        print(
            f"per learner CPU second: {args.events / cpu:,.0f} events, {stats.impressions / cpu:,.0f} impressions, "
            f"{stats.writes / cpu:,.0f} CheckAndMutateRow calls ({stats.writes} in all)"
        )
    finally:
        for e in emulators:
            os.killpg(e.pid, signal.SIGKILL)
            e.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
