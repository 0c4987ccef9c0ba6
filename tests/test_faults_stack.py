"""Faults on the real stack: a saturated connection pool and a database outage, both survived
without a restart.

1. Pool exhaustion: one worker, four threads, a pool of exactly one connection. A table lock
   taken from the test makes the request that holds the connection wait for real; every other
   request must be refused fast (503 db_pool_exhausted, Retry-After) instead of queueing, be
   counted in the metrics and logged, and the service must recover by itself once the lock goes.
2. Database outage: a dedicated Postgres (never the session one) is stopped for a few seconds
   under a light write/read load. Requests fail fast with 503 in the JSON error shape, /readyz
   and flaskapi_database_up say so, and after the restart the service is ready again with the
   same workers; every write that was acknowledged with 201 is in the database.

Every process is started here and stopped here, by PID, with timeouts; every loop is bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.harness.commands import run_command
from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.scrape import has_metric, metric, reported_worker_pids, scrape
from service import devdb
from tests.conftest import eventually

pytestmark = pytest.mark.stack

APP_NAME = "flaskapi-observability"  # application_name of the service's connections


# --- helpers ------------------------------------------------------------------------------------


def log_records(log_dir: Path) -> list[dict]:
    records = []
    for path in sorted(log_dir.glob("app.log*")):
        for line in path.read_text(encoding="utf-8").splitlines():
            records.append(json.loads(line))
    return records


def assert_error_shape(response: requests.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"status", "code", "message", "details"} <= error.keys(), error
    assert error["status"] == status, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    assert error.get("request_id") == response.headers.get("X-Request-ID"), (error, response.headers)
    if code is not None:
        assert error["code"] == code, error
    return error


run = run_command


def login(stack: Gunicorn, email: str, password: str = "outage-password") -> dict[str, str]:
    creds = {"email": email, "password": password}
    registered = requests.post(stack.url + "/auth/register", json=creds, timeout=15)
    assert registered.status_code == 201, registered.text[:500]
    response = requests.post(stack.url + "/auth/login", json=creds, timeout=15)
    assert response.status_code == 200, response.text[:500]
    return {"Authorization": f"Bearer {response.json()['token']}"}


# --- 1. pool exhaustion ---------------------------------------------------------------------------

POOL_TIMEOUT = 1.0
THREADS = 4
CONCURRENT = 6
SLACK = 1.5


def test_pool_exhaustion_answers_503_fast_and_recovers_without_restart(migrated_database, tmp_path):
    uri = migrated_database("test_faults_pool")
    env = stack_env(
        uri,
        tmp_path,
        GUNICORN_THREADS=str(THREADS),
        DB_POOL_SIZE="1",
        DB_MAX_OVERFLOW="0",
        DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        DB_STATEMENT_TIMEOUT_MS="120000",
    )  # the lock, not this, ends the holder's wait
    locker_engine = create_engine(uri, poolclass=NullPool)
    with Gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.out") as stack:
        # Warm up: the worker opens its single pooled connection.
        assert requests.get(stack.url + "/books/", timeout=10).status_code == 200
        before = scrape(stack.metrics_url)
        pids_before = reported_worker_pids(before)
        assert len(pids_before) == 1, before
        assert has_metric(before, "flaskapi_db_pool_checkout_timeouts_total")
        timeouts_before = metric(before, "flaskapi_db_pool_checkout_timeouts_total")
        assert metric(before, "flaskapi_db_pool_capacity") == 1

        def get(request_id: str):
            started = time.monotonic()
            response = requests.get(stack.url + "/books/", headers={"X-Request-ID": request_id}, timeout=180)
            return request_id, response, time.monotonic() - started, time.monotonic()

        locker = locker_engine.connect()
        pool = ThreadPoolExecutor(max_workers=CONCURRENT)
        try:
            # The transaction stays open (SQLAlchemy autobegins): every read of books now waits.
            locker.execute(text("LOCK TABLE books IN ACCESS EXCLUSIVE MODE"))
            fired_at = time.monotonic()
            futures = [pool.submit(get, f"pool-{i}-{uuid.uuid4().hex[:8]}") for i in range(CONCURRENT)]

            # All but the one request that holds the connection must come back on their own.
            pending = set(futures)
            deadline = fired_at + 60
            while len(pending) > 1 and time.monotonic() < deadline:
                _, pending = wait(pending, timeout=deadline - time.monotonic(), return_when=FIRST_COMPLETED)
            assert len(pending) == 1, f"{len(pending)} requests still waiting after 60 s"
            done = [f.result() for f in futures if f not in pending]
            refused_after = time.monotonic() - fired_at

            # The one still in flight holds the pool's only connection and waits on our lock.
            waiting = locker.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app "
                    "AND wait_event_type = 'Lock' AND query ILIKE '%books%'"
                ),
                {"app": APP_NAME},
            ).scalar()
            assert waiting == 1

            refused = []
            for request_id, response, elapsed, _ in done:
                error = assert_error_shape(response, 503, "db_pool_exhausted")
                assert error["request_id"] == request_id
                assert response.headers.get("Retry-After") == str(max(1, math.ceil(POOL_TIMEOUT)))
                refused.append((request_id, elapsed))
            assert len(refused) == CONCURRENT - 1

            # Server side, each refusal came after about DB_POOL_TIMEOUT of waiting for the pool.
            # Client side, a worker has THREADS - 1 free threads while one is blocked, so the
            # refusals come in ceil((CONCURRENT - 1) / (THREADS - 1)) rounds of DB_POOL_TIMEOUT;
            # the requests gthread queued behind a full thread pool wait one round more.
            latencies = sorted(elapsed for _, elapsed in refused)
            for rank, elapsed in enumerate(latencies):
                round_no = rank // (THREADS - 1) + 1
                assert POOL_TIMEOUT * 0.9 <= elapsed < round_no * POOL_TIMEOUT + SLACK, latencies
            assert latencies[THREADS - 2] < POOL_TIMEOUT + SLACK, latencies  # the first round

            after = scrape(stack.metrics_url)
            assert metric(after, "flaskapi_db_pool_checkout_timeouts_total") - timeouts_before == len(refused), after
            # sampled gauges: the one request still in flight holds the one connection
            for gauge in ("flaskapi_db_pool_checked_out", "flask_http_requests_in_progress"):
                assert eventually(lambda gauge=gauge: metric(scrape(stack.metrics_url), gauge), 1) == 1, gauge

            warnings_ = [r for r in log_records(tmp_path / "logs") if r.get("event") == "db_pool_timeout"]
            assert sorted(r["request_id"] for r in warnings_) == sorted(rid for rid, _ in refused), warnings_
            waited = sorted(r["waited_s"] for r in warnings_)
            for record in warnings_:
                assert record["level"] == "WARNING", record
                assert record["pool_timeout_s"] == POOL_TIMEOUT, record
                assert POOL_TIMEOUT * 0.9 <= record["waited_s"] < POOL_TIMEOUT + SLACK, record
                assert record["pid"] in pids_before, record
        finally:
            released_at = time.monotonic()  # just before: the holder cannot finish earlier
            locker.rollback()  # releases the lock
            locker.close()
            locker_engine.dispose()
            pool.shutdown(wait=True, cancel_futures=False)

        # The request that held the connection finishes normally once the lock is gone.
        (holder,) = pending
        request_id, response, elapsed, finished_at = holder.result(timeout=0)
        assert response.status_code == 200, response.text[:500]
        assert finished_at >= released_at, "the holder finished before the lock was released"

        # Self-recovery: a run of successes, sequential and concurrent, with no timeout counted.
        recovered_at = None
        streak = 0
        for _ in range(1000):
            if time.monotonic() - released_at > 60:
                break
            status = requests.get(stack.url + "/books/", timeout=10).status_code
            streak = streak + 1 if status == 200 else 0
            if streak == 1 and recovered_at is None:
                recovered_at = time.monotonic() - released_at
            if streak >= 20:
                break
        assert streak >= 20, f"only {streak} consecutive 200s within 60 s of releasing the lock"
        with ThreadPoolExecutor(max_workers=THREADS) as burst:
            statuses = list(
                burst.map(lambda _: requests.get(stack.url + "/books/", timeout=10).status_code, range(THREADS * 3))
            )
        assert statuses == [200] * (THREADS * 3), statuses

        final = scrape(stack.metrics_url)
        assert metric(final, "flaskapi_db_pool_checkout_timeouts_total") - timeouts_before == len(refused)
        assert eventually(lambda: metric(scrape(stack.metrics_url), "flaskapi_db_pool_checked_out"), 0) == 0
        assert reported_worker_pids(final) == pids_before, "the worker was restarted"
        assert metric(final, "flaskapi_worker_restarts_total") == 0
        assert metric(final, "flaskapi_worker_exits_total") == 0
        access_pids = {r["pid"] for r in log_records(tmp_path / "logs") if r.get("event") == "access"}
        assert access_pids == pids_before, access_pids
        print(
            f"\npool exhaustion: {len(refused)} x 503 after {[round(x, 2) for x in latencies]} s "
            f"(server waited {waited} s), all refused within {refused_after:.2f} s; holder "
            f"200 after {elapsed:.2f} s; first 200 {recovered_at:.3f} s after release"
        )


# --- 2. database outage ---------------------------------------------------------------------------

DB_POOL_TIMEOUT = 2
DB_CONNECT_TIMEOUT = 2
OUTAGE_S = 4.0


@pytest.fixture
def dedicated_postgres():
    """A Postgres of its own in a short /tmp path: this test stops it, which no other may see."""
    pgdata = Path(tempfile.mkdtemp(prefix="fapg-out-", dir="/tmp"))
    pgdata.chmod(0o755)
    handle = devdb.server(pgdata, cleanup_mode="stop")
    try:
        yield pgdata, handle
    finally:
        try:
            handle.cleanup()
        finally:
            if (pgdata / "postmaster.pid").exists():  # restarted outside the handle's knowledge
                from pgserver._commands import pg_ctl

                with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=handle.system_user, timeout=30)
            shutil.rmtree(pgdata, ignore_errors=True)


def stop_postgres(pgdata: Path, handle) -> None:
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=handle.system_user, timeout=30)


def start_postgres(handle) -> None:
    """pgserver's own start path (same socket dir, same pg_ctl arguments); it also refreshes the
    handle's view of the postmaster, so handle.cleanup() stops the restarted server.
    (devdb.server(pgdata) would not restart it: pgserver caches one handle per pgdata.)"""
    with handle._lock:  # pgserver's inter-process lock around start/stop
        handle.ensure_postgres_running()


class Traffic(threading.Thread):
    """About ten writes and ten reads a second; records every answer with its timing."""

    def __init__(self, url: str, auth: dict[str, str], *, max_seconds: float = 300) -> None:
        super().__init__(daemon=True)
        self.url, self.auth, self.max_seconds = url, auth, max_seconds
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.records: list[dict] = []  # method, started, elapsed, status, body, retry_after
        self.acknowledged: list[tuple[float, int]] = []  # (started, id) of every 201

    def _call(self, session: requests.Session, method: str, path: str, **kwargs) -> None:
        started = time.monotonic()
        record = {"method": method, "started": started}
        try:
            response = session.request(method, self.url + path, timeout=15, **kwargs)
        except requests.RequestException as exc:
            record.update(elapsed=time.monotonic() - started, status=None, error=repr(exc))
        else:
            record.update(elapsed=time.monotonic() - started, status=response.status_code, response=response)
            if method == "POST" and response.status_code == 201:
                with self.lock:
                    self.acknowledged.append((started, response.json()["id"]))
        with self.lock:
            self.records.append(record)

    def run(self) -> None:
        began = time.monotonic()
        with requests.Session() as session:
            for i in range(int(self.max_seconds * 10)):
                if self.stop_event.is_set() or time.monotonic() - began > self.max_seconds:
                    break
                tick = time.monotonic()
                self._call(
                    session,
                    "POST",
                    "/books/",
                    headers=self.auth,
                    json={"title": f"outage write {i}", "author": "writer"},
                )
                self._call(session, "GET", "/books/?limit=5")
                time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))

    def acked_since(self, moment: float) -> int:
        with self.lock:
            return sum(1 for started, _ in self.acknowledged if started > moment)


def seconds_until(predicate, what: str, timeout: float = 60) -> float:
    """How long until predicate() held: the harness's poll (wait_for), timed for the report."""
    began = time.monotonic()
    wait_for(predicate, what, timeout=timeout, interval=0.1)
    return time.monotonic() - began


