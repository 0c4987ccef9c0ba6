"""A database that stops answering, on the real stack: its processes frozen (SIGSTOP) under a
write load, then thawed.

A frozen server never fires its own statement_timeout and keeps its sockets open, so nothing
but a client-side deadline ends a request waiting on it. What must hold while it is frozen:
writes answer 503 `database_timeout` (the JSON error shape, Retry-After) within the client
deadline plus a margin, most of them at once (refused unsent); `/healthz` answers 200 fast
throughout; `/readyz` answers 503 within its own deadline; one WARNING line per timed-out
request and a bounded number of Sentry events. After SIGCONT: writes succeed again by
themselves, and every write acknowledged with 201 is in the table.

The Postgres is this test's own (freezing the session's would stall every other test), every
process it freezes is one of that server's, SIGCONT is in a `finally`, and every HTTP call has a
client timeout, so a regression fails here instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.harness.commands import run_command
from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.sentry_receiver import SentryReceiver
from service import devdb

pytestmark = pytest.mark.stack

STATEMENT_TIMEOUT_MS = 1000
CLIENT_TIMEOUT_S = 2.0  # DB_CLIENT_TIMEOUT_MS of the stack
PING_TIMEOUT_S = 1.0  # DB_PING_TIMEOUT_MS: /readyz
CONNECT_TIMEOUT_S = 2  # DB_CONNECT_TIMEOUT
WORKERS, THREADS = 2, 4
WRITERS = 6  # more than one worker's threads: before the first deadline, a worker can fill up
FREEZE_S = 8.0
SLACK_S = 3.0  # a loaded 2-core machine
HTTP_TIMEOUT_S = 15.0  # the clients': far above every bound asserted here


@pytest.fixture
def private_postgres():
    """A Postgres of its own in a short /tmp path (Unix socket paths are limited)."""
    pgdata = Path(tempfile.mkdtemp(prefix="fapg-hang-", dir="/tmp"))
    pgdata.chmod(0o755)
    handle = devdb.server(pgdata, cleanup_mode="stop")
    try:
        yield handle
    finally:
        try:
            handle.cleanup()
        finally:
            shutil.rmtree(pgdata, ignore_errors=True)


def server_processes(handle) -> list[psutil.Process]:
    """The postmaster first, then every process it started (backends, checkpointer, ...)."""
    postmaster = psutil.Process(handle.get_postmaster_info().pid)
    return [postmaster, *postmaster.children(recursive=True)]


class Freeze:
    """SIGSTOP every process of the server (the postmaster first, so it forks no new one);
    `thaw` sends SIGCONT to every one of them, whatever happened in between."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.stopped: list[psutil.Process] = []

    def freeze(self) -> None:
        postmaster, *_ = server_processes(self.handle)
        postmaster.send_signal(signal.SIGSTOP)
        self.stopped.append(postmaster)
        for child in postmaster.children(recursive=True):  # it cannot fork any more now
            try:
                child.send_signal(signal.SIGSTOP)
                self.stopped.append(child)
            except psutil.NoSuchProcess:
                pass
        wait_for(lambda: all(stopped(p) for p in self.stopped), "every server process stopped", timeout=10)

    def thaw(self) -> None:
        for process in reversed(self.stopped):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def stopped(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return True


class Load(threading.Thread):
    """Writes (or probes) in a loop until stopped, recording each answer with its timing."""

    def __init__(self, url: str, path: str, *, auth: dict | None = None, pause: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.auth, self.pause = url, path, auth, pause
        self.stop_event = threading.Event()
        self.records: list[dict] = []

    def run(self) -> None:
        with requests.Session() as session:
            for i in range(100_000):
                if self.stop_event.is_set():
                    break
                request_id = f"hang-{uuid.uuid4().hex[:12]}"
                headers = {"X-Request-ID": request_id, **(self.auth or {})}
                started = time.monotonic()
                record = {"started": started, "request_id": request_id}
                try:
                    if self.auth is None:
                        response = session.get(self.url + self.path, headers=headers, timeout=HTTP_TIMEOUT_S)
                    else:
                        body = {"title": f"hang write {i}", "author": "writer"}
                        response = session.post(
                            self.url + self.path, json=body, headers=headers, timeout=HTTP_TIMEOUT_S
                        )
                except requests.RequestException as exc:
                    record.update(ended=time.monotonic(), status=None, error=repr(exc))
                    session.close()  # a fresh connection for the next call
                else:
                    record.update(ended=time.monotonic(), status=response.status_code, response=response)
                record["elapsed"] = record["ended"] - started
                self.records.append(record)
                self.stop_event.wait(self.pause)

    def acked_since(self, moment: float) -> int:
        return sum(1 for r in list(self.records) if r["status"] == 201 and r["started"] > moment)


def log_records(log_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(log_dir.glob("app.log*"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def error_of(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] == response.headers.get("X-Request-ID"), (body, response.headers)
    assert response.headers.get("Retry-After"), response.headers
    return body["error"]


def test_frozen_database_answers_503_fast_and_recovers_without_losing_writes(private_postgres, tmp_path):
    handle = private_postgres
    uri = devdb.create_database(handle, "hang")
    migrate_env = {k: v for k, v in os.environ.items() if k not in ("FLASK_DEBUG", "PROMETHEUS_MULTIPROC_DIR")}
    migrate_env.update(
        DB_URI=uri, FLASK_ENV="development", DATA_DIR=str(tmp_path / "m"), LOG_DIR=str(tmp_path / "m" / "logs")
    )
    result = run_command([sys.executable, "-m", "flask", "db", "upgrade"], migrate_env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]

    with SentryReceiver() as sentry:
        env = stack_env(
            uri,
            tmp_path,
            GUNICORN_THREADS=str(THREADS),
            DB_STATEMENT_TIMEOUT_MS=str(STATEMENT_TIMEOUT_MS),
            DB_CLIENT_TIMEOUT_MS=str(int(CLIENT_TIMEOUT_S * 1000)),
            DB_PING_TIMEOUT_MS=str(int(PING_TIMEOUT_S * 1000)),
            DB_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S),
            SENTRY_DSN=sentry.dsn,
            LOG_CONSOLE="0",
        )
        with Gunicorn(env, workers=WORKERS, log_path=tmp_path / "gunicorn.out") as stack:
            creds = {"email": "hang@example.com", "password": "hang-password"}
            assert requests.post(stack.url + "/auth/register", json=creds, timeout=15).status_code == 201
            login = requests.post(stack.url + "/auth/login", json=creds, timeout=15)
            assert login.status_code == 200, login.text[:300]
            auth = {"Authorization": f"Bearer {login.json()['token']}"}

            writers = [Load(stack.url, "/books/", auth=auth) for _ in range(WRITERS)]
            health = Load(stack.url, "/healthz", pause=0.2)
            loads = [*writers, health]
            freeze = Freeze(handle)
            readyz: list[tuple[float, requests.Response | None, float]] = []
            for load in loads:
                load.start()
            try:
                wait_for(lambda: sum(w.acked_since(0) for w in writers) >= 20, "writes before the freeze", timeout=60)

                freeze.freeze()
                frozen_at = time.monotonic()  # every process of the server is stopped from here
                try:
                    while time.monotonic() - frozen_at < FREEZE_S:
                        started = time.monotonic()
                        try:
                            response = requests.get(stack.url + "/readyz", timeout=HTTP_TIMEOUT_S)
                        except requests.RequestException:
                            response = None
                        # no pause: each probe waits out DB_PING_TIMEOUT_MS on the frozen server
                        readyz.append((started, response, time.monotonic() - started))
                finally:
                    thawed_at = time.monotonic()
                    freeze.thaw()

                wait_for(
                    lambda: sum(w.acked_since(thawed_at) for w in writers) >= 10,
                    "writes acknowledged after the thaw",
                    timeout=60,
                )
                recovered_after = (
                    min(
                        r["ended"]
                        for w in writers
                        for r in w.records
                        if r["status"] == 201 and r["started"] > thawed_at
                    )
                    - thawed_at
                )
                wait_for(
                    lambda: requests.get(stack.url + "/readyz", timeout=HTTP_TIMEOUT_S).status_code == 200,
                    "/readyz 200 after the thaw",
                    timeout=60,
                )
            finally:
                freeze.thaw()  # idempotent; whatever failed above, the server runs again
                for load in loads:
                    load.stop_event.set()
                for load in loads:
                    load.join(timeout=HTTP_TIMEOUT_S + 5)
            assert not any(load.is_alive() for load in loads)
            with contextlib.suppress(AssertionError):  # asserted below, after what the clients saw
                sentry.wait_for(lambda e: (e.get("extra") or {}).get("event") == "db_timeout", timeout=30)
        # the workers have stopped: whatever they sent has arrived
        sentry_events = [e for e in sentry.errors() if (e.get("extra") or {}).get("event") == "db_timeout"]

    # --- what clients saw -----------------------------------------------------------------
    writes = [r for w in writers for r in w.records]
    transport = [r for r in writes + health.records if r["status"] is None]
    assert transport == [], transport[:3]

    # Every write was acknowledged or answered 503 database_timeout, never slower than the deadline.
    for record in writes:
        if record["status"] != 201:
            error_of(record["response"], 503, "database_timeout")
            # refusals go on until each process has its first answer, a moment after the thaw
            assert frozen_at - CLIENT_TIMEOUT_S - SLACK_S <= record["started"] <= thawed_at + SLACK_S, record
        assert record["elapsed"] < CLIENT_TIMEOUT_S + SLACK_S, record

    # Requests started while the server was frozen, and answered before it thawed.
    during = [r for r in writes if frozen_at <= r["started"] and r["ended"] < thawed_at]
    assert len(during) >= WRITERS, len(during)
    for record in during:
        error_of(record["response"], 503, "database_timeout")
        assert record["elapsed"] < CLIENT_TIMEOUT_S + SLACK_S, record["elapsed"]
    # Once a deadline passed, each process lets one statement wait and refuses the others at once.
    fast = [r for r in during if r["elapsed"] < CLIENT_TIMEOUT_S / 2]
    assert len(fast) > len(during) / 2, sorted(round(r["elapsed"], 2) for r in during)
    healthz = [r for r in health.records if frozen_at <= r["started"] <= thawed_at]
    assert len(healthz) >= FREEZE_S / 0.5, len(healthz)
    assert {r["status"] for r in healthz} == {200}
    assert max(r["elapsed"] for r in healthz) < CLIENT_TIMEOUT_S + SLACK_S, [round(r["elapsed"], 2) for r in healthz]

    assert readyz, "no /readyz during the freeze"
    for _started, response, elapsed in readyz:
        assert response is not None, "/readyz did not answer"
        error_of(response, 503, "not_ready")
        assert elapsed < math.ceil(PING_TIMEOUT_S) + SLACK_S, elapsed  # a new connection too: in whole seconds

    # --- the trace: a WARNING per timed-out request, a few Sentry events --------------------
    records = log_records(tmp_path / "logs")
    warned = {r.get("request_id"): r for r in records if r.get("event") == "db_timeout"}
    timed_out = [r for r in writes if r["status"] == 503]
    for record in timed_out:
        line = warned.get(record["request_id"])
        assert line is not None, f"no db_timeout line for {record['request_id']}"
        assert line["level"] == "WARNING", line
    assert any(line["sent"] for line in warned.values()) and any(not line["sent"] for line in warned.values())
    # one per process and minute (sentry_rate_limit): the freeze is shorter than a minute
    assert 1 <= len(sentry_events) <= WORKERS, [e.get("logentry") for e in sentry_events]
    assert any(r.get("event") == "db_answering" for r in records), "no line saying the database answers again"

    # --- recovery, and no acknowledged write lost ------------------------------------------
    assert recovered_after < 30, recovered_after
    acknowledged = [r["response"].json()["id"] for r in writes if r["status"] == 201]
    engine = create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            stored = set(
                conn.execute(text("SELECT id FROM books WHERE id = ANY(:ids)"), {"ids": acknowledged}).scalars()
            )
    finally:
        engine.dispose()
    assert sorted(set(acknowledged) - stored) == [], "acknowledged writes lost"
    print(
        f"\nfrozen {thawed_at - frozen_at:.1f} s: {len(during)} writes answered 503 database_timeout "
        f"(median {statistics.median(r['elapsed'] for r in during):.3f} s, "
        f"max {max(r['elapsed'] for r in during):.2f} s, "
        f"{len(fast)} at once); /healthz max {max(r['elapsed'] for r in healthz):.3f} s over {len(healthz)}; "
        f"/readyz 503 within {max(e for _, _, e in readyz):.2f} s; {len(warned)} WARNING lines, "
        f"{len(sentry_events)} Sentry events; first write acknowledged {recovered_after:.2f} s after SIGCONT; "
        f"{len(acknowledged)} acknowledged writes, all stored"
    )
