"""The dashboard and alerts on real data: gunicorn + Prometheus + a short locust run with one
crash and one slow-database spell, then every dashboard query evaluated through Prometheus."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import yaml
from sqlalchemy import create_engine, text

from bench import report
from bench.harness.environment import ROOT, free_port, locust_command, locust_env, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from bench.harness.scrape import metric, scrape

pytestmark = pytest.mark.stack

RUN_SECONDS = 30
CRASH_AT = 8
STALL_SECONDS = 6  # after the crash (at CRASH_AT s of locust's run), before its end
RATE = "10s"


def hold_books_lock(db_uri: str, metrics_url: str) -> None:
    """A slow database: lock the books table so every books query waits past the statement
    timeout and is answered 503 (database_timeout). It starts once the crash's restart is
    counted, so the two faults come one after the other whatever the machine's speed."""
    wait_for(
        lambda: metric(scrape(metrics_url), "flaskapi_worker_restarts_total") >= 1,
        "the scheduled crash's restart",
        timeout=RUN_SECONDS + 60,
    )
    engine = create_engine(db_uri)
    with engine.connect() as conn:
        conn.execute(text("LOCK TABLE books IN ACCESS EXCLUSIVE MODE"))
        time.sleep(STALL_SECONDS)
        conn.rollback()
    engine.dispose()


@pytest.fixture(scope="module")
def run(migrated_database, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("monitoring")
    db_uri = migrated_database("test_monitoring")
    env = stack_env(db_uri, data_dir, CRASH_ROUTE_ENABLED="1", DB_STATEMENT_TIMEOUT_MS="500", LOG_CONSOLE="0")
    locust_port = free_port()
    with Gunicorn(env, workers=3, log_path=data_dir / "gunicorn.out") as stack:
        targets = {"flaskapi": f"127.0.0.1:{stack.metrics_port}", "locust": f"127.0.0.1:{locust_port}"}
        with Prometheus(data_dir, targets=targets, interval="1s") as prometheus:
            started_wall = time.time()
            staller = threading.Thread(target=hold_books_lock, args=(db_uri, stack.metrics_url))
            staller.start()
            generator = locust_env(LOCUST_METRICS_BIND=f"127.0.0.1:{locust_port}", LOCUST_CRASH_AT=str(CRASH_AT))
            result = subprocess.run(
                locust_command(stack.url, users=30, rate=10, seconds=RUN_SECONDS),
                check=False,
                cwd=ROOT,
                env=generator,
                capture_output=True,
                text=True,
                timeout=RUN_SECONDS + 60,
            )
            staller.join(RUN_SECONDS + 90)
            assert not staller.is_alive(), "the database stall never ended"
            load_ended = time.time()
            # two more scrapes of the app after the last request, so every rate sees the end
            wait_for(
                lambda: any(
                    float(s["value"][1]) > load_ended + 1 for s in prometheus.query('timestamp(up{job="flaskapi"})')
                ),
                "two scrapes after the load ended",
            )
            ended = time.time()
            yield prometheus, started_wall, ended, result, data_dir


def test_locust_ran(run):
    _, _, _, result, _ = run
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_dashboard_query_returns_data(run):
    prometheus, start, end, _, _ = run
    empty = []
    dashboard = report.load()
    for panel in report.panels(dashboard):
        for ref, expr, _ in panel.targets:
            query = report.substitute(expr, rate_interval=RATE, interval="1s", range_="60s")
            if not prometheus.query_range(query, start, end, 1):
                empty.append(f"{panel.title} [{ref}]: {query}")
    for name, expr in report.annotation_exprs(dashboard):
        query = report.substitute(expr, rate_interval=RATE, interval="1s", range_="60s")
        if not prometheus.query_range(query, start, end, 1):
            empty.append(f"annotation {name}: {query}")
    assert empty == []


def test_restart_series_rises_by_exactly_one(run):
    prometheus, start, end, _, _ = run
    [series] = prometheus.query_range("sum(flaskapi_worker_restarts_total)", start, end, 1)
    values = [float(v) for _, v in series["values"]]
    assert values[-1] - values[0] == 1


def test_load_generator_series_are_present(run):
    prometheus, start, end, _, _ = run
    users = prometheus.query_range('max(locust_users{job="locust"})', start, end, 1)
    assert max(float(v) for _, v in users[0]["values"]) == 30
    requests = prometheus.query(f'sum(max_over_time(locust_requests_total{{job="locust"}}[{int(end - start)}s]))', end)
    assert float(requests[0]["value"][1]) > 200


def test_restart_and_5xx_alert_expressions_fire_on_the_run(run):
    prometheus, start, end, _, _ = run
    rules = yaml.safe_load((ROOT / "monitoring" / "rules" / "flaskapi.rules.yml").read_text())
    exprs = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    for alert in ("FlaskapiWorkerRestarted", "FlaskapiHigh5xxRatio"):
        assert prometheus.query_range(exprs[alert], start, end, 1), f"{alert} never fired"
    # and the alerts that describe faults this run did not have stay quiet
    for alert in ("FlaskapiNotReady", "FlaskapiTargetDown"):
        assert not prometheus.query_range(exprs[alert], start, end, 1), f"{alert} fired"


def test_report_renders_every_panel_from_the_dashboard_queries(run, tmp_path):
    prometheus, start, end, _, _ = run
    drawn = report.render(prometheus, tmp_path, start=start, end=end, step=1, rate_interval=RATE)
    titles = [panel.title for panel in report.panels(report.load())]
    assert [panel["title"] for panel in drawn["panels"]] == titles
    empty = [(p["title"], ref) for p in drawn["panels"] for ref, count in p["series"].items() if count == 0]
    assert empty == []
    for panel in drawn["panels"]:  # every figure on the run's time axis
        assert panel["xlim"] and all(limits == pytest.approx([start, end]) for limits in panel["xlim"]), panel["title"]
    assert len(list(tmp_path.glob("panel-*.png"))) == len(titles)
    page = (tmp_path / "dashboard.html").read_text()
    assert page.count("<img ") == len(titles)
    assert "$__" not in page
    # the crash, as the dashboard's own annotation queries saw it
    assert drawn["annotations"], "no annotation for the run's worker restart"
