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
    beta when the arm is shown, a delivered click moves that 1 from beta to alpha.
    """

    name = "numpy"

    def __init__(self, n_arms: int, seed: int) -> None:
        self._alpha = np.full(n_arms, PRIOR_ALPHA)
        self._beta = np.full(n_arms, PRIOR_BETA)
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

    def choose(self, round_: int, k: int) -> np.ndarray:
        body = {"user_id": "simulator", "candidates": self._ids, "top_k": k, "seed": int(self._rng.integers(2**63))}
        status, doc = self.request("POST", "/predict", body)
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

    def close(self) -> None:
        self._conn.close()


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
