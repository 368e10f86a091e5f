"""_wire: Feature Store 2.0 answers decoded from, and requests encoded to, their wire bytes, checked against the
client library's own protobuf classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.cloud.aiplatform_v1.types import feature_online_store_service as fos_v1
from google.cloud.aiplatform_v1beta1.types import feature_online_store_service as fos

from mab_service.features._wire import FIRST, SECOND, decode_answer, decode_values, encode_request, take_positions
from mab_service.features.options import VertexOptions
from mab_service.features.store import ParameterMapping

Response = fos.StreamingFetchFeatureValuesResponse.pb()
Request = fos.StreamingFetchFeatureValuesRequest.pb()


def answer(rows: dict[str, dict[str, float | int | str | None]], code: int = 0, missing: tuple[str, ...] = ()) -> bytes:
    message = Response()
    message.status.code = code
    message.status.message = "why" if code else ""
    for key, features in rows.items():
        item = message.data.add()
        item.data_key.key = key
        for name, value in features.items():
            pair = item.key_values.features.add()
            pair.name = name
            if value is None:
                pair.value.SetInParent()
            elif isinstance(value, str):
                pair.value.string_value = value
            elif isinstance(value, int):
                pair.value.int64_value = value
            else:
                pair.value.double_value = value
    for key in missing:
        message.data_keys_with_error.add().key = key
    return bytes(message.SerializeToString())


def test_an_answer_decodes_to_the_two_features_of_each_key_in_order() -> None:
    rows = {
        "a": {"x": 1.0, "alpha": 2.5, "beta": 7},  # an INT64 beta, another feature first
        "é-unicode": {"beta": 4.0, "alpha": 3.0},  # any order of features
        "empty": {"alpha": None, "beta": None},  # empty values: nothing present
        "half": {"alpha": 1.5},
        "text": {"alpha": "1.0", "beta": 2.0},  # a STRING value is not a number
    }
    code, message, keys, a, b, present, missing = decode_answer(answer(rows), b"alpha", b"beta")
    assert (code, message, keys, missing) == (0, "", list(rows), [])
    assert present.tolist() == [FIRST | SECOND, FIRST | SECOND, 0, FIRST, SECOND]
    assert a[:2].tolist() == [2.5, 3.0] and b[:2].tolist() == [7.0, 4.0] and a[3] == 1.5


def test_error_answers_list_their_keys() -> None:
    code, message, keys, _, _, _, missing = decode_answer(answer({}, code=5, missing=("u1", "u2")), b"a", b"b")
    assert (code, message, keys, missing) == (5, "why", [], ["u1", "u2"])


@pytest.mark.parametrize("cut", [1, 5, 17, -1])
def test_truncated_bytes_raise_value_error(cut: int) -> None:
    whole = answer({"a": {"alpha": 1.0, "beta": 2.0}, "b": {"alpha": 1.0, "beta": 2.0}})
    with pytest.raises(ValueError):
        decode_answer(whole[:cut], b"alpha", b"beta")


def test_unknown_fields_are_skipped() -> None:
    # A field this decoder does not read (proto_struct, field 2 of each entry) is skipped by its wire type.
    message = Response()
    item = message.data.add()
    item.data_key.key = "k"
    item.proto_struct.fields["x"].number_value = 3.0
    decoded = decode_answer(message.SerializeToString(), b"alpha", b"beta")
    assert decoded[2] == ["k"] and decoded[5].tolist() == [0]


def test_requests_encode_as_the_library_parses_them() -> None:
    head = Request(feature_view="projects/p/locations/l/featureOnlineStores/s/featureViews/v", data_format=1)
    keys = ["c1", "é" * 100, ""]
    parsed = Request.FromString(encode_request(head.SerializeToString(), dict.fromkeys(keys)))
    assert parsed.feature_view == head.feature_view and parsed.data_format == 1
    assert [k.key for k in parsed.data_keys] == keys
    one = fos_v1.FetchFeatureValuesRequest.pb()
    single = one.FromString(encode_request(one(feature_view="v").SerializeToString(), ["key"], 0x32))
    assert single.feature_view == "v" and single.data_key.key == "key"


def test_a_single_key_answer_decodes() -> None:
    response = fos_v1.FetchFeatureValuesResponse.pb()()
    for name, value in (("alpha", 2.0), ("beta", 9)):
        pair = response.key_values.features.add()
        pair.name = name
        if isinstance(value, int):
            pair.value.int64_value = value
        else:
            pair.value.double_value = value
    assert decode_values(response.SerializeToString(), b"alpha", b"beta") == (FIRST | SECOND, 2.0, 9.0)
    assert decode_values(b"", b"alpha", b"beta") == (0, 0.0, 0.0)


def test_positions_are_taken_from_the_waiting_keys() -> None:
    waiting = {"a": 3, "b": 7}
    assert take_positions(["b", "x", "a"], waiting).tolist() == [7, -1, 3] and waiting == {}


@pytest.mark.parametrize("mapping", ["beta", "counts"])
def test_the_array_mapping_matches_the_per_entity_one(mapping: str) -> None:
    options = VertexOptions(mapping=mapping, prior_alpha=2.0, prior_beta=3.0)
    first = np.array([1.0, 0.0, 5.0, math.nan, 4.0, 2.0, math.inf, 0.0])
    second = np.array([2.0, 3.0, 4.0, 1.0, 0.0, 9.0, 1.0, 0.0])
    present = np.array([3, 3, 3, 3, 3, 1, 3, 0], dtype=np.uint8)
    vector = ParameterMapping(options)
    alpha, beta, held = vector.decode_arrays(first, second, present)
    scalar = ParameterMapping(options)
    for i in range(len(first)):
        expected = scalar.decode_present(int(present[i]), float(first[i]), float(second[i]))
        assert bool(held[i]) == (expected is not None), i
        if expected is not None:  # invalid values are NaN in both (assert_array_equal takes NaN as equal to NaN)
            np.testing.assert_array_equal((alpha[i], beta[i]), expected)
    assert vector.invalid == scalar.invalid > 0
    assert not held[-1]  # no value at all: an unknown entity
