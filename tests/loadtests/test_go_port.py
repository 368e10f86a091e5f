"""The Go baseline builds from Debian's packages, passes its own tests, and keeps the /predict contract.

Skipped when Go or Debian's fasthttp sources are not installed (``python -m benchmarks.baselines.go.build
--install`` installs them).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.baselines.go import build
from tests.conftest import stop_process, unused_tcp_port

pytestmark = [
    pytest.mark.slow,  # the first build compiles fasthttp: about a minute
    pytest.mark.skipif(bool(build.missing_packages()), reason="needs golang-go and golang-github-valyala-fasthttp-dev"),
]


@pytest.fixture(scope="module")
def go_server(table_csv: Path) -> Iterator[str]:
    port = unused_tcp_port()
    argv = [str(build.build()), "-port", str(port), "-features", str(table_csv), "-gomaxprocs", "1"]
    argv += ["-max-candidates", "3000", "-max-body-bytes", "100000"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None:
                    pytest.fail(f"mab-go exited: {proc.stdout.read().decode() if proc.stdout else ''}")
                time.sleep(0.05)
        yield url
    finally:
        stop_process(proc)


def test_gofmt_vet_and_go_test_pass() -> None:
    assert "ok" in build.test()


def predict(url: str, body: object) -> httpx.Response:
    return httpx.post(url + "/predict", json=body, timeout=10)


def test_ranks_dedupes_and_uses_the_prior(go_server: str) -> None:
    body = {"user_id": "u1", "candidates": ["weak", "strong", "nope", "strong", "é-unicode", "weak"], "top_k": 10}
    answer = predict(go_server, body).json()
    # Four distinct candidates, the first occurrence kept; Beta(1e6, 1) always wins, Beta(1, 1e6) always loses.
    assert answer["user_id"] == "u1"
    assert sorted(answer["ids"]) == sorted(["weak", "strong", "nope", "é-unicode"])
    assert answer["ids"][0] == "strong" and answer["ids"][-1] == "weak"
    assert answer["scores"] == sorted(answer["scores"], reverse=True)
    assert all(0 <= s <= 1 for s in answer["scores"])


def test_top_k_and_seed(go_server: str) -> None:
    body = {"user_id": "u2", "candidates": [f"c{i}" for i in range(400)], "top_k": 50, "seed": 12345}
    first, again = predict(go_server, body).json(), predict(go_server, body).json()
    assert len(first["ids"]) == 50 and first == again
    assert predict(go_server, body | {"seed": 12346}).json() != first
    # Without top_k every distinct candidate comes back.
    assert len(predict(go_server, {"user_id": "u", "candidates": ["a", "b", "a"]}).json()["ids"]) == 2


TEXT = {"content-type": "text/plain"}
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"content": b'{"user_id": "u", "candidates": ["a"]}', "headers": TEXT}, 415, "unsupported_media_type"),
        ({"content": b'{"user_id": ', "headers": JSON}, 400, "malformed_json"),
        ({"content": b'{"user_id": "u", "candidates": [NaN]}', "headers": JSON}, 400, "malformed_json"),
        ({"json": {"user_id": "u", "candidates": ["a", 5]}}, 422, "validation_error"),
        ({"json": {"user_id": "u", "candidates": []}}, 422, "validation_error"),
        ({"json": {"user_id": "u", "candidates": ["a"] * 3001}}, 422, "validation_error"),
        ({"json": {"user_id": "u", "candidates": ["a"], "top_k": 0}}, 422, "validation_error"),
        ({"json": {"user_id": "u", "candidates": ["a"], "seed": 2**64}}, 422, "validation_error"),
        ({"json": {"user_id": "u", "candidates": ["x" * 200_000]}}, 413, "payload_too_large"),
    ],
)  # fmt: skip
def test_errors_match_the_service(go_server: str, request_kwargs: dict[str, object], status: int, code: str) -> None:
    answer = httpx.post(go_server + "/predict", timeout=10, **request_kwargs)  # type: ignore[arg-type]
    assert (answer.status_code, answer.json()["error"]) == (status, code)


def test_other_routes(go_server: str) -> None:
    assert httpx.get(go_server + "/health").json() == {"status": "ok"}
    assert httpx.get(go_server + "/predict").status_code == 405
    assert httpx.get(go_server + "/nowhere").json()["error"] == "not_found"
