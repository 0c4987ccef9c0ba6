"""The monitoring files without the app: the Prometheus config checked by promtool, Grafana
provisioning and the dashboard checked for what Grafana needs (against the alert rules too), and
every PromQL expression of the dashboard parsed by a real Prometheus. The alert and SLO rules
themselves: tests/test_alerting_rules.py.

Needs `prometheus` and `promtool` (Debian: `apt-get install prometheus`; the CI script installs
them). A missing binary fails the test rather than skipping it.
"""

from __future__ import annotations

import itertools
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
from monitoring import slo
from tests import grafana_dashboard

MONITORING = ROOT / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules" / "flaskapi.rules.yml"
PROVISIONING = MONITORING / "grafana" / "provisioning"
DASHBOARD = report.DASHBOARD

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


# --- Prometheus configuration ---------------------------------------------------------------------


def test_prometheus_config_is_valid():
    # The real file, in place: its rule_files paths are resolved relative to it, so the rules it
    # names are loaded and checked too.
    output = promtool("check", "config", str(PROMETHEUS_CONFIG)).stdout
    assert f"{len(load_yaml(PROMETHEUS_CONFIG)['rule_files'])} rule files found" in output, output


def test_prometheus_config_scrapes_the_app_the_load_generator_and_itself():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    assert config["global"]["evaluation_interval"] == "5s"
    assert config["rule_files"] == ["rules/flaskapi.rules.yml", "rules/slo.rules.yml", "rules/meta.rules.yml"]
    jobs = {
        job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert jobs == {
        "flaskapi": [],
        "locust": ["127.0.0.1:9646"],
        "prometheus": ["127.0.0.1:9090"],
        "node": [],
        "postgres": [],
    }


def test_prometheus_finds_the_app_instances_and_the_exporters_in_target_files_with_their_host():
    """The one-host target files next to the config: each target labelled with its host (the app
    instances' too, so N app hosts are N lines of a file, no edit of the config)."""
    found = {
        job["job_name"]: job["file_sd_configs"]
        for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
        if "file_sd_configs" in job
    }
    assert found == {
        "flaskapi": [{"files": ["targets/flaskapi.yml"]}],
        "node": [{"files": ["targets/node.yml"]}],
        "postgres": [{"files": ["targets/postgres.yml"]}],
    }
    for job, ((path,),) in ((job, [c["files"] for c in configs]) for job, configs in found.items()):
        groups = load_yaml(MONITORING / path)
        assert groups and all(g["targets"] and g["labels"]["host"] for g in groups), job
    assert load_yaml(MONITORING / "targets" / "flaskapi.yml") == [
        {"targets": ["127.0.0.1:9200"], "labels": {"host": "localhost"}}
    ]
    assert [g["targets"] for g in load_yaml(MONITORING / "targets" / "node.yml")] == [["127.0.0.1:9100"]]
    assert [g["targets"] for g in load_yaml(MONITORING / "targets" / "postgres.yml")] == [["127.0.0.1:9187"]]


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

# Rows and the panels under each, in order: what an SRE reads top to bottom.
ROWS = {
    "Alerts": ["Alerts firing"],
    "SLOs": [
        "Availability SLO: error budget left (30d)",
        "Books latency SLO: error budget left (30d)",
        "Auth latency SLO: error budget left (30d)",
        "Availability SLO: burn rate by window",
        "Books latency SLO: burn rate by window",
        "Auth latency SLO: burn rate by window",
    ],
    "Traffic": [
        "Locust users",
        "Locust RPS and failures/s",
        "Request rate by route",
        "Requests/s by instance",
        "App instances up",
    ],
    "Errors": ["Error ratio (5xx, 4xx)", "5xx ratio by route", "4xx ratio by route", "Errors/s by status"],
    "Latency": [
        "Latency p50/p95/p99",
        "p95 latency by route",
        "Latency heatmap",
        "Locust response time percentiles (load generator's view)",
    ],
    "Saturation": [
        "Requests in progress",
        "DB pool: in use vs capacity",
        "DB pool wait p95",
        "DB pool checkout timeouts",
        "Password hashing: queued vs capacity, hashing now",
        "Password hashing: queue wait p95",
    ],
    "Workers": ["Worker restarts", "Workers alive", "Per-worker memory", "Per-worker CPU"],
    "Database": ["Database up", "Database connections dropped", "Throttle store errors"],
    "Hosts": [
        "CPU by mode",
        "CPU busy per core",
        "Load average vs cores",
        "Memory used vs total",
        "Disk space used",
        "Disk throughput",
        "Network throughput",
    ],
    "Database server": [
        "Database server reached by its exporter",
        "Connections by state vs limit",
        "Connections in use",
        "Transactions/s",
        "Cache hit ratio",
        "Sessions waiting for a lock",
        "Longest lock wait",
        "Deadlocks",
    ],
}
# Grafana unit ids for what a person reads: seconds, requests/s, a share (0.05 is 5 %), bytes,
# bytes/s, operations/s, counts.
UNITS = {"s", "reqps", "percentunit", "bytes", "binBps", "ops", "short", "none"}
DOCS = ROOT / "docs"


def test_dashboard_settings():
    board = dashboard()
    assert board["uid"] == "flaskapi-load"
    assert board["title"] == "flaskapi: load test story"
    assert board["refresh"] == "5s"
    assert board["time"]["from"] == "now-15m"
    assert 36 <= board["schemaVersion"] <= 41
    variable = grafana_dashboard.variable(board, "datasource")
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"


def test_job_and_instance_variables_are_what_the_report_substitutes():
    board = dashboard()
    job = grafana_dashboard.variable(board, "job")
    assert job["type"] == "query" and job["datasource"] == DATASOURCE
    assert grafana_dashboard.label_values(grafana_dashboard.variable_query(job)) == ("flaskapi_build_info", "job")
    assert job["current"]["value"] == report.VARIABLES["job"] == "flaskapi"
    assert not job["multi"] and not job["includeAll"]

    instance = grafana_dashboard.variable(board, "instance")
    assert instance["type"] == "query" and instance["datasource"] == DATASOURCE
    selector, label = grafana_dashboard.label_values(grafana_dashboard.variable_query(instance))
    assert (selector, label) == ('flaskapi_build_info{job=~"$job"}', "instance")
    assert instance["multi"] and instance["includeAll"]
    assert instance["current"]["value"] == ["$__all"]
    # "All" sends this regex: what the report puts in place of $instance
    assert instance["allValue"] == report.VARIABLES["instance"] == ".+"
    for variable in (job, instance):
        assert variable["refresh"] in (1, 2), f"{variable['name']}: options must be loaded from Prometheus"


def test_docs_base_is_a_hidden_constant_that_every_link_starts_with():
    board = dashboard()
    docs_base = grafana_dashboard.variable(board, "docs_base")
    assert docs_base["type"] == "constant" and docs_base["hide"] == 2
    assert (
        docs_base["query"] == docs_base["current"]["value"] == "docs"
    )  # a placeholder: docs/monitoring.md says what to set
    links = [link for item in board["panels"] for link in item.get("links", [])] + board["links"]
    assert links
    for link in links:
        assert link["url"].startswith("${docs_base}/"), link


def test_rows_hold_the_panels_of_the_story():
    board = dashboard()
    found = grafana_dashboard.rows(board)
    assert [row["title"] for row, _ in found] == list(ROWS)
    for row, members in found:
        assert row["collapsed"] is False and row.get("panels", []) == [], f"{row['title']}: panels follow an open row"
        assert row["gridPos"]["w"] == 24 and row["gridPos"]["x"] == 0
        assert [p["title"] for p in members] == ROWS[row["title"]]
        for member in members:
            assert member["gridPos"]["y"] > row["gridPos"]["y"], f"{member['title']} above its row"
    # the next row starts below every panel of the one before
    for (_, members), (next_row, _) in itertools.pairwise(found):
        bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in members)
        assert next_row["gridPos"]["y"] >= bottom, next_row["title"]


