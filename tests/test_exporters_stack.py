"""The Hosts and Database server rows on real data: Debian's node and Postgres exporters on
loopback, found by a real Prometheus through file_sd target files, against the test Postgres.
Every panel of the two rows returns data; the connections panel shows a SQLAlchemy pool of known
size; a real lock wait and a real deadlock show on theirs; the host figures agree with /proc; and
the report renders the rows with their units. Last, an exporter stopped is what the
FlaskapiExporterDown expression sees.

The Postgres here is the embedded one (pgserver): it has no contrib modules, so
pg_stat_statements cannot be loaded and monitoring/postgres-exporter/statements.yml is not run
(docs/monitoring.md)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from bench import report
from bench.harness import exporters
from bench.harness.environment import ROOT, free_port
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from tests import grafana_dashboard

pytestmark = pytest.mark.stack

DATABASE = "test_exporters"
HOST = "db-host"
POOL_SIZE = 6
SCRAPE_SECONDS = 1
STEP = 1
RATE = "4s"  # 4 scrapes: Grafana's $__rate_interval at this scrape interval
ROWS = ("Hosts", "Database server")


def evaluate(expr: str) -> str:
    return report.substitute(expr, rate_interval=RATE, interval=f"{STEP}s", range_="60s")


def row_panels(board: dict) -> list[report.Panel]:
    """The panels of the Hosts and Database server rows, as the report reads them."""
    members = [p for row, panels in grafana_dashboard.rows(board) if row["title"] in ROWS for p in panels]
    return [report.panel_of(item) for item in members]


def panel_query(board: dict, title: str, ref: str = "A") -> str:
    return evaluate(grafana_dashboard.target_expr(board, title, ref))


def scraped_after(prometheus: Prometheus, job: str, moment: float) -> bool:
    """Whether Prometheus has a sample of `job` taken after `moment` (wall clock)."""
    return any(float(s["value"][1]) > moment for s in prometheus.query(f'timestamp(up{{job="{job}"}})'))


def hold_a_lock_wait(engine, started: threading.Event, release: threading.Event) -> None:
    """One session holds an exclusive lock on the probe table; another waits for it until the
    holder lets go (at `release`)."""
    with engine.connect() as holder:
        holder.execute(text("LOCK TABLE exporter_probe IN ACCESS EXCLUSIVE MODE"))
        waiter = threading.Thread(target=read_probe, args=(engine,))
        waiter.start()
        started.set()
        release.wait(120)
        holder.rollback()
    waiter.join(30)


def read_probe(engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT count(*) FROM exporter_probe"))
        conn.rollback()


def deadlock(engine) -> int:
    """Two sessions update the probe's two rows in opposite orders: Postgres detects the cycle
    (after deadlock_timeout) and rolls one back. Returns how many were refused (1)."""
    refused = []
    first_row_taken = threading.Barrier(2, timeout=30)

    def session(first: int, second: int) -> None:
        with engine.connect() as conn:
            try:
                conn.execute(text("UPDATE exporter_probe SET n = n + 1 WHERE id = :id"), {"id": first})
                first_row_taken.wait()
                conn.execute(text("UPDATE exporter_probe SET n = n + 1 WHERE id = :id"), {"id": second})
                conn.commit()
            except DBAPIError as exc:
                refused.append(str(exc))
                conn.rollback()

    sessions = [threading.Thread(target=session, args=order) for order in ((1, 2), (2, 1))]
    for thread in sessions:
        thread.start()
    for thread in sessions:
        thread.join(60)
    assert all("deadlock detected" in message for message in refused), refused
    return len(refused)


@pytest.fixture(scope="module")
def run(postgres, migrated_database, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("exporters")
    db_uri = migrated_database(DATABASE)
    # The exporter's own connection goes to the `postgres` database, so the test database's
    # connections are the test's alone.
    exporter_uri = postgres.get_uri("postgres")
    engine = create_engine(db_uri, pool_size=POOL_SIZE, max_overflow=4)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS exporter_probe (id int PRIMARY KEY, n int NOT NULL)"))
        conn.execute(text("INSERT INTO exporter_probe VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING"))
    engine.dispose()
    node_port, postgres_port = free_port(), free_port()
    node = exporters.node_exporter(node_port, workdir / "node-exporter.out")
    database = exporters.postgres_exporter(exporters.libpq_dsn(exporter_uri), postgres_port, workdir / "pg.out")
    with node, database:
        exporters.write_targets(workdir, "node", {HOST: f"127.0.0.1:{node_port}"})
        exporters.write_targets(workdir, "postgres", {HOST: f"127.0.0.1:{postgres_port}"})
        with Prometheus(workdir, targets={}, interval=f"{SCRAPE_SECONDS}s") as prometheus:
            started = time.time()
            for job in ("node", "postgres"):
                wait_for(
                    lambda job=job: prometheus.query(f'count_over_time(up{{job="{job}"}}[1m]) >= 2'),
                    f"two scrapes of the {job} exporter",
                )
            yield {
                "prometheus": prometheus,
                "engine": create_engine(db_uri, pool_size=POOL_SIZE, max_overflow=0),
                # the lock wait's and the deadlock's sessions: closed when done, not pooled
                "sessions": create_engine(db_uri, poolclass=NullPool),
                "started": started,
                "node": node,
                "workdir": workdir,
            }


@pytest.fixture(scope="module")
def pool(run):
    """POOL_SIZE connections of one SQLAlchemy pool checked out and idle (no transaction open),
    as a worker's pool keeps them between requests; until the module ends."""
    held = []
    for _ in range(POOL_SIZE):
        conn = run["engine"].connect()
        conn.execute(text("SELECT 1"))
        conn.commit()
        held.append(conn)
    opened = time.time()
    wait_for(lambda: scraped_after(run["prometheus"], "postgres", opened), "a scrape of the pool's connections")
    yield opened
    for conn in held:
        conn.close()
    run["engine"].dispose()


