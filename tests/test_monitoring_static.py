"""The monitoring files without the app: Prometheus config and alert rules checked by promtool,
the alert unit tests run, Grafana provisioning and the dashboard checked for what Grafana needs,
and every PromQL expression of the dashboard and the rules parsed by a real Prometheus.

Needs `prometheus` and `promtool` (Debian: `apt-get install prometheus`; the CI script installs
them). A missing binary fails the test rather than skipping it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from bench import report
from bench.harness.environment import ROOT
from bench.harness.prometheus import Prometheus

MONITORING = ROOT / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules" / "flaskapi.rules.yml"
RULE_TESTS = MONITORING / "rules" / "flaskapi.rules.test.yml"
PROVISIONING = MONITORING / "grafana" / "provisioning"
DASHBOARD = report.DASHBOARD

ALERTS = {
    "FlaskapiHigh5xxRatio",
    "FlaskapiLatencyP95AboveSLO",
    "FlaskapiDbPoolSaturated",
    "FlaskapiDbPoolCheckoutTimeouts",
    "FlaskapiWorkerRestarted",
    "FlaskapiNotReady",
    "FlaskapiTargetDown",
    "FlaskapiFailedLoginSpike",
}
# What Grafana substitutes before a query reaches Prometheus, and what we substitute here. The
# report renderer handles exactly these, so the dashboard may use no other variable in an expr.
MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(
            f"`{name}` not found: install it with `apt-get install prometheus` (Debian/Ubuntu; "
            "it brings prometheus and promtool). The CI script installs it.",
            pytrace=False,
        )
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [binary("promtool"), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def alert_rules() -> dict[str, dict]:
    return {rule["alert"]: rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule}


def dashboard() -> dict:
    return report.load(DASHBOARD)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every Prometheus annotation."""
    board = dashboard()
    exprs = [
        (f"panel {panel.title!r} target {ref}", expr)
        for panel in report.panels(board)
        for ref, expr, _ in panel.targets
    ]
    exprs += [(f"annotation {name!r}", expr) for name, expr in report.annotation_exprs(board)]
    return exprs


def substitute(expr: str) -> str:
    return report.substitute(
        expr, rate_interval=MACROS["$__rate_interval"], interval=MACROS["$__interval"], range_=MACROS["$__range"]
    )


# --- Prometheus configuration and rules ----------------------------------------------------------


def test_prometheus_config_is_valid():
    # The real file, in place: its rule_files path is resolved relative to it, so the rules it
    # names are loaded and checked too.
    output = promtool("check", "config", str(PROMETHEUS_CONFIG)).stdout
    assert "1 rule files found" in output, output


def test_prometheus_config_scrapes_the_app_the_load_generator_and_itself():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    assert config["global"]["evaluation_interval"] == "5s"
    assert config["rule_files"] == ["rules/flaskapi.rules.yml"]
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in config["scrape_configs"]
    }
    assert jobs == {"flaskapi": ["127.0.0.1:9200"], "locust": ["127.0.0.1:9646"], "prometheus": ["127.0.0.1:9090"]}


def test_rules_are_valid():
    output = promtool("check", "rules", str(RULES)).stdout
    assert f"{len(ALERTS)} rules found" in output, output


def test_rule_unit_tests_pass():
    promtool("test", "rules", str(RULE_TESTS))


