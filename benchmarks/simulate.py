"""Learning simulator: cumulative regret of the live service against MABWiser, bayesianbandits and random ranking.

    python -m benchmarks.simulate [--arms 100] [--top-k 5] [--delay 20] [--rounds 5000] [--seeds 5]
                                  [--rates beta:0.6,15] [--policies service,mabwiser,bayesianbandits,numpy,random]
                                  [--server-cpus 1] [--plot docs/learning/regret.png] [--json PATH] [--versions]

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
CPU per round (HTTP and JSON, in this process) reported beside it.

The policies are described in benchmarks/bandits.py; ``numpy`` and ``numpy-outcomes`` are one sampler counting as the
service does (the impression at once, the click when delivered) and as the libraries do (the outcome when delivered),
so ``--policies numpy,numpy-outcomes --delay D`` shows what that rule costs at a delay of D rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import bandits, bench_service, extras

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLOT = REPO_ROOT / "docs" / "learning" / "regret.png"
#: Points kept per cumulative-regret curve in the JSON output and the plot.
CURVE_POINTS = 500
#: The libraries the service's regret is compared with (issue 12: within 10% of theirs).
LIBRARIES = ("mabwiser", "bayesianbandits")

STYLES: dict[str, dict[str, Any]] = {
    "service": {"label": "mab_service over HTTP", "color": "#1f77b4"},
    "mabwiser": {"label": "MABWiser ThompsonSampling", "color": "#ff7f0e"},
    "bayesianbandits": {"label": "bayesianbandits Agent + ThompsonSampling", "color": "#2ca02c"},
    "numpy": {"label": "numpy Beta-Bernoulli TS (service's counting)", "color": "#9467bd", "linestyle": "--"},
    "numpy-outcomes": {"label": "numpy Beta-Bernoulli TS (libraries' counting)", "color": "#8c564b", "linestyle": ":"},
    "random": {"label": "random ranking", "color": "#7f7f7f"},
}


@dataclass(frozen=True)
class Environment:
    """One replication's world: hidden click rates and every click outcome, fixed in advance.

    Attributes:
        rates: Click probability of each arm, shape (n_arms,).
        clicks: ``clicks[t, i]`` is whether arm i is clicked if shown in round t, shape (rounds, n_arms).
        best: Sum of the k largest rates: the expected clicks per round of the best possible ranking.
    """

    rates: np.ndarray
    clicks: np.ndarray
    best: float

    @classmethod
    def draw(cls, n_arms: int, rounds: int, k: int, rate_shape: tuple[float, float], seed: int) -> Environment:
        """Draw replication ``seed``'s environment; its streams are independent of every policy's."""
        rates = np.random.default_rng([seed, 0]).beta(*rate_shape, size=n_arms)
        clicks = np.random.default_rng([seed, 1]).random((rounds, n_arms), dtype=np.float32) < rates
        return cls(rates, clicks, float(np.sort(rates)[-k:].sum()))


@dataclass
class Run:
    """One policy on one replication."""

    policy: str
    seed: int
    regret: np.ndarray
    """Per-round regret, shape (rounds,)."""
    clicks: int
    policy_cpu_s: float
    """CPU time of this process inside the policy's choose/learn calls (for the service: the HTTP client)."""
    wall_s: float
    server_cpu_s: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def final_regret(self) -> float:
        return float(self.regret.sum())

    @property
    def decisions_per_core_s(self) -> float:
        """Rounds per CPU-second of whatever decides and learns: the server for the service, else the policy."""
        cpu = self.server_cpu_s if self.server_cpu_s is not None else self.policy_cpu_s
        return len(self.regret) / max(cpu, 1e-9)


