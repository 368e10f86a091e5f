"""Where a cold read's CPU goes: client and emulator CPU per streamed entity, four ways of reading one emulator.

Every W400 request read cold is 404 ``StreamingReadFeatureValues`` messages (a header and one entity per message,
per chunk of 100). This measures, in one process pinned to ``--client-cpu`` with the emulator (no latency) on
``--emulator-cpu``, the CPU each side spends per entity, for the same bodies read:

    naive   benchmarks/baselines/naive_vertex.py's way: the client, chunks one after another, proto-plus fields
    ours    mab_service's VertexSource.read: chunks concurrently, raw messages, deadline, retries, decoding
    client  the client with chunks concurrently and nothing else: each message unwrapped to the raw protobuf
    raw     no client: a grpc.aio unary-stream call on a plain channel with the raw protobuf deserializer

``raw`` is what gRPC itself costs; ``naive / raw`` bounds what any client-side work can gain over the naive
reader when the CPU is the limit. Variants alternate over ``--repeats``; medians are printed.

    python -m benchmarks.bench_grpc_stream [--requests 150] [--concurrency 8] [--repeats 3]
                                           [--variants naive,ours,client,raw]

Set GRPC_EXPERIMENTS in the environment to compare gRPC's I/O managers (docs/vertex.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from benchmarks import workload
from benchmarks.bench_service import free_port, session_cpu_seconds
from mab_service.emulator import EmulatorControl

ENTITY_TYPE = "projects/bench/locations/local/featurestores/bench/entityTypes/content"
METHOD = "/google.cloud.aiplatform.v1.FeaturestoreOnlineServingService/StreamingReadFeatureValues"
CANDIDATES = 400
CHUNK = 100
VARIANTS = ("naive", "ours", "client", "raw")

#: One request's ids -> the number of stream messages read.
Reader = Callable[[list[str]], Awaitable[int]]


async def make_reader(variant: str, target: str) -> tuple[Reader, Callable[[], Awaitable[None]]]:
    """A reader of one request's ids the way ``variant`` reads, and how to close it."""
    from google.cloud import aiplatform_v1
    from google.cloud.aiplatform_v1.services.featurestore_online_serving_service.transports import grpc_asyncio
    from google.cloud.aiplatform_v1.types import featurestore_online_service as messages

    if variant == "ours":
        from mab_service.features.options import VertexOptions
        from mab_service.features.vertex import VertexSource

        source = VertexSource(ENTITY_TYPE, VertexOptions(emulator_host=target, deadline_s=30, call_timeout_s=30))
        await source.start()

        async def read_ours(ids: list[str]) -> int:
            await source.read(ids)
            return len(ids) + -(-len(ids) // CHUNK)

        return read_ours, source.close

    channel = grpc.aio.insecure_channel(target)
    request_pb = messages.StreamingReadFeatureValuesRequest.pb()
    response_pb = messages.ReadFeatureValuesResponse.pb()

    def request(ids: list[str]) -> object:
        pb = request_pb(entity_type=ENTITY_TYPE, entity_ids=ids)
        pb.feature_selector.id_matcher.ids.extend(["alpha", "beta"])
        return pb

    chunk: Callable[[list[str]], Awaitable[int]]
    if variant == "raw":
        call = channel.unary_stream(
            METHOD, request_serializer=request_pb.SerializeToString, response_deserializer=response_pb.FromString
        )

        async def chunk_raw(ids: list[str]) -> int:
            n = 0
            async for _ in call(request(ids)):
                n += 1
            return n

        chunk = chunk_raw
    else:
        transport = grpc_asyncio.FeaturestoreOnlineServingServiceGrpcAsyncIOTransport(channel=channel)
        client = aiplatform_v1.FeaturestoreOnlineServingServiceAsyncClient(transport=transport)
        if variant == "client":

            async def chunk_client(ids: list[str]) -> int:
                wrapped = messages.StreamingReadFeatureValuesRequest.wrap(request(ids))
                n = 0
                async for message in await client.streaming_read_feature_values(request=wrapped):
                    messages.ReadFeatureValuesResponse.pb(message)
                    n += 1
                return n

            chunk = chunk_client
        else:
            selector = aiplatform_v1.FeatureSelector(id_matcher=aiplatform_v1.IdMatcher(ids=["alpha", "beta"]))

            async def chunk_naive(ids: list[str]) -> int:
                wrapped = aiplatform_v1.StreamingReadFeatureValuesRequest(
                    entity_type=ENTITY_TYPE, entity_ids=ids, feature_selector=selector
                )
                found: dict[str, tuple[float, float]] = {}
                n = 0
                async for response in await client.streaming_read_feature_values(request=wrapped):
                    n += 1
                    if response.entity_view.entity_id:
                        data = response.entity_view.data
                        found[response.entity_view.entity_id] = (data[0].value.double_value, data[1].value.double_value)
                return n

            chunk = chunk_naive

    async def read(ids: list[str]) -> int:
        parts = [ids[s : s + CHUNK] for s in range(0, len(ids), CHUNK)]
        if variant == "naive":
            return sum([await chunk(part) for part in parts])
        return sum(await asyncio.gather(*map(chunk, parts)))

    return read, channel.close


async def measure(
    variant: str, target: str, emulator_pid: int, bodies: list[list[str]], concurrency: int
) -> dict[str, float]:
    read, close = await make_reader(variant, target)
    try:
        gate = asyncio.Semaphore(concurrency)

        async def one(ids: list[str]) -> int:
            async with gate:
                return await read(ids)

        await asyncio.gather(*map(one, bodies[:10]))  # connect and warm up
        cpu, emulator_cpu, started = time.process_time(), session_cpu_seconds(emulator_pid), time.perf_counter()
        messages = sum(await asyncio.gather(*map(one, bodies)))
        wall = time.perf_counter() - started
        cpu, emulator_cpu = time.process_time() - cpu, session_cpu_seconds(emulator_pid) - emulator_cpu
    finally:
        await close()
    expected = sum(len(b) + -(-len(b) // CHUNK) for b in bodies)
    if messages != expected:
        raise RuntimeError(f"{variant} read {messages} messages, expected {expected}")
    return {
        "requests_per_s": len(bodies) / wall,
        "client_us_per_message": 1e6 * cpu / messages,
        "emulator_us_per_message": 1e6 * emulator_cpu / messages,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_grpc_stream", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=150, help="W400 requests read per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--emulator-cpu", type=int, default=1)
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import uvloop

    rng = np.random.default_rng(1)
    bodies = [
        [f"c{i}" for i in rng.choice(workload.DEFAULT_ID_SPACE, CANDIDATES, replace=False)]
        for _ in range(args.requests)
    ]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench_grpc_stream-") as tmp:
        table = workload.write_table(Path(tmp) / "table.csv")
        port = free_port()
        argv_emulator = ["taskset", "-c", str(args.emulator_cpu), sys.executable, "-m", "mab_service.emulator",
                         "--port", str(port), "--features", str(table)]  # fmt: skip
        with (Path(tmp) / "emulator.log").open("wb") as log:
            emulator = subprocess.Popen(argv_emulator, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        target = f"127.0.0.1:{port}"
        os.sched_setaffinity(0, {args.client_cpu})
        try:
            with EmulatorControl(target) as control:
                control.wait_ready(60)
            for rep in range(args.repeats):
                for variant in args.variants:
                    result = uvloop.run(measure(variant, target, emulator.pid, bodies, args.concurrency))
                    results[variant].append(result)
                    print(
                        f"[{rep + 1}/{args.repeats}] {variant}: {result['requests_per_s']:.0f} req/s, client "
                        f"{result['client_us_per_message']:.1f} us/message, emulator "
                        f"{result['emulator_us_per_message']:.1f} us/message",
                        file=sys.stderr,
                    )
        finally:
            emulator.terminate()
            emulator.wait(timeout=10)
    print(f"GRPC_EXPERIMENTS={os.environ.get('GRPC_EXPERIMENTS', '')!r}, grpcio {grpc.__version__}, "
          f"{args.requests} W400 requests x {args.repeats}, {args.concurrency} in flight; medians")  # fmt: skip
    print("| variant | req/s | client CPU us/message | emulator CPU us/message |")
    print("| --- | ---: | ---: | ---: |")
    medians = {v: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for v, runs in results.items() if runs}
    for variant, m in medians.items():
        print(
            f"| {variant} | {m['requests_per_s']:.0f} | {m['client_us_per_message']:.1f} "
            f"| {m['emulator_us_per_message']:.1f} |"
        )
    if "naive" in medians and "raw" in medians:
        bound = medians["naive"]["client_us_per_message"] / medians["raw"]["client_us_per_message"]
        print(f"\nnaive / raw client CPU: {bound:.2f}x (the most a client can gain over naive when CPU-bound)")
    if "naive" in medians and "ours" in medians:
        gain = medians["naive"]["client_us_per_message"] / medians["ours"]["client_us_per_message"]
        print(f"naive / ours client CPU: {gain:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
