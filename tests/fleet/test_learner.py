"""The learner against both emulators: events and rewards published with duplicates count exactly once, also when
a learner is killed with SIGKILL mid-run and another starts; its requests, byte for byte against the client's."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mab_service.features.bigtable import BigtableSource
from mab_service.fleet import requests as bigtable_requests, setup as fleet_setup, windows
from mab_service.fleet.learner import Learner
from mab_service.fleet.schema import TablePath, segment_row
from mab_service.fleet.sink import FORMAT_VERSION, RECORDS_VERSION, PubSubSink
from tests.conftest import Rand, unused_tcp_port
from tests.fleet.conftest import Emulator
from tests.fleet.proxy import Proxy

ARMS = [f"arm-{i:03d}" for i in range(40)]


def make_resources(ack_deadline_s: int = 60, shards: int | None = None) -> fleet_setup.FleetResources:
    tag = uuid.uuid4().hex[:8]
    resources = fleet_setup.FleetResources(
        topic=f"projects/fleet/topics/events-{tag}",
        subscription=f"projects/fleet/subscriptions/learners-{tag}",
        table=TablePath("fleet", "mab", f"arms-{tag}"),
        ack_deadline_s=ack_deadline_s,
        shards=shards,
    )
    fleet_setup.setup(resources, say=lambda _: None)
    return resources


class Truth:
    """What the counts must be: each (event, id) once, whatever was published twice."""

    def __init__(self) -> None:
        self.impressions: Counter[str] = Counter()
        self.rewards: defaultdict[str, float] = defaultdict(float)
        self.reward_count = 0
        """Distinct (event, id) rewards."""

    def expected(self) -> tuple[list[int], list[float]]:
        return [self.impressions[a] for a in ARMS], [self.rewards[a] for a in ARMS]


async def publish(resources: fleet_setup.FleetResources, rand: Rand, events: int, truth: Truth, shards: int = 0) -> int:
    """Publish ``events`` answered events and rewards for some of their ids through the sink (split into ``shards``
    if not 0), and ten messages twice under one key, as a publisher's resend after a lost answer makes them (on the
    fleet's own topic). Returns the messages published."""
    from google.cloud.pubsub_v1 import PublisherClient

    sink = PubSubSink(resources.topic, max_records=25, max_delay_s=0.005)
    sink.start(shards)
    rewards = []
    for n in range(events):
        event_id = f"ev{uuid.uuid4().hex[:12]}.{n}"
        ids = [ARMS[i] for i in rand.gen.choice(len(ARMS), 5, replace=False)]
        sink.event(event_id, ids, time.time())
        truth.impressions.update(ids)
        for id_ in ids[: int(rand.gen.integers(0, 3))]:
            reward = float(rand.gen.choice([0.0, 0.25, 0.5, 1.0]))
            truth.rewards[id_] += reward
            truth.reward_count += 1
            rewards.append(sink.reward(event_id, id_, reward, time.time()))
    await asyncio.gather(*rewards)
    await sink.close()
    assert sink.failed == 0 and sink.refused == 0
    # Messages published twice under one key, as a publisher's retry after a lost answer makes them (a message is the
    # same on every send: the sink keeps its claimed rewards in it); two events of a message share an arm.
    again = 0
    with PublisherClient() as publisher:
        for i in range(0, 20, 2):
            records: list[list[Any]] = [
                ["e", 0.0, f"ev-again-{i}", [ARMS[i], ARMS[i + 1]]],
                ["e", 0.0, f"ev-again-{i}b", [ARMS[i + 1], ARMS[i + 2]]],
            ]
            truth.impressions.update([ARMS[i], ARMS[i + 1], ARMS[i + 1], ARMS[i + 2]])
            first = records + [["r", 0.0, f"ev-again-{i}", ARMS[i], 0.5]]
            truth.rewards[ARMS[i]] += 0.5
            truth.reward_count += 1
            for data in (first, first):
                publisher.publish(
                    resources.topic, orjson.dumps(data), v=RECORDS_VERSION, k=f"again/{i // 2 + 1}"
                ).result(timeout=30)
                again += 1
        publisher.stop()
    return sink.published + again


async def read_counts(table: str, arms: list[str] = ARMS) -> tuple[list[int], list[float]]:
    source = BigtableSource(table, 1.0, 1.0, timeout_s=30)  # the emulator is slow while learners write
    await source.start()
    try:
        counts = await source.read_counts(arms)
    finally:
        await source.close()
    return counts.impressions.tolist(), counts.rewards.tolist()


