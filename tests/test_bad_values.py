"""Bad values in a store: a candidate whose alpha or beta is no Beta parameter is ranked by the prior, counted on
/metrics and logged, and the request is answered 200, on every source.

The check itself (``features.source.ParameterCheck`` and the compiled ``count_invalid``) is tested in-process; the
sources end to end, each against a real server on loopback: the embedded arm table (counts injected into the node's
shared table), and both Vertex APIs on the emulator process serving a table that holds 0, negative, NaN and
infinite values. Bigtable's are in tests/fleet/test_bigtable_source.py, beside its emulator fixtures.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from mab_service.features.source import Features, Health, ParameterCheck, count_invalid, store_name
from mab_service.learning._arms import ArmTable
from mab_service.learning.node import SHM_DIR, SHM_PREFIX
from mab_service.policy.sampler import sample_top_k
from tests.conftest import Server, start_emulator, stop_process

PRIOR = (2.0, 3.0)
PRIOR_ENV = {"MAB_PRIOR_ALPHA": str(PRIOR[0]), "MAB_PRIOR_BETA": str(PRIOR[1])}


def invalid_counted(http: object, source: str) -> float:
    """The server's ``mab_invalid_parameters_total`` for ``source`` (0 before the first)."""
    text = http.get("/metrics").text  # type: ignore[attr-defined]
    prefix = f'mab_invalid_parameters_total{{source="{source}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def expected_answer(
    candidates: list[str], params: dict[str, tuple[float, float]], seed: int
) -> tuple[list[str], list[float]]:
    """The ids and scores of a /predict answer drawn from ``params`` (the prior for the others) with ``seed``."""
    alpha = np.array([params.get(c, PRIOR)[0] for c in candidates])
    beta = np.array([params.get(c, PRIOR)[1] for c in candidates])
    indices, scores = sample_top_k(alpha, beta, len(candidates), seed=seed)
    return [candidates[i] for i in indices.tolist()], scores.tolist()


# --- the check ----------------------------------------------------------------------------------------------------


class PlainSource:
    name = "plain"
    prior = PRIOR

    async def start(self) -> None:
        pass

    async def fetch(self, ids: list[str]) -> Features:
        raise AssertionError("not read here")

    def health(self) -> Health:
        return Health(True)

    async def close(self) -> None:
        pass


class Layer:
    """A layer around a source, as the cache and the metrics are."""

    name = "cache+plain"
    prior = PRIOR

    def __init__(self, source: PlainSource) -> None:
        self.source = source


def test_count_invalid_counts_every_kind_of_bad_value() -> None:
    alpha = np.array([1.0, 0.0, -1.0, math.nan, math.inf, 2.0, 3.0, 5e-324, 1e308])
    beta = np.array([1.0, 1.0, 1.0, 1.0, 1.0, -math.inf, 0.0, 1.0, 1.0])
    assert count_invalid(alpha, beta) == 6  # the smallest subnormal and the largest double are valid
    assert count_invalid(alpha[:1], beta[:1]) == 0
    assert count_invalid(np.empty(0), np.empty(0)) == 0
    assert count_invalid([1, 2, 0], (1.0, 1.0, 1.0)) == 1  # not float64 arrays: converted
    assert count_invalid(alpha[::2], beta[::2]) == 3  # strided: converted
    with pytest.raises(ValueError, match="alpha and beta must have the same length"):
        count_invalid(alpha, beta[:2])


def test_the_check_writes_the_prior_in_place_counts_by_store_and_logs_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    check = ParameterCheck(clock=lambda: now[0])
    source = Layer(PlainSource())
    caplog.set_level(logging.WARNING, logger="mab_service.features")

    alpha, beta = np.array([5.0, 0.0, math.nan]), np.array([6.0, 7.0, 8.0])
    checked = check.replace(Features(alpha, beta, 3), ["ok", "zero", "nan"], source)  # type: ignore[arg-type]
    assert checked.alpha is alpha and checked.beta is beta  # in place: the loop records what was sampled
    np.testing.assert_array_equal(alpha, [5.0, 2.0, 2.0])
    np.testing.assert_array_equal(beta, [6.0, 3.0, 3.0])
    assert checked.known == 3  # the store knows them; their values were not usable
    assert check.stats().by_source == {"plain": 2}  # the store's name, under its layers
    assert len(caplog.records) == 1
    assert "2 candidates ranked by the prior" in caplog.text and "'zero' from plain: alpha=0.0" in caplog.text

    now[0] += 30  # within the minute: counted, not logged
    check.replace(Features(np.array([-1.0]), np.array([1.0]), 1), ["neg"], source)  # type: ignore[arg-type]
    assert check.stats().by_source == {"plain": 3} and len(caplog.records) == 1
    now[0] += 31  # a minute after the last line: one line with what was replaced since it
    check.replace(Features(np.array([1.0]), np.array([math.inf]), 1), ["inf"], source)  # type: ignore[arg-type]
    assert len(caplog.records) == 2
    assert "2 candidates ranked by the prior" in caplog.records[1].getMessage()
    assert "'inf' from plain: alpha=1.0, beta=inf" in caplog.records[1].getMessage()


