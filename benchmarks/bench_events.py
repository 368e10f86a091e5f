"""Event-ring benchmark: ns per hold (one /predict answer) and per reward check, in 1 and 2 processes.

    taskset -c 1 python -m benchmarks.bench_events [--events 20000] [--repeats 5] [--json] [--versions]

The ring sits in a file in /dev/shm (a temporary file elsewhere if there is none) sized for 200,000 events of
50 members, as a small production ring would be; the processes map it and ``EventRing.attach`` it. Each
request's candidates are ``DEFAULT_TOP_K``-sized picks out of 400 fresh ids ``c0`` .. ``c109999`` from
``benchmarks.workload``, and event ids are 32 hex digits. Rows:

- ``hold``: record an event with 0, 50 or 400 members (top_k 50 is the service default);
- ``reward``: accepted rewards of events of 50 members (a member at a random position, so about half the
  members are scanned), a duplicate of each, and a reward of an event the ring never held.

The ring fills after the first rows, so most holds overwrite its oldest event, as in a service at steady
state (the "evicted early" count at the end is these, all inside the window of a benchmark this short).

In the 2-process rows both processes run the same loop at the same time on their own event ids, started
together; the figure is the mean of their per-operation times. Times are CPU time of the calling thread
(``time.thread_time_ns``), so that two processes pinned to one core, or other load on a shared machine, do not
count each other's turns; cache misses and contention on the shared lines do count. Figures are medians over
repeats of the mean over ``--events`` operations, Python call included.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workload import DEFAULT_ID_SPACE, DEFAULT_TOP_K
from mab_service.learning._events import ACCEPTED, DUPLICATE, UNKNOWN_EVENT, EventRing

MAX_EVENTS = 200_000
MEMBERS_PER_EVENT = DEFAULT_TOP_K
CANDIDATES = 400
WINDOW_S = 600.0


def ring_file(directory: str | None = None) -> Path:
    """A zero-filled file of the ring's size in /dev/shm (or the temporary directory)."""
    shm = Path("/dev/shm")
    where = directory or (str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None)
    fd, name = tempfile.mkstemp(prefix="mab-bench-events-", dir=where)
    os.ftruncate(fd, EventRing.bytes_needed(MAX_EVENTS, MAX_EVENTS * MEMBERS_PER_EVENT))
    os.close(fd)
    return Path(name)


def map_file(path: Path) -> mmap.mmap:
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), 0)


def hold_ns(ring: EventRing, ids: list[str], chosen: np.ndarray, names: list[str]) -> float:
    """Mean ns per hold of ``names``, each an event of ``ids[chosen]``."""
    now = time.time()
    start = time.thread_time_ns()
    for name in names:
        ring.hold(name, ids, chosen, now)
    return (time.thread_time_ns() - start) / len(names)


def reward_ns(ring: EventRing, pairs: list[tuple[str, str]], expected: int) -> float:
    """Mean ns per reward of ``pairs``; checks afterwards, untimed, that each answered ``expected``."""
    now = time.time()
    answers = [0] * len(pairs)
    start = time.thread_time_ns()
    for i, (name, member) in enumerate(pairs):
        answers[i] = ring.reward(name, member, now)
    elapsed = time.thread_time_ns() - start
    assert answers == [expected] * len(pairs), f"expected {expected} for every reward"
    return elapsed / len(pairs)


