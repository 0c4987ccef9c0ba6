"""Metrics and crash reports from a real gunicorn with three workers."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from sqlalchemy import create_engine, text

from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.scrape import has_metric, metric, reported_worker_pids, scrape
from bench.harness.sentry_receiver import SentryReceiver
from service.observability.master_metrics import LOWEST_WINDOW_SECONDS
from tests.conftest import eventually

pytestmark = pytest.mark.stack

WORKERS = 3
THREADS = 4  # the shipped default (gthread)


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("metrics")
    with SentryReceiver() as receiver:
        env = stack_env(
            migrated_database("test_metrics"),
            data_dir,
            CRASH_ROUTE_ENABLED="1",
            SENTRY_DSN=receiver.dsn,
            SENTRY_TRACES_SAMPLE_RATE="0",
        )
        with Gunicorn(env, workers=WORKERS, log_path=data_dir / "gunicorn.out") as stack:
            # the master spawns workers one after another
            stack.wait_for_workers()
            stack.receiver = receiver
            stack.data_dir = data_dir
            stack.db_uri = env["DB_URI"]
            yield stack


def test_series_are_present_and_move_with_requests(stack):
    before = scrape(stack.metrics_url)
    for series in (
        "flaskapi_db_pool_capacity",
        "flaskapi_build_info",
        "flaskapi_workers_alive",
        "flaskapi_database_up",
        "flaskapi_worker_restarts_total",
    ):
        assert has_metric(before, series), series
    assert metric(before, "flaskapi_build_info", version="0.1.0", workers=str(WORKERS)) == 1
    assert metric(before, "flaskapi_workers_alive") == WORKERS
    assert metric(before, "flaskapi_database_up") == 1
    assert len(reported_worker_pids(before)) == WORKERS

    n = 60
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda _: requests.get(stack.url + "/books/7", timeout=10).status_code, range(n)))
    assert statuses == [404] * n
    after = scrape(stack.metrics_url)
    route = "/books/<book_id:book_id>"
    count = "flask_http_request_duration_seconds_count"
    # one series per route template, summed across workers: exactly the n requests just made
    assert (
        metric(after, count, method="GET", route=route, status="404")
        - metric(before, count, method="GET", route=route, status="404")
        == n
    )
    assert not any("/books/7" in labels.get("route", "") for _, labels, _ in after)  # never the raw path
    assert (
        metric(after, "flaskapi_db_pool_wait_seconds_count") - metric(before, "flaskapi_db_pool_wait_seconds_count")
        >= n
    )
    # every live worker reports its pool's capacity from its start (default: a connection per thread)
    assert metric(after, "flaskapi_db_pool_capacity") == WORKERS * THREADS
    # sampled gauges: all connections returned and no request in flight, within a sample
    for gauge in ("flaskapi_db_pool_checked_out", "flask_http_requests_in_progress"):
        assert eventually(lambda gauge=gauge: metric(scrape(stack.metrics_url), gauge), 0) == 0, gauge
    buckets = {labels["le"] for name, labels, _ in after if name == "flask_http_request_duration_seconds_bucket"}
    assert {"0.005", "30.0"} <= buckets
    assert len(reported_worker_pids(after)) == WORKERS


def test_every_process_series_of_prometheus_client_is_reported_for_each_gunicorn_process(stack):
    """The standard `process_*` names (those prometheus_client's ProcessCollector gives a
    single-process service), one series per live process labelled pid and role, each family
    exposed once (two collectors yielding the same name would break the scrape)."""
    response = requests.get(stack.metrics_url, timeout=10)
    families = [line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE ")]
    assert len(families) == len(set(families)), sorted(f for f in families if families.count(f) > 1)
    assert not [f for f in families if f.startswith("flaskapi_process_")]
    samples = scrape(stack.metrics_url)
    workers = reported_worker_pids(samples)
    assert len(workers) == WORKERS
    processes = {(str(pid), "worker") for pid in workers} | {(str(stack.process.pid), "master")}
    standard = {
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
    }
    assert {f for f in families if f.startswith("process_")} == standard
    for name in standard:
        reported = {(labels["pid"], labels["role"]) for n, labels, _ in samples if n == name}
        assert reported == processes, name
    for pid, role in processes:
        process = psutil.Process(int(pid))
        assert metric(samples, "process_resident_memory_bytes", pid=pid, role=role) > 10e6
        assert metric(samples, "process_cpu_seconds_total", pid=pid, role=role) > 0
        assert metric(samples, "process_start_time_seconds", pid=pid, role=role) == pytest.approx(
            process.create_time(), abs=0.05
        )
        fds = metric(samples, "process_open_fds", pid=pid, role=role)
        assert 0 < fds <= metric(samples, "process_max_fds", pid=pid, role=role)


def test_requests_answered_by_an_early_hook_are_timed_too(stack):
    """A body that is not JSON is refused by a before_request hook, before the view: the
    exporter's own hook runs earlier, so the 400 is in the latency histogram like any answer."""
    count, labels = "flask_http_request_duration_seconds_count", {"method": "POST", "route": "/books/", "status": "400"}
    before = metric(scrape(stack.metrics_url), count, **labels)
    response = requests.post(
        stack.url + "/books/", data="{not json", timeout=10, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert metric(scrape(stack.metrics_url), count, **labels) - before == 1


def test_a_sample_file_a_worker_is_still_creating_does_not_break_the_scrape(stack):
    """A starting worker creates its sample file empty, then sizes it: a scrape in between read
    an empty file, and the collector's struct.error made /metrics a 500 (seen while a stack
    started its workers on a loaded box). The half-made file is skipped, never a 500."""
    before = scrape(stack.metrics_url)
    for name in ("counter_4999999.db", "histogram_4999999.db"):
        (stack.metrics_dir / name).write_bytes(b"")  # as MmapedDict leaves it before truncate()
    (stack.metrics_dir / "gauge_livesum_4999999.db").write_bytes(b"\x00" * 4)  # a short read
    try:
        response = requests.get(stack.metrics_url, timeout=10)
        assert response.status_code == 200, response.text[-2000:]
        after = scrape(stack.metrics_url)
        assert metric(after, "flask_http_request_total") >= metric(before, "flask_http_request_total")
        assert metric(after, "flaskapi_workers_alive") == WORKERS
    finally:
        for path in stack.metrics_dir.glob("*_4999999.db"):
            path.unlink()


def test_metrics_are_not_served_on_the_public_port(stack):
    response = requests.get(stack.url + "/metrics", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_crashes_under_load_are_counted_replaced_and_lose_no_write(stack):
    crashes = 3
    before = scrape(stack.metrics_url)
    restarts_before = metric(before, "flaskapi_worker_restarts_total")
    creds = {"email": f"load-{uuid.uuid4().hex[:8]}@example.com", "password": "secret-pass"}
    assert requests.post(stack.url + "/auth/register", json=creds, timeout=10).status_code == 201
    token = requests.post(stack.url + "/auth/login", json=creds, timeout=10).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}

    acknowledged: list[int] = []
    failures: list[str] = []  # answers other than 201: there must be none
    lost: list[str] = []  # requests whose worker died under them (never acknowledged)
    stop = threading.Event()

    def writer() -> None:
        for i in range(20_000):  # until told to stop: the crashes are paced by progress, not time
            if stop.is_set():
                return
            try:
                response = requests.post(stack.url + "/books/", json={"title": f"load {i}"}, headers=auth, timeout=10)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                # in flight on the worker that died (possibly cut between headers and body)
                lost.append(repr(exc))
                continue
            if response.status_code == 201:
                acknowledged.append(response.json()["id"])
            else:
                failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()

    def restarts() -> float:
        return metric(scrape(stack.metrics_url), "flaskapi_worker_restarts_total") - restarts_before

    def more_writes(count: int, what: str) -> None:
        mark = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= mark + count or failures, f"{count} more acknowledged writes {what}")

    try:
        more_writes(20, "before the first crash")
        for n in range(1, crashes + 1):
            with pytest.raises(requests.ConnectionError):  # the worker dies mid-request
                requests.get(stack.url + "/auth/crash", timeout=10)
            wait_for(lambda n=n: restarts() >= n, f"restart {n} to be counted")
            more_writes(20, f"after crash {n}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)

    stack.wait_for_workers(what=f"{WORKERS} workers alive again")
    after = scrape(stack.metrics_url)
    assert metric(after, "flaskapi_worker_restarts_total") - restarts_before == crashes
    assert metric(after, "flaskapi_worker_exits_total", cause="exit code 1") >= crashes
    assert metric(after, "flaskapi_db_pool_capacity") == WORKERS * THREADS  # replacements count at once
    # Every request that got an answer got a 201. A crash takes down only what was in flight on
    # its own worker: at most its other THREADS - 1 threads' requests each time.
    assert len(acknowledged) > 50
    assert failures == []
    assert len(lost) <= crashes * (THREADS - 1), lost
    engine = create_engine(stack.db_uri)
    with engine.connect() as conn:
        stored = set(conn.execute(text("SELECT id FROM books WHERE id = ANY(:ids)"), {"ids": acknowledged}).scalars())
    engine.dispose()
    assert stored == set(acknowledged)

    # The master logged each death with pid and cause; the crash route logged its request id.
    lines = [
        json.loads(line)
        for path in (stack.data_dir / "logs").glob("app.log*")
        for line in path.read_text().splitlines()
    ]
    deaths = [line for line in lines if line.get("event") == "worker_died"]
    requested = [line for line in lines if line.get("event") == "crash_requested"]
    assert len(deaths) >= crashes and len(requested) >= crashes
    crashed = {r["pid"] for r in requested}
    assert {d["worker_pid"] for d in deaths} >= crashed
    assert len(reported_worker_pids(after)) == WORKERS and not crashed & reported_worker_pids(after)
    assert all(r["request_id"] for r in requested)

    # Sentry: one event from each dying worker (with its request id) and one from the master.
    receiver = stack.receiver
    master_events = receiver.wait_for(lambda e: e.get("tags", {}).get("cause") == "exit code 1", count=crashes)
    reported = [int(e["tags"]["worker_pid"]) for e in master_events]
    assert sorted(reported) == sorted(set(reported)), "a death was reported twice"
    assert set(reported) >= {r["pid"] for r in requested}
    crash_events = receiver.wait_for(lambda e: e.get("logger") == "service.crash", count=crashes)
    assert {e["tags"]["request_id"] for e in crash_events} >= {r["request_id"] for r in requested}


def test_a_worker_killed_by_sigkill_is_reported_by_the_master(stack):
    """The OOM killer's way: SIGKILL leaves the worker no chance to report itself."""
    import os
    import signal

    before = scrape(stack.metrics_url)
    victim = sorted(reported_worker_pids(before))[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        # Not just "gone from the pids": a killed worker is a zombie (no memory series) until
        # the master reaps it, and only then is its exit counted and a replacement forked.
        after = scrape(stack.metrics_url)
        if (
            victim not in reported_worker_pids(after)
            and metric(after, "flaskapi_workers_alive") == WORKERS
            and metric(after, "flaskapi_worker_exits_total") > metric(before, "flaskapi_worker_exits_total")
        ):
            return after
        return None

    after = wait_for(replaced, f"worker {victim} to be replaced")
    assert metric(after, "flaskapi_worker_restarts_total") - metric(before, "flaskapi_worker_restarts_total") == 1
    # Replaced within milliseconds, so "alive" never shows the gap; the fewest alive over the
    # last LOWEST_WINDOW_SECONDS does (this scrape came right after the reap), then forgets it.
    assert metric(after, "flaskapi_workers_alive_lowest") == WORKERS - 1
    wait_for(
        lambda: metric(scrape(stack.metrics_url), "flaskapi_workers_alive_lowest") == WORKERS,
        "the dip to leave the window",
        timeout=LOWEST_WINDOW_SECONDS + 60,
    )
    assert (
        metric(after, "flaskapi_worker_exits_total", cause="SIGKILL")
        == metric(before, "flaskapi_worker_exits_total", cause="SIGKILL") + 1
    )
    [event] = stack.receiver.wait_for(lambda e: str(e.get("tags", {}).get("worker_pid")) == str(victim))
    assert event["tags"]["cause"] == "SIGKILL"
    assert requests.get(stack.url + "/healthz", timeout=5).status_code == 200


def test_a_worker_stuck_past_the_timeout_is_aborted_and_reported(migrated_database, tmp_path):
    """A sync worker silent for GUNICORN_TIMEOUT is aborted by the master: cause "timeout"."""
    uri = migrated_database("test_worker_timeout")
    env = stack_env(
        uri, tmp_path, GUNICORN_THREADS="1", GUNICORN_TIMEOUT="2", DB_STATEMENT_TIMEOUT_MS="120000", LOG_CONSOLE="0"
    )
    engine = create_engine(uri)
    with Gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.out") as stuck:
        with engine.connect() as conn:
            conn.execute(text("LOCK TABLE books IN ACCESS EXCLUSIVE MODE"))  # the query will wait
            with pytest.raises(requests.ConnectionError):
                requests.get(stuck.url + "/books/", timeout=90)  # aborted after 2 s, however slow the box
            conn.rollback()
        wait_for(
            lambda: metric(scrape(stuck.metrics_url), "flaskapi_worker_exits_total", cause="timeout") >= 1,
            "a timeout exit to be counted",
        )
        assert metric(scrape(stuck.metrics_url), "flaskapi_worker_restarts_total") == 1
        assert requests.get(stuck.url + "/books/", timeout=5).status_code == 200
    engine.dispose()
    died = [
        json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines() if '"worker_died"' in line
    ]
    assert [d["cause"] for d in died] == ["timeout"]
