"""A shard's learner state: what its lease holder keeps in memory and commits on the shard's row each window.

``Applied`` is a publisher stream's set of applied sequence numbers (a low-water mark and the ranges above it),
``encode_window``/``decode_window`` the committed window's absolute counts as the row's chunks, ``ShardState`` what a
holder keeps of a shard (the row's version and applied sets, a cache of the arms' counts), and ``Plan`` one window's
part of a shard: its new messages' counts and the applied sets they change. ``fleet.learner`` reads, commits and
applies them; docs/fleet.md ("Exactly once") argues the design.
"""

from __future__ import annotations

import bisect
import math

import orjson

from mab_service.fleet.schema import MAX_EPOCH, counted_key, moved

#: A shard's committed window is stored in cells of this many bytes at most (``s:w/<k>``).
WINDOW_CHUNK_BYTES = 1024 * 1024

#: A message's valid content: impressions per row (an arm, or an arm within a segment: ``schema.segment_row``), and
#: rewards ``(row, event_id, millionths)``.
Message = tuple[dict[str, int], list[tuple[str, str, int]]]
#: With a half-life, a count: its epoch and the forward-decayed impressions and rewards (``schema.weight``).
Decayed = tuple[int, float, float]


def merged(count: Decayed | None, epoch: int, impressions: float, rewards: float) -> Decayed:
    """``count`` plus sums of ``epoch``, in the later of the two epochs (the other moved by a power of two)."""
    if count is None:
        return epoch, impressions, rewards
    own, shown, got = count
    if epoch > own:
        shown, got, own = moved(shown, own, epoch), moved(got, own, epoch), epoch
    elif epoch < own:
        impressions, rewards = moved(impressions, epoch, own), moved(rewards, epoch, own)
    return own, shown + impressions, got + rewards


class Applied:
    """The sequence numbers applied of one publisher's stream: every number up to ``low``, and the ranges above it.

    A stream's numbers start at 1 and grow by one per message (``sink.PubSubSink``), so the ranges are the messages
    still in flight or in a publisher's outbox when later ones were applied: few, and they merge into ``low`` as the
    gaps fill. Exact, whatever order Pub/Sub delivers in.
    """

    __slots__ = ("low", "ranges")

    def __init__(self, low: int = 0, ranges: list[list[int]] | None = None) -> None:
        self.low = low
        self.ranges: list[list[int]] = ranges or []
        """Disjoint ``[first, last]`` above ``low + 1``, in order."""

    def __contains__(self, seq: int) -> bool:
        if seq <= self.low:
            return True
        return any(first <= seq <= last for first, last in self.ranges)

    def add(self, seq: int) -> None:
        if seq in self:
            return
        ranges = self.ranges
        i = bisect.bisect_left(ranges, [seq])
        if i < len(ranges) and ranges[i][0] == seq + 1:
            ranges[i][0] = seq
        else:
            ranges.insert(i, [seq, seq])
        if i > 0 and ranges[i - 1][1] + 1 == ranges[i][0]:
            ranges[i - 1][1] = ranges[i][1]
            del ranges[i]
            i -= 1
        if i == 0 and ranges[0][0] == self.low + 1:
            self.low = ranges.pop(0)[1]

    def copy(self) -> Applied:
        return Applied(self.low, [list(r) for r in self.ranges])

    def encode(self) -> bytes:
        """``[low, first, last, first, last, ...]`` as JSON."""
        return orjson.dumps([self.low, *(n for r in self.ranges for n in r)])

    @classmethod
    def decode(cls, value: bytes) -> Applied:
        """Raises ``ValueError`` unless ``value`` is what ``encode`` writes: non-negative integers, ranges in order
        above ``low + 1``."""
        try:
            numbers = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if (
            type(numbers) is not list
            or len(numbers) % 2 != 1
            or not all(type(n) is int and 0 <= n < 1 << 63 for n in numbers)
        ):
            raise ValueError(f"not [low, first, last, ...] of non-negative integers: {value[:100]!r}")
        low, flat = numbers[0], numbers[1:]
        ranges = [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]
        floor = low + 1
        for first, last in ranges:
            if not floor < first <= last:
                raise ValueError(f"ranges not in order above low + 1: {value[:100]!r}")
            floor = last + 1
        return cls(low, ranges)


