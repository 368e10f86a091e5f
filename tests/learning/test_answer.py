"""The native /predict (``_answer.NativeAnswer``) against the Python path it stands in for, piece by piece: the same
candidates, posteriors, ranking and scores bit for bit, the same answer bytes, journal record and decision record, the
same holds and counts in the tables; and every body it does not take left to the Python path."""

from __future__ import annotations

import math
import mmap
import os
import random
import struct
from pathlib import Path

import numpy as np
import orjson
import pytest

from mab_service import schemas
from mab_service.ids import segment_key
from mab_service.learning import decisions, replay
from mab_service.learning._answer import NativeAnswer, json_double
from mab_service.learning._arms import ArmTable
from mab_service.learning._events import EventRing
from mab_service.learning.decisions import DecisionLog
from mab_service.learning.journal import frame
from mab_service.policy.sampler import sample_top_k

PRIOR = (1.0, 20.0)
WEIGHT = 10.0
MAX_CANDIDATES = 500
MAX_HELD = 50
T0 = 1_800_000_000.25


def node_tables() -> tuple[ArmTable, EventRing]:
    arms = ArmTable.create(mmap.mmap(-1, ArmTable.bytes_needed(4000, 100_000, 1000)), 4000, 100_000, 1000)
    for i in range(300):  # a catalogue with counts: posteriors that differ from arm to arm
        arms.add(f"c{i}", float(i % 17), float(i % 5), *PRIOR, now=T0 - 100)
    ring = EventRing.create(mmap.mmap(-1, EventRing.bytes_needed(256, 65536)), 256, 65536, 600.0)
    return arms, ring


def python_answer(
    arms: ArmTable, ring: EventRing, body: bytes, seed: int, event_id: str, t: float, now: float, rate: float
) -> tuple[int, bytes, bytes, bytes]:
    """What routes.predict and NodeLoop.answered do for ``body``, from the same pieces."""
    q = schemas.decode_predict(body, MAX_CANDIDATES)
    seed = q.seed if q.seed is not None else seed
    event_id = q.event_id or event_id
    pair_rows = None
    if q.segment is None:
        alpha, beta, _, rows = arms.gather(q.candidates, *PRIOR, now=t)
    else:
        alpha, beta, _, rows, pair_rows = arms.gather_segment(q.candidates, q.segment, WEIGHT, *PRIOR, now=t)
    n = len(q.candidates)
    k = n if q.top_k is None else min(q.top_k, n)
    ranking, scores = sample_top_k(alpha, beta, k, seed=seed)
    ids = [q.candidates[i] for i in ranking.tolist()]
    held, held_ids = ranking[:MAX_HELD], ids[:MAX_HELD]
    tag = 0 if q.segment is None else arms.find_or_insert(segment_key(q.segment), *PRIOR) + 1
    assert ring.hold(event_id, q.candidates, held, now, tag)
    failed = arms.add_impressions(q.candidates, rows, held, *PRIOR, now)
    if q.segment is not None:
        arms.add_impressions(q.candidates, pair_rows, held, *PRIOR, now, q.segment)
        arms.add(segment_key(q.segment), len(held_ids), 0.0, *PRIOR, now)
    fields = ("e", now, event_id, held_ids) if q.segment is None else ("e", now, event_id, held_ids, q.segment)
    record = frame(orjson.dumps(fields))
    answer = orjson.dumps(
        schemas.encode_predict(q.user_id, ids, scores, False, event_id), option=orjson.OPT_SERIALIZE_NUMPY
    )
    size, pieces = decisions.encode(
        event_id, now, q.user_id, seed, q.top_k, body, alpha, beta, ranking, q.segment,
        candidates=q.candidates, rows=rows, sample_rate=rate,
    )  # fmt: skip
    decision = b"".join(bytes(p) for p in pieces)
    assert len(decision) == size
    return failed, record, answer, decision


def native_answer(
    native: NativeAnswer, body: bytes, seed: int, event_id: str, now: float, rate: float
) -> tuple[int, bytes, bytes, bytes]:
    tag = native.segment_tag()
    assert native.hold(native.event_id or event_id, now, tag)
    failed, _, record, answer = native.commit(native.event_id or event_id, now)
    size, pieces = native.decision(native.event_id or event_id, now, rate)
    decision = b"".join(bytes(p) for p in pieces)
    assert len(decision) == size
    return failed, record, answer, decision


