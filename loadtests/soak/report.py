"""The readable summary of a soak's JSON document: set-up, saturation, per-phase table, answers by kind, /health,
counters, CPU, RSS over time and the verdict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loadtests.soak.outcomes import DEGRADED, OK


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _table(rows: list[tuple[str, ...]], left: Sequence[int] = (0,)) -> list[str]:
    """Columns padded to their widest cell; those in ``left`` flush left, the others flush right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]


def _not_ready(health: dict[str, int]) -> str:
    total = sum(health.values())
    bad = sum(n for s, n in health.items() if not s.startswith("200"))
    return f"{bad}/{total}" if total else "-"


def report(doc: dict[str, Any]) -> list[str]:
    """The readable summary."""
    env, cfg, fig = doc["environment"], doc["config"], doc["figures"]
    lines = [
        f"# {env['machine']}, {env['cpu']}, {env['cpus_available']} CPUs; {env['python']}; load average at start "
        f"{env['load_average']}",
        f"# service: 1 worker on cpu {cfg['server_cpu']}, Vertex source through the emulator, cache on, default "
        f"settings{' + ' + cfg['serve_args'] if cfg['serve_args'] else ''}; emulator {cfg['latency_ms']:g} +- "
        f"{cfg['jitter_ms']:g} ms per read and the client on cpu {cfg['client_cpu']}; {cfg['candidates']} "
        f"candidates per request from {cfg['id_space']:,} ids ({cfg['entities']:,} in the store)",
    ]
    sat = doc["saturation"]
    if sat["steps"]:
        steps = ", ".join(f"c{s['connections']} {s['rps']:,.0f} req/s (p99 {s['p99_ms']:.1f} ms)" for s in sat["steps"])
        lines.append(f"saturation (wrk, closed loop, {cfg['saturation_s']} s per step): {steps}")
        lines.append(
            f"saturating load {sat['saturating_rps']:,.0f} req/s -> soak rate {cfg['load_fraction']:.0%} = "
            f"{cfg['rate']:,.0f} req/s"
        )
    else:
        lines.append(f"soak rate {cfg['rate']:,.0f} req/s (given; saturation not measured)")
    lines.append(f"prewarm: {doc['prewarm']['requests']} requests in {doc['prewarm']['passes']} pass(es)")
    ov = fig["overall"]
    lines.append(
        f"soak: {fig['duration_s']:.0f} s, sent {ov['sent']:,} ({ov['sent_per_s']:,.0f}/s of {ov['target_rate']:,.0f} "
        f"wanted), answered {ov['answered_per_s']:,.0f}/s; p50 {_ms(ov['latency']['p50_ms'])} ms, p99 "
        f"{_ms(ov['latency']['p99_ms'])} ms, p99.9 {_ms(ov['latency']['p999_ms'])} ms, max "
        f"{_ms(ov['latency']['max_ms'])} ms (all answers, from the due time); dispatch lag p99 "
        f"{_ms(ov['dispatch_lag_ms']['p99_ms'])} ms; {ov['peak_connections']} connections at most"
    )
    lines.append("")
    header = ("phase", "s", "sent", "answered/s", "ok", "degraded", "503 store", "503 shed", "other", "p50 ms",
              "p99 ms", "p99 ok ms", "health 503", "store calls")  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for p in fig["phases"]:
        k = p["by_kind"]
        other = sum(n for name, n in k.items() if name not in (OK, DEGRADED, "503 feature_source_unavailable",
                                                                "503 overloaded"))  # fmt: skip
        store = p["store"]
        rows.append((
            p["label"], f"{p['start_s']:.0f}-{p['end_s']:.0f}", f"{p['sent']:,}", f"{p['answered_per_s']:,.0f}",
            f"{k.get(OK, 0):,}", f"{k.get(DEGRADED, 0):,}", f"{k.get('503 feature_source_unavailable', 0):,}",
            f"{k.get('503 overloaded', 0):,}", f"{other:,}", _ms(p["latency"]["p50_ms"]), _ms(p["latency"]["p99_ms"]),
            _ms(p["latency_ok"]["p99_ms"]), _not_ready(p["health"]), "-" if store is None else f"{store['calls']:,}",
        ))  # fmt: skip
    lines += _table(rows)
    lines.append("")
    lines.append("answers by kind:")
    for name, n in ov["by_kind"].items():
        example = fig["examples"].get(name, "")
        lines.append(f"  {name:<34} {n:>12,}" + (f"   e.g. {example[:120]}" if example else ""))
    h = fig["health"]
    lines.append(f"/health: {h['probes']} probes: " + "; ".join(f"{s} x{n}" for s, n in h["states"].items()))
    shown = h["transitions"][:16]
    lines.append(
        "  changes: "
        + ", ".join(f"{t['t_s']:.0f} s {t['state'].split(':')[0]}" for t in shown)
        + (f", ... ({len(h['transitions'])} in all)" if len(h["transitions"]) > len(shown) else "")
    )
    m = fig["server_metrics"] or {}
    if not fig["server_metrics"]:
        lines.append("server counters: /metrics did not answer at the start or the end")
    requests = {k.split("status=")[1].strip('"}'): int(v) for k, v in m.items()
                if k.startswith("mab_requests_total") and 'endpoint="/predict"' in k}  # fmt: skip
    hits = m.get('mab_cache_lookups_total{result="hit"}', 0.0)
    misses = m.get('mab_cache_lookups_total{result="miss"}', 0.0)
    lines.append(
        f"server counters over the soak: /predict by status {requests}; degraded fetches "
        f"{m.get('mab_degraded_fetches_total', 0):,.0f}, unread candidates "
        f"{m.get('mab_unread_candidates_total', 0):,.0f}, "
        f"shed {m.get('mab_shed_requests_total', 0):,.0f}; cache hit ratio "
        f"{hits / (hits + misses) if hits + misses else 0:.5f} ({misses:,.0f} misses), stale served "
        f"{m.get('mab_cache_stale_served_total', 0):,.0f}"
    )
    fetch_errors = {k: int(v) for k, v in m.items() if k.startswith("mab_feature_fetch_errors_total")}
    if fetch_errors:
        lines.append(f"  fetch errors: {fetch_errors}")
    st = fig["store"]
    lines.append(
        f"store (emulator): {st.get('calls', 0):,} calls, {st.get('ids', 0):,} ids, injected "
        f"{st.get('injected_unavailable', 0):,} UNAVAILABLE and {st.get('injected_breaks', 0):,} breaks; "
        f"{st['restarts']} kill(s), down "
        f"{', '.join(f'{d:.1f} s' for d in st['down_s']) or '-'}"
    )
    c = fig["cpu"]
    lines.append(
        f"CPU (share of a core): server {c['server']:.0%}, other work on the server's core "
        f"{c['other_on_server_core']:.0%}; "
        f"client {c['client']:.0%} and emulator {c['emulator']:.0%} on cpu {cfg['client_cpu']}, other work there "
        f"{c['other_on_client_core']:.0%}"
    )
    lines.append("")
    lines += rss_lines(fig["rss"], cfg)
    logs = fig["server_log"]
    lines.append(f"server log: {logs['levels']}")
    for message, n in logs["messages"].items():
        lines.append(f"  {n:>7,} x {message}")
    lines.append("")
    for note in fig["notes"]:
        lines.append(f"note: {note}")
    if fig["failed"]:
        lines.append("verdict: FAIL")
        lines += [f"  {reason}" for reason in fig["failures"]]
    else:
        lines.append(
            "verdict: PASS (no 5xx but 503s that say why, no hangs, no transport errors or malformed answers, no RSS "
            "growth beyond the limits)"
        )
    return lines


