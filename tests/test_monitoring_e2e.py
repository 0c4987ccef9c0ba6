"""The dashboard and alerts on real data: gunicorn + Prometheus + a short locust run with one
crash and one slow-database spell, then every dashboard query evaluated through Prometheus, and
what the panels say about the crash checked against the master's own log line, and about the
spell's 503s against the SLOs.

Prometheus loads the repo's rules with every group at its 1 s interval: the SLO's long windows
(once a minute) and budget (every 5 minutes) would not be evaluated once in a run of seconds."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from datetime import datetime

import pytest
import requests
import yaml
from sqlalchemy import create_engine, text

from bench import report
from bench.harness import exporters
from bench.harness.environment import ROOT, free_port, locust_command, locust_env, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from bench.harness.scrape import metric, scrape
from monitoring import slo
from service.observability.master_metrics import LOWEST_WINDOW_SECONDS
from tests import grafana_dashboard

pytestmark = pytest.mark.stack

RUN_SECONDS = 30
CRASH_AT = 8
STALL_SECONDS = 6  # after the crash (at CRASH_AT s of locust's run), before its end
USERS = 30
WORKERS = 3
RATE = "10s"
SCRAPE_SECONDS = 1  # the harness Prometheus' interval below
STEP = 1  # seconds between the points of every range query, as the report draws them


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
    with (
        Gunicorn(env, workers=WORKERS, log_path=data_dir / "gunicorn.out") as stack,
        # the Hosts and Database server rows: this host's node exporter and the database's
        exporters.host_and_database(data_dir, db_uri, free_port(), free_port()),
    ):
        stack.wait_for_workers()  # every worker up before the range the tests read begins
        targets = {"flaskapi": f"127.0.0.1:{stack.metrics_port}", "locust": f"127.0.0.1:{locust_port}"}
        with Prometheus(
            data_dir, targets=targets, interval=f"{SCRAPE_SECONDS}s", every_group_at_interval=True
        ) as prometheus:
            # Two scrapes of the app before the load (the first comes up to 5 s after Prometheus is
            # ready): every rate sees the load from its start, the users' sign-ups and logins too.
            wait_for(
                lambda: prometheus.query('count_over_time(up{job="flaskapi"}[1m]) >= 2'),
                "Prometheus's first two scrapes of the app",
            )
            started_wall = time.time()
            staller = threading.Thread(target=hold_books_lock, args=(db_uri, stack.metrics_url))
            staller.start()
            generator = locust_env(LOCUST_METRICS_BIND=f"127.0.0.1:{locust_port}", LOCUST_CRASH_AT=str(CRASH_AT))
            result = subprocess.run(
                locust_command(stack.url, users=USERS, rate=10, seconds=RUN_SECONDS),
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


def evaluate(expr: str) -> str:
    """A dashboard expr as Grafana sends it for a graph of one point per STEP."""
    return report.substitute(expr, rate_interval=RATE, interval=f"{STEP}s", range_="60s")


def test_every_dashboard_query_returns_data(run):
    prometheus, start, end, _, _ = run
    empty = []
    dashboard = report.load()
    for panel in report.panels(dashboard):
        for ref, expr, _ in panel.targets:
            query = evaluate(expr)
            if not prometheus.query_range(query, start, end, STEP):
                empty.append(f"{panel.title} [{ref}]: {query}")
    for name, expr in report.annotation_exprs(dashboard):
        query = evaluate(expr)
        if not prometheus.query_range(query, start, end, STEP):
            empty.append(f"annotation {name}: {query}")
    assert empty == []


def test_the_variables_list_the_job_and_its_instance(run):
    prometheus, start, end, _, _ = run
    board = report.load()
    [up] = prometheus.query('up{job="flaskapi"}', end)

    def values(name: str) -> set[str]:
        selector, label = grafana_dashboard.label_values(
            grafana_dashboard.variable_query(grafana_dashboard.variable(board, name))
        )
        response = requests.get(
            prometheus.url + "/api/v1/series",
            params={"match[]": evaluate(selector), "start": start, "end": end},
            timeout=10,
        )
        return {series[label] for series in response.json()["data"]}

    assert values("job") == {"flaskapi"}
    assert values("instance") == {up["metric"]["instance"]}


def worker_died(data_dir) -> tuple[float, int]:
    """(time, pid) of the master's worker_died line: when the death was observed, by whom."""
    lines = [json.loads(line) for line in (data_dir / "logs" / "app.log").read_text().splitlines()]
    [died] = [line for line in lines if line.get("event") == "worker_died"]
    return datetime.fromisoformat(died["timestamp"]).timestamp(), died["worker_pid"]


