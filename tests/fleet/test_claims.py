"""A client's own event id is claimed for the whole fleet: one CheckAndMutateRow on the event's membership row, against
Google's Bigtable emulator, from two replicas' Fleet objects at once."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from mab_service.fleet import requests as bigtable_requests
from mab_service.fleet.replica import Fleet
from tests.fleet.conftest import Emulator


def test_a_claim_is_the_clients_own_request_in_bytes() -> None:
    pytest.importorskip("google.cloud.bigtable")
    from google.cloud.bigtable.data import SetCell, row_filters
    from google.cloud.bigtable_v2.types import bigtable

    table = "projects/p/instances/i/tables/t"
    ids = ["a-1", "日本"]
    ours = bigtable_requests.claim_event(bigtable_requests.table_field(table), "client:ev.1", ids, 1_700_000_000.1234)
    theirs = bigtable.CheckAndMutateRowRequest(
        table_name=table,
        row_key=b"\x00e/client:ev.1",
        predicate_filter=row_filters.RowFilterChain(
            [row_filters.FamilyNameRegexFilter("e"), row_filters.ColumnQualifierRegexFilter(b"^i$")]
        )._to_pb(),
        false_mutations=[SetCell("e", b"i", orjson.dumps(ids), 1_700_000_000_123_000)._to_pb()],
    )
    assert bigtable.CheckAndMutateRowRequest.deserialize(ours) == theirs


def test_a_claim_and_a_membership_entry_of_an_answer_within_a_segment_write_its_segment_cell() -> None:
    pytest.importorskip("google.cloud.bigtable")
    from google.cloud.bigtable.data import SetCell
    from google.cloud.bigtable_v2.types import bigtable

    table = "projects/p/instances/i/tables/t"
    ids, t = ["a-1", "b"], 1_700_000_000.5
    cells = [
        SetCell("e", b"i", orjson.dumps(ids), 1_700_000_000_500_000),
        SetCell("e", b"s", "fr-é".encode(), 1_700_000_000_500_000),
    ]
    claim = bigtable.CheckAndMutateRowRequest.deserialize(
        bigtable_requests.claim_event(bigtable_requests.table_field(table), "client:ev.2", ids, t, "fr-é")
    )
    assert list(claim.false_mutations) == [cell._to_pb() for cell in cells]
    entry = bigtable.MutateRowsRequest.deserialize(
        bigtable_requests.table_field(table) + bigtable_requests.membership_entry("ev-3", ids, t, "fr-é")
    ).entries[0]
    assert entry.row_key == b"\x00e/ev-3" and list(entry.mutations) == [cell._to_pb() for cell in cells]


def test_two_replicas_claiming_one_id_one_wins(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, fleet_table: str
) -> None:
    async def run() -> tuple[list[bool], list[bool], dict[str, object], int]:
        replicas = [Fleet("projects/fleet/topics/unused", fleet_table, window_s=60.0) for _ in range(2)]
        for replica in replicas:
            await replica.start()
        try:
            # Twenty ids, each claimed by both replicas at the same moment.
            claims = [
                asyncio.gather(*(r.claim(f"client:{n}", [f"by-{i}"], 1_700_000_000.0) for i, r in enumerate(replicas)))
                for n in range(20)
            ]
            outcomes = await asyncio.gather(*claims)
            first = [a for a, _ in outcomes]
            second = [b for _, b in outcomes]
            events = await replicas[1].read_events([f"client:{n}" for n in range(20)])
            again = await replicas[0].claim("client:0", ["late"], 1_700_000_001.0)
            rows = {e: sorted(event.ids) for e, event in events.items()}
            refused = replicas[0].claims_refused + replicas[1].claims_refused
            return first, second, {"rows": rows, "again": again}, refused
        finally:
            for replica in replicas:
                await replica.close()

    first, second, seen, refused = asyncio.run(run())
    assert all(a != b for a, b in zip(first, second)), (first, second)  # exactly one of two, for each id
    assert refused == 20 + 1  # and the late claim
    rows = seen["rows"]
    assert isinstance(rows, dict) and len(rows) == 20
    for n, won_first in enumerate(first):
        # The row holds the winner's ids, written by the claim itself.
        assert rows[f"client:{n}"] == ["by-0" if won_first else "by-1"]
    assert seen["again"] is False  # taken stays taken
