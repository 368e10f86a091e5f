"""Bigtable requests written as protobuf bytes, for the entries made once per answer or per arm and window.

Through the client's message classes an entry costs tens of microseconds where a dozen byte concatenations take a few
(docs/fleet.md). The calls go out on the client's own channel (its credentials, its emulator), so only the encoding is
ours; tests/fleet/test_learner.py checks the counts entries against the client's own request.
"""

from __future__ import annotations

import re

import orjson

from mab_service.fleet.schema import (
    ABSOLUTE_FAMILY,
    DECAYED,
    EVENTS_FAMILY,
    IMPRESSIONS,
    MEMBERS,
    REWARDS,
    SEGMENT,
    decayed_cell,
    event_row,
)

CHECK_AND_MUTATE_ROW = "/google.bigtable.v2.Bigtable/CheckAndMutateRow"
MUTATE_ROWS = "/google.bigtable.v2.Bigtable/MutateRows"

# Requests written as protobuf bytes (google/bigtable/v2/bigtable.proto and data.proto). Field numbers:
# CheckAndMutateRowRequest table_name 1, row_key 2, predicate_filter 6, false_mutations 5; RowFilter chain 1,
# family_name_regex_filter 5, column_qualifier_regex_filter 6; Chain filters 1; MutateRowsRequest table_name 1,
# entries 2; Entry row_key 1, mutations 2; Mutation set_cell 1, delete_from_column 2; SetCell family_name 1,
# column_qualifier 2, timestamp_micros 3, value 4; DeleteFromColumn family_name 1, column_qualifier 2, time_range 3;
# TimestampRange end_timestamp_micros 2. tests/fleet/test_learner.py checks the bytes against the client's own request.


_SMALL = [bytes((n,)) for n in range(0x80)]


def varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def table_field(table: str) -> bytes:
    """The request's table_name field, the same for every call."""
    return field(1, table.encode())


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (bytes, string or message)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


_SPECIAL = re.compile(rb"[^A-Za-z0-9_/:-]")


def quote(marker: bytes) -> bytes:
    """An RE2 pattern matching exactly ``marker``: every byte but letters, digits and ``_/:-`` as ``\\xHH``."""
    return _SPECIAL.sub(lambda m: b"\\x%02x" % m[0][0], marker)


_IMPRESSIONS_CELL = b"\x0a\x01" + ABSOLUTE_FAMILY.encode() + b"\x12\x01" + IMPRESSIONS + b"\x18"
_REWARDS_CELL = b"\x0a\x01" + ABSOLUTE_FAMILY.encode() + b"\x12\x01" + REWARDS + b"\x18"


def older_than(timestamp: bytes) -> bytes:
    """The mutations deleting the cells of ``n:i`` and ``n:r`` older than ``timestamp`` (``varint`` of micros), for
    ``counts_entry``: the same for every arm of a window."""
    time_range = field(3, b"\x10" + timestamp)  # time_range: TimestampRange end_timestamp_micros (exclusive)
    i = _IMPRESSIONS_CELL[:-1] + time_range
    r = _REWARDS_CELL[:-1] + time_range
    return field(2, field(2, i)) + field(2, field(2, r))


def counts_entry(key: bytes, impressions: int, rewards: int, timestamp: bytes, older: bytes) -> bytes:
    """One ``MutateRowsRequest.Entry`` (``fleet.learner``): delete the cells of ``n:i`` and ``n:r`` older than
    ``timestamp`` (``older``, from ``older_than``), then SetCell them to the arm's absolute counts (int64, big-endian,
    as Bigtable's own counters) at ``timestamp`` (``varint`` of the window's ``schema.version_micros``). A row thus
    holds one cell per count whatever Bigtable's collection has done, and a late write of an older window (a learner
    whose lease expired) deletes nothing newer and is never the newest. Once per arm and window: written by hand."""
    i = _IMPRESSIONS_CELL + timestamp + b"\x22\x08" + impressions.to_bytes(8, "big", signed=True)
    r = _REWARDS_CELL + timestamp + b"\x22\x08" + rewards.to_bytes(8, "big", signed=True)
    first = b"\x0a" + varint(len(i)) + i
    second = b"\x0a" + varint(len(r)) + r
    body = field(1, key) + older + b"\x12" + varint(len(first)) + first + b"\x12" + varint(len(second)) + second
    return b"\x12" + varint(len(body)) + body