def scrapes_of_the_app(prometheus, start: float, end: float) -> list[float]:
    """The times Prometheus scraped the app (its `up` samples), oldest first."""
    [series] = prometheus.query(f'up{{job="flaskapi"}}[{int(end - start) + 1}s]', end)
    return [float(at) for at, _ in series["values"]]


def points(series: dict) -> list[tuple[float, float]]:
    """(time, value) of a range query's series, times rounded to the millisecond Prometheus
    answers with, so that `at - 1` finds the point one second before."""
    return [(round(float(at), 3), float(value)) for at, value in series["values"]]


def test_restart_series_rises_by_exactly_one(run):
    prometheus, start, end, _, _ = run
    [series] = prometheus.query_range("sum(flaskapi_worker_restarts_total)", start, end, 1)
    values = [float(v) for _, v in series["values"]]
    assert values[-1] - values[0] == 1


def test_restarts_panel_shows_one_restart_as_one_event_at_the_death(run):
    """One bar of height 1 at the first point after the scrape that saw the death, zero
    elsewhere: not increase()'s extrapolated plateau."""
    prometheus, start, end, _, data_dir = run
    died_at, _ = worker_died(data_dir)
    expr = grafana_dashboard.target_expr(report.load(), "Worker restarts")
    [series] = prometheus.query_range(evaluate(expr), start, end, STEP)
    nonzero = [(at, value) for at, value in points(series) if value != 0]
    assert [value for _, value in nonzero] == [1.0], nonzero
    [(at, _)] = nonzero
    seen = min(t for t in scrapes_of_the_app(prometheus, start, end) if t > died_at)
    assert seen <= at < seen + STEP, (died_at, seen, at)
    assert at - died_at <= 2 * SCRAPE_SECONDS + STEP


def test_death_annotation_is_one_event_at_the_worker_died_line(run):
    prometheus, start, end, _, data_dir = run
    died_at, _ = worker_died(data_dir)
    [expr] = [expr for name, expr in report.annotation_exprs(report.load()) if name == "Worker deaths"]
    [series] = prometheus.query_range(evaluate(expr), start, end, STEP)
    [(at, value)] = points(series)  # one isolated point: an event, not a region
    assert value == 1
    assert 0 < at - died_at <= 2 * SCRAPE_SECONDS + STEP, (died_at, at)


def test_cpu_of_the_dead_worker_leaves_the_panel_at_the_first_scrape_after_its_death(run):
    prometheus, start, end, _, data_dir = run
    died_at, pid = worker_died(data_dir)
    scrapes = scrapes_of_the_app(prometheus, start, end)
    before, seen = max(t for t in scrapes if t < died_at), min(t for t in scrapes if t > died_at)
    query = evaluate(grafana_dashboard.target_expr(report.load(), "Per-worker CPU"))

    def pids(at: float) -> set[str]:
        return {series["metric"]["pid"] for series in prometheus.query(query, at)}

    assert str(pid) in pids(before)
    # the others stay; the replacement has one sample at most, no rate yet
    assert pids(seen) == pids(before) - {str(pid)}
    # what the panel would draw without the join: the dead worker's rate, for a whole window
    bare = prometheus.query(f'rate(process_cpu_seconds_total{{job="flaskapi", pid="{pid}"}}[{RATE}])', seen)
    assert bare, "the check above would pass without the join"


def test_workers_alive_panel_dips_at_the_death_and_recovers(run):
    prometheus, start, end, _, data_dir = run
    died_at, _ = worker_died(data_dir)
    board = report.load()
    [alive] = prometheus.query_range(
        evaluate(grafana_dashboard.target_expr(board, "Workers alive", "A")), start, end, STEP
    )
    [lowest] = prometheus.query_range(
        evaluate(grafana_dashboard.target_expr(board, "Workers alive", "B")), start, end, STEP
    )
    dips = [at for at, value in points(lowest) if value < WORKERS]
    assert {value for at, value in points(lowest) if at in dips} == {WORKERS - 1}
    assert dips and died_at < dips[0] and dips[-1] <= died_at + LOWEST_WINDOW_SECONDS + 2 * SCRAPE_SECONDS + STEP
    assert points(lowest)[-1][1] == points(alive)[-1][1] == WORKERS


