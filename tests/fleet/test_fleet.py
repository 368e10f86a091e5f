"""The fleet end to end: serving replicas, learners, Google's Pub/Sub and Bigtable emulators, and their faults.

Replicas (``mab-service serve --features bigtable:... --events pubsub:...``) and learners (``mab-service learn``) are
real processes on loopback ports. They reach each emulator through a ``Proxy``, so that a test can take an engine
away from them (every connection cut, new ones refused) and give it back, or restart the emulator behind it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pytest

from mab_service.fleet.sink import shard_of
from tests.conftest import unused_tcp_port, wait_until
from tests.fleet.conftest import Emulator, _missing, stop
from tests.fleet.proxy import Proxy

ARMS = [f"arm-{i:02d}" for i in range(30)]
JSON = {"content-type": "application/json"}
#: Arm shards of the fleet under test: two, so that the two learners hold one each and answers are split.
SHARDS = 2
#: Arms of shard 0: an answer of these is one message, as it was before shards.
SHARD_0 = [arm for arm in ARMS if shard_of(arm, SHARDS) == 0]


def start_pubsub(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A Pub/Sub emulator of the test's own (so it can be restarted) on a free port, once it listens."""
    port = unused_tcp_port()
    with log.open("ab") as out:  # the child keeps its own copy
        proc = subprocess.Popen(
            ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port=127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    if not wait_until(listening, timeout_s=60, interval_s=0.1):
        stop(proc)
        pytest.fail(f"the Pub/Sub emulator did not listen within 60 s (log: {log})")
    return proc, port


@dataclass
class Fleet:
    """The engines, their proxies, and the fleet's names; replicas and learners started by the test."""

    tmp: Path
    topic: str
    subscription: str
    table: str
    bigtable: Proxy
    pubsub: Proxy
    pubsub_proc: subprocess.Popen[bytes]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def env(self, pubsub_host: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAB_")}
        env["BIGTABLE_EMULATOR_HOST"] = self.bigtable.host
        env["PUBSUB_EMULATOR_HOST"] = pubsub_host or self.pubsub.host
        return env

    def setup(self, pubsub_host: str | None = None) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "mab_service", "setup", "--events", f"pubsub:{self.topic}"]
            + ["--subscription", self.subscription, "--posteriors", f"bigtable:{self.table}"]
            + ["--shards", str(SHARDS)],
            env=self.env(pubsub_host),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    def log(self, name: str) -> IO[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        self.logs.append(log)
        return log

    def replica(self, name: str, *args: str) -> str:
        """Start a replica and wait until it is ready; its URL."""
        port = unused_tcp_port()
        log = self.log(name)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port)]
            + ["--features", f"bigtable:{self.table}", "--events", f"pubsub:{self.topic}"]
            + ["--state-dir", str(self.tmp / name), "--max-held-members", "1000000", *args],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, f"replica {name} exited; see {self.tmp / name}.log"
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(ready, timeout_s=60, interval_s=0.1), f"replica {name} not ready"
        return url

    def learner(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mab_service", "learn", "--events", f"pubsub:{self.subscription}"]
            + [
                "--posteriors",
                f"bigtable:{self.table}",
                "--window-s",
                "0.1",
                "--log-every-s",
                "2",
                "--metrics-port",
                "0",
                "--lease-ttl-s",
                "2",
                *args,
            ],
            env=self.env(),
            stdout=self.log(name),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc


@pytest.fixture
def fleet(tmp_path: Path, bigtable_emulator: Emulator) -> Iterator[Fleet]:
    reason = _missing("pubsub", "google.cloud.pubsub_v1", "google-cloud-pubsub")
    if reason:
        pytest.skip(reason)
    proc, port = start_pubsub(tmp_path / "pubsub.log")
    tag = uuid.uuid4().hex[:8]
    bigtable = Proxy(int(bigtable_emulator.host.rpartition(":")[2]))
    pubsub = Proxy(port)
    made = Fleet(
        tmp_path,
        f"projects/fleet/topics/events-{tag}",
        f"projects/fleet/subscriptions/learners-{tag}",
        f"projects/fleet/instances/mab/tables/faults-{tag}",
        bigtable,
        pubsub,
        proc,
    )
    made.setup()
    try:
        yield made
    finally:
        for started in made.procs:
            if started.poll() is None:
                os.killpg(started.pid, signal.SIGTERM)
        for started in made.procs:
            try:
                started.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(started.pid, signal.SIGKILL)
                started.wait()
        stop(made.pubsub_proc)
        bigtable.close()
        pubsub.close()
        for log in made.logs:
            log.close()


@dataclass
class Truth:
    """What the counts must be: every impression answered, every reward answered 202, once."""

    impressions: Counter[str] = field(default_factory=Counter)
    rewards: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    accepted: int = 0
    duplicates: int = 0
    retries: list[tuple[str, str, float, int]] = field(default_factory=list)
    """Rewards answered 503: the client sends them again later."""


class Traffic:
    """Decisions against the replicas, each reward posted to the replica that did not answer, then repeated to the
    one that did."""

    def __init__(self, urls: list[str], truth: Truth, seed: int) -> None:
        self.urls = urls
        self.truth = truth
        self.rand = random.Random(seed)
        self.n = 0

    async def run(self, decisions: int, *, concurrency: int = 32) -> None:
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=30, headers=JSON) as client:

            async def one(i: int) -> None:
                async with limit:
                    await self.decide(client, i)

            start = self.n
            self.n += decisions
            await asyncio.gather(*(one(i) for i in range(start, start + decisions)))

    async def decide(self, client: httpx.AsyncClient, i: int) -> None:
        answering = i % len(self.urls)
        candidates = self.rand.sample(ARMS, 12)
        rewards = [(self.rand.random() < 0.4, self.rand.choice([0.0, 0.25, 1.0])) for _ in range(3)]
        answer = await client.post(
            self.urls[answering] + "/predict", json={"user_id": f"u{i}", "candidates": candidates, "top_k": 3}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        self.truth.impressions.update(body["ids"])
        for id_, (rewarded, value) in zip(body["ids"], rewards):
            if rewarded:
                await self.reward(client, body["event_id"], id_, value, answering)

    async def reward(
        self, client: httpx.AsyncClient, event_id: str, id_: str, value: float, answering: int, retried: bool = False
    ) -> None:
        other = (answering + 1) % len(self.urls)
        payload = {"event_id": event_id, "id": id_, "reward": value}
        first = await client.post(self.urls[other] + "/reward", json=payload)
        if first.status_code == 503:
            assert first.json()["error"] == "events_unavailable", first.text
            self.truth.retries.append((event_id, id_, value, answering))
            return
        if retried and first.status_code == 200:
            # Answered 503 after its claim: the replica kept it and sent it once Pub/Sub was back.
            assert first.json() == {"status": "duplicate"}, first.text
            self.truth.rewards[id_] += value
            self.truth.accepted += 1
            return
        assert first.status_code == 202, first.text
        self.truth.rewards[id_] += value
        self.truth.accepted += 1
        again = await client.post(self.urls[answering] + "/reward", json=payload)
        if again.status_code != 503:
            assert (again.status_code, again.json()) == (200, {"status": "duplicate"}), again.text
            self.truth.duplicates += 1

    async def retry(self) -> None:
        retries, self.truth.retries = self.truth.retries, []
        async with httpx.AsyncClient(timeout=30, headers=JSON) as client:
            for event_id, id_, value, answering in retries:
                await self.reward(client, event_id, id_, value, answering, retried=True)
        assert not self.truth.retries


def counts(url: str) -> dict[str, tuple[int, float]]:
    with httpx.Client(base_url=url, timeout=30) as client:
        got = {}
        for arm in ARMS:
            answer = client.get(f"/arms/{arm}")
            if answer.status_code == 404:
                got[arm] = (0, 0.0)
            else:
                assert answer.status_code == 200, answer.text
                body = answer.json()
                got[arm] = (body["impressions"], round(body["rewards"], 6))
        return got


def expected(truth: Truth) -> dict[str, tuple[int, float]]:
    return {arm: (truth.impressions[arm], round(truth.rewards[arm], 6)) for arm in ARMS}


def table_counts(proc: subprocess.Popen[bytes]) -> dict[str, tuple[int, float]]:
    """The counts in a replica's node arm table (what its answers rank by), mapped from its shared file."""
    import mmap

    from mab_service.learning._arms import ArmTable

    (path,) = Path("/dev/shm").glob(f"mab-service-{proc.pid}-*-arms")
    fd = os.open(path, os.O_RDWR)
    try:
        arms = ArmTable.attach(mmap.mmap(fd, 0))
    finally:
        os.close(fd)
    got = {}
    for arm in ARMS:
        found = arms.get(arm)
        got[arm] = (0, 0.0) if found is None else (found[2], round(found[3], 6))
    return got


def converge(urls: list[str], truth: Truth, timeout_s: float = 90.0) -> None:
    """Wait until every replica's /arms give exactly the truth; fail with the difference if they do not."""
    want = expected(truth)
    last: dict[str, dict[str, tuple[int, float]]] = {}

    def exact() -> bool:
        for url in urls:
            last[url] = counts(url)
        return all(got == want for got in last.values())

    if not wait_until(exact, timeout_s=timeout_s, interval_s=0.5):
        diff = {url: {a: (got[a], want[a]) for a in ARMS if got[a] != want[a]} for url, got in last.items()}
        pytest.fail(f"the replicas' counts did not converge to the truth: (got, want) {diff}")


def test_two_replicas_two_learners_a_killed_learner_and_a_restarted_pubsub_count_exactly(fleet: Fleet) -> None:
    """Thousands of decisions; each reward posted to the other replica and repeated to the first; one learner
    killed with SIGKILL and restarted mid-run; Pub/Sub taken away and its emulator restarted: every replica's
    /arms converge to the exact ground truth."""
    # A reward looks for its event's membership row for up to 1 s by default; on a loaded test machine (two
    # replicas, two learners and both emulators on two cores) a row can take longer to land: wait longer here, as
    # exactness is what is tested.
    args = ("--events-publish-timeout-s", "1", "--event-propagation-s", "5")
    urls = [fleet.replica(name, *args) for name in ("replica-a", "replica-b")]
    learners = [fleet.learner("learner-0"), fleet.learner("learner-1")]
    truth = Truth()
    traffic = Traffic(urls, truth, seed=13)

    asyncio.run(traffic.run(500))
    learners[0].send_signal(signal.SIGKILL)  # mid-run: what it pulled and did not ack comes back
    learners[0].wait()
    asyncio.run(traffic.run(500))
    learners[0] = fleet.learner("learner-0-again")
    asyncio.run(traffic.run(500))
    # Google's emulator keeps messages in memory and forgets them when it stops (Pub/Sub itself never loses a stored
    # message): let the learners catch up before it restarts, so the truth is still what Pub/Sub held.
    converge(urls, truth)

    fleet.pubsub.down()  # Pub/Sub away: replicas keep answered events in their outbox, rewards get 503
    stop(fleet.pubsub_proc)
    asyncio.run(traffic.run(100))
    assert truth.retries, "no reward was refused while Pub/Sub was away"
    fleet.pubsub_proc, port = start_pubsub(fleet.tmp / "pubsub.log")
    fleet.setup(pubsub_host=f"127.0.0.1:{port}")  # the new emulator knows nothing: set it up before it is reached
    fleet.pubsub.up(port)
    asyncio.run(traffic.run(500))
    asyncio.run(traffic.retry())
    converge(urls, truth)
    assert truth.duplicates > 1000 and traffic.n == 2100
    with httpx.Client(timeout=10) as client:
        for url in urls:
            fleet_stats = client.get(url + "/loop").json()["fleet"]
            assert fleet_stats["outbox_messages"] == 0 and fleet_stats["event_rows_pending"] == 0
            assert fleet_stats["records_refused"] == 0
    assert all(learner.poll() is None for learner in learners)
    # The answers' view: each replica's node table, kept by the learners' fan-out, holds the same exact counts; the
    # Pub/Sub restart lost the replicas' subscriptions, and each subscribed again and scanned the table again.
    replicas = fleet.procs[:2]
    assert wait_until(lambda: all(table_counts(p) == expected(truth) for p in replicas), timeout_s=60, interval_s=0.5)
    for url in urls:
        follower = httpx.get(url + "/loop", timeout=10).json()["fleet"]["follower"]
        assert follower["leader"] and follower["messages"] > 0 and follower["resyncs"]["subscription"] >= 1, follower
    # The dashboard's view: the leading arms from the table, on any replica.
    leading = httpx.get(urls[1] + "/arms", params={"top": 3, "order": "impressions"}, timeout=30).json()
    assert leading["total"] == len([a for a in ARMS if truth.impressions[a]]) and not leading["partial"]
    assert [arm["impressions"] for arm in leading["arms"]] == sorted(truth.impressions.values(), reverse=True)[:3]


def _pull_events(subscription: str, host: str, want: int) -> int:
    """Answers on the shards' subscriptions of ``subscription`` (pulled and acked until ``want`` or 30 s), from the
    count each message's sums carry (``["i", answers, {id: n}]``). The test's answers are of 2 ids of one shard
    each (``SHARD_0``), so an answer is in one message."""
    import orjson
    from google.cloud.pubsub_v1 import SubscriberClient

    seen = 0
    deadline = time.monotonic() + 30
    # The client reads the variable when it is made; the session's emulator is what later tests must find in it.
    before = os.environ.get("PUBSUB_EMULATOR_HOST")  # unset when no test of the session started one
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    try:
        subscriber = SubscriberClient()
    finally:
        if before is None:
            del os.environ["PUBSUB_EMULATOR_HOST"]
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = before
    with subscriber:
        while seen < want and time.monotonic() < deadline:
            for shard in range(SHARDS):
                name = f"{subscription}-shard-{shard}"
                response = subscriber.pull(subscription=name, max_messages=100, timeout=2)
                for received in response.received_messages:
                    records = orjson.loads(received.message.data)
                    seen += records[0][1] if records and records[0][0] == "i" else 0
                if response.received_messages:
                    subscriber.acknowledge(subscription=name, ack_ids=[m.ack_id for m in response.received_messages])
    return seen


def test_while_pubsub_is_away_predict_keeps_events_until_the_outbox_is_full_and_reward_is_503(fleet: Fleet) -> None:
    """The written policy (docs/fleet.md): answered events wait in a bounded outbox and are all delivered once
    Pub/Sub is back; past the bound /predict answers 503 events_unavailable; /reward answers 503 throughout."""
    url = fleet.replica("replica", "--events-max-pending", "3", "--events-max-delay-s", "0.001")
    with httpx.Client(base_url=url, timeout=30, headers=JSON) as client:
        first = client.post("/predict", json={"user_id": "u", "candidates": SHARD_0[:5], "top_k": 2}).json()
        fleet.pubsub.down()
        answered, refused = 1, 0
        for i in range(20):
            answer = client.post("/predict", json={"user_id": f"u{i}", "candidates": SHARD_0[:5], "top_k": 2})
            if answer.status_code == 200:
                answered += 1
            else:
                assert (answer.status_code, answer.json()["error"]) == (503, "events_unavailable"), answer.text
                refused += 1
            time.sleep(0.02)
        # An answer takes a message per shard of its ids: 3 pending messages hold one or two answers.
        assert refused > 0 and answered >= 2
        reward = client.post("/reward", json={"event_id": first["event_id"], "id": first["ids"][0], "reward": 1})
        assert (reward.status_code, reward.json()["error"]) == (503, "events_unavailable")
        fleet.pubsub.up()
        assert wait_until(lambda: client.get("/loop").json()["fleet"]["outbox_messages"] == 0, timeout_s=30)
        again = client.post("/reward", json={"event_id": first["event_id"], "id": first["ids"][0], "reward": 1})
        assert again.status_code == 202, again.text
        assert client.get("/loop").json()["fleet"]["records_refused"] == refused + 1  # and the reward
    assert _pull_events(fleet.subscription, fleet.pubsub.host, answered) == answered


def test_a_reward_claimed_and_refused_by_pubsub_is_kept_and_a_retry_is_a_duplicate(fleet: Fleet) -> None:
    """A reward is claimed on its event's row before it is published: if Pub/Sub then does not store it in time the
    answer is 503, the replica keeps the reward in its message and sends it until Pub/Sub does, a retry (on any
    replica) is answered duplicate, and the learner counts it once."""
    a = fleet.replica("a", "--events-publish-timeout-s", "1")
    b = fleet.replica("b")
    learner = fleet.learner("learner")
    with httpx.Client(timeout=30, headers=JSON) as client:
        first = client.post(a + "/predict", json={"user_id": "u", "candidates": SHARD_0[:5], "top_k": 2}).json()
        assert wait_until(lambda: client.get(f"{a}/arms/{first['ids'][0]}").status_code == 200, timeout_s=60)
        fleet.pubsub.down()
        payload = {"event_id": first["event_id"], "id": first["ids"][0], "reward": 1}
        refused = client.post(a + "/reward", json=payload)
        assert (refused.status_code, refused.json()["error"]) == (503, "events_unavailable"), refused.text
        for url in (a, b):
            again = client.post(url + "/reward", json=payload)
            assert (again.status_code, again.json()) == (200, {"status": "duplicate"}), again.text
        fleet.pubsub.up()

        def counted() -> bool:
            arm = client.get(f"{b}/arms/{first['ids'][0]}").json()
            return bool(arm["rewards"] == 1.0)

        assert wait_until(counted, timeout_s=60)
        time.sleep(2)  # and only once
        assert client.get(f"{b}/arms/{first['ids'][0]}").json()["rewards"] == 1.0
    learner.terminate()
    learner.wait(timeout=30)


def test_past_the_outbox_byte_bound_predict_is_503(fleet: Fleet) -> None:
    """``--events-max-pending-bytes`` bounds the outbox whatever its message count: with Pub/Sub away, answers with
    long ids fill 4,000 bytes within a few messages, then /predict answers 503 events_unavailable; once Pub/Sub is
    back every answered event is delivered."""
    url = fleet.replica("replica", "--events-max-pending-bytes", "4000", "--events-max-delay-s", "0.001")
    long_ids = [id_ for id_ in (f"{arm}-{'x' * 200}" for arm in ARMS) if shard_of(id_, SHARDS) == 0][:5]
    with httpx.Client(base_url=url, timeout=30, headers=JSON) as client:
        fleet.pubsub.down()
        answered, refused = 0, 0
        for i in range(30):
            answer = client.post("/predict", json={"user_id": f"u{i}", "candidates": long_ids, "top_k": 3})
            if answer.status_code == 200:
                answered += 1
            else:
                assert (answer.status_code, answer.json()["error"]) == (503, "events_unavailable"), answer.text
                refused += 1
        fleet_stats = client.get("/loop").json()["fleet"]
        assert refused > 0 and 0 < answered < 10, (answered, refused)
        assert fleet_stats["outbox_bytes"] >= 4000 and fleet_stats["records_refused"] == refused
        fleet.pubsub.up()
        assert wait_until(lambda: client.get("/loop").json()["fleet"]["outbox_messages"] == 0, timeout_s=30)
    assert _pull_events(fleet.subscription, fleet.pubsub.host, answered) == answered


@pytest.mark.parametrize("follow", [True, False], ids=["fanout", "cache"])
def test_while_bigtable_is_away_predict_answers_from_the_node_table_and_reward_is_503(
    fleet: Fleet, follow: bool
) -> None:
    """The written policy: /predict answers from the node's copy of the counts (the fan-out: no Bigtable read, not
    degraded) while membership rows wait in a bounded buffer; past it /predict answers 503; /reward answers 503
    bigtable_unavailable; once Bigtable is back the rows are written and a reward for an event answered during the
    outage is accepted. With ``--no-fleet-follow`` the counts come from the cache or, unread, the prior (degraded)."""
    url = fleet.replica(
        "replica",
        "--events-max-pending",
        "1",
        "--events-max-delay-s",
        "0.001",
        "--vertex-deadline-s",
        "0.05",
        *([] if follow else ["--no-fleet-follow"]),
    )
    with httpx.Client(base_url=url, timeout=30, headers=JSON) as client:
        fleet.bigtable.down()
        during = client.post("/predict", json={"user_id": "u", "candidates": SHARD_0[:5], "top_k": 2})
        assert during.status_code == 200, during.text
        assert during.json()["degraded"] is not follow  # the node's table: nothing to read; else the prior
        reward = client.post(
            "/reward", json={"event_id": during.json()["event_id"], "id": during.json()["ids"][0], "reward": 1}
        )
        assert (reward.status_code, reward.json()["error"]) == (503, "bigtable_unavailable"), reward.text
        statuses: Counter[int] = Counter()
        for i in range(120):
            answer = client.post("/predict", json={"user_id": f"u{i}", "candidates": SHARD_0[:5], "top_k": 2})
            statuses[answer.status_code] += 1
            # Paced, so that the outbox of one message (Pub/Sub is up) keeps up: the bound hit is the rows'.
            time.sleep(0.02)
        assert statuses[503] > 0 and statuses[200] >= 90, statuses
        fleet.bigtable.up()
        assert wait_until(lambda: client.get("/loop").json()["fleet"]["event_rows_pending"] == 0, timeout_s=30)
        reward = client.post(
            "/reward", json={"event_id": during.json()["event_id"], "id": during.json()["ids"][0], "reward": 1}
        )
        assert reward.status_code == 202, reward.text


def test_a_replica_stopped_with_sigterm_delivers_every_event_it_answered(fleet: Fleet) -> None:
    """A rolling restart: a replica whose answers wait up to 5 s in its batch (``--events-max-delay-s``) is sent
    SIGTERM right after its last answer; it exits 0 once it has delivered them, and a learner then counts exactly
    the impressions it answered; a reward for one of its events is accepted by a replica that took over (the
    event's membership row reached Bigtable too)."""
    url = fleet.replica("replica-a", "--events-max-delay-s", "5", "--events-max-pending", "1000000")
    stopping = fleet.procs[-1]
    truth = Truth()
    answered: list[dict[str, object]] = []

    async def predict(n: int) -> None:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=JSON) as client:

            async def one(i: int) -> None:
                async with limit:
                    answer = await client.post(
                        "/predict", json={"user_id": f"u{i}", "candidates": ARMS[i % 20 : i % 20 + 8], "top_k": 3}
                    )
                assert answer.status_code == 200, answer.text
                answered.append(answer.json())

            await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(predict(300))
    os.killpg(stopping.pid, signal.SIGTERM)  # within the batch's 5 s: nothing of it has been sent yet
    assert stopping.wait(timeout=60) == 0
    log = (fleet.tmp / "replica-a.log").read_text()
    assert "not stored by Pub/Sub" not in log and "not written to" not in log, log[-3000:]
    for body in answered:
        truth.impressions.update(body["ids"])  # type: ignore[arg-type]
    fleet.learner("learner")
    other = fleet.replica("replica-b")
    converge([other], truth)
    event = answered[-1]
    reward = httpx.post(
        other + "/reward",
        json={"event_id": event["event_id"], "id": event["ids"][0], "reward": 1},
        timeout=30,  # type: ignore[index]
    )
    assert reward.status_code == 202, reward.text


