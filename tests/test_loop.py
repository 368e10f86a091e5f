"""The learning loop's contract, against the real server on loopback: event ids, rewards once, refusals, counts
that change the next answers, durability across kill -9, two workers, replay, and a disk that refuses."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from mab_service.learning import replay
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


def test_two_workers_share_events_and_counts(table_csv: Path, state_dir: Path) -> None:
    from tests.conftest import stop_process, unused_tcp_port

    port = unused_tcp_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(table_csv, state_dir, port, "--workers", "2")
    try:
        # A fresh connection per request, so that both workers answer (their event ids differ in their prefix).
        answers: list[dict[str, object]] = []
        prefixes: set[str] = set()
        while len(answers) < 40 or (len(prefixes) < 2 and len(answers) < 400):
            with httpx.Client(base_url=url, timeout=10) as c:
                answers.append(_predict(c, ["w-a", "w-b"]))
            prefixes.add(str(answers[-1]["event_id"])[:12])
        assert len(prefixes) == 2, prefixes
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
