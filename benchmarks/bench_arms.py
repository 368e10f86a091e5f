"""Shared arm table benchmark: lookup speed against IdIndex, CSV load time and memory, memory per worker.

    taskset -c 1 python -m benchmarks.bench_arms [--quick] [--baseline-load] [--json] [--versions]

Three parts, each printed as a table:

- ``gather``: ns per id of ``ArmTable.gather`` and ``IdIndex.gather`` for requests of 400 ids drawn from
  ``c0`` .. ``c{1.09 n}`` (so about 9% are unknown), on tables of 100,000 and 10,000,000 arms (``--quick``:
  100,000 only). The table sits in an ``mmap`` of a file in /dev/shm, as the service maps it. Each figure is
  the median over repeats of one pass through 256 prepared requests, long enough that a large table is
  evicted from cache between uses of a row, as it is between requests in the service.
- ``load``: a CSV of 10,000,000 rows (``--quick``: 200,000) written to a temp dir is sized with
  ``csv_rows_upper_bound`` and loaded with ``load_csv`` into a new /dev/shm file, in a child process so that
  its peak resident set (VmHWM) is the load's own; steady is VmRSS after the load. ``--baseline-load`` adds
  today's path, ``features.local.load_table`` into an IdIndex, in another child.
- ``workers``: 1 and 4 child processes attach to one loaded table and read every row; the sum of their
  proportional set sizes (PSS, shared pages split among the processes that map them) is what the node pays.
- ``service`` (``--service``): ``mab-service serve`` on the same CSV with 1 and 4 workers: seconds to ready, and the
  sum of PSS over all its processes after 200 requests.

The machine may be shared with other jobs: expect noise of several percent on times, none on memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.workload import posterior_shapes
from mab_service.features._index import IdIndex
from mab_service.learning._arms import ArmTable

PRIOR_ALPHA, PRIOR_BETA = 1.0, 20.0
REQUEST_IDS = 400
REQUESTS = 256
SHM = Path("/dev/shm")


def table_ids(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def requests(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"c{j}" for j in rng.integers(0, n + n * 9 // 100, REQUEST_IDS)] for _ in range(REQUESTS)]


@contextmanager
def shared_buffer(size: int) -> Iterator[tuple[mmap.mmap, Path]]:
    """A zeroed MAP_SHARED mapping of a new file in /dev/shm (a temp dir if there is none), and the file's
    path; the file is removed after."""
    directory = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else Path(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="mab-arms-bench-", dir=directory)
    try:
        os.ftruncate(fd, size)
        buffer = mmap.mmap(fd, size)
        os.close(fd)
        try:
            yield buffer, Path(name)
        finally:
            buffer.close()
    finally:
        os.unlink(name)


def ns_per_id(work: Callable[[list[str]], object], batches: list[list[str]], repeats: int) -> float:
    def one_pass() -> float:
        start = time.perf_counter_ns()
        for ids in batches:
            work(ids)
        return (time.perf_counter_ns() - start) / (len(batches) * REQUEST_IDS)

    one_pass()
    return statistics.median(one_pass() for _ in range(repeats))


def gather_one_size(n: int, repeats: int) -> dict[str, float]:
    ids = table_ids(n)
    alpha, beta = posterior_shapes(n, seed=1)
    index = IdIndex(ids, alpha, beta)
    with shared_buffer(ArmTable.bytes_needed(n, 0)) as (buffer, _):
        table = ArmTable.create(buffer, n, 0)
        table.load(ids, alpha, beta)
        del ids
        batches = requests(n, seed=n)
        a0, b0, k0 = index.gather(batches[0], PRIOR_ALPHA, PRIOR_BETA)
        a1, b1, k1, _ = table.gather(batches[0], PRIOR_ALPHA, PRIOR_BETA)
        assert np.array_equal(a0, a1) and np.array_equal(b0, b1) and k0 == k1, "the tables disagree"
        index_gather = functools.partial(index.gather, prior_alpha=PRIOR_ALPHA, prior_beta=PRIOR_BETA)
        table_gather = functools.partial(table.gather, prior_alpha=PRIOR_ALPHA, prior_beta=PRIOR_BETA)
        result = {
            "IdIndex.gather, ns per id": ns_per_id(index_gather, batches, repeats),
            "ArmTable.gather, ns per id": ns_per_id(table_gather, batches, repeats),
            "IdIndex memory_bytes, MB": index.memory_bytes / 1e6,
            "ArmTable memory_bytes, MB": table.memory_bytes / 1e6,
        }
        del table_gather, table  # the table holds the buffer exported: release it before the mapping closes
    return result


def measure_gather(sizes: list[int], repeats: int) -> dict[str, dict[str, float]]:
    return {f"{n:,} arms": gather_one_size(n, repeats) for n in sizes}


def write_csv(path: Path, n: int) -> None:
    """``entity_id,alpha,beta`` rows ``c0`` .. ``c{n-1}`` with workload.write_table's posteriors, a million
    rows at a time so that writing 10,000,000 rows does not hold them all in memory."""
    with path.open("w", encoding="ascii", newline="") as f:
        f.write("entity_id,alpha,beta\n")
        step = 1_000_000
        for start in range(0, n, step):
            alpha, beta = posterior_shapes(min(step, n - start), seed=start)
            f.writelines(f"c{start + i},{a!r},{b!r}\n" for i, (a, b) in enumerate(zip(alpha.tolist(), beta.tolist())))


def memory_status() -> dict[str, int]:
    """Resident set figures of this process, in bytes: VmHWM, VmRSS, RssAnon, RssShmem, Pss, Pss_Shmem."""
    out: dict[str, int] = {}
    for name in ("/proc/self/status", "/proc/self/smaps_rollup"):
        with open(name) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem", "Pss", "Pss_Shmem"):
                    out[key] = int(rest.split()[0]) * 1024
    return out


def child(argv: list[str]) -> None:
    """The subprocess side: ``load CSV``, ``baseline CSV`` or ``attach SHMFILE ARMS``; prints JSON."""
    mode, path = argv[0], Path(argv[1])
    if mode == "load":
        start = time.perf_counter()
        rows, id_bytes = ArmTable.csv_rows_upper_bound(path)
        scanned = time.perf_counter()
        size = ArmTable.bytes_needed(rows, id_bytes)
        with shared_buffer(size) as (buffer, _):
            table = ArmTable.create(buffer, rows, id_bytes)
            loaded_rows = table.load_csv(path)
            done = time.perf_counter()
            status = memory_status()
            result = {
                "rows": loaded_rows,
                "scan_s": scanned - start,
                "load_s": done - scanned,
                "memory_bytes": table.memory_bytes,
                **status,
            }
            del table
    elif mode == "baseline":
        from mab_service.features.local import load_table

        start = time.perf_counter()
        with path.open(encoding="utf-8", newline="") as f:
            index = load_table(f, str(path))
        done = time.perf_counter()
        result = {"rows": len(index), "load_s": done - start, "memory_bytes": index.memory_bytes, **memory_status()}
    else:  # attach: read every row, as a worker serving the whole catalogue would in time
        batches = requests(int(argv[2]), seed=os.getpid())[:16]
        before = memory_status()
        with path.open("r+b") as f:
            buffer = mmap.mmap(f.fileno(), 0)
        table = ArmTable.attach(buffer)
        records = table.records()
        checksum = float(records["alpha0"].sum() + records["impressions"].sum())
        for batch in batches:
            table.gather(batch, PRIOR_ALPHA, PRIOR_BETA)
        result = {"checksum": checksum, "RssAnon_before": before["RssAnon"], **memory_status()}
        print(json.dumps(result), flush=True)
        sys.stdin.readline()  # stay attached until every worker has measured
        del records, table
        buffer.close()
        return
    print(json.dumps(result))


def run_child(*args: str) -> dict[str, float]:
    """Runs ``child`` in a new interpreter and returns what it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_arms", "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    parsed: dict[str, float] = json.loads(out.splitlines()[-1])
    return parsed


