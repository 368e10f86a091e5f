"""The fleet's Bigtable table: its path, column families, qualifiers and row keys, one definition each.

A table ``projects/P/instances/I/tables/T`` holds one row per arm, keyed by its id (UTF-8): family ``c`` (an
aggregate int64 sum family) holds ``c:i``, the arm's impressions, and ``c:r``, its rewards in millionths. Family
``d`` holds the learners' deduplication markers, family ``e`` the events' membership rows, family ``s`` the fleet's
own rows (configuration, shard leases, live learners). The fleet's own rows begin with a NUL byte, which no id
can (ids have no control characters: ``mab_service.ids``), so they never meet an arm's row.

This module imports nothing of the project but ``errors`` and ``specs`` (the table's name): the ``bigtable:``
source and the fleet's deployables (replica, learner, setup) all stand on it.
"""

from __future__ import annotations

import urllib.parse
from typing import NamedTuple

from mab_service.errors import FeatureSourceError
from mab_service.specs import TABLE

COUNTS_FAMILY = "c"
IMPRESSIONS = b"i"
REWARDS = b"r"
MARKERS_FAMILY = "d"
#: Events' membership rows (``fleet.replica``): which ids an answer returned, and which are rewarded.
EVENTS_FAMILY = "e"
#: Membership rows' keys: this prefix and the event id. Counts and membership are in different families, so even an
#: arm id that began with it would read only its counts.
EVENT_ROW_PREFIX = b"\x00e/"
#: A membership row's cell ``e:i`` holds the ids the answer returned (JSON); ``e:r/<id>`` marks an id rewarded.
MEMBERS = b"i"
REWARDED_PREFIX = b"r/"
#: The fleet's own rows (``mab-service setup``, ``fleet.learner``): its configuration and the learners' shard
#: leases. No garbage-collection by age (the configuration stays); one version per cell.
FLEET_FAMILY = "s"
#: The configuration row: cell ``s:shards`` holds the number of arm shards (ASCII digits), written once by ``setup``.
CONFIG_ROW = b"\x00c/fleet"
SHARDS = b"shards"
#: A shard's lease row is this prefix and the shard's number; cell ``s:lease`` holds the holder, its timestamp the
#: last renewal.
LEASE_ROW_PREFIX = b"\x00s/"
LEASE = b"lease"
#: A live learner's row is this prefix and its id; cell ``s:alive``'s timestamp is its last heartbeat.
LEARNER_ROW_PREFIX = b"\x00l/"
ALIVE = b"alive"
#: Rewards are stored as integers in millionths: Bigtable's atomic additions take only int64.
REWARD_SCALE = 1_000_000
#: The key ``start`` reads to check the table (no arm has it).
PROBE_KEY = "\x00mab-service-probe"


def event_row(event_id: str) -> bytes:
    """The key of an event's membership row."""
    return EVENT_ROW_PREFIX + event_id.encode()


def rewarded(arm_id: str) -> bytes:
    """The qualifier (family ``e``) that marks ``arm_id`` rewarded in an event's membership row."""
    return REWARDED_PREFIX + arm_id.encode()


def lease_row(shard: int) -> bytes:
    """The key of a shard's lease row."""
    return LEASE_ROW_PREFIX + str(shard).encode()


def learner_row(learner_id: str) -> bytes:
    """The key of a live learner's row."""
    return LEARNER_ROW_PREFIX + learner_id.encode()


class TablePath(NamedTuple):
    project: str
    instance: str
    table: str

    @classmethod
    def parse(cls, path: str) -> TablePath:
        """``projects/P/instances/I/tables/T`` (a leading ``bigtable:`` is allowed).

        Raises:
            FeatureSourceError: If ``path`` is not such a name.
        """
        match = TABLE.match(path.removeprefix("bigtable:"))
        if match is None:
            raise FeatureSourceError(f"a Bigtable table must be projects/P/instances/I/tables/T (got {path!r})")
        return cls(*match.groups())

    def __str__(self) -> str:
        return f"projects/{self.project}/instances/{self.instance}/tables/{self.table}"

    @property
    def routing(self) -> tuple[tuple[str, str], ...]:
        """The routing header Bigtable expects on a call for this table, as the client sends it (for the calls
        made on the client's channel with request bytes of our own)."""
        return (("x-goog-request-params", f"table_name={urllib.parse.quote(str(self))}"),)


def decode_int64(value: bytes) -> int:
    """A Bigtable int64 cell: eight bytes, big-endian, two's complement (what additions write)."""
    if len(value) != 8:
        raise FeatureSourceError(f"a count cell holds {len(value)} bytes, not the 8 of a Bigtable int64")
    return int.from_bytes(value, "big", signed=True)