def published(learner: Learner) -> int:
    """Messages acknowledged that were published here, not the parts of the fleet's own subscription's messages the
    learner forwarded to the shard topics (one to each shard) and then applied."""
    return learner.stats.messages - learner.stats.forwarded * learner.shards


def assert_exact(table: str, truth: Truth) -> None:
    impressions, rewards = asyncio.run(read_counts(table))
    want_impressions, want_rewards = truth.expected()
    assert impressions == want_impressions
    np.testing.assert_allclose(rewards, want_rewards, rtol=0, atol=1e-9)


def test_each_event_and_reward_counts_once(bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand) -> None:
    resources = make_resources()
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 300, truth))

    async def learn() -> Learner:
        learner = Learner(resources.subscription, str(resources.table), window_s=0.05, max_messages=30)
        await learner.start()
        try:
            idle = 0
            while idle < 2:
                idle = idle + 1 if await learner.step(wait_s=1.0) == 0 else 0
        finally:
            await learner.close()
        return learner

    learner = asyncio.run(learn())
    # Published without shards to a table of 16: each message forwarded, split, to every shard's topic, and counted
    # there; the resent ones skipped by their shard's applied set (4 impressions and a reward each).
    assert learner.stats.forwarded == sent
    assert learner.stats.messages == sent * 17
    assert learner.stats.malformed == learner.stats.failed_windows == 0
    assert learner.stats.duplicates == 10 * 5
    assert learner.stats.impressions == sum(truth.impressions.values())
    assert learner.stats.rewards == truth.reward_count
    assert_exact(str(resources.table), truth)


def test_learners_share_the_shards_and_take_over_a_dead_ones(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand
) -> None:
    """Two learners on a table of 4 shards hold 2 leases each, disjoint, and together count exactly; a learner that
    stops renewing (as if killed) has its shards taken over after the lease's TTL, and one that closes gives its
    leases back at once."""
    from mab_service.fleet.sink import shard_of

    resources = make_resources(shards=4)
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 200, truth, shards=4))
    ttl_s = 1.5

    async def learn() -> None:
        a = Learner(resources.subscription, str(resources.table), window_s=0.05, lease_ttl_s=ttl_s)
        b = Learner(resources.subscription, str(resources.table), window_s=0.05, lease_ttl_s=ttl_s)
        await a.start()
        assert a.shards == 4 and a.held == {0, 1, 2, 3}  # alone: all of them
        await b.start()
        deadline = time.monotonic() + 30
        written: dict[str, set[tuple[int, str]]] = {"a": set(), "b": set()}
        while (len(a.held), len(b.held)) != (2, 2) or a.held & b.held:  # a gives back 2 at its next renewal
            assert time.monotonic() < deadline, (a.held, b.held)
            await asyncio.sleep(0.1)
        held = {"a": set(a.held), "b": set(b.held)}
        for name, learner in (("a", a), ("b", b)):
            real_commit = learner._commit

            async def commit(state: Any, plan: Any, name: str = name, real_commit: Any = real_commit) -> bool:
                written[name].update((state.shard, id_) for id_ in [*plan.shown, *plan.got])
                return bool(await real_commit(state, plan))

            learner._commit = commit  # type: ignore[method-assign]
        deadline = time.monotonic() + 60
        # The 20 messages published without shards are forwarded, split, to the 4 shard topics and counted there.
        while a.stats.messages + b.stats.messages < sent + 20 * 4:
            assert time.monotonic() < deadline, (a.stats, b.stats)
            await asyncio.gather(a.step(wait_s=0.2), b.step(wait_s=0.2))
        # Each arm was written by the learner holding its shard only, the arms of the fleet's own subscription too
        # (forwarded by the shard-0 holder to their shards).
        for name in ("a", "b"):
            assert written[name] and all(
                shard in held[name] and shard_of(id_, 4) == shard for shard, id_ in written[name]
            )
        impressions, rewards = await read_counts(str(resources.table))
        assert (impressions, rewards) == truth.expected()
        # b stops renewing without giving its leases back, as a learner killed would: a takes them after the TTL.
        assert b._leases is not None
        b._leases.cancel()
        started = time.monotonic()
        while a.held != {0, 1, 2, 3}:
            assert time.monotonic() - started < 10 * ttl_s, a.held
            await asyncio.sleep(0.1)
        assert time.monotonic() - started > ttl_s / 3  # not before b's leases expired
        b.held.clear()  # b is "dead": its close must not give back what a holds now
        await b.close()
        # A third learner arrives, then a closes: its leases are given back and c takes all four within a renewal.
        c = Learner(resources.subscription, str(resources.table), window_s=0.05, lease_ttl_s=ttl_s)
        await c.start()
        await a.close()
        started = time.monotonic()
        while c.held != {0, 1, 2, 3}:
            assert time.monotonic() - started < 3 * ttl_s, c.held
            await asyncio.sleep(0.1)
        await c.close()
        assert a.stats.leases_lost == 0

    asyncio.run(learn())


