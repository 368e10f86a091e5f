"""The Bigtable posterior source against Google's emulator: counts in, Beta posteriors out, the prior for the rest."""

from __future__ import annotations

import asyncio

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


async def fetch(table: str, ids: list[str], **options: int) -> tuple[Features, Counts]:
    source = BigtableSource(table, *PRIOR, **options)
    await source.start()
    try:
        assert source.health().ready
        return await source.fetch(ids), await source.read_counts(ids)
    finally:
        await source.close()
        assert not source.health().ready


def test_counts_become_posteriors(fleet_table: str) -> None:
    counts = {"a": (10, 3.0), "b": (1, 0.25), "ünï": (7, 0.0)}
    asyncio.run(add_counts(fleet_table, counts))
    asyncio.run(add_counts(fleet_table, {"a": (5, 1.5)}))  # additions add up
    features, read = asyncio.run(fetch(fleet_table, ["missing", "a", "ünï", "b"]))
    np.testing.assert_array_equal(features.alpha, [2.0, 2.0 + 4.5, 2.0, 2.0 + 0.25])
    np.testing.assert_array_equal(features.beta, [3.0, 3.0 + 15 - 4.5, 3.0 + 7, 3.0 + 0.75])
    assert features.known == 3
    np.testing.assert_array_equal(read.impressions, [0, 15, 7, 1])
    np.testing.assert_array_equal(read.found, [False, True, True, True])


def test_many_keys_in_chunks(fleet_table: str) -> None:
    counts = {f"arm-{i:04d}": (i + 1, i / 2) for i in range(0, 900, 2)}
    asyncio.run(add_counts(fleet_table, counts))
    ids = [f"arm-{i:04d}" for i in range(900)][::-1]
    features, _ = asyncio.run(fetch(fleet_table, ids, chunk_size=64))
    want_alpha = [2.0 + (i / 2 if i % 2 == 0 else 0) for i in range(900)][::-1]
    want_beta = [3.0 + ((i + 1) - i / 2 if i % 2 == 0 else 0) for i in range(900)][::-1]
    np.testing.assert_allclose(features.alpha, want_alpha, rtol=0, atol=1e-9)
    np.testing.assert_allclose(features.beta, want_beta, rtol=0, atol=1e-9)
    assert features.known == 450


def test_no_ids(fleet_table: str) -> None:
    features, _ = asyncio.run(fetch(fleet_table, []))
    assert features.alpha.shape == (0,) and features.known == 0


def test_a_missing_table_stops_the_start(bigtable_emulator: Emulator) -> None:
    source = BigtableSource("projects/fleet/instances/mab/tables/no-such-table", *PRIOR)
    with pytest.raises(
        FeatureSourceError, match="cannot read Bigtable table projects/fleet/instances/mab/tables/no-such"
    ):
        asyncio.run(source.start())
    asyncio.run(source.close())


@pytest.mark.parametrize("bad", ["arms", "bigtable:projects/p/instances/i", "projects/p/instances/i/tables/"])
def test_a_bad_table_name_is_named(bad: str) -> None:
    with pytest.raises(FeatureSourceError, match="a Bigtable table must be projects/P/instances/I/tables/T"):
        BigtableSource(bad, *PRIOR)
