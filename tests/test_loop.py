"""The learning loop's contract, against the real server on loopback: event ids, rewards once, refusals, counts
that change the next answers, durability across kill -9, two workers, replay, and a disk that refuses."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from mab_service.clients import CLIENT
from mab_service.config import Settings
from mab_service.learning import node, replay
from mab_service.learning.journal import read_records
from mab_service.learning.loop import NodeLoop, NotInEvent, TooManyEvents, TooManyNewArms, UnknownEvent
from tests.conftest import EmulatorProcess, Server, wait_until

JSON = {"content-type": "application/json"}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def loop_server(server_factory: Callable[..., Server], table_csv: Path, state_dir: Path) -> Server:
    return server_factory(args=["--features", f"csv:{table_csv}", "--state-dir", str(state_dir)])


def _predict(client: httpx.Client, candidates: list[str], **extra: object) -> dict[str, object]:
    answer = client.post("/predict", json={"user_id": "u", "candidates": candidates, **extra})
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _reward(client: httpx.Client, event_id: object, arm_id: object, reward: object = 1.0) -> httpx.Response:
    return client.post("/reward", json={"event_id": event_id, "id": arm_id, "reward": reward})


def test_answers_carry_unique_event_ids(loop_server: Server) -> None:
    with loop_server.client() as c:
        ids = {_predict(c, ["a", "b"])["event_id"] for _ in range(50)}
    assert len(ids) == 50
    assert all(isinstance(i, str) and 1 <= len(i) <= 128 for i in ids)


def test_a_reward_is_accepted_once_and_counted_once(loop_server: Server) -> None:
    with loop_server.client() as c:
        answer = _predict(c, ["once-a", "once-b", "once-c"], top_k=2)
        shown = answer["ids"]
        first = _reward(c, answer["event_id"], shown[0], 0.5)
        assert (first.status_code, first.json()) == (202, {"status": "accepted"})
        again = _reward(c, answer["event_id"], shown[0], 0.5)
        assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
        arm = c.get(f"/arms/{shown[0]}").json()
        assert arm == {"id": shown[0], "alpha": 1.5, "beta": 1.5, "impressions": 1, "rewards": 0.5}
        other = c.get(f"/arms/{shown[1]}").json()
        assert (other["impressions"], other["rewards"], other["beta"]) == (1, 0.0, 2.0)
        not_shown = ({"once-a", "once-b", "once-c"} - set(shown)).pop()
        assert c.get(f"/arms/{not_shown}").status_code == 404  # never shown, not in the catalogue


def test_refusals(loop_server: Server) -> None:
    with loop_server.client() as c:
        answer = _predict(c, ["r-a", "r-b", "r-c"], top_k=1)
        event_id, shown = answer["event_id"], answer["ids"]
        unknown = _reward(c, "no-such-event", shown[0])  # type: ignore[index]
        assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_event")
        foreign = _reward(c, event_id, "r-z")
        assert (foreign.status_code, foreign.json()["error"]) == (422, "not_in_event")
        not_returned = ({"r-a", "r-b", "r-c"} - set(shown)).pop()  # type: ignore[arg-type]
        assert _reward(c, event_id, not_returned).status_code == 422  # a candidate, but not returned: no gaming
        for bad, field in [
            ({"event_id": event_id, "id": shown[0], "reward": 1.5}, "reward"),  # type: ignore[index]
            ({"event_id": event_id, "id": shown[0], "reward": -0.1}, "reward"),  # type: ignore[index]
            ({"event_id": event_id, "id": shown[0], "reward": "1"}, "reward"),  # type: ignore[index]
            ({"event_id": event_id, "id": shown[0], "reward": True}, "reward"),  # type: ignore[index]
            ({"event_id": event_id, "reward": 1}, "id"),
            ({"id": "x"}, "event_id"),
            ({"event_id": 5, "id": "x"}, "event_id"),
            ({"event_id": "has space", "id": "x"}, "event_id"),
        ]:
            answer_bad = c.post("/reward", json=bad)
            assert answer_bad.status_code == 422, (bad, answer_bad.text)
            assert answer_bad.json()["field"] == field
        assert c.post("/reward", content=b"{nope", headers=JSON).status_code == 400
        assert c.post("/reward", content=b"[]", headers=JSON).status_code == 422
        assert c.post("/reward", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
        default = c.post("/reward", json={"event_id": event_id, "id": shown[0]})  # type: ignore[index]
        assert default.status_code == 202  # reward defaults to 1
        assert c.get(f"/arms/{shown[0]}").json()["rewards"] == 1.0  # type: ignore[index]


def test_rewards_in_a_batch_answer_one_result_each(loop_server: Server) -> None:
    with loop_server.client() as c:
        answer = _predict(c, ["b-a", "b-b", "b-c"], top_k=2)
        event_id, shown = answer["event_id"], answer["ids"]
        batch = [
            {"event_id": event_id, "id": shown[0]},  # type: ignore[index]
            {"event_id": event_id, "id": shown[1], "reward": 0.5},  # type: ignore[index]
            {"event_id": event_id, "id": shown[0]},  # type: ignore[index]  # the same pair again in the batch
            {"event_id": "nope", "id": "b-a"},
            {"event_id": event_id, "id": "b-z"},
        ]
        answer_batch = c.post("/rewards", json={"rewards": batch})
        assert answer_batch.status_code == 200, answer_batch.text
        results = answer_batch.json()["results"]
        assert results[:3] == [{"status": "accepted"}, {"status": "accepted"}, {"status": "duplicate"}]
        assert (results[3]["error"], results[4]["error"]) == ("unknown_event", "not_in_event")
        assert c.get(f"/arms/{shown[0]}").json()["rewards"] == 1.0  # type: ignore[index]
        assert c.get(f"/arms/{shown[1]}").json()["rewards"] == 0.5  # type: ignore[index]
        again = c.post("/rewards", json={"rewards": batch[:1]}).json()["results"]
        assert again == [{"status": "duplicate"}]
        bad = c.post("/rewards", json={"rewards": [batch[0], {"event_id": event_id, "id": shown[0], "reward": 2}]})
        assert (bad.status_code, bad.json()["field"]) == (422, "rewards[1].reward")  # nothing of it is counted
        for body in ({"rewards": []}, {"rewards": {}}, {}):
            assert c.post("/rewards", json=body).status_code == 422


def test_a_client_event_id_is_refused_while_held(loop_server: Server) -> None:
    with loop_server.client() as c:
        answer = _predict(c, ["x", "y"], event_id="client:evt-1.A_b")
        assert answer["event_id"] == "client:evt-1.A_b"
        again = c.post("/predict", json={"user_id": "u", "candidates": ["x"], "event_id": "client:evt-1.A_b"})
        assert (again.status_code, again.json()["error"]) == (409, "event_id_in_use")
        bad = c.post("/predict", json={"user_id": "u", "candidates": ["x"], "event_id": "x" * 129})
        assert (bad.status_code, bad.json()["field"]) == (422, "event_id")
        assert _reward(c, "client:evt-1.A_b", answer["ids"][0]).status_code == 202  # type: ignore[index]


def test_event_ids_are_unguessable(loop_server: Server) -> None:
    # 128 random bits each: no shared prefix, no counter; consecutive ids differ in about half their bits.
    with loop_server.client() as c:
        made = [str(_predict(c, ["x"])["event_id"]) for _ in range(40)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", event_id) for event_id in made), made
    assert len({event_id[:6] for event_id in made}) > 30
    for before, after in itertools.pairwise(made):
        # Binomial(128, 1/2) has a standard deviation of 5.7: outside [24, 104] is beyond 7 of them.
        assert 24 <= (int(before, 16) ^ int(after, 16)).bit_count() <= 104


def test_one_client_cannot_evict_another_clients_event(loop_server: Server) -> None:
    # Default holding settings: 1,100 answers of 10,000 ids each would be 11,000,000 members, more than the ring's
    # 10,000,000; with 1,000 held per answer they are 1,100,000, and the first event stays rewardable.
    candidates = [f"flood-{i:05d}" for i in range(10_000)]
    flood = orjson.dumps({"user_id": "u", "candidates": candidates})
    with loop_server.client() as c:
        first = _predict(c, [f"keep-{i}" for i in range(5)])
        for _ in range(1100):
            r = c.post("/predict", content=flood, headers=JSON)
            assert r.status_code == 200, r.text
        assert len(r.json()["ids"]) == 10_000  # all returned, the first 1,000 held
        last = r.json()
        assert _reward(c, first["event_id"], first["ids"][0]).status_code == 202  # type: ignore[index]
        assert _reward(c, last["event_id"], last["ids"][999]).status_code == 202
        below = _reward(c, last["event_id"], last["ids"][1000])
        assert (below.status_code, below.json()["error"]) == (422, "not_in_event")
        assert "ranked below its first 1000 ids" in below.json()["message"]
        held = c.get("/loop").json()
        assert held["events_held"] == 1101 and held["events_evicted_early"] == 0
        assert held["impressions_total"] == 5 + 1100 * 1000


def _holding_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "features": "demo",
        "state_dir": str(tmp_path / "state"),
        "max_held_events": 40,
        "max_held_members": 4000,
        "max_new_arms": 10_000,
        "decision_log": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def _answer(loop: NodeLoop, current: node.Node, ids: list[str], event_id: str | None = None) -> str:
    alpha, beta, _, rows = current.arms.gather(ids, 1.0, 1.0)
    ranking = np.arange(len(ids))
    return loop.answered(
        event_id or loop.new_event_id(), event_id is not None, "u", b"{}", ids, alpha, beta, rows, ranking, ids, 1, None
    )


def test_a_client_past_its_share_is_refused_and_others_are_not(tmp_path: Path) -> None:
    # A share of 0.25 of 40 events and 4,000 ids: 10 events and 1,000 ids per client (one worker).
    settings = _holding_settings(tmp_path)

    async def run() -> None:
        with node.using(settings) as current:
            loop = NodeLoop(current, settings, apply_counts=True)
            await loop.start()
            try:
                token = CLIENT.set("addr:10.0.0.1")
                first = _answer(loop, current, ["a-0", "a-1"])
                for i in range(9):
                    _answer(loop, current, [f"a-{i}"])
                shown = loop.impressions
                with pytest.raises(TooManyEvents) as refused:
                    _answer(loop, current, ["a-x"], event_id="client-a.11")
                assert refused.value.status_code == 429 and refused.value.code == "too_many_events"
                # Its holds expire a window (600 s) after they were made: that is when it may hold again.
                assert 600 <= refused.value.retry_after_s <= 602
                assert loop.impressions == shown  # nothing counted ...
                with pytest.raises(UnknownEvent):
                    await loop.reward("client-a.11", "a-x", 1.0)  # ... and nothing held
                CLIENT.reset(token)

                token = CLIENT.set("addr:10.0.0.2")  # another client holds as before
                others = [_answer(loop, current, [f"b-{i}", "a-0"]) for i in range(10)]
                with pytest.raises(TooManyEvents):
                    _answer(loop, current, ["b-x"])
                CLIENT.reset(token)
                assert await loop.reward(first, "a-1", 1.0)  # the first client's event is still held
                assert all([await loop.reward(event_id, "a-0", 1.0) for event_id in others])

                # The budget counts ids too: 1,000 per client.
                token = CLIENT.set("key:big")
                _answer(loop, current, [f"m-{i}" for i in range(600)])
                with pytest.raises(TooManyEvents, match="holds 1 events and 600 ids"):
                    _answer(loop, current, [f"n-{i}" for i in range(401)])
                _answer(loop, current, [f"n-{i}" for i in range(400)])
                CLIENT.reset(token)
                assert loop.stats()["refusals"]["too_many_events"] == 3
            finally:
                await loop.close()

    asyncio.run(run())


def test_a_client_past_its_share_of_new_arms_is_refused_and_others_are_not(tmp_path: Path) -> None:
    # A share of 0.25 of 1,000 new arms: 250 per client (one worker). The demo catalogue's ids are not new.
    settings = _holding_settings(tmp_path, max_new_arms=1000, max_held_events=100_000, max_held_members=1_000_000)

    async def run() -> None:
        with node.using(settings) as current:
            loop = NodeLoop(current, settings, apply_counts=True)
            await loop.start()
            try:
                token = CLIENT.set("addr:10.0.0.1")
                _answer(loop, current, [f"made-up-{i}" for i in range(200)])
                _answer(loop, current, [f"made-up-{i}" for i in range(200)])  # the same arms again: nothing new
                shown = loop.impressions
                with pytest.raises(TooManyNewArms, match="has added 200 arms not in the catalogue") as refused:
                    _answer(loop, current, [f"made-up-{i}" for i in range(200, 251)], event_id="flood.1")
                assert refused.value.status_code == 429 and refused.value.code == "too_many_new_arms"
                assert loop.impressions == shown and current.arms.get("made-up-250") is None  # nothing counted ...
                with pytest.raises(UnknownEvent):
                    await loop.reward("flood.1", "made-up-200", 1.0)  # ... and nothing held
                _answer(loop, current, [f"made-up-{i}" for i in range(200, 250)])  # up to its share: 250
                catalogue = current.arms.id_at(0)
                _answer(loop, current, [catalogue, "made-up-0"])  # known arms still answer
                CLIENT.reset(token)

                token = CLIENT.set("addr:10.0.0.2")  # another client's new arms are counted as before
                event_id = _answer(loop, current, ["fresh-0", "fresh-1"])
                assert await loop.reward(event_id, "fresh-1", 1.0)
                assert loop.arm("fresh-1")[2:] == (1, 1.0)  # type: ignore[index]
                CLIENT.reset(token)
                assert loop.stats()["refusals"]["too_many_new_arms"] == 1
            finally:
                await loop.close()

    asyncio.run(run())


def test_ids_ranked_below_max_held_ids_are_returned_not_held(tmp_path: Path) -> None:
    settings = _holding_settings(tmp_path, max_held_ids=3)

    async def run() -> None:
        with node.using(settings) as current:
            loop = NodeLoop(current, settings, apply_counts=True)
            await loop.start()
            try:
                ids = ["h-0", "h-1", "h-2", "h-3", "h-4"]
                event_id = _answer(loop, current, ids)
                assert loop.impressions == 3
                assert [loop.arm(i)[2] if loop.arm(i) else 0 for i in ids] == [1, 1, 1, 0, 0]  # type: ignore[index]
                assert await loop.reward(event_id, "h-2", 1.0)
                with pytest.raises(NotInEvent, match="ranked below its first 3 ids"):
                    await loop.reward(event_id, "h-3", 1.0)
            finally:
                await loop.close()

    asyncio.run(run())


_KILLED_WORKER = """
import mmap, sys, time
from mab_service.learning._events import ACCEPTED, EventRing
with open(sys.argv[1], "r+b") as f:
    ring = EventRing.attach(mmap.mmap(f.fileno(), 0))
