"""The ranking policies the learning simulator (benchmarks/simulate.py) compares, behind one small protocol.

Every policy ranks the same N arms, shows the top k, and later hears which of them were clicked. All start from
the same prior, Beta(1, 1) for every arm. They differ in how they hear it, which is each one's own API:

- ``service``: the live service over HTTP. ``POST /predict`` with all arms as candidates; each id it returns is
  an impression, counted by the service when it answers (so the arm's beta grows at once); a click is a
  ``POST /reward`` for that (event_id, id), sent when the simulator delivers it. Non-clicks send nothing.
- ``mabwiser``: MABWiser's ``ThompsonSampling``. Its ``predict_expectations`` draws one Beta sample per arm (the
  Thompson draw); the k arms with the largest draws are shown. Delivered outcomes, 1 or 0 per shown arm, go to
  ``partial_fit``.
- ``bayesianbandits``: bayesianbandits' ``Agent`` with ``ThompsonSampling`` and one ``DirichletClassifier({0: 1,
  1: 1})`` per arm (a Beta(1, 1) over the click probability); ``pull(top_k=k)`` ranks, and each delivered
  outcome updates its arm.
- ``numpy``: exact Beta-Bernoulli Thompson sampling in a few lines of numpy that counts as the service does (the
  impression at once, the click when delivered); it separates the service's counting rule from its
  implementation when the service is compared with the libraries.
- ``numpy-outcomes``: the same sampler counting as the libraries do (a shown arm's 1 or 0 when delivered); beside
  ``numpy`` it measures what the counting rule alone costs at a given delay.
- ``random``: a uniformly random ranking, the regret of not learning.

The segments environment adds policies that know each round's segment (given as the list of every round's
segment, read at the round's decision only):

- ``service-segments``: the live service with ``"segment"`` in every ``/predict`` (``service`` is the same server
  asked without it).
- ``mabwiser-segments``: one MABWiser ``ThompsonSampling`` per segment, each from Beta(1, 1), knowing nothing of
  the others.
- ``numpy-backoff``: the service's back-off rule in numpy: arm a in segment s is drawn from
  Beta(m mu_a + r_sa, m (1 - mu_a) + n_sa - r_sa), mu_a the mean of a's global posterior, both counted as the
  service counts.

The drift environment adds forgetting:

- ``service-half-life``: the live service started with ``--half-life-s``.
- ``numpy-discounted``: discounted Thompson sampling counting as the service does, every impression and click
  weighted 2^(-age / H), the age in rounds (the simulator paces the service so that rounds are seconds apart by a
  fixed step).
"""

from __future__ import annotations

import http.client
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import orjson

#: Prior of every arm, the same for every policy (the service gets it from the catalogue the simulator writes).
PRIOR_ALPHA = 1.0
PRIOR_BETA = 1.0

HTTP_TIMEOUT_S = 10.0


class Policy(Protocol):
    """A ranking policy in the simulator's loop: ``choose`` once per round, ``learn`` when feedback arrives."""

    name: str

    def choose(self, round_: int, k: int) -> np.ndarray:
        """Indices (into the arm list) of the k arms shown in round ``round_``."""
        ...

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        """Feedback for round ``round_``: the arms shown then and, aligned with them, whether each was clicked."""
        ...

    def close(self) -> None: ...


