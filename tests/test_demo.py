"""`make demo` and its report: a short real demo (gunicorn, Prometheus, Alertmanager with local
mail and webhook receivers, locust, a crash) that must pass its own SLO verdict with three request
counts that agree and the crash's ticket mailed to the team, one that must fail it, the page it
writes, a synthetic dashboard rendered from the demo's kept Prometheus data (every drawing
convention of bench/report.py), and the formatting rules on injected values."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys

import pytest

from bench import demo as bench_demo
from bench import report
from bench.harness import rsyslog
from bench.harness.commands import run_command
from bench.harness.prometheus import Prometheus

SCRAPE = 2.0  # bench.demo.SCRAPE_INTERVAL
# Long enough after the crash (+5 s) that the dashboard's 15 s annotation step has a point in it.
DEMO = ["--users", "10", "--ramp", "5", "--hold", "20", "--crash-at", "5"]


def demo(out, uri, *extra) -> tuple[int, str, dict]:
    result = run_command(
        [sys.executable, "-m", "bench.demo", *extra, "--out", str(out), "--db-uri", uri], env=None, timeout=400
    )
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return result.returncode, result.stdout, summary


@pytest.fixture(scope="module")
def passing(migrated_database, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code, output, summary = demo(out, migrated_database("test_demo"), *DEMO)
    return code, output, summary, out


pytestmark = pytest.mark.stack


def test_the_demo_passes_its_verdict(passing):
    code, output, summary, _ = passing
    assert code == 0, output[-4000:]
    assert summary["verdict"] == "pass"
    assert [c["name"] for c in summary["checks"] if not c["ok"]] == []
    assert {c["name"] for c in summary["checks"]} >= {
        "no 5xx answers",
        "worker restarts = scheduled crashes",
        "the three counts agree",
        "p95 <= 500 ms on every books endpoint",  # the threshold of FlaskapiLatencyP95AboveSLO
    }
    assert summary["server"]["worker_restarts"] == 1
    assert [d["cause"] for d in summary["worker_deaths"]] == ["exit code 1"]
    assert "FlaskapiWorkerRestarted" in {a["alertname"] for a in summary["alerts"]}
    assert "alerts as expected: the crashes' worker restarts fired and were mailed to the team, nothing else" in {
        c["name"] for c in summary["checks"]
    }


def test_the_log_leaves_the_host_whole_and_the_page_links_the_central_copy(passing):
    """The demo ships its log as deployed (rsyslog over RELP to a local log host): every line of
    logs/app.log arrives once, each the app's own line with its host first."""
    if not rsyslog.installed():
        pytest.skip(rsyslog.MISSING)
    _, _, summary, out = passing
    shipped = summary["shipping"]
    local = (out / "logs" / "app.log").read_text().splitlines()
    central = (out / "central" / "hosts" / "app-1" / "app.log").read_text().splitlines()
    assert shipped["local_lines"] == len(local) and shipped["central_lines"] == len(central) == len(local)
    for mine, theirs in zip(local, central, strict=True):
        shipped_line = json.loads(theirs)
        assert shipped_line.pop("host") == "app-1"
        assert shipped_line == json.loads(mine)
    assert "href='central/app.log'" in (out / report.PAGE).read_text()