def test_database_outage_fails_fast_and_recovers_without_losing_writes(dedicated_postgres, tmp_path):
    pgdata, handle = dedicated_postgres
    uri = devdb.create_database(handle, "outage")
    socket_dir = handle.get_postmaster_info().socket_dir

    migrate_env = {k: v for k, v in os.environ.items() if k not in ("FLASK_DEBUG", "PROMETHEUS_MULTIPROC_DIR")}
    migrate_env.update(
        DB_URI=uri,
        FLASK_ENV="development",
        DATA_DIR=str(tmp_path / "migrate"),
        LOG_DIR=str(tmp_path / "migrate" / "logs"),
    )
    result = run([sys.executable, "-m", "flask", "db", "upgrade"], migrate_env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]

    env = stack_env(uri, tmp_path, DB_POOL_TIMEOUT=str(DB_POOL_TIMEOUT), DB_CONNECT_TIMEOUT=str(DB_CONNECT_TIMEOUT))
    limit = DB_POOL_TIMEOUT + DB_CONNECT_TIMEOUT + 2
    with Gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.out") as stack:
        auth = login(stack, "outage@example.com")
        healthy = scrape(stack.metrics_url)
        pids_before = reported_worker_pids(healthy)
        assert len(pids_before) == 2, healthy
        assert metric(healthy, "flaskapi_database_up") == 1
        assert requests.get(stack.url + "/readyz", timeout=10).status_code == 200

        traffic = Traffic(stack.url, auth)
        traffic.start()
        try:
            seconds_until(lambda: traffic.acked_since(0) >= 10, "steady writes before the outage")

            # --- outage ---
            stop_began = time.monotonic()
            stop_postgres(pgdata, handle)
            stopped_at = time.monotonic()
            assert not (pgdata / "postmaster.pid").exists()

            readyz_during = []
            down_scrapes = []
            for _ in range(40):
                if time.monotonic() - stopped_at >= OUTAGE_S:
                    break
                started = time.monotonic()
                response = requests.get(stack.url + "/readyz", timeout=15)
                readyz_during.append((response, time.monotonic() - started))
                down_scrapes.append(metric(scrape(stack.metrics_url), "flaskapi_database_up"))
                time.sleep(0.4)
            assert readyz_during and down_scrapes
            for response, elapsed in readyz_during:
                error = assert_error_shape(response, 503, "not_ready")
                assert response.headers.get("Retry-After"), response.headers
                assert error["details"].get("database"), error
                assert elapsed < limit, elapsed
            assert set(down_scrapes) == {0}, down_scrapes

            # --- restart ---
            start_began = time.monotonic()
            start_postgres(handle)
            started_at = time.monotonic()
            assert handle.get_postmaster_info().socket_dir == socket_dir
            assert handle.get_uri("outage").replace("postgresql://", "postgresql+psycopg2://", 1) == uri

            ready_after = seconds_until(
                lambda: requests.get(stack.url + "/readyz", timeout=10).status_code == 200,
                "/readyz 200 after the restart",
            )
            ready_at = time.monotonic()
            writes_after = seconds_until(lambda: traffic.acked_since(ready_at) >= 10, "writes acknowledged again")
        finally:
            traffic.stop_event.set()
            traffic.join(timeout=30)
        assert not traffic.is_alive()

        recovered = scrape(stack.metrics_url)
        assert metric(recovered, "flaskapi_database_up") == 1
        assert has_metric(recovered, "flaskapi_worker_restarts_total")
        assert metric(recovered, "flaskapi_worker_restarts_total") == 0
        assert reported_worker_pids(recovered) == pids_before, "a worker was restarted"
        assert metric(recovered, "flaskapi_workers_alive") == 2
        assert metric(recovered, "flaskapi_db_pool_connections_invalidated_total") >= 1

    # --- what the clients saw ---
    records = traffic.records
    transport = [r for r in records if r["status"] is None]
    assert transport == [], transport[:5]
    failures = [r for r in records if not 200 <= r["status"] < 300]
    for record in failures:
        assert_error_shape(record["response"], 503, "database_unavailable")
        assert record["response"].headers.get("Retry-After"), record["response"].headers
        # Failures only while the database was away (or being brought back).
        assert stop_began - 0.5 <= record["started"] <= ready_at, (
            record["method"],
            record["started"] - stop_began,
            ready_at - stop_began,
        )
    slowest = max(r["elapsed"] for r in records)
    assert slowest < limit, f"a request took {slowest:.2f} s (limit {limit} s)"
    assert any(r["method"] == "POST" for r in failures) and any(r["method"] == "GET" for r in failures), (
        "the outage produced no failed write and read: it did not happen"
    )
    outage_latency = [r["elapsed"] for r in failures]

    acked = {book_id: started for started, book_id in traffic.acknowledged}
    before_ids = [i for i, s in acked.items() if s < stop_began]
    after_ids = [i for i, s in acked.items() if s > started_at]
    assert before_ids and after_ids
    engine = create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            stored = set(
                conn.execute(text("SELECT id FROM books WHERE id = ANY(:ids)"), {"ids": list(acked)}).scalars()
            )
    finally:
        engine.dispose()
    missing = sorted(set(acked) - stored)
    assert missing == [], f"acknowledged writes lost: {missing}"
    print(
        f"\noutage: stop took {stopped_at - stop_began:.2f} s, down {start_began - stopped_at:.2f} s, "
        f"start took {started_at - start_began:.2f} s; /readyz 200 {ready_after:.2f} s after the "
        f"restart, 10 writes acknowledged {writes_after:.2f} s after that; {len(records)} requests, "
        f"{len(failures)} x 503 (max {max(outage_latency):.3f} s), slowest of all {slowest:.3f} s; "
        f"{len(acked)} acknowledged writes ({len(before_ids)} before, {len(after_ids)} after), all stored"
    )
