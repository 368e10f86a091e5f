"""One bandit behind the Service: the node as deploy/base runs it, with real processes on loopback.

deploy/base runs one pod (a StatefulSet of one replica) with ``MAB_WORKERS`` workers on one port, its state directory
on a PersistentVolume. Here: ``mab-service serve --workers 3`` on a state directory that stands for the volume, and
in front of it a TCP forwarder that stands for the Service: clients know only the forwarder's address, every
request goes on a fresh connection (so any worker may take it, as the shared port spreads connections), and when
the pod is deleted and rescheduled the new node starts on the same state directory at another address (a new pod
IP) and the forwarder is pointed at it (the Service's endpoints).

The ground truth is counted from what the test sent: each arm's impressions from the ids the answers returned, its
rewards from the rewards answered 202. The arms are not in the catalogue, so they start from the prior Beta(1, 1):
alpha = 1 + rewards, beta = 1 + impressions - rewards.

Workers are told apart by the process prefix of the X-Request-ID the server makes for every request (12 hex digits
per process).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from mab_service.learning import replay
from tests.conftest import _start, stop_process, unused_tcp_port, wait_until
from tests.fleet.proxy import Proxy

WORKERS = 3
ARMS = [f"ob-{i}" for i in range(6)]
TOP_K = 3
#: Reward values that add exactly in binary, so the expected counts compare with ==.
VALUES = itertools.cycle([1.0, 0.25, 0.5, 0.0])
#: Fresh connections tried at most for every worker to show up (the kernel picks the worker that accepts).
MAX_TRIES = 600


@dataclass
class Truth:
    """The counts the node must show, from what was sent and what it answered."""

    impressions: Counter[str] = field(default_factory=Counter)
    rewards: dict[str, float] = field(default_factory=dict)

    def posterior(self, arm: str) -> tuple[float, float]:
        got = self.rewards.get(arm, 0.0)
        return 1.0 + got, 1.0 + self.impressions[arm] - got

    def arm(self, arm: str) -> dict[str, Any]:
        alpha, beta = self.posterior(arm)
        return {
            "id": arm,
            "alpha": alpha,
            "beta": beta,
            "impressions": self.impressions[arm],
            "rewards": self.rewards.get(arm, 0.0),
        }


@dataclass
class Answer:
    event_id: str
    ids: list[str]
    worker: str
    #: The (alpha, beta) of every candidate the truth held when the answer was asked for.
    expected: dict[str, tuple[float, float]]


class Clients:
    """Requests through the forwarder, each on a fresh connection, noting which worker took each."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: The X-Request-ID prefixes (one per worker process) of the workers seen answering /predict.
        self.workers: set[str] = set()

    def send(self, method: str, path: str, body: object = None) -> tuple[httpx.Response, str]:
        with httpx.Client(base_url=self.url, timeout=10) as c:  # one connection, used once
            response = c.request(method, path, json=body)
        return response, response.headers["x-request-id"][:12]

    def predict(self, truth: Truth) -> Answer:
        expected = {arm: truth.posterior(arm) for arm in ARMS}
        response, worker = self.send("POST", "/predict", {"user_id": "u", "candidates": ARMS, "top_k": TOP_K})
        assert response.status_code == 200, response.text
        body = response.json()
        event_id = body["event_id"]
        self.workers.add(worker)
        truth.impressions.update(body["ids"])
        return Answer(event_id, body["ids"], worker, expected)

    def reward(self, event_id: str, arm: str, value: float) -> tuple[httpx.Response, str]:
        return self.send("POST", "/reward", {"event_id": event_id, "id": arm, "reward": value})

    def arms_on_every_worker(self, truth: Truth) -> None:
        """GET /arms/{id} on fresh connections until every worker has answered one; each equals the truth."""
        answered: set[str] = set()
        for tries, arm in enumerate(itertools.cycle(ARMS)):
            response, worker = self.send("GET", f"/arms/{arm}")
            assert response.status_code == 200, response.text
            assert response.json() == truth.arm(arm), worker
            answered.add(worker)
            if (answered == set(self.workers) and tries >= len(ARMS)) or tries >= MAX_TRIES:
                break
        assert answered == set(self.workers), f"only {len(answered)} of {WORKERS} workers answered /arms"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_process(proc)


@pytest.fixture
def service() -> Iterator[Proxy]:
    proxy = Proxy(unused_tcp_port())  # pointed at the node once it runs
    yield proxy
    proxy.close()


def _node(table_csv: Path, state_dir: Path, processes: list[subprocess.Popen[bytes]]) -> int:
    """Start a node as the StatefulSet's pod does (workers on one port, state on the volume); returns its port."""
    port = unused_tcp_port()
    args = ["--features", f"csv:{table_csv}", "--state-dir", str(state_dir), "--workers", str(WORKERS)]
    processes.append(_start({}, args, port=port).proc)
    return port


