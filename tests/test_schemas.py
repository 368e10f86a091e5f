"""Property tests for /predict decoding: any body gives a request or a 4xx error, never anything else."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from mab_service.errors import MalformedBody, ValidationFailed
from mab_service.schemas import PredictRequest, decode_predict

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
        assert all(isinstance(c, str) for c in request.candidates)
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