def test_the_crash_is_mailed_to_the_team_during_the_run_and_listed(passing):
    """The real Alertmanager, with the repo's routes and templates, mailed the crash's ticket to
    the local SMTP server after its group_wait; the report lists it with its arrival time."""
    _, _, summary, out = passing
    [death] = summary["worker_deaths"]
    [firing] = [a for a in summary["alerts"] if a["alertname"] == "FlaskapiWorkerRestarted"]
    assert summary["run"]["alertmanager"] == bench_demo.ALERTMANAGER_WAITS
    [mail] = [n for n in summary["notifications"] if n["status"] == "firing"]
    assert [n for n in summary["notifications"] if n is not mail] == []  # no page, nothing else, no repeat
    assert (mail["receiver"], mail["channel"], mail["to"]) == ("team", "email", "team@example.com")
    assert (mail["alertname"], mail["severity"]) == ("FlaskapiWorkerRestarted", "warning")
    assert mail["subject"] == "[FIRING:1] FlaskapiWorkerRestarted (warning) flaskapi"
    assert mail["summary"] == "A flaskapi worker died and was replaced"
    assert mail["arrived"] == report.utc_full(mail["arrived_unix"])
    # after the death it reports, and no sooner than its group_wait after the alert fired (the
    # span starts at the first query step at or after that evaluation)
    group_wait = report.parse_duration(bench_demo.ALERTMANAGER_WAITS["group_wait"])
    assert death["time_unix"] < mail["arrived_unix"]
    assert mail["arrived_unix"] >= firing["start_unix"] - SCRAPE + group_wait
    page = (out / "dashboard.html").read_text()
    assert "Notifications delivered" in page
    row = (
        f"<tr><td class='text'>{report.utc(mail['arrived_unix'])}</td><td class='text'>team</td>"
        "<td class='text'>email</td><td class='text'>team@example.com</td>"
        "<td class='text'>FlaskapiWorkerRestarted</td><td class='text'>firing</td><td class='text'>warning</td>"
        f"<td class='text'>{mail['subject']}</td></tr>"
    )
    assert row in page
    assert f"arrived {mail['arrived']}: {mail['subject']}" in (out / "summary.md").read_text()
    assert "group_wait 4s" in page


def test_the_alert_check_wants_the_crash_mailed_to_the_team_and_nothing_else(passing):
    _, _, summary, _ = passing
    [mail] = summary["notifications"]

    def passes(notifications) -> bool:
        judged = bench_demo.judge(
            {**summary, "notifications": notifications}, locust_exit=0, prometheus_ran=True, alertmanager_ran=True
        )
        [check] = [c for c in judged if c["name"].startswith("alerts as expected")]
        return check["ok"]

    assert passes([mail])
    assert not passes([])  # never arrived
    assert not passes([{**mail, "status": "resolved"}])  # only its resolution
    assert not passes([mail, {**mail, "receiver": "oncall"}])  # a ticket that paged
    assert not passes([mail, {**mail, "alertname": "FlaskapiHigh5xxRatio"}])  # another alert
    assert passes([mail, {**mail, "status": "resolved"}])  # resolved, as on a run past 5 minutes


def test_locust_numbers_are_its_final_ones(passing):
    _, _, summary, out = passing
    # locust's own final table, printed at its exit: the first "Aggregated" row is "# reqs  # fails(%)"
    requests, failures = re.search(r"Aggregated\s+(\d+)\s+(\d+)\(", (out / "locust.out").read_text()).groups()
    assert (summary["locust"]["requests"], summary["locust"]["failures"]) == (int(requests), int(failures))
    figures = [e[key] for e in [*summary["endpoints"], summary["locust"]] for key in e if key.endswith(("_ms", "rps"))]
    assert figures and all(value == round(value, 1) for value in figures)


def test_the_three_counts_agree_within_the_requests_in_flight(passing):
    _, _, summary, out = passing
    counts, run = summary["counts"], summary["run"]
    assert counts["tolerance"] == run["users"] + run["threads"] * summary["server"]["worker_restarts"]
    assert counts["locust_answered"] > 50
    assert abs(counts["server"] - counts["locust_answered"]) <= counts["tolerance"]
    assert abs(counts["log"] - counts["server"]) <= counts["tolerance"]
    # the log count is the access lines of the endpoints locust called, counted here again
    lines = [json.loads(line) for line in (out / "logs" / "app.log").read_text().splitlines()]
    called = {(e["endpoint"].split(" ", 1)[0], e["endpoint"].split(" ", 1)[1]) for e in summary["endpoints"]}
    access = [r for r in lines if r.get("event") == "access" and r["route"] != "/healthz"]
    named = [(r["method"], re.sub(r"<[^>]+>", "[id]", r["route"])) for r in access]
    assert sum(1 for pair in named if pair in called) == counts["log"]
    assert counts["server_other"].get("GET /healthz", 0) >= 1  # the harness's probe, kept out of the counts


