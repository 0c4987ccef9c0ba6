"""The lesson's commands as a user types them, from the repo root, against a fresh database:

    python -m flask db upgrade          (twice: the second is a no-op)
    python -m flask db-custom seed
    python -m flask db-custom drop      (then upgrade again)
    python -m flask run -h 127.0.0.1 -p PORT

The app is found through the repo's .flaskenv (FLASK_APP=service), as for the user. Every
process runs in its own session and is stopped by PID with timeouts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from sqlalchemy import create_engine, inspect, text

from bench.harness.commands import run_command
from bench.harness.environment import free_port
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from service import devdb

pytestmark = pytest.mark.stack

APP_TABLES = {"users", "books", "throttle_counters", "alembic_version"}
HEAD = "0003"  # the newest migration (migrations/versions/)


@pytest.fixture(scope="module")
def cli_env(postgres, tmp_path_factory) -> dict[str, str]:
    """DB_URI of a fresh database and FLASK_ENV=development; data and logs kept out of the repo."""
    data_dir = tmp_path_factory.mktemp("cli")
    uri = devdb.create_database(postgres, "test_cli")
    dropped = (
        "FLASK_APP",
        "FLASK_DEBUG",
        "FLASK_RUN_PORT",
        "FLASK_RUN_HOST",
        "JWT_SECRET_KEY",
        "PROMETHEUS_MULTIPROC_DIR",
    )
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(DB_URI=uri, FLASK_ENV="development", DATA_DIR=str(data_dir), LOG_DIR=str(data_dir / "logs"))
    return env


def flask(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "flask", *args], env, timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stdout}"
    return result


class Database:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self):
        self.engine = create_engine(self.uri)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.dispose()

    def tables(self) -> set[str]:
        return set(inspect(self.engine).get_table_names())

    def scalar(self, sql: str):
        with self.engine.connect() as conn:
            return conn.execute(text(sql)).scalar()


def test_upgrade_seed_drop_upgrade(cli_env):
    with Database(cli_env["DB_URI"]) as db:
        assert db.tables() == set()

        first = ok(flask(cli_env, "db", "upgrade"))
        assert "Running upgrade  -> 0001" in first.stdout
        assert f" -> {HEAD}, " in first.stdout  # up to the newest
        assert db.tables() == APP_TABLES
        assert db.scalar("SELECT version_num FROM alembic_version") == HEAD

        second = ok(flask(cli_env, "db", "upgrade"))
        assert "Running upgrade" not in second.stdout  # nothing left to apply
        assert db.tables() == APP_TABLES
        assert db.scalar("SELECT count(*) FROM alembic_version") == 1

        seeded = ok(flask(cli_env, "db-custom", "seed"))
        assert "Seeded 10 users" in seeded.stdout and "1000 books" in seeded.stdout
        assert db.scalar("SELECT count(*) FROM users") == 10
        assert db.scalar("SELECT count(*) FROM books") == 1000
        assert db.scalar("SELECT count(*) FROM books b JOIN users u ON u.id = b.owner_id") == 1000

        dropped = ok(flask(cli_env, "db-custom", "drop"))
        assert "Dropped all tables" in dropped.stdout
        assert db.tables() == set()

        again = ok(flask(cli_env, "db", "upgrade"))
        assert "Running upgrade  -> 0001" in again.stdout
        assert db.tables() == APP_TABLES
        assert db.scalar("SELECT count(*) FROM users") == 0
        assert db.scalar("SELECT count(*) FROM books") == 0


def test_flask_run_serves_books(cli_env, tmp_path):
    ok(flask(cli_env, "db", "upgrade"))  # idempotent: the order of tests does not matter
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ManagedProcess(
        [sys.executable, "-m", "flask", "run", "-h", "127.0.0.1", "-p", str(port)],
        env=cli_env,
        log_path=tmp_path / "flask-run.out",
        name="flask run",
    ).start()

    def answer():
        assert server.poll() is None, f"flask run exited {server.poll()}"
        try:  # in a list: a Response is falsy when its status is 4xx/5xx
            return [requests.get(url + "/books/", timeout=30)]
        except requests.ConnectionError:  # not listening yet
            return None

    try:
        try:
            [response] = wait_for(answer, f"flask run to answer on {url}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{server.output()[-3000:]}") from None
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json() == {"items": [], "next_cursor": None}  # fresh tables
    finally:
        server.stop(10)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/books/", timeout=2)
