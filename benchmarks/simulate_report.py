"""The learning simulator's results (benchmarks/simulate.py): runs, their summaries, ratios, targets, table and plot.

A :class:`Run` is one policy on one replication; ``summarize`` turns a policy's runs into the figures of the
results document (``--json``), ``ratios`` and ``targets`` compare policies paired by seed, and ``print_table`` and
``plot_regret`` present the document.
"""

from __future__ import annotations

import importlib.metadata
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bench_service
from benchmarks.scenarios import Plan

#: Points kept per cumulative-regret curve in the JSON output and the plot.
CURVE_POINTS = 500
#: The libraries the service's regret is compared with (issue 12: within 10% of theirs).
LIBRARIES = ("mabwiser", "bayesianbandits")
#: How each policy is drawn; a variant of the service (with a segment, with a half-life) is red beside its blue.
STYLES: dict[str, dict[str, Any]] = {
    "service": {"label": "mab_service over HTTP", "color": "#1f77b4"},
    "mabwiser": {"label": "MABWiser ThompsonSampling", "color": "#ff7f0e"},
    "bayesianbandits": {"label": "bayesianbandits Agent + ThompsonSampling", "color": "#2ca02c"},
    "numpy": {"label": "numpy Beta-Bernoulli TS (service's counting)", "color": "#9467bd", "linestyle": "--"},
    "numpy-outcomes": {"label": "numpy Beta-Bernoulli TS (libraries' counting)", "color": "#8c564b", "linestyle": ":"},
    "random": {"label": "random ranking", "color": "#7f7f7f"},
    "service-segments": {"label": "mab_service over HTTP, with segment", "color": "#d62728"},
    "mabwiser-segments": {"label": "MABWiser ThompsonSampling per segment", "color": "#ff7f0e"},
    "numpy-backoff": {"label": "numpy back-off to the global posterior", "color": "#e377c2", "linestyle": "--"},
    "service-half-life": {"label": "mab_service over HTTP, --half-life-s", "color": "#d62728"},
    "numpy-discounted": {"label": "numpy discounted TS, same half-life", "color": "#e377c2", "linestyle": "--"},
}


@dataclass
class Run:
    """One policy on one replication."""

    policy: str
    seed: int
    regret: np.ndarray
    """Per-round regret, shape (rounds,)."""
    clicks: int
    policy_cpu_s: float
    """CPU time of this process inside the policy's choose/learn calls (for the service: the HTTP client)."""
    wall_s: float
    server_cpu_s: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    regret_by_group: dict[str, float] = field(default_factory=dict)
    """Regret within the environment's groups of rounds (the segments environment: busy and sparse segments)."""

    @property
    def final_regret(self) -> float:
        return float(self.regret.sum())

    @property
    def decisions_per_core_s(self) -> float:
        """Rounds per CPU-second of whatever decides and learns: the server for the service, else the policy."""
        cpu = self.server_cpu_s if self.server_cpu_s is not None else self.policy_cpu_s
        return len(self.regret) / max(cpu, 1e-9)