def _reward_all(clients: Clients, answers: list[Answer], truth: Truth, accepted: list[tuple[str, str, str]]) -> None:
    """Reward each answer's first id on a fresh connection (202, counted), then again on another (200 duplicate)."""
    for answer in answers:
        arm, value = answer.ids[0], next(VALUES)
        response, worker = clients.reward(answer.event_id, arm, value)
        assert (response.status_code, response.json()) == (202, {"status": "accepted"})
        truth.rewards[arm] = truth.rewards.get(arm, 0.0) + value
        accepted.append((answer.event_id, arm, worker))
        again, _ = clients.reward(answer.event_id, arm, value)
        assert (again.status_code, again.json()) == (200, {"status": "duplicate"})


def _answers_drew_from_the_truth(state_dir: Path, answers: list[Answer]) -> None:
    """The decision log holds the (alpha, beta) each answer was drawn from: the truth of its moment."""
    wanted = {a.event_id for a in answers}
    logged: dict[str, Any] = {}

    def all_logged() -> bool:
        logged.update({d.event_id: d for d in replay.logged(state_dir) if d.event_id in wanted})
        return len(logged) == len(wanted)

    assert wait_until(all_logged, timeout_s=10)
    for answer in answers:
        decision = logged[answer.event_id]
        drawn = dict(zip(replay.candidates(decision), zip(decision.alpha.tolist(), decision.beta.tolist())))
        assert drawn == answer.expected, answer.event_id


def _sigterm(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the kubelet deleting the pod
    assert proc.wait(30) == 0


def test_one_bandit_through_the_service_and_across_a_reschedule(
    table_csv: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]], service: Proxy
) -> None:
    volume = tmp_path / "pv"
    service.up(_node(table_csv, volume, processes))
    clients = Clients(f"http://{service.host}")
    truth = Truth()
    accepted: list[tuple[str, str, str]] = []

    # Answers and rewards one after another, every request on a fresh connection, until every worker has answered
    # (at least 60 answers). Each reward is counted before the next answer is asked for.
    before: list[Answer] = []
    while len(before) < 60 or (len(clients.workers) < WORKERS and len(before) < MAX_TRIES):
        before.append(clients.predict(truth))
        _reward_all(clients, before[-1:], truth, accepted)
    assert len(clients.workers) == WORKERS
    answering = {a.event_id: a.worker for a in before}
    crossed = sum(answering[event_id] != worker for event_id, _, worker in accepted)
    assert crossed > 0, "no reward reached a worker other than the one that answered its event"
    clients.arms_on_every_worker(truth)

    # Answers whose rewards come only after the reschedule, well inside the reward window.
    held = [clients.predict(truth) for _ in range(10)]
    clients.arms_on_every_worker(truth)

    # The pod is deleted: SIGTERM, the drain, exit 0. Until its successor is ready the Service has no endpoint and a
    # client's request fails at the connection (retried by the client), never with an answer that loses a reward.
    _sigterm(processes[0])
    _answers_drew_from_the_truth(volume, before + held)
    with pytest.raises(httpx.TransportError):
        clients.reward(held[0].event_id, held[0].ids[0], 1.0)

    # Rescheduled: a new node on the same volume at a new address; the Service points at it.
    service.up(_node(table_csv, volume, processes))
    clients.workers.clear()  # new processes, new prefixes
    after: list[Answer] = []
    while len(after) < 10 or (len(clients.workers) < WORKERS and len(after) < MAX_TRIES):
        after.append(clients.predict(truth))
    clients.arms_on_every_worker(truth)  # nothing learned before was lost, and every worker agrees

    # The events held before the restart are held again (restored from the journal): their rewards are accepted
    # once, and a reward accepted before the restart is still a duplicate.
    _reward_all(clients, held, truth, accepted)
    for event_id, arm, _ in accepted[:5]:
        again, _ = clients.reward(event_id, arm, 1.0)
        assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    _reward_all(clients, after, truth, accepted)
    clients.arms_on_every_worker(truth)
    final = [clients.predict(truth) for _ in range(5)]
    _sigterm(processes[1])
    _answers_drew_from_the_truth(volume, after + final)
    assert sum(truth.impressions.values()) == TOP_K * (len(before) + len(held) + len(after) + len(final))
    assert len(accepted) == len(before) + len(held) + len(after)


def test_a_second_node_on_the_same_volume_refuses_to_start(
    table_csv: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    # Why the StatefulSet never runs two pods on the volume: the node locks its state directory, so a second one
    # could not serve from it; one pod at a time is all the lock allows.
    volume = tmp_path / "pv"
    _node(table_csv, volume, processes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAB_")}
    args = ["--features", f"csv:{table_csv}", "--state-dir", str(volume), "--port", str(unused_tcp_port())]
    second = subprocess.run(
        [sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "is in use by pid" in second.stderr and str(volume) in second.stderr