def test_a_table_without_shards_is_read_from_the_one_subscription(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand
) -> None:
    """A deployment from before shards (no shard count in the table): the table is one shard, read from the fleet's
    subscription by the learner holding its lease."""
    from google.cloud.bigtable.data import DeleteAllFromRow

    from mab_service.features.bigtable import data_client
    from mab_service.fleet.schema import CONFIG_ROW

    resources = make_resources()
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 50, truth))

    async def learn() -> Learner:
        client = data_client(resources.table.project)
        table = client.get_table(resources.table.instance, resources.table.table)
        await table.mutate_row(CONFIG_ROW, [DeleteAllFromRow()])
        await client.close()
        learner = Learner(resources.subscription, str(resources.table), window_s=0.05)
        await learner.start()
        try:
            assert learner.shards == 0 and learner.held == {0}
            deadline = time.monotonic() + 60
            while learner.stats.messages < sent:
                assert time.monotonic() < deadline, learner.stats
                await learner.step(wait_s=1.0)
        finally:
            await learner.close()
        return learner

    learner = asyncio.run(learn())
    assert learner.stats.leases_taken == 1 and learner.stats.forwarded == 0
    assert_exact(str(resources.table), truth)


def drain(resources: fleet_setup.FleetResources, until: Any, window_s: float = 0.2) -> Learner:
    """A learner's steps on ``resources`` until ``until(learner)`` holds and a step finds nothing more."""

    async def learn() -> Learner:
        learner = Learner(resources.subscription, str(resources.table), window_s=window_s)
        await learner.start()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if await learner.step(wait_s=2.0) == 0 and until(learner):
                    break
        finally:
            await learner.close()
        return learner

    return asyncio.run(learn())


