"""The Bigtable posterior source against Google's emulator: counts in, Beta posteriors out, the prior for the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mab_service.errors import FeatureSourceError
from mab_service.features.bigtable import BigtableSource, Counts, data_client
from mab_service.features.source import Features, ParameterCheck
from mab_service.fleet.schema import REWARD_SCALE, TablePath
from tests.conftest import Server
from tests.fleet.conftest import Emulator
from tests.test_bad_values import expected_answer, invalid_counted

PRIOR = (2.0, 3.0)


async def add_counts(table: str, counts: dict[str, tuple[int, float]]) -> None:
    """Add impressions and rewards to arms' rows the way learners do (AddToCell on the aggregate family)."""
    from google.cloud.bigtable.data import AddToCell, RowMutationEntry

    path = TablePath.parse(table)
    client = data_client(path.project)
    try:
        entries = [
            RowMutationEntry(
                id_.encode(),
                [AddToCell("c", b"i", impressions, 0), AddToCell("c", b"r", round(rewards * REWARD_SCALE), 0)],
            )
            for id_, (impressions, rewards) in counts.items()
        ]
        await client.get_table(path.instance, path.table).bulk_mutate_rows(entries)
    finally:
        await client.close()


async def set_cells(table: str, cells: dict[str, dict[bytes, bytes]], family: str = "c", timestamp: int = -1) -> None:
    """Write counts cells' raw bytes: what a learner never writes (anything but an 8-byte int64) in family ``c``, or
    absolute counts in family ``n`` at a window's version ``timestamp`` (micros), as the learner writes them."""
    from google.cloud.bigtable.data import RowMutationEntry, SetCell

    path = TablePath.parse(table)
    client = data_client(path.project)
    try:
        entries = [
            RowMutationEntry(
                id_.encode(), [SetCell(family, qualifier, value, timestamp) for qualifier, value in row.items()]
            )
            for id_, row in cells.items()
        ]
        await client.get_table(path.instance, path.table).bulk_mutate_rows(entries)
    finally:
        await client.close()


async def fetch(table: str, ids: list[str], **options: Any) -> tuple[Features, Counts]:
    source = BigtableSource(table, *PRIOR, **options)
    await source.start()
    try:
        assert source.health().ready
        return await source.fetch(ids), await source.read_counts(ids)
    finally:
        await source.close()
        assert not source.health().ready


READERS = pytest.mark.parametrize("raw_reads", [False, True], ids=["client", "raw"])


@READERS
def test_counts_become_posteriors(fleet_table: str, raw_reads: bool) -> None:
    counts = {"a": (10, 3.0), "b": (1, 0.25), "ünï": (7, 0.0)}
    asyncio.run(add_counts(fleet_table, counts))
    asyncio.run(add_counts(fleet_table, {"a": (5, 1.5)}))  # additions add up
    features, read = asyncio.run(fetch(fleet_table, ["missing", "a", "ünï", "b"], raw_reads=raw_reads))
    np.testing.assert_array_equal(features.alpha, [2.0, 2.0 + 4.5, 2.0, 2.0 + 0.25])
    np.testing.assert_array_equal(features.beta, [3.0, 3.0 + 15 - 4.5, 3.0 + 7, 3.0 + 0.75])
    assert features.known == 3
    np.testing.assert_array_equal(read.impressions, [0, 15, 7, 1])
    np.testing.assert_array_equal(read.found, [False, True, True, True])


@READERS
def test_many_keys_in_chunks(fleet_table: str, raw_reads: bool) -> None:
    counts = {f"arm-{i:04d}": (i + 1, i / 2) for i in range(0, 900, 2)}
    asyncio.run(add_counts(fleet_table, counts))
    ids = [f"arm-{i:04d}" for i in range(900)][::-1]
    features, _ = asyncio.run(fetch(fleet_table, ids, chunk_size=64, raw_reads=raw_reads))
    want_alpha = [2.0 + (i / 2 if i % 2 == 0 else 0) for i in range(900)][::-1]
    want_beta = [3.0 + ((i + 1) - i / 2 if i % 2 == 0 else 0) for i in range(900)][::-1]
    np.testing.assert_allclose(features.alpha, want_alpha, rtol=0, atol=1e-9)
    np.testing.assert_allclose(features.beta, want_beta, rtol=0, atol=1e-9)
    assert features.known == 450


def test_no_ids(fleet_table: str) -> None:
    features, _ = asyncio.run(fetch(fleet_table, []))
    assert features.alpha.shape == (0,) and features.known == 0


@READERS
def test_a_missing_table_stops_the_start(bigtable_emulator: Emulator, raw_reads: bool) -> None:
    source = BigtableSource("projects/fleet/instances/mab/tables/no-such-table", *PRIOR, raw_reads=raw_reads)
    with pytest.raises(
        FeatureSourceError, match="cannot read Bigtable table projects/fleet/instances/mab/tables/no-such"
    ):
        asyncio.run(source.start())
    asyncio.run(source.close())


@pytest.mark.parametrize("bad", ["arms", "bigtable:projects/p/instances/i", "projects/p/instances/i/tables/"])
def test_a_bad_table_name_is_named(bad: str) -> None:
    with pytest.raises(FeatureSourceError, match="a Bigtable table must be projects/P/instances/I/tables/T"):
        BigtableSource(bad, *PRIOR)