def test_the_targets_carry_their_host_from_the_files(run):
    prometheus = run["prometheus"]
    up = {
        (s["metric"]["job"], s["metric"]["host"], s["value"][1]) for s in prometheus.query('up{job=~"node|postgres"}')
    }
    assert up == {("node", HOST, "1"), ("postgres", HOST, "1")}
    [database] = prometheus.query('pg_up{job="postgres"}')
    assert database["value"][1] == "1", (run["workdir"] / "pg.out").read_text()[-2000:]


def test_the_host_variable_lists_the_exporters_host(run):
    prometheus = run["prometheus"]
    selector, label = grafana_dashboard.label_values(
        grafana_dashboard.variable_query(grafana_dashboard.variable(report.load(), "host"))
    )
    response = requests.get(prometheus.url + "/api/v1/series", params={"match[]": evaluate(selector)}, timeout=10)
    assert {series[label] for series in response.json()["data"]} == {HOST}


def test_connections_panel_shows_the_pool(run, pool):
    """The pool's connections are the test database's only ones: idle, exactly POOL_SIZE; and
    the share in use counts them against the limit."""
    prometheus, board = run["prometheus"], report.load()
    by_state = {
        (s["metric"]["datname"], s["metric"]["state"]): float(s["value"][1])
        for s in prometheus.query(panel_query(board, "Connections by state vs limit"))
    }
    assert by_state.get((DATABASE, "idle")) == POOL_SIZE, by_state
    assert not [key for key in by_state if key[0] == DATABASE and key[1] != "idle"], by_state
    [limit] = prometheus.query(panel_query(board, "Connections by state vs limit", "B"))
    [in_use] = prometheus.query(panel_query(board, "Connections in use"))
    assert float(in_use["value"][1]) >= POOL_SIZE / float(limit["value"][1])
    assert float(in_use["value"][1]) == pytest.approx(sum(by_state.values()) / float(limit["value"][1]))


def test_lock_wait_panels_show_a_session_waiting(run, pool):
    prometheus, board = run["prometheus"], report.load()
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_a_lock_wait, args=(run["sessions"], started, release))
    holder.start()
    try:
        assert started.wait(30)
        waiting = wait_for(
            lambda: [
                s
                for s in prometheus.query(panel_query(board, "Sessions waiting for a lock"))
                if s["metric"]["datname"] == DATABASE and float(s["value"][1]) >= 1
            ],
            "the lock wait on the panel",
        )
        assert [float(s["value"][1]) for s in waiting] == [1]
        [longest] = [
            s for s in prometheus.query(panel_query(board, "Longest lock wait")) if s["metric"]["datname"] == DATABASE
        ]
        assert float(longest["value"][1]) > 0
    finally:
        release.set()
        holder.join(60)
    ended = time.time()
    wait_for(lambda: scraped_after(prometheus, "postgres", ended), "a scrape after the wait ended")
    [after] = [
        s
        for s in prometheus.query(panel_query(board, "Sessions waiting for a lock"))
        if s["metric"]["datname"] == DATABASE
    ]
    assert float(after["value"][1]) == 0


