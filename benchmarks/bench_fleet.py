"""Fleet mode benchmark: what events cost /predict, and how long a reward takes to show in every replica.

Google's Bigtable and Pub/Sub emulators run for the whole benchmark (in their own process groups, stopped at the
end); ``mab-service setup`` makes the topic, subscription and table, and the table gets counts for the workload's
arms.

``throughput``: W400 against a fresh server per run, pinned to ``--server-cpus`` and loaded by wrk on
``--client-cpus`` (the emulators share the client's core), targets alternating over ``--repeats``, medians:
    embedded          the default service: embedded CSV source, the node's own loop
    bigtable          ``--features bigtable:T``, the cache kept ``--long-ttl-s``, the loop on but no events
    bigtable-events   the same with ``--events pubsub:TOPIC``: every answer published and its membership row written
    bigtable-events-ttl1  the same with the default ``fleet_cache_ttl_s`` (1 s): every hot id read again each second
    bigtable-events-fanout  the default fleet replica: its node's table follows the learners' fan-out (no cache)
(the ``bigtable-events*`` cache targets run with ``--no-fleet-follow``)
The issue's target is bigtable-events / bigtable >= 0.85.

``freshness``: two replicas with events (default settings) and one learner; ``--rewards`` times, one answer from
replica A, a reward for its first id posted to replica B, then both replicas' ``GET /arms/{id}`` (read past the
cache) polled every 10 ms until the reward shows. Reported: the lag's median, p95 and max per replica.

``reads``: Bigtable reads per replica, before and after the counts' fan-out, under the same load side by side: one
learner, a replica ``cache`` (``--no-fleet-follow``: counts read behind the 1 s cache) and a replica ``fanout`` (the
default: its node's table follows the learners' fan-out), each pinned to ``--server-cpus``. For ``--duration`` x 4
seconds ``--load-threads`` threads send the W400 bodies to both replicas, one answer in ``--reward-every`` gets a
reward for its first id; meanwhile, twice a second, an answer for a fresh arm from ``fanout``, its reward posted to
``cache``, and the lag to the reward's visibility polled every 10 ms: in ``fanout``'s node table (mapped here: what
its answers rank by) and in ``cache``'s ``GET /arms/{id}`` (Bigtable, past its cache: its answers lag up to
``fleet_cache_ttl_s`` more). Counts rows read: ``cache``'s cache misses (less coalesced) plus refreshes, from its
/metrics; ``fanout``'s follower scans, from /loop.

    python -m benchmarks.bench_fleet [--parts throughput,freshness,reads] [--entities 20000] [--duration 8]
                                     [--repeats 3] [--rewards 100]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from benchmarks import bench_service, workload
from benchmarks.bench_service import free_port, stop_group

PROJECT = "bench"


@contextlib.contextmanager
def emulator(kind: str, variable: str, cpu: str, log: Path) -> Iterator[str]:
    """Google's ``kind`` emulator on a free port, pinned to ``cpu``; ``variable`` points at it while in the block."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, "gcloud", "beta", "emulators", kind, "start", f"--host-port=127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {kind} emulator did not start: {bench_service.tail(log)}") from None
                time.sleep(0.1)
        os.environ[variable] = f"127.0.0.1:{port}"
        yield os.environ[variable]
    finally:
        os.environ.pop(variable, None)
        stop_group(proc)


def fill_counts(table: str, table_csv: Path) -> int:
    """Give every arm of the workload's table counts in Bigtable (impressions = alpha + beta, rewards = alpha)."""
    import asyncio

    from google.cloud.bigtable.data import AddToCell, RowMutationEntry

    from mab_service.features.bigtable import data_client
    from mab_service.fleet.schema import COUNTS_FAMILY, IMPRESSIONS, REWARD_SCALE, REWARDS, TablePath

    rows = [line.split(",") for line in table_csv.read_text().splitlines()[1:]]
    path = TablePath.parse(table)

    async def write() -> None:
        client = data_client(path.project)
        target = client.get_table(path.instance, path.table)
        for s in range(0, len(rows), 5000):
            entries = [
                RowMutationEntry(
                    id_.encode(),
                    [
                        AddToCell(COUNTS_FAMILY, IMPRESSIONS, int(float(a) + float(b)), 0),
                        AddToCell(COUNTS_FAMILY, REWARDS, int(float(a) * REWARD_SCALE), 0),
                    ],
                )
                for id_, a, b in rows[s : s + 5000]
            ]
            await target.bulk_mutate_rows(entries, operation_timeout=120)
        await client.close()

    asyncio.run(write())
    return len(rows)


