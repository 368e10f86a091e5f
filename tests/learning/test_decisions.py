"""The decision log: records read back as written (by rows or body, version 2 or 1), files rotate within their bound
and name their own rows, a replay draws the same answer, and a sample rate keeps its share of the answers."""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

import numpy as np
import orjson

from mab_service.config import Settings
from mab_service.learning import decisions, node, replay
from mab_service.learning.decisions import DecisionLog
from mab_service.learning.loop import NodeLoop
from mab_service.policy.sampler import sample_top_k

#: Version 1 records (three answers, the last ranked within segment "s1") as the log wrote them before version 2.
V1_FILE = Path(__file__).parent / "data" / "v1.dlog"


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


class Table:
    """``rows`` rows, each named ``prefix`` and its number, as the writer reads an arm table."""

    def __init__(self, rows: int, prefix: str = "arm-") -> None:
        self.rows = rows
        self.prefix = prefix

    def __len__(self) -> int:
        return self.rows

    def id_at(self, row: int) -> str:
        return f"{self.prefix}{row}"

    def names(self, rows: list[int]) -> bytes:
        return decisions.names_tail(rows, [self.id_at(row) for row in rows])


def _rows_record(rows: list[int], seed: int, event_id: str = "ev", k: int = 3) -> decisions.Record:
    n = len(rows)
    alpha = np.linspace(1.0, 9.0, n)
    beta = np.full(n, 2.5)
    ranking, _ = sample_top_k(alpha, beta, k, seed=seed)
    ids = [f"new-{i}" for i in range(n)]  # the ids of rows -1
    rows_array = np.array(rows, np.int32)
    return decisions.encode(
        event_id, 2.0, "u", seed, k, b"{}", alpha, beta, ranking, "s", candidates=ids, rows=rows_array, sample_rate=0.5
    )


def test_a_record_by_rows_carries_no_body_and_reads_back_through_its_names(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, "w", file_bytes=1 << 20, max_bytes=1 << 22, table=Table(100))
    log.start()
    first, second = _rows_record([5, 7, 9, 11], 1, "ev1"), _rows_record([9, 5, 40], 2, "ev2")
    log.append(first)
    log.append(second)
    log._flush()
    log.close()
    (path,) = decisions.files(tmp_path)
    data = path.read_bytes()
    # One names record for the five rows, then the records: head, rows (u32), alpha, beta, ranking (u16).
    assert data[:4] == decisions.MAGIC_NAMES and data.count(decisions.MAGIC) == 2
    assert first[0] == 60 + len("ev1us") + 4 * 4 + 16 * 4 + 2 * 3
    one, two = decisions.read_file(path)
    assert (one.ids, two.ids) == (["arm-5", "arm-7", "arm-9", "arm-11"], ["arm-9", "arm-5", "arm-40"])
    assert (one.body, one.segment, one.sample_rate, one.top_k, one.seed) == (b"", "s", 0.5, 3, 1)
    assert replay.candidates(one) == one.ids
    for decision in (one, two):
        ranking, _ = replay.redraw(decision)
        assert ranking.dtype == np.int64 and np.array_equal(ranking, decision.ranking)


def test_candidates_without_a_row_are_named_in_their_record(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, "w", file_bytes=1 << 20, max_bytes=1 << 22, table=Table(10))
    log.start()
    record = _rows_record([3, -1, 8, -1], 4)
    log.append(record)
    log.close()
    assert record[0] == 60 + len("evus") + len("new-1\0new-3") + 4 * 4 + 16 * 4 + 2 * 3
    (path,) = decisions.files(tmp_path)
    (decision,) = decisions.read_file(path)
    assert decision.ids == ["arm-3", "new-1", "arm-8", "new-3"] and decision.body == b""
    assert path.read_bytes().count(b"arm-") == 2  # only the rows were named by the file


def test_the_widest_seed_and_top_k_a_request_may_send_read_back(tmp_path: Path) -> None:
    body = orjson.dumps({"user_id": "u", "candidates": ["a", "b"]})
    record = decisions.encode("ev", 1.0, "u", 2**64 - 1, 2**64 - 1, body, np.ones(2), np.ones(2), np.array([1, 0]))
    path = tmp_path / "x.dlog"
    path.write_bytes(b"".join(bytes(memoryview(p)) for p in record[1]))  # type: ignore[arg-type]
    (decision,) = decisions.read_file(path)
    assert (decision.seed, decision.top_k) == (2**64 - 1, 2**64 - 1)