def measure(
    ring: EventRing, tag: str, n: int, repeats: int, seed: int, sync: Callable[[], object] = lambda: None
) -> dict[str, float]:
    """ns per operation for each row, on event ids that start with ``tag``.

    ``sync`` runs before each row: in the 2-process run it waits for the other process, so that both run the
    same row at once (and one's 400-member holds do not overwrite the events the other is rewarding).
    """
    rng = np.random.default_rng(seed)
    ids = [f"c{j}" for j in rng.integers(0, DEFAULT_ID_SPACE, CANDIDATES)]
    serial = iter(range(2**64))

    def names(m: int) -> list[str]:
        return [f"{tag}{next(serial):0{32 - len(tag)}x}" for _ in range(m)]

    results: dict[str, float] = {}
    for k in (0, MEMBERS_PER_EVENT, CANDIDATES):
        chosen = rng.permutation(CANDIDATES)[:k].astype(np.intp)
        sync()
        hold_ns(ring, ids, chosen, names(min(n, 1000)))  # warm-up: page faults in the ring, caches
        results[f"hold, {k} members"] = statistics.median(hold_ns(ring, ids, chosen, names(n)) for _ in range(repeats))

    # Rewards: a fresh set of held events of 50 members per repeat, so that every first reward is accepted.
    chosen = rng.permutation(CANDIDATES)[:MEMBERS_PER_EVENT].astype(np.intp)
    rows: dict[str, list[float]] = {"reward, accepted (50 members)": [], "reward, duplicate": [], "reward, unknown": []}
    for _ in range(repeats):
        sync()
        held = names(n)
        hold_ns(ring, ids, chosen, held)
        pairs = [(name, ids[chosen[j]]) for name, j in zip(held, rng.integers(0, MEMBERS_PER_EVENT, n), strict=True)]
        rows["reward, accepted (50 members)"].append(reward_ns(ring, pairs, ACCEPTED))
        rows["reward, duplicate"].append(reward_ns(ring, pairs, DUPLICATE))
        rows["reward, unknown"].append(reward_ns(ring, [(name, "c1") for name in names(n)], UNKNOWN_EVENT))
    results.update({row: statistics.median(times) for row, times in rows.items()})
    return results


def _worker(path: str, barrier: Barrier, results: Any, index: int, n: int, repeats: int) -> None:
    buf = map_file(Path(path))
    ring = EventRing.attach(buf)
    results.put(measure(ring, f"p{index}-", n, repeats, seed=index, sync=lambda: barrier.wait(timeout=600)))
    ring.close()
    buf.close()


def run(n: int, repeats: int) -> dict[str, dict[str, float]]:
    path = ring_file()
    try:
        buf = map_file(path)
        ring = EventRing.create(buf, MAX_EVENTS, MAX_EVENTS * MEMBERS_PER_EVENT, WINDOW_S)
        out = {"1 process": measure(ring, "solo-", n, repeats, seed=0)}
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2)
        queue = ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(str(path), barrier, queue, i, n, repeats)) for i in range(2)]
        for w in workers:
            w.start()
        try:
            parts = [queue.get(timeout=1200) for _ in workers]
        finally:
            for w in workers:
                w.join(timeout=10)
                if w.is_alive():
                    w.kill()
        out["2 processes"] = {row: statistics.mean(p[row] for p in parts) for row in parts[0]}
        out["ring"] = {
            "memory MB": ring.memory_bytes / 1e6,
            "evicted early": float(ring.stats()["evicted_early"]),
        }
        ring.close()
        buf.close()
        return out
    finally:
        path.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpus": str(os.cpu_count()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="operations per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--versions", action="store_true", help="print versions first")
    args = parser.parse_args(argv)

    results = run(args.events, args.repeats)
    if args.json:
        print(json.dumps({"ns_per_op": results, "versions": versions()}, indent=2))
        return
    if args.versions:
        print("  ".join(f"{k}={v}" for k, v in versions().items()))
    ring = results.pop("ring")
    rows = list(results["1 process"])
    width = max(map(len, rows))
    print(f"{'ns per operation (median of ' + str(args.repeats) + ')':<{width}}" + "".join(f"{c:>14}" for c in results))
    for row in rows:
        print(f"{row:<{width}}" + "".join(f"{r[row]:14.0f}" for r in results.values()))
    print(f"ring: {ring['memory MB']:.0f} MB, {int(ring['evicted early'])} events evicted early")


if __name__ == "__main__":
    main()
