"""Property tests of POST /predict against a real server process: whatever the body and content type, the answer
is a valid ranking (200) or a JSON error (400, 413, 415 or 422), never a 5xx, and the worker lives on.

Bodies are written as JSON text here rather than by a JSON library, so that they can hold what no library writes:
integers of any size, NaN and Infinity literals, lone surrogate escapes, duplicate keys, invalid UTF-8.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeAlias

import httpx
import orjson
import pytest
from hypothesis import currently_in_test_context, event, example, given, settings, strategies as st

from mab_service.ids import MAX_ID_BYTES, id_problem
from tests.conftest import Server, stop_process

MAX_BODY_BYTES = 256 * 1024
MAX_CANDIDATES = 500
ERROR_STATUSES = {400, 413, 415, 422}
KNOWN_IDS = ["strong", "weak", "mid", "é-unicode"] + [f"c{i}" for i in range(0, 5000, 7)]


@dataclass(frozen=True)
class Raw:
    """JSON text written as it is."""

    text: bytes


@dataclass(frozen=True)
class Obj:
    """A JSON object as its members in order; a key may come twice."""

    members: tuple[tuple[str | Raw, Node], ...]


Node: TypeAlias = "None | bool | int | float | str | Raw | Obj | list[Node] | dict[str, Node]"


def dump(node: Node) -> bytes:
    """The JSON text of ``node``; integers of any size, and non-finite floats as NaN / Infinity literals."""
    if node is None or isinstance(node, (bool, str)):
        return orjson.dumps(node)
    if isinstance(node, int):
        return str(node).encode()
    if isinstance(node, float):
        if node != node:
            return b"NaN"
        if node in (float("inf"), float("-inf")):
            return b"Infinity" if node > 0 else b"-Infinity"
        return repr(node).encode()
    if isinstance(node, Raw):
        return node.text
    if isinstance(node, dict):
        node = Obj(tuple(node.items()))
    if isinstance(node, Obj):
        return b"{" + b",".join(dump(key) + b":" + dump(value) for key, value in node.members) + b"}"
    return b"[" + b",".join(dump(item) for item in node) + b"]"


LONG_ID = "x" * 100_000
DEEP_ARRAY = Raw(b"[" * 10_000 + b"]" * 10_000)
DEEP_OBJECT = Raw(b'{"a":' * 2_000 + b"1" + b"}" * 2_000)
# Scalars a field may be replaced with: each makes a 200, a 400 or a 422 depending on the field, never worse.
AWKWARD_SCALARS: list[Node] = [
    Raw(b"1" + b"0" * 400),  # 10**400
    Raw(b"-1" + b"0" * 400),
    2**64,
    2**64 - 1,
    2**63,
    -(2**63) - 1,
    0,
    -1,
    Raw(b"-0"),
    -0.0,
    1.0,
    1.5,
    Raw(b"1e400"),
    Raw(b"-1e400"),
    Raw(b"1e-400"),
    Raw(b"1E2"),
    float("nan"),
    float("inf"),
    float("-inf"),
    Raw(b"nan"),
    Raw(b"+1"),
    Raw(b"01"),
    Raw(b".5"),
    Raw(b"0x10"),
    True,
    False,
    None,
    "",
    " ",
    "x" * 1025,
    Raw(b'"\\ud800"'),  # lone surrogates, escaped
    Raw(b'"\\udfff"'),
    Raw(b'"a\\ud800b"'),
    Raw(b'"\\ud83d\\ude00"'),  # a proper pair
    Raw(b'"\\u0000"'),
    Raw(b'"\xff"'),  # invalid UTF-8
    Raw(b'"\xc0\xaf"'),  # an overlong encoding
    Raw(b'"\xed\xa0\x80"'),  # a surrogate encoded in UTF-8
    Raw(b'"\xf4\x90\x80\x80"'),  # beyond U+10FFFF
    Raw(b'"\x01"'),  # a raw control character
    "日本語🙂\u200b\ufeff",
]
AWKWARD: list[Node] = [
    *AWKWARD_SCALARS,
    LONG_ID,
    "y" * MAX_BODY_BYTES,  # the body gets too large
    [],
    Obj(()),
    [[[]]],
    DEEP_ARRAY,
    DEEP_OBJECT,
    ["c1"] * (MAX_CANDIDATES + 1),
    [f"c{i}" for i in range(MAX_CANDIDATES + 1)],
]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), st.sampled_from(AWKWARD_SCALARS)
)


def _objects(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    keys = st.one_of(st.text(max_size=10), st.sampled_from(["user_id", "candidates", "top_k", "seed"]))
    return st.lists(st.tuples(keys, children), max_size=6).map(lambda members: Obj(tuple(members)))


json_values: st.SearchStrategy[Node] = st.recursive(
    json_scalars, lambda children: st.lists(children, max_size=6) | _objects(children), max_leaves=30
)
# Ids that keep the id rule (mab_service.ids); the awkward ones come in through the edits.
candidate_ids = st.one_of(
    st.sampled_from(KNOWN_IDS), st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Node]:
    """A valid /predict request: known and unknown ids, duplicates, top_k and seed or not."""
    candidates: list[Node] = draw(st.lists(candidate_ids, min_size=1, max_size=40))
    if draw(st.integers(0, 9)) == 0:  # now and then an id as long as the rule allows
        candidates.insert(draw(st.integers(0, len(candidates))), "x" * MAX_ID_BYTES)
    request: dict[str, Node] = {"user_id": draw(st.text(max_size=50)), "candidates": candidates}
    if draw(st.booleans()):
        request["top_k"] = draw(st.integers(1, 60))
    if draw(st.booleans()):
        request["seed"] = draw(st.integers(0, 2**64 - 1))
    return request


awkward = st.one_of(st.sampled_from(AWKWARD), json_values)
fields = st.sampled_from(["user_id", "candidates", "top_k", "seed"])
Change: TypeAlias = "tuple[str, str | int | Raw, Node]"
changes: st.SearchStrategy[Change] = st.one_of(
    st.tuples(st.just("replace"), fields, awkward),
    st.tuples(st.just("drop"), fields, st.none()),
    st.tuples(st.just("candidate"), st.integers(0, 39), awkward),
    st.tuples(st.just("duplicate-before"), fields, awkward),
    st.tuples(st.just("duplicate-after"), fields, awkward),
    st.tuples(st.just("extra"), st.one_of(st.text(max_size=10), st.just(Raw(b'"\\ud800"'))), awkward),
)


def changed(request: dict[str, Node], edits: list[Change]) -> Obj:
    """``request`` after the edits: a field replaced, dropped or written twice, one id replaced, a key added."""
    members: list[tuple[str | Raw, Node]] = list(request.items())
    for kind, where, value in edits:
        names = [key for key, _ in members]
        if kind == "candidate":
            assert isinstance(where, int)
            i = names.index("candidates") if "candidates" in names else -1
            candidates = members[i][1] if i >= 0 else None
            if isinstance(candidates, list) and candidates:
                candidates = list(candidates)
                candidates[where % len(candidates)] = value
                members[i] = ("candidates", candidates)
        elif kind == "extra":
            assert isinstance(where, (str, Raw))
            members.append((where, value))
        elif where in names:
            i = names.index(where)
            if kind == "replace":
                members[i] = (members[i][0], value)
            elif kind == "drop":
                del members[i]
            else:  # the same key twice: the last one counts
                members.insert(i + (kind == "duplicate-after"), (members[i][0], value))
        elif kind != "drop":
            assert isinstance(where, str)
            members.append((where, value))
    return Obj(tuple(members))


class Live:
    """The module's server, a client for it, and everything the server has written to its output."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.client = server.client()
        self.output: list[bytes] = []
        self._reader = threading.Thread(target=self._read, args=(server.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[bytes] | None) -> None:
        # Always reading, so that a server writing tracebacks never blocks on a full pipe.
        if stdout is not None:
            for line in stdout:
                self.output.append(line)

    def log(self) -> str:
        return b"".join(self.output[-40:]).decode(errors="replace")

    def post(self, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
        headers = {} if content_type is None else {"content-type": content_type}
        try:
            return self.client.post("/predict", content=body, headers=headers)
        except httpx.TransportError as exc:
            raise AssertionError(f"no answer ({exc!r}); server output:\n{self.log()}") from exc

    def close(self) -> None:
        self.client.close()
        proc = self.server.proc
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is not None:
            self._reader.join(timeout=5)  # the pipe has ended: let the reader finish before the pipe is closed
        stop_process(proc)


@pytest.fixture(scope="module")
def live(server_factory: Callable[..., Server], table_csv: Path) -> Iterator[Live]:
    limits = ["--max-body-bytes", str(MAX_BODY_BYTES), "--max-candidates", str(MAX_CANDIDATES)]
    server = server_factory(args=["--features", f"csv:{table_csv}", *limits])
    live = Live(server)
    yield live
    live.close()


def check(live: Live, body: bytes, content_type: str | None = "application/json") -> int:
    """Post ``body``, check the answer (a valid ranking of its candidates or the JSON error it calls for) and
    return its status."""
    r = live.post(body, content_type)
    if currently_in_test_context():
        event(f"status {r.status_code}")
    assert r.status_code < 500, f"{r.status_code} {r.text[:300]}\nserver output:\n{live.log()}"
    assert r.headers["content-type"] == "application/json"
    json_type = content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"
    too_large = len(body) > MAX_BODY_BYTES
    if not json_type:
        assert r.status_code in ({413, 415} if too_large else {415}), r.text
    elif too_large:
        assert r.status_code == 413, r.text
    else:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            assert r.status_code == 400, r.text  # NaN, Infinity and numbers beyond a double included
        else:
            assert r.status_code in (200, 422), r.text
    if r.status_code != 200:
        assert r.status_code in ERROR_STATUSES, r.text
        error = r.json()
        assert isinstance(error, dict) and isinstance(error.get("error"), str) and error["error"], error
        assert isinstance(error.get("message"), str) and error["message"], error
        return r.status_code
    request = orjson.loads(body)
    answer = r.json()
    distinct = list(dict.fromkeys(request["candidates"]))
    assert all(id_problem(c) is None for c in distinct), distinct
    top_k = request.get("top_k")
    assert answer["user_id"] == request["user_id"]
    ids, scores = answer["ids"], answer["scores"]
    assert len(ids) == len(scores) == (len(distinct) if top_k is None else min(top_k, len(distinct)))
    assert len(set(ids)) == len(ids) and set(ids) <= set(distinct)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores), scores
    assert scores == sorted(scores, reverse=True)
    return 200


@settings(max_examples=100, deadline=None)
@given(json_values)
@example(DEEP_ARRAY)
@example(DEEP_OBJECT)
@example(Obj((("user_id", "u"), ("candidates", ["mid"]), ("candidates", 5))))
@example(Obj((("user_id", "u"), ("candidates", 5), ("candidates", ["mid"]))))
@example(Obj(((Raw(b'"\\ud800"'), 1), ("user_id", "u"), ("candidates", ["mid"]))))
def test_any_json_value_is_answered(live: Live, value: Node) -> None:
    check(live, dump(value))


MID: dict[str, Node] = {"user_id": "u", "candidates": ["mid"]}


@settings(max_examples=150, deadline=None)
@given(requests(), st.lists(changes, max_size=2))
@example(MID, [("replace", "top_k", Raw(b"1" + b"0" * 400))])
@example(MID, [("replace", "seed", float("nan"))])
@example(MID, [("replace", "seed", Raw(b"Infinity"))])
@example(MID, [("replace", "top_k", Raw(b"-0"))])
@example(MID, [("replace", "top_k", True)])
@example(MID, [("replace", "seed", 2**64)])
@example(MID, [("candidate", 0, Raw(b'"\\ud800"'))])
@example(MID, [("candidate", 0, LONG_ID)])
@example(MID, [("candidate", 0, "")])
@example(MID, [("duplicate-after", "candidates", 5)])
@example(MID, [("replace", "candidates", DEEP_ARRAY)])
@example(MID, [("replace", "user_id", Raw(b'"\xff"'))])
@example(MID, [("replace", "candidates", [])])
def test_a_request_with_fields_changed_is_answered(live: Live, request: dict[str, Node], edits: list[Change]) -> None:
    check(live, dump(changed(request, edits)))


@st.composite
def damaged_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with its bytes damaged: cut, a byte changed or inserted, something put before or after."""
    body = dump(draw(requests()))
    at = draw(st.integers(0, len(body)))
    junk = draw(
        st.one_of(
            st.binary(min_size=1, max_size=4),
            st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"NaN", b",", b"}"]),
        )
    )
    how = draw(st.sampled_from(["cut", "replace", "insert", "prefix", "suffix"]))
    if how == "cut":
        return body[:at]
    if how == "replace":
        return body[:at] + junk + body[at + len(junk) :]
    if how == "insert":
        return body[:at] + junk + body[at:]
    return junk + body if how == "prefix" else body + junk


@settings(max_examples=80, deadline=None)
@given(st.one_of(damaged_bodies(), st.binary(max_size=300)))
@example(b"\xef\xbb\xbf" + dump(MID))  # a byte order mark
@example(b'{"user_id": "u", "candidates": ["\xff"]}')
@example(b"")
def test_damaged_bytes_are_answered(live: Live, body: bytes) -> None:
    check(live, body)


CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/json;",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonx",
    "application/problem+json",
    "text/json",
    "application/*",
    "",
    "application/json, text/plain",
]


@settings(max_examples=40, deadline=None)
@given(
    st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)),
    st.one_of(requests().map(dump), st.sampled_from([b"", b"{", dump(MID), b'{"user_id": "u"}'])),
)
@example(None, dump(MID))
@example("text/plain", b"x" * (MAX_BODY_BYTES + 1))
@example("application/json", b'{"user_id": "' + b"x" * MAX_BODY_BYTES + b'", "candidates": ["mid"]}')
def test_any_content_type_is_answered(live: Live, content_type: str | None, body: bytes) -> None:
    check(live, body, content_type)


def test_the_same_worker_still_serves(live: Live) -> None:
    """Runs last: the one process that took every request above is alive, ready, ranks as before, and has
    counted no 5xx and logged no traceback."""
    assert live.server.proc.poll() is None, live.log()
    assert live.client.get("/health").status_code == 200
    body: dict[str, Node] = {"user_id": "u", "candidates": ["weak", "mid", "strong", "weak"], "top_k": 2, "seed": 1}
    assert check(live, dump(body)) == 200
    assert live.post(dump(body)).json()["ids"] == ["strong", "mid"]
    counts: dict[str, float] = {}
    for labels, value in re.findall(r"^mab_requests_total\{(.*)\} (\S+)$", live.client.get("/metrics").text, re.M):
        status = re.search(r'status="(\d+)"', labels)
        if 'endpoint="/predict"' in labels and status:
            counts[status[1]] = float(value)
    assert counts.get("200", 0) > 0 and counts.get("400", 0) > 0 and counts.get("422", 0) > 0, counts
    assert not [status for status in counts if status.startswith("5")], counts
    assert b"Traceback" not in b"".join(live.output), live.log()