def encode_window(version: int, ids: list[str], impressions: list[int], rewards: list[int]) -> list[bytes]:
    """A committed window's absolute counts as the shard row's chunks ``s:w/<k>``: one JSON document
    ``{"v": version, "ids": [...], "i": [...], "r": [...]}`` cut every ``WINDOW_CHUNK_BYTES``."""
    data = orjson.dumps({"v": version, "ids": ids, "i": impressions, "r": rewards})
    return [data[s : s + WINDOW_CHUNK_BYTES] for s in range(0, len(data), WINDOW_CHUNK_BYTES)]


def decode_window(data: bytes, version: int) -> tuple[list[str], list[int], list[int]]:
    """The ids and absolute counts ``encode_window`` wrote, checked: of ``version``, lists of equal length, ids that
    follow the id rule (or segment rows' keys of ids and segments that do), counts that are non-negative int64.

    Raises:
        ValueError: If ``data`` is not such a window.
    """
    try:
        doc = orjson.loads(data)
        got, ids, impressions, rewards = doc["v"], doc["ids"], doc["i"], doc["r"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a window: {exc}") from None
    if got != version:
        raise ValueError(f"a window of version {got!r} under version {version}")
    if not (
        type(ids) is list
        and type(impressions) is list
        and type(rewards) is list
        and len(ids) == len(impressions) == len(rewards)
        and all(type(i) is str and counted_key(i) for i in ids)
        and all(type(n) is int and 0 <= n < 1 << 63 for n in impressions)
        and all(type(n) is int and 0 <= n < 1 << 63 for n in rewards)
    ):
        raise ValueError("a window's ids and counts are not lists of equal length of valid ids and int64 counts")
    return ids, impressions, rewards


def encode_decayed_window(version: int, ids: list[str], counts: list[Decayed]) -> list[bytes]:
    """With a half-life, a committed window's sums as the shard row's chunks: ``{"v": version, "ids": [...], "e":
    [...], "i": [...], "r": [...]}`` (epochs and float sums; orjson writes a float so that it reads back the same)."""
    data = orjson.dumps(
        {
            "v": version,
            "ids": ids,
            "e": [c[0] for c in counts],
            "i": [c[1] for c in counts],
            "r": [c[2] for c in counts],
        }
    )
    return [data[s : s + WINDOW_CHUNK_BYTES] for s in range(0, len(data), WINDOW_CHUNK_BYTES)]


def decode_decayed_window(data: bytes, version: int) -> tuple[list[str], list[Decayed]]:
    """The ids and sums ``encode_decayed_window`` wrote, checked (epochs in [0, ``MAX_EPOCH``], sums finite and >= 0).

    A window written without a half-life (no epochs: a table switched to one) holds integer counts, which are not
    read with a half-life: nothing to write again, ``([], [])``.

    Raises:
        ValueError: If ``data`` is not such a window.
    """
    try:
        doc = orjson.loads(data)
        if type(doc) is dict and "e" not in doc and doc.get("v") == version and "i" in doc:
            return [], []
        got, ids, epochs, impressions, rewards = doc["v"], doc["ids"], doc["e"], doc["i"], doc["r"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a window of forward-decayed sums: {exc}") from None
    if got != version:
        raise ValueError(f"a window of version {got!r} under version {version}")
    lists = (ids, epochs, impressions, rewards)
    if not (
        all(type(x) is list for x in lists)
        and len(ids) == len(epochs) == len(impressions) == len(rewards)
        and all(type(i) is str and counted_key(i) for i in ids)
        and all(type(e) is int and 0 <= e <= MAX_EPOCH for e in epochs)
        and all(type(x) in (int, float) and 0 <= x < math.inf for x in impressions)
        and all(type(x) in (int, float) and 0 <= x < math.inf for x in rewards)
    ):
        raise ValueError("a window's ids, epochs and sums are not lists of equal length of valid ids and sums")
    return ids, [(e, float(i), float(r)) for e, i, r in zip(epochs, impressions, rewards)]


class ShardState:
    """What the holder of a shard's lease keeps of it: the shard row's version and applied sets, and a cache of the
    shard's arm counts (absolute: this learner is their only writer while it holds the lease)."""

    def __init__(self, shard: int, version: int, chunks: int) -> None:
        self.shard = shard
        self.version = version
        self.chunks = chunks
        """Chunks ``s:w/<k>`` the row holds now (a smaller next window deletes the rest)."""
        self.applied: dict[str, Applied] = {}
        self.touched: dict[str, float] = {}
        """Unix time each stream's applied set was last written."""
        self.counts: dict[str, tuple[int, int]] = {}
        self.decayed: dict[str, Decayed] = {}
        """With a half-life, the cache of the shard's sums instead of ``counts``."""
        self.unapplied: list[bytes] = []
        """Entries of the committed window not yet written to the arm rows (retried before the next commit)."""


def _take(applied: dict[str, Applied], shard: ShardState, stream: str, seq: int) -> bool:
    """Add message ``seq`` of ``stream`` to a window's applied sets (``applied``, copies of the shard's made on first
    change: the shard's own set changes only once the window is committed); False if it was applied already."""
    taken = applied.get(stream)
    if taken is None:
        held = shard.applied.get(stream)
        taken = Applied() if held is None else held
    if seq in taken:
        return False
    if stream not in applied:
        taken = applied[stream] = taken.copy()
    taken.add(seq)
    return True


class Plan:
    """One shard's part of a window: its new messages' counts per arm and the applied sets they change."""

    def __init__(self, shard: ShardState, items: list[tuple[str, int, Message]]) -> None:
        self.shown: dict[str, int] = {}
        self.got: dict[str, int] = {}
        self.applied: dict[str, Applied] = {}
        self.impressions = self.rewards = self.duplicates = 0
        self.ids: list[str] = []
        """After the commit: the arms it changed, and their absolute counts."""
        self.impressions_now: list[int] = []
        self.rewards_now: list[int] = []
        for stream, seq, (shown_now, rewards_now) in items:
            if not _take(self.applied, shard, stream, seq):  # published or delivered again
                self.duplicates += sum(shown_now.values()) + len(rewards_now)
                continue
            # ``impressions`` and ``rewards`` count the arms' (segment rows, whose keys begin with NUL, repeat them).
            shown = self.shown
            for id_, n in shown_now.items():
                shown[id_] = shown.get(id_, 0) + n
                if id_[0] != "\x00":
                    self.impressions += n
            got = self.got
            for id_, _, millionths in rewards_now:
                got[id_] = got.get(id_, 0) + millionths
                if id_[0] != "\x00":
                    self.rewards += 1


class DecayedPlan:
    """With a half-life, one shard's part of a window: its new messages' forward-decayed sums per row (``shown``;
    ``got`` stays empty) and the applied sets they change. Sums are added in message order, so the same messages
    give the same sums bit for bit."""

    def __init__(self, shard: ShardState, items: list[tuple[str, int, dict[str, Decayed], int, int]]) -> None:
        self.shown: dict[str, Decayed] = {}
        self.got: dict[str, Decayed] = {}
        self.applied: dict[str, Applied] = {}
        self.impressions = self.rewards = self.duplicates = 0
        self.ids: list[str] = []
        self.now: list[Decayed] = []
        """After the commit: the rows it changed, and their sums."""
        for stream, seq, sums, impressions, rewards in items:
            if not _take(self.applied, shard, stream, seq):
                self.duplicates += impressions + rewards
                continue
            shown = self.shown
            for row, (epoch, i, r) in sums.items():
                shown[row] = merged(shown.get(row), epoch, i, r)
            self.impressions += impressions
            self.rewards += rewards
