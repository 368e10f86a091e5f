"""The arithmetic behind docs/benchmarks/: ratios, cost per candidate, knees and the cost model."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_service, plot, profile_service, run_all
from mab_service import __main__ as main, config


def result(target: str, name: str, n: int, rps: float, cpu_us: float, other: float = 0.0) -> dict[str, Any]:
    median = {
        "rps": rps,
        "pairs_per_s": rps * n,
        "p50_ms": 1.0,
        "p99_ms": 4.0,
        "cpu_us_per_request": cpu_us,
        "other_load": other,
        "errors": 0,
    }
    return {"target": target, "workload": name, "n_candidates": n, "median": median}


def test_service_table_gives_per_core_ratios_against_both_baselines() -> None:
    doc = {
        "results": [
            result("project", "W400", 400, 10_000, 95),
            result("plain", "W400", 400, 2_000, 500),
            result("go", "W400", 400, 5_000, 190),
            result("project", "W2000", 2000, 4_000, 240),
            result("plain", "W2000", 2000, 700, 1400),
            {"target": "go", "workload": "W2000", "n_candidates": 2000, "median": None, "error": "boom"},
        ]
    }
    table = run_all.service_table(doc, ["project", "plain", "go"])
    assert "| W400 | mab_service / plain Starlette | 5.00x | 5.26x |" in table
    assert "| W400 | mab_service / Go | 2.00x | 2.00x |" in table
    assert "| W2000 | Go | failed |" in table
    assert run_all.failures(doc) == ["go W2000: boom"]


def sweep(cost: dict[str, tuple[float, float]], sizes: list[int]) -> list[dict[str, Any]]:
    """Sweep rows whose CPU per request is exactly fixed_us + per_candidate_ns * n."""
    doc = {
        "results": [
            result(t, f"N{n}", n, 1e6 / (fixed + per * n / 1e3), fixed + per * n / 1e3)
            for t, (fixed, per) in cost.items()
            for n in sizes
        ]
    }
    return run_all.sweep_rows(doc)


def test_cost_model_recovers_fixed_and_per_candidate_cost() -> None:
    rows = sweep({"project": (40.0, 90.0), "go": (15.0, 250.0)}, [10, 100, 1000, 10_000])
    lines = run_all.cost_model(rows, ["project", "go"])
    assert lines[0].startswith("mab_service: about 40 us per request + 90 ns per candidate")
    assert lines[1].startswith("Go: about 15 us per request + 250 ns per candidate")
    assert "10,000: 1.00" in lines[0]


def test_knees_name_every_rise_in_cost_per_candidate() -> None:
    rows = sweep({"plain": (100.0, 900.0)}, [10, 100, 1000, 10_000])
    for row in rows:
        if row["n_candidates"] == 10_000:  # GC scans of a large heap: cost per candidate jumps
            row["cpu_ns_per_pair"] *= 1.6
    [line] = run_all.knees(rows, ["plain"])
    assert "lowest" in line and "rises 1,000 -> 10,000 (+" in line
    [flat] = run_all.knees(sweep({"project": (40.0, 90.0)}, [10, 100, 1000]), ["project"])
    assert flat.endswith("never rises by more than 10%")


def test_contention_is_reported_only_when_it_matters() -> None:
    quiet = {"pinned": {"results": [result("project", "W400", 400, 10_000, 95, other=0.03)]}}
    assert run_all.contention(quiet) is None
    busy = {"sweep": {"results": [result("go", "N100", 100, 9_000, 50, other=0.6)]}}
    assert "up to 60%" in (run_all.contention(busy) or "")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = sweep({"project": (40.0, 90.0), "plain": (300.0, 1000.0)}, [10, 100, 1000])
    path = plot.plot_sweep(rows, tmp_path / "sweep.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpc_stream_benchmark_reads_every_message_each_way() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    argv = [sys.executable, "-m", "benchmarks.bench_grpc_stream", "--requests", "12", "--repeats", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["naive", "ours", "client", "raw"]
    assert "naive / raw client CPU" in done.stdout


@pytest.mark.parametrize("name", [n for n in bench_service.TARGETS if n.startswith("project")])
def test_every_project_target_is_a_command_line_the_service_takes(name: str, tmp_path: Path) -> None:
    argv = bench_service.TARGETS[name](8080, tmp_path / "table.csv", 1)
    assert argv[1:4] == ["-m", "mab_service", "serve"]
    args = main._parser().parse_args(argv[3:])
    settings = config.Settings.from_env({}, **{f.name: getattr(args, f.name, None) for f in fields(config.Settings)})
    assert settings.learning == (name != "project-nolearn")
    assert settings.decision_log == ("nodecisions" not in name)
    assert settings.half_life_s == (3600.0 if "halflife" in name else 0.0)


def test_profile_shares_are_summed_per_library_and_per_function() -> None:
    by_library = """# Samples: 18K of event 'cpu-clock'
    33.00%  _answer.cpython-311-x86_64-linux-gnu.so
    30.75%  libpython3.11.so.1.0
     9.07%  [kernel.kallsyms]
"""
    assert profile_service.parse_report(by_library, "dso") == pytest.approx(
        {"_answer": 0.33, "libpython3.11": 0.3075, "[kernel.kallsyms]": 0.0907}
    )
    by_function = """
    16.24%  _answer.cpython-311-x86_64-linux-gnu.so  [.] mab::gather_rows
               |--3.19%--0x7fcae769bc80
     9.07%  [kernel.kallsyms]                        [k] _raw_spin_unlock_irqrestore
     1.45%  libm.so.6                                [.] __ieee754_log_fma
     0.55%  libm.so.6                                [.] __ieee754_log_fma
"""
    assert profile_service.parse_report(by_function, "dso,sym") == pytest.approx(
        {
            "_answer: mab::gather_rows": 0.1624,
            "[kernel.kallsyms]: _raw_spin_unlock_irqrestore": 0.0907,
            "libm: __ieee754_log_fma": 0.02,
        }
    )