def curve_summary(runs: Sequence[Run], points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """Mean, min and max over seeds of the cumulative regret, at up to ``points`` rounds (the last included)."""
    cumulative = np.stack([np.cumsum(r.regret) for r in runs])
    rounds = cumulative.shape[1]
    at = np.unique(np.linspace(0, rounds - 1, min(points, rounds)).round().astype(int))
    return {
        "round": (at + 1).tolist(),
        "mean": cumulative[:, at].mean(axis=0).tolist(),
        "min": cumulative[:, at].min(axis=0).tolist(),
        "max": cumulative[:, at].max(axis=0).tolist(),
    }


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """Figures of one policy over its seeds."""
    finals = np.array([r.final_regret for r in runs])
    rounds = sum(len(r.regret) for r in runs)
    policy_cpu = sum(r.policy_cpu_s for r in runs)
    out: dict[str, Any] = {
        "final_regret_mean": float(finals.mean()),
        "final_regret_sd": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "final_regret_per_seed": finals.tolist(),
        "clicks_per_round": sum(r.clicks for r in runs) / rounds,
        "decisions_per_core_s": rounds / max(sum(r.server_cpu_s or r.policy_cpu_s for r in runs), 1e-9),
        "decisions_per_core_s_per_seed": [r.decisions_per_core_s for r in runs],
        "policy_cpu_us_per_decision": 1e6 * policy_cpu / rounds,
        "decisions_per_wall_s": rounds / sum(r.wall_s for r in runs),
        "curve": curve_summary(runs),
        "regret_by_group": {g: float(np.mean([r.regret_by_group[g] for r in runs])) for g in runs[0].regret_by_group},
    }
    if any(r.server_cpu_s is not None for r in runs):
        out["server_cpu_us_per_decision"] = 1e6 * sum(r.server_cpu_s or 0.0 for r in runs) / rounds
        out["checks"] = [r.checks for r in runs]
    return out


def paired_ratio(mine: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Ratio of mean final regrets (with its standard error over seeds, the two taken as independent) and the range
    of the per-seed ratios (paired: same environment and clicks)."""
    per_seed = mine / theirs
    ratio = float(mine.mean() / theirs.mean())
    return {
        "regret_ratio": ratio,
        "regret_ratio_se": ratio * float(np.hypot(_relative_se(mine), _relative_se(theirs))),
        "regret_ratio_per_seed_min": float(per_seed.min()),
        "regret_ratio_per_seed_max": float(per_seed.max()),
    }


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Service / library: of the mean final regrets (:func:`paired_ratio`) and of decisions/s/core."""
    out: dict[str, dict[str, float]] = {}
    if "service" not in summary:
        return out
    mine = np.array(summary["service"]["final_regret_per_seed"])
    for lib in LIBRARIES:
        if lib not in summary:
            continue
        out[lib] = paired_ratio(mine, np.array(summary[lib]["final_regret_per_seed"])) | {
            "decisions_per_core_s_ratio": summary["service"]["decisions_per_core_s"]
            / summary[lib]["decisions_per_core_s"],
        }
    return out


def targets(summary: dict[str, dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Each of the plan's targets whose two policies ran: the ratio, and whether it is met."""
    out = []
    for target in plan.targets:
        if target.policy in summary and target.baseline in summary:
            mine = np.array(summary[target.policy]["final_regret_per_seed"])
            theirs = np.array(summary[target.baseline]["final_regret_per_seed"])
            r = paired_ratio(mine, theirs)
            out.append(
                {"policy": target.policy, "baseline": target.baseline, "target": target.describe()}
                | r
                | {"met": target.met(r["regret_ratio"])}
            )
    return out


def _relative_se(values: np.ndarray) -> float:
    """Standard error of the mean over seeds, relative to the mean (0 for a single seed)."""
    if len(values) < 2:
        return 0.0
    return float(values.std(ddof=1) / np.sqrt(len(values)) / values.mean())


def environment() -> dict[str, Any]:
    """Machine, Python and package versions, with the two libraries'."""
    env = bench_service.environment()
    env.pop("wrk", None)
    for name in ("mabwiser", "bayesianbandits", "scikit-learn", "scipy"):
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    return env


def title(config: dict[str, Any]) -> str:
    return f"{config['title']}; {len(config['seeds'])} seeds (band: min-max)"


def plot_regret(doc: dict[str, Any], path: Path) -> Path:
    """Mean cumulative regret against rounds, one line per policy, with the min-max band over seeds.

    Two panels: every policy, and the learning ones alone (random ranking left out) on their own scale. Rounds at
    which the world changes (the drift environment's phases) are dotted lines.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    learners = [name for name in doc["policies"] if name != "random"]
    panels = [list(doc["policies"])] + ([learners] if "random" in doc["policies"] and learners else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), constrained_layout=True, squeeze=False)
    for ax, names in zip(axes[0], panels):
        for name in names:
            res = doc["policies"][name]
            curve = res["curve"]
            style = STYLES.get(name, {"label": name})
            label = f"{style['label']}: {res['final_regret_mean']:,.0f}"
            ax.plot(curve["round"], curve["mean"], linewidth=1.8, **(style | {"label": label}))
            band = {"color": style.get("color"), "alpha": 0.15, "linewidth": 0}
            ax.fill_between(curve["round"], curve["min"], curve["max"], **band)
        for mark in doc["config"]["marks"]:
            ax.axvline(mark, color="#999999", linestyle=":", linewidth=1)
        ax.set_xlabel("round (one decision)")
        ax.set_ylabel("cumulative regret (expected clicks lost)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(title="mean final regret", loc="upper left", fontsize=8)
    if len(panels) == 2:
        axes[0][1].set_title("without random ranking", fontsize=9)
    fig.suptitle(textwrap.fill(title(doc["config"]), 170), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(doc: dict[str, Any]) -> None:
    env, config = doc["environment"], doc["config"]
    print(f"# {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs; {env['python']}")
    print(f"# --env {config['env']}: {title(config)}; {config['rounds']:,} rounds")
    services = [name for name in doc["policies"] if "checks" in doc["policies"][name]]
    if services and config.get("cores"):
        cores = ",".join(map(str, config["cores"]))
        print(f"# seeds side by side on cpus {cores}: each seed's simulator and its service (1 worker, one keep-alive")
        print("# HTTP connection on loopback) pinned to one of them")
    elif services:
        print(f"# service: 1 worker pinned to cpu {config['server_cpus']}, one keep-alive HTTP connection on loopback")
    groups = list(next(iter(doc["policies"].values()))["regret_by_group"])
    header = ("policy", "final regret", "sd", *(f"regret: {g}" for g in groups), "clicks/round", "decisions/s/core")
    rows = [(*header, "us/decision", "decisions/s wall")]
    for name, res in doc["policies"].items():
        cost = res.get("server_cpu_us_per_decision", res["policy_cpu_us_per_decision"])
        rows.append(
            (
                name,
                f"{res['final_regret_mean']:,.1f}",
                f"{res['final_regret_sd']:,.1f}",
                *(f"{res['regret_by_group'][g]:,.1f}" for g in groups),
                f"{res['clicks_per_round']:.3f}",
                f"{res['decisions_per_core_s']:,.0f}",
                f"{cost:,.0f}",
                f"{res['decisions_per_wall_s']:,.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for name in services:
        service = doc["policies"][name]
        print(
            f"{name}: server {service['server_cpu_us_per_decision']:,.0f} us CPU per decision (rewards included); "
            f"client {service['policy_cpu_us_per_decision']:,.0f} us per decision (HTTP + JSON, not counted above)"
        )
        bad = [c for c in service["checks"] if not c["ok"]]
        print(f"{name} counts vs simulator: {'all agree' if not bad else f'MISMATCH {bad}'}")
    for lib, r in doc["ratios"].items():
        print(
            f"service/{lib}: regret {r['regret_ratio']:.3f}x +- {r['regret_ratio_se']:.3f} (per seed "
            f"{r['regret_ratio_per_seed_min']:.2f}-"
            f"{r['regret_ratio_per_seed_max']:.2f}), decisions/s per core {r['decisions_per_core_s_ratio']:.1f}x"
        )
    for t in doc["targets"]:
        print(
            f"target {t['policy']}/{t['baseline']} {t['target']}: {t['regret_ratio']:.3f}x +- "
            f"{t['regret_ratio_se']:.3f} (per seed {t['regret_ratio_per_seed_min']:.2f}-"
            f"{t['regret_ratio_per_seed_max']:.2f}): {'met' if t['met'] else 'NOT MET'}"
        )
