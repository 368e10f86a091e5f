"""The app in-process (lifespan, readiness, error mapping) and several workers on one port."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from starlette.testclient import TestClient

from mab_service.app import build_app
from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.features.source import Features, Health
from tests.conftest import Server

BODY = {"user_id": "u", "candidates": ["a", "b", "c"], "top_k": 2}


class ScriptedSource:
    """A feature source whose readiness and answers a test sets; the app sees only the protocol."""

    name = "scripted"

    def __init__(self) -> None:
        self.ready = Health(False, "store not reached yet")
        self.fail_with: Exception | None = None
        self.closed = False

    async def start(self) -> None:
        pass

    async def fetch(self, ids: list[str]) -> Features:
        if self.fail_with is not None:
            raise self.fail_with
        n = len(ids)
        return Features(np.full(n, 2.0), np.full(n, 3.0), n)

    def health(self) -> Health:
        return self.ready

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def scripted() -> ScriptedSource:
    return ScriptedSource()


@pytest.fixture
def client(scripted: ScriptedSource) -> Callable[[], TestClient]:
    return lambda: TestClient(build_app(Settings(), source=scripted), raise_server_exceptions=False)


def test_health_follows_the_source(client, scripted) -> None:
    with client() as c:
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json() == {"status": "unavailable", "reason": "store not reached yet"}
        scripted.ready = Health(True)
        assert c.get("/health").json() == {"status": "ok"}
        scripted.ready = Health(False, "3 reads in a row failed")
        assert c.get("/health").status_code == 503
    assert scripted.closed  # the lifespan closes the source on shutdown


def test_a_failing_source_is_503_json(client, scripted) -> None:
    scripted.fail_with = FeatureSourceError("feature store unavailable: deadline exceeded")
    with client() as c:
        r = c.post("/predict", json=BODY)
    assert r.status_code == 503
    assert r.json() == {
        "error": "feature_source_unavailable",
        "message": "feature store unavailable: deadline exceeded",
    }


def test_an_unexpected_error_is_a_generic_500(client, scripted, caplog) -> None:
    scripted.fail_with = RuntimeError("secret internals")
    with client() as c:
        r = c.post("/predict", json=BODY)
        assert c.post("/predict", json=BODY).status_code == 500  # and the app keeps serving
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "internal server error"}
    assert "secret" not in r.text
    assert "secret internals" in caplog.text  # the traceback goes to the log


def test_reference_sampler_serves_the_same_contract(scripted) -> None:
    scripted.ready = Health(True)
    with TestClient(build_app(Settings(sampler="reference"), source=scripted)) as c:
        body = c.post("/predict", json={**BODY, "seed": 3}).json()
        again = c.post("/predict", json={**BODY, "seed": 3}).json()
    assert body.pop("event_id") != again.pop("event_id")  # each answer is its own event
    assert body == again and len(body["ids"]) == 2
    assert body["scores"] == sorted(body["scores"], reverse=True)


def test_several_workers_share_the_port(server_factory: Callable[..., Server], table_csv) -> None:
    server = server_factory(args=["--features", f"csv:{table_csv}", "--workers", "2"])
    with server.client() as c:
        answers = [
            c.post("/predict", json={"user_id": "u", "candidates": ["mid", "weak"], "top_k": 1}) for _ in range(40)
        ]
    assert all(r.status_code == 200 and r.json()["ids"] == ["mid"] for r in answers)
    children = _children(server.proc.pid)
    assert len(children) >= 2, f"expected two worker processes, found {children}"


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found