def simulate(policy: bandits.Policy, env: Environment, k: int, delay: int) -> tuple[np.ndarray, int, float, float]:
    """Run ``policy`` for every round of ``env``.

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
        regret[t] = env.best - float(env.rates[shown].sum())
        pending.append((t, shown, clicked))
    # Feedback still in flight when the rounds end is delivered too, so every click reaches the policy (and the
    # service's counts can be checked against the simulator's).
    started = time.process_time()
    while pending:
        policy.learn(*pending.popleft())
    cpu += time.process_time() - started
    return regret, total_clicks, cpu, time.perf_counter() - wall_start


def run_local(name: str, env: Environment, k: int, delay: int, seed: int) -> Run:
    """One in-process policy on one replication."""
    policy = bandits.LOCAL_POLICIES[name](len(env.rates), seed)
    try:
        regret, clicks, cpu, wall = simulate(policy, env, k, delay)
    finally:
        policy.close()
    return Run(name, seed, regret, clicks, cpu, wall)


def arm_ids(n_arms: int) -> list[str]:
    return [f"arm{i}" for i in range(n_arms)]


def write_catalogue(path: Path, ids: Sequence[str]) -> Path:
    """A CSV feature table holding every arm at the shared prior (alpha = beta = 1)."""
    rows = "".join(f"{arm_id},{bandits.PRIOR_ALPHA:g},{bandits.PRIOR_BETA:g}\n" for arm_id in ids)
    path.write_text("entity_id,alpha,beta\n" + rows, encoding="ascii")
    return path


def service_argv(port: int, catalogue: Path, state_dir: Path) -> list[str]:
    """The service through its own CLI, learning on (the default), one worker."""
    return [
        sys.executable, "-m", "mab_service", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--features", f"csv:{catalogue}", "--state-dir", str(state_dir), "--log-format", "text",
    ]  # fmt: skip


@contextlib.contextmanager
def running_service(n_arms: int, server_cpus: str, workdir: Path) -> Iterator[tuple[int, int]]:
    """Start a fresh service (new state directory) on a catalogue of ``n_arms`` arms; yield (port, pid).

    The process group is stopped on exit (bench_service.running_server).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    catalogue = write_catalogue(workdir / "arms.csv", arm_ids(n_arms))
    state_dir = workdir / "state"
    port = bench_service.free_port()
    argv = service_argv(port, catalogue, state_dir)
    with bench_service.running_server(argv, port, server_cpus, workdir / "service.log") as proc:
        yield port, proc.pid


def run_service(env: Environment, k: int, delay: int, seed: int, server_cpus: str, workdir: Path) -> Run:
    """The live service on one replication, with its counts checked against the simulator's afterwards."""
    n_arms = len(env.rates)
    with running_service(n_arms, server_cpus, workdir) as (port, pid):
        policy = bandits.ServicePolicy(port, arm_ids(n_arms), seed)
        try:
            policy.request("POST", "/predict", {"user_id": "warm-up", "candidates": ["warm-up"], "top_k": 1})
            cpu_before = bench_service.session_cpu_seconds(pid)
            regret, clicks, cpu, wall = simulate(policy, env, k, delay)
            server_cpu = bench_service.session_cpu_seconds(pid) - cpu_before
            checks = service_checks(policy, len(regret) * k + 1, clicks)
        finally:
            policy.close()
    return Run("service", seed, regret, clicks, cpu, wall, server_cpu, checks)


def service_checks(policy: bandits.ServicePolicy, impressions: int, clicks: int) -> dict[str, Any]:
    """What the service counted (``GET /loop``) beside what the simulator sent; ``ok`` if they agree."""
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
    return {"ok": ok, "counted": counted, "expected": expected, "rewards_posted": policy.rewards_posted}


# --- reporting ------------------------------------------------------------------------------------------------