def test_the_page_shows_every_panel_and_the_run(passing):
    _, _, summary, out = passing
    page = (out / "dashboard.html").read_text()
    panels = report.panels(report.load())
    assert page.count("<img ") == len(panels)
    for n, panel in enumerate(panels, start=1):  # a PNG as wide as the panel's columns on the page
        header = (out / f"panel-{n:02d}.png").read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert abs(int.from_bytes(header[16:20], "big") - report.figure_size(panel.raw)[0] * report.DPI) < 1
    for href in ("locust.html", "logs/app.log", "summary.json"):
        assert f"href='{href}'" in page
        assert (out / href).exists()
    assert summary["run"]["start"] in page  # the run's time range, in UTC, on top
    for endpoint in summary["endpoints"]:
        assert f"<td class='text'>{endpoint['endpoint']}</td>" in page
    assert "$__" not in page and not re.search(r"\$\{?(job|instance)\b", page)
    drawn = json.loads((out / "report.json").read_text())
    assert [p["title"] for p in drawn["panels"]] == [p.title for p in panels]
    for panel in drawn["panels"]:  # one shared time axis
        assert panel["xlim"] and all(
            limits == pytest.approx([drawn["start"], drawn["end"]]) for limits in panel["xlim"]
        )


def test_the_page_lists_the_slowest_buckets_exemplars_with_their_log_lines(passing):
    """From a slow bucket to its requests: each exemplar Prometheus stored is a request of the
    run, whose access line (found by its trace id in logs/app.log) took what the exemplar says."""
    _, _, _, out = passing
    drawn = json.loads((out / "report.json").read_text())
    shown = drawn["exemplars"]
    assert shown, "no exemplar stored during the demo"
    assert [e["seconds"] for e in shown] == sorted((e["seconds"] for e in shown), reverse=True)
    page = (out / report.PAGE).read_text()
    assert "Slowest requests, by their exemplars" in page
    for exemplar in shown:
        [access] = [line for line in exemplar["log_lines"] if line["event"] == "access"]
        assert exemplar["trace_id"] in page
        assert access["duration_ms"] == pytest.approx(exemplar["seconds"] * 1000)


def test_the_crash_reaches_sentry_in_its_requests_trace_and_the_page_joins_it_to_its_log_lines(passing):
    """The other end of the path: the crash's Sentry event (a local receiver, Sentry's protocol)
    carries the trace id of the crash request's own log line, and the page lists both."""
    _, _, summary, out = passing
    assert summary["sentry"]["crash_events"] == len(summary["run"]["crash_schedule_s"]) == 1
    events = json.loads((out / "sentry-events.json").read_text())
    [crash] = [e for e in events if e["logger"] == "service.crash"]
    assert re.fullmatch("[0-9a-f]{32}", crash["trace_id"]) and crash["request_id"]
    logged = [json.loads(line) for line in (out / "logs" / "app.log").read_text().splitlines()]
    [line] = [x for x in logged if x.get("event") == "crash_requested"]
    assert (line["trace_id"], line["request_id"]) == (crash["trace_id"], crash["request_id"])
    drawn = json.loads((out / "report.json").read_text())
    [shown] = [e for e in drawn["sentry_events"] if e["event_id"] == crash["event_id"]]
    assert [x["event"] for x in shown["log_lines"]] == ["crash_requested"]
    page = (out / report.PAGE).read_text()
    assert "Sentry events of the run" in page and crash["trace_id"] in page


def test_the_observed_death_is_annotated_from_the_dashboard_query(passing):
    _, _, summary, out = passing
    drawn = json.loads((out / "report.json").read_text())
    [death] = summary["worker_deaths"]
    # seen at the first scrape after the death, drawn at the next step of the report (its step
    # is the scrape interval: finer than the dashboard's own annotation step)
    near = [
        a for a in drawn["annotations"] if death["time_unix"] <= a["start"] <= death["time_unix"] + 2 * SCRAPE + 0.5
    ]
    assert near, (death, drawn["annotations"])
    assert f"<b>{near[0]['title']}</b>" in (out / "dashboard.html").read_text()


