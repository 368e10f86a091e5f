"""The fleet with a half-life: forward-decayed sums from Pub/Sub to Bigtable, the fan-out and the node tables, checked
against a numpy reference that recomputes the weighted sums from the messages the replicas published."""

from __future__ import annotations

import asyncio
import math
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from mab_service.fleet import schema, windows
from mab_service.fleet.learner import Learner, LearnerError, parse_decayed
from mab_service.fleet.sink import FORMAT_VERSION, shard_topic
from mab_service.fleet.windows import DecayedPlan, ShardState, decode_decayed_window, encode_decayed_window, merged
from mab_service.ids import pair_key
from tests.conftest import wait_until
from tests.fleet.conftest import Emulator
from tests.fleet.test_fleet import ARMS, JSON, SHARDS, Fleet, fleet  # noqa: F401 (the fixture)
from tests.fleet.test_learner import make_resources

H = 4.0
SEGMENT = "fr"


# -- the numbers, without emulators ---------------------------------------------------------------------------------


def test_sums_move_between_epochs_exactly_and_read_as_the_weighted_counts() -> None:
    rand = random.Random(7)
    now = 1.8e9
    times = sorted(now - rand.uniform(0, 3000 * H) for _ in range(2000))
    count: tuple[int, float, float] | None = None
    for t in times:
        epoch = schema.epoch_of(t, H)
        count = merged(count, epoch, schema.weight(t, epoch, H), 0.5 * schema.weight(t, epoch, H))
    assert count is not None
    epoch, shown, got = count
    assert epoch == schema.epoch_of(times[-1], H)
    want = sum(2.0 ** ((t - now) / H) for t in times)
    read = shown * schema.read_scale(epoch, H, now)
    assert math.isclose(read, want, rel_tol=1e-12)
    assert math.isclose(got * schema.read_scale(epoch, H, now), 0.5 * want, rel_tol=1e-12)
    assert schema.read_decayed(schema.decayed_cell(*count)) == count
    for bad in (schema.decayed_cell(-1, 1.0, 1.0), schema.decayed_cell(1, math.nan, 0.0), b"\0" * 16):
        assert schema.read_decayed(bad) is None
    ids, sums = decode_decayed_window(encode_decayed_window(5, ["a", "b"], [count, (3, 0.0, 1.5)])[0], 5)
    assert ids == ["a", "b"] and sums == [count, (3, 0.0, 1.5)]  # bit for bit through the shard row's window
    integers = windows.encode_window(6, ["a"], [3], [1_000_000])[0]  # a table switched to a half-life
    assert decode_decayed_window(integers, 6) == ([], [])
    with pytest.raises(ValueError, match="version 6 under version 7"):
        decode_decayed_window(encode_decayed_window(6, ["a"], [count])[0], 7)


def test_a_message_is_weighed_by_its_records_times_and_a_bad_time_refuses_it_whole() -> None:
    now = time.time()
    records = [["a", now - 2, [ARMS[0], ARMS[1]]], ["a", now - 1, [ARMS[0]], SEGMENT], ["r", now, "e1", ARMS[0], 0.5]]
    parsed = parse_decayed(orjson.dumps(records), H, now)
    assert parsed is not None and parsed.impressions == 3 and parsed.rewards == 1 and not parsed.invalid

    def read(row: str) -> tuple[float, float]:
        epoch, shown, got = parsed.sums[row]
        scale = schema.read_scale(epoch, H, now)
        return shown * scale, got * scale

    np.testing.assert_allclose(read(ARMS[0]), (2 ** (-2 / H) + 2 ** (-1 / H), 0.5), rtol=1e-12)
    np.testing.assert_allclose(read(schema.segment_row(SEGMENT, ARMS[0])), (2 ** (-1 / H), 0.0), rtol=1e-12)
    state = ShardState(0, 0, 0)
    plan = DecayedPlan(state, [("p.0", 1, parsed.sums, 3, 1), ("p.0", 1, parsed.sums, 3, 1)])
    assert plan.duplicates == 4 and plan.shown == parsed.sums  # the second delivery is in the applied set
    for t in (1e300, -1.0, 0, now + 3600, "soon", None):
        assert parse_decayed(orjson.dumps([["a", now, [ARMS[0]]], ["a", t, [ARMS[1]]]]), H, now) is None, t
    assert parse_decayed(b'[["a", NaN, ["arm-00"]]]', H, now) is None
    assert parse_decayed(b'[["a", 1e999, ["arm-00"]]]', H, now) is None
    skipped = parse_decayed(orjson.dumps([["i", 1, {ARMS[0]: 1}], ["a", now, ["tab\there"]]]), H, now)
    assert skipped is not None and skipped.invalid == Counter(record=1, id=1) and not skipped.sums


