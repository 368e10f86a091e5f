"""Locust scenario: recommender clients POST candidate lists to /predict, a probe reads /health.

    python -m locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 17 -t 30s \\
        [--candidate-mix 100:3,400:6,2000:1] [--catalogue synthetic:110000 | --catalogue csv:PATH]

Run it from the repository root: ``python -m`` puts the root on ``sys.path``, so the workload generator
(benchmarks/workload.py) imports. Every answer is checked (loadtests/answers.py) and a wrong one counts as a
failure. ``-u`` counts the one health probe too. ``python -m loadtests.run`` drives this file step by step
against a server it starts itself; see loadtests/README.md.
"""

from __future__ import annotations

import argparse
import array
import bisect
import csv
import itertools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, constant_throughput, events, task
from locust.env import Environment

from benchmarks import workload
from loadtests import answers

JSON_HEADERS = {"Content-Type": "application/json"}
DEFAULT_MIX = workload.LOAD_MIX


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]  # Locust's hooks are untyped
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--candidate-mix",
        default=DEFAULT_MIX,
        help=f"candidates per request and their weights, size:weight,... (default {DEFAULT_MIX})",
    )
    parser.add_argument(
        "--catalogue",
        default=f"synthetic:{workload.DEFAULT_ID_SPACE}",
        help="where candidate ids come from: synthetic:N draws c0..c{N-1} as benchmarks/workload.py does "
        "(its table holds the first 100,000, so about 9%% are unknown); csv:PATH draws the entity_id column",
    )
    parser.add_argument("--bodies-per-size", type=int, default=64, help="distinct request bodies per size")
    parser.add_argument("--top-k", type=int, default=workload.DEFAULT_TOP_K, help="top_k of every request")
    parser.add_argument("--think-time-ms", type=float, default=0.0, help="pause between a client's requests")
    parser.add_argument("--health-rate", type=float, default=1.0, help="health probes per second (default 1)")
    parser.add_argument(
        "--record-dir",
        default="",
        help="write each request's end time, latency and outcome here, one file per process (loadtests/run.py)",
    )


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    body: bytes
    expected: answers.Expected


def parse_mix(text: str) -> list[tuple[int, float]]:
    """``"100:3,400:6"`` -> ``[(100, 3.0), (400, 6.0)]``."""
    mix = []
    for part in text.split(","):
        size, _, weight = part.strip().partition(":")
        mix.append((int(size), float(weight or 1)))
    if not mix or any(n < 1 or w <= 0 for n, w in mix):
        raise ValueError(f"--candidate-mix wants size:weight pairs with sizes >= 1 and weights > 0, got {text!r}")
    return mix


class Workload:
    """The request bodies of one process, drawn once from the workload generator, and their expectations."""

    def __init__(self, options: argparse.Namespace) -> None:
        mix = parse_mix(options.candidate_mix)
        kind, _, where = options.catalogue.partition(":")
        ids: list[str] | None = None
        if kind == "csv":
            with open(where, newline="", encoding="utf-8") as f:
                ids = [row["entity_id"] for row in csv.DictReader(f)]
        elif kind != "synthetic":
            raise ValueError(f"--catalogue must be synthetic:N or csv:PATH, got {options.catalogue!r}")
        self.groups: list[list[Request]] = []
        for offset, (n, _) in enumerate(mix):
            # The same seeds in every process: all workers send the same bodies, as wrk's threads do.
            if ids is None:
                bodies = workload.make_bodies(
                    n, options.bodies_per_size, id_space=int(where), top_k=options.top_k, seed=offset
                )
            else:
                bodies = workload.make_bodies_from_ids(ids, n, options.bodies_per_size, options.top_k, seed=offset)
            self.groups.append([Request(f"/predict {n}", b, answers.expect(b)) for b in bodies])
        self.cumulative = list(itertools.accumulate(w for _, w in mix))

    def pick(self, rng: random.Random) -> Request:
        group = self.groups[bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])]
        return group[rng.randrange(len(group))]


_workload: Workload | None = None


def options(environment: Environment) -> argparse.Namespace:
    parsed: argparse.Namespace | None = environment.parsed_options
    assert parsed is not None, "run through the locust command line"
    return parsed


def shared_workload(environment: Environment) -> Workload:
    global _workload
    if _workload is None:  # built on first use, in the worker process, after Locust forked
        _workload = Workload(options(environment))
    return _workload


class Recommender(FastHttpUser):
    """A recommender backend: asks for a ranking, checks it, asks again (after ``--think-time-ms``)."""

    weight = 1
    connection_timeout = 5.0
    network_timeout = 10.0

    def on_start(self) -> None:
        self.workload = shared_workload(self.environment)
        self.rng = random.Random()
        self.think_s: float = options(self.environment).think_time_ms / 1000

    def wait_time(self) -> float:
        return self.think_s

    @task
    def predict(self) -> None:
        req = self.workload.pick(self.rng)
        # Bytes go out as they are; Locust's annotation says str, which it would encode on every request.
        with self.client.post(
            "/predict",
            data=req.body,  # type: ignore[arg-type]
            headers=JSON_HEADERS,
            name=req.name,
            catch_response=True,
        ) as resp:
            problem = answers.check_predict(req.expected, resp.status_code, resp.content)
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)


class HealthProbe(FastHttpUser):
    """One readiness probe, at ``--health-rate`` per second, as Kubernetes would send."""

    fixed_count = 1
    connection_timeout = 5.0
    network_timeout = 10.0

    def on_start(self) -> None:
        self.pace = constant_throughput(options(self.environment).health_rate)

    def wait_time(self) -> float:
        return float(self.pace(self))

    @task
    def health(self) -> None:
        with self.client.get("/health", name="/health", catch_response=True) as resp:
            problem = answers.check_health(resp.status_code, resp.content)
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)


class Recorder:
    """Every request's end time, latency and outcome, written by each process when the test stops.

    Locust's own statistics round latencies below 100 ms to whole milliseconds and mix warm-up with steady
    state; loadtests/run.py needs microseconds and its own measurement window.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.end_s = array.array("d")
        self.latency_ms = array.array("d")
        self.ok = array.array("b")
        self.n_candidates = array.array("l")  # 0 for /health
        self.written = False

    def on_request(self, name: str, response_time: float, exception: BaseException | None, **_: Any) -> None:
        self.end_s.append(time.time())
        self.latency_ms.append(response_time)
        self.ok.append(exception is None)
        self.n_candidates.append(int(name.rsplit(" ", 1)[1]) if name.startswith("/predict ") else 0)

    def write(self, **_: Any) -> None:
        if self.written or not self.end_s:  # the master sends no requests
            return
        self.written = True
        self.directory.mkdir(parents=True, exist_ok=True)
        np.savez(
            self.directory / f"requests-{os.getpid()}.npz",
            end_s=np.frombuffer(self.end_s, dtype=np.float64),
            latency_ms=np.frombuffer(self.latency_ms, dtype=np.float64),
            ok=np.frombuffer(self.ok, dtype=np.int8).astype(bool),
            n_candidates=np.frombuffer(self.n_candidates, dtype=np.int64),
        )


@events.init.add_listener  # type: ignore[untyped-decorator]
def _on_init(environment: Environment, **_: Any) -> None:
    directory = environment.parsed_options.record_dir if environment.parsed_options else ""
    if directory:
        recorder = Recorder(Path(directory))
        environment.events.request.add_listener(recorder.on_request)
        environment.events.test_stop.add_listener(recorder.write)
        environment.events.quitting.add_listener(recorder.write)
