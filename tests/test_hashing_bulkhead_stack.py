"""The hashing bulkhead on a real gunicorn (service/hashing_worker.py): one worker, two request
threads, one hashing thread, so every fact below is about one queue.

Logins are held in the hashing thread deterministically, without burning CPU: the test locks
the users table (ACCESS EXCLUSIVE), so a login's `SELECT ... FROM users` waits on the hashing
thread until the lock is released, and the logins behind it wait in the queue. GET /books/
never touches that table. One test holds them with a real, slow argon2 cost instead, as
production would. The queue's gauges are written when they change (not sampled), so a scrape
says exactly how many are waiting and in progress.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn, serving
from bench.harness.polling import wait_for
from bench.harness.scrape import metric, reported_worker_pids, scrape

pytestmark = pytest.mark.stack

FAST_HASHING = {"PASSWORD_HASH_TIME_COST": "1", "PASSWORD_HASH_MEMORY_KIB": "1024"}
ONE_QUEUE = {"GUNICORN_THREADS": "2", "HASH_THREADS": "1", "DB_STATEMENT_TIMEOUT_MS": "120000", **FAST_HASHING}
CLIENT_TIMEOUT = 60


# --- helpers --------------------------------------------------------------------------------------


def queue(stack) -> tuple[float, float]:
    """(requests in progress on the hashing thread, requests waiting for it)."""
    samples = scrape(stack.metrics_url)
    return metric(samples, "flaskapi_hash_requests_in_progress"), metric(samples, "flaskapi_hash_queue_depth")


def wait_for_queue(stack, in_progress: int, waiting: int) -> None:
    wait_for(lambda: queue(stack) == (in_progress, waiting), f"{in_progress} in progress and {waiting} waiting")


def log_records(stack) -> list[dict]:
    """The stack's JSON log, oldest first (the tests never run long enough to rotate it)."""
    return [json.loads(line) for line in stack.log_file.read_text().splitlines()]


def unknown_login(stack, request_id: str | None = None, session=requests) -> requests.Response:
    """A login for an email nobody registered: one argon2 verification (of the dummy hash), 401."""
    headers = {"X-Request-ID": request_id} if request_id else {}
    body = {"email": f"nobody-{uuid.uuid4().hex[:12]}@example.com", "password": "not-the-password"}
    return session.post(stack.url + "/auth/login", json=body, headers=headers, timeout=CLIENT_TIMEOUT)


@contextlib.contextmanager
def users_locked(db_uri: str):
    """The users table locked until the block ends or `release()` is called: logins wait on it."""
    engine = create_engine(db_uri, poolclass=NullPool)
    connection = engine.connect()
    connection.execute(text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))  # the transaction stays open

    def release() -> None:
        if connection.in_transaction():
            connection.rollback()

    try:
        yield release
    finally:
        release()
        connection.close()
        engine.dispose()


def raw_request(method: str, path: str, body: dict | None = None, headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def read_response(stream) -> tuple[int, dict[str, str], bytes]:
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, stream.read(int(headers.get("content-length", 0)))


def connected(stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.port), timeout=CLIENT_TIMEOUT)


def assert_auth_busy(response: requests.Response, reason: str) -> dict:
    assert response.status_code == 503, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == "auth_busy" and error["status"] == 503, error
    assert error["details"]["reason"] == reason, error
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1 and error["details"]["retry_after"] == retry_after, (response.headers, error)
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"  # the app's middleware answered
    assert response.headers["Cache-Control"] == "no-store"
    return error


def shed_count(samples, route: str, reason: str) -> float:
    return metric(samples, "flaskapi_hash_shed_total", route=route, reason=reason)


# --- one worker, a short queue, waits bounded only by the setting's default -------------------------


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bulkhead")
    # A master that kills a worker silent for 3 s: a queue held longer must not get it killed.
    env = {**ONE_QUEUE, "HASH_QUEUE_MAX": "2", "GUNICORN_TIMEOUT": "3"}
    with serving(migrated_database("test_hashing_bulkhead"), workdir, workers=1, **env) as server:
        yield server


