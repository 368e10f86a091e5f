"""What the soak measured, as one JSON-ready document: answers by kind, latency per phase and over time, /health,
server and store counters, CPU shares, the RSS verdict, and whether the run failed."""

from __future__ import annotations

import argparse
import contextlib
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from benchmarks import bench_service
from loadtests.soak.outcomes import OK, UNSENT, is_answer, is_failure

if TYPE_CHECKING:
    from loadtests.soak.runner import Soak


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999), "max_ms": float(values.max())}


def outcome_figures(due: np.ndarray, latency: np.ndarray, kind: np.ndarray, names: list[str], span_s: float) -> dict[
    str, Any
]:  # fmt: skip
    """Counts by kind, rates and latency percentiles of a set of requests."""
    counts = {names[c]: int(n) for c, n in zip(*np.unique(kind, return_counts=True)) if n}
    answered = np.isin(kind, [i for i, n in enumerate(names) if is_answer(n)])
    ok = np.isin(kind, [i for i, n in enumerate(names) if n == OK])
    return {
        "sent": len(due),
        "answered": int(answered.sum()),
        "answered_per_s": float(answered.sum() / span_s) if span_s > 0 else 0.0,
        "by_kind": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "latency": percentiles(latency[answered]),
        "latency_ok": percentiles(latency[ok]),
    }


def rss_verdict(samples: list[tuple[float, int]], args: argparse.Namespace, end_s: float) -> dict[str, Any]:
    """Growth after the warm-up: slope of a least-squares line (MB/min) and first-vs-last window medians."""
    t = np.array([s[0] for s in samples], dtype=np.float64)
    mb = np.array([s[1] for s in samples], dtype=np.float64) / 1024
    after = t >= args.warmup_s
    out: dict[str, Any] = {
        "samples": len(samples),
        "start_mb": float(mb[0]) if len(mb) else None,
        "end_mb": float(mb[-1]) if len(mb) else None,
        "max_mb": float(mb.max()) if len(mb) else None,
        "post_warmup_samples": int(after.sum()),
        "slope_mb_per_min": None,
        "first_window_mb": None,
        "last_window_mb": None,
        "growth_mb": None,
        "grew": False,
        "judged": False,
    }
    if after.sum() < 3 or np.ptp(t[after]) <= 0:
        return out
    slope = float(np.polyfit(t[after] / 60.0, mb[after], 1)[0])
    window = min(args.rss_window_s, (end_s - args.warmup_s) / 2)
    first = mb[after & (t < args.warmup_s + window)]
    last = mb[after & (t >= end_s - window)]
    if len(first) == 0 or len(last) == 0:
        return out | {"slope_mb_per_min": slope}
    growth = float(np.median(last) - np.median(first))
    return out | {
        "slope_mb_per_min": slope,
        "first_window_mb": float(np.median(first)),
        "last_window_mb": float(np.median(last)),
        "window_s": window,
        "growth_mb": growth,
        "grew": slope > args.rss_slope_limit_mb_min and growth > args.rss_growth_limit_mb,
        "judged": True,
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float] | None:
    """Counter increases between two scrapes; None if either scrape failed (the server did not answer /metrics)."""
    if not after or not before:
        return None
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def _store_counts(stats: dict[str, Any]) -> dict[str, int]:
    """Calls (all methods), ids and injected faults from one reading of the emulator's counters."""
    calls = stats.get("calls", {})
    return {
        "calls": int(sum(calls.values())) if isinstance(calls, dict) else int(calls),
        "ids": int(stats.get("ids", 0)),
        "injected_unavailable": int(stats.get("injected_unavailable", 0)),
        "injected_breaks": int(stats.get("injected_breaks", 0)),
    }


def _emulator_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, int] | None:
    """Calls and injected faults between two counter readings (None if the store restarted or was down)."""
    if before is None or after is None or before["incarnation"] != after["incarnation"]:
        return None
    a, b = _store_counts(after), _store_counts(before)
    return {k: a[k] - b[k] for k in a}


