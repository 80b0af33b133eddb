"""deploy/observability: the Grafana dashboard and the Prometheus alert rules use only
metrics the processes export, under the names Prometheus stores them by (``_total`` on
counters, ``_bucket`` on histograms), and both files have the shape their tools load.

The exported names come from the real exporters: each process's metrics classes on a
fresh registry, rendered by ``generate_latest`` and parsed back; the agent's levels
(read from its state at each scrape) are taken from the metric families
``Agent._levels`` builds, read from its source, so renaming any metric fails here.
``promtool`` is used where installed (``promtool check rules``, and ``promtool test
rules`` with deploy/observability/alerts.test.yaml); otherwise the rules get a structure
check only."""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dbservice.agent.app import Agent
from dbservice.auth.metrics import AuthMetrics
from dbservice.gateway.metrics import AgentMetrics
from discovery.metrics import DiscoveryMetrics
from fleetgate.metrics import LoopLag

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "observability"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "alerts.yaml"
ALERTS_TEST = DEPLOY / "alerts.test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

METRIC = re.compile(r"\bfleetgate_[a-z_]+")
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
SECTION = re.compile(r'docs/operations\.md, section\s+"([^"]+)"')
# What each kind of family is stored under in Prometheus.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
LEVEL_BUILDERS = {
    "gauge": "gauge",
    "labelled_gauge": "gauge",
    "counter": "counter",
    "labelled_counter": "counter",
}
"""dbservice.gateway.metrics helpers ``Agent._levels`` builds its families with."""