def test_invalid_records_are_skipped_and_the_rest_of_their_message_counts(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator
) -> None:
    """Every kind of bad record inside messages of good ones: each good record counts in Bigtable, each bad one is
    counted by reason, no message is dropped or dead-lettered."""
    from google.cloud.pubsub_v1 import PublisherClient

    resources = make_resources()
    bad: dict[str, list[Any]] = {
        "id": [
            ["e", 0, "ev-b1", [ARMS[0], "tab\there"]],  # a control character, with a good id beside it
            ["e", 0, "ev-b2", ["del\x7f"]],
            ["e", 0, "ev-b3", ["x" * 1025]],  # 1,025 bytes
            ["e", 0, "ev-b4", ["\u00e9" * 513]],  # 513 characters, 1,026 bytes of UTF-8
            ["e", 0, "ev-b5", [""]],
            ["e", 0, "ev-b6", [ARMS[0], 7]],
            ["r", 0, "ev-b7", "nul\x00", 1.0],
            ["r", 0, "ev-b8", ["arm-000"], 1.0],
        ],
        "event_id": [["e", 0, "bad id!", [ARMS[1]]], ["r", 0, "e" * 129, ARMS[1], 1.0], ["e", 0, 17, [ARMS[1]]]],
        "reward": [["r", 0, "ev-b9", ARMS[2], 2], ["r", 0, "ev-b10", ARMS[2], -0.5], ["r", 0, "ev-b11", ARMS[2], True]],
        "record": [["x", 0, "ev-b12", [ARMS[3]]], ["e", 0, "ev-b13"], ["e", "now", "ev-b14", [ARMS[3]]], 5, {"e": 1}],
    }
    truth = Truth()
    longest = "\u00e9" * 512  # 1,024 bytes: the longest id there is
    arms = ARMS + [longest]
    messages = []
    for n, (reason, records) in enumerate(bad.items()):
        good: list[Any] = [
            ["e", 0, f"ev-{n}a", [ARMS[n], ARMS[n + 1], longest]],
            ["r", 0, f"ev-{n}a", ARMS[n], 0.5],
            ["e", 0, f"ev-{n}b", [ARMS[n + 1]]],
        ]
        truth.impressions.update([ARMS[n], ARMS[n + 1], longest, ARMS[n + 1]])
        truth.rewards[ARMS[n]] += 0.5
        # The bad records between the good ones, as a replica's batch would hold them.
        messages.append((good[:1] + records + good[1:], {"v": RECORDS_VERSION, "k": f"p/{n + 1}"}))
    # Format 3: the impressions summed per arm, each entry checked on its own.
    sums = {ARMS[10]: 3, "tab\there": 1, "x" * 1025: 1, ARMS[11]: 0, ARMS[12]: "2", ARMS[13]: 2**31, ARMS[14]: True}
    sums[ARMS[15]] = 1.5
    v3: list[Any] = [["i", 4, sums], ["r", 0, "ev-v3", ARMS[10], 0.25], ["r", 0, "ev-v3b", "del\x7f", 1.0], ["x"]]
    # Segments: a record per segment (a bad segment skips its record, a bad id its entry), and rewards whose sixth
    # item is the segment (a bad one: the reward counts for the arm alone).
    v3 += [
        ["i", 3, {ARMS[16]: 2, ARMS[17]: 1}],
        ["s", "fr", {ARMS[16]: 2, "del\x7f": 1}],
        ["s", "tab\there", {ARMS[17]: 1}],
        ["s", "x" * 129, {ARMS[17]: 1}],
        ["r", 0, "ev-s1", ARMS[16], 0.5, "fr"],
        ["r", 0, "ev-s2", ARMS[17], 1.0, 7],
    ]
    messages.append((v3, {"v": FORMAT_VERSION, "k": "p3/1"}))
    truth.impressions.update({ARMS[10]: 3, ARMS[16]: 2, ARMS[17]: 1})
    truth.rewards[ARMS[10]] += 0.25
    truth.rewards[ARMS[16]] += 0.5
    truth.rewards[ARMS[17]] += 1.0
    invalid = {reason: len(records) for reason, records in bad.items()}
    invalid["id"] += 4  # two ids of the sums, one of a segment's sums, one of a reward
    invalid["count"] = 5  # 0, "2", 2^31, true, 1.5
    invalid["record"] += 1
    invalid["segment"] = 3  # two records, one reward
    with PublisherClient() as publisher:
        for records, attributes in messages:
            publisher.publish(resources.topic, orjson.dumps(records), **attributes).result(timeout=30)
        publisher.stop()

    learner = drain(resources, lambda learner: published(learner) >= len(messages))
    assert published(learner) == len(messages) and learner.stats.malformed == 0
    assert learner.stats.invalid_records == invalid
    assert learner.stats.impressions == sum(truth.impressions.values())
    assert learner.stats.rewards == len(bad) + 3
    impressions, rewards = asyncio.run(read_counts(str(resources.table), arms))
    assert impressions == [truth.impressions[a] for a in arms]
    assert rewards == [truth.rewards[a] for a in arms]
    rows = [segment_row("fr", ARMS[16]), segment_row("fr", ARMS[17]), segment_row("tab\there", ARMS[17])]
    assert asyncio.run(read_counts(str(resources.table), rows)) == ([2, 0, 0], [0.5, 0.0, 0.0])
    exposed = {
        (sample.name, sample.labels.get("reason")): sample.value
        for family in text_string_to_metric_families(generate_latest(learner.metrics.registry).decode())
        for sample in family.samples
    }
    for reason, n in invalid.items():
        assert exposed["mab_learner_invalid_records_total", reason] == n