assert ring.reward(sys.argv[2], "k-0", time.time()) == ACCEPTED
print("marked", flush=True)
time.sleep(60)  # killed here: after the mark, before its journal has the reward
"""


def test_a_reward_whose_worker_was_killed_after_marking_is_counted_when_sent_again(tmp_path: Path) -> None:
    settings = _holding_settings(tmp_path)

    async def run() -> None:
        with node.using(settings) as current:
            loop = NodeLoop(current, settings, apply_counts=True)
            await loop.start()
            try:
                event_id = _answer(loop, current, ["k-0", "k-1"])
                worker = subprocess.Popen(
                    [sys.executable, "-c", _KILLED_WORKER, current.handle.events_path, event_id],
                    stdout=subprocess.PIPE,
                )
                assert worker.stdout is not None and worker.stdout.readline() == b"marked\n"
                assert await loop.reward(event_id, "k-0", 1.0) is False  # its worker lives: a duplicate, as before
                worker.kill()
                worker.wait()
                worker.stdout.close()
                assert await loop.reward(event_id, "k-0", 1.0) is True  # 202: its worker died, nothing recorded it
                assert await loop.reward(event_id, "k-0", 1.0) is False
                assert current.arms.get("k-0")[2:4] == (1, 1.0)  # type: ignore[index]
            finally:
                await loop.close()

    asyncio.run(run())
    with node.using(settings) as again:  # the journal has it once
        assert again.arms.get("k-0")[2:4] == (1, 1.0)  # type: ignore[index]


def test_rewards_change_the_next_answers(loop_server: Server) -> None:
    arms = ["learn-good", "learn-bad"]
    with loop_server.client() as c:
        for _ in range(40):
            answer = _predict(c, arms)
            assert _reward(c, answer["event_id"], "learn-good").status_code == 202
        good = c.get("/arms/learn-good").json()
        assert (good["impressions"], good["rewards"], good["alpha"], good["beta"]) == (40, 40.0, 41.0, 1.0)
        assert c.get("/arms/learn-bad").json()["beta"] == 41.0
        firsts = [_predict(c, arms, top_k=1)["ids"][0] for _ in range(50)]  # type: ignore[index]
    assert firsts.count("learn-good") >= 49


def test_catalogue_arms_start_from_their_catalogue_parameters(loop_server: Server) -> None:
    with loop_server.client() as c:
        before = c.get("/arms/mid").json()
        assert before == {"id": "mid", "alpha": 50.0, "beta": 50.0, "impressions": 0, "rewards": 0.0}
        answer = _predict(c, ["mid"])
        assert _reward(c, answer["event_id"], "mid", 0.25).status_code == 202
        assert c.get("/arms/mid").json() == {
            "id": "mid",
            "alpha": 50.25,
            "beta": 50.75,
            "impressions": 1,
            "rewards": 0.25,
        }


def test_loop_and_arms_pages(loop_server: Server) -> None:
    with loop_server.client() as c:
        answer = _predict(c, ["page-a", "page-b"])
        _reward(c, answer["event_id"], "page-a")
        loop = c.get("/loop").json()
        assert loop["learning"] is True and loop["durable"] is True
        assert loop["events_held"] >= 1 and loop["rewards_accepted"] >= 1
        leading = c.get("/arms", params={"top": 5, "order": "impressions"}).json()
        assert len(leading["arms"]) == 5 and leading["total"] >= 2
        row = leading["arms"][0]
        assert row["low"] <= row["mean"] <= row["high"]
        assert c.get("/arms", params={"top": 0}).status_code == 422
        assert c.get("/arms", params={"order": "x"}).status_code == 422


def test_the_decision_log_replays_an_answer(loop_server: Server, state_dir: Path) -> None:
    with loop_server.client() as c:
        answer = _predict(c, [f"c{i}" for i in range(300)] + ["strong", "weak"], top_k=20)
    event_id = answer["event_id"]
    assert wait_until(lambda: replay.find(state_dir, event_id) is not None, timeout_s=5)  # type: ignore[arg-type]
    decision = replay.find(state_dir, event_id)  # type: ignore[arg-type]
    assert decision is not None
    ranking, scores = replay.redraw(decision)
    ids = replay.candidates(decision)
    assert [ids[i] for i in ranking.tolist()] == answer["ids"]
    assert np.allclose(scores, answer["scores"])  # type: ignore[arg-type]


def test_learning_off_serves_without_event_ids(server_factory: Callable[..., Server], table_csv: Path) -> None:
    server = server_factory(args=["--features", f"csv:{table_csv}", "--no-learning"])
    with server.client() as c:
        answer = _predict(c, ["strong", "weak"])
        assert "event_id" not in answer and answer["ids"] == ["strong", "weak"]
        off = _reward(c, "e", "strong")
        assert (off.status_code, off.json()["error"]) == (404, "learning_off")


# -- durability and workers ------------------------------------------------------------------------------------


def _spawn(table_csv: Path, state_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    from tests.conftest import _start

    server = _start({}, ["--features", f"csv:{table_csv}", "--state-dir", str(state_dir), *extra], port=port)
    return server.proc


def test_kill_9_after_202_then_restart_gives_the_same_counts(table_csv: Path, state_dir: Path) -> None:
    from tests.conftest import stop_process, unused_tcp_port

    port = unused_tcp_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(table_csv, state_dir, port)
    accepted: list[tuple[str, str]] = []
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            for i in range(30):
                answer = _predict(c, [f"k{i % 3}", "k-other"], top_k=2)
                if _reward(c, answer["event_id"], f"k{i % 3}").status_code == 202:
                    accepted.append((answer["event_id"], f"k{i % 3}"))  # type: ignore[arg-type]
            before = {arm: c.get(f"/arms/{arm}").json() for arm in ("k0", "k1", "k2", "k-other")}
        os.killpg(proc.pid, signal.SIGKILL)  # right after the last 202
        proc.wait(10)
    finally:
        stop_process(proc)
    assert len(accepted) == 30
    proc = _spawn(table_csv, state_dir, port)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            after = {arm: c.get(f"/arms/{arm}").json() for arm in before}
            assert after == before
            assert before["k-other"]["impressions"] == 30
            # Still held after the restart: the same reward again is a duplicate, not a second count.
            event_id, arm = accepted[-1]
            again = _reward(c, event_id, arm)
            assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    finally:
        stop_process(proc)


def _journal_writers(state_dir: Path, writers: dict[str, str]) -> dict[str, str]:
    """``writers`` updated with event id -> the journal writer (worker) that recorded it, from the journal files."""
    for path in (state_dir / "journal").glob("*.jnl"):
        for record in read_records(path):
            if record[0] == "e":
                writers[record[2]] = path.name.rsplit("-", 1)[0]
    return writers


def test_two_workers_share_events_and_counts(table_csv: Path, state_dir: Path) -> None:
    from tests.conftest import stop_process, unused_tcp_port

    port = unused_tcp_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(table_csv, state_dir, port, "--workers", "2")
    try:
        # A fresh connection per request, so that both workers answer (each journals its events in its own files).
        answers: list[dict[str, object]] = []
        writers: dict[str, str] = {}
        while len(answers) < 400:
            for _ in range(20):
                with httpx.Client(base_url=url, timeout=10) as c:
                    answers.append(_predict(c, ["w-a", "w-b"]))
            assert wait_until(lambda: all(a["event_id"] in _journal_writers(state_dir, writers) for a in answers))
            if len({writers[str(a["event_id"])] for a in answers}) == 2:
                break
        assert len({writers[str(a["event_id"])] for a in answers}) == 2
        for i, answer in enumerate(answers):
            with httpx.Client(base_url=url, timeout=10) as c:  # the reward may reach the other worker
                assert _reward(c, answer["event_id"], "w-a").status_code == 202
                seen = c.get("/arms/w-a").json()
            with httpx.Client(base_url=url, timeout=10) as c:
                assert c.get("/arms/w-a").json()["rewards"] == seen["rewards"] == i + 1
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/arms/w-b").json()["impressions"] == len(answers)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_answers_503_on_reward_never_a_silent_drop(table_csv: Path, tmp_path: Path) -> None:
    from tests.conftest import stop_process, unused_tcp_port

    with _small_disk(tmp_path / "disk", "2m") as disk:
        port = unused_tcp_port()
        url = f"http://127.0.0.1:{port}"
        proc = _spawn(table_csv, disk / "state", port, "--no-decision-log")
        try:
            with httpx.Client(base_url=url, timeout=10) as c:
                answer = _predict(c, ["full-a", "full-b"])
                assert _reward(c, answer["event_id"], "full-a").status_code == 202
                filler = disk / "filler"
                with filler.open("wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                # Appends fit in the journal file's last page for a while: reward until the disk refuses.
                accepted = 0
                for _ in range(2000):
                    answer = _predict(c, ["full-a", "full-b"])  # /predict keeps answering throughout
                    refusal = _reward(c, answer["event_id"], "full-b")
                    if refusal.status_code != 202:
                        break
                    accepted += 1
                assert refusal.status_code == 503, refusal.text
                assert refusal.json()["error"] == "journal_unavailable"
                for _ in range(3):
                    again = _reward(c, _predict(c, ["full-a", "full-b"])["event_id"], "full-b")
                    assert again.status_code == 503
                assert c.get("/loop").json()["durable"] is False
                assert c.get("/arms/full-b").json()["rewards"] == accepted  # nothing refused was counted
                filler.unlink()
                time.sleep(1.2)  # the journal tries the disk again every impressions_sync_s
                retry = _reward(c, answer["event_id"], "full-b")
                assert retry.status_code == 202, retry.text  # the refused reward can be sent again
                assert c.get("/arms/full-b").json()["rewards"] == accepted + 1
        finally:
            stop_process(proc)


def test_on_a_vertex_source_the_loop_counts_and_logs_but_the_store_ranks(
    server_factory: Callable[..., Server], emulator_process: EmulatorProcess
) -> None:
    entity_type = "projects/p/locations/l/featurestores/f/entityTypes/content"
    server = server_factory(
        env={"VERTEX_FEATURESTORE_EMULATOR_HOST": emulator_process.target, "MAB_CACHE_TTL_S": "0"},
        args=["--features", f"vertex:{entity_type}"],
    )
    with server.client() as c:
        answer = _predict(c, ["mid", "weak"], top_k=1)
        assert _reward(c, answer["event_id"], answer["ids"][0]).status_code == 202  # type: ignore[index]
        assert _reward(c, answer["event_id"], answer["ids"][0]).json() == {"status": "duplicate"}  # type: ignore[index]
        arm = c.get("/arms/mid").json()
        # The store's own posterior (its pipeline adds the logged events), with what this node counted beside it.
        assert (arm["alpha"], arm["beta"]) == (50.0, 50.0)
        assert (arm["impressions"], arm["rewards"]) == (1, 1.0)
        assert c.get("/loop").json()["applies_counts"] is False


def test_an_arm_id_with_a_line_break_reaches_the_endpoint(loop_server: Server) -> None:
    # Starlette's path convertor stops at a line break: such a path missed the route (a bare 404 not_found) and a bad
    # segment beside it went unchecked. Now the endpoint answers: no arm has such an id, and a bad segment is 422.
    with loop_server.client() as c:
        for path in ("/arms/a%0Ab", "/arms/a%0A", "/arms/%0A", "/arms/a/b"):
            unknown = c.get(path)
            assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_arm"), (path, unknown.text)
        refused = c.get("/arms/a%0Ab?segment=")
        assert (refused.status_code, refused.json()["error"]) == (422, "validation_error"), refused.text