def serve_argv(
    table: str, topic: str | None, ttl_s: float | None, warmup: Path, follow: bool = False
) -> bench_service.TargetFactory:
    """A replica's argv; with ``topic``, its counts behind the cache unless ``follow`` (the fan-out)."""

    def argv(port: int, features: Path, workers: int = 1) -> list[str]:
        state = tempfile.mkdtemp(prefix="state-", dir=bench_service._state_root())
        cmd = [
            sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--features", f"bigtable:{table}", "--state-dir", state,
            "--warmup-ids", str(warmup),
        ]  # fmt: skip
        if topic is not None:
            cmd += ["--events", f"pubsub:{topic}"] + ([] if follow else ["--no-fleet-follow"])
        if ttl_s is not None:
            cmd += ["--fleet-cache-ttl-s", str(ttl_s)]
        return cmd

    return argv


def measure_throughput(
    args: argparse.Namespace, work: Path, table_csv: Path, w400: workload.WorkloadFiles, table: str, topic: str
) -> dict[str, Any]:
    targets: dict[str, bench_service.TargetFactory] = {
        "embedded": bench_service.project_target,
        "bigtable": serve_argv(table, None, args.long_ttl_s, table_csv),
        "bigtable-events": serve_argv(table, topic, args.long_ttl_s, table_csv),
        "bigtable-events-ttl1": serve_argv(table, topic, None, table_csv),
        "bigtable-events-fanout": serve_argv(table, topic, None, table_csv, follow=True),
    }
    result: dict[str, Any] = bench_service.measure_interleaved(targets, table_csv, w400, args, work, "throughput")
    result["events_ratio"] = result["bigtable-events"]["rps"] / result["bigtable"]["rps"]
    result["ttl1_ratio"] = result["bigtable-events-ttl1"]["rps"] / result["bigtable"]["rps"]
    result["fanout_ratio"] = result["bigtable-events-fanout"]["rps"] / result["bigtable"]["rps"]
    return result


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, orjson.loads(answer.read())


