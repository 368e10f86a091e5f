"""The Bigtable posterior source: the fleet's shared counts, read in batches.

A table ``projects/P/instances/I/tables/T`` holds one row per arm, keyed by its id (UTF-8). Column family
``n`` holds two cells per row: ``n:i``, the arm's impressions, and ``n:r``, its rewards in millionths
(``REWARD_SCALE``; rewards are numbers in [0, 1], stored as integers), absolute counts that the learner holding the
arm's shard writes (``mab_service.fleet.learner``); the newest cell is the current count. A row without them is read
from family ``c``, an aggregate (int64 sum) family with the same two cells, which learners of earlier versions added
to: an upgraded table keeps its counts. The posterior of an arm is Beta(prior_alpha + rewards, prior_beta +
impressions - rewards); an id with no row gets the prior and is not counted in ``known``.

Rewards and impressions reach the table through different learners, so a reward can be counted before the
impressions of its answer (or after they were lost): the posterior clamps rewards to [0, impressions], and beta is
never below the prior. A counts cell that is not a Bigtable int64 (8 bytes), or is negative, fails only its own arm,
not the read:
its counts read as 0 (``Counts.invalid`` marks it) and ``read`` gives it NaN, which the pipeline ranks by the prior
and counts (``source.ParameterCheck``); such cells are also counted in ``stats()["invalid_values"]``.

Reads go through the ``google-cloud-bigtable`` async data client: one ReadRows call per chunk of at most
``chunk_size`` keys, chunks read concurrently, with a filter that sends only families ``n`` and ``c``, the newest
cell of each column. The client honours
``BIGTABLE_EMULATOR_HOST``; elsewhere it uses Application Default Credentials.

With ``raw_reads``, the same calls go out on the client's own channel (its credentials, its emulator) but the
answers are decoded here from the raw protobuf, skipping the client's row objects: ~30% less CPU per row
(docs/fleet.md). A stream that fails with UNAVAILABLE, DEADLINE_EXCEEDED or ABORTED is asked again for the keys it
has not answered, until the fetch's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from mab_service.errors import FeatureSourceError
from mab_service.features.source import Features, Health, Lookup
from mab_service.fleet.schema import (
    ABSOLUTE_FAMILY,
    ARMS_START,
    CONFIG_ROW,
    COUNTS_FAMILY,
    DECAYED,
    EPOCH_HALF_LIVES,
    FLEET_FAMILY,
    HALF_LIFE,
    IMPRESSIONS,
    PROBE_KEY,
    REWARD_SCALE,
    REWARDS,
    TablePath,
    decode_int64,
    half_life_text,
    prefix_end,
    read_decayed,
)

logger = logging.getLogger("mab_service.bigtable")

#: Keys per ReadRows call. Bigtable takes many more; chunks let a large fetch use several streams at once.
DEFAULT_CHUNK_SIZE = 200
READ_ROWS = "/google.bigtable.v2.Bigtable/ReadRows"
_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})
#: The families read: absolute counts, and the sums of tables written by earlier learners.
COUNTS_FAMILIES = f"^[{ABSOLUTE_FAMILY}{COUNTS_FAMILY}]$"


class Counts(NamedTuple):
    impressions: npt.NDArray[Any]
    """int64 counts; with a half-life, float64 weighted counts as of the read."""
    rewards: npt.NDArray[np.float64]
    found: npt.NDArray[np.bool_]
    invalid: npt.NDArray[np.intp] | None = None
    """Positions whose row holds a counts cell that could not be decoded (their counts read as 0); None if none."""

    def posterior(
        self, prior_alpha: float, prior_beta: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Beta(prior_alpha + rewards, prior_beta + impressions - rewards): alpha and beta.

        Rewards are taken in [0, impressions] (impressions at least 0), so alpha >= prior_alpha and
        beta >= prior_beta: a reward counted before its impressions waits for them instead of making beta invalid.
        """
        impressions = np.maximum(self.impressions, 0).astype(np.float64)
        rewards = np.minimum(np.maximum(self.rewards, 0.0), impressions)
        return prior_alpha + rewards, prior_beta + (impressions - rewards)