def curve_summary(runs: Sequence[Run], points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """Mean, min and max over seeds of the cumulative regret, at up to ``points`` rounds (the last included)."""
    cumulative = np.stack([np.cumsum(r.regret) for r in runs])
    rounds = cumulative.shape[1]
    at = np.unique(np.linspace(0, rounds - 1, min(points, rounds)).round().astype(int))
    return {
        "round": (at + 1).tolist(),
        "mean": cumulative[:, at].mean(axis=0).tolist(),
        "min": cumulative[:, at].min(axis=0).tolist(),
        "max": cumulative[:, at].max(axis=0).tolist(),
    }


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """Figures of one policy over its seeds."""
    finals = np.array([r.final_regret for r in runs])
    rounds = sum(len(r.regret) for r in runs)
    policy_cpu = sum(r.policy_cpu_s for r in runs)
    out: dict[str, Any] = {
        "final_regret_mean": float(finals.mean()),
        "final_regret_sd": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "final_regret_per_seed": finals.tolist(),
        "clicks_per_round": sum(r.clicks for r in runs) / rounds,
        "decisions_per_core_s": rounds / max(sum(r.server_cpu_s or r.policy_cpu_s for r in runs), 1e-9),
        "decisions_per_core_s_per_seed": [r.decisions_per_core_s for r in runs],
        "policy_cpu_us_per_decision": 1e6 * policy_cpu / rounds,
        "decisions_per_wall_s": rounds / sum(r.wall_s for r in runs),
        "curve": curve_summary(runs),
    }
    if any(r.server_cpu_s is not None for r in runs):
        out["server_cpu_us_per_decision"] = 1e6 * sum(r.server_cpu_s or 0.0 for r in runs) / rounds
        out["checks"] = [r.checks for r in runs]
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Service / library: of the mean final regrets (with its standard error over seeds, the two taken as
    independent), the range of the per-seed ratios (paired: same environment and clicks), and of decisions/s/core."""
    out: dict[str, dict[str, float]] = {}
    if "service" not in summary:
        return out
    mine = np.array(summary["service"]["final_regret_per_seed"])
    for lib in LIBRARIES:
        if lib not in summary:
            continue
        theirs = np.array(summary[lib]["final_regret_per_seed"])
        per_seed = mine / theirs
        ratio = float(mine.mean() / theirs.mean())
        out[lib] = {
            "regret_ratio": ratio,
            "regret_ratio_se": ratio * float(np.hypot(_relative_se(mine), _relative_se(theirs))),
            "regret_ratio_per_seed_min": float(per_seed.min()),
            "regret_ratio_per_seed_max": float(per_seed.max()),
            "decisions_per_core_s_ratio": summary["service"]["decisions_per_core_s"]
            / summary[lib]["decisions_per_core_s"],
        }
    return out


def _relative_se(values: np.ndarray) -> float:
    """Standard error of the mean over seeds, relative to the mean (0 for a single seed)."""
    if len(values) < 2:
        return 0.0
    return float(values.std(ddof=1) / np.sqrt(len(values)) / values.mean())


def environment() -> dict[str, Any]:
    """Machine, Python and package versions, with the two libraries'."""
    env = bench_service.environment()
    env.pop("wrk", None)
    for name in ("mabwiser", "bayesianbandits", "scikit-learn", "scipy"):
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    return env


def title(config: dict[str, Any]) -> str:
    a, b = config["rates"]
    return (
        f"{config['arms']} arms, click rates ~ Beta({a:g}, {b:g}); top {config['top_k']} shown per round; "
        f"clicks delivered {config['delay']} rounds later; {len(config['seeds'])} seeds (band: min-max)"
    )


def plot_regret(doc: dict[str, Any], path: Path) -> Path:
    """Mean cumulative regret against rounds, one line per policy, with the min-max band over seeds.

    Two panels: every policy, and the learning ones alone (random ranking left out) on their own scale.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    learners = [name for name in doc["policies"] if name != "random"]
    panels = [list(doc["policies"])] + ([learners] if "random" in doc["policies"] and learners else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), constrained_layout=True, squeeze=False)
    for ax, names in zip(axes[0], panels):
        for name in names:
            res = doc["policies"][name]
            curve = res["curve"]
            style = STYLES.get(name, {"label": name})
            label = f"{style['label']}: {res['final_regret_mean']:,.0f}"
            ax.plot(curve["round"], curve["mean"], linewidth=1.8, **(style | {"label": label}))
            band = {"color": style.get("color"), "alpha": 0.15, "linewidth": 0}
            ax.fill_between(curve["round"], curve["min"], curve["max"], **band)
        ax.set_xlabel("round (one decision)")
        ax.set_ylabel("cumulative regret (expected clicks lost)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(title="mean final regret", loc="upper left", fontsize=8)
    if len(panels) == 2:
        axes[0][1].set_title("without random ranking", fontsize=9)
    fig.suptitle(title(doc["config"]), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(doc: dict[str, Any]) -> None:
    env, config = doc["environment"], doc["config"]
    print(f"# {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs; {env['python']}")
    print(f"# {title(config)}; {config['rounds']:,} rounds")
    if "service" in doc["policies"]:
        print(f"# service: 1 worker pinned to cpu {config['server_cpus']}, one keep-alive HTTP connection on loopback")
    header = ("policy", "final regret", "sd", "clicks/round", "decisions/s/core", "us/decision", "decisions/s wall")
    rows = [header]
    for name, res in doc["policies"].items():
        cost = res.get("server_cpu_us_per_decision", res["policy_cpu_us_per_decision"])
        rows.append(
            (
                name,
                f"{res['final_regret_mean']:,.1f}",
                f"{res['final_regret_sd']:,.1f}",
                f"{res['clicks_per_round']:.3f}",
                f"{res['decisions_per_core_s']:,.0f}",
                f"{cost:,.0f}",
                f"{res['decisions_per_wall_s']:,.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    service = doc["policies"].get("service")
    if service:
        print(
            f"service: server {service['server_cpu_us_per_decision']:,.0f} us CPU per decision (rewards included); "
            f"client {service['policy_cpu_us_per_decision']:,.0f} us per decision (HTTP + JSON, not counted above)"
        )
        bad = [c for c in service["checks"] if not c["ok"]]
        print(f"service counts vs simulator: {'all agree' if not bad else f'MISMATCH {bad}'}")
    for lib, r in doc["ratios"].items():
        print(
            f"service/{lib}: regret {r['regret_ratio']:.3f}x +- {r['regret_ratio_se']:.3f} (per seed "
            f"{r['regret_ratio_per_seed_min']:.2f}-"
            f"{r['regret_ratio_per_seed_max']:.2f}), decisions/s per core {r['decisions_per_core_s_ratio']:.1f}x"
        )


# --- CLI ------------------------------------------------------------------------------------------------------


def rate_shape(value: str) -> tuple[float, float]:
    """``beta:A,B``: click rates drawn from Beta(A, B) (an argparse type)."""
    kind, _, params = value.partition(":")
    try:
        a, b = (float(v) for v in params.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected beta:A,B such as beta:0.6,15, got {value!r}") from None
    if kind != "beta" or a <= 0 or b <= 0:
        raise argparse.ArgumentTypeError(f"expected beta:A,B with A, B > 0, got {value!r}")
    return a, b


def policy_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in bandits.POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown policies {unknown}; expected some of {list(bandits.POLICIES)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=int, default=100, help="arms N, all candidates in every round (default 100)")
    parser.add_argument("--top-k", type=int, default=5, help="arms shown per round (default 5)")
    parser.add_argument("--delay", type=int, default=20, help="rounds before a round's clicks arrive (default 20)")
    parser.add_argument("--rounds", type=int, default=5000, help="decisions per replication (default 5000)")
    parser.add_argument("--seeds", type=int, default=5, help="replications, seeds 0..N-1 (default 5)")
    parser.add_argument(
        "--rates", type=rate_shape, default=(0.6, 15.0), help="click-rate distribution, beta:A,B (default beta:0.6,15)"
    )
    parser.add_argument(
        "--policies",
        type=policy_names,
        default=list(bandits.DEFAULT_POLICIES),
        help=f"comma-separated, from {','.join(bandits.POLICIES)} (default {','.join(bandits.DEFAULT_POLICIES)})",
    )
    parser.add_argument(
        "--server-cpus", type=bench_service.cpu_list, default="1", help="cores the service is pinned to (default 1)"
    )
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"PNG to write (default {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--versions", action="store_true", help="print machine and package versions and exit")
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= args.arms:
        parser.error(f"--top-k must be in [1, --arms={args.arms}], got {args.top_k}")
    for name in ("delay", "rounds", "seeds"):
        if getattr(args, name) < (0 if name == "delay" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'delay' else 1}, got {getattr(args, name)}")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every policy on every replication; returns the results document (``--json``)."""
    runs: dict[str, list[Run]] = {name: [] for name in args.policies}
    for seed in range(args.seeds):
        env = Environment.draw(args.arms, args.rounds, args.top_k, args.rates, seed)
        for name in args.policies:
            print(f"[seed {seed}] {name} ...", end=" ", file=sys.stderr, flush=True)
            if name == "service":
                r = run_service(env, args.top_k, args.delay, seed, args.server_cpus, workdir / f"service-{seed}")
            else:
                r = run_local(name, env, args.top_k, args.delay, seed)
            runs[name].append(r)
            print(f"regret {r.final_regret:,.1f}, {r.decisions_per_core_s:,.0f} decisions/s/core", file=sys.stderr)
    summary = {name: summarize(rs) for name, rs in runs.items()}
    config = {
        "arms": args.arms,
        "top_k": args.top_k,
        "delay": args.delay,
        "rounds": args.rounds,
        "seeds": list(range(args.seeds)),
        "rates": list(args.rates),
        "server_cpus": args.server_cpus,
        "prior": [bandits.PRIOR_ALPHA, bandits.PRIOR_BETA],
    }
    return {"environment": environment(), "config": config, "policies": summary, "ratios": ratios(summary)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulation; returns the process exit code (1 if the service's counts disagree with the simulator's)."""
    args = parse_args(argv)
    if args.versions:
        print(orjson.dumps(environment(), option=orjson.OPT_INDENT_2).decode())
        return 0
    extras.ensure([name for name in LIBRARIES if name in args.policies] + ([] if args.no_plot else ["matplotlib"]))
    with tempfile.TemporaryDirectory(prefix="simulate-") as tmp:
        doc = run(args, Path(tmp))
    print_table(doc)
    if args.json:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    if not args.no_plot:
        print(f"plot: {plot_regret(doc, args.plot)}")
    checks = doc["policies"].get("service", {}).get("checks", [])
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