def test_deadlocks_panel_counts_one_deadlock_once(run, pool):
    prometheus, board = run["prometheus"], report.load()
    before = time.time()
    assert deadlock(run["sessions"]) == 1
    after = time.time()
    wait_for(lambda: scraped_after(prometheus, "postgres", after + SCRAPE_SECONDS), "two scrapes after the deadlock")
    end = time.time()
    [series] = [
        s
        for s in prometheus.query_range(panel_query(board, "Deadlocks"), before - 5, end, STEP)
        if s["metric"]["datname"] == DATABASE
    ]
    bars = [float(value) for _, value in series["values"] if float(value) != 0]
    assert bars == [1.0], series["values"]


def test_host_panels_agree_with_proc(run):
    prometheus, board = run["prometheus"], report.load()
    [cores] = prometheus.query(panel_query(board, "Load average vs cores", "C"))
    assert float(cores["value"][1]) == os.cpu_count()
    [total] = prometheus.query(panel_query(board, "Memory used vs total", "B"))
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert float(total["value"][1]) == int(meminfo["MemTotal"].split()[0]) * 1024
    per_core = prometheus.query(panel_query(board, "CPU busy per core"))
    assert len(per_core) == os.cpu_count()
    assert all(-0.01 <= float(s["value"][1]) <= 1.01 for s in per_core), per_core
    # the modes stack to the host's busy share: at most every core
    [busy] = prometheus.query(f"sum by (host) ({panel_query(board, 'CPU by mode')})")
    assert 0 < float(busy["value"][1]) <= 1.01


def test_every_panel_of_the_two_rows_returns_data(run, pool):
    prometheus = run["prometheus"]
    end = time.time()
    empty = [
        f"{panel.title} [{ref}]: {evaluate(expr)}"
        for panel in row_panels(report.load())
        for ref, expr, _ in panel.targets
        if not prometheus.query_range(evaluate(expr), run["started"], end, STEP)
    ]
    assert empty == []
    assert len(row_panels(report.load())) == 15


def test_the_report_renders_the_two_rows_with_their_units(run, pool, tmp_path):
    board = report.load()
    board["panels"] = [
        item for row, panels in grafana_dashboard.rows(board) if row["title"] in ROWS for item in [row, *panels]
    ]
    drawn = report.render(
        run["prometheus"],
        tmp_path,
        start=run["started"],
        end=time.time(),
        step=STEP,
        rate_interval=RATE,
        dashboard=board,
    )
    units = {panel["title"]: panel["unit"] for panel in drawn["panels"]}
    assert [p["title"] for p in drawn["panels"]] == [p.title for p in row_panels(report.load())]
    assert [(p["title"], ref) for p in drawn["panels"] for ref, count in p["series"].items() if count == 0] == []
    assert units["CPU by mode"] == units["Connections in use"] == units["Cache hit ratio"] == "%"
    assert units["Memory used vs total"] in ("MiB", "GiB")
    assert units["Network throughput"].endswith("B/s") and units["Transactions/s"] == "ops/s"
    assert (tmp_path / "dashboard.html").read_text().count("<img ") == 15


def test_a_new_host_in_the_target_file_is_scraped_without_a_restart(run):
    """file_sd: Prometheus rereads the file when it changes; a second entry (the same exporter
    under another host name) becomes a target with its host, and leaves with the entry."""
    prometheus, workdir = run["prometheus"], run["workdir"]
    path = workdir / exporters.TARGET_FILES["node"]
    original = path.read_text()
    [address] = {t for group in yaml.safe_load(original) for t in group["targets"]}

    def active_hosts() -> set[str]:
        targets = requests.get(prometheus.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return {t["labels"]["host"] for t in targets if t["labels"]["job"] == "node"}

    exporters.write_targets(workdir, "node", {HOST: address, "app-2": address})
    wait_for(lambda: prometheus.query('up{job="node", host="app-2"} == 1'), "the new host scraped")
    path.write_text(original)
    wait_for(lambda: active_hosts() == {HOST}, "the removed host dropped")


def test_a_missing_exporter_binary_says_which_package_to_install():
    with pytest.raises(RuntimeError, match=r"apt-get install prometheus-no-such-exporter"):
        exporters.binary("prometheus-no-such-exporter")


def test_a_stopped_exporter_is_what_the_exporter_down_alert_sees(run):
    """Last (it stops the node exporter): its target answers no more, and the alert's expression
    (its `for` aside) names that target and host; the Postgres exporter's is not named."""
    prometheus = run["prometheus"]
    rules = yaml.safe_load((ROOT / "monitoring" / "rules" / "flaskapi.rules.yml").read_text())
    [expr] = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "FlaskapiExporterDown"]
    assert not prometheus.query(expr)
    run["node"].stop()
    down = wait_for(lambda: prometheus.query(expr), "the exporter down expression on the stopped exporter")
    assert [(s["metric"]["job"], s["metric"]["host"]) for s in down] == [("node", HOST)]
