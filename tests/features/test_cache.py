"""The feature cache: the C++ table on its own, then FeatureCache over the real Vertex source and the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

from mab_service.emulator import Emulator, Faults, parse_table
from mab_service.errors import FeatureSourceError
from mab_service.features._cache import CacheTable
from mab_service.features.cache import TTL_JITTER, FeatureCache
from mab_service.features.local import LocalSource
from mab_service.features.options import VertexOptions
from mab_service.features.vertex import VertexSource

ENTITY_TYPE = "projects/p/locations/l/featurestores/f/entityTypes/e"

# --- the table ----------------------------------------------------------------------------------------------------


def lookup(table: CacheTable, ids: list[str], now: float, stale_s: float = 0.0, retry_s: float = 1.0):
    return table.lookup(ids, now, stale_s, retry_s, 1.0, 1.0)


def test_fresh_stale_and_expired_entries() -> None:
    t = CacheTable(8)
    t.insert(["a", "b"], [2.0, 9.0], [3.0, 9.0], [True, False], [10.0, 10.0])
    alpha, beta, known, stale, misses, refresh = lookup(t, ["a", "b", "c"], now=5.0, stale_s=4.0)
    np.testing.assert_array_equal(alpha, [2.0, 1.0, 1.0])  # b is negative: the prior, not its stored 9
    np.testing.assert_array_equal(beta, [3.0, 1.0, 1.0])
    assert (known, stale, refresh) == (1, 0, None) and misses.tolist() == [2]
    # Past expiry but within stale_s: served, and reported for refresh once per retry_s.
    _, _, known, stale, misses, refresh = lookup(t, ["a", "b"], now=11.0, stale_s=4.0, retry_s=1.0)
    assert (known, stale, misses, refresh.tolist()) == (1, 2, None, [0, 1])
    assert lookup(t, ["a", "b"], now=11.5, stale_s=4.0)[5] is None
    assert lookup(t, ["a", "b"], now=12.0, stale_s=4.0)[5].tolist() == [0, 1]
    # Beyond the stale window: misses.
    assert lookup(t, ["a", "b"], now=14.0, stale_s=4.0)[4].tolist() == [0, 1]
    assert lookup(t, ["a"], now=10.0)[4].tolist() == [0]  # stale serving off


def test_insert_overwrites_and_refresh_resets_the_stamps() -> None:
    t = CacheTable(4)
    t.insert(["a"], [2.0], [3.0], [True], 10.0)
    t.insert(["a"], [5.0], [6.0], [True], 20.0)
    alpha, beta, known, *_ = lookup(t, ["a"], now=15.0)
    assert (alpha[0], beta[0], known, len(t)) == (5.0, 6.0, 1, 1)


def test_size_is_bounded_and_clock_keeps_what_is_used() -> None:
    t = CacheTable(4)
    t.insert(["a", "b", "c", "d"], np.ones(4), np.ones(4), np.ones(4), 100.0)
    lookup(t, ["a"], now=0.0)  # every entry starts referenced; the hand clears them all, then
    t.insert(["e"], [1.0], [1.0], [True], 100.0)  # evicts the first unreferenced: a
    lookup(t, ["b", "c"], now=0.0)
    t.insert(["f"], [1.0], [1.0], [True], 100.0)  # b, c were used since: d goes
    misses = lookup(t, ["a", "b", "c", "d", "e", "f"], now=0.0)[4]
    assert misses.tolist() == [0, 3] and len(t) == 4 and t.evictions == 2


def test_long_ids_and_unicode_round_trip() -> None:
    t = CacheTable(16)
    ids = ["x" * 100, "é-unicode", "", "short", "y" * 17]
    t.insert(ids, np.arange(1.0, 6.0), np.arange(2.0, 7.0), np.ones(5, bool), 10.0)
    alpha, _, known, _, misses, _ = lookup(t, ids + ["x" * 99], now=0.0)
    np.testing.assert_array_equal(alpha, [1.0, 2.0, 3.0, 4.0, 5.0, 1.0])
    assert known == 5 and misses.tolist() == [5]
    assert t.memory_bytes > 16 * CacheTable.entry_bytes() // 2  # records, index and two long ids
    t.clear()
    assert len(t) == 0 and lookup(t, ["short"], now=0.0)[4].tolist() == [0]


def test_matches_a_dict_model_under_churn(rand) -> None:
    t = CacheTable(500)
    model: dict[str, float] = {}
    for step in range(100):
        ids = list(dict.fromkeys(f"k{i}" for i in rand.gen.integers(0, 1500, 200)))
        alpha, _, known, _, misses, _ = lookup(t, ids, now=float(step))
        missed = set() if misses is None else set(misses.tolist())
        for j, id_ in enumerate(ids):
            if j not in missed:
                assert alpha[j] == model[id_], (rand, step, id_)
        assert known == len(ids) - len(missed)
        values = rand.gen.random(len(ids)) + 0.5
        t.insert(ids, values, values, np.ones(len(ids), bool), 1e9)
        model.update(zip(ids, values.tolist()))
        assert len(t) <= 500
    assert t.evictions > 0


def test_bad_arguments_raise() -> None:
    t = CacheTable(4)
    with pytest.raises(TypeError, match=r"ids\[1\] must be a string \(got int\)"):
        lookup(t, ["a", 3], now=0.0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        t.insert(["a", "b"], [1.0], [1.0, 2.0], [True, True], 1.0)
    with pytest.raises(ValueError, match="prior_alpha must be finite and > 0"):
        t.lookup(["a"], 0.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        CacheTable(0)
    with pytest.raises(ValueError, match="lone surrogate"):
        lookup(t, ["\ud800"], now=0.0)


# --- the cache over the Vertex source ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rows(shift: float = 0.0, n: int = 300) -> list[str]:
    return ["entity_id,alpha,beta"] + [f"e{i},{i + 1 + shift},{50 + i}" for i in range(n)]


@asynccontextmanager
async def cached(
    faults: Faults | None = None, *, ttl_s: float = 10.0, stale_s: float = 0.0, max_entries: int = 10_000, **options
) -> AsyncIterator[tuple[FeatureCache, Emulator, Clock]]:
    em = Emulator(parse_table(rows(), "t.csv"), faults, seed=3)
    port = await em.start()
    clock = Clock()
    options = {"deadline_s": 5.0, "call_timeout_s": 2.0, "backoff_s": 0.001, "on_failure": "fail"} | options
    opts = VertexOptions(emulator_host=f"127.0.0.1:{port}", **options)
    cache = FeatureCache(
        VertexSource(ENTITY_TYPE, opts), ttl_s=ttl_s, stale_s=stale_s, retry_s=1.0, max_entries=max_entries, clock=clock
    )
    await cache.start()
    assert cache.health().ready
    em.reset()
    try:
        yield cache, em, clock
    finally:
        await cache.close()
        await em.stop(None)


def store_ids(em: Emulator) -> int:
    return em.counters.ids


@pytest.mark.anyio
async def test_hits_do_not_reach_the_store_and_answers_do_not_change() -> None:
    ids = [f"e{i}" for i in range(250)] + ["unknown"]
    async with cached() as (cache, em, _):
        first = await cache.fetch(ids)
        assert store_ids(em) == 251
        second = await cache.fetch(list(reversed(ids)))
        assert store_ids(em) == 251  # all hits, the unknown id included (negative entry)
        np.testing.assert_array_equal(second.alpha, first.alpha[::-1])
        assert first.known == second.known == 250
        assert cache.stats()["hits"] == 251 and cache.stats()["misses"] == 251


@pytest.mark.anyio
async def test_concurrent_misses_for_the_same_id_share_one_read() -> None:
    async with cached(Faults(latency_ms=30)) as (cache, em, _):
        a = [f"e{i}" for i in range(0, 100)]
        b = [f"e{i}" for i in range(50, 150)]
        first, second, third = await asyncio.gather(cache.fetch(a), cache.fetch(b), cache.fetch(a))
        assert store_ids(em) == 150  # 50..99 read once, not twice; `a` a second time not at all
        assert cache.stats()["coalesced"] == 150
        np.testing.assert_array_equal(first.alpha, np.arange(1.0, 101.0))
        np.testing.assert_array_equal(second.alpha, np.arange(51.0, 151.0))
        np.testing.assert_array_equal(third.alpha, first.alpha)


@pytest.mark.anyio
async def test_entries_expire_after_the_ttl() -> None:
    async with cached(ttl_s=10.0) as (cache, em, clock):
        await cache.fetch(["e1", "gone"])
        em.load(parse_table(rows(shift=100.0), "t2.csv"))
        clock.now += 10.0 * (1 - TTL_JITTER) - 0.01  # still fresh for every jitter draw
        assert (await cache.fetch(["e1"])).alpha[0] == 2.0 and store_ids(em) == 2
        clock.now += 10.0 * TTL_JITTER + 0.02  # expired for every draw
        assert (await cache.fetch(["e1", "gone"])).alpha.tolist() == [102.0, 1.0]
        assert store_ids(em) == 4


@pytest.mark.anyio
async def test_stale_entries_are_served_while_refreshed_in_the_background() -> None:
    async with cached(Faults(latency_ms=20), ttl_s=10.0, stale_s=30.0) as (cache, em, clock):
        await cache.fetch(["e1", "e2"])
        em.load(parse_table(rows(shift=100.0), "t2.csv"))
        clock.now += 15.0
        stale = await cache.fetch(["e1", "e2"])
        assert stale.alpha.tolist() == [2.0, 3.0]  # served at once, without waiting for the store
        again = await cache.fetch(["e1", "e2"])  # the refresh is queued or in flight: not reported twice
        await asyncio.sleep(0.005)
        assert again.alpha.tolist() == [2.0, 3.0] and cache.stats()["refreshes"] == 2
        for _ in range(100):
            if (await cache.fetch(["e1", "e2"])).alpha.tolist() == [102.0, 103.0]:
                break
            await asyncio.sleep(0.01)
        assert (await cache.fetch(["e1", "e2"])).alpha.tolist() == [102.0, 103.0]
        assert store_ids(em) == 4 and cache.stats()["stale_served"] >= 4


@pytest.mark.anyio
async def test_stale_ids_of_many_requests_are_refreshed_in_a_few_large_reads() -> None:
    async with cached(Faults(latency_ms=10), ttl_s=10.0, stale_s=30.0) as (cache, em, clock):
        ids = [f"e{i}" for i in range(300)]
        await cache.fetch(ids)
        em.reset()
        clock.now += 15.0
        for start in range(0, 300, 3):  # 100 requests, each with 3 stale ids of its own
            await cache.fetch(ids[start : start + 3])
        for _ in range(200):
            if cache.stats()["refreshes"] == 300 and not cache._in_flight:
                break
            await asyncio.sleep(0.01)
        assert cache.stats()["refreshes"] == 300
        assert em.counters.calls["StreamingReadFeatureValues"] <= 6  # not 100 reads of 3 ids


@pytest.mark.anyio
async def test_a_store_known_to_fail_leaves_the_cache_serving_what_it_holds_however_old() -> None:
    options = {"retries": 0, "unready_after_failures": 1, "probe_interval_s": 60.0, "on_failure": "degrade"}
    async with cached(ttl_s=10.0, stale_s=5.0, **options) as (cache, em, clock):
        await cache.fetch(["e1"])
        em.faults.unavailable_rate = 1.0
        clock.now += 100.0  # far past expiry and the stale window: a miss for a healthy store
        first = await cache.fetch(["e1"])
        assert first.unread == 1 and first.alpha[0] == 1.0  # the read fails: the prior, and the store is failing
        assert not cache.health().ready
        second = await cache.fetch(["e1", "e2"])
        assert second.alpha.tolist() == [2.0, 1.0] and second.unread == 1  # e1 as cached; e2 never was


@pytest.mark.anyio
async def test_after_an_outage_what_expired_meanwhile_is_served_stale_and_refreshed_in_the_background() -> None:
    options = {"retries": 0, "unready_after_failures": 1, "probe_interval_s": 0.02, "on_failure": "degrade"}
    async with cached(ttl_s=10.0, stale_s=5.0, **options) as (cache, em, clock):
        await cache.fetch(["e1", "e2"])
        em.faults.unavailable_rate = 1.0
        clock.now += 100.0
        await cache.fetch(["e3"])  # a miss fails: the store is known to be failing
        assert not cache.health().ready
        em.load(parse_table(rows(shift=100.0), "t2.csv"))
        em.faults.unavailable_rate = 0.0
        for _ in range(100):
            if cache.health().ready:
                break
            await asyncio.sleep(0.01)
        assert cache.health().ready
        em.reset()
        misses = cache.stats()["misses"]
        recovered = await cache.fetch(["e1", "e2"])  # expired 90 s ago: served at once, not read by the request
        assert recovered.alpha.tolist() == [2.0, 3.0] and cache.stats()["misses"] == misses
        for _ in range(100):
            if (await cache.fetch(["e1", "e2"])).alpha.tolist() == [102.0, 103.0]:
                break
            await asyncio.sleep(0.01)
        assert (await cache.fetch(["e1", "e2"])).alpha.tolist() == [102.0, 103.0]  # refreshed in the background
        clock.now += 100.0  # past the grace: the normal stale window again
        assert (await cache.fetch(["e1"])).alpha[0] == 102.0 and cache.stats()["misses"] == misses + 1


@pytest.mark.anyio
async def test_a_failed_refresh_keeps_the_stale_value() -> None:
    async with cached(ttl_s=10.0, stale_s=30.0, retries=0) as (cache, em, clock):
        await cache.fetch(["e1"])
        em.faults.unavailable_rate = 1.0
        clock.now += 15.0
        assert (await cache.fetch(["e1"])).alpha[0] == 2.0
        for _ in range(100):
            if cache.stats()["refresh_failures"]:
                break
            await asyncio.sleep(0.01)
        assert cache.stats()["refresh_failures"] == 1
        assert (await cache.fetch(["e1"])).alpha[0] == 2.0


@pytest.mark.anyio
async def test_a_miss_that_cannot_be_read_fails_the_request() -> None:
    async with cached(retries=0) as (cache, em, _):
        em.faults.unavailable_rate = 1.0
        with pytest.raises(FeatureSourceError, match="UNAVAILABLE"):
            await cache.fetch(["e1"])
        em.faults.unavailable_rate = 0.0
        assert (await cache.fetch(["e1"])).alpha[0] == 2.0  # nothing was cached from the failure


@pytest.mark.anyio
async def test_a_degraded_read_is_not_cached() -> None:
    async with cached(retries=0, on_failure="degrade", unready_after_failures=10) as (cache, em, _):
        await cache.fetch(["e1"])
        em.faults.unavailable_rate = 1.0
        features = await cache.fetch(["e1", "e2"])  # e1 cached, e2 not read
        assert features.alpha.tolist() == [2.0, 1.0] and (features.known, features.unread) == (1, 1)
        em.faults.unavailable_rate = 0.0
        features = await cache.fetch(["e2"])
        assert features.alpha.tolist() == [3.0] and features.unread == 0  # read again, not a cached unknown


@pytest.mark.anyio
async def test_a_cancelled_request_does_not_cancel_a_shared_read() -> None:
    async with cached(Faults(latency_ms=50)) as (cache, em, _):
        leaver = asyncio.ensure_future(cache.fetch(["e1", "e2"]))
        stayer = asyncio.ensure_future(cache.fetch(["e2", "e1"]))
        await asyncio.sleep(0.01)
        leaver.cancel()
        features = await stayer
        assert features.alpha.tolist() == [3.0, 2.0] and store_ids(em) == 2
        with pytest.raises(asyncio.CancelledError):
            await leaver


@pytest.mark.anyio
async def test_the_cache_holds_at_most_max_entries() -> None:
    async with cached(max_entries=100) as (cache, em, _):
        await cache.fetch([f"e{i}" for i in range(250)])
        stats = cache.stats()
        assert stats["entries"] == 100 and stats["evictions"] == 150
        assert stats["memory_bytes"] <= 100 * stats["entry_bytes"] + 1024


@pytest.mark.anyio
async def test_health_is_the_sources() -> None:
    async with cached(retries=0, unready_after_failures=1) as (cache, em, _):
        assert cache.health().ready
        em.faults.unavailable_rate = 1.0
        with pytest.raises(FeatureSourceError):
            await cache.fetch(["e1"])
        assert not cache.health().ready


@pytest.mark.anyio
async def test_any_source_can_be_cached(table_csv) -> None:
    cache = FeatureCache(LocalSource(table_csv, 1.0, 1.0), ttl_s=5.0, max_entries=100)
    await cache.start()
    try:
        first = await cache.fetch(["strong", "nobody", "mid"])
        second = await cache.fetch(["mid", "strong", "nobody"])
        assert first.alpha.tolist() == [1_000_000.0, 1.0, 50.0] and first.known == 2
        assert second.alpha.tolist() == [50.0, 1_000_000.0, 1.0] and second.known == 2
        assert cache.stats()["hits"] == 3
    finally:
        await cache.close()
