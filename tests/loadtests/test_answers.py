from __future__ import annotations

import orjson
import pytest

from loadtests import answers

BODY = orjson.dumps({"user_id": "u7", "candidates": ["a", "b", "c", "b"], "top_k": 5})
RIGHT = {"user_id": "u7", "ids": ["c", "a", "b"], "scores": [0.9, 0.5, 0.1]}


def test_expect_counts_distinct_candidates_and_caps_top_k() -> None:
    expected = answers.expect(BODY)
    assert expected == answers.Expected("u7", frozenset("abc"), 3)
    assert answers.expect(orjson.dumps({"user_id": "u", "candidates": ["a", "b", "c"], "top_k": 2})).n_ids == 2
    assert answers.expect(orjson.dumps({"user_id": "u", "candidates": ["a", "b"]})).n_ids == 2


def test_a_right_answer_passes() -> None:
    assert answers.check_predict(answers.expect(BODY), 200, orjson.dumps(RIGHT)) is None
    # Go's encoding/json writes 1.0 as 1: an integer score is a number too.
    assert answers.check_predict(answers.expect(BODY), 200, orjson.dumps(RIGHT | {"scores": [1, 0.5, 0]})) is None


@pytest.mark.parametrize(
    ("status", "answer", "problem"),
    [
        (503, RIGHT, "status 503"),
        (200, None, "not JSON"),
        (200, [1, 2], "not an object"),
        (200, RIGHT | {"user_id": "u8"}, "user_id"),
        (200, RIGHT | {"ids": ["c", "a"], "scores": [0.9, 0.5]}, "2 ids"),
        (200, RIGHT | {"ids": ["c", "a", "a"]}, "twice"),
        (200, RIGHT | {"ids": ["c", "a", "z"]}, "not candidates"),
        (200, RIGHT | {"scores": [0.9, "x", 0.1]}, "numbers"),
        (200, RIGHT | {"scores": [True, 0.5, 0.1]}, "numbers"),
        (200, RIGHT | {"scores": [1.5, 0.5, 0.1]}, "outside [0, 1]"),
        (200, RIGHT | {"scores": [0.1, 0.5, 0.9]}, "descending"),
    ],
)
def test_a_wrong_answer_is_named(status: int, answer: object, problem: str) -> None:
    content = b"<html>" if answer is None else orjson.dumps(answer)
    result = answers.check_predict(answers.expect(BODY), status, content)
    assert result is not None and problem in result


def test_health() -> None:
    assert answers.check_health(200, b'{"status":"ok"}') is None
    assert "503" in (answers.check_health(503, b'{"status":"unavailable"}') or "")
    assert "unexpected" in (answers.check_health(200, b'{"status":"starting"}') or "")
