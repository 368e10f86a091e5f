"""The fleet's Bigtable table: its path, column families, qualifiers and row keys, one definition each.

A table ``projects/P/instances/I/tables/T`` holds one row per arm, keyed by its id (UTF-8): family ``n`` (one
version per cell) holds ``n:i``, the arm's impressions, and ``n:r``, its rewards in millionths, as absolute counts
written by the lease holder of the arm's shard with the shard's window version as the cells' timestamp (with a
half-life, one cell ``n:d`` of forward-decayed sums instead: ``decayed_cell``, below). Family ``c``
(an aggregate int64 sum family) holds the same cells as sums in tables written by learners of earlier versions; a row
without ``n`` cells is read from ``c``. Family ``d`` held those learners' deduplication markers (kept for old
tables, no longer written), family ``e`` holds the events' membership rows, family ``s`` the fleet's own rows
(configuration, shard leases and windows, live learners). An arm's counts within a segment (``POST /predict`` with a
``segment``) are a row of their own, ``\x00g/<segment>\x00<id>``, with the same ``n`` cells, written by the holder
of the arm's shard. The fleet's own rows and the segment rows begin with a NUL byte, which no id can (ids and
segments have no control characters: ``mab_service.ids``), so they never meet an arm's row, and arms sort from
``ARMS_START``.

This module imports nothing of the project but ``errors``, ``ids`` (the id rule) and ``specs`` (the table's name):
the ``bigtable:`` source and the fleet's deployables (replica, learner, setup) all stand on it.
"""

from __future__ import annotations

import math
import struct
import urllib.parse
from collections.abc import Iterable
from typing import NamedTuple

from mab_service.errors import FeatureSourceError
from mab_service.ids import id_problem, pair_key, segment_problem
from mab_service.specs import TABLE

#: Absolute counts, one version per cell, the newest timestamp the current one (``fleet.learner``).
ABSOLUTE_FAMILY = "n"
#: The counts as sums (aggregate int64 family): what learners before absolute counts wrote; read when ``n`` is not.
COUNTS_FAMILY = "c"
IMPRESSIONS = b"i"
REWARDS = b"r"
#: The deduplication markers of learners before absolute counts (no longer written; ``setup`` keeps the family).
MARKERS_FAMILY = "d"
#: Events' membership rows (``fleet.replica``): which ids an answer returned, and which are rewarded.
EVENTS_FAMILY = "e"
#: Membership rows' keys: this prefix and the event id. Counts and membership are in different families, so even an
#: arm id that began with it would read only its counts.
EVENT_ROW_PREFIX = b"\x00e/"
#: A membership row's cell ``e:i`` holds the ids the answer returned (JSON); ``e:s``, the segment the answer was ranked
#: within (UTF-8; no cell without one); ``e:r/<id>`` marks an id rewarded.
MEMBERS = b"i"
SEGMENT = b"s"
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
#: A shard's row (the lease row) also holds the shard's learner state, written by one CheckAndMutateRow per window
#: on condition that the lease still names the writer: ``s:version``, the last committed window's version (ASCII
#: digits; the arms' ``n`` cells carry it as timestamp, ``version_micros``); ``s:w/<k>``, chunk ``k`` of that
#: window's absolute counts (``fleet.learner`` encodes them); ``s:p/<stream>``, the sequence numbers applied of a
#: publisher's stream (``<publisher id>.<shard>``), the cell's timestamp its last update.
VERSION = b"version"
PENDING_PREFIX = b"w/"
APPLIED_PREFIX = b"p/"
#: A live learner's row is this prefix and its id; cell ``s:alive``'s timestamp is its last heartbeat.
LEARNER_ROW_PREFIX = b"\x00l/"
ALIVE = b"alive"
#: With a half-life (``serve``/``learn --half-life-s``), an arm's counts are one cell ``n:d`` instead of ``n:i`` and
#: ``n:r``: forward-decayed sums (``decayed_cell``), written by the learners as ``n:i``/``n:r`` are.
DECAYED = b"d"
#: The configuration row's cell ``s:half_life_s``: the fleet's half-life in seconds (``repr`` of a float), written by
#: the first learner or replica that starts with a half-life; every other one must agree (``features.bigtable``).
HALF_LIFE = b"half_life_s"
#: Half-lives per epoch of the fleet's landmarks: the node table's (``learning._arms.EPOCH_HALF_LIVES``), so that a
#: sum relative to one epoch's landmark is exactly ``2 ** -256`` times its value relative to the one before.
EPOCH_HALF_LIVES = 256
#: A decayed cell: the epoch (int64) and the forward-decayed impressions and rewards (float64), big-endian.
_DECAYED_CELL = struct.Struct(">qdd")
#: The largest epoch a decayed cell may name: its landmark stays a finite float for any half-life the service takes.
MAX_EPOCH = 1 << 40
#: Rewards are stored as integers in millionths: Bigtable's atomic additions take only int64.
REWARD_SCALE = 1_000_000
#: Arm rows sort from here: ids have no control characters, the fleet's own rows and the segment rows sort before.
ARMS_START = b" "
#: An arm's row within a segment is this prefix, the segment, a NUL byte and the arm's id; a segment's rows are the
#: range from ``segment_rows_prefix(segment)``.
SEGMENT_ROW_PREFIX = "\x00g/"
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