def test_an_undecodable_message_is_nacked_until_pubsub_dead_letters_it(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator
) -> None:
    """Messages that are not records of this format are never acknowledged: each is nacked on every delivery,
    and the subscription's dead-letter policy (``setup``: 5 deliveries) forwards it, whole, to the dead-letter
    topic, where its subscription keeps it. Google's emulator implements the forwarding."""
    from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient

    resources = make_resources()
    good = b'[["e", 0, "ok", ["arm-000"]]]'
    cases: list[tuple[bytes, dict[str, str]]] = [
        (b"not json", {"v": RECORDS_VERSION, "k": "p/2"}),
        (b'{"e": 1}', {"v": RECORDS_VERSION, "k": "p/3"}),
        (b'"text"', {"v": RECORDS_VERSION, "k": "p/4"}),
        (b"\xff\xfe", {"v": RECORDS_VERSION, "k": "p/5"}),  # not UTF-8
        (good, {"v": RECORDS_VERSION}),  # no key
        (good, {"k": "p/20"}),  # no version
        (good, {"v": "1", "k": "p/21"}),  # another version
        (good, {"v": RECORDS_VERSION, "k": "p/not-a-sequence"}),
    ]
    with PublisherClient() as publisher:
        for data, attributes in cases:
            publisher.publish(resources.topic, data, **attributes).result(timeout=30)
        publisher.publish(resources.topic, good, v=RECORDS_VERSION, k="p/1").result(timeout=30)
        publisher.stop()

    attempts = resources.max_delivery_attempts
    learner = drain(resources, lambda learner: learner.stats.malformed >= attempts * len(cases))
    assert published(learner) == 1
    assert learner.stats.malformed == attempts * len(cases)  # nacked on each delivery, never acknowledged
    impressions, rewards = asyncio.run(read_counts(str(resources.table)))
    assert impressions[0] == 1 and sum(impressions) == 1 and sum(rewards) == 0
    dead: list[tuple[bytes, dict[str, str]]] = []
    with SubscriberClient() as subscriber:
        deadline = time.monotonic() + 60
        while len(dead) < len(cases) and time.monotonic() < deadline:
            response = subscriber.pull(subscription=resources.dead_letter_subscription, max_messages=100, timeout=5)
            dead += [(m.message.data, dict(m.message.attributes)) for m in response.received_messages]
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=resources.dead_letter_subscription,
                    ack_ids=[m.ack_id for m in response.received_messages],
                )
    assert sorted((data, sorted(attributes.items())) for data, attributes in cases) == sorted(
        (data, sorted((k, v) for k, v in attributes.items() if not k.startswith("CloudPubSubDeadLetter")))
        for data, attributes in dead
    )
    assert {attributes["CloudPubSubDeadLetterSourceDeliveryCount"] for _, attributes in dead} == {str(attempts)}


def start_learner(
    resources: fleet_setup.FleetResources, log: Path, metrics_port: int = 0, window_s: float = 0.02
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mab_service",
                "learn",
                "--events",
                f"pubsub:{resources.subscription}",
                "--posteriors",
                f"bigtable:{resources.table}",
                "--window-s",
                str(window_s),
                "--max-messages",
                "5",
                "--concurrency",
                "4",
                "--metrics-port",
                str(metrics_port),
                "--metrics-host",
                "127.0.0.1",
            ],
            env=os.environ.copy(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
def test_kill_9_mid_run_and_restart_counts_exactly(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand, tmp_path: Path
) -> None:
    # A short ack deadline, so that what the killed learner held comes back within the test.
    resources = make_resources(ack_deadline_s=10)
    truth = Truth()
    asyncio.run(publish(resources, rand, 1500, truth))
    total = sum(truth.impressions.values())
    first = start_learner(resources, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 60
        while True:  # kill it once it has written part of the stream
            applied = sum(asyncio.run(read_counts(str(resources.table)))[0])
            if applied >= total // 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert 0 < applied < total, "the learner must be killed mid-run"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    second = start_learner(resources, tmp_path / "second.log")
    third = start_learner(resources, tmp_path / "third.log")  # learners share the subscription
    try:
        deadline = time.monotonic() + 90
        while sum(asyncio.run(read_counts(str(resources.table)))[0]) < total and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(12)  # one more ack deadline: anything redelivered late must still count once
        logs = "".join((tmp_path / f"{name}.log").read_text() for name in ("first", "second", "third"))
        impressions, rewards = asyncio.run(read_counts(str(resources.table)))
        want_impressions, want_rewards = truth.expected()
        assert impressions == want_impressions, logs
        np.testing.assert_allclose(rewards, want_rewards, rtol=0, atol=1e-9, err_msg=logs)
    finally:
        for learner in (second, third):
            learner.terminate()
        for learner, log in ((second, "second.log"), (third, "third.log")):
            try:
                assert learner.wait(timeout=15) == 0, (tmp_path / log).read_text()[-2000:]
            finally:
                if learner.poll() is None:
                    learner.kill()
                    learner.wait()


def test_learn_refuses_a_missing_subscription_or_table(bigtable_emulator: Emulator, pubsub_emulator: Emulator) -> None:
    resources = make_resources()
    cases = [
        (f"{resources.subscription}-missing", str(resources.table), "cannot read subscription"),
        (resources.subscription, f"{resources.table}-missing", "cannot read Bigtable table"),
    ]
    for subscription, table, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "mab_service", "learn", "--events", f"pubsub:{subscription}"]
            + ["--posteriors", f"bigtable:{table}"],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ.copy(),
        )
        assert done.returncode == 3, done.stderr
        assert f"mab-service learn: {message}" in done.stderr