def data_client(project: str) -> Any:
    """An async data client; its notice that it connects to an emulator (a RuntimeWarning) is expected there."""
    try:
        from google.cloud.bigtable.data import BigtableDataClientAsync
    except ImportError as exc:
        raise FeatureSourceError(f"the bigtable source needs mab-service[fleet] installed ({exc})") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Connecting to Bigtable emulator", category=RuntimeWarning)
        return BigtableDataClientAsync(project=project)


async def read_shards(table: Any, timeout_s: float = 30.0) -> int:
    """The number of arm shards ``setup`` stored in the table (``CONFIG_ROW``); 0 if none (a table made before shards:
    one subscription, every learner on it).

    Raises:
        FeatureSourceError: If the stored value is not a positive number.
    """
    from google.cloud.bigtable.data import row_filters

    row = await table.read_row(
        CONFIG_ROW,
        row_filter=row_filters.RowFilterChain(
            [row_filters.FamilyNameRegexFilter(FLEET_FAMILY), row_filters.ColumnQualifierRegexFilter(b"^shards$")]
        ),
        operation_timeout=timeout_s,
    )
    if row is None or not row.cells:
        return 0
    value = row.cells[0].value
    if not value.isdigit() or int(value) < 1:
        raise FeatureSourceError(f"the table's shard count (row {CONFIG_ROW!r}, s:shards) is {value!r}, not a number")
    return int(value)


async def agree_half_life(table: Any, half_life_s: float, timeout_s: float = 30.0) -> None:
    """Check that the fleet's half-life is ``half_life_s``: the configuration row's cell ``s:half_life_s``, written
    here (once, by a CheckAndMutateRow) if it is absent and ``half_life_s`` is not 0. A table whose cell is absent has
    no half-life.

    Raises:
        FeatureSourceError: If the table holds another half-life, naming both.
    """
    from google.cloud.bigtable.data import SetCell, row_filters

    only = row_filters.RowFilterChain(
        [row_filters.FamilyNameRegexFilter(FLEET_FAMILY), row_filters.ColumnQualifierRegexFilter(b"^half_life_s$")]
    )
    mine = half_life_text(half_life_s)
    if half_life_s:
        # Written only where no half-life is yet (another process may be writing its own now: the read decides).
        await table.check_and_mutate_row(
            CONFIG_ROW,
            only,
            false_case_mutations=[SetCell(FLEET_FAMILY, HALF_LIFE, mine)],
            operation_timeout=timeout_s,
        )
    row = await table.read_row(CONFIG_ROW, row_filter=only, operation_timeout=timeout_s)
    stored = row.cells[0].value if row is not None and row.cells else half_life_text(0.0)
    if stored != mine:
        theirs = stored.decode(errors="replace")
        raise FeatureSourceError(
            f"the fleet's half-life is {theirs} s (Bigtable {CONFIG_ROW!r}, s:half_life_s), this process's "
            f"{float(half_life_s)!r} s: start every replica and learner with --half-life-s {theirs}"
        )


