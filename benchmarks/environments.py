"""The learning simulator's worlds (benchmarks/simulate.py): hidden click rates and every click, fixed by a seed.

Every world draws, in advance, one uniform number per arm and round and clicks arm i in round t when that number is
below the arm's rate in that round, so every policy meets the same clicks when it shows the same arm in the same
round (common random numbers). The worlds differ in what the rate of an arm in a round is:

- ``Environment`` (stationary): one rate per arm, for every round.
- ``SegmentsEnvironment``: each round belongs to one of S segments, drawn with Zipf traffic; a segment's rates are
  the global rates moved on the logit scale by a normal perturbation per (segment, arm).
- ``DriftEnvironment``: every ``period`` rounds the same rates are dealt to the arms anew (a random permutation),
  so the best arms of one phase are ordinary arms in the next.

Each world's random streams are keyed by (seed, stream), independent of every policy's (bandits.policy_rng); the
global rates of a seed are the same in every world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class World(Protocol):
    """What the simulator's loop reads of a world: the clicks, and each round's rates and best achievable sum."""

    @property
    def clicks(self) -> np.ndarray:
        """``clicks[t, i]``: whether arm i is clicked if shown in round t, shape (rounds, n_arms)."""
        ...

    def rates_at(self, round_: int) -> np.ndarray:
        """Click probability of each arm in round ``round_``, shape (n_arms,)."""
        ...

    def best_at(self, round_: int) -> float:
        """Sum of the k largest rates of round ``round_``: the expected clicks of the best possible ranking."""
        ...


def global_rates(n_arms: int, rate_shape: tuple[float, float], seed: int) -> np.ndarray:
    """Replication ``seed``'s click rate of each arm, drawn from Beta(*rate_shape)."""
    return np.random.default_rng([seed, 0]).beta(*rate_shape, size=n_arms)


def uniforms(rounds: int, n_arms: int, seed: int) -> np.ndarray:
    """The uniform number of every (round, arm): arm i is clicked in round t if ``u[t, i] < rate``."""
    return np.random.default_rng([seed, 1]).random((rounds, n_arms), dtype=np.float32)


def best_sums(rates: np.ndarray, k: int) -> np.ndarray:
    """Sum of the k largest rates of each row of ``rates`` (shape (rows, n_arms))."""
    sums: np.ndarray = np.sort(rates, axis=1)[:, -k:].sum(axis=1)
    return sums


@dataclass(frozen=True)
class Environment:
    """The stationary world: hidden click rates and every click outcome, fixed in advance.

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
        rates = global_rates(n_arms, rate_shape, seed)
        return cls(rates, uniforms(rounds, n_arms, seed) < rates, float(np.sort(rates)[-k:].sum()))

    def rates_at(self, round_: int) -> np.ndarray:
        return self.rates

    def best_at(self, round_: int) -> float:
        return self.best


def zipf_traffic(n_segments: int, exponent: float) -> np.ndarray:
    """Share of the rounds of each segment: proportional to (s + 1) ** -exponent, segment 0 the busiest."""
    weights: np.ndarray = np.arange(1, n_segments + 1, dtype=np.float64) ** -exponent
    shares: np.ndarray = weights / weights.sum()
    return shares


def perturb_logits(rates: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``rates`` moved by ``noise`` on the logit scale: sigmoid(logit(rates) + noise), broadcast over rows."""
    # Beta draws can round to exactly 0 or 1; clip so the logit is finite (1e-9 is far below any rate that matters).
    p = np.clip(rates, 1e-9, 1 - 1e-9)
    moved: np.ndarray = 1.0 / (1.0 + np.exp(-(np.log(p / (1.0 - p)) + noise)))
    return moved