def test_locust_rps_agrees_with_the_server_rate_at_steady_state(run):
    """Every point whose rate window holds all the users and not the crash (requests cut by
    the dying worker are failures to locust and never answered): the load generator's rate
    and the rate the server answered agree. Locust names /books/<id> by route, so its series
    are stable; named by path, every id was a new series and rate() missed its first request
    (half the requests are updates and deletes)."""
    prometheus, start, end, _, data_dir = run
    died_at, _ = worker_died(data_dir)
    board = report.load()
    window = int(RATE.removesuffix("s"))

    def by_time(title: str, ref: str) -> dict[float, float]:
        totals: dict[float, float] = {}
        for series in prometheus.query_range(
            evaluate(grafana_dashboard.target_expr(board, title, ref)), start, end, STEP
        ):
            for at, value in points(series):
                totals[at] = totals.get(at, 0.0) + value
        return totals

    users = by_time("Locust users", "A")
    locust = by_time("Locust RPS and failures/s", "A")
    answered = by_time("Locust RPS and failures/s", "C")
    by_route = by_time("Request rate by route", "A")
    steady = [
        at
        for at in sorted(locust)
        if all(users.get(round(at - back, 3)) == USERS for back in range(0, window + 2 * SCRAPE_SECONDS + 1, STEP))
        and not at - window - 2 * SCRAPE_SECONDS <= died_at <= at + SCRAPE_SECONDS
    ]
    assert len(steady) >= 3, f"too few steady points to compare: {steady}"
    for at in steady:
        # the same answers counted by two series of the exporter (by status; by route and status),
        # scraped together: they agree point by point
        assert answered[at] == pytest.approx(by_route[at], rel=0.05)
    # Locust and the server are two targets scraped at different moments, so one point's rates
    # differ by the requests of that offset (about 10 % of a 10 s window at this load, more on a
    # busy box); over every steady point the offsets cancel. Named by path, locust read 38 % low.
    sent = sum(locust[at] for at in steady)
    served = sum(answered[at] for at in steady)
    assert sent == pytest.approx(served, rel=0.1), [(at - start, locust[at], answered[at]) for at in steady]


def test_alerts_panel_and_annotation_show_the_restart_alert_firing_from_the_death(run):
    prometheus, start, end, _, data_dir = run
    died_at, _ = worker_died(data_dir)
    board = report.load()
    lanes = prometheus.query_range(evaluate(grafana_dashboard.target_expr(board, "Alerts firing")), start, end, STEP)
    assert "FlaskapiWorkerRestarted" in {lane["metric"]["alertname"] for lane in lanes}
    [expr] = [expr for name, expr in report.annotation_exprs(board) if name == "Alerts firing"]
    [restarted] = [
        series
        for series in prometheus.query_range(evaluate(expr), start, end, STEP)
        if series["metric"]["alertname"] == "FlaskapiWorkerRestarted"
    ]
    times = [at for at, _ in points(restarted)]
    # a region: consecutive points from the first evaluation after the death to the end
    assert len(times) >= 3 and all(round(b - a, 3) == STEP for a, b in itertools.pairwise(times))
    seen = min(t for t in scrapes_of_the_app(prometheus, start, end) if t > died_at)
    assert seen < times[0] <= seen + 2 * SCRAPE_SECONDS + STEP, (died_at, seen, times[0])


def test_slo_row_tells_the_run(run):
    """The spell's 503s spend the availability budget past the fast page's line; and on a run
    shorter than every window, each window is the run so far: the burn lines of an SLO end on one
    value, and its budget left is 1 minus it, as the panels' descriptions say."""
    prometheus, start, end, _, _ = run
    board = report.load()
    spec = slo.load()
    ended_at = {}
    for objective in spec["slos"]:
        name = objective["name"].replace("-", " ").capitalize()
        burn = grafana_dashboard.panel(board, f"{name} SLO: burn rate by window")
        last = {}
        for target in burn["targets"]:
            [series] = prometheus.query(evaluate(target["expr"]), end)
            last[target["legendFormat"]] = float(series["value"][1])
        assert set(last) == set(slo.windows(spec))
        for window, value in last.items():
            assert value == pytest.approx(last["5m"], rel=0.1, abs=0.01), (objective["name"], window, last)
        left = grafana_dashboard.target_expr(board, f"{name} SLO: error budget left ({spec['period']})")
        [series] = prometheus.query(evaluate(left), end)
        assert float(series["value"][1]) == pytest.approx(1 - last["5m"], rel=0.1, abs=0.01), objective["name"]
        ended_at[objective["name"]] = float(series["value"][1])

    availability = grafana_dashboard.panel(board, "Availability SLO: burn rate by window")
    [fast] = [t["expr"] for t in availability["targets"] if t["legendFormat"] == "5m"]
    [series] = prometheus.query_range(evaluate(fast), start, end, STEP)
    page = max(tier["burn_rate"] for tier in spec["tiers"])
    assert max(float(value) for _, value in series["values"]) > page
    assert ended_at["availability"] < 0, "the spell overspent the budget a run this short has"


def test_load_generator_series_are_present(run):
    prometheus, start, end, _, _ = run
    users = prometheus.query_range('max(locust_users{job="locust"})', start, end, 1)
    assert max(float(v) for _, v in users[0]["values"]) == USERS
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