def rss_lines(rss: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    series = rss["series"]
    if not series:
        return ["RSS: no samples"]
    t = np.array([s[0] for s in series])
    mb = np.array([s[1] for s in series]) / 1024
    bucket = max(cfg["rss_interval_s"], cfg["duration_s"] / 20)
    lines = [f"RSS of the worker, MB (sampled every {cfg['rss_interval_s']:g} s), per {bucket:g} s:"]
    rows: list[tuple[str, ...]] = [("t s", "median", "min", "max", "")]
    lo, hi = float(mb.min()), float(mb.max())
    for b in range(int(np.ceil((t.max() + 1e-9) / bucket))):
        sel = (t >= b * bucket) & (t < (b + 1) * bucket)
        if not sel.any():
            continue
        med = float(np.median(mb[sel]))
        bar = "#" * (1 + int(30 * (med - lo) / (hi - lo))) if hi > lo else "#"
        rows.append((f"{b * bucket:g}", f"{med:.1f}", f"{mb[sel].min():.1f}", f"{mb[sel].max():.1f}", bar))
    lines += ["  " + row for row in _table(rows, left=(4,))]
    if not rss["judged"]:
        lines.append("RSS verdict: not judged (too few samples after the warm-up)")
        return lines
    verdict = "GROWING" if rss["grew"] else "no growth beyond the limits"
    lines.append(
        f"RSS verdict: {verdict}. After the {cfg['warmup_s']:g} s warm-up: slope {rss['slope_mb_per_min']:+.3f} MB/min "
        f"over {rss['post_warmup_samples']} samples; median of the first {rss['window_s']:.0f} s "
        f"{rss['first_window_mb']:.1f} MB, of the last {rss['window_s']:.0f} s {rss['last_window_mb']:.1f} MB "
        f"({rss['growth_mb']:+.1f} MB); start {rss['start_mb']:.1f} MB, max {rss['max_mb']:.1f} MB (limits: "
        f"{cfg['rss_slope_limit_mb_min']:g} MB/min and {cfg['rss_growth_limit_mb']:g} MB, both exceeded to fail)"
    )
    return lines