def test_a_replica_stopped_while_pubsub_is_away_gives_up_within_its_timeout_and_says_what_it_lost(
    fleet: Fleet,
) -> None:
    """Shutdown is bounded by the graceful-shutdown timeout: with Pub/Sub away, a replica sent SIGTERM tries for
    ``--timeout-graceful-shutdown-s`` to deliver, then exits 0, logging how many answered events it could not."""
    url = fleet.replica("replica", "--timeout-graceful-shutdown-s", "2", "--events-max-delay-s", "0.001")
    stopping = fleet.procs[-1]
    fleet.pubsub.down()
    with httpx.Client(base_url=url, timeout=30, headers=JSON) as client:
        for i in range(5):
            answer = client.post("/predict", json={"user_id": f"u{i}", "candidates": SHARD_0[:5], "top_k": 2})
            assert answer.status_code == 200, answer.text
        outbox = client.get("/loop").json()["fleet"]
    assert outbox["outbox_messages"] >= 1 and outbox["outbox_bytes"] > 0
    os.killpg(stopping.pid, signal.SIGTERM)
    assert stopping.wait(timeout=60) == 0
    log = (fleet.tmp / "replica.log").read_text()
    assert f"messages (5 events) to {fleet.topic} were not stored by Pub/Sub within 2.0 s at close" in log, log[-3000:]