def test_posteriors_that_are_float32s_are_written_as_such_and_read_back_exactly(tmp_path: Path) -> None:
    body = orjson.dumps({"user_id": "u", "candidates": ["a", "b", "c"]})
    whole, fractional = np.array([1.0, 7.0, 1e6 + 0.5]), np.array([1.0, 7.0, 0.1])
    ranking = np.array([2, 0, 1])
    narrow = decisions.encode("ev1", 1.0, "u", 9, None, body, whole, whole + 2, ranking)
    wide = decisions.encode("ev2", 1.0, "u", 9, None, body, whole, fractional, ranking)  # one value not a float32
    assert narrow[0] == wide[0] - 8 * 3
    path = tmp_path / "x.dlog"
    path.write_bytes(b"".join(bytes(memoryview(p)) for p in (*narrow[1], *wide[1])))  # type: ignore[arg-type]
    one, two = decisions.read_file(path)
    assert one.alpha.dtype == np.float64 and one.alpha.tobytes() == whole.tobytes()
    assert one.beta.tobytes() == (whole + 2).tobytes() and two.beta.tobytes() == fractional.tobytes()
    assert np.array_equal(replay.redraw(one)[0], sample_top_k(whole, whole + 2, 3, seed=9)[0])


def test_without_rows_the_record_keeps_the_body() -> None:
    # A store ranked (no arm table rows): the body as it arrived.
    body = orjson.dumps({"user_id": "u", "candidates": ["a", "b"]})
    size, pieces = decisions.encode("ev", 1.0, "u", 3, None, body, np.ones(2), np.ones(2), np.array([1, 0]))
    assert pieces[1] == body
    assert size == 60 + len("evu") + len(body) + 8 * 2 + 2 * 2  # alpha and beta of ones: as float32


def test_a_damaged_blob_or_row_ends_the_file_for_a_reader() -> None:
    size, pieces = _rows_record([3, -1, 8], 4)
    record = b"".join(bytes(memoryview(p)) for p in pieces)  # type: ignore[arg-type]
    names = {3: "a", 8: "b"}
    assert decisions._read(record, 0, names) is not None
    blob = len(pieces[0]) - len(b"new-1")  # the blob is the head's tail: the id of row -1
    assert decisions._read(record[:blob] + b"\xff" + record[blob + 1 :], 0, names) is None  # not UTF-8
    rows = len(pieces[0])
    damaged = record[:rows] + (-5).to_bytes(4, "little", signed=True) + record[rows + 4 :]
    assert decisions._read(damaged, 0, names) is None


def test_every_file_names_its_own_rows(tmp_path: Path) -> None:
    # Files are deleted oldest first: each must name the rows it uses, whatever the files before it named.
    log = DecisionLog(tmp_path, "w", file_bytes=100, max_bytes=1 << 20, table=Table(4, "id"))
    log.start()
    for i in range(4):
        log.append(_rows_record([1, 2, 3], i, f"ev{i}"))
        log._flush()  # each write past file_bytes: a file per record
    log.close()
    paths = decisions.files(tmp_path)
    assert len(paths) == 4
    for path in paths:
        (decision,) = decisions.read_file(path)
        assert decision.ids == ["id1", "id2", "id3"]


def test_a_wide_ranking_reads_back() -> None:
    n = decisions.NARROW_MAX + 10
    alpha, beta = np.full(n, 2.0), np.full(n, 2.0)
    ranking = np.array([n - 1, 0, 70_000], dtype=np.int64)
    rows = np.arange(n, dtype=np.int32)
    ids = [str(row) for row in range(n)]
    size, pieces = decisions.encode("ev", 1.0, "u", 1, 3, b"", alpha, beta, ranking, candidates=ids, rows=rows)
    assert isinstance(pieces[4], np.ndarray) and pieces[4].dtype == np.uint32 and size == 60 + 3 + 4 * n + 8 * n + 4 * 3
    record = b"".join(bytes(memoryview(p)) for p in pieces)  # type: ignore[arg-type]
    names = decisions._NAMES.pack(decisions.MAGIC_NAMES, 0, zlib.crc32(b""))
    assert decisions._read(names + record, len(names), {}) is None  # rows the file never named: damaged
    decoded = decisions._read(record, 0, {row: str(row) for row in range(n)})
    assert decoded is not None and decoded[0].ranking.tolist() == [n - 1, 0, 70_000]


