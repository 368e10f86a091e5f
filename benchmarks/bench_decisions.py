"""The decision log's cost: bytes per record and the loop's CPU per answer, version 1 against version 2.

In one process over one node (the workload's 100,000-arm table and its bodies, about 9% of whose candidate ids the
table does not hold), every side answers the same requests through ``NodeLoop.answered`` (the event held, the
impressions counted, the journal and the decision log written). A side's CPU per answer is the process's CPU time
over its answers, the writer threads included, with its decision log closed (written out) inside the measure.
Sides, alternated over ``--repeats``, medians reported: the decision log off; version 1 (the record before: JSON
meta, the request body, an int64 ranking; its encoder is kept here as the baseline); version 2 logging every answer;
version 2 logging a tenth (``decision_log_sample`` 0.1). Pin it to one core.

    taskset -c 0 python -m benchmarks.bench_decisions [--sizes 10,100,400] [--answers 4000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from benchmarks import bench_service, workload
from mab_service.config import Settings
from mab_service.learning import decisions, node
from mab_service.learning.loop import NodeLoop
from mab_service.policy.sampler import sample_top_k
from mab_service.schemas import decode_predict

#: Sides in the order each repeat runs them: (name, decision log on, sample rate, version).
SIDES = (("off", False, 1.0, 2), ("v1", True, 1.0, 1), ("v2", True, 1.0, 2), ("v2 sample 0.1", True, 0.1, 2))
_HEADER_V1 = struct.Struct("<4sIIIII")


def encode_v1(
    event_id: str,
    t: float,
    user_id: str,
    seed: int,
    top_k: int | None,
    body: bytes,
    alpha: npt.NDArray[np.float64],
    beta: npt.NDArray[np.float64],
    ranking: npt.NDArray[np.int64],
    segment: str | None = None,
    **_: object,
) -> decisions.Record:
    """A version 1 record (``decisions.MAGIC_V1``), as the loop wrote it before version 2: the baseline."""
    fields = (event_id, t, user_id, seed, top_k) if segment is None else (event_id, t, user_id, seed, top_k, segment)
    meta = orjson.dumps(fields)
    n, k = len(alpha), len(ranking)
    head = _HEADER_V1.pack(decisions.MAGIC_V1, len(meta), len(body), n, k, zlib.crc32(meta)) + meta
    return len(head) + len(body) + 16 * n + 8 * k, (head, body, alpha, beta, ranking)


@dataclass(frozen=True)
class Request:
    user_id: str
    body: bytes
    candidates: list[str]
    alpha: npt.NDArray[np.float64]
    beta: npt.NDArray[np.float64]
    rows: npt.NDArray[np.int32]
    ranking: npt.NDArray[np.int64]
    ids: list[str]
    top_k: int | None


def requests(arms: Any, size: int, count: int = 64) -> list[Request]:
    """``count`` of the workload's bodies of ``size`` candidates, gathered and ranked as /predict would."""
    made = []
    for i, body in enumerate(workload.make_bodies(size, n_bodies=count, seed=size)):
        query = decode_predict(body, size)
        alpha, beta, _, rows = arms.gather(query.candidates, 1.0, 1.0)
        k = len(alpha) if query.top_k is None else min(query.top_k, len(alpha))
        ranking, _ = sample_top_k(alpha, beta, k, seed=i)
        ids = [query.candidates[j] for j in ranking.tolist()]
        made.append(Request(query.user_id, body, query.candidates, alpha, beta, rows, ranking, ids, query.top_k))
    return made


@contextmanager
def version(number: int) -> Iterator[None]:
    """The loop encodes version ``number`` records meanwhile."""
    current = decisions.encode
    if number == 1:
        decisions.encode = encode_v1
    try:
        yield
    finally:
        decisions.encode = current


async def run_side(
    current: node.Node, settings: Settings, made: list[Request], answers: int, number: int
) -> dict[str, float]:
    """One side's run: CPU microseconds per answer, records logged and their bytes."""
    loop = NodeLoop(current, settings, apply_counts=True)
    await loop.start()
    log = loop.decisions
    try:
        with version(number):
            started = time.process_time()
            for i in range(answers):
                r = made[i % len(made)]
                loop.answered(
                    loop.new_event_id(), False, r.user_id, r.body, r.candidates, r.alpha, r.beta, r.rows, r.ranking,
                    r.ids, i, r.top_k,
                )  # fmt: skip
            if log is not None:
                log.close()  # what is buffered written out, inside the measure
            cpu_s = time.process_time() - started
    finally:
        await loop.close()
    written = 0 if log is None else log.written
    size = 0 if log is None else sum(p.stat().st_size for p in log.directory.glob(f"{log.name}-*{decisions.SUFFIX}"))
    return {"cpu_us_per_answer": 1e6 * cpu_s / answers, "records": written, "bytes": size}


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    table = workload.write_table(work / "table.csv")
    base = Settings(
        features=f"csv:{table}",
        state_dir=str(work / "state"),
        reward_window_s=1.0,  # holds expire within the run: the runs add up to more than a window's budget
        max_client_share=1.0,
        max_held_events=200_000,
        max_held_members=8_000_000,
    )
    results: dict[str, Any] = {}
    with node.using(base) as current:
        for size in args.sizes:
            made = requests(current.arms, size)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in SIDES}
            for _ in range(args.repeats):
                for name, on, rate, number in SIDES:
                    settings = base.replace(decision_log=on, decision_log_sample=rate)
                    runs[name].append(await run_side(current, settings, made, args.answers, number))
            results[f"W{size}"] = {name: summary(side, args.answers) for name, side in runs.items()}
    return results


def summary(runs: list[dict[str, float]], answers: int) -> dict[str, float]:
    records = sum(r["records"] for r in runs)
    total = sum(r["bytes"] for r in runs)
    return {
        "cpu_us_per_answer": statistics.median(r["cpu_us_per_answer"] for r in runs),
        "logged_share": records / (answers * len(runs)),
        "bytes_per_record": total / records if records else 0.0,
        "bytes_per_answer": total / (answers * len(runs)),
        "runs": runs,  # type: ignore[dict-item]
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_decisions", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,400", help="candidates per request, comma-separated")
    parser.add_argument("--answers", type=int, default=4000, help="answers per side and run (default 4000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="mab-bench-decisions-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    if args.json:
        report = {"environment": bench_service.environment(), "results": results}
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"{'':5} {'side':14} {'us CPU/answer':>13} {'vs off':>8} {'logged':>7} {'B/record':>9} {'B/answer':>9}")
    for workload_name, sides in results.items():
        off = sides["off"]["cpu_us_per_answer"]
        for name, m in sides.items():
            cpu = m["cpu_us_per_answer"]
            print(
                f"{workload_name:5} {name:14} {cpu:13.1f} {cpu - off:+8.1f} {m['logged_share']:7.0%} "
                f"{m['bytes_per_record']:9,.0f} {m['bytes_per_answer']:9,.0f}"
            )


if __name__ == "__main__":
    main()