class _Cells:
    """Counts being decoded: impressions and rewards (millionths) by position, and the positions with a bad cell.

    A row's family ``n`` cells (absolute counts) win over its ``c`` cells (sums of earlier learners), whatever order
    they come in."""

    __slots__ = ("impressions", "rewards", "absolute", "bad", "half_life_s", "epochs", "sums")

    def __init__(self, n: int, half_life_s: float = 0.0) -> None:
        self.impressions = np.zeros(n, np.int64)
        self.rewards = np.zeros(n, np.int64)
        self.absolute = np.zeros(n, np.bool_)
        self.bad: list[int] = []
        self.half_life_s = half_life_s
        """With a half-life only the ``n:d`` cells are read: ``epochs`` and ``sums`` (impressions, rewards)."""
        self.epochs = np.zeros(n if half_life_s else 0, np.int64)
        self.sums = np.zeros((n if half_life_s else 0, 2), np.float64)

    def put(self, i: int, family: str, qualifier: bytes, value: bytes) -> None:
        """One cell's value at position ``i``; a value that is not 8 bytes or is negative marks the position bad,
        not the read."""
        if self.half_life_s:
            if family == ABSOLUTE_FAMILY and qualifier == DECAYED:
                counted = read_decayed(value)
                if counted is None:
                    self.bad.append(i)
                else:
                    self.epochs[i], self.sums[i, 0], self.sums[i, 1] = counted
            return
        if qualifier != IMPRESSIONS and qualifier != REWARDS:
            return
        if family == ABSOLUTE_FAMILY:
            if not self.absolute[i]:  # the sums read before it are not the arm's counts
                self.absolute[i] = True
                self.impressions[i] = self.rewards[i] = 0
        elif family != COUNTS_FAMILY or self.absolute[i]:
            return
        if len(value) != 8 or value[0] & 0x80:
            self.bad.append(i)
            return
        (self.impressions if qualifier == IMPRESSIONS else self.rewards)[i] = decode_int64(value)

    def counts(self, found: npt.NDArray[np.bool_]) -> Counts:
        if self.half_life_s:
            return self._decayed(found)
        if not self.bad:
            return Counts(self.impressions, self.rewards / REWARD_SCALE, found)
        invalid = np.unique(np.array(self.bad, np.intp))
        self.impressions[invalid] = self.rewards[invalid] = 0  # the other cell of the row may be fine; not alone
        return Counts(self.impressions, self.rewards / REWARD_SCALE, found, invalid)

    def _decayed(self, found: npt.NDArray[np.bool_]) -> Counts:
        """The sums read now: times 2 ** ((landmark - now) / H), split as a power of two (``ldexp``, exact) and a
        factor in [1, 2), so that no intermediate overflows however far the landmark is from now."""
        h = self.half_life_s
        exponent = (self.epochs * (EPOCH_HALF_LIVES * h) - time.time()) / h
        whole = np.floor(exponent)
        scale = np.exp2(exponent - whole)
        whole_int = np.clip(whole, -1100, 1100).astype(np.int64)
        impressions = np.ldexp(self.sums[:, 0] * scale, whole_int)
        rewards = np.ldexp(self.sums[:, 1] * scale, whole_int)
        if not self.bad:
            return Counts(impressions, rewards, found)
        invalid = np.unique(np.array(self.bad, np.intp))
        impressions[invalid] = rewards[invalid] = 0.0
        return Counts(impressions, rewards, found, invalid)


def _store(row: Any, i: int, cells: _Cells) -> None:
    """A counts row of the client's into position ``i``."""
    for cell in row.cells:
        cells.put(i, cell.family, cell.qualifier, cell.value)


