"""The learning simulator's three environments (``--env``): their worlds, policies, targets and pacing.

A scenario turns the command line into a :class:`Plan`: how to draw a replication's world, the in-process policies
and the ways of running the live service it compares, the ratios it must meet, and how its plot is titled. The
simulator (benchmarks/simulate.py) runs any plan the same way.

- ``stationary`` (the default): fixed rates; the service against MABWiser, bayesianbandits and numpy.
- ``segments``: 20 segments with Zipf traffic and per-segment rates; the service with and without ``"segment"``,
  one MABWiser per segment, and the back-off rule in numpy.
- ``drift``: the rates dealt anew every ``--period`` rounds; the service with and without ``--half-life-s``,
  and discounted and plain Thompson sampling in numpy. The service forgets by wall-clock time, so its rounds with
  a half-life are paced at ``--rounds-per-s`` and the half-life in rounds is sent to it in seconds (see
  :class:`Paced`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from benchmarks import bandits
from benchmarks.environments import DriftEnvironment, Environment, SegmentsEnvironment, World

#: (world, seed) -> an in-process policy for that replication.
LocalFactory = Callable[[Any, int], bandits.Policy]
#: (port, arm ids, seed, world) -> the client of a running service.
ClientFactory = Callable[[int, list[str], int, Any], bandits.ServicePolicy]

FLAT_PRIOR = (bandits.PRIOR_ALPHA, bandits.PRIOR_BETA)


class Schedule(Protocol):
    """When the simulator's loop may start each round."""

    def wait(self, round_: int) -> None:
        """Return when round ``round_`` may start."""
        ...

    def checks(self) -> dict[str, Any]:
        """How well the schedule was kept (empty when there is none to keep)."""
        ...


class Unpaced:
    """Rounds back to back, as fast as the policy answers."""

    def wait(self, round_: int) -> None:
        pass

    def checks(self) -> dict[str, Any]:
        return {}


#: The schedule of every run that is not paced.
UNPACED = Unpaced()


@dataclass
class Paced:
    """Round t starts ``t / rounds_per_s`` seconds after round 0, never earlier.

    The service weighs an impression or a reward by its age in seconds; pacing makes that age the age in rounds
    divided by a fixed rate, so ``--half-life-s`` = H rounds / rate means the same as the numpy reference's H
    rounds, whatever the machine's speed, as long as the client keeps up with the pace. A rate well below what
    one client reaches (about 480 rounds/s on a quiet 2-core VM) leaves room for a slow spell; a round that starts
    late does not shift the later ones (they catch up), so lateness does not add up over a run. ``checks``
    reports the largest lateness, in rounds and as a share of the half-life: an age off by ``e`` seconds moves a
    weight by a factor 2^(e / H), 3.5% at 5% of H, the bound past which the run's clock is not ``ok``.

    Args:
        rounds_per_s: The pace.
        half_life_s: The service's half-life, against which lateness is judged.
    """

    rounds_per_s: float
    half_life_s: float
    _start: float | None = None
    _late_s: list[float] = field(default_factory=list)

    #: Largest lateness, as a share of the half-life, for which the run's clock is ``ok``.
    MAX_LATE_SHARE = 0.05

    def wait(self, round_: int) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now - round_ / self.rounds_per_s
        due = self._start + round_ / self.rounds_per_s
        if due > now:
            time.sleep(due - now)
        self._late_s.append(max(0.0, now - due))

    def checks(self) -> dict[str, Any]:
        late = np.array(self._late_s or [0.0])
        worst = float(late.max())
        return {
            "rounds_per_s": self.rounds_per_s,
            "late_rounds_p99": float(np.quantile(late, 0.99)) * self.rounds_per_s,
            "late_rounds_max": worst * self.rounds_per_s,
            "late_max_share_of_half_life": worst / self.half_life_s,
            "ok": worst <= self.MAX_LATE_SHARE * self.half_life_s,
        }


@dataclass(frozen=True)
class Service:
    """One way of running the live service: its extra ``serve`` flags, its client, and its schedule."""

    server_args: tuple[str, ...]
    client: ClientFactory
    schedule: Callable[[], Schedule] = lambda: UNPACED