def test_raise_decayed_takes_the_larger_sum_in_the_counts_own_frame_across_rebases() -> None:
    from mab_service.learning._arms import ArmTable

    now = 1.8e9
    arms = ArmTable.create(mmap.mmap(-1, ArmTable.bytes_needed(8, 4096)), 8, 4096, 0, 0, H, now - 100)
    times = [now - 40, now - 3, now - 1]
    sums: list[tuple[int, float, float]] = []
    count = None
    for t in times:  # the fleet's readings of one arm as its sums grow
        epoch = schema.epoch_of(t, H)
        count = merged(count, epoch, schema.weight(t, epoch, H), 0.25 * schema.weight(t, epoch, H))
        sums.append(count)
    for reading in [*sums[::-1], *sums, sums[0]]:  # any order, twice: the newest (largest) wins
        marks = [schema.landmark(reading[0], H)]
        assert arms.raise_decayed(["a"], [reading[1]], [reading[2]], marks, 1.0, 1.0) == 0
    want = sum(2.0 ** ((t - now) / H) for t in times)
    found = arms.get("a", now)
    assert found is not None
    np.testing.assert_allclose(found[2:4], (want, 0.25 * want), rtol=1e-12)
    for step in range(1, 4):  # the node table's landmark moves on under the sums: they read the same
        arms.rebase(now - 100 + 200 * H * step)
        found = arms.get("a", now)
        assert found is not None
        np.testing.assert_allclose(found[2:4], (want, 0.25 * want), rtol=1e-12)
    plain = ArmTable.create(mmap.mmap(-1, ArmTable.bytes_needed(8, 4096)), 8, 4096)
    with pytest.raises(ValueError, match="needs a table with a half-life"):
        plain.raise_decayed(["a"], [1.0], [0.0], [0.0], 1.0, 1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        arms.raise_decayed(["a"], [math.inf], [0.0], [0.0], 1.0, 1.0)
    with pytest.raises(ValueError, match="landmarks finite"):
        arms.raise_decayed(["a"], [1.0], [0.0], [math.nan], 1.0, 1.0)


def test_a_decayed_counts_message_round_trips_and_bad_sums_are_refused() -> None:
    from mab_service.fleet.fanout import CountsMessage

    message = CountsMessage("l-1", 3, 1.5, ["a", "b"], [1.25, 0.0], [0.5, 0.0], [7, 6])
    assert CountsMessage.decode(message.encode()) == message
    head = b'{"l": "l", "q": 0, "t0": 0, "ids": ["a"], '
    for bad in (
        b'"i": [1.0], "r": [0.0], "e": [-1]}',  # an epoch below 0
        b'"i": [-1.0], "r": [0.0], "e": [1]}',  # a negative sum
        b'"i": [1.0], "r": [0.0], "e": [1, 2]}',  # an epoch too many
        b'"i": [1.5], "r": [0.0]}',  # sums without epochs: not integer counts either
    ):
        assert CountsMessage.decode(head + bad) is None, bad


# -- against the emulators -----------------------------------------------------------------------------------------


def test_a_learner_of_another_half_life_is_refused_and_messages_of_another_go_to_dead_letters(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator
) -> None:
    """The first learner records its half-life in the table; one with another (or none) does not start. Messages
    without this half-life, or with a time that is not a number in range, are nacked until Pub/Sub dead-letters
    them; the good message beside them counts, weighed by its time."""
    from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient

    resources = make_resources(shards=1)
    topic = shard_topic(resources.topic, 0)
    now = time.time()
    good = orjson.dumps([["a", now, [ARMS[0]]]])
    h = repr(H)
    cases: list[tuple[bytes, dict[str, str]]] = [
        (orjson.dumps([["a", 1e300, [ARMS[1]]]]), {"v": FORMAT_VERSION, "k": "p.0/2", "s": "0", "h": h}),
        (b'[["a", 1e999, ["arm-01"]]]', {"v": FORMAT_VERSION, "k": "p.0/3", "s": "0", "h": h}),
        (
            orjson.dumps([["a", now, [ARMS[1]]], ["r", -5, "e", ARMS[1], 1.0]]),
            {"v": FORMAT_VERSION, "k": "p.0/4", "s": "0", "h": h},
        ),
        (good, {"v": FORMAT_VERSION, "k": "p.0/5", "s": "0"}),  # no half-life: a replica started without one
        (good, {"v": FORMAT_VERSION, "k": "p.0/6", "s": "0", "h": "8.0"}),  # another half-life
    ]

    async def learn() -> Learner:
        learner = Learner(resources.subscription, str(resources.table), window_s=0.1, half_life_s=H)
        await learner.start()
        for other in (0.0, 2 * H):
            refused = Learner(resources.subscription, str(resources.table), half_life_s=other)
            with pytest.raises(LearnerError, match=r"the fleet's half-life is 4\.0 s"):
                await refused.start()
            await refused.close()
        with PublisherClient() as publisher:
            for data, attributes in cases:
                publisher.publish(topic, data, **attributes).result(timeout=30)
            publisher.publish(topic, good, v=FORMAT_VERSION, k="p.0/1", s="0", h=h).result(timeout=30)
            publisher.stop()
        try:
            deadline = time.monotonic() + 90
            attempts = resources.max_delivery_attempts
            while time.monotonic() < deadline:
                if await learner.step(wait_s=2.0) == 0 and learner.stats.malformed >= attempts * len(cases):
                    break
        finally:
            await learner.close()
        return learner

    learner = asyncio.run(learn())
    assert learner.stats.messages == 1 and learner.stats.impressions == 1
    assert learner.stats.malformed == resources.max_delivery_attempts * len(cases)

    async def read() -> Any:
        from mab_service.features.bigtable import BigtableSource

        source = BigtableSource(str(resources.table), 1.0, 1.0, timeout_s=30, half_life_s=H)
        await source.start()
        try:
            before = time.time()
            counts = await source.read_counts([ARMS[0], ARMS[1]])
            return counts, before, time.time()
        finally:
            await source.close()

    counts, before, after = asyncio.run(read())
    assert counts.rewards.tolist() == [0.0, 0.0] and counts.impressions[1] == 0.0
    assert 2 ** ((now - after) / H) * (1 - 1e-12) <= counts.impressions[0] <= 2 ** ((now - before) / H) * (1 + 1e-12)
    dead = []
    with SubscriberClient() as subscriber:
        deadline = time.monotonic() + 60
        while len(dead) < len(cases) and time.monotonic() < deadline:
            response = subscriber.pull(subscription=resources.dead_letter_subscription, max_messages=100, timeout=5)
            dead += [m.message.data for m in response.received_messages]
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=resources.dead_letter_subscription,
                    ack_ids=[m.ack_id for m in response.received_messages],
                )
    assert sorted(dead) == sorted(data for data, _ in cases)


