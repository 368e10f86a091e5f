"""The size-sweep figure: throughput, cost per candidate and p99 against candidates per request.

Called by benchmarks/run_all.py; also ``python -m benchmarks.plot results.json out.png`` redraws the figure from
a saved run without measuring again.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

#: Line style per target, so the figure reads the same in every run.
STYLES: dict[str, dict[str, Any]] = {
    "project": {"label": "mab_service", "color": "#1f77b4", "marker": "o"},
    "go": {"label": "Go (fasthttp, encoding/json)", "color": "#2ca02c", "marker": "s"},
    "plain": {"label": "plain Starlette + numpy", "color": "#d62728", "marker": "^"},
}

#: (key in a sweep row, axis title); cpu_ns_per_pair is derived in run_all.sweep_rows.
PANELS = (
    ("rps", "requests / s"),
    ("pairs_per_s", "candidates ranked / s"),
    ("cpu_ns_per_pair", "server CPU ns per candidate"),
    ("p99_ms", "p99 latency, ms"),
)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Draw one log-log panel per metric in :data:`PANELS`, one line per target, and save a PNG.

    Args:
        rows: Sweep rows with ``target``, ``n_candidates`` and the metrics of :data:`PANELS`.
        path: Where to write the PNG.
        title: Figure title (machine and setup).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    targets = [t for t in STYLES if any(r["target"] == t for r in rows)]
    targets += sorted({r["target"] for r in rows} - set(targets))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (key, label) in zip(axes.flat, PANELS):
        for target in targets:
            points = sorted((r["n_candidates"], r[key]) for r in rows if r["target"] == target and r.get(key))
            if not points:
                continue
            xs, ys = zip(*points)
            style = STYLES.get(target, {"label": target})
            ax.plot(xs, ys, linewidth=1.8, markersize=5, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("candidates per request")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json written by benchmarks.run_all")
    parser.add_argument("png", type=Path, help="output PNG")
    args = parser.parse_args(argv)
    doc = orjson.loads(args.results.read_bytes())
    print(plot_sweep(doc["sweep"]["rows"], args.png, doc["sweep"]["title"]))


if __name__ == "__main__":
    main()
