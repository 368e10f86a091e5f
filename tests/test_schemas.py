"""Property tests for /predict decoding: any body gives a request or a 4xx error, never anything else."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from mab_service.errors import MalformedBody, ValidationFailed
from mab_service.ids import id_problem
from mab_service.schemas import PredictRequest, decode_predict, decode_reward, decode_rewards

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=40,
)
candidate_items = st.one_of(st.text(max_size=300), json_values)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.one_of(st.text(max_size=1100), json_values),
        "candidates": st.one_of(st.lists(candidate_items, max_size=60), json_values),
        # orjson writes integers in [-2**63, 2**64); larger ones are spelled out in test_awkward_bodies.
        "top_k": st.one_of(st.integers(min_value=-5, max_value=2**64 - 1), json_values),
        "seed": st.one_of(st.integers(min_value=-5, max_value=2**64 - 1), json_values),
        "extra": json_values,
    },
)


def _decode(raw: bytes) -> PredictRequest | None:
    try:
        return decode_predict(raw, max_candidates=50)
    except (MalformedBody, ValidationFailed) as exc:
        assert exc.status_code in (400, 422) and exc.message
        return None


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_any_object_is_a_request_or_a_422(body: dict[str, object]) -> None:
    request = _decode(orjson.dumps(body))
    if request is not None:
        assert isinstance(request.user_id, str) and len(request.user_id) <= 1024
        assert 1 <= len(request.candidates) <= 50
        assert all(isinstance(c, str) and id_problem(c) is None for c in request.candidates)
        assert len(set(request.candidates)) == len(request.candidates)
        assert request.top_k is None or request.top_k >= 1
        assert request.seed is None or 0 <= request.seed < 2**64


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_is_a_request_or_a_4xx(value: object) -> None:
    _decode(orjson.dumps(value))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_request_or_a_4xx(raw: bytes) -> None:
    _decode(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": "u", "candidates": ["a"], "user_id": 5}',  # duplicate keys: the last one counts
        b'{"user_id": "u", "candidates": ["a"], "top_k": 1e400}',
        b'{"user_id": "u", "candidates": ["a"], "top_k": 100000000000000000000000}',
        b'{"user_id": "u", "candidates": ["a"], "seed": -100000000000000000000000}',
        b'{"user_id": "u", "candidates": ["a"], "top_k": -0}',
        b'{"user_id": "u", "candidates": ["\\ud800"]}',  # a lone surrogate escape
        b'{"user_id": "u", "candidates": ["a", "a", "a"]}',
        b"[" * 10_000 + b"]" * 10_000,  # deep nesting
        b'{"user_id": "u", "candidates": ["' + b"x" * 100_000 + b'"]}',
    ],
    ids=[
        "duplicate-keys",
        "huge-number",
        "huge-top-k",
        "huge-negative-seed",
        "negative-zero",
        "lone-surrogate",
        "all-duplicates",
        "deep",
        "long-id",
    ],
)
def test_awkward_bodies(raw: bytes) -> None:
    _decode(raw)


RULE = "must be 1 to 1024 bytes of UTF-8 without control characters"


@pytest.mark.parametrize(
    ("candidates", "field", "got"),
    [
        (["a", "b", "c", "x" * 2000], "candidates[3]", "2000 bytes"),
        ([""], "candidates[0]", "an empty string"),
        (["a", "b\tc"], "candidates[1]", "a control character U+0009 at character 1"),
        (["é" * 513], "candidates[0]", "1026 bytes"),
    ],
)
def test_candidates_break_the_id_rule(candidates: list[str], field: str, got: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        decode_predict(orjson.dumps({"user_id": "u", "candidates": candidates}), max_candidates=50)
    assert info.value.status_code == 422 and info.value.code == "validation_error"
    assert info.value.field == field
    assert info.value.message == f"{field} {RULE} (got {got})"


def test_candidates_at_the_id_rule_limits_are_taken() -> None:
    ids = ["x" * 1024, "é" * 512, "日" * 341, "\u00a0 spaced \u2028"]
    assert decode_predict(orjson.dumps({"user_id": "u", "candidates": ids}), max_candidates=50).candidates == ids


@pytest.mark.parametrize(
    ("arm_id", "got"),
    [("", "an empty string"), ("y" * 1025, "1025 bytes"), ("a\x7f", "a control character U+007F at character 1")],
)
def test_reward_ids_break_the_id_rule(arm_id: str, got: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        decode_reward(orjson.dumps({"event_id": "e1", "id": arm_id}))
    assert (info.value.field, info.value.message) == ("id", f"id {RULE} (got {got})")
    body = {"rewards": [{"event_id": "e1", "id": "a"}, {"event_id": "e1", "id": "b"}, {"event_id": "e", "id": arm_id}]}
    with pytest.raises(ValidationFailed) as info:
        decode_rewards(orjson.dumps(body), max_items=10)
    assert info.value.field == "rewards[2].id"
    assert info.value.message == f"rewards[2].id: id {RULE} (got {got})"


def test_reward_ids_at_the_id_rule_limit_are_taken() -> None:
    assert decode_reward(orjson.dumps({"event_id": "e1", "id": "日" * 341})).id == "日" * 341
