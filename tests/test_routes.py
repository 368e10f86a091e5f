"""The /predict, /health and /openapi.json contract, against a real server on a loopback port."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.conftest import Server


def post(client: httpx.Client, body: object) -> httpx.Response:
    return client.post("/predict", content=orjson.dumps(body), headers={"content-type": "application/json"})


def test_predict_ranks_candidates_by_their_samples(server: Server) -> None:
    with server.client() as client:
        r = post(client, {"user_id": "u42", "candidates": ["weak", "mid", "strong"], "top_k": 2, "seed": 7})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["user_id"] == "u42"
    # Beta(1e6, 1) samples ~1, Beta(50, 50) ~0.5, Beta(1, 1e6) ~1e-6: the order is certain.
    assert body["ids"] == ["strong", "mid"]
    assert len(body["scores"]) == 2 and body["scores"][0] > body["scores"][1]
    assert all(0 <= s <= 1 for s in body["scores"])
    assert body["degraded"] is False  # an embedded source is always read whole


def test_without_top_k_every_candidate_is_ranked(server: Server) -> None:
    candidates = [f"c{i}" for i in range(500)] + ["unknown-1", "unknown-2"]
    with server.client() as client:
        body = post(client, {"user_id": "u", "candidates": candidates}).json()
    assert sorted(body["ids"]) == sorted(candidates)
    assert body["scores"] == sorted(body["scores"], reverse=True)


def test_top_k_larger_than_the_candidates_returns_them_all(server: Server) -> None:
    with server.client() as client:
        body = post(client, {"user_id": "u", "candidates": ["mid", "weak"], "top_k": 50}).json()
    assert sorted(body["ids"]) == ["mid", "weak"]


def test_same_seed_same_answer(frozen_server: Server) -> None:
    # The same seed and the same posteriors: with the loop on, each answer's impressions change the posteriors.
    query = {"user_id": "u", "candidates": [f"c{i}" for i in range(300)], "top_k": 20, "seed": 123}
    with frozen_server.client() as client:
        first, second = post(client, query).json(), post(client, query).json()
        other = post(client, {**query, "seed": 124}).json()
    assert first == second
    assert first["scores"] != other["scores"]


def test_duplicate_candidates_are_ranked_once(server: Server) -> None:
    with server.client() as client:
        body = post(client, {"user_id": "u", "candidates": ["mid", "weak", "mid", "strong", "weak"]}).json()
    assert body["ids"] == ["strong", "mid", "weak"]


def test_unknown_candidates_get_the_prior(server: Server, server_factory, table_csv) -> None:
    # Default prior Beta(1, 1) has mean 1/2: an unknown id beats "weak" (mean 1e-6) and loses to "strong".
    with server.client() as client:
        body = post(client, {"user_id": "u", "candidates": ["weak", "nobody", "strong"], "seed": 1}).json()
    assert body["ids"] == ["strong", "nobody", "weak"]
    # A configured pessimistic prior puts unknown ids last.
    pessimist = server_factory(env={"MAB_PRIOR_BETA": "1000000000"}, args=["--features", f"csv:{table_csv}"])
    with pessimist.client() as client:
        body = post(client, {"user_id": "u", "candidates": ["weak", "nobody", "strong"], "seed": 1}).json()
    assert body["ids"] == ["strong", "weak", "nobody"]


def test_unicode_ids(server: Server) -> None:
    with server.client() as client:
        body = post(client, {"user_id": "ü", "candidates": ["é-unicode", "日本", "🙂", " "], "seed": 3}).json()
    assert sorted(body["ids"]) == sorted(["é-unicode", "日本", "🙂", " "])
    assert body["user_id"] == "ü"


def test_health(server: Server) -> None:
    with server.client() as client:
        r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_openapi_document(server: Server) -> None:
    with server.client() as client:
        doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/predict",
        "/reward",
        "/rewards",
        "/arms",
        "/arms/{id}",
        "/loop",
        "/dashboard",
        "/health",
        "/live",
        "/metrics",
    }
    assert doc["components"]["schemas"]["PredictRequest"]["properties"]["candidates"]["maxItems"] == 3000


def assert_error(r: httpx.Response, status: int, code: str, field: str | None = None, text: str = "") -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"] == code
    assert text in body["message"]
    if field is not None:
        assert body["field"] == field


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"not json", b'{"user_id": "u", "candidates": [NaN]}', b'{"candidates": Infinity}', b"\xff\xfe"],
    ids=["truncated", "empty", "text", "nan", "infinity", "bad-utf8"],
)
def test_malformed_json_is_400(server: Server, raw: bytes) -> None:
    with server.client() as client:
        r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed_json", text="not valid JSON")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
def test_wrong_content_type_is_415(server: Server, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    with server.client() as client:
        r = client.post("/predict", content=b'{"user_id": "u", "candidates": ["a"]}', headers=headers)
    assert_error(r, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(server: Server) -> None:
    with server.client() as client:
        r = client.post(
            "/predict",
            content=b'{"user_id": "u", "candidates": ["a"]}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
    assert r.status_code == 200


def test_body_over_the_limit_is_413(server_factory, table_csv) -> None:
    small = server_factory(args=["--features", f"csv:{table_csv}", "--max-body-bytes", "2048"])
    big = orjson.dumps({"user_id": "u", "candidates": [f"c{i}" for i in range(1000)]})
    with small.client() as client:
        assert_error(post(client, orjson.loads(big)), 413, "payload_too_large", text="2048")

        def chunks():  # no Content-Length: the limit applies while reading
            for i in range(0, len(big), 500):
                yield big[i : i + 500]

        r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413, "payload_too_large")
        assert post(client, {"user_id": "u", "candidates": ["c1"]}).status_code == 200


INVALID = [
    ([1, 2], None, "body must be a JSON object"),
    ({"candidates": ["a"]}, "user_id", "user_id must be a string (missing)"),
    ({"user_id": 5, "candidates": ["a"]}, "user_id", "user_id must be a string (got number 5)"),
    ({"user_id": "u"}, "candidates", "candidates must be an array of strings (missing)"),
    ({"user_id": "u", "candidates": "a"}, "candidates", 'candidates must be an array of strings (got string "a")'),
    ({"user_id": "u", "candidates": {"a": 1}}, "candidates", "candidates must be an array of strings (got object)"),
    ({"user_id": "u", "candidates": []}, "candidates", "candidates must not be empty"),
    ({"user_id": "u", "candidates": ["a", 3]}, "candidates[1]", "candidates[1] must be a string (got int)"),
    ({"user_id": "u", "candidates": ["a", None]}, "candidates[1]", "must be a string"),
    ({"user_id": "u", "candidates": [["a"]]}, "candidates[0]", "must be a string"),
    (
        {"user_id": "u", "candidates": ["a", "b", "c", "x" * 2000]},
        "candidates[3]",
        "candidates[3] must be 1 to 1024 bytes of UTF-8 without control characters (got 2000 bytes)",
    ),
    ({"user_id": "u", "candidates": ["a", ""]}, "candidates[1]", "(got an empty string)"),
    ({"user_id": "u", "candidates": ["a\nb"]}, "candidates[0]", "(got a control character U+000A at character 1)"),
    ({"user_id": "u", "candidates": ["a"], "top_k": 0}, "top_k", "top_k must be an integer >= 1"),
    ({"user_id": "u", "candidates": ["a"], "top_k": -3}, "top_k", "top_k must be an integer >= 1"),
    ({"user_id": "u", "candidates": ["a"], "top_k": 1.5}, "top_k", "top_k must be an integer >= 1"),
    ({"user_id": "u", "candidates": ["a"], "top_k": True}, "top_k", "got boolean true"),
    ({"user_id": "u", "candidates": ["a"], "top_k": "3"}, "top_k", 'got string "3"'),
    ({"user_id": "u", "candidates": ["a"], "seed": -1}, "seed", "seed must be an integer in [0, 2**64)"),
    ({"user_id": "u", "candidates": ["a"], "seed": 2**64}, "seed", "seed must be an integer"),
    ({"user_id": "u", "candidates": ["a"], "seed": 0.5}, "seed", "seed must be an integer"),
    ({"user_id": "u" * 1025, "candidates": ["a"]}, "user_id", "at most 1024"),
]


@pytest.mark.parametrize(("body", "field", "message"), INVALID, ids=[m for _, _, m in INVALID])
def test_invalid_requests_are_422_naming_the_problem(server: Server, body, field, message) -> None:
    # orjson cannot write 2**64, so that body is spelled out.
    too_big = isinstance(body, dict) and body.get("seed") == 2**64
    raw = b'{"user_id": "u", "candidates": ["a"], "seed": 18446744073709551616}' if too_big else None
    with server.client() as client:
        if raw is None:
            r = post(client, body)
        else:
            r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 422, "validation_error", field, message)


def test_too_many_candidates_is_422(server: Server) -> None:
    with server.client() as client:
        r = post(client, {"user_id": "u", "candidates": [f"c{i}" for i in range(3001)]})
    assert_error(r, 422, "validation_error", "candidates", "at most 3000 ids (got 3001)")


def test_unknown_path_is_404_and_wrong_method_is_405(server: Server) -> None:
    with server.client() as client:
        missing = client.get("/nope")
        wrong = client.get("/predict")
        wrong_health = client.post("/health")
    assert_error(missing, 404, "not_found")
    assert_error(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"
    assert_error(wrong_health, 405, "method_not_allowed")


def test_extra_fields_are_ignored(server: Server) -> None:
    with server.client() as client:
        r = post(client, {"user_id": "u", "candidates": ["a"], "context": {"page": 3}})
    assert r.status_code == 200