def test_bad_fleet_settings_are_refused_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mab_service", "serve", "--events", "pubsub:projects/p/topics/t", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAB_")},
    )
    assert done.returncode != 0
    assert "features" in done.stderr and "bigtable:" in done.stderr


def test_the_outbox_byte_bound_is_a_checked_setting() -> None:
    from mab_service.config import Settings, SettingsError

    assert Settings().events_max_pending_bytes == 64 * 1024 * 1024
    assert Settings.from_env({"MAB_EVENTS_MAX_PENDING_BYTES": "4096"}).events_max_pending_bytes == 4096
    with pytest.raises(SettingsError, match=r"events_max_pending_bytes must be an integer >= 1 \(got 0\)"):
        Settings(events_max_pending_bytes=0)


def test_segments_count_exactly_across_replicas_and_answers_rank_within_them(fleet: Fleet) -> None:
    """Answers ranked within segments on two replicas, each reward posted to the other replica and repeated: the
    learner counts every (segment, arm) exactly once, in Bigtable (``/arms/{id}?segment=``, ``/arms?segment=``) and
    in every replica's node table, and ``/predict`` with a segment ranks by the segment's backed-off posterior."""
    from mab_service.ids import pair_key
    from mab_service.learning._arms import ArmTable
    from mab_service.learning.posteriors import backed_off

    urls = [fleet.replica(name, "--event-propagation-s", "5") for name in ("replica-a", "replica-b")]
    fleet.learner("learner-0")
    rand = random.Random(29)
    segments = ["fr", "de", "é" * 64]
    shown: Counter[tuple[str | None, str]] = Counter()
    got: defaultdict[tuple[str | None, str], float] = defaultdict(float)

    async def decide(client: httpx.AsyncClient, i: int, segment: str | None, candidates: list[str], wins: str) -> None:
        body: dict[str, object] = {"user_id": f"u{i}", "candidates": candidates, "top_k": 3}
        if segment is not None:
            body["segment"] = segment
        if i % 5 == 0:
            body["event_id"] = f"client:{i}"  # a client's own id: the claim writes the membership row and segment
        answer = await client.post(urls[i % 2] + "/predict", json=body)
        assert answer.status_code == 200, answer.text
        answered = answer.json()
        for id_ in answered["ids"]:
            shown[None, id_] += 1
            if segment is not None:
                shown[segment, id_] += 1
            value = 1.0 if id_ == wins else rand.choice([0.0, 0.25])
            payload = {"event_id": answered["event_id"], "id": id_, "reward": value}
            first = await client.post(urls[(i + 1) % 2] + "/reward", json=payload)
            assert first.status_code == 202, first.text
            got[None, id_] += value
            if segment is not None:
                got[segment, id_] += value
            again = await client.post(urls[i % 2] + "/reward", json=payload)
            assert (again.status_code, again.json()) == (200, {"status": "duplicate"}), again.text

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30, headers=JSON) as client:
            limit = asyncio.Semaphore(16)

            async def one(i: int, segment: str | None, candidates: list[str], wins: str) -> None:
                async with limit:
                    await decide(client, i, segment, candidates, wins)

            # Random answers over every segment and none; then arm-00 wins within "fr" only, arm-01 within "de".
            plan = [(rand.choice([*segments, None]), rand.sample(ARMS, 8), "") for _ in range(240)]
            plan += [("fr", [ARMS[0], ARMS[1]], ARMS[0])] * 60 + [("de", [ARMS[0], ARMS[1]], ARMS[1])] * 120
            await asyncio.gather(*(one(i, *step) for i, step in enumerate(plan)))

    asyncio.run(run())
    want = {key: (n, round(got[key], 6)) for key, n in shown.items() if n}

    def arms_of(url: str) -> dict[tuple[str | None, str], tuple[int, float]]:
        seen = {}
        with httpx.Client(base_url=url, timeout=30) as client:
            for segment, arm in want:
                params = {} if segment is None else {"segment": segment}
                body = client.get(f"/arms/{arm}", params=params).json()
                seen[segment, arm] = (body.get("impressions", 0), round(body.get("rewards", 0.0), 6))
        return seen

    assert wait_until(lambda: all(arms_of(url) == want for url in urls), timeout_s=90, interval_s=1.0), {
        url: {k: (v, want[k]) for k, v in arms_of(url).items() if v != want[k]} for url in urls
    }

    def node_tables() -> list[ArmTable]:
        import mmap

        tables = []
        for proc in fleet.procs[:2]:
            (path,) = Path("/dev/shm").glob(f"mab-service-{proc.pid}-*-arms")
            fd = os.open(path, os.O_RDWR)
            try:
                tables.append(ArmTable.attach(mmap.mmap(fd, 0)))
            finally:
                os.close(fd)
        return tables

    def node_counts(arms: ArmTable) -> dict[tuple[str | None, str], tuple[int, float]]:
        found = {key: arms.get(key[1] if key[0] is None else pair_key(*key)) for key in want}  # type: ignore[arg-type]
        return {key: (0, 0.0) if f is None else (int(f[2]), round(f[3], 6)) for key, f in found.items()}

    tables = node_tables()
    assert wait_until(lambda: all(node_counts(t) == want for t in tables), timeout_s=60, interval_s=0.5)
    with httpx.Client(timeout=30) as client:
        # The node table ranks within a segment by the backed-off posterior of its exact counts.
        for segment in segments:
            arms_in = sorted(arm for s, arm in want if s == segment)
            alpha, beta, _, _, _ = tables[0].gather_segment(arms_in, segment, 10.0, 1.0, 1.0)
            for arm, a, b in zip(arms_in, alpha, beta):
                n, r = want[None, arm]
                mu_a, mu_b = 1.0 + r, 1.0 + n - r
                np.testing.assert_allclose((a, b), backed_off(10.0, mu_a, mu_b, *want[segment, arm]), rtol=1e-12)
                body = client.get(f"{urls[1]}/arms/{arm}", params={"segment": segment}).json()
                assert body["segment"] == segment
                np.testing.assert_allclose((body["alpha"], body["beta"]), (a, b), rtol=1e-12)
            leading = client.get(urls[0] + "/arms", params={"top": 3, "order": "impressions", "segment": segment})
            assert leading.status_code == 200, leading.text
            top = leading.json()
            assert top["segment"] == segment and top["total"] == len(arms_in)
            assert [a["impressions"] for a in top["arms"]] == sorted(want[segment, a][0] for a in arms_in)[::-1][:3]
        # arm-01 leads globally (it won 120 answers, arm-00 60); within "fr" arm-00 leads.
        firsts: Counter[tuple[str | None, str]] = Counter()
        for n in range(20):
            for segment in ("fr", "de", None):
                body = {"user_id": "u", "candidates": [ARMS[0], ARMS[1]], "top_k": 1, "seed": n}
                if segment is not None:
                    body["segment"] = segment
                answer = client.post(urls[n % 2] + "/predict", json=body)
                assert answer.status_code == 200, answer.text
                firsts[segment, answer.json()["ids"][0]] += 1
        assert firsts == {("fr", ARMS[0]): 20, ("de", ARMS[1]): 20, (None, ARMS[1]): 20}