def test_read_only_arrays_are_copied_not_written() -> None:
    alpha, beta = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    alpha.flags.writeable = False
    checked = ParameterCheck().replace(Features(alpha, beta, 2), ["a", "b"], PlainSource())  # type: ignore[arg-type]
    np.testing.assert_array_equal(checked.alpha, [2.0, 1.0])
    np.testing.assert_array_equal(alpha, [0.0, 1.0])


def test_the_store_is_named_under_its_layers() -> None:
    assert store_name(Layer(PlainSource())) == "plain"
    assert store_name(PlainSource()) == "plain"


# --- the embedded arm table ---------------------------------------------------------------------------------------


def test_a_reward_without_its_impression_in_the_arm_table_leaves_beta_at_its_prior(
    server_factory: Callable[..., Server], table_csv: Path
) -> None:
    # Learning on: the node's arm table serves the posteriors. A reward counted for an arm whose impression was
    # lost (written here straight into the node's shared table) must not push beta below the arm's beta0.
    server = server_factory(env=PRIOR_ENV, args=["--features", f"csv:{table_csv}", "--max-candidates", "3000"])
    shared = sorted(SHM_DIR.glob(f"{SHM_PREFIX}{server.proc.pid}-*-arms"))
    if not shared:
        pytest.skip(f"the node's arm table is not under {SHM_DIR}")
    with open(shared[0], "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 0)
    arms = ArmTable.attach(mapping)
    try:
        assert arms.add("mid", 0, 80.0, *PRIOR)  # mid: alpha0 50, beta0 50; 80 rewards, no impressions
        assert arms.add("c7", 3, 10.0, *PRIOR)  # c7: alpha0 8, beta0 107
    finally:
        del arms
        mapping.close()
    candidates = ["mid", "c7", "strong", "weak", "unknown"]
    with server.client() as http:
        arm = http.get("/arms/mid").json()
        assert (arm["alpha"], arm["beta"], arm["impressions"], arm["rewards"]) == (130.0, 50.0, 0, 80.0)
        leading = http.get("/arms", params={"top": "5", "order": "rewards"})  # the dashboard's view, 95% intervals
        assert leading.status_code == 200, leading.text
        assert leading.json()["arms"][0]["id"] == "mid" and leading.json()["arms"][0]["beta"] == 50.0
        answer = http.post("/predict", json={"user_id": "u", "candidates": candidates, "seed": 5})
        assert answer.status_code == 200 and answer.json()["degraded"] is False
        params = {"mid": (130.0, 50.0), "c7": (18.0, 107.0), "strong": (1e6, 1.0), "weak": (1.0, 1e6)}
        ids, scores = expected_answer(candidates, params, 5)
        assert answer.json()["ids"] == ids and answer.json()["scores"] == scores
        assert invalid_counted(http, "local") == 0  # valid by construction: nothing to replace


# --- Vertex, both APIs, on the emulator -----------------------------------------------------------------------------

ENTITY_TYPE = "projects/p/locations/l/featurestores/f/entityTypes/content"
FEATURE_VIEW = "projects/p/locations/l/featureOnlineStores/s/featureViews/content"
BAD_TABLE = """entity_id,alpha,beta
good,40,2
fair,3,9
zero,0,5
negative,4,-2
nan,nan,3
infinite,2,inf
"""
BAD = ["zero", "negative", "nan", "infinite"]


@pytest.fixture(scope="module")
def bad_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An emulator process serving a table with invalid values (``--allow-non-finite``); its address."""
    table = tmp_path_factory.mktemp("bad") / "bad.csv"
    table.write_text(BAD_TABLE, encoding="utf-8")
    emulator = start_emulator(table, ["--allow-non-finite"])
    yield emulator.target
    stop_process(emulator.proc)


@pytest.mark.parametrize(
    ("spec", "source"), [(f"vertex:{ENTITY_TYPE}", "vertex"), (f"vertex-fos:{FEATURE_VIEW}", "vertex-fos")]
)
@pytest.mark.parametrize("cache_ttl_s", ["0", "60"], ids=["no-cache", "cache"])
def test_vertex_values_that_are_no_parameters_are_ranked_by_the_prior(
    server_factory: Callable[..., Server], bad_emulator: str, spec: str, source: str, cache_ttl_s: str
) -> None:
    env = {"VERTEX_FEATURESTORE_EMULATOR_HOST": bad_emulator, "MAB_CACHE_TTL_S": cache_ttl_s} | PRIOR_ENV
    server = server_factory(env=env, args=["--features", spec])
    candidates = ["zero", "good", "negative", "nobody", "nan", "fair", "infinite"]
    want = expected_answer(candidates, {"good": (40.0, 2.0), "fair": (3.0, 9.0)}, 17)
    with server.client() as http:
        for n in (1, 2):  # the second from the cache, when there is one: checked and counted again
            answer = http.post("/predict", json={"user_id": "u", "candidates": candidates, "seed": 17})
            assert answer.status_code == 200, answer.text
            assert answer.json()["degraded"] is False  # a bad value is not a store failure
            assert (answer.json()["ids"], answer.json()["scores"]) == want
            assert invalid_counted(http, source) == n * len(BAD)
        assert http.get("/health").status_code == 200
        for arm_id in BAD:  # /arms reports what /predict ranks it by
            arm = http.get(f"/arms/{arm_id}").json()
            assert (arm["alpha"], arm["beta"]) == PRIOR, arm