def _scraped(registry: CollectorRegistry) -> dict[str, str]:
    """Family name -> type, as a scrape of ``registry`` shows them."""
    text = generate_latest(registry).decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _agent_levels() -> dict[str, str]:
    """The families ``Agent._levels`` builds at each scrape: name -> type."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Agent._levels)))
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in LEVEL_BUILDERS
        ):
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"Agent._levels: a {node.func.id}() with no literal name (line {node.lineno})"
            )
            found[first.value] = LEVEL_BUILDERS[node.func.id]
    assert len(found) >= 10, f"Agent._levels: only {sorted(found)} found; did it change shape?"
    return found


def exported() -> set[str]:
    """Every series name a fleetgate process can export, as Prometheus stores it."""
    families: dict[str, str] = {}
    agent = AgentMetrics()
    LoopLag(agent.registry)
    families |= _scraped(agent.registry)
    families |= _agent_levels()
    discovery = DiscoveryMetrics()
    discovery.aws_calls(lambda: {("DescribeClusters", "ok"): 1})
    LoopLag(discovery.registry)
    families |= _scraped(discovery.registry)
    auth = AuthMetrics()
    LoopLag(auth.registry)
    families |= _scraped(auth.registry)
    return {name + suffix for name, kind in families.items() for suffix in SUFFIXES[kind]}


def used(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in data["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return out


def test_exporters_are_read() -> None:
    names = exported()
    # one of each source: a counter, a histogram, a level read at scrape, the loop lag
    for name in (
        "fleetgate_agent_sessions_opened_total",
        "fleetgate_agent_upstream_connect_seconds_bucket",
        "fleetgate_agent_database_healthy",
        "fleetgate_agent_audit_events_dropped_total",
        "fleetgate_discovery_aws_calls_total",
        "fleetgate_auth_logins_total",
        "fleetgate_event_loop_lag_seconds",
    ):
        assert name in names
    assert "fleetgate_agent_database_healthy_total" not in names


def test_dashboard_metrics_are_exported() -> None:
    names = exported()
    unknown = {
        f"{panel['title']}: {name}"
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
        for name in used(target["expr"])
        if name not in names
    }
    assert not unknown, f"the dashboard uses metrics no process exports: {sorted(unknown)}"


def test_alert_metrics_are_exported() -> None:
    names = exported()
    unknown = {
        f"{rule['alert']}: {name}"
        for rule in rules()
        for text in (rule["expr"], *rule["annotations"].values())
        for name in used(text)
        if name not in names
    }
    assert not unknown, f"the alert rules use metrics no process exports: {sorted(unknown)}"


def test_dashboard_shape() -> None:
    data = dashboard()
    assert data["title"] and data["uid"]
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    rows = [p["title"] for p in data["panels"] if p["type"] == "row"]
    assert rows == ["Agents", "Databases", "Discovery", "Auth service"]
    ids = [p["id"] for p in panels(data)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    graphs = [p for p in panels(data) if p["type"] != "row"]
    assert graphs
    for panel in graphs:
        title = panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", title
        assert panel["targets"], f"{title}: no target"
        for target in panel["targets"]:
            assert target["expr"].strip() and used(target["expr"]), f"{title}: no metric"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title
            assert _balanced(target["expr"]), f"{title}: unbalanced {target['expr']}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    close = {")": "(", "]": "[", "}": "{"}
    for char in expr:
        if char in depth:
            depth[char] += 1
        elif char in close:
            depth[close[char]] -= 1
            if depth[close[char]] < 0:
                return False
    return not any(depth.values())


def test_dashboard_covers_the_issue() -> None:
    """Each row shows what the operators asked for (issue 21)."""
    text = " ".join(t["expr"] for p in panels(dashboard()) for t in p.get("targets", []))
    for needed in (
        "fleetgate_agent_sessions_active",
        "fleetgate_agent_sessions_opened_total",
        "fleetgate_agent_sessions_refused_total",
        "fleetgate_agent_commands_forwarded_total",
        "fleetgate_agent_bytes_total",
        "histogram_quantile(0.5, sum by (le) (rate(fleetgate_agent_upstream_connect_seconds_",
        "histogram_quantile(0.99, sum by (le) (rate(fleetgate_agent_upstream_connect_seconds_",
        "fleetgate_agent_upstream_failures_total",
        "fleetgate_agent_audit_events_held",
        "fleetgate_agent_audit_events_spooled",
        "fleetgate_agent_audit_events_dropped_total",
        "fleetgate_event_loop_lag_seconds",
        "fleetgate_agent_heartbeat_age_seconds",
        "fleetgate_agent_certificate_expiry_timestamp_seconds",
        "fleetgate_agent_database_healthy",
        "fleetgate_discovery_polls_total",
        "fleetgate_discovery_aws_calls_total",
        "fleetgate_discovery_last_success_timestamp_seconds",
        "fleetgate_auth_logins_total",
        "fleetgate_auth_rate_limited_requests_total",
        "fleetgate_auth_certificates_issued_total",
    ):
        assert needed in text, needed


def test_alert_rules_shape() -> None:
    data = yaml.safe_load(ALERTS.read_text())
    assert set(data) == {"groups"}
    headings = _headings(OPERATIONS.read_text())
    groups = [g["name"] for g in data["groups"]]
    assert len(groups) == len(set(groups)), "group names repeat"
    alerts: list[str] = []
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}, group["name"]
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            name = rule.get("alert")
            assert isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), rule
            assert set(rule) <= {
                "alert",
                "expr",
                "for",
                "keep_firing_for",
                "labels",
                "annotations",
            }, name
            alerts.append(name)
            assert isinstance(rule["expr"], str) and _balanced(rule["expr"]), name
            if "for" in rule:
                assert DURATION.match(str(rule["for"])), f"{name}: for {rule['for']!r}"
            assert rule["labels"]["severity"] in ("critical", "warning"), name
            assert all(isinstance(v, str) for v in rule["labels"].values()), name
            notes = rule["annotations"]
            assert set(notes) >= {"summary", "description"}, name
            assert all(isinstance(v, str) and v.strip() for v in notes.values()), name
            sections = SECTION.findall(notes["description"])
            assert sections, f"{name}: the description points to no docs/operations.md section"
            for section in sections:
                assert section in headings, f"{name}: docs/operations.md has no section {section!r}"
    assert len(alerts) == len(set(alerts)), "alert names repeat"


def _headings(markdown: str) -> set[str]:
    """The section titles of a Markdown text (not the comments in its code blocks)."""
    titles: set[str] = set()
    code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and (m := re.match(r"#{1,6} (.+)", line)):
            titles.add(m.group(1).strip())
    return titles


def test_alert_rules_cover_the_issue() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in rules()}
    text = "\n".join(exprs.values())
    assert re.search(r'up\{job=~"fleetgate-[^"]*"\} == 0', text)
    for needed in (
        "fleetgate_agent_database_healthy == 0",
        "fleetgate_agent_upstream_failures_total",
        "fleetgate_agent_audit_events_held",
        "fleetgate_agent_audit_events_dropped_total",
        "fleetgate_discovery_polls_total",
        'fleetgate_discovery_aws_calls_total{outcome="throttled"}',
        "fleetgate_discovery_last_success_timestamp_seconds > 3 * 300",
        "fleetgate_agent_certificate_expiry_timestamp_seconds - time() < 2 * 3600",
        "fleetgate_agent_certificate_renewal_failures_total",
        "fleetgate_event_loop_lag_seconds",
    ):
        assert needed in text, needed
    unhealthy = next(r for r in rules() if r["alert"] == "FleetgateDatabaseUnhealthy")
    assert unhealthy["for"] == "5m"


NO_PROMTOOL = "promtool is not installed (apt-get install prometheus, or a Prometheus release)"


@pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMTOOL)
def test_promtool_checks_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMTOOL)
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    """deploy/observability/alerts.test.yaml: series as the processes export them fire
    (or do not fire) the alerts, with their labels and rendered annotations."""
    promtool = shutil.which("promtool")
    assert promtool is not None
    done = subprocess.run(
        [promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True,
        check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    tested = yaml.safe_load(ALERTS_TEST.read_text())
    assert tested["rule_files"] == [ALERTS.name]
    named = {case["alertname"] for test in tested["tests"] for case in test["alert_rule_test"]}
    assert len(named) >= 3 and named <= {rule["alert"] for rule in rules()}
