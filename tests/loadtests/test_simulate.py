"""The learning simulator (benchmarks/simulate.py): Thompson sampling beats random ranking, in process and over HTTP."""

from __future__ import annotations

import os

import numpy as np
import orjson
import pytest

from benchmarks import bandits, simulate

#: A small world where learning shows within a few hundred rounds: 20 arms, rates ~ Beta(1, 5) (mean 17%).
ARMS, ROUNDS, TOP_K, DELAY, RATES = 20, 300, 2, 5, (1.0, 5.0)


@pytest.fixture(scope="module")
def env() -> simulate.Environment:
    return simulate.Environment.draw(ARMS, ROUNDS, TOP_K, RATES, seed=3)


@pytest.fixture(scope="module")
def random_regret(env: simulate.Environment) -> float:
    return simulate.run_local("random", env, TOP_K, DELAY, seed=3).final_regret


def test_environment_is_fixed_by_its_seed() -> None:
    a = simulate.Environment.draw(ARMS, ROUNDS, TOP_K, RATES, seed=1)
    b = simulate.Environment.draw(ARMS, ROUNDS, TOP_K, RATES, seed=1)
    c = simulate.Environment.draw(ARMS, ROUNDS, TOP_K, RATES, seed=2)
    assert np.array_equal(a.rates, b.rates) and np.array_equal(a.clicks, b.clicks)
    assert not np.array_equal(a.rates, c.rates)
    assert a.clicks.shape == (ROUNDS, ARMS)
    assert a.best == pytest.approx(np.sort(a.rates)[-TOP_K:].sum())
    # Clicks follow the rates: over 300 rounds each arm's click frequency is near its rate.
    assert np.abs(a.clicks.mean(axis=0) - a.rates).max() < 0.1


@pytest.mark.parametrize("name", ["mabwiser", "bayesianbandits", "numpy", "numpy-outcomes"])
def test_thompson_sampling_beats_random_ranking(name: str, env: simulate.Environment, random_regret: float) -> None:
    run = simulate.run_local(name, env, TOP_K, DELAY, seed=3)
    assert run.regret.shape == (ROUNDS,)
    assert (run.regret >= -1e-12).all()  # no ranking beats the best k arms in expectation
    assert run.final_regret < 0.8 * random_regret, (name, run.final_regret, random_regret)
    assert run.decisions_per_core_s > 0


@pytest.mark.parametrize("name", sorted(bandits.LOCAL_POLICIES))
def test_top_1_shows_one_arm_per_round(name: str) -> None:
    env = simulate.Environment.draw(ARMS, 50, 1, RATES, seed=0)
    run = simulate.run_local(name, env, 1, 0, seed=0)
    assert run.regret.shape == (50,)
    assert run.final_regret >= 0


def test_feedback_arrives_after_the_delay_and_all_of_it_by_the_end() -> None:
    env = simulate.Environment.draw(ARMS, 30, TOP_K, RATES, seed=0)
    heard: list[tuple[int, int]] = []

    class Recorder(bandits.RandomRanking):
        def choose(self, round_: int, k: int) -> np.ndarray:
            self.now = round_
            return super().choose(round_, k)

        def learn(self, round_: int, shown: np.ndarray, clicks: np.ndarray) -> None:
            heard.append((round_, getattr(self, "now", -1)))

    simulate.simulate(Recorder(ARMS, 0), env, TOP_K, delay=4)
    assert [r for r, _ in heard] == list(range(30))
    # Round t's feedback is delivered before the decision of round t + 5, i.e. after round t + 4's decision.
    assert all(now == r + 4 for r, now in heard if r + 5 < 30)


def test_top_k_indices_largest_first() -> None:
    values = np.array([0.1, 0.9, 0.3, 0.9, 0.5])
    assert bandits.top_k_indices(values, 3).tolist() == [1, 3, 4]
    assert bandits.top_k_indices(values, 1).tolist() == [1]
    assert bandits.top_k_indices(values, 5).tolist() == [1, 3, 4, 2, 0]


def test_report_ratios_and_plot(tmp_path) -> None:
    out, png = tmp_path / "sim.json", tmp_path / "regret.png"
    argv = ["--arms", "10", "--top-k", "2", "--rounds", "100", "--seeds", "2", "--policies", "numpy,random"]
    assert simulate.main([*argv, "--json", str(out), "--plot", str(png)]) == 0
    doc = orjson.loads(out.read_bytes())
    assert set(doc["policies"]) == {"numpy", "random"}
    assert doc["ratios"] == {}  # no service in this run
    curve = doc["policies"]["numpy"]["curve"]
    assert curve["round"][-1] == 100 and curve["min"][-1] <= curve["mean"][-1] <= curve["max"][-1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = {
        "service": {"final_regret_per_seed": [110.0, 90.0], "decisions_per_core_s": 3000.0},
        "mabwiser": {"final_regret_per_seed": [100.0, 100.0], "decisions_per_core_s": 2000.0},
    }
    r = simulate.ratios(summary)["mabwiser"]
    assert r["regret_ratio"] == pytest.approx(1.0)
    assert r["regret_ratio_se"] == pytest.approx(0.1)  # service: sd 14.1 over 2 seeds, se 10 on a mean of 100
    assert (r["regret_ratio_per_seed_min"], r["regret_ratio_per_seed_max"]) == pytest.approx((0.9, 1.1))
    assert r["decisions_per_core_s_ratio"] == pytest.approx(1.5)


@pytest.fixture(scope="module")
def service_run(tmp_path_factory: pytest.TempPathFactory, env: simulate.Environment) -> simulate.Run:
    cpu = str(max(os.sched_getaffinity(0)))
    return simulate.run_service(env, TOP_K, DELAY, 3, cpu, tmp_path_factory.mktemp("service"))


def test_the_live_service_learns(service_run: simulate.Run, random_regret: float) -> None:
    run = service_run
    # What the service counted is what the simulator sent: one impression per arm shown (plus the warm-up
    # request's) and one accepted reward per click, none refused.
    assert run.checks["ok"], run.checks
    refusals = run.checks["counted"]["refusals"]
    assert {"duplicate", "unknown_event", "not_in_event", "unavailable"} <= set(refusals)
    assert not any(refusals.values()), refusals
    assert run.final_regret < 0.8 * random_regret, (run.final_regret, random_regret)
    assert run.server_cpu_s is not None and run.server_cpu_s > 0


def test_the_live_service_run_is_reproduced_by_its_seed(
    service_run: simulate.Run, env: simulate.Environment, tmp_path
) -> None:
    # Each request carries a seed drawn from the run's, and a reward counts before its 202: a second server on a
    # fresh state directory makes the same decisions, whatever the timing.
    again = simulate.run_service(env, TOP_K, DELAY, 3, str(max(os.sched_getaffinity(0))), tmp_path)
    assert np.array_equal(again.regret, service_run.regret)
