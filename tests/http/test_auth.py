"""API keys: 401 without a known key on every route but the public ones, the file re-read without a restart, a bad
file keeping the keys loaded before, and only digests kept."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from mab_service.clients import CLIENT
from mab_service.config import Settings
from mab_service.http.admission import Admission
from mab_service.http.auth import ApiKeys, KeysFileError, parse_keys
from mab_service.http.edge import Edge
from mab_service.openapi import openapi_document
from tests.conftest import Server, stop_process, unused_tcp_port, wait_until

KEY = "k1-0123456789abcdef"
OTHER = "k2-fedcba9876543210"
THIRD = "k3-aaaaaaaaaaaaaaaa"
BODY = {"user_id": "u", "candidates": ["strong", "weak", "mid"], "top_k": 2}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def label(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


# --- the keys file ---------------------------------------------------------------------------------------------


def test_keys_file_format() -> None:
    text = f"# production keys\n\n  {KEY}  \n\t{OTHER}\n   # rotated 2026-12-01\n"
    assert parse_keys(text, "keys") == [KEY, OTHER]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "keys holds no key (one key per line, # for comments)"),
        ("# only a comment\n\n", "keys holds no key (one key per line, # for comments)"),
        (f"{KEY}\nshort-key\n", "keys line 2: a key must be at least 16 characters"),
        (f"{KEY} # inline comment\n", "keys line 1: a key must not hold whitespace or control characters"),
        ("k1-0123\x0156789abcdef\n", "keys line 1: a key must not hold whitespace or control characters"),
    ],
)
def test_bad_keys_file_names_the_line_not_the_key(text: str, error: str) -> None:
    with pytest.raises(KeysFileError) as raised:
        parse_keys(text, "keys")
    assert str(raised.value) == error
    assert KEY not in str(raised.value)


def test_only_digests_are_kept_and_looked_up(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n{OTHER}\n")
    keys = ApiKeys(str(path))
    # The check hashes what the client sent and looks the digest up: its time depends on that digest, not on how
    # many leading characters of a real key the client got right; nothing holds the keys themselves.
    assert set(keys.digests) == {hashlib.sha256(k.encode()).digest() for k in (KEY, OTHER)}
    assert KEY not in repr(vars(keys)) and OTHER not in repr(vars(keys))
    assert keys.client(b"Bearer " + KEY.encode()) == label(KEY)
    assert keys.client(b"bearer " + OTHER.encode()) == label(OTHER)
    for sent in [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        KEY.encode(),
        b"Basic " + KEY.encode(),
        b"Bearer " + KEY[:-1].encode(),
    ]:
        assert keys.client(sent) is None, sent


def test_a_changed_file_is_reloaded_and_a_bad_one_keeps_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    keys = ApiKeys(str(path))
    path.write_text(f"{KEY}\n{OTHER}\n")
    assert keys.check() is None
    assert keys.client(b"Bearer " + OTHER.encode()) == label(OTHER)
    path.write_text(f"{THIRD}\ntoo-short\n")
    assert keys.check() == f"{path} line 2: a key must be at least 16 characters"
    assert keys.client(b"Bearer " + OTHER.encode()) == label(OTHER)  # the keys loaded before still hold
    assert keys.client(b"Bearer " + THIRD.encode()) is None
    path.unlink()
    assert (keys.check() or "").startswith(f"cannot read {path}")
    assert keys.client(b"Bearer " + KEY.encode()) == label(KEY)
    path.write_text(f"{THIRD}\n")  # fixed: the new keys replace the old ones
    assert keys.check() is None
    assert keys.client(b"Bearer " + THIRD.encode()) == label(THIRD)
    assert keys.client(b"Bearer " + KEY.encode()) is None


def test_a_file_that_cannot_be_used_at_start_raises(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cannot read"):
        ApiKeys(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(KeysFileError, match="holds no key"):
        ApiKeys(str(tmp_path / "empty"))


# --- the client each request is served for -------------------------------------------------------------------------


async def _who(request: Request) -> PlainTextResponse:
    return PlainTextResponse(CLIENT.get())


def _edge(settings: Settings) -> Edge:
    @asynccontextmanager
    async def lifespan() -> AsyncIterator[dict[str, Any]]:
        yield {}

    routes = [Route("/who", _who), Route("/health", _who)]
    return Edge({}, routes, lambda path: path, lifespan, settings, Admission(4, 1, frozenset({"/health"})))


def test_the_client_is_the_key_label_or_the_peer_address(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    with TestClient(_edge(Settings(api_keys_file=str(path)))) as client:
        assert client.get("/who", headers=bearer(KEY)).text == label(KEY)
        assert client.get("/who").status_code == 401
    with TestClient(_edge(Settings())) as client:
        assert client.get("/who").text == "addr:testclient"


# --- a live service with keys on -----------------------------------------------------------------------------------


class LoggedServer(Server):
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        super().__init__(proc, url)
        self.log = log


def start_logged(args: list[str], log: Path, env: dict[str, str] | None = None) -> LoggedServer:
    """A server whose output goes to ``log`` (read by the tests), ready once /live answers."""
    port = unused_tcp_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAB_")} | (env or {})
    cmd = [sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/live", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    if not wait_until(ready, 30.0, 0.05):
        stop_process(proc)
        raise RuntimeError(f"server did not start:\n{log.read_text()}")
    return LoggedServer(proc, url, log)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# test keys\n{KEY}\n")
    return path


@pytest.fixture(scope="module")
def secured(keys_file: Path, table_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    # The file is named by the environment, as the Kubernetes deployment does.
    log = tmp_path_factory.mktemp("log") / "server.log"
    server = start_logged(["--features", f"csv:{table_csv}"], log, env={"MAB_API_KEYS_FILE": str(keys_file)})
    yield server
    stop_process(server.proc)


PROTECTED = [
    ("POST", "/predict"),
    ("POST", "/reward"),
    ("POST", "/rewards"),
    ("GET", "/arms"),
    ("GET", "/arms/strong"),
    ("GET", "/loop"),
    ("GET", "/openapi.json"),
    ("GET", "/no-such-path"),  # 401 before 404: without a key nothing is told about the routes
]


def test_every_route_but_the_public_ones_needs_a_key(secured: LoggedServer) -> None:
    with secured.client() as client:
        for method, path in PROTECTED:
            for headers in ({}, bearer(OTHER), {"authorization": f"Basic {KEY}"}):
                answer = client.request(method, path, json=BODY, headers=headers | {"x-request-id": "r-1"})
                assert answer.status_code == 401, (method, path, headers)
                assert answer.headers["www-authenticate"] == "Bearer"
                assert answer.headers["x-request-id"] == "r-1"
                body = answer.json()
                assert body["error"] == "unauthorized" and "Authorization: Bearer" in body["message"]
                assert set(body) == {"error", "message"}
        assert client.get("/arms", headers=bearer(KEY)).status_code == 200
        assert client.get("/loop", headers=bearer(KEY)).json()["learning"] is True
        assert client.get("/openapi.json", headers=bearer(KEY)).status_code == 200
        assert client.get("/no-such-path", headers=bearer(KEY)).status_code == 404
        answered = client.post("/predict", json=BODY, headers=bearer(KEY))
        assert answered.status_code == 200
        reward = {"event_id": answered.json()["event_id"], "id": answered.json()["ids"][0], "reward": 1.0}
        assert client.post("/reward", json=reward, headers=bearer(KEY)).status_code == 202


def test_the_probes_need_no_key_and_the_dashboard_page_does(secured: LoggedServer) -> None:
    with secured.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/live").status_code == 200
        assert "mab_requests_total" in client.get("/metrics").text
        refused = client.get("/dashboard")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        page = client.get("/dashboard", headers=bearer(KEY))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_a_refused_request_leaves_the_connection_usable(secured: LoggedServer) -> None:
    # A 401 for a POST whose body was never read must not corrupt the next request on the same connection.
    with secured.client() as client:
        assert client.post("/predict", json=BODY).status_code == 401
        assert client.post("/predict", json=BODY, headers=bearer(KEY)).status_code == 200


def test_keys_change_without_a_restart_and_a_bad_file_keeps_them(secured: LoggedServer, keys_file: Path) -> None:
    def status(key: str) -> int:
        return httpx.get(secured.url + "/loop", headers=bearer(key), timeout=5).status_code

    keys_file.write_text(f"{KEY}\n{OTHER}\n")
    assert wait_until(lambda: status(OTHER) == 200)
    assert status(KEY) == 200

    # A file with a bad key: nothing of it is taken, the keys loaded before go on being accepted.
    keys_file.write_text(f"{THIRD}\nshort\n")
    assert wait_until(lambda: "api keys not reloaded" in secured.log.read_text())
    assert f"{keys_file} line 2: a key must be at least 16 characters" in secured.log.read_text()
    assert (status(KEY), status(OTHER), status(THIRD)) == (200, 200, 401)

    # Rotation: the new key in, the old ones out.
    keys_file.write_text(f"{THIRD}\n")
    assert wait_until(lambda: status(THIRD) == 200)
    assert (status(KEY), status(OTHER)) == (401, 401)
    log = secured.log.read_text()
    assert KEY not in log and OTHER not in log and THIRD not in log
    keys_file.write_text(f"# test keys\n{KEY}\n")  # as the module's other tests expect
    assert wait_until(lambda: status(KEY) == 200)


def test_a_bad_keys_file_stops_the_start_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "api-keys"
    bad.write_text(f"{KEY}\nkey with spaces in it\n")
    cmd = [sys.executable, "-m", "mab_service", "serve", "--port", "0", "--api-keys-file", str(bad)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAB_")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=60)
    assert done.returncode == 3
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "cannot start" in line]
    assert len(lines) == 1, done.stdout + done.stderr
    assert f"setting api_keys_file: {bad} line 2: a key must not hold whitespace or control characters" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr


def test_the_openapi_document_shows_the_optional_key() -> None:
    document = openapi_document(100, 4096)
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "api_keys_file" in scheme["description"]
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if path in ("/health", "/live", "/metrics"):
                assert "security" not in operation and "401" not in responses, path
            else:
                assert operation["security"] == [{}, {"bearer": []}], path  # {}: no key needed when keys are off
                assert responses["401"]["headers"]["WWW-Authenticate"]["schema"]["const"] == "Bearer"
            if path not in ("/health", "/live", "/metrics"):  # admitted, so may be shed
                assert "503" in responses, path
