"""Segments and the half-life through real ``mab-service serve`` processes: counts exact across two workers and a
kill -9 plus restart, the decayed counts against a reference recomputed from the journal, the contract's shapes, and
bad segments refused with 422.

The ground truth is counted from what the test sent: each returned id is one impression for (segment, id) and for
id; each reward answered 202 is credited to both. The arms are not in the catalogue, so their global posterior is
the prior plus their counts, and within a segment Beta(m * mu + r_sa, m * (1 - mu) + n_sa - r_sa).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mab_service import schemas
from mab_service.errors import SegmentsUnavailable, ValidationFailed
from mab_service.features.local import LocalSource
from mab_service.learning import journal, node, replay
from mab_service.learning.posteriors import backed_off
from mab_service.pipeline import recommend
from mab_service.policy.sampler import SAMPLERS
from tests.conftest import Server, _start, stop_process, wait_until

ARMS = [f"sg-{i}" for i in range(6)]
SEGMENTS = ["fr", "de-mobile", "ünïcode"]
TOP_K = 3
M = 10.0
#: Reward values that add exactly in binary, so the expected counts compare with ==.
VALUES = itertools.cycle([1.0, 0.25, 0.5, 0.0])


class Truth:
    def __init__(self) -> None:
        self.impressions: Counter[tuple[str | None, str]] = Counter()
        self.rewards: Counter[tuple[str | None, str]] = Counter()

    def shown(self, segment: str | None, ids: list[str]) -> None:
        for arm in ids:
            self.impressions[(None, arm)] += 1
            if segment is not None:
                self.impressions[(segment, arm)] += 1

    def rewarded(self, segment: str | None, arm: str, value: float) -> None:
        self.rewards[(None, arm)] += value
        if segment is not None:
            self.rewards[(segment, arm)] += value


def _predict(url: str, segment: str | None) -> tuple[dict[str, Any], str]:
    """One answer on a fresh connection (so either worker may take it); the answer and its worker."""
    body: dict[str, Any] = {"user_id": "u", "candidates": ARMS, "top_k": TOP_K}
    if segment is not None:
        body["segment"] = segment
    response = httpx.post(url + "/predict", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json(), response.headers["x-request-id"][:12]


def _reward(url: str, event_id: str, arm: str, value: float) -> str:
    response = httpx.post(url + "/reward", json={"event_id": event_id, "id": arm, "reward": value}, timeout=10)
    assert (response.status_code, response.json()) == (202, {"status": "accepted"}), response.text
    return response.headers["x-request-id"][:12]


def _check_counts(url: str, truth: Truth) -> None:
    """Every arm, globally and within every segment, as /arms/{id} shows it on a fresh connection, is the truth."""
    for arm in ARMS:
        got = httpx.get(f"{url}/arms/{arm}", timeout=10).json()
        n, r = truth.impressions[(None, arm)], truth.rewards[(None, arm)]
        assert (got["impressions"], got["rewards"]) == (n, r), arm
        assert (got["alpha"], got["beta"]) == (1.0 + r, 1.0 + n - r)
        for segment in SEGMENTS:
            within = httpx.get(f"{url}/arms/{arm}", params={"segment": segment}, timeout=10).json()
            assert set(within) == {"id", "segment", "alpha", "beta", "impressions", "rewards"}
            n_sa, r_sa = truth.impressions[(segment, arm)], truth.rewards[(segment, arm)]
            assert (within["id"], within["segment"], within["impressions"], within["rewards"]) == (
                arm,
                segment,
                n_sa,
                r_sa,
            )
            alpha, beta = backed_off(M, got["alpha"], got["beta"], float(n_sa), r_sa)
            assert (within["alpha"], within["beta"]) == pytest.approx((alpha, beta), rel=1e-12)
    for segment in SEGMENTS:
        top = httpx.get(f"{url}/arms", params={"top": 10, "segment": segment}, timeout=10).json()
        shown = {arm: n for (s, arm), n in truth.impressions.items() if s == segment}
        assert top["segment"] == segment and top["total"] == len(shown)
        assert {a["id"]: a["impressions"] for a in top["arms"]} == shown


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_process(proc)


def _node(table_csv: Path, state_dir: Path, processes: list[subprocess.Popen[bytes]], *args: str) -> Server:
    server = _start({}, ["--workers", "2", "--features", f"csv:{table_csv}", "--state-dir", str(state_dir), *args])
    processes.append(server.proc)
    return server


def test_segment_counts_are_exact_across_two_workers_and_a_kill_9(
    table_csv: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    state_dir = tmp_path / "state"
    server = _node(table_csv, state_dir, processes)
    truth = Truth()
    workers: set[str] = set()
    crossed = 0
    for i in range(90):
        segment = None if i % 4 == 3 else SEGMENTS[i % 3]
        answer, worker = _predict(server.url, segment)
        workers.add(worker)
        truth.shown(segment, answer["ids"])
        value = next(VALUES)
        crossed += _reward(server.url, answer["event_id"], answer["ids"][0], value) != worker
        truth.rewarded(segment, answer["ids"][0], value)
    assert len(workers) == 2 and crossed > 0, "every reward reached the worker that answered its event"
    _check_counts(server.url, truth)

    # Answers whose rewards come only after the restart: their events must come back with their segment.
    held = []
    for segment in SEGMENTS:
        answer, _ = _predict(server.url, segment)
        truth.shown(segment, answer["ids"])
        held.append((segment, answer))
    time.sleep(1.5)  # past impressions_sync_s (0.5 s): the unrewarded events are on disk
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()

    server = _node(table_csv, state_dir, processes)
    _check_counts(server.url, truth)
    for segment, answer in held:
        _reward(server.url, answer["event_id"], answer["ids"][1], 1.0)
        truth.rewarded(segment, answer["ids"][1], 1.0)
    _check_counts(server.url, truth)

    # The decision log recorded each answer's segment, and drawing it again gives the logged ranking.
    wanted = {answer["event_id"]: segment for segment, answer in held}
    logged: dict[str, Any] = {}
    assert wait_until(
        lambda: (
            len(logged.update({d.event_id: d for d in replay.logged(state_dir) if d.event_id in wanted}) or logged)
            == len(wanted)
        )
    )
    for event_id, decision in logged.items():
        assert decision.segment == wanted[event_id]
        assert np.array_equal(replay.redraw(decision)[0], decision.ranking)


def _journal(state_dir: Path) -> list[list[Any]]:
    return [record for path in node.journal_files(state_dir / "journal") for record in journal.read_records(path)]


def _reference(records: list[list[Any]], key: tuple[str | None, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The times of key's impressions, and the times and values of its rewards, from the journal's records."""
    segment, arm = key
    shown, reward_times, values = [], [], []
    for record in records:
        if record[0] == "e" and arm in record[3] and (segment is None or record[4:] == [segment]):
            shown.append(record[1])
        elif record[0] == "r" and record[3] == arm and (segment is None or record[5:] == [segment]):
            reward_times.append(record[1])
            values.append(record[4])
    return np.array(shown), np.array(reward_times), np.array(values)


