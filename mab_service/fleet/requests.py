"""Bigtable requests written as protobuf bytes, for the calls made once per answer or per arm and window.

Through the client's message classes a CheckAndMutateRow costs ~3.5 times the CPU of these bytes (docs/fleet.md), and
a membership row tens of microseconds where a dozen byte concatenations take a few. The calls go out on the client's
own channel (its credentials, its emulator), so only the encoding is ours; tests/fleet/test_learner.py checks the
CheckAndMutateRow bytes against the client's own request.
"""

from __future__ import annotations

import re

import orjson

from mab_service.fleet.schema import (
    COUNTS_FAMILY,
    EVENTS_FAMILY,
    IMPRESSIONS,
    MARKERS_FAMILY,
    MEMBERS,
    REWARDS,
    event_row,
)

CHECK_AND_MUTATE_ROW = "/google.bigtable.v2.Bigtable/CheckAndMutateRow"
MUTATE_ROWS = "/google.bigtable.v2.Bigtable/MutateRows"

# The CheckAndMutateRow request, written as protobuf bytes (google/bigtable/v2/bigtable.proto and data.proto). Field
# numbers: CheckAndMutateRowRequest table_name 1, row_key 2, predicate_filter 6, false_mutations 5; RowFilter chain 1,
# family_name_regex_filter 5, column_qualifier_regex_filter 6; Chain filters 1; Mutation set_cell 1, add_to_cell 5;
# SetCell family_name 1, column_qualifier 2, timestamp_micros 3; AddToCell family_name 1, column_qualifier 2,
# timestamp 3, input 4; Value raw_value 8, raw_timestamp_micros 9, int_value 6. tests/fleet/test_learner.py checks the
# bytes against the client's own request.


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


_MARKER_CELL = field(1, MARKERS_FAMILY.encode()) + b"\x12"  # family_name, then column_qualifier's tag


def set_marker(marker: bytes, timestamp: bytes) -> bytes:
    """A false-case mutation of the request: write marker cell ``d:<marker>`` (empty value) at ``timestamp``
    (``timestamp_field``). Several per event: written out by hand."""
    cell = _MARKER_CELL + varint(len(marker)) + marker + timestamp
    set_cell = b"\x0a" + varint(len(cell)) + cell
    return b"\x2a" + varint(len(set_cell)) + set_cell


def timestamp_field(timestamp_micros: int) -> bytes:
    """SetCell's timestamp_micros field."""
    return b"\x18" + varint(timestamp_micros)


def add_count(qualifier: bytes, value: int) -> bytes:
    """A false-case mutation of the request: add ``value`` to ``c:<qualifier>``'s one aggregate cell (timestamp 0)."""
    add = (
        field(1, COUNTS_FAMILY.encode())
        + field(2, field(8, qualifier))
        + field(3, b"\x48\x00")
        + field(4, b"\x30" + varint(value))
    )
    return field(5, field(5, add))


_FAMILY_FILTER = field(1, field(5, MARKERS_FAMILY.encode()))


#: One marker of an arm's row and what it guards, a message's impressions of the arm or one reward: the marker as a
#: pattern (``quote``), the mutation writing it (``set_marker``), impressions, reward in millionths. A tuple: a
#: window makes several per event.
Mark = tuple[bytes, bytes, int, int]


def check_and_mutate(table_name: bytes, key: bytes, marks: list[Mark]) -> bytes:
    """The request: unless a cell ``d:<one of marks>`` is in row ``key``, write the marks and add their counts."""
    pattern = b"^(?:" + b"|".join([mark[0] for mark in marks]) + b")$"
    predicate = field(6, field(1, _FAMILY_FILTER + field(1, field(6, pattern))))
    impressions = rewards = 0
    for _, _, n, reward in marks:
        impressions += n
        rewards += reward
    mutations = b"".join([mark[1] for mark in marks])
    if impressions:
        mutations += add_count(IMPRESSIONS, impressions)
    if rewards:
        mutations += add_count(REWARDS, rewards)
    return table_name + field(2, key) + predicate + mutations


def membership_entry(event_id: str, ids: list[str], t: float) -> bytes:
    """One ``MutateRowsRequest.Entry`` (``fleet.replica``): SetCell ``e:i`` = the ids as JSON, at the answer's time
    (milliseconds, Bigtable's granularity). Fields: Entry row_key 1, mutations 2; Mutation set_cell 1; SetCell
    family_name 1, column_qualifier 2, timestamp_micros 3, value 4."""
    return field(2, field(1, event_row(event_id)) + field(2, _membership_mutation(ids, t)))


def _membership_mutation(ids: list[str], t: float) -> bytes:
    """The Mutation writing ``e:i``: SetCell of the ids as JSON at ``t`` in milliseconds."""
    set_cell = b"\x0a\x01" + EVENTS_FAMILY.encode() + b"\x12\x01" + MEMBERS + b"\x18" + varint(int(t * 1000) * 1000)
    set_cell += field(4, orjson.dumps(ids))
    return field(1, set_cell)


#: The predicate of a claim: the row has a cell ``e:i`` (family regex ``e``, qualifier regex ``^i$``).
_MEMBERS_FILTER = field(6, field(1, field(1, field(5, EVENTS_FAMILY.encode())) + field(1, field(6, b"^i$"))))


def claim_event(table_name: bytes, event_id: str, ids: list[str], t: float) -> bytes:
    """A CheckAndMutateRowRequest claiming a client's own event id across the fleet: unless the event's membership
    row has its ``e:i`` cell already (the id is taken, on any replica), write it, as ``membership_entry`` would.
    Bigtable applies the check and the write atomically, so of replicas racing on one id exactly one sees
    ``predicate_matched`` false."""
    key = field(2, event_row(event_id))
    return table_name + key + _MEMBERS_FILTER + field(5, _membership_mutation(ids, t))