def log_summary(path: Path) -> dict[str, Any]:
    """Lines of the server's JSON log by level, and its warning and error messages by kind."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    with contextlib.suppress(OSError), path.open("rb") as f:
        for line in f:
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                levels["(not JSON)"] += 1
                continue
            level = str(doc.get("level", "?")) if isinstance(doc, dict) else "?"
            levels[level] += 1
            if level in ("warning", "error", "critical") and isinstance(doc, dict):
                text = re.sub(r"\d+", "N", str(doc.get("message", "")))[:160]
                messages[f"{level}: {text}"] += 1
    return {"levels": dict(levels), "messages": dict(messages.most_common(12))}


def figures(soak: Soak, args: argparse.Namespace, server_log: Path) -> dict[str, Any]:
    """Everything the report prints, as one JSON-ready document."""
    due, latency, lag, kind, names = soak.records.arrays()
    end_s = soak.end_s
    overall = outcome_figures(due, latency, kind, names, end_s)
    overall["dispatch_lag_ms"] = percentiles(lag)
    overall["target_rate"] = args.rate
    overall["sent_per_s"] = soak.sent / end_s if end_s > 0 else 0.0
    overall["peak_connections"] = soak.client.peak_open
    phases = []
    snaps = soak.snapshots
    for i, phase in enumerate(soak.phases):
        if i >= len(soak.phase_started):
            break
        in_phase = (due >= phase.start_s) & (due < phase.end_s)
        span = min(phase.end_s, end_s) - phase.start_s
        row = outcome_figures(due[in_phase], latency[in_phase], kind[in_phase], names, span)
        row["dispatch_lag_ms"] = percentiles(lag[in_phase])
        health = Counter(s for t, s in soak.health if phase.start_s <= t < phase.end_s)
        before, after = snaps[i], snaps[i + 1] if i + 1 < len(snaps) else snaps[-1]
        row |= {
            "kind": phase.kind,
            "label": phase.label,
            "start_s": phase.start_s,
            "end_s": phase.end_s,
            "health": dict(health),
            "server_metrics": _delta(after.metrics, before.metrics),
            "store": _emulator_delta(before.emulator, after.emulator),
        }
        phases.append(row)
    first, last = snaps[0], snaps[-1]
    scraped = [snap for snap in snaps if snap.metrics]
    span = max(last.t_s - first.t_s, 1e-9)
    server_s = last.server_cpu_s - first.server_cpu_s
    client_s = last.client_cpu_s - first.client_cpu_s
    emulator_s = last.emulator_cpu_s - first.emulator_cpu_s
    health_all = Counter(s for _, s in soak.health)
    transitions = []
    previous = None
    for t, state in soak.health:
        if state != previous:
            transitions.append({"t_s": round(t, 2), "state": state})
            previous = state
    store_totals: Counter[str] = Counter()
    for stats in soak.emulator.final_stats():  # counters start from zero in each incarnation
        store_totals.update(_store_counts(stats))
    bucket_s = max(1.0, args.duration_s / 60)
    timeline = []
    for b in range(int(np.ceil(end_s / bucket_s))):
        sel = (due >= b * bucket_s) & (due < (b + 1) * bucket_s)
        row = outcome_figures(due[sel], latency[sel], kind[sel], names, bucket_s)
        timeline.append({"t_s": b * bucket_s, "by_kind": row["by_kind"], "p99_ms": row["latency"]["p99_ms"]})
    failures = {k: n for k, n in overall["by_kind"].items() if is_failure(k)}
    rss = rss_verdict(soak.rss, args, end_s)
    reasons = [f"{n:,} x {k}" for k, n in failures.items()]
    if soak.stopped:
        reasons.insert(0, soak.stopped)
    if rss["grew"]:
        reasons.append(
            f"RSS grew {rss['slope_mb_per_min']:+.2f} MB/min after the warm-up ({rss['growth_mb']:+.1f} MB from the "
            f"first to the last {rss['window_s']:.0f} s)"
        )
    cpu = {
        "server": server_s / span,
        "other_on_server_core": max(0.0, last.server_core_busy_s - first.server_core_busy_s - server_s)
        / span
        / len(bench_service.cpu_set(args.server_cpu)),
        "client": client_s / span,
        "emulator": emulator_s / span,
        "other_on_client_core": max(0.0, last.client_core_busy_s - first.client_core_busy_s - client_s - emulator_s)
        / span
        / len(bench_service.cpu_set(args.client_cpu)),
    }
    return {
        "duration_s": end_s,
        "overall": overall,
        "examples": soak.records.examples,
        "phases": phases,
        "timeline": {"bucket_s": bucket_s, "buckets": timeline},
        "health": {
            "probes": len(soak.health),
            "states": dict(health_all),
            "examples": soak.health_examples,
            "transitions": transitions,
        },
        "server_metrics": _delta(scraped[-1].metrics, scraped[0].metrics) if len(scraped) > 1 else None,
        "store": dict(store_totals)
        | {
            "restarts": len(soak.emulator.downtimes),
            "down_s": [round(d, 2) for d, _ in soak.emulator.downtimes],
            "restart_s": [round(r, 2) for _, r in soak.emulator.downtimes],
        },
        "cpu": cpu,
        "rss": rss | {"series": [(round(t, 2), kb) for t, kb in soak.rss]},
        "server_log": log_summary(server_log),
        "failed": bool(reasons),
        "failures": reasons,
        "notes": notes(overall, cpu),
    }


def notes(overall: dict[str, Any], cpu: dict[str, float]) -> list[str]:
    """What weakens the figures without failing the run: a busy machine, a client that fell behind."""
    out = []
    if cpu["other_on_server_core"] > 0.1:
        out.append(
            f"other work took {cpu['other_on_server_core']:.0%} of the server's core: the server had that much less "
            "CPU than a quiet machine gives it (the rate was a larger share of its capacity); rerun when it is quiet"
        )
    if cpu["other_on_client_core"] > 0.1:
        out.append(f"other work took {cpu['other_on_client_core']:.0%} of the client's core")
    lag = overall["dispatch_lag_ms"]["p99_ms"]
    if lag is not None and lag > 10:
        out.append(f"the client sent late (dispatch lag p99 {lag:.0f} ms): latencies include its own delay")
    unsent = overall["by_kind"].get(UNSENT, 0)
    if unsent:
        out.append(
            f"{unsent:,} request(s) found no free connection within the timeout ({overall['peak_connections']} open): "
            "the server was not answering as fast as requests came"
        )
    return out
