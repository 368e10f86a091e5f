"""The one data generator for benchmarks, perf tests and load tests.

Everything that measures the service draws its feature table and request bodies from here, so numbers from
different tools describe the same workload. Run ``python -m benchmarks.workload --out DIR`` to write
``table.csv`` plus, per workload, ``<name>.jsonl`` (one request body per line) and ``<name>.lua`` (a wrk script).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

#: Named request shapes: workload name -> candidates per request.
WORKLOADS: dict[str, int] = {"W400": 400, "W2000": 2000}
#: Workloads whose bodies are another's with a ``segment`` each (``add_segments``): the same candidates, ranked
#: within one of SEGMENTS audiences, so that a side-by-side run prices the segment alone.
SEGMENTED_WORKLOADS: dict[str, str] = {"W400S": "W400"}
#: Audiences of the segmented workloads; their traffic is Zipf-distributed (s = 1.1), some segments sparse.
SEGMENTS = 20

DEFAULT_ENTITIES = 100_000
#: Candidate ids are drawn from a slightly larger space than the table, so about 9% of them are unknown
#: and exercise the prior fallback.
DEFAULT_ID_SPACE = 110_000
DEFAULT_BODIES = 256
DEFAULT_TOP_K = 50

#: Request sizes of the load test and their weights, ``size:weight,...`` (loadtests/locustfile.py): mostly
#: mid-size lists, some short ones, a few long ones; about 470 candidates per request on average.
LOAD_MIX = "100:3,400:6,2000:1"

#: Candidates per request in the size sweep (benchmarks/run_all.py, ``bench_service --sizes``).
SWEEP_SIZES = (10, 30, 100, 300, 1000, 3000, 10_000)
#: Candidate ids in one sweep workload's bodies, about: large requests get fewer distinct bodies, so
#: that a wrk script stays a few MB (the service caches nothing per body, so repeats cost the same).
SWEEP_IDS_PER_WORKLOAD = 100_000

#: Prefix of the machine-readable line printed by the wrk script's ``done()``.
WRK_MARKER = "WRKJSON "


@dataclass(frozen=True)
class WorkloadFiles:
    """Files written for one named workload."""

    name: str
    n_candidates: int
    bodies: Path
    wrk_script: Path


def posterior_shapes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Beta click-through posteriors: alpha = 1 + [0, 1999] clicks, beta = 20 alpha + 1 + [0, 4999].

    The feature table, the kernel benchmark and the load tests all draw their parameters from here.
    """
    rng = np.random.default_rng(seed)
    alpha = 1.0 + rng.integers(0, 2000, size=n)
    beta = 20.0 * alpha + 1.0 + rng.integers(0, 5000, size=n)
    return alpha, beta


def write_table(path: str | Path, n_entities: int = DEFAULT_ENTITIES, seed: int = 0) -> Path:
    """Write a CSV feature table of Beta click-through posteriors.

    Columns are ``entity_id,alpha,beta`` with ids ``c0`` .. ``c{n_entities-1}``. ``alpha`` is 1 plus a uniform
    integer in [0, 1999] (clicks) and ``beta`` is ``20 * alpha + 1`` plus a uniform integer in [0, 4999]
    (non-clicks), giving click-through rates of a few percent, as in production.

    Args:
        path: Destination file; parent directories must exist.
        n_entities: Number of rows.
        seed: Seed for ``numpy.random.default_rng``.

    Returns:
        The path written.
    """
    alpha, beta = posterior_shapes(n_entities, seed)
    path = Path(path)
    # .tolist() yields Python floats, whose repr is plain ("1234.0"); numpy 2 scalars would print as
    # "np.float64(1234.0)".
    lines = [f"c{i},{a!r},{b!r}\n" for i, (a, b) in enumerate(zip(alpha.tolist(), beta.tolist(), strict=True))]
    with path.open("w", encoding="ascii", newline="") as f:
        f.write("entity_id,alpha,beta\n")
        f.writelines(lines)
    return path


def make_bodies(
    n_candidates: int,
    n_bodies: int = DEFAULT_BODIES,
    id_space: int = DEFAULT_ID_SPACE,
    top_k: int = DEFAULT_TOP_K,
    seed: int = 0,
) -> list[bytes]:
    """Build JSON bodies for ``POST /predict``.

    Each body is ``{"user_id": "u<i>", "candidates": [...], "top_k": top_k}`` with ``n_candidates`` ids drawn
    uniformly without replacement from ``c0`` .. ``c{id_space-1}``.

    Args:
        n_candidates: Candidates per request.
        n_bodies: Number of distinct bodies.
        id_space: Size of the id space candidates are drawn from.
        top_k: Value of the ``top_k`` field.
        seed: Seed for ``numpy.random.default_rng``.

    Returns:
        The encoded bodies, compact JSON without newlines.

    Raises:
        ValueError: If ``n_candidates`` exceeds ``id_space``.
    """
    if n_candidates > id_space:
        raise ValueError(f"n_candidates must be <= id_space, got {n_candidates} > {id_space}")
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(n_bodies):
        ids = rng.choice(id_space, size=n_candidates, replace=False).tolist()
        body = {"user_id": f"u{i}", "candidates": [f"c{j}" for j in ids], "top_k": top_k}
        bodies.append(orjson.dumps(body))
    return bodies


