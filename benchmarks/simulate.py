"""Learning simulator: cumulative regret of the live service against MABWiser, bayesianbandits and random ranking.

    python -m benchmarks.simulate [--env stationary|segments|drift] [--arms 100] [--top-k 5] [--delay 20]
                                  [--rounds N] [--seeds 5] [--rates beta:0.6,15] [--policies P,...]
                                  [--server-cpus 1 | --cores 0,1] [--plot PNG | --no-plot] [--json PATH]
                                  [--versions]
        segments: [--segments 20] [--zipf 1] [--logit-sd 1] [--segment-prior-weight 10]
        drift:    [--period 5000] [--half-life 1000] [--rounds-per-s 100] [--prior 1,19]

``--env stationary`` (the default) is described here; ``segments`` and ``drift`` (issue 20) in
benchmarks/scenarios.py and benchmarks/environments.py. Each prints its ratios against its targets.

The environment of a replication (one seed) is N arms with hidden click rates drawn from a Beta distribution
(by default Beta(0.6, 15): median 2%, mean 4%, a few arms at 15-35%), and, drawn in advance, the click outcome
of every arm in every round, so that every policy meets the same clicks when it shows the same arm in the same
round (common random numbers: the comparison between policies is much less noisy than each policy's regret).

Each round, one decision: the policy ranks all N arms (Beta(1, 1) prior each), the client shows the top k and
draws their clicks; the clicks are delivered to the policy D rounds later (before the decision of round t + D + 1),
for the service as ``POST /reward`` (reward 1.0) for that answer's event_id. Regret of a round is the sum of the
k best rates minus the sum of the rates of the k arms shown; the figure is its cumulative sum over rounds.

The service is started once per replication with a fresh ``--state-dir`` on a catalogue of the N arms at
alpha = beta = 1, pinned with taskset to ``--server-cpus``. Decisions per second per core: for the in-process
policies, rounds per CPU-second spent in their decide and learn calls; for the service, rounds per CPU-second of
the server's processes (read from /proc; it includes the /reward calls and the loop's own work), with the client's
CPU per round (HTTP and JSON, in this process) reported beside it. ``--cores 0,1`` runs the seeds side by side, one
process per core taking seeds in turn (seed i on the i-th core modulo their number), each pinned with its services to
its core: the same runs as one core in turn, in less wall time, for worlds whose service is paced (drift).

The policies are described in benchmarks/bandits.py; ``numpy`` and ``numpy-outcomes`` are one sampler counting as the
service does (the impression at once, the click when delivered) and as the libraries do (the outcome when delivered),
so ``--policies numpy,numpy-outcomes --delay D`` shows what that rule costs at a delay of D rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import bandits, bench_service, extras
from benchmarks.environments import Environment as Environment, World  # Environment: the stationary world
from benchmarks.scenarios import (
    DEFAULT_ROUNDS,
    DRIFT_PRIOR,
    FLAT_PRIOR,
    PLAIN_SERVICE,
    SCENARIOS,
    STATIONARY_LOCAL,
    UNPACED,
    LocalFactory,
    Plan,
    Schedule,
    Service,
)
from benchmarks.simulate_report import (
    Run,
    environment,
    plot_regret,
    print_table,
    ratios,
    summarize,
    targets,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLOT = REPO_ROOT / "docs" / "learning" / "regret.png"
#: Library -> the policies that need it installed.
LIBRARY_POLICIES = {"mabwiser": {"mabwiser", "mabwiser-segments"}, "bayesianbandits": {"bayesianbandits"}}


def simulate(
    policy: bandits.Policy, env: World, k: int, delay: int, schedule: Schedule = UNPACED
) -> tuple[np.ndarray, int, float, float]:
    """Run ``policy`` for every round of ``env``, each round started when ``schedule`` allows.

    Returns:
        Per-round regret, total clicks, CPU seconds inside the policy's calls, wall seconds of the loop.
    """
    rounds = env.clicks.shape[0]
    regret = np.empty(rounds)
    pending: deque[tuple[int, np.ndarray, np.ndarray]] = deque()
    total_clicks = 0
    cpu = 0.0
    wall_start = time.perf_counter()
    for t in range(rounds):
        schedule.wait(t)
        started = time.process_time()
        while pending and pending[0][0] + delay < t:
            done, shown_then, clicked_then = pending.popleft()
            policy.learn(done, shown_then, clicked_then)
        shown = policy.choose(t, k)
        cpu += time.process_time() - started
        if len(shown) != k or len(np.unique(shown)) != k:
            raise bandits.ServiceError(
                f"{policy.name} showed {shown.tolist()} in round {t}; expected {k} distinct arms"
            )
        clicked = env.clicks[t, shown]
        total_clicks += int(clicked.sum())
        regret[t] = env.best_at(t) - float(env.rates_at(t)[shown].sum())
        pending.append((t, shown, clicked))
    # Feedback still in flight when the rounds end is delivered too, so every click reaches the policy (and the
    # service's counts can be checked against the simulator's).
    started = time.process_time()
    while pending:
        policy.learn(*pending.popleft())
    cpu += time.process_time() - started
    return regret, total_clicks, cpu, time.perf_counter() - wall_start


def run_local(
    name: str, env: World, k: int, delay: int, seed: int, local: Mapping[str, LocalFactory] = STATIONARY_LOCAL
) -> Run:
    """One in-process policy on one replication (``local`` maps its name to its factory)."""
    policy = local[name](env, seed)
    try:
        regret, clicks, cpu, wall = simulate(policy, env, k, delay)
    finally:
        policy.close()
    return Run(name, seed, regret, clicks, cpu, wall)


def arm_ids(n_arms: int) -> list[str]:
    return [f"arm{i}" for i in range(n_arms)]


def write_catalogue(path: Path, ids: Sequence[str], prior: tuple[float, float] = FLAT_PRIOR) -> Path:
    """A CSV feature table holding every arm at the shared prior (alpha, beta)."""
    rows = "".join(f"{arm_id},{prior[0]:g},{prior[1]:g}\n" for arm_id in ids)
    path.write_text("entity_id,alpha,beta\n" + rows, encoding="ascii")
    return path


def service_argv(port: int, catalogue: Path, state_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The service through its own CLI, learning on (the default), one worker, plus ``extra`` flags."""
    return [
        sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--features", f"csv:{catalogue}", "--state-dir", str(state_dir), "--log-format", "text", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def running_service(
    n_arms: int,
    server_cpus: str,
    workdir: Path,
    prior: tuple[float, float] = FLAT_PRIOR,
    server_args: Sequence[str] = (),
) -> Iterator[tuple[int, int]]:
    """Start a fresh service (new state directory) on a catalogue of ``n_arms`` arms at ``prior``, with
    ``server_args`` added to its command line; yield (port, pid).

    The process group is stopped on exit (bench_service.running_server).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    catalogue = write_catalogue(workdir / "arms.csv", arm_ids(n_arms), prior)
    state_dir = workdir / "state"
    port = bench_service.free_port()
    argv = service_argv(port, catalogue, state_dir, server_args)
    with bench_service.running_server(argv, port, server_cpus, workdir / "service.log") as proc:
        yield port, proc.pid


def run_service(
    env: World,
    k: int,
    delay: int,
    seed: int,
    server_cpus: str,
    workdir: Path,
    name: str = "service",
    service: Service = PLAIN_SERVICE,
    prior: tuple[float, float] = FLAT_PRIOR,
) -> Run:
    """The live service (run as ``service`` says) on one replication, its counts checked afterwards."""
    n_arms = env.clicks.shape[1]
    with running_service(n_arms, server_cpus, workdir, prior, service.server_args) as (port, pid):
        policy = service.client(port, arm_ids(n_arms), seed, env)
        schedule = service.schedule()
        try:
            policy.request("POST", "/predict", {"user_id": "warm-up", "candidates": ["warm-up"], "top_k": 1})
            cpu_before = bench_service.session_cpu_seconds(pid)
            regret, clicks, cpu, wall = simulate(policy, env, k, delay, schedule)
            server_cpu = bench_service.session_cpu_seconds(pid) - cpu_before
            checks = service_checks(policy, len(regret) * k + 1, clicks, schedule)
        finally:
            policy.close()
    return Run(name, seed, regret, clicks, cpu, wall, server_cpu, checks)


def service_checks(
    policy: bandits.ServicePolicy, impressions: int, clicks: int, schedule: Schedule = UNPACED
) -> dict[str, Any]:
    """What the service counted (``GET /loop``, and the policy's own per-arm comparisons) beside what the simulator
    sent, and how well the schedule was kept; ``ok`` if all agree."""
    status, loop = policy.request("GET", "/loop")
    if status != 200 or not isinstance(loop, dict):
        raise bandits.ServiceError(f"GET /loop answered {status}: {str(loop)[:300]}")
    counted = {
        "impressions_total": loop.get("impressions_total"),
        "rewards_accepted": loop.get("rewards_accepted"),
        "refusals": loop.get("refusals"),
    }
    expected = {"impressions_total": impressions, "rewards_accepted": clicks}
    ok = all(counted[key] == value for key, value in expected.items()) and policy.rewards_posted == clicks
    out = {"counted": counted, "expected": expected, "rewards_posted": policy.rewards_posted}
    arms = policy.counts_checks()
    clock = schedule.checks()
    ok = ok and not arms.get("segment_mismatches") and clock.get("ok", True)
    return {"ok": ok, **out, **arms, **({"clock": clock} if clock else {})}


# --- CLI ------------------------------------------------------------------------------------------------------


def pair(value: str) -> tuple[float, float]:
    """``A,B``: two positive numbers (an argparse type)."""
    try:
        a, b = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A,B such as 1,19, got {value!r}") from None
    if not (a > 0 and b > 0):
        raise argparse.ArgumentTypeError(f"expected A,B with A, B > 0, got {value!r}")
    return a, b


def rate_shape(value: str) -> tuple[float, float]:
    """``beta:A,B``: click rates drawn from Beta(A, B) (an argparse type)."""
    kind, _, params = value.partition(":")
    if kind != "beta":
        raise argparse.ArgumentTypeError(f"expected beta:A,B such as beta:0.6,15, got {value!r}")
    return pair(params)


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` that is > 0."""

    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
        return number

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--env", choices=list(SCENARIOS), default="stationary", help="the world simulated (default stationary)"
    )
    parser.add_argument("--arms", type=int, default=100, help="arms N, all candidates in every round (default 100)")
    parser.add_argument("--top-k", type=int, default=5, help="arms shown per round (default 5)")
    parser.add_argument("--delay", type=int, default=20, help="rounds before a round's clicks arrive (default 20)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="decisions per replication (default "
        + ", ".join(f"{n:,} {env}" for env, n in DEFAULT_ROUNDS.items())
        + ")",
    )
    parser.add_argument("--seeds", type=int, default=5, help="replications, seeds 0..N-1 (default 5)")
    parser.add_argument(
        "--rates", type=rate_shape, default=(0.6, 15.0), help="click-rate distribution, beta:A,B (default beta:0.6,15)"
    )
    parser.add_argument(
        "--policies",
        help="comma-separated, from the environment's (default: all but numpy-outcomes; stationary: "
        f"{','.join(bandits.POLICIES)}; segments and drift: see the docstring)",
    )
    segments = parser.add_argument_group("--env segments")
    segments.add_argument("--segments", type=int, default=20, help="segments (default 20)")
    segments.add_argument(
        "--zipf", type=positive(float), default=1.0, help="segment s gets traffic ~ (s+1)^-EXP (default 1)"
    )
    segments.add_argument(
        "--logit-sd", type=positive(float), default=1.0, help="sd of a segment's logit perturbation (default 1)"
    )
    segments.add_argument(
        "--segment-prior-weight", type=positive(float), default=10.0, help="m of the back-off (default 10)"
    )
    drift = parser.add_argument_group("--env drift")
    drift.add_argument(
        "--period", type=int, default=5000, help="rounds between re-dealings of the rates (default 5000)"
    )
    drift.add_argument("--half-life", type=positive(float), default=1000.0, help="H in rounds (default 1000)")
    drift.add_argument(
        "--rounds-per-s", type=positive(float), default=100.0, help="pace of the service's rounds (default 100)"
    )
    drift.add_argument("--prior", type=pair, help="every arm's Beta prior, A,B (default 1,19)")
    parser.add_argument(
        "--server-cpus", type=bench_service.cpu_list, default="1", help="cores the service is pinned to (default 1)"
    )
    parser.add_argument(
        "--cores",
        type=bench_service.cpu_set,
        help="run the seeds side by side on these cores (e.g. 0,1), each seed and its services pinned to one",
    )
    parser.add_argument("--plot", type=Path, help=f"PNG to write (default {DEFAULT_PLOT}, or regret-ENV.png beside it)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--versions", action="store_true", help="print machine and package versions and exit")
    args = parser.parse_args(argv)
    if args.prior is not None and args.env != "drift":
        parser.error("--prior is for --env drift: the libraries of the other environments start at Beta(1, 1)")
    args.prior = args.prior or DRIFT_PRIOR
    if args.rounds is None:
        args.rounds = DEFAULT_ROUNDS[args.env]
    if args.plot is None:
        args.plot = DEFAULT_PLOT if args.env == "stationary" else DEFAULT_PLOT.with_name(f"{args.env}.png")
    if not 1 <= args.top_k <= args.arms:
        parser.error(f"--top-k must be in [1, --arms={args.arms}], got {args.top_k}")
    for name in ("delay", "rounds", "seeds", "segments", "period"):
        if getattr(args, name) < (0 if name == "delay" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'delay' else 1}, got {getattr(args, name)}")
    plan = SCENARIOS[args.env](args)
    if args.policies is None:
        args.policies = list(plan.default_policies)
    else:
        args.policies = [n.strip() for n in args.policies.split(",") if n.strip()]
        unknown = [n for n in args.policies if n not in plan.policies]
        if unknown or not args.policies:
            parser.error(f"unknown policies {unknown} for --env {args.env}; expected some of {list(plan.policies)}")
    args.plan = plan
    return args


#: What a core's process sends back: its core, and its runs per seed or the text of the error that stopped it.
CoreResult = tuple[int, list[dict[str, Run]] | str]


def run_seed(args: argparse.Namespace, seed: int, workdir: Path, server_cpus: str) -> dict[str, Run]:
    """Every policy on replication ``seed``, the services pinned to ``server_cpus``."""
    plan: Plan = args.plan
    env = plan.draw(seed)
    groups = plan.groups(env)
    runs: dict[str, Run] = {}
    for name in args.policies:
        print(f"[seed {seed}] {name} ...", file=sys.stderr, flush=True)
        if name in plan.services:
            service = plan.services[name]
            where = workdir / f"{name}-{seed}"
            r = run_service(env, args.top_k, args.delay, seed, server_cpus, where, name, service, plan.prior)
        else:
            r = run_local(name, env, args.top_k, args.delay, seed, plan.local)
        r.regret_by_group = {group: float(r.regret[mask].sum()) for group, mask in groups.items()}
        runs[name] = r
        print(
            f"[seed {seed}] {name}: regret {r.final_regret:,.1f}, {r.decisions_per_core_s:,.0f} decisions/s/core",
            file=sys.stderr,
            flush=True,
        )
    return runs


def _run_on_core(
    args: argparse.Namespace,
    seeds: Sequence[int],
    workdir: Path,
    core: int,
    results: SimpleQueue[CoreResult],
) -> None:
    """``run_seed`` for each of ``seeds`` in this process pinned to ``core``, its services too; puts (core, runs per
    seed) on ``results``, or (core, the error's text) if one failed."""
    os.sched_setaffinity(0, {core})
    try:
        results.put((core, [run_seed(args, seed, workdir, str(core)) for seed in seeds]))
    except BaseException as exc:  # the parent reports it; a child's traceback alone would be lost in the output
        results.put((core, f"{type(exc).__name__}: {exc}"))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every policy on every replication; returns the results document (``--json``)."""
    plan: Plan = args.plan
    seeds = range(args.seeds)
    if args.cores:
        cores = sorted(args.cores)
        # Forked: a child inherits the parsed arguments and the plan's factories, which do not pickle (closures).
        context = multiprocessing.get_context("fork")
        results: SimpleQueue[CoreResult] = context.SimpleQueue()
        children = [
            context.Process(target=_run_on_core, args=(args, seeds[j :: len(cores)], workdir, core, results))
            for j, core in enumerate(cores)
        ]
        for child in children:
            child.start()
        done = dict(results.get() for _ in children)
        for child in children:
            child.join()
        by_core = {core: out for core, out in done.items() if not isinstance(out, str)}
        if len(by_core) != len(cores):
            raise RuntimeError(f"seeds failed: {[out for out in done.values() if isinstance(out, str)]}")
        per_seed = [by_core[cores[seed % len(cores)]][seed // len(cores)] for seed in seeds]
    else:
        per_seed = [run_seed(args, seed, workdir, args.server_cpus) for seed in seeds]
    runs = {name: [seed_runs[name] for seed_runs in per_seed] for name in args.policies}
    summary = {name: summarize(rs) for name, rs in runs.items()}
    config = {
        "env": args.env,
        "arms": args.arms,
        "top_k": args.top_k,
        "delay": args.delay,
        "rounds": args.rounds,
        "seeds": list(range(args.seeds)),
        "rates": list(args.rates),
        "server_cpus": args.server_cpus,
        "cores": sorted(args.cores) if args.cores else None,
        "prior": list(plan.prior),
        "title": plan.title,
        "marks": list(plan.marks),
        **plan.config,
    }
    return {
        "environment": environment(),
        "config": config,
        "policies": summary,
        "ratios": ratios(summary),
        "targets": targets(summary, plan),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulation; returns the process exit code (1 if the service's counts disagree with the simulator's)."""
    args = parse_args(argv)
    if args.versions:
        print(orjson.dumps(environment(), option=orjson.OPT_INDENT_2).decode())
        return 0
    libraries = [lib for lib, names in LIBRARY_POLICIES.items() if names & set(args.policies)]
    extras.ensure(libraries + ([] if args.no_plot else ["matplotlib"]))
    with tempfile.TemporaryDirectory(prefix="simulate-") as tmp:
        doc = run(args, Path(tmp))
    print_table(doc)
    if args.json:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    if not args.no_plot:
        print(f"plot: {plot_regret(doc, args.plot)}")
    checks = [c for res in doc["policies"].values() for c in res.get("checks", [])]
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
