"""`make fleet` (bench/fleet.py): two instances behind nginx, the exporters, Prometheus and
locust in two processes, at a small scale: the run passes its checks, both instances served
through nginx, and the page holds the per-instance and per-host panels with data. Its judge
fails a run where an instance got nothing or a panel is empty."""

from __future__ import annotations

import json
import sys

import pytest

from bench import fleet, report
from bench.harness.commands import run_command

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def run(migrated_database, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet")
    argv = ["--users", "10", "--ramp", "4", "--hold", "10", "--out", str(out)]
    result = run_command(
        [sys.executable, "-m", "bench.fleet", *argv, "--db-uri", migrated_database("test_fleet_run")],
        env=None,
        timeout=400,
    )
    summary_path = out / "summary.json"
    return result, json.loads(summary_path.read_text()) if summary_path.exists() else {}, out


def test_the_fleet_run_passes_with_both_instances_serving_through_nginx(run):
    result, summary, _out = run
    assert result.returncode == 0, result.stdout[-3000:]
    assert summary["verdict"] == "pass" and all(c["ok"] for c in summary["checks"])
    assert summary["instances"] == ["app-1", "app-2"] and summary["locust_processes"] == 2
    assert summary["locust"]["failures"] == 0
    # every request locust counted went through nginx to one of the two, and each wrote its line
    assert sum(summary["nginx_sent"].values()) >= summary["locust"]["requests"] > 0
    assert all(summary["access_lines"][name] > 0 for name in summary["instances"])


def test_the_page_shows_each_instance_and_the_exporters_rows(run):
    _result, _summary, out = run
    drawn = json.loads((out / "report.json").read_text())
    by_title = {panel["title"]: panel for panel in drawn["panels"]}
    for title in fleet.PER_INSTANCE_PANELS:
        assert by_title[title]["series"] == {"A": 2}, title
    rows = fleet.panel_rows(report.load())
    exporter_panels = [p for p in drawn["panels"] if rows.get(p["title"]) in fleet.EXPORTER_ROWS]
    assert len(exporter_panels) >= 10
    assert [p["title"] for p in exporter_panels if not any(p["series"].values())] == []
    page = (out / report.PAGE).read_text()
    assert "Requests/s by instance" in page and "Database server" in page


def test_the_judge_fails_an_instance_that_served_nothing_or_an_empty_panel(run):
    _result, summary, out = run
    drawn = json.loads((out / "report.json").read_text())
    dashboard = report.load()
    assert all(c["ok"] for c in fleet.judge(summary, drawn, dashboard))

    idle = {**summary, "access_lines": {**summary["access_lines"], "app-2": 0}}
    assert not checked(fleet.judge(idle, drawn, dashboard), "every instance served requests")

    one_line = json.loads(json.dumps(drawn))
    next(p for p in one_line["panels"] if p["title"] == "Requests/s by instance")["series"] = {"A": 1}
    assert not checked(fleet.judge(summary, one_line, dashboard), "the per-instance panels show every instance")

    no_host = json.loads(json.dumps(drawn))
    next(p for p in no_host["panels"] if p["title"] == "CPU by mode")["series"] = {"A": 0}
    assert not checked(fleet.judge(summary, no_host, dashboard), "every panel of the Hosts and Database server rows")


def checked(checks: list[dict], name: str) -> bool:
    (check,) = [c for c in checks if c["name"].startswith(name)]
    return check["ok"]