def test_queue_full_is_shed_with_503_auth_busy_by_the_app(stack):
    """Hostile first: one login held on the hashing thread, two waiting (HASH_QUEUE_MAX=2), then a
    registration: it is refused at once, in the one error shape, counted, logged with its request
    id, and nothing is written for it."""
    email = f"shed-{uuid.uuid4().hex[:12]}@example.com"
    request_id = f"shed-{uuid.uuid4().hex[:8]}"
    before = scrape(stack.metrics_url)
    with users_locked(stack.db_uri) as release, ThreadPoolExecutor(3) as clients:
        held = [clients.submit(unknown_login, stack)]
        wait_for_queue(stack, 1, 0)
        held += [clients.submit(unknown_login, stack) for _ in range(2)]
        wait_for_queue(stack, 1, 2)
        shed = requests.post(
            stack.url + "/auth/register",
            json={"email": email, "password": "correct horse battery"},
            headers={"X-Request-ID": request_id},
            timeout=CLIENT_TIMEOUT,
        )
        assert queue(stack) == (1, 2)  # answered while the queue is still full
        release()
        assert [f.result().status_code for f in held] == [401] * 3

    error = assert_auth_busy(shed, "queue_full")
    assert error["request_id"] == request_id
    after = scrape(stack.metrics_url)
    assert shed_count(after, "/auth/register", "queue_full") - shed_count(before, "/auth/register", "queue_full") == 1
    answered_503 = "flask_http_request_duration_seconds_count"
    labels = {"method": "POST", "route": "/auth/register", "status": "503"}
    assert metric(after, answered_503, **labels) - metric(before, answered_503, **labels) == 1
    # the three logins waited in the queue; the shed registration never joined it
    waits = "flaskapi_hash_queue_wait_seconds_count"
    assert metric(after, waits) - metric(before, waits) == 3

    records = [r for r in log_records(stack) if r.get("request_id") == request_id]
    (warning,) = [r for r in records if r.get("event") == "hash_shed"]
    assert warning["level"] == "WARNING" and warning["reason"] == "queue_full", warning
    assert warning["queue_depth"] == 2 and warning["waited_s"] == 0 and warning["route"] == "/auth/register"
    (access,) = [r for r in records if r.get("event") == "access"]
    assert access["status"] == 503 and access["route"] == "/auth/register"

    engine = create_engine(stack.db_uri, poolclass=NullPool)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM users WHERE email = :e"), {"e": email}).scalar() == 0
    engine.dispose()
    # and once there is room, the same registration goes through
    registered = requests.post(
        stack.url + "/auth/register", json={"email": email, "password": "correct horse battery"}, timeout=CLIENT_TIMEOUT
    )
    assert registered.status_code == 201, registered.text[:500]


def test_a_queue_held_past_the_worker_timeout_does_not_get_the_worker_killed(stack):
    """GUNICORN_TIMEOUT=3: logins wait three times that long; the worker's main loop keeps
    notifying the master, so it is the same worker that answers them all."""
    timeout = 3
    before = scrape(stack.metrics_url)
    (pid,) = reported_worker_pids(before)
    with users_locked(stack.db_uri) as release, ThreadPoolExecutor(2) as clients:
        held = [clients.submit(unknown_login, stack)]
        wait_for_queue(stack, 1, 0)
        held.append(clients.submit(unknown_login, stack))
        wait_for_queue(stack, 1, 1)
        held_since = time.monotonic()

        def held_long_enough() -> bool:
            assert reported_worker_pids(scrape(stack.metrics_url)) == {pid}
            assert queue(stack) == (1, 1)
            return time.monotonic() - held_since > 3 * timeout

        wait_for(held_long_enough, "the queue to be held three worker timeouts", interval=0.5)
        release()
        assert [f.result().status_code for f in held] == [401, 401]
    after = scrape(stack.metrics_url)
    assert reported_worker_pids(after) == {pid}
    assert metric(after, "flaskapi_worker_exits_total") == metric(before, "flaskapi_worker_exits_total")
    # the second login waited in the queue longer than the worker timeout
    beyond = "flaskapi_hash_queue_wait_seconds_bucket"
    assert metric(after, beyond, le="5.0") - metric(before, beyond, le="5.0") == 1  # the first: ~0 s
    assert (
        metric(after, "flaskapi_hash_queue_wait_seconds_count")
        - metric(before, "flaskapi_hash_queue_wait_seconds_count")
        == 2
    )