def segment_row(segment: str, arm_id: str) -> str:
    """The key of ``arm_id``'s row within ``segment`` (as a string: the learners key their counts by it)."""
    return SEGMENT_ROW_PREFIX + segment + "\x00" + arm_id


def segment_rows_prefix(segment: str) -> bytes:
    """The prefix of every row of ``segment``."""
    return (SEGMENT_ROW_PREFIX + segment + "\x00").encode()


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that begins with ``prefix`` (whose last byte is below 0xFF, as every prefix
    here): the end, exclusive, of the prefix's row range."""
    return prefix[:-1] + bytes((prefix[-1] + 1,))


def split_segment_row(key: str) -> tuple[str, str] | None:
    """``(segment, arm_id)`` of a segment row's key whose segment and id keep their rules, else None."""
    if not key.startswith(SEGMENT_ROW_PREFIX):
        return None
    segment, separator, arm_id = key[len(SEGMENT_ROW_PREFIX) :].partition("\x00")
    if not separator or segment_problem(segment) is not None or id_problem(arm_id) is not None:
        return None
    return segment, arm_id


def node_key(key: str) -> str:
    """The node's arm table key of a row key: an arm's id as it is, a segment row's ``ids.pair_key``."""
    pair = split_segment_row(key)
    return key if pair is None else pair_key(*pair)


def counted_key(key: str) -> bool:
    """Whether ``key`` is a row the learners count: an arm's id or a segment row."""
    return id_problem(key) is None or split_segment_row(key) is not None


def arm_of(key: str) -> str:
    """The arm a counted row belongs to (its shard's): the id of an arm row, the arm of a segment row."""
    pair = split_segment_row(key)
    return key if pair is None else pair[1]


def version_micros(version: int) -> int:
    """The cell timestamp of a window's counts: its version in milliseconds, Bigtable's granularity."""
    return version * 1000


def arm_counts(cells: Iterable[tuple[str, bytes, bytes]]) -> tuple[int, int] | None:
    """An arm's (impressions, rewards in millionths) from its row's newest cells ``(family, qualifier, value)``:
    family ``n``'s if the row has any, else the sums of family ``c`` (a table written by earlier learners). None if a
    cell read is not a count: not a Bigtable int64 (8 bytes) or negative. Rewards may exceed impressions (a reward
    can be applied before its answer's impressions): the posterior takes them in [0, impressions].
    """
    absolute: dict[bytes, int] = {}
    sums: dict[bytes, int] = {}
    for family, qualifier, value in cells:
        if family == ABSOLUTE_FAMILY:
            into = absolute
        elif family == COUNTS_FAMILY:
            into = sums
        else:
            continue
        if qualifier != IMPRESSIONS and qualifier != REWARDS:
            continue
        if len(value) != 8:
            return None
        n = int.from_bytes(value, "big", signed=True)
        if n < 0:
            return None
        into[qualifier] = n
    counts = absolute or sums
    return counts.get(IMPRESSIONS, 0), counts.get(REWARDS, 0)


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


