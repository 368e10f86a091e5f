"""The fleet's scale run: many replicas and learners as real processes on Google's emulators, under sustained load
and faults, checked against the truth and measured.

``mab-service setup`` makes the topic, the subscriptions and the table; ``--replicas`` x ``mab-service serve
--features bigtable:T --events pubsub:TOPIC`` (default flags otherwise) and ``--learners`` x ``mab-service learn``
start as processes of their own, each in its own session, pinned with ``taskset``. Then, for at most ``--duration``
seconds and ``--answers`` answers, at ``--rate`` answers per second: ``/predict`` with ``--candidates`` ids drawn
from ``--arms`` arms (Zipf 1.1 popularity) and ``top_k`` ``--top-k``, sent to the replicas in turn; a reward for
``--reward-fraction`` of the answers posted to another replica than the one that answered, and ``--duplicate-fraction``
of the accepted ones posted again to a third (each must answer ``duplicate``). A third of the way through, one
learner is killed with SIGKILL (its shards' leases lapse and the others take them over); half way, one replica is
taken out of the rotation, sent SIGTERM, waited for, and started again on the same port.

Meanwhile, every second, an answer for a new arm from one replica and a reward for it posted to another, and the lag
from the 202 until every running replica's ``GET /arms/{id}`` shows it (freshness). The emulators and the learners run
on ``--emulator-cpus`` and ``--learner-cpus`` (default core 0), the replicas and the load on ``--replica-cpus`` and
``--client-cpus`` (core 1).

The truth is every answer that was 200 and every reward that was 202. After the load, reported:

- exact counts: per replica, the arms whose counts in its node table (what its answers rank by, mapped from its
  shared file) and whose ``GET /arms/{id}`` (impressions, rewards; read from Bigtable) differ from the truth, once
  converged or after ``converge_timeout_s`` (must be 0), and when each got there. The check reads every answered arm
  on every replica, tens of thousands of Bigtable reads: it is most of the run's time, and it is given every core;
- the largest number of cells in any arm's row of the table (rows not starting with NUL), and the cells in the fleet's
  own lease and learner rows;
- learner events/s per core: impressions and rewards applied (each learner's /metrics) per CPU second of that learner
  (``/proc``, from the load's start until the node tables are exact, or until the kill), and the run's answered
  events per CPU second of all learners (``bench_learner``'s events);
- replica Bigtable reads/s: counts rows read by the follower's scans (/loop) and the cache's misses and refreshes
  (/metrics), per replica over the load, the restarted replica's start scan included;
- freshness: p50, p95 and max of the probes' lags.

    PYTHONPATH=$PWD python -m benchmarks.bench_scale [--replicas 6] [--learners 3] [--duration 30] [--rate 80]
                                                     [--answers 20000] [--json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from benchmarks import bench_fleet, bench_service
from benchmarks.scale import ScaleConfig, run


def print_report(result: dict[str, Any]) -> None:
    env, load, config = result["environment"], result["load"], result["config"]
    print(f"{env['cpu']} ({env['cpus_available']} cpus; {env['simd']}), {env['python']}")
    print(
        f"{config['replicas']} replicas, {config['learners']} learners; {load['answers']:,} answers in "
        f"{load['load_s']:.0f} s ({load['answers_per_s']:.0f}/s), {config['candidates']} Zipf candidates of "
        f"{config['arms']:,} arms, top_k {config['top_k']}; {load['rewards_accepted']:,} rewards accepted; "
        f"faults at {', '.join(f'{k} {v:.0f} s' for k, v in load['faults_s'].items())}"
    )
    print(f"statuses: {load['statuses']}; duplicates not answered duplicate: {len(load['duplicates_wrong'])}")
    restart = result["restart"]
    print(
        f"{restart['replica']} stopped by SIGTERM in {restart['stop_s']:.1f} s (exit {restart['exit_code']}); "
        f"start {load['start_s']:.0f} s, load {load['load_s']:.0f} s, convergence and checks {load['check_s']:.0f} s"
    )
    print("exact counts, seconds after the load to the truth: in the node table (answers), then in every /arms/{id}")
    print(
        f"{'replica':12} {'differing: node':>16} {'/arms':>6} {'segment node':>13} {'/arms?segment':>14} "
        f"{'node s':>7} {'/arms s':>8} {'Bigtable rows/s':>16}"
    )
    for name, exact in result["exact"].items():
        node_s, arms_s = (("-" if t is None else f"{t:.1f}") for t in (exact["node_s"], exact["arms_s"]))
        reads = result["reads"][name]["rows_per_s"]
        print(
            f"{name:12} {exact['node_differing']:16,} {exact['arms_differing']:6,} "
            f"{exact['segment_node_differing']:13,} {exact['segment_arms_differing']:14,} {node_s:>7} {arms_s:>8} "
            f"{reads:16,.1f}"
        )
    rows = result["rows"]
    print(
        f"largest arm row: {rows['max_arm_row_cells']:,} cells ({rows['max_arm_row']}, "
        f"{rows['max_arm_row_impressions']:,} impressions); {rows['arm_rows']:,} arm rows, "
        f"{rows['arm_cells']:,} cells; {rows['segment_rows']:,} segment rows ({load['segment_pairs_answered']:,} "
        f"(segment, arm) pairs answered), at most {rows['max_segment_row_cells']} cells; fleet rows "
        f"{rows['fleet_rows']} with {rows['fleet_row_cells']} cells"
    )
    print(f"{'learner':12} {'applied':>9} {'CPU s':>7} {'wall s':>7} {'applied/CPU s':>14}")
    for name, learner in result["learners"].items():
        mark = " (killed)" if learner.get("killed") else ""
        wall = f"{learner['wall_s']:7.1f}" if "wall_s" in learner else " " * 7
        print(
            f"{name:12} {learner['applied']:9,} {learner['cpu_s']:7.1f} {wall} {learner['applied_per_cpu_s']:14,.0f}"
            f"{mark}"
        )
    print(f"answered events per learner CPU second, all learners: {result['learners']['all']['events_per_cpu_s']:,.0f}")
    f = result["freshness"]
    if f["n"]:
        print(
            f"freshness, 202 -> every replica's /arms: n {f['n']}, p50 {f['p50_s']:.3f} s, p95 {f['p95_s']:.3f} s, "
            f"max {f['max_s']:.3f} s, lost {f['lost']}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ScaleConfig()
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--learners", type=int, default=defaults.learners)
    parser.add_argument("--answers", type=int, default=defaults.answers, help="/predict requests at most")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds of load at most")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="/predict requests per second")
    parser.add_argument("--arms", type=int, default=defaults.arms)
    parser.add_argument("--candidates", type=int, default=defaults.candidates)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--reward-fraction", type=float, default=defaults.reward_fraction)
    parser.add_argument("--duplicate-fraction", type=float, default=defaults.duplicate_fraction)
    parser.add_argument("--segments", type=int, default=defaults.segments, help="segments answers rank within; 0: none")
    parser.add_argument("--segment-fraction", type=float, default=defaults.segment_fraction)
    parser.add_argument("--emulator-cpus", default="0", help="cores of both emulators")
    parser.add_argument("--learner-cpus", default="0", help="cores of the learners")
    parser.add_argument("--replica-cpus", default="1", help="cores of the replicas")
    parser.add_argument("--client-cpus", default="1", help="cores of this process (the load)")
    parser.add_argument("--setup-args", default="", help="extra flags for `mab-service setup`")
    parser.add_argument("--learner-args", default="", help="extra flags for `mab-service learn`")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = ScaleConfig(
        replicas=args.replicas,
        learners=args.learners,
        answers=args.answers,
        duration_s=args.duration,
        rate=args.rate,
        arms=args.arms,
        candidates=args.candidates,
        top_k=args.top_k,
        reward_fraction=args.reward_fraction,
        duplicate_fraction=args.duplicate_fraction,
        segments=args.segments,
        segment_fraction=args.segment_fraction,
        replica_cpus=args.replica_cpus,
        learner_cpus=args.learner_cpus,
        setup_args=tuple(args.setup_args.split()),
        learner_args=tuple(args.learner_args.split()),
    )
    os.sched_setaffinity(0, bench_service.cpu_set(args.client_cpus))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        with (
            bench_fleet.emulator("bigtable", "BIGTABLE_EMULATOR_HOST", args.emulator_cpus, work / "bigtable.log"),
            bench_fleet.emulator("pubsub", "PUBSUB_EMULATOR_HOST", args.emulator_cpus, work / "pubsub.log"),
        ):
            result = run(config, work)
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(result)


if __name__ == "__main__":
    main()
