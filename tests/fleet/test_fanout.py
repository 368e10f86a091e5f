"""The counts' fan-out (``fleet.fanout``): learners publish what they wrote, replica nodes follow it in their arm
table and read Bigtable only at start and to resynchronise.

Replicas (``mab-service serve``) and learners (``mab-service learn``) run as processes against Google's emulators. A
replica's copy of the counts is read exactly by mapping its node's shared arm table (the file in /dev/shm that its
workers map), beside what its answers and ``/loop`` say.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mab_service.fleet.fanout import FORMAT_VERSION, CountsMessage, counts_topic
from mab_service.learning._arms import ArmTable
from tests.conftest import unused_tcp_port, wait_until
from tests.fleet.conftest import Emulator

JSON = {"content-type": "application/json"}
HOT, COLD = "hot-arm", "cold-arm"


# -- the pieces, without emulators ----------------------------------------------------------------------------------


def _table(capacity: int = 100) -> ArmTable:
    return ArmTable.create(mmap.mmap(-1, ArmTable.bytes_needed(capacity, 4096)), capacity, 4096)


def test_raise_counts_takes_the_larger_reading_in_any_order_and_twice() -> None:
    arms = _table()
    readings = [("a", 5, 1.5), ("b", 3, 0.0), ("a", 2, 2.0), ("a", 7, 1.0), ("a", 7, 1.0)]
    for order in (readings, readings[::-1]):
        table = _table()
        for id_, shown, got in order:
            assert table.raise_counts([id_], [shown], [got], 1.0, 1.0) == 0
        assert table.get("a") == (1.0, 1.0, 7, 2.0, False) and table.get("b") == (1.0, 1.0, 3, 0.0, False)
    assert arms.raise_counts(["x", "y", "x"], np.array([4, 1, 9]), np.array([0.5, 0.25, 0.0]), 2.0, 3.0) == 0
    assert arms.get("x") == (2.0, 3.0, 9, 0.5, False)  # inserted with the prior given
    alpha, beta, known, _ = arms.gather(["x", "unknown"], 2.0, 3.0)
    assert known == 1 and alpha.tolist() == [2.5, 2.0] and beta.tolist() == [11.5, 3.0]


def test_raise_counts_refuses_bad_counts_and_counts_a_full_table() -> None:
    arms = _table(capacity=2)
    with pytest.raises(ValueError, match="impressions must be >= 0"):
        arms.raise_counts(["a"], [-1], [0.0], 1.0, 1.0)
    with pytest.raises(ValueError, match="impressions must be >= 0 and rewards finite"):
        arms.raise_counts(["a"], [1], [float("nan")], 1.0, 1.0)
    with pytest.raises(ValueError, match="one value per id"):
        arms.raise_counts(["a", "b"], [1], [0.0], 1.0, 1.0)
    with pytest.raises(TypeError, match=r"ids\[1\] must be a string"):
        arms.raise_counts(["a", 3], [1, 1], [0.0, 0.0], 1.0, 1.0)
    assert arms.raise_counts(["a", "b", "c"], [1, 2, 3], [0.0, 0.0, 0.0], 1.0, 1.0) == 1
    assert arms.get("c") is None and arms.get("b") is not None


def test_a_counts_message_round_trips_and_bad_ones_are_refused() -> None:
    message = CountsMessage("l-1", 3, 1.5, ["a", "é"], [4, 0], [1_500_000, 0])
    assert CountsMessage.decode(message.encode()) == message
    for bad in (
        b"not json",
        b"[]",
        b'{"l": "l", "q": -1, "t0": 0, "ids": [], "i": [], "r": []}',
        b'{"l": "l", "q": 0, "t0": 0, "ids": ["a"], "i": [], "r": []}',
        b'{"l": "l", "q": 0, "t0": 0, "ids": [""], "i": [1], "r": [0]}',
        b'{"l": "l", "q": 0, "t0": 0, "ids": ["a"], "i": [-1], "r": [0]}',
        b'{"l": "l", "q": 0, "t0": 0, "ids": ["a"], "i": [1.5], "r": [0]}',
    ):
        assert CountsMessage.decode(bad) is None, bad


# -- against the emulators ------------------------------------------------------------------------------------------


@dataclass
class Fanout:
    tmp: Path
    topic: str
    subscription: str
    table: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def replica(self, name: str, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> Replica:
        port = unused_tcp_port()
        with (self.tmp / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port)]
                + ["--features", f"bigtable:{self.table}", "--events", f"pubsub:{self.topic}"]
                + ["--state-dir", str(self.tmp / name), "--max-held-members", "100000", *args],
                env=env or _env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        replica = Replica(f"http://127.0.0.1:{port}", proc, self.tmp / f"{name}.log")
        if wait:

            def ready() -> bool:
                assert proc.poll() is None, f"replica {name} exited: {replica.log.read_text()[-3000:]}"
                try:
                    return httpx.get(replica.url + "/health", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            assert wait_until(ready, timeout_s=60, interval_s=0.1), f"replica {name} not ready"
        return replica

    def learner(self, name: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mab_service", "learn", "--events", f"pubsub:{self.subscription}"]
                + ["--posteriors", f"bigtable:{self.table}", "--window-s", "0.1", "--metrics-port", "0"],
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def follower(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(self.url + "/loop", timeout=10).json()["fleet"]["follower"]
        return stats

    def arms(self) -> ArmTable:
        """The node's shared arm table, mapped here (the replica serves with one worker: its own process)."""
        (path,) = Path("/dev/shm").glob(f"mab-service-{self.proc.pid}-*-arms")
        fd = os.open(path, os.O_RDWR)
        try:
            return ArmTable.attach(mmap.mmap(fd, 0))
        finally:
            os.close(fd)

    def predict(self, candidates: list[str], top_k: int) -> dict[str, Any]:
        answer = httpx.post(
            self.url + "/predict", json={"user_id": "u", "candidates": candidates, "top_k": top_k}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAB_")}


@pytest.fixture
def fanout(
    tmp_path: Path, bigtable_emulator: Emulator, pubsub_emulator: Emulator, fleet_table: str
) -> Iterator[Fanout]:
    from mab_service.fleet import setup as fleet_setup

    tag = uuid.uuid4().hex[:8]
    made = Fanout(
        tmp_path, f"projects/fleet/topics/fanout-{tag}", f"projects/fleet/subscriptions/fanout-{tag}", fleet_table
    )
    fleet_setup.setup(
        fleet_setup.FleetResources(
            made.topic,
            made.subscription,
            fleet_setup.table_path(f"bigtable:{fleet_table}"),
            retention_s=600,  # the table's markers live an hour (fleet_table)
        ),
        say=lambda _: None,
    )
    try:
        yield made
    finally:
        for proc in made.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in made.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _counts(arms: ArmTable, ids: list[str]) -> dict[str, tuple[int, float]]:
    got = {}
    for id_ in ids:
        found = arms.get(id_)
        got[id_] = (0, 0.0) if found is None else (found[2], round(found[3], 6))
    return got


def _write_counts(table: str, counts: dict[str, tuple[int, float]]) -> None:
    """Add counts to Bigtable as a learner does (AddToCell on family ``c``), without publishing them."""
    from google.cloud.bigtable.data import AddToCell, RowMutationEntry

    from mab_service.features.bigtable import data_client
    from mab_service.fleet.schema import COUNTS_FAMILY, IMPRESSIONS, REWARD_SCALE, REWARDS, TablePath

    path = TablePath.parse(table)

    async def write() -> None:
        client = data_client(path.project)
        target = client.get_table(path.instance, path.table)
        entries = [
            RowMutationEntry(
                id_.encode(),
                [
                    AddToCell(COUNTS_FAMILY, IMPRESSIONS, shown, 0),
                    AddToCell(COUNTS_FAMILY, REWARDS, round(got * REWARD_SCALE), 0),
                ],
            )
            for id_, (shown, got) in counts.items()
        ]
        await target.bulk_mutate_rows(entries, operation_timeout=60)
        await client.close()

    asyncio.run(write())


def test_a_replica_follows_a_learners_counts_without_reading_bigtable(fanout: Fanout) -> None:
    """Answers and rewards through a replica, counted by a learner: the replica's arm table reaches the exact counts
    through the fan-out, its answers rank by them, and it reads no counts row from Bigtable after its start scan."""
    replica = fanout.replica("replica")
    fanout.learner("learner")
    start = replica.follower()
    assert start["leader"] and start["resyncs"]["start"] == 1 and start["subscription"]
    truth: dict[str, tuple[int, float]] = {HOT: (0, 0.0), COLD: (0, 0.0)}
    with httpx.Client(base_url=replica.url, timeout=30, headers=JSON) as client:
        for i in range(40):
            answer = client.post("/predict", json={"user_id": f"u{i}", "candidates": [HOT, COLD], "top_k": 2}).json()
            for id_ in answer["ids"]:
                truth[id_] = (truth[id_][0] + 1, truth[id_][1])
            accepted = client.post("/reward", json={"event_id": answer["event_id"], "id": HOT, "reward": 1})
            assert accepted.status_code == 202, accepted.text
            truth[HOT] = (truth[HOT][0], truth[HOT][1] + 1)
    arms = replica.arms()
    assert wait_until(lambda: _counts(arms, [HOT, COLD]) == truth, timeout_s=60, interval_s=0.05), (
        _counts(arms, [HOT, COLD]),
        truth,
    )
    # Steady state: answers flow and rank by the followed counts (Beta(41, 1) against Beta(1, 41)), no row is read.
    for _ in range(50):
        assert replica.predict([COLD, HOT], top_k=1)["ids"] == [HOT]
    after = replica.follower()
    assert after["rows_read"] == start["rows_read"] and after["messages"] > 0
    assert sum(after["resyncs"].values()) == 1 and after["malformed"] == 0


def test_a_replica_started_after_the_counts_exist_gets_them_from_its_start_scan(fanout: Fanout) -> None:
    written = {f"scanned-{i}": (10 + i, i / 4) for i in range(25)}
    _write_counts(fanout.table, written)
    replica = fanout.replica("replica")
    assert _counts(replica.arms(), list(written)) == written
    stats = replica.follower()
    assert stats["rows_read"] == len(written) and stats["resyncs"]["start"] == 1


def _publish(topic: str, message: CountsMessage) -> None:
    from google.cloud.pubsub_v1 import PublisherClient

    with PublisherClient() as publisher:
        publisher.publish(topic, message.encode(), v=FORMAT_VERSION).result(timeout=30)


def test_a_lost_message_and_a_lost_subscription_are_repaired_by_a_resync(fanout: Fanout) -> None:
    """A learner's message 1 never arrives (0 and 2 do): after the grace the replica scans the table again and gets
    counts no message carried. Its subscription deleted: it subscribes again and scans again."""
    replica = fanout.replica("replica")
    topic = counts_topic(fanout.topic)
    learner = f"test-{uuid.uuid4().hex[:6]}"
    arms = replica.arms()
    _publish(topic, CountsMessage(learner, 0, time.time(), ["seq-a"], [5], [1_000_000]))
    assert wait_until(lambda: _counts(arms, ["seq-a"]) == {"seq-a": (5, 1.0)}, timeout_s=30)
    _write_counts(fanout.table, {"only-in-bigtable": (7, 2.0)})  # as if carried by the lost message 1
    _publish(topic, CountsMessage(learner, 2, time.time(), ["seq-c"], [3], [0]))
    assert wait_until(lambda: _counts(arms, ["only-in-bigtable"]) == {"only-in-bigtable": (7, 2.0)}, timeout_s=60)
    stats = replica.follower()
    assert stats["resyncs"]["sequence"] == 1 and _counts(arms, ["seq-c"]) == {"seq-c": (3, 0.0)}
    assert "a learner's message is missing" in replica.log.read_text()

    from google.cloud.pubsub_v1 import SubscriberClient

    with SubscriberClient() as subscriber:
        subscriber.delete_subscription(subscription=stats["subscription"])
    _write_counts(fanout.table, {"after-the-subscription": (4, 0.5)})
    assert wait_until(
        lambda: _counts(arms, ["after-the-subscription"]) == {"after-the-subscription": (4, 0.5)}, timeout_s=60
    )
    assert replica.follower()["resyncs"]["subscription"] == 1
    # Following again: a message on the new subscription is applied.
    _publish(topic, CountsMessage(learner, 3, time.time(), ["seq-d"], [2], [0]))
    assert wait_until(lambda: _counts(arms, ["seq-d"]) == {"seq-d": (2, 0.0)}, timeout_s=30)


def test_a_replica_deletes_its_subscription_when_it_stops(fanout: Fanout) -> None:
    from google.api_core import exceptions
    from google.cloud.pubsub_v1 import SubscriberClient

    replica = fanout.replica("replica")
    name = replica.follower()["subscription"]
    with SubscriberClient() as subscriber:
        made = subscriber.get_subscription(subscription=name)
        assert made.expiration_policy.ttl.total_seconds() == 86_400  # Pub/Sub's least: an abandoned one vanishes
        assert made.message_retention_duration.total_seconds() == 600
        os.killpg(replica.proc.pid, signal.SIGTERM)
        assert replica.proc.wait(timeout=60) == 0
        with pytest.raises(exceptions.NotFound):
            subscriber.get_subscription(subscription=name)


def test_without_the_fanout_topic_a_replica_refuses_to_start_and_says_to_run_setup(fanout: Fanout) -> None:
    from google.cloud.pubsub_v1 import PublisherClient

    with PublisherClient() as publisher:
        publisher.delete_topic(topic=counts_topic(fanout.topic))
    replica = fanout.replica("replica", wait=False)
    assert replica.proc.wait(timeout=60) == 3
    assert "does not exist: run mab-service setup" in replica.log.read_text()
    # The cache path needs no fan-out.
    fanout.replica("cached", "--no-fleet-follow").predict([HOT, COLD], top_k=1)


def test_bigtable_away_at_start_stops_the_replica_and_pubsub_away_delays_only_the_following(fanout: Fanout) -> None:
    """Bigtable out of reach at start: the replica refuses to start (exit 3, naming the table), as without the
    fan-out. Pub/Sub out of reach at start: it serves the counts of its start scan, subscribes once Pub/Sub is back,
    and scans again (what was published meanwhile did not reach it)."""
    from tests.fleet.proxy import Proxy

    bigtable = Proxy(int(os.environ["BIGTABLE_EMULATOR_HOST"].rpartition(":")[2]))
    pubsub = Proxy(int(os.environ["PUBSUB_EMULATOR_HOST"].rpartition(":")[2]))
    try:
        bigtable.down()
        env = {**_env(), "BIGTABLE_EMULATOR_HOST": bigtable.host}
        refused = fanout.replica("no-bigtable", "--vertex-read-budget-s", "1", env=env, wait=False)
        assert refused.proc.wait(timeout=120) == 3
        assert f"cannot read Bigtable table {fanout.table}" in refused.log.read_text()
        bigtable.up()

        _write_counts(fanout.table, {"before": (3, 1.0)})
        pubsub.down()
        replica = fanout.replica("late-pubsub", env={**_env(), "PUBSUB_EMULATOR_HOST": pubsub.host})
        arms = replica.arms()
        assert _counts(arms, ["before"]) == {"before": (3, 1.0)}
        assert replica.follower()["resyncs"] == {"start": 1, "sequence": 0, "subscription": 0, "silence": 0}
        assert replica.predict(["before", COLD], top_k=1)["degraded"] is False
        _write_counts(fanout.table, {"meanwhile": (6, 2.0)})  # published while it was not subscribed: lost to it
        pubsub.up()
        assert wait_until(lambda: _counts(arms, ["meanwhile"]) == {"meanwhile": (6, 2.0)}, timeout_s=60)
        assert replica.follower()["resyncs"]["subscription"] == 1
    finally:
        bigtable.close()
        pubsub.close()