def bodies() -> list[bytes]:
    rng = random.Random(7)
    out = []
    for i in range(60):
        n = rng.choice([1, 2, 10, 100, 400])
        pool = [f"c{rng.randrange(400)}" for _ in range(n)]  # some repeated, some not in the catalogue
        if i % 7 == 0:
            pool += ["日本", "é", "e\u0301", "🎲", "x" * 1000, "a b", "\x7f"[:0] + 'q/"'.replace('"', "")]
        doc: dict[str, object] = {"user_id": f"user-{i}-é", "candidates": pool}
        if i % 2:
            doc["top_k"] = rng.choice([1, 3, 50, 1000])
        if i % 3 == 0:
            doc["seed"] = rng.getrandbits(64)
        if i % 4 == 1:
            doc["segment"] = rng.choice(["fr", "de-mobile", "日本"])
        if i % 5 == 2:
            doc["event_id"] = f"client-{i}:x.y_z"
        if i % 6 == 3:
            doc["seed"] = None
        out.append(orjson.dumps(doc))
    return out


def test_native_answers_as_the_python_path_does_bit_for_bit() -> None:
    py_arms, py_ring = node_tables()
    nat_arms, nat_ring = node_tables()
    native = NativeAnswer(nat_arms, nat_ring, MAX_CANDIDATES, *PRIOR, WEIGHT, MAX_HELD)
    segments = 0
    for i, body in enumerate(bodies()):
        seed = (i * 0x9E3779B97F4A7C15) % 2**64
        now = T0 + i
        rate = 1.0 if i % 2 else 0.25
        assert native.rank(body, seed), body[:200]
        q = schemas.decode_predict(body, MAX_CANDIDATES)
        assert native.candidates == q.candidates
        assert native.seed == (q.seed if q.seed is not None else seed)
        segments += q.segment is not None
        want = python_answer(py_arms, py_ring, body, seed, f"ev-{i}", native.t, now, rate)
        got = native_answer(native, body, seed, f"ev-{i}", now, rate)
        assert got[1] == want[1], "journal record"
        assert got[2] == want[2], "answer"
        assert got[3] == want[3], "decision record"
        assert got[0] == want[0]
    assert segments > 5
    # The tables hold the same counts afterwards: the same rows, impressions and rewards.
    assert len(py_arms) == len(nat_arms)
    a, b = py_arms.records(), nat_arms.records()
    for field in a.dtype.names:
        if field != "hash":  # each table hashes with its own key
            assert np.array_equal(a[field], b[field]), field
    assert [py_arms.id_at(i) for i in range(len(a))] == [nat_arms.id_at(i) for i in range(len(b))]