class Published:
    """Every message the replicas published, read from subscriptions of the test's own on the shard topics."""

    def __init__(self, made: Fleet) -> None:
        self.subscriptions = [f"{made.subscription}-reference-{shard}" for shard in range(SHARDS)]
        self.messages: dict[str, Any] = {}
        """By key: a message published twice is the same message."""
        from google.cloud.pubsub_v1 import SubscriberClient

        with SubscriberClient() as subscriber:
            for shard, name in enumerate(self.subscriptions):
                subscriber.create_subscription(name=name, topic=shard_topic(made.topic, shard), ack_deadline_seconds=60)

    def pull(self) -> None:
        from google.cloud.pubsub_v1 import SubscriberClient

        with SubscriberClient() as subscriber:
            for name in self.subscriptions:
                while True:
                    response = subscriber.pull(subscription=name, max_messages=1000, timeout=10)
                    if not response.received_messages:
                        break
                    for m in response.received_messages:
                        assert m.message.attributes["h"] == repr(H)
                        self.messages[m.message.attributes["k"]] = orjson.loads(m.message.data)
                    subscriber.acknowledge(subscription=name, ack_ids=[m.ack_id for m in response.received_messages])

    def reference(self) -> dict[str, tuple[list[float], list[float], list[float]]]:
        """Per node key (arm, or ``pair_key`` within a segment): the times and amounts of its impressions and
        rewards, ``(impression times, reward times, reward values)``."""
        out: defaultdict[str, tuple[list[float], list[float], list[float]]] = defaultdict(lambda: ([], [], []))
        for records in self.messages.values():
            for record in records:
                if record[0] == "a":
                    for id_ in record[2]:
                        out[id_][0].append(record[1])
                        if len(record) > 3:
                            out[pair_key(record[3], id_)][0].append(record[1])
                else:
                    assert record[0] == "r"
                    keys = [record[3]] + ([pair_key(record[5], record[3])] if len(record) > 5 else [])
                    for key in keys:
                        out[key][1].append(record[1])
                        out[key][2].append(record[4])
        return dict(out)