# -- forward decay ------------------------------------------------------------------------------------------------
#
# With a half-life H every learner and replica weighs an impression or reward made at t (the time its publisher
# recorded) by 2 ** ((t - L) / H), L the landmark of the epoch t falls in: epoch e spans [e * S, (e + 1) * S) with S =
# EPOCH_HALF_LIVES * H, so L = e * S is a function of t and H alone, the same on every process without a word between
# them. A weight is in [1, 2 ** 256). A sum of epoch e is moved to epoch e' > e by 2 ** (-256 * (e' - e)), exact (a
# power of two); a reader at ``now`` multiplies by 2 ** ((L - now) / H).


def epoch_of(t: float, half_life_s: float) -> int:
    """The epoch that time ``t`` falls in."""
    return math.floor(t / (EPOCH_HALF_LIVES * half_life_s))


def landmark(epoch: int, half_life_s: float) -> float:
    """The landmark (unix time) of ``epoch``."""
    return epoch * EPOCH_HALF_LIVES * half_life_s


def weight(t: float, epoch: int, half_life_s: float) -> float:
    """What a count made at ``t`` adds to a sum of ``epoch``: 2 ** ((t - landmark) / H)."""
    return float(2.0 ** ((t - landmark(epoch, half_life_s)) / half_life_s))


def moved(value: float, epoch: int, to: int) -> float:
    """A sum of ``epoch`` as a sum of the later epoch ``to`` (exact but for subnormals)."""
    return math.ldexp(value, -EPOCH_HALF_LIVES * (to - epoch))


def read_scale(epoch: int, half_life_s: float, now: float) -> float:
    """What a sum of ``epoch`` is multiplied by to read it at ``now``: 2 ** ((landmark - now) / H)."""
    return float(2.0 ** ((landmark(epoch, half_life_s) - now) / half_life_s))


def decayed_cell(epoch: int, impressions: float, rewards: float) -> bytes:
    """The value of ``n:d``: the sums' epoch and the sums."""
    return _DECAYED_CELL.pack(epoch, impressions, rewards)


def read_decayed(value: bytes) -> tuple[int, float, float] | None:
    """``(epoch, impressions, rewards)`` of an ``n:d`` cell; None unless it is 24 bytes of an epoch in [0,
    ``MAX_EPOCH``] and two finite sums >= 0."""
    if len(value) != _DECAYED_CELL.size:
        return None
    epoch, shown, got = _DECAYED_CELL.unpack(value)
    if not (0 <= epoch <= MAX_EPOCH and 0.0 <= shown < math.inf and 0.0 <= got < math.inf):
        return None
    return epoch, shown, got


def decayed_counts(cells: Iterable[tuple[str, bytes, bytes]]) -> tuple[int, float, float] | None:
    """An arm's ``(epoch, impressions, rewards)`` from its row's newest cells: the ``n:d`` cell; ``(0, 0.0, 0.0)``
    if the row has none (its integer counts were written without a half-life: not read with one); None if the cell
    is not what ``decayed_cell`` writes."""
    for family, qualifier, value in cells:
        if family == ABSOLUTE_FAMILY and qualifier == DECAYED:
            return read_decayed(value)
    return 0, 0.0, 0.0


def half_life_text(half_life_s: float) -> bytes:
    """The configuration cell's value for a half-life."""
    return repr(float(half_life_s)).encode()