def test_a_failed_step_is_retried_and_loses_nothing(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand
) -> None:
    from google.api_core import exceptions

    resources = make_resources(ack_deadline_s=10)  # the window whose ack failed comes back after it
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 50, truth))

    async def learn() -> Learner:
        learner = Learner(resources.subscription, str(resources.table), window_s=0.05)
        await learner.start()
        real_ack = learner._subscriber.acknowledge
        failures = [exceptions.ServiceUnavailable("Pub/Sub is away")]

        async def flaky_ack(**request: Any) -> Any:
            if failures:
                raise failures.pop()  # the first window is written but its ack fails: it comes back
            return await real_ack(**request)

        learner._subscriber.acknowledge = flaky_ack
        stop = asyncio.Event()
        task = asyncio.create_task(learner.run(stop, log_every_s=60))
        try:
            deadline = time.monotonic() + 60
            while published(learner) < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await task
            await learner.close()
        return learner

    learner = asyncio.run(learn())
    assert learner.stats.errors == 1
    assert_exact(str(resources.table), truth)


def test_a_window_bigtable_refuses_is_retried_with_its_messages_held(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bigtable away for longer than the subscription's delivery attempts would last if each failed write gave its
    window back: the learner keeps the messages (extending their deadline) and retries the writes, so none is
    redelivered, none reaches the dead-letter topic, and the counts are exact once Bigtable is back."""
    from google.cloud.pubsub_v1 import SubscriberClient

    resources = make_resources(ack_deadline_s=10)
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 50, truth))
    proxy = Proxy(int(bigtable_emulator.host.rpartition(":")[2]))
    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", proxy.host)

    async def learn() -> Learner:
        learner = Learner(resources.subscription, str(resources.table), window_s=0.05)
        await learner.start()
        proxy.down()
        stop = asyncio.Event()
        task = asyncio.create_task(learner.run(stop, log_every_s=60))
        try:
            deadline = time.monotonic() + 60
            while learner.stats.failed_windows <= 2 * resources.max_delivery_attempts:
                assert time.monotonic() < deadline, learner.stats
                await asyncio.sleep(0.1)
            proxy.up()
            deadline = time.monotonic() + 120
            while published(learner) < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await task
            await learner.close()
        return learner

    try:
        learner = asyncio.run(learn())
    finally:
        proxy.close()
    monkeypatch.undo()
    assert published(learner) == sent
    assert_exact(str(resources.table), truth)
    with SubscriberClient() as subscriber:
        dead = subscriber.pull(subscription=resources.dead_letter_subscription, max_messages=10, timeout=5)
    assert list(dead.received_messages) == []


def test_a_counts_entry_is_the_clients_own_entry_in_bytes() -> None:
    pytest.importorskip("google.cloud.bigtable")
    from google.cloud.bigtable.data import DeleteRangeFromColumn, RowMutationEntry, SetCell
    from google.cloud.bigtable_v2.types import bigtable

    table = "projects/p/instances/i/tables/t"
    ts = 1_765_000_000_123_000
    stamp = bigtable_requests.varint(ts)
    older = bigtable_requests.older_than(stamp)
    ours = bigtable_requests.table_field(table) + b"".join(
        bigtable_requests.counts_entry(key, i, r, stamp, older)
        for key, i, r in ((b"arm-1", 7, 2_250_000), (b"b", 0, 0))
    )
    theirs = bigtable.MutateRowsRequest(
        table_name=table,
        entries=[
            RowMutationEntry(
                key,
                [
                    DeleteRangeFromColumn("n", b"i", end_timestamp_micros=ts),
                    DeleteRangeFromColumn("n", b"r", end_timestamp_micros=ts),
                    SetCell("n", b"i", i.to_bytes(8, "big"), ts),
                    SetCell("n", b"r", r.to_bytes(8, "big"), ts),
                ],
            )._to_pb()
            for key, i, r in ((b"arm-1", 7, 2_250_000), (b"b", 0, 0))
        ],
    )
    assert bigtable.MutateRowsRequest.deserialize(ours) == theirs


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_learn_serves_its_metrics(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand, tmp_path: Path
) -> None:
    resources = make_resources()
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 40, truth))
    port = unused_tcp_port()
    learner = start_learner(resources, tmp_path / "learner.log", metrics_port=port)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                    text = answer.read().decode()
            except OSError:
                text = ""
            # Published without shards to a table of 16: each message is forwarded to the 16 shard topics, whose
            # parts are counted; all acknowledged.
            if text and metric(text, "mab_learner_messages_total") >= sent * 17:
                break
            time.sleep(0.2)
        assert text, (tmp_path / "learner.log").read_text()
        assert metric(text, "mab_learner_messages_total") == sent * 17
        assert metric(text, "mab_learner_forwarded_total") == sent
        assert metric(text, "mab_learner_impressions_total") == sum(truth.impressions.values())
        assert metric(text, "mab_learner_rewards_total") == truth.reward_count
        assert metric(text, "mab_learner_duplicates_total") > 0
        # A commit per shard and window; a MutateRows after each that changed arms (a forwarded part may hold none).
        assert 0 < metric(text, "mab_learner_writes_total") <= metric(text, "mab_learner_commits_total")
        for name in ("malformed", "failed_windows", "errors"):
            assert metric(text, f"mab_learner_{name}_total") == 0
        assert metric(text, "mab_learner_window_seconds_count") == metric(text, "mab_learner_windows_total")
        assert metric(text, "mab_learner_lag_seconds_count") == sent * 17
        assert 0 < metric(text, "mab_learner_lag_seconds_sum") / sent < 60 * 17
        assert abs(metric(text, "mab_learner_last_ack_timestamp_seconds") - time.time()) < 60
    finally:
        learner.terminate()
        try:
            assert learner.wait(timeout=15) == 0, (tmp_path / "learner.log").read_text()[-2000:]
        finally:
            if learner.poll() is None:
                learner.kill()
                learner.wait()


def test_writes_follow_the_clients_channel_when_it_is_replaced(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand
) -> None:
    resources = make_resources()
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 30, truth))

    async def learn() -> Learner:
        learner = Learner(resources.subscription, str(resources.table), window_s=0.05, max_messages=5)
        await learner.start()
        try:
            await learner.step(wait_s=2.0)
            # What the client does every ~40 minutes: a new channel in, the old one closed after a grace period.
            channel = learner._client.transport.grpc_channel
            old = channel.swap_channel(channel.create_channel())
            learner._client._invalidate_channel_stubs()  # the client's own calls (the commits) on the new one
            await old.close()
            while published(learner) < sent:
                assert await learner.step(wait_s=2.0) > 0
        finally:
            await learner.close()
        return learner

    learner = asyncio.run(learn())
    assert learner.stats.failed_windows == 0
    assert_exact(str(resources.table), truth)


def test_an_applied_set_is_a_low_water_mark_and_the_ranges_above_it(rand: Rand) -> None:
    applied = windows.Applied()
    for seq in (1, 2, 5, 7, 6, 3):
        applied.add(seq)
    assert (applied.low, applied.ranges) == (3, [[5, 7]])
    assert [seq in applied for seq in range(1, 9)] == [True, True, True, False, True, True, True, False]
    applied.add(4)  # the gap fills: one number again
    assert (applied.low, applied.ranges) == (7, [])
    # Any order, with repeats: the set is exactly the numbers added, as few ranges as they make.
    seqs = rand.gen.permutation(np.arange(1, 400))[:300].tolist()
    applied = windows.Applied()
    for seq in seqs + seqs[:50]:
        applied.add(seq)
    assert [seq in applied for seq in range(1, 500)] == [seq in set(seqs) for seq in range(1, 500)]
    again = windows.Applied.decode(applied.encode())
    assert (again.low, again.ranges) == (applied.low, applied.ranges)
    for bad in (b"not json", b"[]", b"[1, 2]", b"[1, 2, 3]", b"[0, 5, 4]", b"[0, 2, 5, 5, 9]", b"[-1]", b'["1"]'):
        with pytest.raises(ValueError):
            windows.Applied.decode(bad)


async def table_rows(table: str) -> list[Any]:
    from google.cloud.bigtable.data import ReadRowsQuery

    from mab_service.features.bigtable import data_client

    path = TablePath.parse(table)
    client = data_client(path.project)
    try:
        return list(await client.get_table(path.instance, path.table).read_rows(ReadRowsQuery(), operation_timeout=60))
    finally:
        await client.close()


def test_a_learner_stopped_between_commit_and_apply_then_a_late_write_of_its_window(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, rand: Rand
) -> None:
    """A learner commits a window on its shard's row and stops before writing the arm rows: the next holder writes
    that window first, counts its redelivered messages once (the applied sets), and the old learner's late write
    of its window (a zombie, its lease expired) is never what readers see. Every arm row holds exactly its two
    count cells, and the shard row a small state per live publisher stream."""
    from mab_service.fleet.schema import APPLIED_PREFIX, LEASE_ROW_PREFIX

    resources = make_resources(shards=1)
    truth = Truth()
    sent = asyncio.run(publish(resources, rand, 100, truth, shards=1))
    ttl_s = 1.5

    async def learn() -> None:
        a = Learner(resources.subscription, str(resources.table), window_s=0.2, lease_ttl_s=ttl_s)
        await a.start()
        real_bulk = a._bulk

        async def stopped(entries: list[bytes]) -> None:
            raise RuntimeError("stopped between commit and apply")

        a._bulk = stopped  # type: ignore[method-assign]
        a._stop.set()  # a stopping learner gives its window back rather than retrying it
        while a.stats.commits == 0:
            await a.step(wait_s=1.0)
        state = a._states[0]
        committed = a.stats.impressions
        assert committed > 0 and state.unapplied and sum((await read_counts(str(resources.table)))[0]) == 0
        # a stops renewing, as if killed; b takes the shard once the lease expired, writing a's window first.
        assert a._leases is not None
        a._leases.cancel()
        a._follow(set())  # and stops pulling (what it pulled is given back)
        b = Learner(resources.subscription, str(resources.table), window_s=0.05, lease_ttl_s=ttl_s)
        await b.start()
        deadline = time.monotonic() + 10 * ttl_s
        while b.held != {0}:
            assert time.monotonic() < deadline, b.held
            await asyncio.sleep(0.1)
        assert b.stats.windows_reapplied == 1
        assert sum((await read_counts(str(resources.table)))[0]) == committed
        try:
            deadline, idle = time.monotonic() + 60, 0
            while idle < 2:  # two empty windows: drained
                assert time.monotonic() < deadline, (a.stats, b.stats)
                idle = idle + 1 if await b.step(wait_s=1.0) == 0 else 0
            assert a.stats.messages + b.stats.messages - a.stats.forwarded - b.stats.forwarded == sent
            assert b.stats.duplicates >= committed  # a's window, delivered again, skipped
            impressions, rewards = await read_counts(str(resources.table))
            assert (impressions, rewards) == truth.expected()
            rows = await table_rows(str(resources.table))
            arms = [row for row in rows if not row.row_key.startswith(b"\x00")]
            assert len(arms) == len(ARMS) and {len(row.cells) for row in arms} == {2}
            (shard_row,) = [row for row in rows if row.row_key.startswith(LEASE_ROW_PREFIX)]
            streams = [cell.qualifier for cell in shard_row.cells if cell.qualifier.startswith(APPLIED_PREFIX)]
            assert len(streams) == 2  # the sink's stream of shard 0, and the fleet's topic's messages forwarded
            # The zombie's late write of its window: an older version, never the newest cell.
            await real_bulk(state.unapplied)
            assert await read_counts(str(resources.table)) == (impressions, rewards)
            # Streams unheard of past the retention (+1 h; here at once) leave the shard row at the next commit.
            b.forget_after_s = 0.0
            sink = PubSubSink(resources.topic, max_delay_s=0.001)
            sink.start(1)
            sink.event("ev-last", [ARMS[0]], time.time())
            await sink.close()
            truth.impressions[ARMS[0]] += 1
            while (await b.step(wait_s=2.0)) == 0:
                pass
            rows = await table_rows(str(resources.table))
            (shard_row,) = [row for row in rows if row.row_key.startswith(LEASE_ROW_PREFIX)]
            streams = [cell.qualifier for cell in shard_row.cells if cell.qualifier.startswith(APPLIED_PREFIX)]
            assert streams == [APPLIED_PREFIX + f"{sink.publisher_id}.0".encode()]
            assert await read_counts(str(resources.table)) == truth.expected()
            # Given back right after a commit, the shard is free at once: its row's other cells are no lease.
            await b._release([0])
            c = Learner(resources.subscription, str(resources.table), window_s=0.05, lease_ttl_s=ttl_s)
            await c.start()
            try:
                assert c.held == {0} and c.stats.windows_reapplied == 1
            finally:
                await c.close()
        finally:
            a.held.clear()  # a is "dead": its close must not give back what b holds
            await a.close()
            await b.close()

    asyncio.run(learn())