def weighted(times: list[float], values: list[float] | None, now: float) -> float:
    t = np.asarray(times, np.float64)
    v = np.ones_like(t) if values is None else np.asarray(values, np.float64)
    return float(np.sum(v * np.exp2((t - now) / H)))


@pytest.fixture
def half_life_fleet(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:  # noqa: F811 (imported)
    """The fleet of ``test_fleet``, with this process's Pub/Sub clients on its emulator."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", fleet.pubsub.host)
    yield fleet


def test_two_replicas_and_a_killed_learner_decay_exactly_as_the_reference(half_life_fleet: Fleet) -> None:
    """Answers on two replicas with ``--half-life-s``, each reward posted to the other replica and repeated to the
    first (a duplicate); the learner killed with SIGKILL mid-run and another started. ``/arms`` (global and within a
    segment) and both node tables hold the sums numpy recomputes from the published messages' times, to 1e-9."""
    made = half_life_fleet
    published = Published(made)
    args = ("--half-life-s", str(H), "--event-propagation-s", "5")
    urls = [made.replica(name, *args) for name in ("replica-a", "replica-b")]
    learner = made.learner("learner-0", "--half-life-s", str(H))
    rand = random.Random(11)
    answered: Counter[str] = Counter()
    rewarded: defaultdict[str, float] = defaultdict(float)

    async def decide(client: httpx.AsyncClient, i: int) -> None:
        body: dict[str, object] = {"user_id": f"u{i}", "candidates": rand.sample(ARMS, 8), "top_k": 3}
        if i % 2:
            body["segment"] = SEGMENT
        answer = await client.post(urls[i % 2] + "/predict", json=body)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        answered.update(got["ids"])
        for id_ in got["ids"][:2]:
            value = rand.choice([0.0, 0.5, 1.0])
            payload = {"event_id": got["event_id"], "id": id_, "reward": value}
            first = await client.post(urls[(i + 1) % 2] + "/reward", json=payload)
            assert first.status_code == 202, first.text
            rewarded[id_] += value
            again = await client.post(urls[i % 2] + "/reward", json=payload)
            assert (again.status_code, again.json()) == (200, {"status": "duplicate"}), again.text

    async def traffic(start: int, n: int) -> None:
        async with httpx.AsyncClient(timeout=30, headers=JSON) as client:
            limit = asyncio.Semaphore(8)

            async def one(i: int) -> None:
                async with limit:
                    await decide(client, i)

            await asyncio.gather(*(one(i) for i in range(start, start + n)))

    asyncio.run(traffic(0, 120))
    time.sleep(1.0)
    os.killpg(learner.pid, signal.SIGKILL)  # mid-run: its last window may be committed and not yet applied
    learner.wait()
    asyncio.run(traffic(120, 60))
    made.learner("learner-1", "--half-life-s", str(H))  # takes the shards once the dead one's leases expire
    asyncio.run(traffic(180, 120))
    published.pull()
    reference = published.reference()
    # The messages hold exactly what was answered and rewarded (each reward once), at times within the run.
    assert {k: len(v[0]) for k, v in reference.items() if "\x00" not in k} == dict(answered)
    for arm, value in rewarded.items():
        assert math.isclose(sum(reference[arm][2]), value, abs_tol=1e-9)

    def want(key: str, now: float) -> tuple[float, float]:
        shown, times, values = reference.get(key, ([], [], []))
        return weighted(shown, None, now), weighted(times, values, now)

    def tables() -> list[Any]:
        from mab_service.learning._arms import ArmTable

        found = []
        for proc in made.procs[:2]:
            (path,) = Path("/dev/shm").glob(f"mab-service-{proc.pid}-*-arms")
            fd = os.open(path, os.O_RDWR)
            try:
                found.append(ArmTable.attach(mmap.mmap(fd, 0)))
            finally:
                os.close(fd)
        return found

    keys = [*ARMS, *(pair_key(SEGMENT, arm) for arm in ARMS)]
    misses: dict[str, Any] = {}

    def node_tables_exact() -> bool:
        now = time.time()
        misses.clear()
        for n, arms in enumerate(tables()):
            for key in keys:
                found = arms.get(key, now)
                got = (0.0, 0.0) if found is None else (found[2], min(found[3], found[2]))
                shown, rewards = want(key, now)
                if not np.allclose(got, (shown, min(rewards, shown)), rtol=1e-9, atol=0):
                    misses[f"{n}:{key!r}"] = (got, (shown, rewards))
        return not misses

    assert wait_until(node_tables_exact, timeout_s=60, interval_s=0.5), misses

    with httpx.Client(timeout=30) as client:
        for url in urls:
            for params in ({"top": len(ARMS), "order": "impressions"}, {"top": 5, "segment": SEGMENT}):
                before = time.time()
                answer = client.get(url + "/arms", params=params)
                after = time.time()
                assert answer.status_code == 200, answer.text
                arms = answer.json()["arms"]
                assert arms and all(isinstance(a["impressions"], float) for a in arms)
                # One read at one instant: every arm's sums are the reference's at that instant. Take it from the
                # first arm (it lies within the request), then hold every count to it.
                prefix = pair_key(SEGMENT, "") if "segment" in params else ""
                first = arms[0]
                at = before + H * math.log2(want(prefix + first["id"], before)[0] / first["impressions"])
                assert before - 1e-3 <= at <= after + 1e-3
                for arm in arms:
                    shown, rewards = want(prefix + arm["id"], at)
                    assert math.isclose(arm["impressions"], shown, rel_tol=1e-9), (arm, shown)
                    assert math.isclose(arm["rewards"], rewards, rel_tol=1e-9, abs_tol=1e-300), (arm, rewards)
            for arm in ARMS[:5]:
                before = time.time()
                body = client.get(f"{url}/arms/{arm}").json()
                after = time.time()
                early, late = want(arm, before)[0], want(arm, after)[0]
                assert late * (1 - 1e-9) <= body["impressions"] <= early * (1 + 1e-9)


def test_a_replica_of_another_half_life_exits_saying_so(half_life_fleet: Fleet) -> None:
    made = half_life_fleet
    learner = made.learner("learner-0", "--half-life-s", str(H))

    def recorded() -> bool:
        assert learner.poll() is None
        return "learning from" in (made.tmp / "learner-0.log").read_text()

    assert wait_until(recorded, timeout_s=60, interval_s=0.2)
    for other in ("8", "0"):
        done = subprocess.run(
            [sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", "0"]
            + ["--features", f"bigtable:{made.table}", "--events", f"pubsub:{made.topic}"]
            + ["--state-dir", str(made.tmp / f"other-{other}"), "--half-life-s", other],
            env=made.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0
        assert f"the fleet's half-life is {H!r} s" in done.stderr and f"--half-life-s {H!r}" in done.stderr
        assert "Traceback" not in done.stderr
