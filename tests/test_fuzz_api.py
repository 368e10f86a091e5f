"""Schema-driven fuzzing: schemathesis reads the live server's /openapi.json, generates valid and invalid requests
for every operation, and checks each answer against the document: no 5xx, only documented status codes and
content types, bodies and headers that match their schemas, invalid requests rejected, valid ones accepted.
"""

from __future__ import annotations

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import Server

#: Examples per operation and phase: about ten seconds for the nine operations.
MAX_EXAMPLES = 300
#: What answers a request the schema admits: a body past max_body_bytes is 413, a limit JSON Schema cannot state.
ACCEPTED = ["200", "413"]
#: What answers a request the schema does not admit.
REJECTED = ["400", "413", "415", "422"]
#: Valid requests that name things the service does not hold: a random event (404 unknown_event) or arm (404), or an
#: id an event held from an earlier generated /predict did not return (422 not_in_event); and a client's event id
#: that an earlier generated request already used (409 event_id_in_use).
ACCEPTED_BY_PATH = {
    "/predict": [*ACCEPTED, "409"],
    "/reward": [*ACCEPTED, "202", "404", "422"],
    "/arms/{id}": [*ACCEPTED, "404"],
}


@pytest.fixture(scope="module")
def api(server: Server) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": MAX_EXAMPLES},
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ACCEPTED},
                "negative_data_rejection": {"expected-statuses": REJECTED},
            },
            "operations": [
                {"include-path": path, "checks": {"positive_data_acceptance": {"expected-statuses": statuses}}}
                for path, statuses in ACCEPTED_BY_PATH.items()
            ],
        }
    )
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=config, timeout=10)


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_every_operation_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate()


def test_the_document_lists_every_operation(api: schemathesis.BaseSchema) -> None:
    operations = {(result.ok().method.upper(), result.ok().path) for result in api.get_all_operations()}
    assert operations == {
        ("POST", "/predict"),
        ("POST", "/reward"),
        ("POST", "/rewards"),
        ("GET", "/arms"),
        ("GET", "/arms/{id}"),
        ("GET", "/loop"),
        ("GET", "/dashboard"),
        ("GET", "/health"),
        ("GET", "/live"),
        ("GET", "/metrics"),
    }


BASE = {"user_id": "u", "candidates": ["strong", "mid", "weak", "c7"], "top_k": 3, "seed": 11}
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(("field", "written", "meant"), [("top_k", 2.0, 2), ("seed", 7.0, 7), ("seed", 2.0**53, 2**53)])
def test_an_integer_may_be_written_as_a_whole_float(frozen_server: Server, field, written, meant) -> None:
    # JSON Schema's "integer", the document's type for both, includes 2.0. The loop is off, so that the first answer's
    # impressions do not change the posteriors the second is drawn from.
    with frozen_server.client() as client:
        spelled = client.post("/predict", content=orjson.dumps({**BASE, field: written}), headers=JSON)
        plain = client.post("/predict", content=orjson.dumps({**BASE, field: meant}), headers=JSON)
    assert spelled.status_code == 200, spelled.text
    assert spelled.json() == plain.json()


def test_null_top_k_and_seed_are_the_same_as_absent(server: Server) -> None:
    with server.client() as client:
        answer = client.post("/predict", content=orjson.dumps({**BASE, "top_k": None, "seed": None}), headers=JSON)
    assert answer.status_code == 200, answer.text
    assert sorted(answer.json()["ids"]) == sorted(BASE["candidates"])


@pytest.mark.parametrize(("field", "written"), [("top_k", 2.5), ("top_k", 0.0), ("seed", -1.0), ("seed", 2.0**60)])
def test_a_float_that_is_not_an_exact_integer_in_range_is_422(server: Server, field, written) -> None:
    body = {"user_id": "u", "candidates": ["strong", "mid"], field: written}
    with server.client() as client:
        answer = client.post("/predict", content=orjson.dumps(body), headers=JSON)
    assert answer.status_code == 422 and answer.json()["field"] == field
