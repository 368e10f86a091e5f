"""Client CPU per row of the Bigtable posterior source, against Google's Bigtable emulator.

One emulator (``gcloud beta emulators bigtable start``, its own process group) holds ``--arms`` arms with counts.
Each request reads ``--keys`` distinct known keys (a W400 request's candidates). This process, pinned to the CPU it
is started on, measures its own CPU time (``time.process_time``) per row read, three ways:

    ours      mab_service.features.bigtable.BigtableSource.read_counts: the google-cloud-bigtable async data
              client, chunks of --chunk keys read concurrently, a filter for the counts family, cells decoded
    ours-raw  the same source with raw_reads: the client's channel, answers decoded from the raw protobuf
    raw       no client: grpc.aio unary-stream ReadRows on a plain channel, the raw protobuf deserializer, and the
              chunks decoded into counts by hand (row keys, qualifiers, values; no retries, no resumption)

``raw`` bounds what decoding without the client could gain. Variants alternate over ``--repeats``; medians are
printed, with the emulator's CPU per row beside them (it sends one ReadRowsResponse message per row).

    taskset -c 1 python -m benchmarks.bench_bigtable [--requests 200] [--keys 400] [--chunk 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from benchmarks.bench_service import free_port, session_cpu_seconds
from mab_service.features.bigtable import BigtableSource, data_client
from mab_service.fleet.schema import COUNTS_FAMILY, IMPRESSIONS, REWARD_SCALE, REWARDS, TablePath
from mab_service.fleet.setup import ensure_table

TABLE = TablePath("bench", "bench", "arms")
METHOD = "/google.bigtable.v2.Bigtable/ReadRows"
VARIANTS = ("ours", "ours-raw", "raw")

#: One request's keys -> rows read.
Reader = Callable[[list[str]], Awaitable[int]]


async def fill(arms: int) -> None:
    from google.cloud.bigtable.data import AddToCell, RowMutationEntry

    client = data_client(TABLE.project)
    table = client.get_table(TABLE.instance, TABLE.table)
    for start in range(0, arms, 5000):
        entries = [
            RowMutationEntry(
                f"arm-{i:08d}".encode(),
                [AddToCell(COUNTS_FAMILY, IMPRESSIONS, 100 + i, 0), AddToCell(COUNTS_FAMILY, REWARDS, i * 1000, 0)],
            )
            for i in range(start, min(start + 5000, arms))
        ]
        await table.bulk_mutate_rows(entries)
    await client.close()


async def make_reader(variant: str, host: str, chunk: int) -> tuple[Reader, Callable[[], Awaitable[None]]]:
    if variant in ("ours", "ours-raw"):
        source = BigtableSource(str(TABLE), 1.0, 1.0, chunk_size=chunk, timeout_s=30, raw_reads=variant == "ours-raw")
        await source.start()

        async def read_ours(keys: list[str]) -> int:
            return int(np.count_nonzero((await source.read_counts(keys)).found))

        return read_ours, source.close

    import grpc
    from google.cloud.bigtable_v2.types import bigtable as messages, data

    channel = grpc.aio.insecure_channel(host)
    response_pb = messages.ReadRowsResponse.pb()
    call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=response_pb.FromString)
    row_filter = data.RowFilter.pb()(
        chain={"filters": [{"family_name_regex_filter": COUNTS_FAMILY}, {"cells_per_column_limit_filter": 1}]}
    )

    async def read_chunk(keys: list[bytes], position: dict[bytes, int], out: np.ndarray) -> int:
        request = messages.ReadRowsRequest.pb()(
            table_name=f"projects/{TABLE.project}/instances/{TABLE.instance}/tables/{TABLE.table}", filter=row_filter
        )
        request.rows.row_keys.extend(keys)
        rows = 0
        key = qualifier = b""
        value = b""
        async for response in call(request.SerializeToString()):
            for c in response.chunks:
                if c.reset_row:
                    value = b""
                    continue
                if c.row_key:
                    key = c.row_key
                if c.HasField("qualifier"):
                    qualifier = c.qualifier.value
                value += c.value
                if c.value_size:
                    continue  # a split cell: the rest comes in the next chunks
                column = 0 if qualifier == IMPRESSIONS else 1 if qualifier == REWARDS else -1
                if column >= 0:
                    out[position[key], column] = int.from_bytes(value, "big", signed=True)
                value = b""
                if c.commit_row:
                    rows += 1
        return rows

    async def read_raw(keys: list[str]) -> int:
        encoded = [k.encode() for k in keys]
        position = {k: i for i, k in enumerate(encoded)}
        out = np.zeros((len(keys), 2), np.int64)
        parts = [encoded[s : s + chunk] for s in range(0, len(encoded), chunk)]
        counts = await asyncio.gather(*(read_chunk(part, position, out) for part in parts))
        rewards = out[:, 1] / REWARD_SCALE  # the source's arithmetic, for a fair comparison
        assert rewards.shape == (len(keys),)
        return sum(counts)

    return read_raw, channel.close


async def measure(variant: str, host: str, args: argparse.Namespace, emulator_sid: int) -> tuple[float, float, float]:
    """CPU us per row of this process, of the emulator, and wall ms per request."""
    read, close = await make_reader(variant, host, args.chunk)
    rng = np.random.default_rng(7)
    requests = [[f"arm-{i:08d}" for i in rng.choice(args.arms, args.keys, replace=False)] for _ in range(args.requests)]
    try:
        for keys in requests[:10]:  # warm: channels, caches
            assert await read(keys) == args.keys
        cpu0, emu0, wall0 = time.process_time(), session_cpu_seconds(emulator_sid), time.perf_counter()
        rows = 0
        for keys in requests:
            rows += await read(keys)
        cpu, emu, wall = (
            time.process_time() - cpu0,
            session_cpu_seconds(emulator_sid) - emu0,
            time.perf_counter() - wall0,
        )
    finally:
        await close()
    return cpu / rows * 1e6, emu / rows * 1e6, wall / len(requests) * 1e3


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_bigtable", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--keys", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=200)
    parser.add_argument("--arms", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    emulator = subprocess.Popen(
        ["gcloud", "beta", "emulators", "bigtable", "start", f"--host-port=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    host = f"127.0.0.1:{port}"
    os.environ["BIGTABLE_EMULATOR_HOST"] = host
    try:
        time.sleep(1.5)
        ensure_table(TABLE, 3600, say=lambda _: None)
        asyncio.run(fill(args.arms))
        results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in args.variants.split(",")}
        for _ in range(args.repeats):
            for variant in results:
                results[variant].append(asyncio.run(measure(variant, host, args, emulator.pid)))
        print(f"{args.requests} requests of {args.keys} keys, chunks of {args.chunk}, medians of {args.repeats}")
        print(f"{'variant':8} {'client us/row':>14} {'emulator us/row':>16} {'ms/request':>11}")
        for variant, runs in results.items():
            client, emu, wall = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"{variant:8} {client:14.1f} {emu:16.1f} {wall:11.2f}")
    finally:
        os.killpg(emulator.pid, signal.SIGKILL)
        emulator.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
