"""The decision log: records read back as written, files rotate within their bound, a replay draws the same answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from mab_service.learning import decisions, replay
from mab_service.learning.decisions import DecisionLog
from mab_service.policy.sampler import sample_top_k


def _decision(i: int, n: int = 30, k: int | None = 5) -> tuple[bytes, bytes]:
    body = orjson.dumps({"user_id": f"u{i}", "candidates": [f"c{j}" for j in range(n)] + ["c0"], "top_k": k})
    alpha = np.arange(1, n + 1, dtype=np.float64)
    beta = np.full(n, 3.0)
    seed = 1000 + i
    ranking, _ = sample_top_k(alpha, beta, n if k is None else k, seed=seed)
    size, parts = decisions.encode(f"ev{i}", 1.0 + i, f"u{i}", seed, k, body, alpha, beta, ranking)
    record = b"".join(bytes(memoryview(p)) for p in parts)
    assert len(record) == size
    return record, body


def test_records_round_trip(tmp_path: Path) -> None:
    record, body = _decision(3)
    path = tmp_path / "x.dlog"
    path.write_bytes(record + record[:-5])  # a torn tail is ignored
    (decision,) = decisions.read_file(path)
    assert (decision.event_id, decision.user_id, decision.seed, decision.top_k, decision.body) == (
        "ev3",
        "u3",
        1003,
        5,
        body,
    )
    assert decision.alpha.tolist() == list(range(1, 31))
    assert len(decision.ranking) == 5


def test_replay_draws_the_logged_answer_again(tmp_path: Path) -> None:
    directory = tmp_path / "decisions"
    directory.mkdir()
    (directory / "w-000001.dlog").write_bytes(b"".join(_decision(i)[0] for i in range(10)))
    decision = replay.find(tmp_path, "ev7")
    assert decision is not None
    ranking, scores = replay.redraw(decision)
    assert np.array_equal(ranking, decision.ranking)
    assert list(scores) == sorted(scores, reverse=True)
    assert replay.candidates(decision) == [f"c{j}" for j in range(30)]  # the duplicate c0 is dropped as it was
    p = replay.propensities(decision, 2000)
    assert p.shape == (5,) and np.all((0 < p) & (p <= 1))
    assert replay.find(tmp_path, "nope") is None


def test_replay_command_prints_the_same_ranking(tmp_path: Path, capsys: object) -> None:
    directory = tmp_path / "decisions"
    directory.mkdir()
    (directory / "w-000001.dlog").write_bytes(_decision(1)[0])
    assert replay.main([str(tmp_path), "ev1", "--propensities", "100"]) == 0
    report = orjson.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert report["same_as_logged"] is True and len(report["propensities"]) == 5
    assert replay.main([str(tmp_path), "missing"]) == 1


def test_files_rotate_and_stay_within_their_bound(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, "w", file_bytes=4000, max_bytes=20000)
    log.start()
    body = orjson.dumps({"user_id": "u", "candidates": ["a", "b"]})
    ranking = np.array([1, 0])
    record = decisions.encode("ev", 1.0, "u", 5, None, body, np.ones(2), np.ones(2), ranking)
    for _ in range(200):
        log.append(record)
        log._flush()  # one flush per record, as a busy writer thread would
    log.close()
    files = decisions.files(tmp_path)
    assert len(files) > 1
    assert sum(p.stat().st_size for p in files) <= 20000
    assert log.written == 200 and log.dropped == 0