def test_raw_reads_ask_again_for_what_a_broken_stream_did_not_answer(fleet_table: str) -> None:
    import grpc
    from google.cloud.bigtable_v2.types import bigtable as messages

    counts = {f"arm-{i:03d}": (i + 1, 0.5) for i in range(50)}
    asyncio.run(add_counts(fleet_table, counts))
    requested: list[int] = []

    async def read() -> Features:
        source = BigtableSource(fleet_table, *PRIOR, raw_reads=True)
        await source.start()
        real = source._read_rows

        def flaky(request: bytes, **options: Any) -> Any:
            requested.append(len(messages.ReadRowsRequest.pb().FromString(request).rows.row_keys))
            stream = real()(request, **options)
            if len(requested) > 1:
                return stream

            async def broken() -> Any:
                async for response in stream:
                    yield response  # one row, then the connection drops
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

            return broken()

        source._read_rows = lambda: flaky  # type: ignore[method-assign]
        try:
            return await source.fetch(list(counts))
        finally:
            await source.close()

    features = asyncio.run(read())
    assert requested[0] == 50 and 0 < requested[1] < 50
    np.testing.assert_array_equal(features.alpha, [2.5] * 50)
    np.testing.assert_array_equal(features.beta, [3.0 + i + 0.5 for i in range(50)])
    assert features.known == 50


async def bad_counts(table: str) -> None:
    """Rows no learner writes as they are, but a store can hold: rewards ahead of impressions (a reward counted before
    the impressions of its answer), negative counts, and cells that are not 8 bytes."""
    await add_counts(table, {"ahead": (2, 5.0), "ok": (10, 1.0), "negative": (-4, 0.0)})
    await set_cells(table, {"short": {b"i": b"\x00\x01\x02\x03"}, "long": {b"r": bytes(9)}})
    await add_counts(table, {"long": (6, 0.0)})  # a good impressions cell beside the bad rewards cell


@READERS
def test_absolute_counts_win_over_the_sums_of_earlier_learners_and_the_newest_version_is_read(
    fleet_table: str, raw_reads: bool
) -> None:
    """A row with family ``n`` is read from it (the newest cell: an older window's late write is not), a row with
    only ``c`` (a table written by earlier learners) from its sums."""

    def int64(n: int) -> bytes:
        return n.to_bytes(8, "big", signed=True)

    asyncio.run(add_counts(fleet_table, {"upgraded": (100, 50.0), "legacy": (10, 3.0)}))
    new = {b"i": int64(120), b"r": int64(55 * REWARD_SCALE)}
    asyncio.run(set_cells(fleet_table, {"upgraded": new, "fresh": new}, family="n", timestamp=2_000_000))
    late = {b"i": int64(1), b"r": int64(0)}  # a zombie's window of an older version
    asyncio.run(set_cells(fleet_table, {"upgraded": late, "fresh": late}, family="n", timestamp=1_000_000))
    _, read = asyncio.run(fetch(fleet_table, ["upgraded", "legacy", "fresh"], raw_reads=raw_reads))
    assert read.impressions.tolist() == [120, 10, 120]
    assert read.rewards.tolist() == [55.0, 3.0, 55.0]


@READERS
def test_counts_that_give_no_posterior_are_clamped_or_left_to_the_check(fleet_table: str, raw_reads: bool) -> None:
    asyncio.run(bad_counts(fleet_table))
    ids = ["ahead", "ok", "short", "negative", "long", "none"]

    async def read() -> tuple[Features, dict[str, float]]:
        source = BigtableSource(fleet_table, *PRIOR, raw_reads=raw_reads)
        await source.start()
        try:
            return await source.fetch(ids), source.stats()
        finally:
            await source.close()

    features, stats = asyncio.run(read())
    # ahead: 5 rewards, 2 impressions -> rewards taken as 2, beta at the prior. negative, short, long: a count that
    # is negative or a cell that is not 8 bytes: NaN for the pipeline's check; the rest of the read keeps its counts.
    nan = np.nan
    np.testing.assert_array_equal(features.alpha, [2.0 + 2, 2.0 + 1, nan, nan, nan, 2.0])
    np.testing.assert_array_equal(features.beta, [3.0, 3.0 + 9, nan, nan, nan, 3.0])
    assert features.known == 5 and features.unread == 0 and stats["invalid_values"] == 3
    checked = ParameterCheck().replace(features, ids, BigtableSource(fleet_table, *PRIOR))
    np.testing.assert_array_equal(checked.alpha, [4.0, 3.0, 2.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(checked.beta, [3.0, 12.0, 3.0, 3.0, 3.0, 3.0])


def test_predict_ranks_bad_counts_by_the_prior_and_counts_them(
    fleet_table: str, server_factory: Callable[..., Server]
) -> None:
    asyncio.run(bad_counts(fleet_table))
    env = {"MAB_PRIOR_ALPHA": str(PRIOR[0]), "MAB_PRIOR_BETA": str(PRIOR[1])}
    server = server_factory(env=env, args=["--features", f"bigtable:{fleet_table}", "--no-learning"])
    candidates = ["short", "ahead", "ok", "negative", "long", "none"]
    want = expected_answer(candidates, {"ahead": (4.0, 3.0), "ok": (3.0, 12.0)}, 23)
    with server.client() as http:
        for n in (1, 2):  # the second from the cache (or read again after its 1 s): checked and counted again
            answer = http.post("/predict", json={"user_id": "u", "candidates": candidates, "seed": 23})
            assert answer.status_code == 200, answer.text
            assert answer.json()["degraded"] is False  # a bad value is not a store failure
            assert (answer.json()["ids"], answer.json()["scores"]) == want
            assert invalid_counted(http, "bigtable") == 3 * n
