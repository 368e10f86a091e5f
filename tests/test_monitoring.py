"""The Grafana dashboard and the Prometheus alert rules in deploy/.

Every expression may name only metrics that exist: the service's and the learner's, as the package declares them
(``Counter("mab_requests", ...)`` and the like, anywhere under mab_service/), the fleet's from issue 13's contract
while a build lacks them, and kube-state-metrics' replica counts in the rules. Counters and histograms are read
through ``rate`` or ``increase``, gauges never are. promtool (Debian's ``prometheus`` package) checks the rules and
runs their unit tests (deploy/prometheus-rules.test.yaml), and parses every dashboard expression.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mab_service.fleet.sink import PubSubSink
from tests.conftest import Server

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "prometheus-rules.yaml"
RULES_TEST = DEPLOY / "prometheus-rules.test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
APT_TIMEOUT_S = 600.0
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

#: Metrics of the fleet's service and learner named by issue 13, as name -> type. Where the package declares one,
#: the declaration must agree (test_the_contract_agrees_with_the_declarations).
CONTRACT = {
    "mab_events_published": "counter",
    "mab_events_publish_failures": "counter",
    "mab_events_refused": "counter",
    "mab_events_outbox_messages": "gauge",
    "mab_event_rows_written": "counter",
    "mab_event_rows_failed": "counter",
    "mab_event_rows_pending": "gauge",
    "mab_learner_messages": "counter",
    "mab_learner_windows": "counter",
    "mab_learner_impressions": "counter",
    "mab_learner_rewards": "counter",
    "mab_learner_duplicates": "counter",
    "mab_learner_malformed": "counter",
    "mab_learner_failed_windows": "counter",
    "mab_learner_errors": "counter",
    "mab_learner_writes": "counter",
    "mab_learner_window_seconds": "histogram",
    "mab_learner_lag_seconds": "histogram",
    "mab_learner_last_ack_timestamp_seconds": "gauge",
}
#: kube-state-metrics' series the readiness alerts read (gauges).
KUBE_STATE = {
    "kube_deployment_status_replicas_available": "gauge",
    "kube_deployment_spec_replicas": "gauge",
    "kube_statefulset_status_replicas_ready": "gauge",
    "kube_statefulset_replicas": "gauge",
}
#: What the dashboard must show (the service's and learner's vital signs).
WATCHED = {
    "mab_requests_total",
    "mab_request_duration_seconds_bucket",
    "mab_shed_requests_total",
    "mab_cache_lookups_total",
    "mab_degraded_fetches_total",
    "mab_rewards_total",
    "mab_events_published_total",
    "mab_events_refused_total",
    "mab_events_outbox_messages",
    "mab_learner_impressions_total",
    "mab_learner_lag_seconds_bucket",
    "mab_learner_failed_windows_total",
    "mab_learner_errors_total",
}

_DECLARATION = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|StoredHistogram|CounterMetricFamily|GaugeMetricFamily|HistogramMetricFamily)"
    r"\(\s*\"(mab_[a-z0-9_]+)\""
)
_KINDS = {
    "Counter": "counter",
    "CounterMetricFamily": "counter",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "Histogram": "histogram",
    "StoredHistogram": "histogram",
    "HistogramMetricFamily": "histogram",
    "Summary": "summary",
}
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}
_RATES = {"rate", "irate", "increase"}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def declared_families() -> dict[str, str]:
    """Metric families the package declares, name -> type (a counter's name without ``_total``)."""
    families: dict[str, str] = {}
    for path in sorted((ROOT / "mab_service").rglob("*.py")):
        for kind, name in _DECLARATION.findall(path.read_text(encoding="utf-8")):
            family = name.removesuffix("_total") if _KINDS[kind] == "counter" else name
            assert families.setdefault(family, _KINDS[kind]) == _KINDS[kind], f"{family} declared twice, differently"
    return families


def known_series(*extra: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Series names that may appear in an expression -> (their family's type, the suffix)."""
    families = {**CONTRACT, **declared_families()}
    for more in extra:
        families.update(more)
    series: dict[str, tuple[str, str]] = {}
    for family, kind in families.items():
        for suffix in _SUFFIXES[kind]:
            series[family + suffix] = (kind, suffix)
    return series


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """The metric names an expression selects, each with the functions it is nested in (outermost first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', "", expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    found: list[tuple[str, list[str]]] = []
    stack: list[str] = []
    for match in re.finditer(r"\d[\w.]*|([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?|\(|\)", text):
        token, name, call = match.group(0), match.group(1), match.group(2)
        if token == "(":
            stack.append("")
        elif token == ")":
            assert stack, f"unbalanced parentheses in {expr!r}"
            stack.pop()
        elif name is not None and call:
            stack.append("" if name in _KEYWORDS else name)  # "and (...)" groups, it calls nothing
        elif name is not None and name not in _KEYWORDS:
            found.append((name, [f for f in stack if f]))
    assert not stack, f"unbalanced parentheses in {expr!r}"
    return found


def check_expression(expr: str, series: dict[str, tuple[str, str]]) -> list[str]:
    """What is wrong with ``expr``: unknown metrics, counters not rated, gauges rated, buckets outside a quantile."""
    problems = []
    selected = selectors(expr)
    if not selected:
        problems.append(f"selects no metric: {expr}")
    for name, functions in selected:
        if name not in series:
            problems.append(f"unknown metric {name} in {expr}")
            continue
        kind, suffix = series[name]
        innermost = functions[-1] if functions else None
        if kind in ("counter", "histogram", "summary") and innermost not in _RATES:
            problems.append(f"{name} ({kind}) is not read through rate or increase in {expr}")
        if kind == "gauge" and innermost in _RATES:
            problems.append(f"{name} (gauge) is read through {innermost} in {expr}")
        if suffix == "_bucket" and "histogram_quantile" not in functions:
            problems.append(f"{name} is not inside histogram_quantile in {expr}")
    return problems


# --- promtool --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool(tmp_path_factory: pytest.TempPathFactory) -> str:
    """promtool from Debian's ``prometheus`` package: on the PATH, or taken from the package fetched with apt-get.

    The package is unpacked rather than installed: installing it would run its maintainer scripts, which start a
    Prometheus server; promtool alone is a static binary.
    """
    found = shutil.which("promtool")
    if found:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs promtool (Debian's prometheus package): not installed, and there is no apt-get to get it")
    target = tmp_path_factory.mktemp("prometheus-deb")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for attempt in (
        ["apt-get", "download", "prometheus"],
        ["apt-get", "update"],
        ["apt-get", "download", "prometheus"],
    ):
        try:
            done = subprocess.run(attempt, cwd=target, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"needs promtool: {' '.join(attempt)} took more than {APT_TIMEOUT_S:.0f} s")
        log = done.stdout[-2000:] + done.stderr[-2000:]
        packages = sorted(target.glob("prometheus_*.deb"))
        if packages:
            unpacked = target / "root"
            subprocess.run(["dpkg-deb", "-x", str(packages[0]), str(unpacked)], check=True, timeout=120)
            return str(unpacked / "usr" / "bin" / "promtool")
    pytest.skip(f"needs promtool: apt-get could not fetch Debian's prometheus package:\n{log}")


def run_promtool(promtool: str, *args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# --- the declarations ----------------------------------------------------------------------------------------


def test_declarations_are_found() -> None:
    families = declared_families()
    # The service's own, from mab_service/metrics.py (a counter is named without _total there).
    assert families["mab_requests"] == "counter"
    assert families["mab_request_duration_seconds"] == "histogram"
    assert families["mab_feature_source_level"] == "gauge"
    assert "mab_request_duration_seconds_in_bucket" not in families  # the stored form, never exposed


def test_the_contract_agrees_with_the_declarations() -> None:
    families = declared_families()
    disagree = {n: (k, families[n]) for n, k in CONTRACT.items() if n in families and families[n] != k}
    assert not disagree, f"contract type != declared type: {disagree}"


def test_what_the_service_exposes_is_declared(server: Server) -> None:
    # The names the tests derive from the source are the ones a running service exposes.
    with server.client() as client:
        assert client.post("/predict", json={"user_id": "u", "candidates": ["strong", "weak"]}).status_code == 200
        text = client.get("/metrics").text
    families = declared_families()
    exposed = {f.name: f.type for f in text_string_to_metric_families(text) if f.name.startswith("mab_")}
    assert {"mab_requests", "mab_request_duration_seconds"} <= exposed.keys()
    assert {name: families.get(name) for name in exposed} == exposed
    series = known_series()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("mab_") and not sample.name.endswith("_created"):
                assert sample.name in series, sample.name


def test_the_expression_checker_finds_mistakes() -> None:
    series = known_series()
    assert check_expression('sum by (endpoint) (rate(mab_requests_total{status=~"5.."}[5m]))', series) == []
    assert check_expression("time() - max(mab_learner_last_ack_timestamp_seconds) > 120", series) == []
    assert selectors("absent(x) and on() (sum(rate(y[$__rate_interval] offset 5m)) > 0)") == [
        ("x", ["absent"]),
        ("y", ["sum", "rate"]),
    ]
    wrong = {
        "sum(rate(mab_no_such_metric_total[5m]))": "unknown metric",
        "sum(mab_requests_total)": "not read through rate",
        "rate(mab_events_outbox_messages[5m])": "(gauge) is read through rate",
        "sum by (le) (rate(mab_learner_lag_seconds_bucket[5m]))": "not inside histogram_quantile",
    }
    for expr, problem in wrong.items():
        (found,) = check_expression(expr, series)
        assert problem in found


# --- the dashboard -------------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _expressions() -> list[tuple[dict[str, Any], str]]:
    return [(panel, target["expr"]) for panel in _panels(_dashboard()["panels"]) for target in panel.get("targets", [])]


def test_dashboard_is_a_templated_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target.get("datasource", DATASOURCE) == DATASOURCE
            assert target["expr"].strip()


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:  # rows are open: their panels are at the top level
        box = panel["gridPos"]
        assert 0 <= box["x"] and box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_dashboard_reads_only_metrics_that_exist() -> None:
    series = known_series()
    problems = [p for panel, expr in _expressions() for p in check_expression(expr, series)]
    assert problems == []
    shown = {name for _, expr in _expressions() for name, _ in selectors(expr)}
    assert WATCHED - shown == set()


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    # promtool parses PromQL in rules files: each expression becomes a recording rule, Grafana's variables replaced.
    rules = [
        {"record": f"dashboard:panel_{panel['id']}_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, (panel, expr) in enumerate(_expressions())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run_promtool(promtool, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


# --- the alert rules ---------------------------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_pass_promtool_check(promtool: str) -> None:
    done = run_promtool(promtool, "check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_rules_pass_their_unit_tests(promtool: str) -> None:
    done = run_promtool(promtool, "test", "rules", RULES_TEST.name)
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool takes an alert it has never heard of for one that did not fire: the tested names must exist.
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    alerts = {rule["alert"] for rule in _rules()}
    assert tested <= alerts and len(tested) >= 3
    # Each tested alert fires at least once in its tests and stays silent at least once.
    cases = [c for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    for name in tested:
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), name


def test_rules_are_alerts_with_what_to_do() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook"] == "docs/operations.md#what-to-watch"


def test_rules_read_only_metrics_that_exist() -> None:
    series = known_series(KUBE_STATE)
    problems = [p for rule in _rules() for p in check_expression(rule["expr"], series)]
    assert problems == []
    alerting = {name for rule in _rules() for name, _ in selectors(rule["expr"])}
    for needed in (
        "mab_learner_lag_seconds_bucket",
        "mab_learner_last_ack_timestamp_seconds",
        "mab_events_refused_total",
    ):
        assert needed in alerting


def test_outbox_alert_is_at_half_the_outbox() -> None:
    (rule,) = [r for r in _rules() if r["alert"] == "MabEventsOutboxFilling"]
    max_pending = inspect.signature(PubSubSink).parameters["max_pending"].default
    assert rule["expr"].strip() == f"mab_events_outbox_messages > {max_pending // 2}"
    assert f"at {max_pending} it answers 503" in rule["annotations"]["description"]


def test_every_alert_is_explained_in_the_operations_guide() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("### What to watch", 1)[1].split("\n## ", 1)[0]
    explained = set(re.findall(r"^\| `(Mab[A-Za-z]+)` \|", section, flags=re.MULTILINE))
    assert explained == {rule["alert"] for rule in _rules()}