def test_panels_fit_the_grid_without_overlapping():
    cells: dict[tuple[int, int], str] = {}
    for item in dashboard()["panels"]:
        grid = item["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, item["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{item['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = item["title"]


def test_every_panel_is_complete():
    panels = report.flatten(dashboard()["panels"])
    assert len(panels) == sum(len(titles) for titles in ROWS.values())
    ids = [p.get("id") for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        title = panel.get("title", "").strip()
        assert title, f"panel {panel.get('id')} has no title"
        assert panel.get("description", "").strip(), f"{title}: no description"
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit in UNITS, f"{title}: unit {unit!r}"
        assert panel.get("datasource") == DATASOURCE, f"{title}: datasource must be ${{datasource}}"
        targets = panel.get("targets", [])
        assert any(t.get("expr", "").strip() for t in targets), f"{title}: no target with an expr"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"{title}: refIds missing or repeated: {refs}"
        for target in targets:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, f"{title}: target datasource"
            assert "legendFormat" in target, f"{title} {target['refId']}: no legendFormat"


def test_units_follow_what_the_queries_compute():
    for panel in report.panels(dashboard()):
        for ref, expr, _ in panel.targets:
            where = f"{panel.title} [{ref}]"
            if expr.startswith("histogram_quantile(") and "_seconds_bucket" in expr:
                assert panel.unit == "s", where
            if "_bytes" in expr:  # an amount, its rate, or a share of a total
                rated = "rate(" in expr
                shared = " / " in expr
                assert panel.unit == ("binBps" if rated else "percentunit" if shared else "bytes"), where
            if "rate(flask_http" in expr and " / " in expr:
                assert panel.unit == "percentunit", where


def test_a_selector_without_the_variables_is_caught():
    """The check below means something: a hard-coded job, a missing instance, a bare name."""
    assert grafana_dashboard.unfiltered_selectors('sum(flaskapi_database_up{job="flaskapi"})')
    assert grafana_dashboard.unfiltered_selectors('up{job=~"$job"} and flask_http_request_total{job=~"$job"}')
    assert grafana_dashboard.unfiltered_selectors("x and on (pid) process_start_time_seconds")
    assert not grafana_dashboard.unfiltered_selectors(
        'sum(rate(flask_http_request_total{job=~"$job", instance=~"$instance", status=~"5.."}[1m]))'
    )
    # a recorded SLO series has job and slo, no instance: job is all it can follow
    assert grafana_dashboard.unfiltered_selectors('flaskapi_slo:error_ratio:rate5m{slo="availability"} / 0.001')
    assert not grafana_dashboard.unfiltered_selectors(
        'flaskapi_slo:error_ratio:rate5m{job=~"$job", slo="availability"} / 0.001'
    )


def test_every_service_query_follows_the_job_and_instance_variables():
    for where, expr in dashboard_exprs():
        assert not grafana_dashboard.unfiltered_selectors(expr), f"{where}: {expr}"


def test_an_exporter_selector_without_the_host_variable_is_caught():
    assert grafana_dashboard.unfiltered_exporter_selectors('node_load1{job="node"}')
    assert grafana_dashboard.unfiltered_exporter_selectors('pg_up{host=~"$host"}')
    assert grafana_dashboard.unfiltered_exporter_selectors('pg_up{job="node", host=~"$host"}')
    assert not grafana_dashboard.unfiltered_exporter_selectors('min by (host) (pg_up{job="postgres", host=~"$host"})')


def test_every_exporter_query_follows_the_host_variable():
    """The host and database panels select their exporter's job and the `host` the file_sd
    targets carry (the app's `instance` is not theirs)."""
    found = 0
    for where, expr in dashboard_exprs():
        assert not grafana_dashboard.unfiltered_exporter_selectors(expr), f"{where}: {expr}"
        found += bool(grafana_dashboard.EXPORTER_METRIC.search(expr))
    assert found >= 15


def test_host_variable_lists_the_exporters_hosts():
    host = grafana_dashboard.variable(dashboard(), "host")
    assert host["type"] == "query" and host["datasource"] == DATASOURCE
    assert grafana_dashboard.label_values(grafana_dashboard.variable_query(host)) == (
        'up{job=~"node|postgres"}',
        "host",
    )
    assert host["multi"] and host["includeAll"] and host["current"]["value"] == ["$__all"]
    assert host["allValue"] == report.VARIABLES["host"] == ".+"
    assert host["refresh"] in (1, 2)


def test_per_route_panels_group_by_route():
    by_route = [p for p in report.panels(dashboard()) if "by route" in p.title]
    assert {p.title for p in by_route} == {
        "Request rate by route",
        "5xx ratio by route",
        "4xx ratio by route",
        "p95 latency by route",
    }
    for panel in by_route:
        for ref, expr, legend in panel.targets:
            groupings = re.findall(r"\bby \(([^)]*)\)", expr)
            assert groupings and all("route" in g.split(", ") for g in groupings), f"{panel.title} [{ref}]: {expr}"
            assert "{{route}}" in legend


def test_error_ratios_are_shares_of_the_answers():
    board = dashboard()
    overall = grafana_dashboard.panel(board, "Error ratio (5xx, 4xx)")
    assert overall["fieldConfig"]["defaults"]["unit"] == "percentunit"
    legends = {t["legendFormat"]: t["expr"] for t in overall["targets"]}
    assert set(legends) == {"5xx", "4xx"}
    for legend, expr in legends.items():
        part, whole = expr.split(" / ")
        assert f'status=~"{legend[0]}.."' in part and "status" not in whole.split(" or ")[0], expr
    for title, status in (("5xx ratio by route", "5.."), ("4xx ratio by route", "4..")):
        (target,) = grafana_dashboard.panel(board, title)["targets"]
        assert f'status=~"{status}"' in target["expr"].split(" / ")[0]


def test_latency_heatmap_reads_the_histogram_buckets():
    heatmap = grafana_dashboard.panel(dashboard(), "Latency heatmap")
    assert heatmap["type"] == "heatmap"
    assert heatmap["options"]["calculate"] is False, "the buckets are Prometheus', not Grafana's"
    assert heatmap["options"]["yAxis"]["unit"] == "s"
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap" and target["legendFormat"] == "{{le}}"
    assert "flask_http_request_duration_seconds_bucket" in target["expr"]
    assert re.match(r"sum by \(le\) \(rate\(", target["expr"]), target["expr"]


def slo_latency_threshold() -> float:
    expr = alert_rules()["FlaskapiLatencyP95AboveSLO"]["expr"]
    assert "histogram_quantile(0.95," in expr and "flask_http_request_duration_seconds_bucket" in expr
    return float(re.search(r">\s*([0-9.]+)\s*$", expr.strip()).group(1))


def test_latency_panels_draw_the_slo_alert_threshold():
    threshold = slo_latency_threshold()
    assert threshold == 0.5
    drawn = []
    for panel in report.flatten(dashboard()["panels"]):
        exprs = [t["expr"] for t in panel["targets"]]
        if not any("histogram_quantile(" in e and "flask_http_request_duration_seconds_bucket" in e for e in exprs):
            continue
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["custom"]["thresholdsStyle"]["mode"] in ("dashed", "line"), panel["title"]
        values = [step["value"] for step in defaults["thresholds"]["steps"] if step["value"] is not None]
        assert values == [threshold], panel["title"]
        assert f"{threshold * 1000:g} ms" in panel["description"], f"{panel['title']}: the description names the line"
        drawn.append(panel["title"])
    assert drawn == ["Latency p50/p95/p99", "p95 latency by route"]


def test_no_other_panel_promises_a_threshold_line():
    for panel in report.flatten(dashboard()["panels"]):
        custom = panel["fieldConfig"]["defaults"].get("custom", {})
        if custom.get("thresholdsStyle", {}).get("mode", "off") == "off":
            assert "dashed red line" not in panel["description"].lower(), panel["title"]


def test_alert_panel_shows_prometheus_alerts_over_time():
    """Grafana's alertlist shows Grafana-managed alerts as they are now: the rules here are
    Prometheus', so the panel reads Prometheus' ALERTS series, for the whole time range."""
    panels = report.flatten(dashboard()["panels"])
    assert not [p["title"] for p in panels if p["type"] == "alertlist"]
    alerts = grafana_dashboard.panel(dashboard(), "Alerts firing")
    assert alerts["type"] == "state-timeline"
    (target,) = alerts["targets"]
    assert target["expr"].startswith("max by (alertname, severity, instance) (ALERTS{")
    assert 'alertstate="firing"' in target["expr"]
    assert "{{alertname}}" in target["legendFormat"]


def test_restarts_are_drawn_as_events():
    """One bar per observed restart, the number in that interval: the counter's growth between
    consecutive points (offset by the step), not increase() over a window (which spreads one
    restart over the window and extrapolates it past 1)."""
    restarts = grafana_dashboard.panel(dashboard(), "Worker restarts")
    assert restarts["fieldConfig"]["defaults"]["custom"]["drawStyle"] == "bars"
    (target,) = restarts["targets"]
    assert "increase(" not in target["expr"] and "rate(" not in target["expr"]
    assert "flaskapi_worker_restarts_total" in target["expr"] and "offset $__interval" in target["expr"]


def test_cpu_of_a_dead_worker_is_dropped_at_once():
    expr = grafana_dashboard.target_expr(dashboard(), "Per-worker CPU")
    assert "rate(process_cpu_seconds_total{" in expr
    assert re.search(r"\band on \(instance, pid\) process_start_time_seconds\{", expr), expr


def test_database_up_is_a_stat_with_up_and_down():
    stat = grafana_dashboard.panel(dashboard(), "Database up")
    assert stat["type"] == "stat"
    options = {
        value: mapping["text"]
        for entry in stat["fieldConfig"]["defaults"]["mappings"]
        for value, mapping in entry["options"].items()
    }
    assert options == {"0": "DOWN", "1": "UP"}


def slo_panels(objective: dict) -> tuple[dict, dict]:
    """(error budget left, burn rate by window) of one SLO of monitoring/slo.yml."""
    name = objective["name"].replace("-", " ").capitalize()
    board = dashboard()
    period = slo.load()["period"]
    return (
        grafana_dashboard.panel(board, f"{name} SLO: error budget left ({period})"),
        grafana_dashboard.panel(board, f"{name} SLO: burn rate by window"),
    )


def test_slo_row_shows_every_slo_of_the_spec():
    """Per SLO of monitoring/slo.yml: the budget left over its period and the burn rate over each
    window its tiers read, from the recorded series, divided by the spec's own budget, with the
    tiers' burn rates as the dashed lines; both panels link to the SLO alert's runbook."""
    spec = slo.load()
    assert [objective["name"] for objective in spec["slos"]] == ["availability", "books-latency", "auth-latency"]
    recorded = {
        rule["record"] for group in load_yaml(slo.RULES)["groups"] for rule in group["rules"] if "record" in rule
    }
    for objective in spec["slos"]:
        budget_left, burn = slo_panels(objective)
        budget = slo.number(1 - objective["objective"])
        selector = f'{{job=~"$job", slo="{objective["name"]}"}}'

        assert budget_left["type"] == "stat"
        assert budget_left["fieldConfig"]["defaults"]["unit"] == "percentunit"
        (target,) = budget_left["targets"]
        assert target["expr"] == f"1 - flaskapi_slo:error_ratio:rate{spec['period']}{selector} / {budget}"
        assert budget_left["options"]["reduceOptions"]["calcs"] == ["lastNotNull"]
        steps = budget_left["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [(s["color"], s["value"]) for s in steps] == [("red", None), ("orange", 0), ("green", 0.25)]

        assert burn["type"] == "timeseries"
        assert [t["legendFormat"] for t in burn["targets"]] == slo.windows(spec)
        for target in burn["targets"]:
            assert target["expr"] == f"flaskapi_slo:error_ratio:rate{target['legendFormat']}{selector} / {budget}"
        defaults = burn["fieldConfig"]["defaults"]
        assert defaults["custom"]["thresholdsStyle"]["mode"] == "dashed"
        lines = [step["value"] for step in defaults["thresholds"]["steps"] if step["value"] is not None]
        assert lines == sorted(tier["burn_rate"] for tier in spec["tiers"]) == [1, 6, 14.4]
        for tier in spec["tiers"]:
            drawn = f"{tier['long']} and {tier['short']} are both over {slo.number(tier['burn_rate'])}"
            assert drawn in burn["description"], tier

        for panel in (budget_left, burn):
            names = {n for t in panel["targets"] for n in grafana_dashboard.SERVICE_METRIC.findall(t["expr"])}
            assert names and names <= recorded, f"{panel['title']} reads series no rule records: {names - recorded}"
            assert budget in panel["description"] and objective["name"] in panel["description"], panel["title"]
            urls = [link["url"] for link in panel["links"]]
            assert f"${{docs_base}}/runbooks/{objective['alert']}.md" in urls, panel["title"]
            assert "${docs_base}/monitoring.md#service-level-objectives" in urls, panel["title"]


def test_slo_row_comes_right_after_the_alerts():
    """What fired, then what it costs: the alert lanes (the SLO alerts among them) serve as the
    row's alert list, and are not repeated in it."""
    titles = [row["title"] for row, _ in grafana_dashboard.rows(dashboard())]
    assert titles[:2] == ["Alerts", "SLOs"]
    (slos,) = [members for row, members in grafana_dashboard.rows(dashboard()) if row["title"] == "SLOs"]
    assert not [p["title"] for p in slos if any("ALERTS" in t["expr"] for t in p["targets"])]


def doc_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_link_points_at_a_docs_page_and_heading_that_exist():
    board = dashboard()
    links = [link for item in board["panels"] for link in item.get("links", [])] + board["links"]
    for link in links:
        page, _, anchor = link["url"].removeprefix("${docs_base}/").partition("#")
        assert (DOCS / page).is_file(), link
        assert not anchor or anchor in doc_anchors(DOCS / page), link


def test_alert_driven_panels_link_to_the_runbooks():
    """Every panel that reads a series an alert rule reads links to what to do about it."""
    alerted = set()
    for rule in alert_rules().values():
        alerted |= set(grafana_dashboard.SERVICE_METRIC.findall(rule["expr"]))
    assert {"flask_http_request_total", "flaskapi_worker_restarts_total", "flaskapi_database_up"} <= alerted
    linked = 0
    for panel in report.flatten(dashboard()["panels"]):
        read = {name for t in panel["targets"] for name in grafana_dashboard.SERVICE_METRIC.findall(t["expr"])}
        urls = [link["url"] for link in panel.get("links", [])]
        if read & alerted:
            assert "${docs_base}/monitoring.md#alerts" in urls, f"{panel['title']} reads {read & alerted}"
            linked += 1
        if read:
            assert urls, f"{panel['title']}: no link to what its series mean"
    assert linked >= 10


def test_annotations_mark_observed_deaths_and_alert_spans():
    annotations = dashboard()["annotations"]["list"]
    assert any(a.get("builtIn") == 1 for a in annotations), "the built-in Grafana annotations entry"
    named = {a["name"]: a for a in annotations if not a.get("builtIn")}
    assert set(named) == {"Worker deaths", "Alerts firing"}
    for annotation in named.values():
        assert annotation["datasource"] == DATASOURCE
        assert annotation["enable"] is True
        assert annotation["useValueForTime"] is False
    deaths = named["Worker deaths"]["expr"]
    # the growth between consecutive points, and only where it grew: isolated points, events
    assert "flaskapi_worker_restarts_total" in deaths and "offset $__interval" in deaths
    assert deaths.endswith("> 0")
    assert named["Alerts firing"]["expr"].startswith('ALERTS{alertstate="firing"')


def test_exprs_use_only_the_macros_and_variables_the_renderer_knows():
    known = set(MACROS) | {f"${name}" for name in report.VARIABLES}
    for where, expr in dashboard_exprs():
        unknown = set(re.findall(r"\$\{?\w+\}?", expr)) - known
        assert not unknown, f"{where}: {unknown} in {expr}"
        for call in re.finditer(r"\b(?:rate|increase)\(", expr):
            # the range selector: brackets right after a selector or a name, not a regex's [45]
            window = re.search(r"(?<=[}\w])\[([^\]]+)\]", expr[call.end() :])
            assert window and window.group(1) == "$__rate_interval", f"{where}: {expr}"
        for offset in re.findall(r"\boffset (\S+?)\)", expr):
            assert offset == "$__interval", f"{where}: offset by the step, so each change lands on one point"


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
    assert len(exprs) >= 30
    failures = []
    for where, expr in exprs:
        answer = query(prometheus, substitute(expr))
        if answer.get("status") != "success":
            failures.append(f"{where}: {expr}\n  -> {answer.get('errorType')}: {answer.get('error')}")
    assert not failures, "\n".join(failures)


def test_every_variable_query_is_a_valid_selector(prometheus):
    """Grafana's label_values(selector, label) asks /api/v1/series for the selector."""
    board = dashboard()
    for name in ("job", "instance"):
        selector, _ = grafana_dashboard.label_values(
            grafana_dashboard.variable_query(grafana_dashboard.variable(board, name))
        )
        response = requests.get(prometheus.url + "/api/v1/series", params={"match[]": substitute(selector)}, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "success", (name, response.text)
    broken = requests.get(
        prometheus.url + "/api/v1/series", params={"match[]": "flaskapi_build_info{job=~}"}, timeout=10
    )
    assert broken.status_code == 400
