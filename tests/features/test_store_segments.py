"""Segments on a Vertex source: each candidate's pair entity (segment, U+001F, id) read beside its own in one fetch,
the pair's posterior where the store holds it, the arm's where it does not; end to end against the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from mab_service.features.segments import StoreSegments
from mab_service.features.source import Features
from mab_service.ids import id_problem, store_pair_id
from tests.conftest import EmulatorProcess, Server, start_emulator, stop_process

FEATURE_VIEW = "projects/p/locations/l/featureOnlineStores/s/featureViews/content"
PRIOR = (1.0, 1.0)


class FakeStore:
    """A store holding ``table``; every other id gets the prior, and ids listed in ``unread`` are not read."""

    name = "fake"

    def __init__(self, table: dict[str, tuple[float, float]], unread: frozenset[str] = frozenset()) -> None:
        self.table = table
        self.unread = unread
        self.fetches: list[list[str]] = []

    @property
    def prior(self) -> tuple[float, float]:
        return PRIOR

    async def fetch(self, ids: list[str]) -> Features:
        self.fetches.append(ids)
        values = [self.table.get(i, PRIOR) if i not in self.unread else PRIOR for i in ids]
        alpha = np.array([v[0] for v in values])
        beta = np.array([v[1] for v in values])
        known = sum(i in self.table and i not in self.unread for i in ids)
        return Features(alpha, beta, known, sum(i in self.unread for i in ids))


def test_pair_entity_id_is_the_segment_the_unit_separator_and_the_id() -> None:
    assert store_pair_id("fr", "a") == "fr\x1fa"
    # No client can name a pair's entity as a candidate: it breaks the id rule the edge holds candidates to.
    assert id_problem(store_pair_id("fr", "a")) is not None


def test_one_fetch_reads_both_entities_and_backs_off_to_the_arm_where_the_store_holds_no_pair() -> None:
    store = FakeStore(
        {
            "a": (2.0, 8.0),
            "b": (3.0, 7.0),
            store_pair_id("fr", "a"): (9.0, 1.0),  # a has a posterior within fr
            store_pair_id("de", "b"): (5.0, 5.0),  # another segment's: not read for fr
        }
    )
    got = asyncio.run(StoreSegments(store).fetch_segment(["a", "b", "new"], "fr"))  # type: ignore[arg-type]
    assert store.fetches == [["a", "b", "new", "fr\x1fa", "fr\x1fb", "fr\x1fnew"]]
    assert got.alpha.tolist() == [9.0, 3.0, 1.0] and got.beta.tolist() == [1.0, 7.0, 1.0]
    assert got.known == 2 and got.unread == 0


def test_unread_pairs_mark_the_answer_degraded() -> None:
    store = FakeStore({"a": (2.0, 8.0), "fr\x1fa": (9.0, 1.0)}, unread=frozenset({"fr\x1fa"}))
    got = asyncio.run(StoreSegments(store).fetch_segment(["a"], "fr"))  # type: ignore[arg-type]
    assert got.alpha.tolist() == [2.0] and got.unread == 1


@pytest.fixture(scope="module")
def pair_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """An emulator whose table holds two arms and, within segment "fr", the weak one's pair entity as strong."""
    table = tmp_path_factory.mktemp("pairs") / "table.csv"
    pair = store_pair_id("fr", "weak")
    rows = ["entity_id,alpha,beta", "strong,1000000,1", "weak,1,1000000", "mid,1000,1000", f"{pair},1000000,1"]
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    emulator = start_emulator(table)
    yield emulator
    stop_process(emulator.proc)


def test_a_vertex_source_ranks_a_segment_by_the_stores_pair_entities(
    server_factory: Callable[..., Server], pair_emulator: EmulatorProcess
) -> None:
    server = server_factory(
        env={"VERTEX_FEATURESTORE_EMULATOR_HOST": pair_emulator.target},
        args=["--features", f"vertex-fos:{FEATURE_VIEW}"],
    )
    body = {"user_id": "u", "candidates": ["weak", "mid"], "top_k": 1}
    with server.client() as http:
        for seed in range(5):
            assert http.post("/predict", json=body | {"seed": seed}).json()["ids"] == ["mid"]
            within = http.post("/predict", json=body | {"seed": seed, "segment": "fr"}).json()
            assert within["ids"] == ["weak"] and within["degraded"] is False  # fr's posterior of weak: strong
            # A segment the store holds nothing for ranks by the arms' own posteriors.
            assert http.post("/predict", json=body | {"seed": seed, "segment": "de"}).json()["ids"] == ["mid"]
        # The answer within a segment is an event like any other: its reward is taken.
        reward = http.post("/reward", json={"event_id": within["event_id"], "id": "weak", "reward": 1.0})
        assert reward.status_code == 202, reward.text
        # /arms within the segment: the store's posterior there, beside this node's counts within it.
        arm = http.get("/arms/weak", params={"segment": "fr"}).json()
        assert (arm["alpha"], arm["beta"], arm["impressions"], arm["rewards"]) == (1000000.0, 1.0, 5, 1.0)
        arm = http.get("/arms/mid", params={"segment": "de"}).json()
        assert (arm["alpha"], arm["beta"], arm["impressions"]) == (1000.0, 1000.0, 5)