@dataclass(frozen=True)
class SegmentsEnvironment:
    """A world of segments: each round is one segment's, and each segment has its own rates.

    Segment s's rate of arm a is sigmoid(logit(p_a) + sd * z_sa), with p_a the global rate (the stationary
    world's for the same seed) and z_sa standard normal: with sd = 1 an arm at 4% is between 1.5% and 10% in
    two segments of three, so segments share which arms are good but disagree on the order among the best.

    Attributes:
        rates: Global click rate of each arm, shape (n_arms,).
        segment_rates: Rate of each arm in each segment, shape (n_segments, n_arms).
        traffic: Probability that a round is segment s's, shape (n_segments,).
        segments: Segment of each round, shape (rounds,).
        clicks: ``clicks[t, i]``, shape (rounds, n_arms), drawn at round t's segment's rates.
        best: Sum of the k largest rates of each segment, shape (n_segments,).
    """

    rates: np.ndarray
    segment_rates: np.ndarray
    traffic: np.ndarray
    segments: np.ndarray
    clicks: np.ndarray
    best: np.ndarray

    @classmethod
    def draw(
        cls,
        n_arms: int,
        rounds: int,
        k: int,
        rate_shape: tuple[float, float],
        seed: int,
        *,
        n_segments: int,
        zipf_exponent: float,
        logit_sd: float,
    ) -> SegmentsEnvironment:
        """Draw replication ``seed``'s world of ``n_segments`` segments."""
        rates = global_rates(n_arms, rate_shape, seed)
        noise = np.random.default_rng([seed, 3]).normal(0.0, logit_sd, size=(n_segments, n_arms))
        segment_rates = perturb_logits(rates, noise)
        traffic = zipf_traffic(n_segments, zipf_exponent)
        segments = np.random.default_rng([seed, 4]).choice(n_segments, size=rounds, p=traffic)
        clicks = uniforms(rounds, n_arms, seed) < segment_rates[segments]
        return cls(rates, segment_rates, traffic, segments, clicks, best_sums(segment_rates, k))

    def rates_at(self, round_: int) -> np.ndarray:
        rates: np.ndarray = self.segment_rates[self.segments[round_]]
        return rates

    def best_at(self, round_: int) -> float:
        return float(self.best[self.segments[round_]])


@dataclass(frozen=True)
class DriftEnvironment:
    """A world whose best arms change: every ``period`` rounds the rates are dealt to the arms anew.

    Phase 0 has the global rates (the stationary world's for the same seed); each later phase a uniformly random
    permutation of them, so the set of rates (and the best achievable sum) stays the same while which arms hold
    them changes. With 100 arms and rates ~ Beta(0.6, 15), a best arm of one phase is typically a 2-3% arm in the
    next, and the new best arms were ordinary before.

    Attributes:
        phase_rates: Rate of each arm in each phase, shape (phases, n_arms).
        period: Rounds per phase.
        clicks: ``clicks[t, i]``, shape (rounds, n_arms), drawn at round t's phase's rates.
        best: Sum of the k largest rates of each phase, shape (phases,).
    """

    phase_rates: np.ndarray
    period: int
    clicks: np.ndarray
    best: np.ndarray

    @classmethod
    def draw(
        cls, n_arms: int, rounds: int, k: int, rate_shape: tuple[float, float], seed: int, *, period: int
    ) -> DriftEnvironment:
        """Draw replication ``seed``'s world, the rates dealt anew every ``period`` rounds."""
        rates = global_rates(n_arms, rate_shape, seed)
        rng = np.random.default_rng([seed, 5])
        phases = -(-rounds // period)
        phase_rates = np.stack([rates] + [rng.permutation(rates) for _ in range(phases - 1)])
        phase_of_round = np.arange(rounds) // period
        clicks = uniforms(rounds, n_arms, seed) < phase_rates[phase_of_round]
        return cls(phase_rates, period, clicks, best_sums(phase_rates, k))

    def rates_at(self, round_: int) -> np.ndarray:
        rates: np.ndarray = self.phase_rates[round_ // self.period]
        return rates

    def best_at(self, round_: int) -> float:
        return float(self.best[round_ // self.period])