def test_a_run_that_misses_its_objective_exits_non_zero(migrated_database, tmp_path):
    code, output, summary = demo(
        tmp_path,
        migrated_database("test_demo_fail"),
        "--users",
        "3",
        "--ramp",
        "1",
        "--hold",
        "4",
        "--crash-at",
        "0",
        "--p95-slo-ms",
        "0.001",
    )
    assert code == 1, output[-4000:]
    assert summary["verdict"] == "fail"
    assert [c["name"] for c in summary["checks"] if not c["ok"]] == ["p95 <= 0.001 ms on every books endpoint"]
    assert "FAILED: p95 <= 0.001 ms on every books endpoint" in output
    assert summary["notifications"] == []  # no crash: nothing to tell anyone, and nothing told
    assert "FAIL" in (tmp_path / "dashboard.html").read_text()


def test_a_folder_with_an_earlier_run_is_refused(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")  # its Prometheus data would be read as this run's
    assert bench_demo.main(["--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


# --- a synthetic dashboard on the demo's Prometheus data ---------------------------------------------

PROM = {"type": "prometheus", "uid": "${datasource}"}
BUCKET_RATES = 'sum by (le) (rate(flask_http_request_duration_seconds_bucket{job=~"$job"}[$__rate_interval]))'


def target(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    return {"datasource": PROM, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def synthetic_dashboard() -> dict:
    threshold = {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 0.5}]}
    updown = [
        {"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}
    ]
    return {
        "title": "synthetic for $job",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "job", "type": "custom", "query": "flaskapi", "current": {"value": "flaskapi"}},
            ]
        },
        "links": [{"title": "Grafana", "url": "https://grafana.example/d/x?${__url_time_range}&var-job=$job"}],
        "annotations": {
            "list": [
                {
                    "name": "deaths",
                    "datasource": PROM,
                    "enable": True,
                    "iconColor": "red",
                    "step": "2s",
                    # two scrapes in a window, windows one step apart: one point after the death
                    "expr": 'changes(flaskapi_worker_restarts_total{job="$job"}[4s]) > 0',
                    "titleFormat": "died",
                },
                {
                    "name": "alerts",
                    "datasource": PROM,
                    "enable": True,
                    "iconColor": "orange",
                    "expr": 'ALERTS{alertstate="firing"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{severity}}",
                },
                {"name": "off", "datasource": PROM, "enable": False, "expr": "up"},
            ]
        },
        "panels": [
            {"type": "row", "title": "Load on $job", "collapsed": False, "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}},
            {
                "type": "timeseries",
                "title": "Latency",
                "description": "p95, SLO line",
                "gridPos": {"x": 0, "y": 1, "w": 12, "h": 8},
                "links": [{"title": "runbook", "url": "https://runbooks.example/latency?job=$job"}],
                "fieldConfig": {
                    "defaults": {
                        "unit": "s",
                        "thresholds": threshold,
                        "custom": {"thresholdsStyle": {"mode": "dashed"}},
                    },
                    "overrides": [],
                },
                "targets": [
                    target(
                        f"histogram_quantile(0.95, {BUCKET_RATES})",
                        "p95",
                    )
                ],
            },
            {
                "type": "timeseries",
                "title": "Restarts",
                "description": "bars",
                "gridPos": {"x": 12, "y": 1, "w": 12, "h": 8},
                "fieldConfig": {
                    "defaults": {"unit": "short", "thresholds": threshold},
                    "overrides": [
                        {
                            "matcher": {"id": "byName", "options": "restarts"},
                            "properties": [{"id": "custom.drawStyle", "value": "bars"}],
                        }
                    ],
                },
                "targets": [
                    target('sum(increase(flaskapi_worker_restarts_total{job="$job"}[$__rate_interval]))', "restarts"),
                    target('sum(flaskapi_workers_alive{job="$job"})', "alive", "B"),
                ],
            },
            {
                "type": "row",
                "title": "Inside",
                "collapsed": True,
                "gridPos": {"x": 0, "y": 9, "w": 24, "h": 1},
                "panels": [
                    {
                        "type": "stat",
                        "title": "Database",
                        "description": "mapped",
                        "gridPos": {"x": 0, "y": 10, "w": 6, "h": 8},
                        "fieldConfig": {"defaults": {"unit": "none", "mappings": updown, "thresholds": threshold}},
                        "options": {"colorMode": "background", "reduceOptions": {"calcs": ["lastNotNull"]}},
                        "targets": [target('min(flaskapi_database_up{job="$job"})', "database")],
                    },
                    {
                        "type": "stat",
                        "title": "Restarted",
                        "description": "min differs",
                        "gridPos": {"x": 6, "y": 10, "w": 6, "h": 8},
                        "fieldConfig": {"defaults": {"unit": "short", "thresholds": threshold}},
                        "targets": [target('sum(flaskapi_worker_restarts_total{job="$job"})', "restarts")],
                    },
                    {
                        "type": "heatmap",
                        "title": "Latency buckets",
                        "description": "le",
                        "gridPos": {"x": 12, "y": 10, "w": 12, "h": 8},
                        "fieldConfig": {"defaults": {"unit": "s"}},
                        "options": {"yAxis": {"unit": "s"}},
                        "targets": [
                            target(
                                BUCKET_RATES,
                                "{{le}}",
                                format="heatmap",
                            )
                        ],
                    },
                    {
                        "type": "table",
                        "title": "Alerts",
                        "description": "ALERTS",
                        "gridPos": {"x": 0, "y": 18, "w": 24, "h": 6},
                        "fieldConfig": {"defaults": {"unit": "none"}},
                        "targets": [target('ALERTS{alertstate="firing"}', "", format="table")],
                    },
                    {
                        "type": "text",
                        "title": "Notes",
                        "gridPos": {"x": 0, "y": 24, "w": 24, "h": 3},
                        "options": {"content": "Read me for $job"},
                    },
                ],
            },
        ],
    }


@pytest.fixture(scope="module")
def synthetic(passing, tmp_path_factory):
    """The synthetic dashboard rendered from the demo's Prometheus data (its tsdb/ kept in the folder)."""
    _, _, summary, out = passing
    run = summary["run"]
    into = tmp_path_factory.mktemp("synthetic")
    with Prometheus(out, targets={}) as prometheus:
        drawn = report.render(
            prometheus,
            into,
            start=run["start_unix"],
            end=run["end_unix"],
            step=run["step_s"],
            rate_interval=run["rate_interval"],
            dashboard=synthetic_dashboard(),
        )
    return drawn, (into / report.PAGE).read_text(), summary


def test_a_kept_report_renders_again_with_another_dashboard(passing, tmp_path):
    _, _, summary, out = passing
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (tmp_path / "board.json").write_text(json.dumps(synthetic_dashboard()))
    assert report.main([str(copy), "--dashboard", str(tmp_path / "board.json")]) == 0
    page = (copy / report.PAGE).read_text()
    assert "synthetic for flaskapi" in page and page.count("<img ") == 6
    assert summary["run"]["start"] in page and "href='locust.html'" in page


def test_synthetic_layout_rows_links_and_variables(synthetic):
    drawn, page, _ = synthetic
    assert [p["title"] for p in drawn["panels"]] == [
        "Latency",
        "Restarts",
        "Database",
        "Restarted",
        "Latency buckets",
        "Alerts",
    ]
    assert page.count("<img ") == 6
    assert "<h2 class=row>Load on flaskapi</h2>" in page and "<h2 class=row>Inside</h2>" in page
    assert (
        page.index("Load on flaskapi")
        < page.index("Latency")
        < page.index("<h2 class=row>Inside")
        < page.index("Database")
    )
    assert "grid-column:13/span 12;grid-row:1/span 1" in page  # Restarts: x 12, w 12, beside Latency
    assert "synthetic for flaskapi" in page and "Read me for flaskapi" in page
    assert "https://runbooks.example/latency?job=flaskapi" in page
    link = re.search(r"https://grafana\.example/d/x\?from=(\d+)&amp;to=(\d+)&amp;var-job=flaskapi", page)
    assert link and int(link.group(1)) == int(drawn["start"] * 1000)
    assert "$__" not in page and "$job" not in page and "${" not in page
    for panel in drawn["panels"]:
        assert panel["xlim"] and all(
            limits == pytest.approx([drawn["start"], drawn["end"]]) for limits in panel["xlim"]
        )
        assert all("$" not in query for query in panel["queries"].values())


def test_synthetic_timeseries_thresholds_units_and_bars(synthetic):
    drawn, _, _ = synthetic
    latency, restarts = drawn["panels"][0], drawn["panels"][1]
    assert latency["unit"] == "ms" and latency["thresholds"] == [0.5]
    assert latency["ylim"][0] == 0 and latency["ylim"][1] >= 500  # the SLO line is on the axis, in ms
    assert restarts["thresholds"] == []  # thresholds without a thresholdsStyle are not drawn (Grafana's default)
    assert restarts["styles"] == {"restarts": "bars", "alive": "line"}
    assert restarts["ylim"][0] == 0


def test_synthetic_stats_heatmap_and_alerts(synthetic):
    drawn, page, summary = synthetic
    database, restarted, buckets, alerts = drawn["panels"][2:]
    assert database["kind"] == "stat" and database["note"] == "UP throughout the run"
    assert re.fullmatch(r"0 for \d+(\.\d)? s \(min over the run\)", restarted["note"]), restarted["note"]
    assert buckets["kind"] == "heatmap" and buckets["series"] == {"A": 20} and buckets["note"] == "20 buckets"
    [death] = summary["worker_deaths"]
    [firing] = [s for s in alerts["spans"] if s["row"] == "FlaskapiWorkerRestarted"]
    assert death["time_unix"] < firing["start"] < death["time_unix"] + 4 * SCRAPE
    assert "nothing in this range" not in page


def test_synthetic_annotations_events_and_regions(synthetic):
    drawn, page, summary = synthetic
    [death] = summary["worker_deaths"]
    by_name = {}
    for note in drawn["annotations"]:
        by_name.setdefault(note["name"], []).append(note)
    assert set(by_name) == {"deaths", "alerts"}  # the disabled one is not drawn
    [died] = by_name["deaths"]
    assert died["start"] == died["end"] and died["title"] == "died"  # a lone point: an event
    assert death["time_unix"] < died["start"] <= death["time_unix"] + 2 * SCRAPE + 1
    [alert] = [a for a in by_name["alerts"] if a["title"] == "FlaskapiWorkerRestarted"]
    assert alert["start"] < alert["end"] and alert["text"] == "warning"  # consecutive points: a region
    assert "<b>died</b> at " in page and "<b>FlaskapiWorkerRestarted</b> warning at " in page


# --- formatting on injected values ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, unit, text",
    [
        (0.0123, "s", "12.3 ms"),
        (2.0656891290000203, "s", "2,066 ms"),
        (250, "ms", "250 ms"),
        (0.15, "percentunit", "15%"),
        (42, "percent", "42%"),
        (3.46, "reqps", "3.5 req/s"),
        (12, "cpm", "12/min"),
        (512 * 1024**2, "bytes", "512 MiB"),
        (3 * 1024**3, "bytes", "3 GiB"),
        (900, "bytes", "900 B"),
        (7, "short", "7"),
        (1234567, "none", "1,234,567"),
        (0.5, "none", "0.5"),
        (math.nan, "s", "n/a"),
    ],
)
def test_values_are_shown_in_peoples_units(value, unit, text):
    assert report.format_value(value, unit) == text


def test_axis_scale_follows_the_largest_value():
    assert report.scale("bytes", [10, 300 * 1024**2]) == report.Scale(1 / 1024**2, "MiB")
    assert report.scale("s", [0.2]) == report.Scale(1000.0, "ms")
    assert report.scale("short", [5]).label == "" and report.scale("reqps").label == "req/s"


@pytest.mark.parametrize(
    "values, marks, low, high_at_least",
    [
        ([0.0, 0.0, 0.0], (), 0.0, 1.0),  # all zero: 0..1, never a negative axis
        ([], (), 0.0, 1.0),
        ([1.0, 1.0, math.nan], (), 0.0, 1.0),  # "Database up" at 1: from 0, not 0.96..1.04
        ([0.02, 0.05], (0.5,), 0.0, 0.5),  # the threshold stays on the axis
        ([3.0, 9.0], (), 0.0, 9.0),
    ],
)
def test_y_axis_starts_at_zero_for_non_negative_data(values, marks, low, high_at_least):
    bottom, top = report.y_limits(values, marks)
    assert bottom == low and top >= high_at_least and top > bottom


def test_y_axis_goes_below_zero_only_for_negative_data():
    bottom, top = report.y_limits([-2.0, 3.0])
    assert bottom < -2.0 and top > 3.0


def test_time_ticks_fall_on_round_wall_clock_spacings():
    assert report.tick_seconds(18, 4.9) == 5  # an 18 s run on a third of the page
    assert report.tick_seconds(92, 4.9) == 30 and report.tick_seconds(92, 15.3) == 10
    assert report.tick_seconds(3600, 4.9) == 900


def test_annotation_points_become_events_and_regions():
    assert report.spans([], 15) == []
    assert report.spans([100.0], 15) == [(100.0, 100.0)]
    assert report.spans([130.0, 100.0, 115.0, 200.0, 260.0, 275.0], 15) == [
        (100.0, 130.0),
        (200.0, 200.0),
        (260.0, 275.0),
    ]
    assert report.spans([0.0, 2.0000001, 6.0], 2) == [(0.0, 2.0000001), (6.0, 6.0)]


def test_a_stat_says_how_long_it_was_at_its_minimum():
    updown = {"mappings": [{"type": "value", "options": {"0": {"text": "DOWN"}, "1": {"text": "UP"}}}]}
    series = report.Series("A", "db", {}, [1, 1, 0, 0, 0, 0, 0, 0, 1, math.nan], updown)
    assert report.stat_note(series, "none", 2.0, "lastNotNull") == "DOWN for 12 s (min over the run); no data for 2.0 s"
    steady = report.Series("A", "db", {}, [1, 1, 1], updown)
    assert report.stat_note(steady, "none", 2.0, "lastNotNull") == "UP throughout the run"
    assert report.display(updown, 0, "none")[0] == "DOWN" and report.display({}, 0.25, "s")[0] == "250 ms"


def test_field_config_overrides_thresholds_and_colours():
    panel = {
        "fieldConfig": {
            "defaults": {
                "unit": "s",
                "thresholds": {"steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]},
            },
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": "p95"},
                    "properties": [{"id": "custom.thresholdsStyle", "value": {"mode": "dashed"}}],
                },
                {
                    "matcher": {"id": "byRegexp", "options": "/^p9/"},
                    "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "dark-red"}}],
                },
                {
                    "matcher": {"id": "byFrameRefID", "options": "C"},
                    "properties": [{"id": "custom.drawStyle", "value": "bars"}],
                },
            ],
        }
    }
    p95, p50, c = (
        report.field_config(panel, "p95", "B"),
        report.field_config(panel, "p50", "A"),
        report.field_config(panel, "x", "C"),
    )
    assert report.drawn_thresholds(p95) == [(1, report.NAMED_COLORS["red"], "--")]
    assert report.drawn_thresholds(p50) == []  # thresholdsStyle off by default
    assert report.series_color(p95, 0) == "#C4162A" and report.series_color(p50, 0) == report.PALETTE[0]
    assert c["custom"]["drawStyle"] == "bars" and "drawStyle" not in p95.get("custom", {})
    assert report.color("rgba(0, 211, 255, 1)") == "#00d3ffff"
    assert (
        report.threshold_color(p50, 0.3) == report.NAMED_COLORS["green"]
        and report.threshold_color(p50, 2) == report.NAMED_COLORS["red"]
    )


def test_macros_and_variables_are_substituted():
    expr = 'rate(x{job=~"$job", instance=~"${instance:regex}", a="[[job]]"}[$__rate_interval])'
    expr += " * $__range_s / $__interval_ms"
    assert report.substitute(expr, rate_interval="8s", interval="2s", range_="60s") == (
        'rate(x{job=~"flaskapi", instance=~".+", a="flaskapi"}[8s]) * 60 / 2000'
    )
    board = {
        "templating": {"list": [{"name": "route", "type": "query", "includeAll": True, "current": {"value": "$__all"}}]}
    }
    assert report.variables(board)["route"] == ".+"
    assert report.grafana_rate_interval(2, 2) == "8s" and report.grafana_rate_interval(15, 5) == "20s"
    assert report.parse_duration("1m30s") == 90 and report.parse_duration("500ms") == 0.5
