"""The Bigtable posterior source against Google's emulator: counts in, Beta posteriors out, the prior for the rest."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from mab_service.errors import FeatureSourceError
from mab_service.features.bigtable import REWARD_SCALE, BigtableSource, Counts, TablePath, data_client
from mab_service.features.source import Features
from tests.fleet.conftest import Emulator

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