@dataclass(frozen=True)
class Target:
    """The ratio of ``policy``'s mean final regret to ``baseline``'s must lie in [low, high]."""

    policy: str
    baseline: str
    high: float
    low: float = 0.0

    def describe(self) -> str:
        if self.low > 0:
            return f"{self.low:g}x-{self.high:g}x"
        return f"<= {self.high:g}x"

    def met(self, ratio: float) -> bool:
        return self.low <= ratio <= self.high


@dataclass(frozen=True)
class Plan:
    """Everything the simulator needs of one environment, for one command line."""

    draw: Callable[[int], World]
    local: Mapping[str, LocalFactory]
    services: Mapping[str, Service]
    default_policies: tuple[str, ...]
    targets: tuple[Target, ...]
    prior: tuple[float, float]
    config: dict[str, Any]
    """What the environment adds to the results' config (and its plot's title)."""
    title: str
    marks: tuple[int, ...] = ()
    """Rounds at which the world changes (drawn on the plot)."""
    groups: Callable[[Any], dict[str, np.ndarray]] = lambda world: {}
    """Masks over rounds within which regret is reported apart (the segments environment: busy, sparse)."""

    @property
    def policies(self) -> tuple[str, ...]:
        return (*self.services, *self.local)


def plain_client(port: int, ids: list[str], seed: int, world: Any) -> bandits.ServicePolicy:
    return bandits.ServicePolicy(port, ids, seed)


def segment_client(port: int, ids: list[str], seed: int, world: Any) -> bandits.ServicePolicy:
    return bandits.SegmentServicePolicy(port, ids, seed, world.segments)


def rates_title(args: argparse.Namespace) -> str:
    a, b = args.rates
    return (
        f"{args.arms} arms, click rates ~ Beta({a:g}, {b:g}); top {args.top_k} shown per round; "
        f"clicks delivered {args.delay} rounds later"
    )


def _of_arms(factory: Callable[[int, int], bandits.Policy]) -> LocalFactory:
    return lambda world, seed: factory(len(world.rates), seed)


#: The stationary environment's in-process policies (bandits.LOCAL_POLICIES), as (world, seed) factories.
STATIONARY_LOCAL: dict[str, LocalFactory] = {name: _of_arms(f) for name, f in bandits.LOCAL_POLICIES.items()}
#: The service as the stationary environment runs it: default flags, no segment, unpaced.
PLAIN_SERVICE = Service((), plain_client)


def stationary(args: argparse.Namespace) -> Plan:
    """Fixed click rates: the service against the libraries (issue 12: within 10% of their regret)."""
    return Plan(
        draw=lambda seed: Environment.draw(args.arms, args.rounds, args.top_k, args.rates, seed),
        local=STATIONARY_LOCAL,
        services={"service": PLAIN_SERVICE},
        default_policies=bandits.DEFAULT_POLICIES,
        targets=(Target("service", "mabwiser", 1.1), Target("service", "bayesianbandits", 1.1)),
        prior=FLAT_PRIOR,
        config={},
        title=rates_title(args),
    )


def segments(args: argparse.Namespace) -> Plan:
    """Per-segment rates with Zipf traffic: the back-off against no segments and against one bandit per segment."""
    m = args.segment_prior_weight
    return Plan(
        draw=lambda seed: SegmentsEnvironment.draw(
            args.arms,
            args.rounds,
            args.top_k,
            args.rates,
            seed,
            n_segments=args.segments,
            zipf_exponent=args.zipf,
            logit_sd=args.logit_sd,
        ),
        local={
            "mabwiser-segments": lambda world, seed: bandits.MabwiserPerSegment(len(world.rates), seed, world.segments),
            "numpy-backoff": lambda world, seed: bandits.NumpyBackoff(len(world.rates), seed, world.segments, m),
            "numpy": lambda world, seed: bandits.NumpyThompson(len(world.rates), seed),
            "random": lambda world, seed: bandits.RandomRanking(len(world.rates), seed),
        },
        services={
            "service-segments": Service(("--segment-prior-weight", f"{m:g}"), segment_client),
            "service": Service(("--segment-prior-weight", f"{m:g}"), plain_client),
        },
        default_policies=("service-segments", "service", "mabwiser-segments", "numpy-backoff", "numpy", "random"),
        targets=(
            Target("service-segments", "service", 0.7),
            Target("service-segments", "mabwiser-segments", 1.0),
            Target("numpy-backoff", "numpy", 0.7),
            Target("numpy-backoff", "mabwiser-segments", 1.0),
        ),
        prior=FLAT_PRIOR,
        config={
            "segments": args.segments,
            "zipf_exponent": args.zipf,
            "logit_sd": args.logit_sd,
            "segment_prior_weight": m,
        },
        title=(
            f"{rates_title(args)}; {args.segments} segments, Zipf({args.zipf:g}) traffic, "
            f"logit perturbation sd {args.logit_sd:g}; m = {m:g}"
        ),
        groups=traffic_groups,
    )