def test_every_alert_is_documented():
    rules = alert_rules()
    assert set(rules) == ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert "for" in rule, f"{name}: say `for: 0s` explicitly when it fires at once"
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{name} has no {key}"
        assert "docs/" in annotations["runbook"], f"{name}: the runbook should point at a docs/ page"


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    config = load_yaml(RULE_TESTS)
    assert config["rule_files"] == [RULES.name]
    firing, silent = set(), set()
    for case in config["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    rules = set(alert_rules())
    assert rules - firing == set(), "alerts without a test that fires"
    assert rules - silent == set(), "alerts without a test that must stay silent"
    assert (firing | silent) - rules == set(), "tests for alerts that do not exist"


# --- Grafana provisioning -------------------------------------------------------------------------


def test_datasource_provisioning():
    config = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    for key in ("name", "type", "uid", "url", "access"):
        assert source.get(key), f"datasource has no {key}"
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://127.0.0.1:9090"
    assert source["access"] == "proxy"


def test_dashboard_provisioning():
    config = load_yaml(PROVISIONING / "dashboards" / "flaskapi.yml")
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["name"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/flaskapi"


# --- the dashboard --------------------------------------------------------------------------------


def test_dashboard_settings():
    board = dashboard()
    assert board["uid"] == "flaskapi-load"
    assert board["title"] == "flaskapi: load test story"
    assert board["refresh"] == "5s"
    assert board["time"]["from"] == "now-15m"
    assert 36 <= board["schemaVersion"] <= 41
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"


def test_every_panel_is_complete():
    panels = report.flatten(dashboard()["panels"])
    assert len(panels) >= 14
    ids = [p.get("id") for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        title = panel.get("title", "").strip()
        assert title, f"panel {panel.get('id')} has no title"
        assert panel.get("description", "").strip(), f"{title}: no description"
        assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{title}: no unit"
        assert panel.get("datasource") == DATASOURCE, f"{title}: datasource must be ${{datasource}}"
        targets = panel.get("targets", [])
        assert any(t.get("expr", "").strip() for t in targets), f"{title}: no target with an expr"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"{title}: refIds missing or repeated: {refs}"
        for target in targets:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, f"{title}: target datasource"
            assert "legendFormat" in target, f"{title} {target['refId']}: no legendFormat"


def test_dashboard_has_the_panels_of_the_story():
    titles = {p["title"] for p in report.flatten(dashboard()["panels"])}
    for expected in (
        "Locust users",
        "Locust RPS and failures/s",
        "Request rate by route",
        "Latency p50/p95/p99",
        "Error rate by status (4xx/5xx)",
        "DB pool: in use vs capacity",
        "DB pool wait p95",
        "DB pool checkout timeouts (per minute)",
        "Worker restarts and workers alive",
        "Per-worker memory",
        "Per-worker CPU",
        "Database up",
        "Requests in progress",
    ):
        assert expected in titles
    assert any(t.startswith("Locust response time percentiles") for t in titles)
    stats = [p for p in report.flatten(dashboard()["panels"]) if p["title"] == "Database up"]
    assert stats[0]["type"] == "stat"


def test_worker_restart_annotation():
    annotations = dashboard()["annotations"]["list"]
    assert any(a.get("builtIn") == 1 for a in annotations), "the built-in Grafana annotations entry"
    (restarts,) = [a for a in annotations if a.get("name") == "Worker restarts"]
    assert restarts["datasource"] == DATASOURCE
    assert restarts["expr"] == "changes(flaskapi_worker_restarts_total[1m]) > 0"
    assert restarts["enable"] is True


def test_exprs_use_only_the_macros_the_renderer_knows():
    for where, expr in dashboard_exprs():
        unknown = set(re.findall(r"\$\{?\w+\}?", expr)) - set(MACROS)
        assert not unknown, f"{where}: {unknown} in {expr}"
        for call in re.finditer(r"\b(?:rate|increase)\(", expr):
            # the range selector: brackets right after a selector or a name, not a regex's [45]
            window = re.search(r"(?<=[}\w])\[([^\]]+)\]", expr[call.end() :])
            assert window and window.group(1) == "$__rate_interval", f"{where}: {expr}"


# --- every expression parsed by a real Prometheus -------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus (the repo's config and rules, no targets); stopped by PID."""
    binary("prometheus")  # fails with the install hint when missing
    with Prometheus(tmp_path_factory.mktemp("prometheus"), targets={}) as server:
        yield server


def query(prometheus: Prometheus, expr: str) -> dict:
    response = requests.get(prometheus.url + "/api/v1/query", params={"query": expr}, timeout=10)
    return {"http": response.status_code, **response.json()}


def test_a_broken_expr_is_caught(prometheus):
    """The check below means something: Prometheus rejects what does not parse."""
    answer = query(prometheus, "sum(rate(flask_http_request_total[1m])")
    assert answer["http"] == 400 and answer["errorType"] == "bad_data", answer


def test_every_dashboard_expr_is_valid_promql(prometheus):
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    failures = []
    for where, expr in exprs:
        answer = query(prometheus, substitute(expr))
        if answer.get("status") != "success":
            failures.append(f"{where}: {expr}\n  -> {answer.get('errorType')}: {answer.get('error')}")
    assert not failures, "\n".join(failures)


def test_every_alert_expr_is_valid_promql(prometheus):
    failures = []
    for name, rule in alert_rules().items():
        answer = query(prometheus, rule["expr"])
        if answer.get("status") != "success":
            failures.append(f"{name}: {answer.get('errorType')}: {answer.get('error')}")
    assert not failures, "\n".join(failures)