def make_bodies_from_ids(
    ids: Sequence[str],
    n_candidates: int,
    n_bodies: int = DEFAULT_BODIES,
    top_k: int = DEFAULT_TOP_K,
    seed: int = 0,
) -> list[bytes]:
    """Build ``POST /predict`` bodies like :func:`make_bodies`, drawing candidates from given ids.

    For catalogues that are not the synthetic ``c<i>`` table, e.g. a staging catalogue exported as CSV.

    Args:
        ids: The catalogue to draw from, without replacement within a body.
        n_candidates: Candidates per request.
        n_bodies: Number of distinct bodies.
        top_k: Value of the ``top_k`` field.
        seed: Seed for ``numpy.random.default_rng``.

    Returns:
        The encoded bodies, compact JSON without newlines.

    Raises:
        ValueError: If ``n_candidates`` exceeds ``len(ids)``.
    """
    if n_candidates > len(ids):
        raise ValueError(f"n_candidates must be <= the {len(ids)} catalogue ids, got {n_candidates}")
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(n_bodies):
        picks = rng.choice(len(ids), size=n_candidates, replace=False).tolist()
        body = {"user_id": f"u{i}", "candidates": [ids[j] for j in picks], "top_k": top_k}
        bodies.append(orjson.dumps(body))
    return bodies


