"""The stepped run's arithmetic: the steady window, CPU shares, and the closing verdict."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from loadtests import run


def trace(times: list[float], cpu_s: list[float]) -> run.CpuTrace:
    t = run.CpuTrace(lambda: 0.0)
    t.times, t.cpu_s = times, cpu_s
    return t


def args(**overrides: object) -> argparse.Namespace:
    base = {"warmup_s": 1.0, "server_cpus": "0", "client_cpus": "1", "p99_budget_ms": 50.0, "workers": 1}
    return argparse.Namespace(**(base | overrides))


def test_the_window_leaves_out_warm_up_and_tail() -> None:
    # 1,000 answers a second for 10 s; the first second is slow (warm-up), the last half second is cut.
    end_s = 1000.0 + np.arange(10_000) / 1000
    latency = np.where(end_s < 1001.0, 100.0, 2.0)
    latency[-1000:-600] = 3.0  # inside the window: the top 4% of it
    n_candidates = np.where(np.arange(10_000) % 100 == 0, 0, 400)  # one request in 100 is /health
    ok = np.ones(10_000, dtype=bool)
    ok[5] = False  # a failure during warm-up still counts
    rec = {"end_s": end_s, "latency_ms": latency, "ok": ok, "n_candidates": n_candidates}
    server = trace([999.0, 1011.0], [0.0, 6.0])  # half a core
    client = trace([999.0, 1011.0], [0.0, 12.0])  # a full core
    cores = trace([999.0, 1011.0], [0.0, 9.0])  # three quarters busy: a quarter is someone else's
    step = run.measure_window(8, rec, server, client, cores, args())

    assert step.window_s == pytest.approx(9.999 - 1.0 - 0.5)
    assert step.requests == pytest.approx(0.99 * 8500, abs=2)
    assert step.pairs == step.requests * 400
    assert step.p50_ms == 2.0 and step.p99_ms == 3.0
    assert (step.total_requests, step.failures) == (10_000, 1)
    assert step.server_cpu == pytest.approx(0.5)
    assert step.client_cpu == pytest.approx(1.0)
    assert step.other_load == pytest.approx(0.25)
    assert step.limit == "generator"


def test_a_window_too_short_is_an_error() -> None:
    rec = {k: np.zeros(3) for k in ("latency_ms", "n_candidates")} | {
        "end_s": np.array([0.0, 1.0, 2.0]),
        "ok": np.ones(3, dtype=bool),
    }
    with pytest.raises(run.StepError, match="steady window"):
        run.measure_window(1, rec, trace([0, 3], [0, 1]), trace([0, 3], [0, 1]), trace([0, 3], [0, 1]), args())


def step(users: int, rps: float, p99_ms: float, server: float, client: float, other: float = 0.0) -> run.Step:
    return run.Step(
        users, 10.0, int(rps * 10), int(rps * 4000), 1.0, 2.0, p99_ms, int(rps * 10), 0, server, client, other
    )


def test_the_verdict_picks_the_best_step_within_budget_and_says_what_limited_it() -> None:
    steps = [step(1, 1000, 2, 0.1, 0.5), step(4, 3000, 10, 0.3, 0.95), step(16, 3100, 80, 0.31, 0.97)]
    lines = run.conclusion(steps, args())
    assert lines[-1].startswith("max RPS per node (1 worker(s) on cpu 0) within the p99 budget of 50 ms: 3,000 req/s")
    assert "generator-bound" in lines[-1]
    assert any("the load generator, not the server, was the limit" in line for line in lines)
    assert any("10,000 req/s" in line for line in lines)  # 3,000 req/s at 30% CPU projects to 10,000
    assert any("Locust's own queueing" in line for line in lines)


def test_a_saturated_server_is_the_capacity() -> None:
    lines = run.conclusion([step(8, 9000, 20, 0.97, 0.6)], args())
    assert "the server's CPU was the limit" in lines[0]
    assert "generator-bound" not in lines[-1]


def test_a_core_full_of_other_work_is_called_out() -> None:
    assert step(8, 4000, 20, 0.45, 0.5, other=0.5).limit == "shared"
    assert "rerun when the machine is quiet" in run.conclusion([step(8, 4000, 20, 0.45, 0.5, other=0.5)], args())[0]


def test_no_step_within_budget() -> None:
    [line] = run.conclusion([step(1, 100, 70, 0.1, 0.2)], args())
    assert line.startswith("no step held the p99 budget of 50 ms")