def measure_load(n: int, baseline: bool) -> dict[str, dict[str, float | None]]:
    with tempfile.TemporaryDirectory(prefix="mab-arms-bench-") as tmp:
        path = Path(tmp) / "arms.csv"
        write_csv(path, n)
        results = {"ArmTable.load_csv": run_child("load", str(path))}
        if baseline:
            results["local.load_table (IdIndex)"] = run_child("baseline", str(path))
    return {
        name: {
            "rows": r["rows"],
            "time, s": r["load_s"] + r.get("scan_s", 0.0),
            "  of which csv_rows_upper_bound, s": r.get("scan_s"),
            "peak RSS (VmHWM), MB": r["VmHWM"] / 1e6,
            "steady RSS after load, MB": r["VmRSS"] / 1e6,
            "peak / steady": r["VmHWM"] / r["VmRSS"],
            "table memory_bytes, MB": r["memory_bytes"] / 1e6,
        }
        for name, r in results.items()
    }


def measure_workers(n: int, counts: tuple[int, ...] = (1, 4)) -> dict[str, dict[str, float | None]]:
    """Load n arms into a /dev/shm file, unmap it here, then let 1 and 4 workers attach to it at once."""
    ids = table_ids(n)
    alpha, beta = posterior_shapes(n, seed=1)
    index_bytes = IdIndex(ids, alpha, beta).memory_bytes  # built and dropped: only its size is wanted
    results: dict[str, dict[str, float | None]] = {}
    with shared_buffer(ArmTable.bytes_needed(n, 0)) as (buffer, shm_file):
        table = ArmTable.create(buffer, n, 0)
        table.load(ids, alpha, beta)
        memory_bytes = table.memory_bytes
        del ids, table
        for k in counts:
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.bench_arms", "--child", "attach", str(shm_file), str(n)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(k)
            ]
            outs = []
            for proc in procs:
                assert proc.stdout is not None
                outs.append(json.loads(proc.stdout.readline()))
            for proc in procs:
                proc.communicate("\n")
            resident = os.stat(shm_file).st_blocks * 512
            results[f"{k} worker{'s' if k > 1 else ''}"] = {
                "table in /dev/shm (once per node), MB": resident / 1e6,
                "  its memory_bytes, MB": memory_bytes / 1e6,
                "private RSS per worker, MB": statistics.mean(o["RssAnon"] for o in outs) / 1e6,
                "  of which the table adds, MB": statistics.mean(o["RssAnon"] - o["RssAnon_before"] for o in outs)
                / 1e6,
                "sum of the workers' PSS (interpreters too), MB": sum(o["Pss"] for o in outs) / 1e6,
                "IdIndex per worker instead (x workers), MB": k * index_bytes / 1e6,
            }
    return results


