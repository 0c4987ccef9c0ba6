"""Client-side deadlines to the database (service/database.py), on real sockets.

- TCP: the connection parameters reach the kernel (keepalives, tcp_user_timeout), read back
  from the socket libpq opened; a listener that never answers is a DatabaseTimeout after
  DB_CONNECT_TIMEOUT, a port that refuses is not a timeout.
- The Unix socket of the test Postgres: a statement past the client deadline fails within it,
  its connection is discarded and the next statement runs on a new one; while the database is
  known not to answer, a statement is refused without being sent, except the one probe.
- The settings' default and their one rule.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import psutil
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from bench.harness.environment import free_port
from bench.harness.polling import wait_for
from service import create_app
from service.database import DatabaseTimeout, deadline
from service.extensions import db
from service.settings import Settings, SettingsError
from tests.conftest import base_config

SLACK_S = 2.0  # a loaded 2-core machine


def deadlines(app):
    return app.extensions["db_deadlines"]


@pytest.fixture(autouse=True)
def no_statement_left_running(database_uri):
    """A statement cut at its client deadline still runs on the server until it ends: end the
    sleeps left behind, so that no other test finds more backends than its own."""
    yield
    engine = create_engine(database_uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
                    "AND datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            conn.commit()
    finally:
        engine.dispose()


# --- TCP ------------------------------------------------------------------------------------


def client_socket_to(port: int) -> socket.socket:
    """Our own process's TCP socket connected to 127.0.0.1:`port` (the one libpq opened)."""
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED:
            return socket.socket(fileno=os.dup(conn.fd))
    return None


def test_tcp_connections_carry_keepalives_and_tcp_user_timeout_and_connect_times_out(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes the handshake; nobody answers
        port = silent.getsockname()[1]
        connect_to_silent_listener(port, tmp_path)


def connect_to_silent_listener(port: int, tmp_path) -> None:
    uri = f"postgresql+psycopg2://flaskapi:pw@127.0.0.1:{port}/flaskapi"
    app = create_app(base_config(uri, tmp_path, DB_CONNECT_TIMEOUT="2", DB_CLIENT_TIMEOUT_MS="17000"))
    outcome: dict = {}

    def connect() -> None:
        started = time.monotonic()
        try:
            with app.app_context(), db.engine.connect():
                pass
        except sa_exc.OperationalError as exc:
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=connect)
    try:
        thread.start()
        sock = wait_for(lambda: client_socket_to(port), "libpq's socket to the silent listener", timeout=10)
        with sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 17000  # DB_CLIENT_TIMEOUT_MS
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        with app.app_context():
            db.engine.dispose()
    timeout = outcome["error"].orig
    assert isinstance(timeout, DatabaseTimeout) and timeout.phase == "connect", repr(outcome["error"])
    assert 1.5 <= outcome["elapsed"] < 2 + SLACK_S, outcome["elapsed"]
    assert not deadlines(app).answering

    # Nothing listening: refused at once, which is not a timeout (503 database_unavailable).
    refused = create_app(base_config(f"postgresql+psycopg2://u:p@127.0.0.1:{free_port()}/x", tmp_path))
    with refused.app_context(), pytest.raises(sa_exc.OperationalError) as raised, db.engine.connect():
        pass
    assert not isinstance(raised.value.orig, DatabaseTimeout), repr(raised.value)
    assert deadlines(refused).answering


def test_a_tcp_uri_gets_the_parameters_in_its_connect_arguments(tmp_path):
    app = create_app(base_config("postgresql+psycopg2://u:p@db.example:5432/x", tmp_path))
    args = app.config["SQLALCHEMY_ENGINE_OPTIONS"]["connect_args"]
    expected = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
    assert expected.items() <= args.items()
    assert args["tcp_user_timeout"] == 11000  # DB_STATEMENT_TIMEOUT_MS 10000 + 1000
    assert args["connect_timeout"] == 3


# --- the Unix socket of the test Postgres ----------------------------------------------------


def backend_query(database_uri: str, pid: int) -> str:
    engine = create_engine(database_uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT query FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).scalar()
    finally:
        engine.dispose()