def test_keep_alive_carries_hashing_and_other_requests_in_order(stack):
    """One connection, hashing and other requests alternating: each answered in turn on the
    same socket, which stays open."""
    email = f"keep-{uuid.uuid4().hex[:12]}@example.com"
    creds = json.dumps({"email": email, "password": "correct horse battery"})
    wrong = json.dumps({"email": email, "password": "not-the-password"})
    json_header = {"Content-Type": "application/json"}
    steps = [
        ("GET", "/books/", None, 200),
        ("POST", "/auth/register", creds, 201),
        ("POST", "/auth/login", creds, 200),
        ("GET", "/books/", None, 200),
        ("POST", "/auth/login", wrong, 401),
        ("POST", "/auth/register", creds, 409),
        ("GET", "/healthz", None, 200),
    ]
    handed_off = metric(scrape(stack.metrics_url), "flaskapi_hash_queue_wait_seconds_count")
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=CLIENT_TIMEOUT)
    try:
        connection.connect()
        sock, local = connection.sock, connection.sock.getsockname()
        for method, path, body, status in steps:
            connection.request(method, path, body=body, headers=json_header if body else {})
            response = connection.getresponse()
            response.read()
            assert (method, path, response.status) == (method, path, status)
            assert response.getheader("Connection", "").lower() != "close"
            assert connection.sock is sock and sock.getsockname() == local  # never reconnected
    finally:
        connection.close()
    hashing = sum(path.startswith("/auth/") for _, path, _, _ in steps)
    assert metric(scrape(stack.metrics_url), "flaskapi_hash_queue_wait_seconds_count") - handed_off == hashing


def test_pipelined_requests_behind_a_handed_off_one_are_answered_in_order(stack):
    """A login and a book list sent in one write: the list's bytes are already read when the
    login is handed off, and are served after it, on the same connection."""
    email = f"pipe-{uuid.uuid4().hex[:12]}@example.com"
    login = raw_request("POST", "/auth/login", {"email": email, "password": "not-the-password"})
    handed_off = metric(scrape(stack.metrics_url), "flaskapi_hash_queue_wait_seconds_count")
    with connected(stack) as sock, sock.makefile("rb") as stream:
        sock.sendall(login + raw_request("GET", "/books/?limit=1") + raw_request("GET", "/healthz") + login)
        statuses = [read_response(stream)[0] for _ in range(4)]
    assert statuses == [401, 200, 200, 401]
    assert metric(scrape(stack.metrics_url), "flaskapi_hash_queue_wait_seconds_count") - handed_off == 2