def measure_service(n: int, counts: tuple[int, ...] = (1, 4)) -> dict[str, dict[str, float | None]]:
    """The real service on a CSV of n arms with 1 and 4 workers: seconds from start to /health 200, and what the
    node holds once it answers (the sum of PSS over its processes: the supervisor, the workers, the shared table)."""
    import httpx

    from benchmarks.bench_service import free_port, stop_group

    results: dict[str, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="mab-bench-arms-") as tmp:
        csv_path = Path(tmp) / "arms.csv"
        write_csv(csv_path, n)
        for k in counts:
            port = free_port()
            argv = [
                sys.executable, "-m", "mab_service", "serve", "--port", str(port), "--workers", str(k),
                "--features", f"csv:{csv_path}", "--state-dir", str(Path(tmp) / f"state-{k}"), "--log-level", "warning",
            ]  # fmt: skip
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                url = f"http://127.0.0.1:{port}"
                ready = None
                while time.perf_counter() - started < 300 and proc.poll() is None:
                    try:
                        if httpx.get(url + "/health", timeout=1).status_code == 200:
                            ready = time.perf_counter() - started
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.05)
                body = {"user_id": "u", "candidates": [f"c{i * 997 % n}" for i in range(400)], "top_k": 50}
                with httpx.Client(base_url=url, timeout=10) as client:  # every worker gets a share of these
                    for _ in range(200):
                        client.post("/predict", json=body, headers={"connection": "close"})
                pss = sum(_pss(pid) for pid in _session_pids(proc.pid))
            finally:
                stop_group(proc)
            results[f"{k} worker{'s' if k > 1 else ''}"] = {
                "seconds to /health 200": ready,
                "node PSS (all processes, table included), MB": pss / 1e6,
            }
    return results


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
                pids.append(int(entry))
    return pids


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpus": str(os.cpu_count()),
    }


def cell(value: float | None, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):>{width},}"
    return f"{value:>{width},.2f}"


def print_table(title: str, results: Mapping[str, Mapping[str, float | None]]) -> None:
    names = list(next(iter(results.values())))
    width = max(len(title), *map(len, names))
    columns = [max(14, len(c) + 2) for c in results]
    print(f"{title:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(results, columns)))
    for name in names:
        print(f"{name:<{width}}" + "".join(cell(r[name], w) for r, w in zip(results.values(), columns)))
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CI smoke run")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes; the median is reported")
    parser.add_argument("--baseline-load", action="store_true", help="also load the CSV with features.local")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--versions", action="store_true", help="print versions first")
    parser.add_argument(
        "--service", action="store_true", help="also time and measure the real service, 1 and 4 workers"
    )
    parser.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return

    gather_sizes = [100_000] if args.quick else [100_000, 10_000_000]
    load_rows = 200_000 if args.quick else 10_000_000
    worker_rows = 200_000 if args.quick else 10_000_000
    repeats = 3 if args.quick else args.repeats
    results: dict[str, Mapping[str, Mapping[str, float | None]]] = {
        "gather": measure_gather(gather_sizes, repeats),
        "load": measure_load(load_rows, args.baseline_load),
        "workers": measure_workers(worker_rows),
    }
    if args.service:
        results["service"] = measure_service(worker_rows)
    if args.json:
        print(json.dumps({"results": results, "versions": versions()}, indent=2))
        return
    if args.versions:
        print("  ".join(f"{k}={v}" for k, v in versions().items()))
    print_table(f"gather, {REQUEST_IDS} ids (median of {repeats})", results["gather"])
    print_table(f"load a CSV of {load_rows:,} rows", results["load"])
    print_table(f"memory of {worker_rows:,} arms", results["workers"])
    if "service" in results:
        print_table(f"mab-service serve on {worker_rows:,} arms", results["service"])


if __name__ == "__main__":
    main()