class BigtableSource:
    """Posteriors from the counts the learners keep in a Bigtable table.

    Args:
        table: ``projects/P/instances/I/tables/T``.
        prior_alpha, prior_beta: The prior of every arm (and the answer for an id with no row).
        chunk_size: Keys per ReadRows call.
        timeout_s: Deadline of one fetch.
        raw_reads: Decode ReadRows answers from the raw protobuf instead of through the client's rows.
        half_life_s: The fleet's half-life (0: none): counts are read from the ``n:d`` cells' forward-decayed sums,
            as of the read (``fleet.schema``), and the table's half-life must be this one (checked at ``start``).

    Raises:
        FeatureSourceError: If ``table`` is not such a name or ``chunk_size`` is not positive.
    """

    name = "bigtable"

    def __init__(
        self,
        table: str,
        prior_alpha: float,
        prior_beta: float,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout_s: float = 2.0,
        raw_reads: bool = False,
        half_life_s: float = 0.0,
    ) -> None:
        if chunk_size < 1:
            raise FeatureSourceError(f"chunk_size must be at least 1 (got {chunk_size})")
        self.path = TablePath.parse(table)
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        self.raw_reads = raw_reads
        self.half_life_s = half_life_s
        self._request: bytes = b""
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._client: Any = None
        self._table: Any = None
        self._query: Any = None
        self._filter: Any = None
        self._ready = Health(False, "bigtable source not started")
        self.failed_reads = 0
        self.invalid_values = 0

    async def start(self) -> None:
        """Connect and read one key, so that a missing table or no credentials stop the service at start.

        Raises:
            FeatureSourceError: If the client library is missing or the table cannot be read.
        """
        self._client = data_client(self.path.project)
        from google.cloud.bigtable.data import ReadRowsQuery, row_filters

        self._query = ReadRowsQuery
        # Only the counts, and only their newest cell (the current absolute count; an aggregate family holds one per
        # timestamp bucket).
        self._filter = row_filters.RowFilterChain(
            [row_filters.FamilyNameRegexFilter(COUNTS_FAMILIES), row_filters.CellsColumnLimitFilter(1)]
        )
        self._table = self._client.get_table(self.path.instance, self.path.table)
        if self.raw_reads:
            from google.cloud.bigtable_v2.types import bigtable as messages

            self._response_pb = messages.ReadRowsResponse.pb()
            request = messages.ReadRowsRequest.pb()(
                table_name=str(self.path),
                filter={
                    "chain": {
                        "filters": [
                            {"family_name_regex_filter": COUNTS_FAMILIES},
                            {"cells_per_column_limit_filter": 1},
                        ]
                    }
                },
            )
            self._request = request.SerializeToString()
            self._request_pb = messages.ReadRowsRequest.pb()
            self._metadata = self.path.routing
        try:
            await self.read_counts([PROBE_KEY])
        except Exception as exc:
            raise FeatureSourceError(f"cannot read Bigtable table {self.path}: {exc}") from None
        try:
            await agree_half_life(self._table, self.half_life_s, 10 * self.timeout_s)
        except FeatureSourceError:
            raise
        except Exception as exc:
            raise FeatureSourceError(f"cannot read the fleet's half-life in Bigtable {self.path}: {exc}") from None
        self._ready = Health(True)

    async def read_counts(self, ids: list[str]) -> Counts:
        """The impressions and rewards of ``ids`` (distinct), aligned with them; ``found`` where a row exists."""
        assert self._table is not None, "read before start"
        n = len(ids)
        cells = _Cells(n, self.half_life_s)
        found = np.zeros(n, np.bool_)
        if n and self.raw_reads:
            position = {id_.encode(): i for i, id_ in enumerate(ids)}
            keys = list(position)
            step = self.chunk_size
            deadline = time.monotonic() + self.timeout_s
            await asyncio.gather(
                *(self._read_raw(keys[s : s + step], position, cells, found, deadline) for s in range(0, n, step))
            )
        elif n:
            position = {id_.encode(): i for i, id_ in enumerate(ids)}
            keys = list(position)
            step = self.chunk_size
            chunks = [keys[s : s + step] for s in range(0, n, step)]
            answers = await asyncio.gather(
                *(
                    self._table.read_rows(
                        self._query(row_keys=chunk, row_filter=self._filter),
                        operation_timeout=self.timeout_s,
                    )
                    for chunk in chunks
                )
            )
            for rows in answers:
                for row in rows:
                    i = position[row.row_key]
                    found[i] = True
                    _store(row, i, cells)
        counts = cells.counts(found)
        self.invalid_values += 0 if counts.invalid is None else len(counts.invalid)
        return counts

    async def scan(self, limit: int, prefix: bytes | None = None) -> tuple[list[str], Counts]:
        """The ids and counts of the table's first ``limit`` arms in key order (the dashboard's view in fleet mode:
        a fleet's whole catalogue is Bigtable's to query); with ``prefix``, of the rows that begin with it instead
        (a segment's rows), their keys after it."""
        assert self._table is not None, "read before start"
        from google.cloud.bigtable.data import RowRange

        if prefix is None:
            rows_range = RowRange(start_key=ARMS_START)  # arm rows only: the fleet's and segments' rows sort before
        else:
            rows_range = RowRange(start_key=prefix, end_key=prefix_end(prefix))
        rows = await self._table.read_rows(
            self._query(row_ranges=[rows_range], limit=limit, row_filter=self._filter),
            operation_timeout=10 * self.timeout_s,
        )
        cells = _Cells(len(rows), self.half_life_s)
        for i, row in enumerate(rows):
            _store(row, i, cells)
        skip = len(prefix or b"")
        ids = [row.row_key[skip:].decode(errors="replace") for row in rows]
        return ids, cells.counts(np.ones(len(rows), np.bool_))

    @property
    def client(self) -> Any:
        """The data client, for work beside the counts on the same connection (``fleet.replica``)."""
        return self._client

    @property
    def table(self) -> Any:
        """The client's table object."""
        return self._table

    def _read_rows(self) -> Any:
        """The raw ReadRows stub, taken from the client's channel each time: the client replaces its channel every
        35-45 minutes and closes the old one."""
        return self._client.transport.grpc_channel.unary_stream(
            READ_ROWS, request_serializer=None, response_deserializer=self._response_pb.FromString
        )

    async def _read_raw(
        self,
        keys: list[bytes],
        position: dict[bytes, int],
        cells: _Cells,
        found: npt.NDArray[np.bool_],
        deadline: float,
    ) -> None:
        """One chunk's ReadRows, decoded from the raw protobuf; asked again for unanswered keys on a retryable error.

        Chunks of a row carry its key on the first, the qualifier when it changes, and a cell's value in pieces
        when ``value_size`` says more follow; ``commit_row`` ends a row and ``reset_row`` drops what came of it.
        """
        waiting = set(keys)
        while True:
            request = self._request_pb.FromString(self._request)
            request.rows.row_keys.extend(waiting)
            key = qualifier = value = b""
            family = ""
            try:
                call = self._read_rows()(
                    request.SerializeToString(),
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=self._metadata,
                )
                async for response in call:
                    for chunk in response.chunks:
                        if chunk.reset_row:
                            value = b""
                            continue
                        if chunk.row_key:
                            key = chunk.row_key
                        if chunk.HasField("family_name"):
                            family = chunk.family_name.value
                        if chunk.HasField("qualifier"):
                            qualifier = chunk.qualifier.value
                        value += chunk.value
                        if chunk.value_size:
                            continue  # a split cell: the rest comes in the next chunks
                        i = position[key]
                        cells.put(i, family, qualifier, value)
                        value = b""
                        if chunk.commit_row:
                            found[i] = True
                            waiting.discard(key)
                return
            except Exception as exc:
                code = getattr(exc, "code", None)
                name = getattr(code(), "name", "") if callable(code) else ""
                if name not in _RETRYABLE or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.01)  # keys already answered keep their values; ask again for the rest

    async def read(self, ids: list[str]) -> Lookup:
        """Beta(prior_alpha + rewards, prior_beta + impressions - rewards) of ``ids``, and which have a row.

        If Bigtable cannot be read within ``timeout_s``, every id gets the prior and is reported ``unread``: the
        answer is marked degraded and the cache does not keep it (the policy of ``on_store_failure = degrade``).
        """
        try:
            counts = await self.read_counts(ids)
        except Exception as exc:
            self.failed_reads += 1
            if self.failed_reads == 1 or self.failed_reads % 100 == 0:
                logger.warning(
                    "reading %d ids from Bigtable %s failed (%d so far): %s",
                    len(ids),
                    self.path,
                    self.failed_reads,
                    exc,
                )
            n = len(ids)
            return Lookup(
                np.full(n, self.prior_alpha), np.full(n, self.prior_beta), np.zeros(n, np.bool_), np.arange(n)
            )
        alpha, beta = counts.posterior(self.prior_alpha, self.prior_beta)
        if counts.invalid is not None:
            alpha[counts.invalid] = beta[counts.invalid] = np.nan  # for the pipeline's check: prior, counted, logged
        return Lookup(alpha, beta, counts.found)

    async def fetch(self, ids: list[str]) -> Features:
        """``read``, as the pipeline takes it."""
        lookup = await self.read(ids)
        unread = 0 if lookup.unread is None else len(lookup.unread)
        return Features(lookup.alpha, lookup.beta, int(np.count_nonzero(lookup.found)), unread)

    def stats(self) -> dict[str, float]:
        return {"failed_reads": self.failed_reads, "invalid_values": self.invalid_values}

    @property
    def prior(self) -> tuple[float, float]:
        return self.prior_alpha, self.prior_beta

    def health(self) -> Health:
        return self._ready

    async def close(self) -> None:
        self._ready = Health(False, "bigtable source closed")
        if self._client is not None:
            await self._client.close()
            self._client = self._table = None