def test_clients_that_leave_while_queued_are_dropped_unhashed(stack):
    """Two queued logins whose clients go away (one closes, one resets): when their turn comes
    they are dropped, nothing hashed, no error logged; the worker goes on serving."""
    before = scrape(stack.metrics_url)
    (pid,) = reported_worker_pids(before)
    logged_before = len(log_records(stack))
    body = {"email": f"gone-{uuid.uuid4().hex[:12]}@example.com", "password": "not-the-password"}
    with users_locked(stack.db_uri) as release, ThreadPoolExecutor(1) as clients:
        held = clients.submit(unknown_login, stack)
        wait_for_queue(stack, 1, 0)
        leavers = [connected(stack), connected(stack)]
        for number, sock in enumerate(leavers, start=1):
            sock.sendall(raw_request("POST", "/auth/login", body))
            wait_for_queue(stack, 1, number)
        leavers[0].close()  # FIN
        leavers[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        leavers[1].close()  # RST
        release()
        assert held.result().status_code == 401
    wait_for(
        lambda: (
            metric(scrape(stack.metrics_url), "flaskapi_hash_abandoned_total")
            - metric(before, "flaskapi_hash_abandoned_total")
            == 2
        ),
        "both abandoned requests dropped",
    )
    assert queue(stack) == (0, 0)
    assert unknown_login(stack).status_code == 401
    assert requests.get(stack.url + "/books/", timeout=CLIENT_TIMEOUT).status_code == 200
    after = scrape(stack.metrics_url)
    assert reported_worker_pids(after) == {pid}
    # only the held login and the one after were verified: the leavers' passwords never were
    failures = "flaskapi_login_failures_total"
    assert metric(after, failures) - metric(before, failures) == 2
    since = log_records(stack)[logged_before:]
    assert not [r for r in since if r["level"] in ("ERROR", "CRITICAL") and r.get("event") != "access"], since
    assert not [r for r in since if r.get("event") == "access" and r["status"] >= 500], since


# --- a wait bound to be overrun ---------------------------------------------------------------------


def test_a_request_that_waited_too_long_is_shed_while_the_hashing_thread_is_still_busy(migrated_database, tmp_path):
    """HASH_QUEUE_TIMEOUT=0.5 and the hashing thread held: the waiting login is shed by the
    worker's main loop (the hashing thread never frees up for it), with its wait in the log."""
    env = {**ONE_QUEUE, "HASH_QUEUE_MAX": "4", "HASH_QUEUE_TIMEOUT": "0.5"}
    with serving(migrated_database("test_hashing_bulkhead_wait"), tmp_path, workers=1, **env) as stack:
        before = scrape(stack.metrics_url)
        request_id = f"late-{uuid.uuid4().hex[:8]}"
        with users_locked(stack.db_uri) as release, ThreadPoolExecutor(1) as clients:
            held = clients.submit(unknown_login, stack)
            wait_for_queue(stack, 1, 0)
            late = unknown_login(stack, request_id)
            assert queue(stack) == (1, 0)  # shed, and the first still held
            release()
            assert held.result().status_code == 401
        assert_auth_busy(late, "waited_too_long")
        after = scrape(stack.metrics_url)
        assert (
            shed_count(after, "/auth/login", "waited_too_long") - shed_count(before, "/auth/login", "waited_too_long")
            == 1
        )
        (warning,) = [r for r in log_records(stack) if r.get("event") == "hash_shed"]
        assert warning["request_id"] == request_id and warning["reason"] == "waited_too_long", warning
        assert warning["waited_s"] >= 0.5 and warning["level"] == "WARNING", warning
        # both waits are in the histogram: the held one's below the bound (it was served), the other's above
        waits, bucket = "flaskapi_hash_queue_wait_seconds_count", "flaskapi_hash_queue_wait_seconds_bucket"
        assert metric(after, waits) - metric(before, waits) == 2
        assert metric(after, bucket, le="0.5") - metric(before, bucket, le="0.5") == 1


# --- stopping with requests queued ---------------------------------------------------------------


def test_a_stopping_worker_answers_its_queue_and_closes_what_it_cannot_finish(migrated_database, tmp_path):
    """Stop with one login held on the hashing thread past the graceful timeout and three
    waiting: the three are answered 503 worker_stopping before the end, the held one's
    connection is closed by the end, and gunicorn exits cleanly within its graceful timeout."""
    graceful = 4
    env = stack_env(
        migrated_database("test_hashing_bulkhead_stop"),
        tmp_path,
        LOG_CONSOLE="0",
        HASH_QUEUE_MAX="8",
        GUNICORN_GRACEFUL_TIMEOUT=str(graceful),
        **ONE_QUEUE,
    )
    stack = Gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.out")
    stack.log_file = Path(env["LOG_DIR"]) / "app.log"
    with stack, users_locked(env["DB_URI"]), ThreadPoolExecutor(4) as clients:
        stack.wait_for_workers()

        def outcome(response_or_error):
            try:
                return response_or_error.result()
            except requests.ConnectionError as exc:
                return exc

        held = clients.submit(unknown_login, stack)
        wait_for_queue(stack, 1, 0)
        waiting = [clients.submit(unknown_login, stack) for _ in range(3)]
        wait_for_queue(stack, 1, 3)
        stopping = threading.Thread(target=lambda: setattr(stack, "exit_code", stack.stop()), name="stopping")
        started = time.monotonic()
        stopping.start()
        stopping.join(graceful + 15)
        took = time.monotonic() - started
        assert not stopping.is_alive(), "gunicorn did not stop"
        assert stack.exit_code == 0, stack.output()[-3000:]
        assert took < graceful + 10, took  # bounded: nothing waited for the held login
        for future in waiting:
            assert_auth_busy(outcome(future), "worker_stopping")
        assert isinstance(outcome(held), requests.ConnectionError)  # closed, not left hanging
    sheds = [r for r in log_records(stack) if r.get("event") == "hash_shed"]
    assert [r["reason"] for r in sheds] == ["worker_stopping"] * 3, sheds


def test_a_restarting_worker_answers_its_queue_and_its_replacement_serves(migrated_database, tmp_path):
    """SIGTERM to the worker alone (a restart): the two waiting logins are answered 503
    worker_stopping, the held one is answered once the lock goes, and the new worker serves."""
    env = {**ONE_QUEUE, "HASH_QUEUE_MAX": "8", "GUNICORN_GRACEFUL_TIMEOUT": "3"}
    with serving(migrated_database("test_hashing_bulkhead_restart"), tmp_path, workers=1, **env) as stack:
        (pid,) = reported_worker_pids(scrape(stack.metrics_url))
        with users_locked(stack.db_uri) as release, ThreadPoolExecutor(3) as clients:
            held = clients.submit(unknown_login, stack)
            wait_for_queue(stack, 1, 0)
            waiting = [clients.submit(unknown_login, stack) for _ in range(2)]
            wait_for_queue(stack, 1, 2)
            os.kill(pid, signal.SIGTERM)
            for future in waiting:
                assert_auth_busy(future.result(), "worker_stopping")
            assert not held.done()
            release()
            assert held.result().status_code == 401
        wait_for(lambda: reported_worker_pids(scrape(stack.metrics_url)) - {pid}, "the replacement worker")
        assert unknown_login(stack).status_code == 401
        assert queue(stack) == (0, 0)


# --- a real, slow hash ---------------------------------------------------------------------------


def test_books_are_answered_while_logins_wait_for_a_slow_hash(migrated_database, tmp_path):
    """The production mechanism, no lock: an argon2 cost that makes each verification take a
    while, six logins at once on one worker with two request threads. With plain gthread the
    two threads would both be hashing and a book request would wait behind the queue; here the
    books are answered while logins are still waiting for the hashing thread."""
    logins = 6
    env = {**ONE_QUEUE, "PASSWORD_HASH_TIME_COST": "40", "PASSWORD_HASH_MEMORY_KIB": "19456", "HASH_NICE": "10"}
    with serving(migrated_database("test_hashing_bulkhead_slow"), tmp_path, workers=1, **env) as stack:
        before = scrape(stack.metrics_url)
        with ThreadPoolExecutor(logins) as clients:
            logins_sent = [clients.submit(unknown_login, stack) for _ in range(logins)]
            wait_for(lambda: queue(stack)[1] >= 4, "logins waiting for the hashing thread")
            books = [requests.get(stack.url + "/books/", timeout=CLIENT_TIMEOUT) for _ in range(5)]
            unanswered = sum(not future.done() for future in logins_sent)
            in_progress, waiting = queue(stack)
            assert [b.status_code for b in books] == [200] * 5
            # Plain gthread would have served the books after the sixth login had a thread, so
            # with at most two logins unanswered (tried: GUNICORN_CMD_ARGS=--worker-class=gthread).
            print(f"books answered with {unanswered} logins unanswered, {waiting} queued")
            assert unanswered >= 3, unanswered
            assert in_progress == 1 and waiting >= 2, (in_progress, waiting)  # and they are queued
            assert [f.result().status_code for f in logins_sent] == [401] * logins
        after = scrape(stack.metrics_url)
        assert (
            metric(after, "flaskapi_hash_queue_wait_seconds_count")
            - metric(before, "flaskapi_hash_queue_wait_seconds_count")
            == logins
        )
        assert queue(stack) == (0, 0)

        # The hashing thread, and only it, runs HASH_NICE below the worker's other threads.
        (pid,) = reported_worker_pids(after)
        nice = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            stat = (task / "stat").read_text()
            nice[int(task.name)] = int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19
        base = nice[pid]  # the main thread's
        lowered = sorted(task for task, value in nice.items() if value != base)
        assert len(lowered) == 1 and nice[lowered[0]] == min(19, base + 10), nice