def _rewards(url: str, arm: str) -> float:
    try:
        with urllib.request.urlopen(f"{url}/arms/{arm}", timeout=30) as answer:
            return float(orjson.loads(answer.read())["rewards"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 0.0
        raise


def measure_freshness(
    args: argparse.Namespace, work: Path, table_csv: Path, table: str, topic: str, subscription: str
) -> dict[str, Any]:
    servers = []
    learner_log = (work / "learner.log").open("wb")
    learner = subprocess.Popen(
        ["taskset", "-c", args.client_cpus, sys.executable, "-m", "mab_service", "learn",
         "--events", f"pubsub:{subscription}", "--posteriors", f"bigtable:{table}", *args.learner_args.split()],
        stdout=learner_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    lags: dict[str, list[float]] = {"A": [], "B": []}
    retried = 0
    try:
        urls = []
        for name in ("A", "B"):
            port = free_port()
            argv = serve_argv(table, topic, None, table_csv)(port, Path(), 1)
            server = bench_service.running_server(argv, port, args.server_cpus, work / f"replica-{name}.log")
            servers.append(server)
            server.__enter__()
            urls.append(f"http://127.0.0.1:{port}")
        for n in range(args.rewards):
            arm = f"fresh-{uuid.uuid4().hex[:8]}"
            _, answer = _post(urls[0] + "/predict", {"user_id": f"u{n}", "candidates": [arm], "top_k": 1})
            for attempt in range(10):  # a busy emulator may make the replica answer 503; the client retries
                try:
                    status, _ = _post(urls[1] + "/reward", {"event_id": answer["event_id"], "id": arm, "reward": 1})
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code != 503 or attempt == 9:
                        raise
                    retried += 1
                    time.sleep(0.2)
            assert status == 202
            accepted = time.monotonic()
            waiting = {"A": urls[0], "B": urls[1]}
            while waiting:
                for name, url in list(waiting.items()):
                    if _rewards(url, arm) >= 1.0:
                        lags[name].append(time.monotonic() - accepted)
                        del waiting[name]
                if time.monotonic() - accepted > 30:
                    raise RuntimeError(f"reward for {arm} not visible within 30 s (learner log {learner_log.name})")
                time.sleep(0.01)
    finally:
        for server in servers:
            server.__exit__(None, None, None)
        stop_group(learner)
        learner_log.close()

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "median_s": statistics.median(ordered),
            "p95_s": ordered[int(0.95 * (len(ordered) - 1))],
            "max_s": ordered[-1],
        }

    return {**{name: summary(values) for name, values in lags.items()}, "rewards_retried_after_503": retried}


def metric(url: str, name: str, label: str) -> float:
    """The value of ``name{...label...}`` in a server's /metrics, 0 if absent."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name) and label in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return orjson.loads(answer.read())


def cache_rows(url: str) -> float:
    """Ids a cached replica asked Bigtable for: misses not coalesced into another's read, and refreshes."""
    events = "mab_feature_source_events_total"
    return (
        metric(url, "mab_cache_lookups_total", 'result="miss"')
        - metric(url, events, 'event="coalesced"')
        + metric(url, events, 'event="refreshes"')
    )


def follower_rows(url: str) -> float:
    return float(_get(url + "/loop")["fleet"]["counts_rows_read"])


def node_arms(pid: int) -> Any:
    """The node table of a one-worker replica, mapped from its shared file."""
    import mmap

    from mab_service.learning._arms import ArmTable

    (path,) = Path("/dev/shm").glob(f"mab-service-{pid}-*-arms")
    fd = os.open(path, os.O_RDWR)
    try:
        return ArmTable.attach(mmap.mmap(fd, 0))
    finally:
        os.close(fd)


def measure_reads(
    args: argparse.Namespace, work: Path, w400: workload.WorkloadFiles, table: str, topic: str, subscription: str
) -> dict[str, Any]:
    import threading

    bodies = [orjson.loads(line) for line in w400.bodies.read_text().splitlines() if line.strip()]
    learner_log = (work / "reads-learner.log").open("wb")
    learner = subprocess.Popen(
        ["taskset", "-c", args.client_cpus, sys.executable, "-m", "mab_service", "learn",
         "--events", f"pubsub:{subscription}", "--posteriors", f"bigtable:{table}", "--metrics-port", "0",
         *args.learner_args.split()],
        stdout=learner_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    servers = []
    urls: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        for name, extra in (("cache", ["--no-fleet-follow"]), ("fanout", [])):
            port = free_port()
            state = tempfile.mkdtemp(prefix="state-", dir=bench_service._state_root())
            argv = [
                sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--features", f"bigtable:{table}", "--events", f"pubsub:{topic}", "--state-dir", state, *extra,
            ]  # fmt: skip
            server = bench_service.running_server(argv, port, args.server_cpus, work / f"reads-{name}.log")
            pids[name] = server.__enter__().pid
            servers.append(server)
            urls[name] = f"http://127.0.0.1:{port}"
        start_scan = follower_rows(urls["fanout"])
        arms = node_arms(pids["fanout"])
        lags: dict[str, list[float]] = {"fanout_table": [], "cache_bigtable": []}
        stop = threading.Event()

        def probe() -> None:
            n = 0
            while not stop.wait(0.5):
                n += 1
                arm = f"probe-{uuid.uuid4().hex[:8]}"
                _, answer = _post(urls["fanout"] + "/predict", {"user_id": f"p{n}", "candidates": [arm], "top_k": 1})
                status, _ = _post(urls["cache"] + "/reward", {"event_id": answer["event_id"], "id": arm, "reward": 1})
                accepted = time.monotonic()
                waiting = {"fanout_table", "cache_bigtable"}
                while waiting and time.monotonic() - accepted < 30:
                    found = arms.get(arm)
                    if "fanout_table" in waiting and found is not None and found[3] >= 1.0:
                        lags["fanout_table"].append(time.monotonic() - accepted)
                        waiting.discard("fanout_table")
                    if "cache_bigtable" in waiting and _rewards(urls["cache"], arm) >= 1.0:
                        lags["cache_bigtable"].append(time.monotonic() - accepted)
                        waiting.discard("cache_bigtable")
                    time.sleep(0.01)

        prober = threading.Thread(target=probe, daemon=True)
        duration_s = args.duration * 4
        settle_s = min(5.0, duration_s / 4)
        started = time.monotonic()
        marks: dict[str, tuple[float, float]] = {}
        counter = itertools.count()
        refused = dict.fromkeys(urls.values(), 0)
        threads, reward_every = args.load_threads, args.reward_every

        def load() -> int:
            sent = 0
            while time.monotonic() - started < duration_s:
                i = next(counter)
                for url in urls.values():
                    try:
                        _, answer = _post(url + "/predict", bodies[i % len(bodies)])
                    except urllib.error.HTTPError as exc:  # 503: shed, or the emulators too busy; counted
                        refused[url] += exc.code == 503
                        continue
                    sent += 1
                    if i % reward_every == 0:
                        with contextlib.suppress(urllib.error.HTTPError):  # 503 while the emulator is busy: skipped
                            _post(
                                url + "/reward", {"event_id": answer["event_id"], "id": answer["ids"][0], "reward": 1}
                            )
            return sent

        prober.start()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            senders = [pool.submit(load) for _ in range(threads)]
            time.sleep(settle_s)
            marks["begin"] = (cache_rows(urls["cache"]), follower_rows(urls["fanout"]))
            begun = time.monotonic()
            requests = sum(f.result() for f in senders)
        stop.set()
        prober.join()
        time.sleep(2.5)  # the metrics' flush interval
        elapsed = time.monotonic() - begun
        cached_rows = cache_rows(urls["cache"]) - marks["begin"][0]
        fanout_rows = follower_rows(urls["fanout"]) - marks["begin"][1]
        follower = _get(urls["fanout"] + "/loop")["fleet"]["follower"]
    finally:
        for server in servers:
            server.__exit__(None, None, None)
        stop_group(learner)
        learner_log.close()

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        if not ordered:
            return {"n": 0}
        return {
            "n": len(ordered),
            "median_s": statistics.median(ordered),
            "p95_s": ordered[int(0.95 * (len(ordered) - 1))],
            "max_s": ordered[-1],
        }

    return {
        "seconds": elapsed,
        "predicts_per_replica_per_s": requests / 2 / (time.monotonic() - started),
        "cache": {"rows_per_s": cached_rows / elapsed, "predicts_refused": refused[urls["cache"]]},
        "fanout": {
            "rows_per_s": fanout_rows / elapsed,
            "predicts_refused": refused[urls["fanout"]],
            "start_scan_rows": start_scan,
            "follower": follower,
        },
        "freshness": {name: summary(values) for name, values in lags.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="throughput,freshness")
    parser.add_argument("--entities", type=int, default=20_000, help="arms in the table (default 20000)")
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--server-cpus", default="1")
    parser.add_argument("--client-cpus", default="0")
    parser.add_argument("--long-ttl-s", type=float, default=600.0, help="cache TTL of the no-refresh targets")
    parser.add_argument("--rewards", type=int, default=100)
    parser.add_argument("--learner-args", default="", help="extra flags for `mab-service learn`")
    parser.add_argument("--load-threads", type=int, default=8, help="reads: threads sending the load")
    parser.add_argument("--reward-every", type=int, default=10, help="reads: one reward per this many answers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if "throughput" in parts:
        bench_service.require_tools()  # wrk; the other parts load the replicas from here
    results: dict[str, Any] = {"environment": bench_service.environment(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        with (
            emulator("bigtable", "BIGTABLE_EMULATOR_HOST", args.client_cpus, work / "bigtable.log"),
            emulator("pubsub", "PUBSUB_EMULATOR_HOST", args.client_cpus, work / "pubsub.log"),
        ):
            from mab_service.fleet import setup as fleet_setup

            tag = uuid.uuid4().hex[:8]
            table = f"projects/{PROJECT}/instances/mab/tables/arms-{tag}"

            def resources(part: str) -> tuple[str, str]:
                """A topic and subscription of the part's own: the throughput runs leave a backlog behind."""
                topic = f"projects/{PROJECT}/topics/{part}-{tag}"
                subscription = f"projects/{PROJECT}/subscriptions/{part}-{tag}"
                fleet_setup.setup(
                    fleet_setup.FleetResources(topic, subscription, fleet_setup.table_path(f"bigtable:{table}")),
                    say=lambda _: None,
                )
                return topic, subscription

            resources("fill")
            table_csv, files = workload.write_workloads(work, ["W400"], n_entities=args.entities)
            print(f"  {fill_counts(table, table_csv):,} arms counted in {table}", file=sys.stderr)
            if "freshness" in parts:
                results["freshness"] = measure_freshness(args, work, table_csv, table, *resources("freshness"))
                print(orjson.dumps(results["freshness"]).decode(), file=sys.stderr)
            if "reads" in parts:
                results["reads"] = measure_reads(args, work, files["W400"], table, *resources("reads"))
                print(orjson.dumps(results["reads"]).decode(), file=sys.stderr)
            if "throughput" in parts:
                topic = resources("throughput")[0]
                results["throughput"] = measure_throughput(args, work, table_csv, files["W400"], table, topic)
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
        return
    if "throughput" in results:
        t = results["throughput"]
        print(f"W400, one worker on cpu {args.server_cpus}, wrk -c{args.connections} on {args.client_cpus}, "
              f"medians of {args.repeats} x {args.duration} s")  # fmt: skip
        print(f"{'target':24} {'req/s':>9} {'us CPU/req':>11} {'p99 ms':>7}")
        for name in ("embedded", "bigtable", "bigtable-events", "bigtable-events-ttl1", "bigtable-events-fanout"):
            r = t[name]
            print(f"{name:24} {r['rps']:9,.0f} {r['cpu_us_per_request']:11.1f} {r['p99_ms']:7.2f}")
        print(f"events on / off: {t['events_ratio']:.2f}x; with the 1 s cache: {t['ttl1_ratio']:.2f}x")
    if "reads" in results:
        r = results["reads"]
        print(f"Bigtable counts rows read per replica per second, {r['seconds']:.0f} s of the same W400 load on both "
              f"({r['predicts_per_replica_per_s']:.0f} /predict/s each) and a reward per answer")  # fmt: skip
        print(f"  cache (1 s TTL): {r['cache']['rows_per_s']:,.0f}   fan-out: {r['fanout']['rows_per_s']:,.0f} "
              f"(start scan {r['fanout']['start_scan_rows']:,.0f} rows)")  # fmt: skip
        for name, s in r["freshness"].items():
            if s.get("n"):
                print(f"  reward -> {name}: n {s['n']}, median {s['median_s']:.3f} s, p95 {s['p95_s']:.3f} s, "
                      f"max {s['max_s']:.3f} s")  # fmt: skip
    if "freshness" in results:
        for name, s in results["freshness"].items():
            if name not in ("A", "B"):
                print(f"{name}: {s}")
                continue
            print(f"reward -> /arms on replica {name}: median {s['median_s']:.3f} s, p95 {s['p95_s']:.3f} s, "
                  f"max {s['max_s']:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