def policy_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of policy ``name`` in replication ``seed``: independent of the environment's streams and
    of which other policies run."""
    return np.random.default_rng([seed, 2, zlib.crc32(name.encode())])


class RandomRanking:
    """k arms drawn uniformly without replacement each round; learns nothing."""

    name = "random"

    def __init__(self, n_arms: int, seed: int) -> None:
        self._n = n_arms
        self._rng = policy_rng(seed, self.name)

    def choose(self, round_: int, k: int) -> np.ndarray:
        return self._rng.choice(self._n, size=k, replace=False)

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class NumpyThompson:
    """Beta-Bernoulli Thompson sampling in numpy, counting as the service does.

    The posterior of arm i is Beta(alpha0 + clicks_i, beta0 + impressions_i - clicks_i): an impression adds 1 to
    beta when the arm is shown, a delivered click moves that 1 from beta to alpha. (alpha0, beta0) is ``prior``.
    """

    name = "numpy"

    def __init__(self, n_arms: int, seed: int, prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA)) -> None:
        self._alpha = np.full(n_arms, prior[0], dtype=np.float64)
        self._beta = np.full(n_arms, prior[1], dtype=np.float64)
        self._rng = policy_rng(seed, self.name)

    def choose(self, round_: int, k: int) -> np.ndarray:
        draws = self._rng.beta(self._alpha, self._beta)
        shown = top_k_indices(draws, k)
        self._beta[shown] += 1.0
        return shown

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        clicked = shown[clicks]
        self._alpha[clicked] += 1.0
        self._beta[clicked] -= 1.0

    def close(self) -> None:
        pass


class NumpyThompsonOutcomes(NumpyThompson):
    """:class:`NumpyThompson` counting as the libraries do: nothing when an arm is shown, its outcome when delivered."""

    name = "numpy-outcomes"

    def choose(self, round_: int, k: int) -> np.ndarray:
        return top_k_indices(self._rng.beta(self._alpha, self._beta), k)

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        self._alpha[shown[clicks]] += 1.0
        self._beta[shown[~clicks]] += 1.0


class NumpyBackoff:
    """The service's per-segment rule with back-off to the global posterior, in numpy (issue 20's contract).

    Arm a in segment s is drawn from Beta(m mu_a + r_sa, m (1 - mu_a) + n_sa - r_sa): a segment's own counts on a
    prior of m pseudo-impressions at the global mean mu_a = (alpha0 + r_a) / (alpha0 + beta0 + n_a). A sparse
    segment ranks nearly as the global posterior does; a busy one by its own clicks. Each shown arm counts one
    impression for (s, a) and for a, each delivered click one reward for both, as the service counts them.

    Args:
        n_arms: Arms ranked every round.
        seed: Replication seed.
        segments: Segment index of every round (the policy reads ``segments[t]`` at round t's decision).
        prior_weight: m, the pseudo-impressions of the global mean in a segment's prior.
    """

    name = "numpy-backoff"

    def __init__(self, n_arms: int, seed: int, segments: np.ndarray, prior_weight: float) -> None:
        n_segments = int(segments.max()) + 1
        self._segments = segments
        self._m = prior_weight
        self._impressions = np.zeros(n_arms)
        self._rewards = np.zeros(n_arms)
        self._segment_impressions = np.zeros((n_segments, n_arms))
        self._segment_rewards = np.zeros((n_segments, n_arms))
        self._rng = policy_rng(seed, self.name)

    def choose(self, round_: int, k: int) -> np.ndarray:
        s = self._segments[round_]
        mean = (PRIOR_ALPHA + self._rewards) / (PRIOR_ALPHA + PRIOR_BETA + self._impressions)
        n, r = self._segment_impressions[s], self._segment_rewards[s]
        shown = top_k_indices(self._rng.beta(self._m * mean + r, self._m * (1.0 - mean) + n - r), k)
        self._impressions[shown] += 1.0
        n[shown] += 1.0
        return shown

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        clicked = shown[clicks]
        self._rewards[clicked] += 1.0
        self._segment_rewards[self._segments[round_], clicked] += 1.0

    def close(self) -> None:
        pass


class NumpyDiscounted:
    """Discounted Thompson sampling in numpy, counting as the service does with ``--half-life-s``.

    An impression or click made ``age`` rounds ago weighs 2^(-age / H); the posterior is Beta(alpha0 + weighted
    clicks, beta0 + weighted impressions - weighted clicks), so a forgotten arm returns to its prior. The weighted
    counts are kept as of the last decision and scaled down by 2^(-elapsed / H) at the next, which is exact (the
    weights are exponential). An impression is made at its decision; a click when it is delivered, which the
    simulator does just before the next decision, so it is counted at that decision's time: weight 2^(1 / H) as of
    the last one.

    Args:
        n_arms: Arms ranked every round.
        seed: Replication seed.
        half_life_rounds: H, in rounds.
        prior: (alpha0, beta0) of every arm.
    """

    name = "numpy-discounted"

    def __init__(self, n_arms: int, seed: int, half_life_rounds: float, prior: tuple[float, float]) -> None:
        self._half_life = half_life_rounds
        self._prior = prior
        self._impressions = np.zeros(n_arms)
        self._rewards = np.zeros(n_arms)
        self._now = 0
        self._rng = policy_rng(seed, self.name)

    def choose(self, round_: int, k: int) -> np.ndarray:
        decay = 2.0 ** (-(round_ - self._now) / self._half_life)
        self._impressions *= decay
        self._rewards *= decay
        self._now = round_
        alpha = self._prior[0] + self._rewards
        shown = top_k_indices(self._rng.beta(alpha, self._prior[1] + self._impressions - self._rewards), k)
        self._impressions[shown] += 1.0
        return shown

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        self._rewards[shown[clicks]] += 2.0 ** (1.0 / self._half_life)

    def close(self) -> None:
        pass


class MabwiserThompson:
    """MABWiser's ``MAB`` with ``LearningPolicy.ThompsonSampling()``; top k by its sampled expectations."""

    name = "mabwiser"

    def __init__(self, n_arms: int, seed: int) -> None:
        from mabwiser.mab import MAB, LearningPolicy

        # MABWiser's Thompson sampling starts every arm at success = failure = 1, i.e. Beta(1, 1) (PRIOR_*), and
        # seeds one numpy Generator that draws the Beta samples.
        self._arms = list(range(n_arms))
        self._mab = MAB(
            self._arms, LearningPolicy.ThompsonSampling(), seed=int(policy_rng(seed, self.name).integers(2**31))
        )
        # MABWiser refuses to predict before a first fit; fitting no data leaves every arm at its prior.
        self._mab.fit(decisions=[], rewards=[])

    def choose(self, round_: int, k: int) -> np.ndarray:
        expectations: dict[int, float] = self._mab.predict_expectations()
        draws = np.fromiter(expectations.values(), dtype=np.float64, count=len(self._arms))
        keys = np.fromiter(expectations.keys(), dtype=np.intp, count=len(self._arms))
        shown: np.ndarray = keys[top_k_indices(draws, k)]
        return shown

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        self._mab.partial_fit(decisions=shown.tolist(), rewards=clicks.astype(np.int64).tolist())

    def close(self) -> None:
        pass


class BayesianBanditsThompson:
    """bayesianbandits' ``Agent`` + ``ThompsonSampling``, a ``DirichletClassifier({0: 1, 1: 1})`` per arm."""

    name = "bayesianbandits"

    def __init__(self, n_arms: int, seed: int) -> None:
        from bayesianbandits import Agent, Arm, DirichletClassifier, ThompsonSampling

        # A two-class Dirichlet with concentrations (1, 1) is a Beta(1, 1) over the click probability; the reward
        # function takes that probability (class 1) out of each sampled probability vector.
        arms = [
            Arm(i, reward_function=_click_probability, learner=DirichletClassifier({0: PRIOR_BETA, 1: PRIOR_ALPHA}))
            for i in range(n_arms)
        ]
        self._agent: Any = Agent(arms, ThompsonSampling(), random_seed=policy_rng(seed, self.name))

    def choose(self, round_: int, k: int) -> np.ndarray:
        [tokens] = self._agent.pull(top_k=k)
        return np.asarray(tokens, dtype=np.intp)

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        for arm, click in zip(shown.tolist(), clicks.tolist()):
            self._agent.select_for_update(arm).update(np.array([int(click)]))

    def close(self) -> None:
        pass


class MabwiserPerSegment:
    """One MABWiser ``ThompsonSampling`` per segment (made at the segment's first round), each from Beta(1, 1).

    Args:
        n_arms: Arms ranked every round.
        seed: Replication seed; segment s's bandit is seeded from it and s.
        segments: Segment index of every round (the policy reads ``segments[t]`` at round t's decision).
    """

    name = "mabwiser-segments"

    def __init__(self, n_arms: int, seed: int, segments: np.ndarray) -> None:
        self._n_arms = n_arms
        self._seed = seed
        self._segments = segments
        self._bandits: dict[int, MabwiserThompson] = {}

    def _bandit(self, round_: int) -> MabwiserThompson:
        s = int(self._segments[round_])
        if s not in self._bandits:
            self._bandits[s] = MabwiserThompson(self._n_arms, self._seed * 1_000_003 + s)
        return self._bandits[s]

    def choose(self, round_: int, k: int) -> np.ndarray:
        return self._bandit(round_).choose(round_, k)

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        self._bandit(round_).learn(round_, shown, clicks)

    def close(self) -> None:
        pass


def _click_probability(samples: np.ndarray) -> np.ndarray:
    return samples[..., 1]


class ServiceError(RuntimeError):
    """The service answered something the simulator cannot go on with."""


class ServicePolicy:
    """The live service, reached over one keep-alive HTTP/1.1 connection on loopback.

    Args:
        port: The service's port on 127.0.0.1.
        arm_ids: The arms' ids, in the simulator's order (sent as the candidates of every request).
        seed: Replication seed; each request carries a seed drawn from it, so a run is reproducible.
    """

    name = "service"

    def __init__(self, port: int, arm_ids: Sequence[str], seed: int) -> None:
        self._port = port
        self._ids = list(arm_ids)
        self._index = {arm_id: i for i, arm_id in enumerate(self._ids)}
        self._rng = policy_rng(seed, self.name)
        self._events: dict[int, str] = {}
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
        self.rewards_posted = 0

    def body(self, round_: int, k: int) -> dict[str, Any]:
        """The ``/predict`` body of round ``round_``: every arm a candidate, a seed drawn from the run's."""
        return {"user_id": "simulator", "candidates": self._ids, "top_k": k, "seed": int(self._rng.integers(2**63))}

    def choose(self, round_: int, k: int) -> np.ndarray:
        status, doc = self.request("POST", "/predict", self.body(round_, k))
        if status != 200 or not isinstance(doc, dict) or len(doc.get("ids", ())) != k or "event_id" not in doc:
            raise ServiceError(f"POST /predict answered {status}: {str(doc)[:300]}")
        self._events[round_] = doc["event_id"]
        return np.fromiter((self._index[arm_id] for arm_id in doc["ids"]), dtype=np.intp, count=k)

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        event_id = self._events.pop(round_)
        for arm in shown[clicks].tolist():
            status, doc = self.request("POST", "/reward", {"event_id": event_id, "id": self._ids[arm], "reward": 1.0})
            if status != 202:
                raise ServiceError(f"POST /reward answered {status}: {str(doc)[:300]}")
            self.rewards_posted += 1

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request on the kept-alive connection; returns the status and the decoded JSON body.

        The simulator sends back to back, so the server never closes the connection as idle; any connection
        error is the run's failure, not retried (a resent /reward would be a duplicate).
        """
        payload = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        self._conn.request(method, path, body=payload, headers=headers)
        resp = self._conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return resp.status, raw[:300]

    def counts_checks(self) -> dict[str, Any]:
        """Comparisons of the service's per-arm figures with the simulator's, beyond ``GET /loop``'s totals."""
        return {}

    def close(self) -> None:
        self._conn.close()


class SegmentServicePolicy(ServicePolicy):
    """The live service asked with each round's segment (``"segment"`` in ``/predict``), as issue 20 defines it.

    It keeps its own count of impressions and clicks per (segment, arm), which ``counts_checks`` compares with
    ``GET /arms/{id}?segment=s``.

    Args:
        port: The service's port on 127.0.0.1.
        arm_ids: The arms' ids, in the simulator's order.
        seed: Replication seed.
        segments: Segment index of every round; segment s is sent as ``segment-s``.
    """

    name = "service-segments"

    def __init__(self, port: int, arm_ids: Sequence[str], seed: int, segments: np.ndarray) -> None:
        super().__init__(port, arm_ids, seed)
        self._segments = segments
        n_segments = int(segments.max()) + 1
        self._impressions = np.zeros((n_segments, len(self._ids)), dtype=np.int64)
        self._clicks = np.zeros((n_segments, len(self._ids)), dtype=np.int64)

    def body(self, round_: int, k: int) -> dict[str, Any]:
        return super().body(round_, k) | {"segment": segment_label(int(self._segments[round_]))}

    def choose(self, round_: int, k: int) -> np.ndarray:
        shown = super().choose(round_, k)
        self._impressions[self._segments[round_], shown] += 1
        return shown

    def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
        super().learn(round_, shown, clicks)
        self._clicks[self._segments[round_], shown[clicks]] += 1

    def counts_checks(self) -> dict[str, Any]:
        """Every shown arm of the busiest and of the sparsest segment that was seen: ``GET /arms/{id}?segment=s``
        against the simulator's counts. ``mismatches`` lists (segment, id, service's, simulator's)."""
        seen = np.flatnonzero(self._impressions.sum(axis=1))
        busiest, sparsest = int(seen[0]), int(seen[-1])
        mismatches: list[Any] = []
        compared = 0
        for s in sorted({busiest, sparsest}):
            for arm in np.flatnonzero(self._impressions[s]).tolist():
                arm_id = self._ids[arm]
                status, doc = self.request("GET", f"/arms/{arm_id}?segment={segment_label(s)}")
                mine = [int(self._impressions[s, arm]), int(self._clicks[s, arm])]
                theirs = (
                    [doc.get("impressions"), doc.get("rewards")] if status == 200 and isinstance(doc, dict) else doc
                )
                compared += 1
                if theirs != mine:
                    mismatches.append([segment_label(s), arm_id, theirs, mine])
        return {"segment_arms_compared": compared, "segment_mismatches": mismatches}


def segment_label(segment: int) -> str:
    """The ``"segment"`` the simulator sends for segment index ``segment``."""
    return f"segment-{segment}"


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (ties broken by position)."""
    if k >= len(values):
        return np.argsort(-values, kind="stable")
    part = np.argpartition(-values, k - 1)[:k]
    return part[np.argsort(-values[part], kind="stable")]


#: Name -> factory (n_arms, seed) for the in-process policies; the service needs a running server and is built
#: by the simulator.
LOCAL_POLICIES: dict[str, Callable[[int, int], Policy]] = {
    "mabwiser": MabwiserThompson,
    "bayesianbandits": BayesianBanditsThompson,
    "numpy": NumpyThompson,
    "numpy-outcomes": NumpyThompsonOutcomes,
    "random": RandomRanking,
}

#: Every policy the simulator knows, in the order the report lists them.
POLICIES = ("service", "mabwiser", "bayesianbandits", "numpy", "numpy-outcomes", "random")
#: The policies run when none are named: every one but ``numpy-outcomes``, which is for a study of the delay.
DEFAULT_POLICIES = ("service", "mabwiser", "bayesianbandits", "numpy", "random")