def add_segments(bodies: Sequence[bytes], segments: int = SEGMENTS, seed: int = 0) -> list[bytes]:
    """``bodies`` with a ``"segment": "seg<k>"`` each, k drawn Zipf-like from [0, segments) (weight 1 / (k+1)**1.1)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, segments + 1) ** 1.1
    picks = rng.choice(segments, size=len(bodies), p=weights / weights.sum()).tolist()
    return [orjson.dumps({**orjson.loads(body), "segment": f"seg{k}"}) for body, k in zip(bodies, picks)]


def sweep_name(n_candidates: int) -> str:
    """Workload name of one sweep size, e.g. ``N300``."""
    return f"N{n_candidates}"


def write_sweep(
    out_dir: str | Path,
    sizes: Iterable[int] = SWEEP_SIZES,
    n_entities: int = DEFAULT_ENTITIES,
    seed: int = 0,
) -> tuple[Path, dict[str, WorkloadFiles]]:
    """Write ``table.csv`` and one workload per request size, named by :func:`sweep_name`.

    Each size gets ``SWEEP_IDS_PER_WORKLOAD // n`` bodies, clamped to [16, DEFAULT_BODIES]. Candidates are
    drawn without replacement within a body from DEFAULT_ID_SPACE ids, so even 10,000 candidates are distinct
    and about 9% of them unknown at every size.

    Returns:
        The table path and the files per workload name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = write_table(out / "table.csv", n_entities=n_entities, seed=seed)
    files: dict[str, WorkloadFiles] = {}
    for offset, n in enumerate(sizes, start=1):
        name = sweep_name(n)
        n_bodies = max(16, min(DEFAULT_BODIES, SWEEP_IDS_PER_WORKLOAD // n))
        bodies = make_bodies(n, n_bodies=n_bodies, seed=seed + 1000 + offset)
        bodies_path = out / f"{name}.jsonl"
        bodies_path.write_bytes(b"".join(b + b"\n" for b in bodies))
        files[name] = WorkloadFiles(name, n, bodies_path, write_wrk_script(out / f"{name}.lua", bodies))
    return table, files


def _lua_long_string(text: str) -> str:
    """Quote ``text`` as a Lua long-bracket string whose closing bracket cannot occur inside it."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    # Lua drops a newline directly after the opening bracket; JSON bodies never start with one.
    return f"[{eq}[{text}]{eq}]"


_WRK_SCRIPT_TEMPLATE = """\
-- Generated by benchmarks/workload.py: POSTs {n} JSON bodies to /predict in rotation.
-- Each wrk thread starts at a different offset so threads do not send the same body in lockstep.

local bodies = {{
{bodies}
}}

local headers = {{ ["Content-Type"] = "application/json" }}
local prepared = {{}}
local cursor = 1
local thread_count = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  -- Formatting once per thread keeps request() a table lookup (see wrk SCRIPTING).
  for i, body in ipairs(bodies) do
    prepared[i] = wrk.format("POST", "/predict", headers, body)
  end
  cursor = ((thread_index or 0) * 37) % #prepared + 1
end
"""

#: The end of every wrk script here: ``request()`` hands out ``prepared`` in rotation from ``cursor``, and ``done()``
#: prints the one result line :func:`parse_wrk_output` reads.
WRK_SCRIPT_TAIL = (
    """
function request()
  local r = prepared[cursor]
  cursor = cursor % #prepared + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '"""
    + WRK_MARKER
    + """{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p99.9":%d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""
)


def write_wrk_script(path: str | Path, bodies: Sequence[bytes]) -> Path:
    """Write a wrk Lua script that POSTs ``bodies`` to ``/predict`` in rotation.

    The script's ``done()`` prints one line ``WRKJSON {...}`` holding requests, duration, bytes, error counts
    (connect/read/write/status/timeout) and latency min/mean/max and p50/p90/p99/p99.9, all in
    microseconds; parse it with :func:`parse_wrk_output`.

    Args:
        path: Destination file.
        bodies: Request bodies, ASCII JSON as produced by :func:`make_bodies`.

    Returns:
        The path written.

    Raises:
        ValueError: If ``bodies`` is empty.
    """
    if not bodies:
        raise ValueError("bodies must not be empty")
    quoted = ",\n".join(_lua_long_string(b.decode("ascii")) for b in bodies)
    script = _WRK_SCRIPT_TEMPLATE.format(n=len(bodies), bodies=quoted) + WRK_SCRIPT_TAIL
    path = Path(path)
    path.write_text(script, encoding="ascii")
    return path


def parse_wrk_output(stdout: str) -> dict[str, object]:
    """Return the JSON object from the ``WRKJSON`` line of a wrk run using a script from this module.

    Raises:
        ValueError: If the output holds no such line.
    """
    match = re.search(rf"^{re.escape(WRK_MARKER)}(.*)$", stdout, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {WRK_MARKER.strip()} line in wrk output:\n{stdout}")
    result: dict[str, object] = orjson.loads(match.group(1))
    return result


def write_workloads(
    out_dir: str | Path,
    names: Iterable[str] = tuple(WORKLOADS),
    n_entities: int = DEFAULT_ENTITIES,
    n_bodies: int = DEFAULT_BODIES,
    seed: int = 0,
) -> tuple[Path, dict[str, WorkloadFiles]]:
    """Write ``table.csv`` and, for each named workload, its bodies (JSON lines) and wrk script.

    Args:
        out_dir: Directory to write into; created if missing.
        names: Keys of :data:`WORKLOADS`.
        n_entities: Rows in the feature table.
        n_bodies: Bodies per workload.
        seed: Base seed; each workload offsets it so workloads do not share id draws.

    Returns:
        The table path and the files per workload name.

    Raises:
        KeyError: If a name is not in :data:`WORKLOADS`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = write_table(out / "table.csv", n_entities=n_entities, seed=seed)
    files: dict[str, WorkloadFiles] = {}
    for offset, name in enumerate(names, start=1):
        base = SEGMENTED_WORKLOADS.get(name)
        if base is None:
            n_candidates = WORKLOADS[name]
            bodies = make_bodies(n_candidates, n_bodies=n_bodies, seed=seed + offset)
        else:
            # The base workload's bodies as they are in the default order of WORKLOADS.
            n_candidates = WORKLOADS[base]
            base_seed = seed + list(WORKLOADS).index(base) + 1
            bodies = add_segments(make_bodies(n_candidates, n_bodies=n_bodies, seed=base_seed), seed=base_seed)
        bodies_path = out / f"{name}.jsonl"
        bodies_path.write_bytes(b"".join(b + b"\n" for b in bodies))
        script = write_wrk_script(out / f"{name}.lua", bodies)
        files[name] = WorkloadFiles(name, n_candidates, bodies_path, script)
    return table, files


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: ``python -m benchmarks.workload --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workload", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names (default: all)")
    parser.add_argument("--entities", type=int, default=DEFAULT_ENTITIES, help="rows in table.csv")
    parser.add_argument("--bodies", type=int, default=DEFAULT_BODIES, help="request bodies per workload")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; expected some of {sorted(WORKLOADS)}")
    table, files = write_workloads(args.out, names, n_entities=args.entities, n_bodies=args.bodies, seed=args.seed)
    print(table)
    for wf in files.values():
        print(wf.bodies)
        print(wf.wrk_script)


if __name__ == "__main__":
    main()