def test_version_1_files_still_read_and_replay(tmp_path: Path) -> None:
    records = list(decisions.read_file(V1_FILE))
    assert [d.event_id for d in records] == ["old0", "old1", "old2"]
    assert [d.segment for d in records] == [None, None, "s1"]
    directory = tmp_path / "decisions"
    directory.mkdir()
    # A version 1 file beside a version 2 one, as after an upgrade.
    (directory / "a-000001.dlog").write_bytes(V1_FILE.read_bytes())
    (directory / "b-000001.dlog").write_bytes(_decision(4)[0])
    decision = replay.find(tmp_path, "old2")
    assert decision is not None and decision.ids is None and decision.sample_rate == 1.0
    assert replay.candidates(decision) == [f"c{j}" for j in range(12)]
    assert np.array_equal(replay.redraw(decision)[0], decision.ranking)
    assert replay.find(tmp_path, "ev4") is not None


def test_sampling_keeps_a_share_chosen_by_the_event_id(tmp_path: Path) -> None:
    ids = [f"ev-{i:06d}" for i in range(20_000)]
    for rate, low, high in [(0.0, 0, 0), (1.0, 20_000, 20_000), (0.25, 4_700, 5_300)]:
        log = DecisionLog(tmp_path, "w", file_bytes=1, max_bytes=2, sample_rate=rate)
        taken = [e for e in ids if log.takes(e)]
        assert low <= len(taken) <= high
        # Deterministic given the ids: any worker, any restart keeps the same ones.
        again = DecisionLog(tmp_path, "x", file_bytes=1, max_bytes=2, sample_rate=rate)
        assert taken == [e for e in ids if again.takes(e)]
    random_ids = [f"{zlib.crc32(str(i).encode()):08x}{i:024x}" for i in range(20_000)]
    quarter = DecisionLog(tmp_path, "w", file_bytes=1, max_bytes=2, sample_rate=0.25)
    assert 4_700 <= sum(quarter.takes(e) for e in random_ids) <= 5_300


def _loop_settings(tmp_path: Path, sample: float) -> Settings:
    return Settings(
        features="demo",
        state_dir=str(tmp_path / "state"),
        max_held_events=1000,
        max_held_members=20000,
        max_new_arms=1000,
        decision_log_sample=sample,
    )


def test_the_loop_logs_answers_by_rows_and_replays_them(tmp_path: Path) -> None:
    settings = _loop_settings(tmp_path, 0.25)

    async def run() -> tuple[list[str], list[str]]:
        with node.using(settings) as current:
            loop = NodeLoop(current, settings, apply_counts=True)
            await loop.start()
            made: list[str] = []
            ids = [current.arms.id_at(row) for row in range(40)]
            try:
                for i in range(200):
                    candidates = ids[i % 7 : i % 7 + 30]
                    alpha, beta, _, rows = current.arms.gather(candidates, 1.0, 1.0)
                    ranking, _ = sample_top_k(alpha, beta, 5, seed=i)
                    picked = [candidates[j] for j in ranking.tolist()]
                    made.append(
                        loop.answered(
                            loop.new_event_id(), False, "u", b"{}", candidates, alpha, beta, rows, ranking, picked, i, 5
                        )
                    )
            finally:
                await loop.close()
            return made, ids

    made, ids = asyncio.run(run())
    logged = {d.event_id: d for d in replay.logged(settings.state_path())}
    assert set(logged) == {e for e in made if zlib.crc32(e.encode()) < 2**30}  # a quarter, by the event ids
    assert 20 <= len(logged) <= 80
    for decision in logged.values():
        assert decision.body == b"" and decision.sample_rate == 0.25
        i = decision.seed  # the answer's number
        assert decision.ids == ids[i % 7 : i % 7 + 30]
        assert np.array_equal(replay.redraw(decision)[0], decision.ranking)