def traffic_groups(world: SegmentsEnvironment) -> dict[str, np.ndarray]:
    """The rounds of the busiest quarter of the segments and of the sparsest half (segment 0 is the busiest)."""
    n = len(world.traffic)
    return {
        f"busiest {max(1, n // 4)}": world.segments < max(1, n // 4),
        f"sparsest {n - n // 2}": world.segments >= n // 2,
    }


def drift(args: argparse.Namespace) -> Plan:
    """Rates dealt anew every ``--period`` rounds: forgetting with a half-life against none."""
    h, rate, prior = args.half_life, args.rounds_per_s, args.prior
    half_life_s = h / rate

    def paced() -> Schedule:
        return Paced(rate, half_life_s)  # one per run: it holds the run's clock

    return Plan(
        draw=lambda seed: DriftEnvironment.draw(
            args.arms, args.rounds, args.top_k, args.rates, seed, period=args.period
        ),
        local={
            "numpy-discounted": lambda world, seed: bandits.NumpyDiscounted(world.clicks.shape[1], seed, h, prior),
            "numpy": lambda world, seed: bandits.NumpyThompson(world.clicks.shape[1], seed, prior),
            "random": lambda world, seed: bandits.RandomRanking(world.clicks.shape[1], seed),
        },
        services={
            "service-half-life": Service(("--half-life-s", f"{half_life_s:g}"), plain_client, paced),
            # Without a half-life the service's answers do not depend on time (each request carries its seed and a
            # reward counts before its 202), so it runs as fast as it answers.
            "service": PLAIN_SERVICE,
        },
        default_policies=("service-half-life", "service", "numpy-discounted", "numpy", "random"),
        targets=(
            Target("service-half-life", "numpy-discounted", 1.1, 0.9),
            Target("service-half-life", "service", 0.6),
            Target("numpy-discounted", "numpy", 0.6),
        ),
        prior=prior,
        config={
            "period": args.period,
            "half_life_rounds": h,
            "rounds_per_s": rate,
            "half_life_s": half_life_s,
        },
        title=(
            f"{rates_title(args)}; rates dealt anew every {args.period:,} rounds; half-life {h:g} rounds "
            f"({half_life_s:g} s at {rate:g} rounds/s); prior Beta({prior[0]:g}, {prior[1]:g})"
        ),
        marks=tuple(range(args.period, args.rounds, args.period)),
        groups=phase_groups,
    )


def phase_groups(world: DriftEnvironment) -> dict[str, np.ndarray]:
    """The rounds of each phase: whether a policy's regret per phase grows as its counts grow old."""
    phase = np.arange(world.clicks.shape[0]) // world.period
    return {f"phase {p + 1}": phase == p for p in range(len(world.phase_rates))}


#: ``--env`` name -> its plan; the first is the default.
SCENARIOS: dict[str, Callable[[argparse.Namespace], Plan]] = {
    "stationary": stationary,
    "segments": segments,
    "drift": drift,
}
#: Rounds per replication when ``--rounds`` is not given.
DEFAULT_ROUNDS = {"stationary": 5000, "segments": 20000, "drift": 20000}
#: Prior of every arm in the drift environment when ``--prior`` is not given. With forgetting a posterior falls
#: back to its prior, so a flat prior (mean 50%) makes every forgotten arm worth exploring again; Beta(1, 19)
#: (mean 5%) is near the rates' mean (4%). The other environments keep Beta(1, 1), the libraries' only prior.
DRIFT_PRIOR = (1.0, 19.0)