def test_the_decision_record_replays_to_the_answer(tmp_path: Path) -> None:
    arms, ring = node_tables()
    native = NativeAnswer(arms, ring, MAX_CANDIDATES, *PRIOR, WEIGHT, MAX_HELD)
    candidates = [f"c{i}" for i in range(0, 420, 3)] + ["new-1", "日本"]  # two the table lacks: named in the record
    body = orjson.dumps({"user_id": "u", "candidates": candidates, "top_k": 7, "segment": "fr"})
    assert native.rank(body, 12345)
    assert native.hold("ev", T0, native.segment_tag())
    _, _, _, answer = native.commit("ev", T0)
    log = DecisionLog(tmp_path, "w", file_bytes=1 << 20, max_bytes=1 << 22, table=arms)
    log.start()
    log.append(native.decision("ev", T0, 0.5))
    log.close()
    (path,) = decisions.files(tmp_path)
    (decision,) = decisions.read_file(path)
    assert (decision.event_id, decision.user_id, decision.seed, decision.top_k) == ("ev", "u", 12345, 7)
    assert (decision.segment, decision.sample_rate, decision.t) == ("fr", 0.5, T0)
    assert replay.candidates(decision) == candidates
    ranking, scores = replay.redraw(decision)
    assert np.array_equal(ranking, decision.ranking)
    assert orjson.loads(answer)["ids"] == [candidates[i] for i in ranking.tolist()]
    assert orjson.loads(answer)["scores"] == scores.tolist()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'"x"',
        b"{",
        b'{"user_id": "u"}',
        b'{"candidates": ["a"]}',
        b'{"user_id": "u", "candidates": []}',
        b'{"user_id": "u", "candidates": ["a"], "extra": 1}',
        b'{"user_id": "u", "candidates": ["a"], "user_id": "v"}',
        b'{"user_id": "u\\u0041", "candidates": ["a"]}',
        b'{"user_id": "u", "candidates": ["a\\ud800"]}',
        b'{"user_id": 3, "candidates": ["a"]}',
        b'{"user_id": "u", "candidates": "a"}',
        b'{"user_id": "u", "candidates": ["a", 3]}',
        b'{"user_id": "u", "candidates": [""]}',
        b'{"user_id": "u", "candidates": ["a\x7f"]}',
        b'{"user_id": "u", "candidates": ["a"], "top_k": 0}',
        b'{"user_id": "u", "candidates": ["a"], "top_k": -1}',
        b'{"user_id": "u", "candidates": ["a"], "top_k": 2.0}',
        b'{"user_id": "u", "candidates": ["a"], "top_k": true}',
        b'{"user_id": "u", "candidates": ["a"], "seed": -1}',
        b'{"user_id": "u", "candidates": ["a"], "seed": 18446744073709551616}',
        b'{"user_id": "u", "candidates": ["a"], "event_id": "a b"}',
        b'{"user_id": "u", "candidates": ["a"], "event_id": ""}',
        b'{"user_id": "u", "candidates": ["a"], "segment": ""}',
        b'{"user_id": "u", "candidates": ["a"], "segment": 3}',
        b'{"user_id": "u", "candidates": ["a"], "segment": "' + b"s" * 129 + b'"}',
        b'{"user_id": "' + b"u" * 1025 + b'", "candidates": ["a"]}',
        b'{"user_id": "u", "candidates": ["a"]} x',
        b'{"user_id": "u", "candidates": ["a"],}',
        b'{"user_id": "u", "candidates": ["' + b"x" * 1025 + b'"]}',
        b'{"user_id": "u", "candidates": [' + b",".join(b'"c%d"' % i for i in range(MAX_CANDIDATES + 1)) + b"]}",
        b'\xef\xbb\xbf{"user_id": "u", "candidates": ["a"]}',
        b'{"user_id": "\xff", "candidates": ["a"]}',
    ],
)
def test_bodies_it_does_not_take_go_to_the_python_path(body: bytes) -> None:
    arms, ring = node_tables()
    native = NativeAnswer(arms, ring, MAX_CANDIDATES, *PRIOR, WEIGHT, MAX_HELD)
    assert not native.rank(body, 1)


def test_it_takes_what_it_can_answer_exactly() -> None:
    arms, ring = node_tables()
    native = NativeAnswer(arms, ring, MAX_CANDIDATES, *PRIOR, WEIGHT, MAX_HELD)
    for body in [
        b'{"user_id": "", "candidates": ["a"]}',
        b'{"user_id": "u", "candidates": ["a"], "top_k": null, "seed": null, "event_id": null, "segment": null}',
        b' {"candidates": ["a", "a", "b"], "user_id": "\xc3\xa9" } ',
        b'{"user_id": "u", "candidates": ["a"], "seed": 18446744073709551615}',
        b'{"user_id": "' + "é".encode() * 1024 + b'", "candidates": ["a"]}',
    ]:
        assert native.rank(body, 1), body
    assert native.n == 1


def test_json_double_is_orjsons() -> None:
    rng = random.Random(3)
    values = [0.0, -0.0, 1.0, 1e-5, 1e-6, 1.5e-5, 1e16, 1e17, 5e-324, 1.7976931348623157e308, 1_800_000_000.123456]
    for _ in range(20_000):
        values.append(struct.unpack("<d", struct.pack("<Q", rng.getrandbits(63)))[0])
        values.append(rng.random() * 10 ** rng.randint(-12, 20))
        values.append(rng.betavariate(0.3, 30))
    for value in values:
        if math.isfinite(value):
            assert json_double(value) == orjson.dumps(value), value


def test_event_ids_are_fresh_in_a_forked_child() -> None:
    from mab_service.learning.loop import LoopBase

    LoopBase.new_event_id()  # the parent has read its pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, LoopBase.new_event_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    parents = [LoopBase.new_event_id() for _ in range(300)]  # past the end of its pool, too
    assert child not in parents
    assert len(set(parents)) == 300
    assert all(len(e) == 32 and int(e, 16) >= 0 for e in parents)


def test_the_tables_names_are_the_reference_names() -> None:
    arms, _ = node_tables()
    for key in ["日本", "é", "x" * 1000, "a b"]:
        arms.add(key, 1.0, 0.0, *PRIOR)
    rows = list(range(len(arms)))[::-1]
    assert arms.names(rows) == decisions.names_tail(rows, [arms.id_at(r) for r in rows])
    assert arms.names([]) == b""
    with pytest.raises(IndexError):
        arms.names([len(arms)])