def _check_decay(url: str, state_dir: Path, h: float, keys: list[tuple[str | None, str]]) -> None:
    """Each count /arms/{id} reports is the forward-decayed sum the journal's records give, at the moment the server
    read it: found from the impressions, then checked on the rewards and against the request's own time."""
    records = _journal(state_dir)
    for key in keys:
        segment, arm = key
        before = time.time()
        got = httpx.get(f"{url}/arms/{arm}", params={} if segment is None else {"segment": segment}, timeout=10).json()
        after = time.time()
        shown, reward_times, values = _reference(records, key)
        assert len(shown) and isinstance(got["impressions"], float)
        t0 = float(shown[0])
        # sum 2 ** ((t - now) / h) = impressions  =>  now = t0 + h * log2(sum 2 ** ((t - t0) / h) / impressions)
        now = t0 + h * math.log2(float(np.sum(np.exp2((shown - t0) / h))) / got["impressions"])
        assert before - 0.01 <= now <= after + 0.01
        rewards = float(np.sum(values * np.exp2((reward_times - now) / h)))
        assert got["rewards"] == pytest.approx(rewards, rel=1e-9, abs=1e-12)


def test_decayed_counts_equal_the_reference_from_the_journal_across_a_restart(
    table_csv: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    h = 2.0
    state_dir = tmp_path / "state"
    server = _node(table_csv, state_dir, processes, "--half-life-s", str(h))
    answers = 0
    for i in range(40):
        segment = SEGMENTS[i % 2]
        answer, _ = _predict(server.url, segment)
        answers += 1
        if i % 2 == 0:
            _reward(server.url, answer["event_id"], answer["ids"][0], next(VALUES) or 0.5)
        time.sleep(0.05)
    assert wait_until(lambda: sum(r[0] == "e" for r in _journal(state_dir)) == answers)
    keys: list[tuple[str | None, str]] = [(None, arm) for arm in ARMS[:3]] + [(SEGMENTS[0], ARMS[0])]
    keys = [k for k in keys if len(_reference(_journal(state_dir), k)[0])]
    _check_decay(server.url, state_dir, h, keys)

    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    server = _node(table_csv, state_dir, processes, "--half-life-s", str(h))
    _check_decay(server.url, state_dir, h, keys)  # replay weighs the journal's records by their own times


@pytest.mark.parametrize(
    ("segment", "problem"),
    [
        ("", "an empty string"),
        ("a\nb", "a control character U+000A at character 1"),
        ("x" * 129, "129 bytes"),
        ("é" * 65, "130 bytes"),
        (5, "got number 5"),
        (["fr"], "got array"),
    ],
)
def test_bad_segments_are_refused_with_422(server: Server, segment: object, problem: str) -> None:
    with server.client() as client:
        response = client.post("/predict", json={"user_id": "u", "candidates": ["a"], "segment": segment})
    assert response.status_code == 422
    body = response.json()
    assert (body["error"], body["field"]) == ("validation_error", "segment") and problem in body["message"]


@pytest.mark.parametrize("path", ["/arms", "/arms/strong"])
def test_a_bad_segment_query_parameter_is_refused_with_422(server: Server, path: str) -> None:
    with server.client() as client:
        for bad in ("", "a\tb", "x" * 129):
            response = client.get(path, params={"segment": bad})
            assert response.status_code == 422, bad
            assert response.json()["field"] == "segment"


def test_a_segment_of_128_bytes_is_taken(server: Server) -> None:
    with server.client() as client:
        body = {"user_id": "u", "candidates": ["strong", "weak"], "segment": "é" * 64}
        assert client.post("/predict", json=body).status_code == 200
        within = client.get("/arms/strong", params={"segment": "é" * 64}).json()
        assert within["segment"] == "é" * 64 and within["impressions"] >= 1


def test_schema_rule_for_segments() -> None:
    assert schemas.decode_predict(b'{"user_id":"u","candidates":["a"],"segment":"fr"}', 10).segment == "fr"
    assert schemas.decode_predict(b'{"user_id":"u","candidates":["a"]}', 10).segment is None
    assert schemas.decode_predict(b'{"user_id":"u","candidates":["a"],"segment":null}', 10).segment is None
    with pytest.raises(ValidationFailed, match="segment must be 1 to 128 bytes"):
        schemas.decode_predict(b'{"user_id":"u","candidates":["a"],"segment":"\\u0000"}', 10)


def test_a_worker_that_keeps_no_segment_counts_refuses_a_segment_clearly(table_csv: Path) -> None:
    """The loop off over the embedded table, or a fleet replica that does not follow the fan-out: the pipeline gets no
    segment source and answers 422 segments_unavailable instead of ranking globally under the segment's name (a
    Vertex source reads the store's pair entities: tests/features/test_store_segments.py)."""
    request = schemas.decode_predict(b'{"user_id":"u","candidates":["strong"],"segment":"fr"}', 10)
    source = LocalSource(table_csv, 1.0, 1.0)

    async def rank() -> None:
        await source.start()
        await recommend(request, source, SAMPLERS["kernel"], 1, None)

    with pytest.raises(SegmentsUnavailable) as refused:
        asyncio.run(rank())
    assert refused.value.status_code == 422 and refused.value.to_json()["error"] == "segments_unavailable"


def test_fleet_mode_takes_a_half_life_and_refuses_a_bad_one_at_start() -> None:
    """The fleet decays too (tests/fleet/test_half_life.py): a half-life passes the settings' checks with
    ``--events``; a negative one stops the start, as on a node."""
    from mab_service.config import Settings

    fleet = {"events": "pubsub:projects/p/topics/t", "features": "bigtable:projects/p/instances/i/tables/t"}
    assert Settings(**fleet, half_life_s=5.0).half_life_s == 5.0  # checked in __post_init__: no refusal
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mab_service",
            "serve",
            "--events",
            fleet["events"],
            "--features",
            fleet["features"],
            "--half-life-s",
            "-5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAB_")},
    )
    assert result.returncode != 0
    assert "half_life_s must be a finite number >= 0" in result.stderr