def test_a_statement_past_the_client_deadline_fails_in_time_and_its_connection_is_discarded(make_app, tmp_path):
    app = make_app(
        DB_STATEMENT_TIMEOUT_MS="0", DB_CLIENT_TIMEOUT_MS="500", LOG_DIR=str(tmp_path / "logs"), LOG_CONSOLE="0"
    )

    @app.get("/sleeping-statement")
    def sleeping_statement():
        db.session.execute(text("SELECT pg_sleep(2)"))
        return {}

    with app.app_context():
        with db.engine.connect() as conn:
            before = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            started = time.monotonic()
            with pytest.raises(sa_exc.OperationalError) as raised:
                conn.execute(text("SELECT pg_sleep(2)"))
            elapsed = time.monotonic() - started
            assert conn.invalidated  # never handed out again
        assert isinstance(raised.value.orig, DatabaseTimeout) and raised.value.orig.sent
        assert 0.45 <= elapsed < 0.5 + SLACK_S, elapsed
        assert not deadlines(app).answering
        with db.engine.connect() as conn:  # the probe: answered, so the database answers again
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != before
        assert deadlines(app).answering

    response = app.test_client().get("/sleeping-statement", headers={"X-Request-ID": "deadline-1"})
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "database_timeout"
    assert response.headers["Retry-After"] == "2"
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = [json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines()]
    [warning] = [line for line in lines if line.get("request_id") == "deadline-1" and line.get("event") == "db_timeout"]
    assert warning["level"] == "WARNING" and warning["sent"] is True and warning["timeout_s"] == 0.5, warning


def test_while_the_database_does_not_answer_one_statement_probes_and_the_others_are_refused_unsent(
    make_app, database_uri
):
    app = make_app(DB_STATEMENT_TIMEOUT_MS="3000", DB_CLIENT_TIMEOUT_MS="5000")
    probing = threading.Event()

    def probe_statement() -> None:
        with app.app_context(), db.engine.connect() as probe_conn:
            probing.set()
            probe_conn.execute(text("SELECT pg_sleep(1)"))

    with app.app_context(), db.engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with db.engine.connect() as other, deadline(0.2), pytest.raises(sa_exc.OperationalError):
            other.execute(text("SELECT pg_sleep(2)"))  # cut: the database is not answering from now on
        assert not deadlines(app).answering

        thread = threading.Thread(target=probe_statement)
        thread.start()
        try:
            assert probing.wait(10)
            wait_for(lambda: "pg_sleep(1)" in (active_queries(database_uri) or ""), "the probe running", timeout=10)
            started = time.monotonic()
            with pytest.raises(sa_exc.OperationalError) as raised:
                conn.execute(text("SELECT 'refused-marker'"))
            assert time.monotonic() - started < 0.5
            assert isinstance(raised.value.orig, DatabaseTimeout) and not raised.value.orig.sent
            assert not conn.invalidated  # nothing was sent: the connection is fine
            assert "refused-marker" not in backend_query(database_uri, pid)
        finally:
            thread.join(timeout=30)
        assert deadlines(app).answering  # the probe's answer ended it
        assert conn.execute(text("SELECT 1")).scalar() == 1  # the same connection


def active_queries(database_uri: str) -> str | None:
    engine = create_engine(database_uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT string_agg(query, ' | ') FROM pg_stat_activity "
                    "WHERE application_name = 'flaskapi-observability' AND state = 'active'"
                )
            ).scalar()
    finally:
        engine.dispose()


# --- settings -------------------------------------------------------------------------------


@pytest.fixture
def no_timeouts_in_environment(monkeypatch):
    for name in ("DB_STATEMENT_TIMEOUT_MS", "DB_CLIENT_TIMEOUT_MS", "DB_PING_TIMEOUT_MS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_timeouts_in_environment")
@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, 11000),
        ({"DB_STATEMENT_TIMEOUT_MS": "500"}, 1500),
        ({"DB_STATEMENT_TIMEOUT_MS": "0"}, 0),
        ({"DB_STATEMENT_TIMEOUT_MS": "0", "DB_CLIENT_TIMEOUT_MS": "3000"}, 3000),
        ({"DB_CLIENT_TIMEOUT_MS": "0"}, 0),
    ],
)
def test_the_client_deadline_defaults_to_a_second_above_the_statement_timeout(given, expected):
    settings = Settings.from_env({"FLASK_ENV": "testing", **given})
    assert settings.db_client_timeout_ms == expected
    assert settings.db_ping_timeout_ms == 2000


@pytest.mark.usefixtures("no_timeouts_in_environment")
def test_a_client_deadline_not_above_the_statement_timeout_is_refused():
    with pytest.raises(SettingsError, match="DB_CLIENT_TIMEOUT_MS must be above DB_STATEMENT_TIMEOUT_MS"):
        Settings.from_env({"FLASK_ENV": "testing", "DB_CLIENT_TIMEOUT_MS": "10000"})