_DECAYED_CELL = b"\x0a\x01" + ABSOLUTE_FAMILY.encode() + b"\x12\x01" + DECAYED + b"\x18"


def older_decayed_than(timestamp: bytes) -> bytes:
    """The mutation deleting the cells of ``n:d`` older than ``timestamp``, for ``decayed_entry``."""
    return field(2, field(2, _DECAYED_CELL[:-1] + field(3, b"\x10" + timestamp)))


def decayed_entry(key: bytes, epoch: int, impressions: float, rewards: float, timestamp: bytes, older: bytes) -> bytes:
    """One ``MutateRowsRequest.Entry`` with a half-life: as ``counts_entry``, for the one cell ``n:d`` holding the
    arm's forward-decayed sums and their epoch (``schema.decayed_cell``); ``older`` from ``older_decayed_than``."""
    d = _DECAYED_CELL + timestamp + b"\x22\x18" + decayed_cell(epoch, impressions, rewards)
    mutation = b"\x0a" + varint(len(d)) + d
    body = field(1, key) + older + b"\x12" + varint(len(mutation)) + mutation
    return b"\x12" + varint(len(body)) + body


def membership_entry(event_id: str, ids: list[str], t: float, segment: str | None = None) -> bytes:
    """One ``MutateRowsRequest.Entry`` (``fleet.replica``): SetCell ``e:i`` = the ids as JSON, at the answer's time
    (milliseconds, Bigtable's granularity), and ``e:s`` = the segment, if the answer was ranked within one. Fields:
    Entry row_key 1, mutations 2; Mutation set_cell 1; SetCell family_name 1, column_qualifier 2, timestamp_micros 3,
    value 4."""
    return field(2, field(1, event_row(event_id)) + _membership_mutations(ids, t, segment, 2))


def _membership_mutations(ids: list[str], t: float, segment: str | None, number: int) -> bytes:
    """The Mutations (as repeated field ``number``) writing ``e:i``, the ids as JSON, and ``e:s``, the segment if
    any: SetCells at ``t`` in milliseconds."""
    timestamp = varint(int(t * 1000) * 1000)
    set_cell = b"\x0a\x01" + EVENTS_FAMILY.encode() + b"\x12\x01" + MEMBERS + b"\x18" + timestamp
    mutations = field(number, field(1, set_cell + field(4, orjson.dumps(ids))))
    if segment is not None:
        set_cell = b"\x0a\x01" + EVENTS_FAMILY.encode() + b"\x12\x01" + SEGMENT + b"\x18" + timestamp
        mutations += field(number, field(1, set_cell + field(4, segment.encode())))
    return mutations


#: The predicate of a claim: the row has a cell ``e:i`` (family regex ``e``, qualifier regex ``^i$``).
_MEMBERS_FILTER = field(6, field(1, field(1, field(5, EVENTS_FAMILY.encode())) + field(1, field(6, b"^i$"))))


def claim_event(table_name: bytes, event_id: str, ids: list[str], t: float, segment: str | None = None) -> bytes:
    """A CheckAndMutateRowRequest claiming a client's own event id across the fleet: unless the event's membership
    row has its ``e:i`` cell already (the id is taken, on any replica), write it (and ``e:s``), as
    ``membership_entry`` would. Bigtable applies the check and the write atomically, so of replicas racing on one id
    exactly one sees ``predicate_matched`` false."""
    key = field(2, event_row(event_id))
    return table_name + key + _MEMBERS_FILTER + _membership_mutations(ids, t, segment, 5)
